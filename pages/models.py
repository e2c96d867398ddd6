"""Admin · Models: every version side by side, promote a candidate, roll back, delete."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
import streamlit as st

from cxr_core.metrics import external_rows
from cxr_core.models.fitted_films import fitted_uses_text
from cxr_core.models.pointer import RegistryError, default_model_id
from cxr_core.models.site_threshold import adopt_site_threshold, site_threshold_of
from cxr_core.models.versions import (
    Version,
    delete_version,
    list_versions,
    not_evaluated,
    promote,
    promotion_problems,
    rollback,
    rollback_target,
    set_default_model,
)
from cxr_core.state import audit
from cxr_core.state.datasets import list_datasets
from cxr_core.state.site_validations import list_validations
from pages._common import choose_evaluation_set, current_user, enter_page, estimate_cell, guarded, render_validation

enter_page(role="admin")
st.title("Models")
user, role = current_user()
st.caption(
    "Shipped versions live in weights/ (in git); versions trained here in the registry. The active version is what "
    "Diagnose and Compare use. Promotion only flips a pointer once the candidate is complete and verified."
)

versions = list_versions()
if not versions:
    st.error("No trained model is installed. Add a model folder (model.safetensors + manifest.json); see the README.")
    st.stop()


model_ids = sorted({v.model_id for v in versions})
chosen_default = default_model_id()
st.subheader("Default model for Diagnose")
left, right = st.columns([3, 1])
new_default = left.selectbox(
    "The model clinicians are offered first",
    model_ids,
    index=model_ids.index(chosen_default) if chosen_default in model_ids else 0,
    key="default-model",
)
if chosen_default is None:
    left.warning("No default has been chosen: Diagnose offers the first model by name. Choose one and save it.")
if right.button("Save as default", disabled=new_default == chosen_default):
    with guarded("setting the default model"):
        set_default_model(new_default, user=user)
        audit.record("set_default_model", user=user, role=role, model=new_default, details={"from": chosen_default})
        st.rerun()


def _row(v: Version) -> dict[str, object]:
    ev = v.evaluation or {}
    test = v.manifest.metrics.get("test", {}) if v.manifest.metrics else {}
    covid = (ev.get("per_class") or {}).get("covid", {})
    return {
        "version": v.version, "active": v.active, "where": "shipped" if v.shipped else "registry", "created": v.manifest.created[:16],
        "COVID-19 threshold": v.manifest.thresholds.get(v.manifest.classes[0]),
        "threshold from": None if v.manifest.classes[0] not in v.manifest.thresholds else "this site" if site_threshold_of(v) else "training",
        "eval accuracy": ev.get("accuracy"), "eval COVID sensitivity": covid.get("recall"), "eval ECE": ev.get("ece"), "eval n": ev.get("n"),
        "training test accuracy": test.get("accuracy"), "architecture": v.manifest.architecture,
    }


@st.cache_data(show_spinner="Checking the set for films this version was fitted on…", max_entries=32, ttl=600)
def _fitted_films_in(version_folder: str, eval_dir: str) -> int:
    """:func:`cxr_core.training.evaluation_set.fitted_films_in`, once per version and folder (it reads every film)."""
    from cxr_core.errors import CxrError
    from cxr_core.models.manifest import read_manifest
    from cxr_core.training.evaluation_set import fitted_films_in

    try:
        return fitted_films_in(read_manifest(Path(version_folder)), Path(eval_dir))
    except CxrError:
        return 0  # not a labelled folder: the Evaluate button says why when pressed


def render_site_adaptation(record: dict) -> None:
    """An adapted candidate's before and after on the site's held-out films, side by side."""
    films = record.get("films", {})
    names = {str(d.root): d.name for d in list_datasets()}
    site = str(record.get("site"))
    site = f"the dataset \"{names[site]}\"" if site in names else f"`{site}`"
    st.markdown(f"**Site adaptation** on {site}: {films.get('adapt', 0)} films adapted on, {films.get('validation', 0)} "
                f"validated on, {films.get('held_out', 0)} held out (patients never trained on), {films.get('replay_train', 0)} "
                "replayed training films" + ("; kept near the base model by distillation." if record.get("distill") else "."))
    rows = []
    for name, key in (("COVID-19 sensitivity", "covid_sensitivity"), ("Specificity", "non_covid_specificity"), ("PPV", "ppv"), ("NPV", "npv")):
        row = {"on the held-out films": name}
        for side in ("before", "after"):
            row[side] = estimate_cell((record.get(side) or {}).get(key), missing="—")
        rows.append(row)
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")
    shared = record.get("shared_test")
    st.caption(f"COVID-19 sensitivity on the shared test split ({shared['folder']}, {shared['n']} films): {shared['covid_sensitivity']}"
               if shared and shared.get("covid_sensitivity") is not None else "COVID-19 sensitivity on the shared test split: not measured.")


for model_id in model_ids:
    mine = [v for v in versions if v.model_id == model_id]
    active = next((v for v in mine if v.active), None)
    st.header(model_id)
    st.dataframe(pd.DataFrame([_row(v) for v in mine]), hide_index=True, width="stretch")
    measured = [v for v in mine if v.evaluation]
    if measured:
        fig = go.Figure()
        for metric, getter in (
            ("accuracy", lambda v: v.evaluation.get("accuracy")),
            ("COVID sensitivity", lambda v: (v.evaluation.get("per_class") or {}).get("covid", {}).get("recall")),
            ("1 - ECE", lambda v: 1 - v.evaluation["ece"] if v.evaluation.get("ece") is not None else None),
        ):
            fig.add_bar(name=metric, x=[v.version + (" (active)" if v.active else "") for v in measured], y=[getter(v) for v in measured])
        fig.update_layout(barmode="group", yaxis_range=[0, 1], height=320, title="On the fixed evaluation set", margin=dict(t=40))
        st.plotly_chart(fig, width="stretch", key=f"compare-{model_id}")
    else:
        st.caption(
            "No version has been measured on the fixed evaluation set yet. A job launched on the Training page with an "
            "evaluation set (a folder of local labelled films, never trained on; default `CXR_EVAL_DIR`) measures its "
            "candidate and the active version on it, and both appear here."
        )

    others = [v for v in mine if not v.active]
    cols = st.columns([2, 3, 1, 1])
    if others:
        pick = cols[0].selectbox("Version", [v.version for v in others], key=f"pick-{model_id}")
        candidate = next(v for v in others if v.version == pick)
        unevaluated = not_evaluated(candidate)
        problems = promotion_problems(candidate, active)
        if candidate.site_adaptation:
            render_site_adaptation(candidate.site_adaptation)
        reason = ""
        adopted_from = site_threshold_of(candidate)
        if adopted_from:
            cols[1].caption(f"{pick}: {adopted_from['base']} with this site's COVID-19 threshold p ≥ {adopted_from['threshold']} "
                            f"(was {adopted_from['base_threshold']}), adopted by {adopted_from['user']}: {adopted_from['reason']}")
        if unevaluated:
            cols[1].info(f"Not evaluated: {pick} has no figures on the fixed evaluation set, so it cannot be promoted. "
                         "Evaluate it here, with a training job's evaluation set, or `python -m cxr_core evaluate`.")
            eval_dir = choose_evaluation_set(f"evaluate-set-{model_id}")
            chose_it = (adopted_from or {}).get("chosen_on", {}).get("root")
            if eval_dir is not None and chose_it and Path(chose_it).resolve() == Path(eval_dir).resolve():
                st.warning("These are the films that chose this version's threshold: its figures on them will flatter it. "
                           "Evaluate it on films that played no part in choosing it.")
            elif eval_dir is not None and Path(eval_dir).is_dir():
                fitted = _fitted_films_in(str(candidate.path), str(eval_dir))
                if fitted:
                    st.warning(f"{fitted} films of this set were used for {pick}'s {fitted_uses_text(candidate.manifest)}: its "
                               "figures on them will flatter it, "
                               "and the promotion check will say so. Evaluate it on films it has not seen.")
            if st.button("Evaluate", key=f"evaluate-{model_id}", disabled=eval_dir is None,
                         help="Scores the candidate, and the active version unless it already was, on this set: the "
                              "promotion check compares them there."):
                from cxr_core.training.evaluation_set import evaluate_active_alongside, evaluate_candidate

                with guarded("evaluating the candidate"), st.spinner(f"Scoring {pick} on the evaluation set…"):
                    measured = evaluate_candidate(candidate.path, eval_dir)
                    evaluate_active_alongside(model_id, eval_dir)
                    audit.record("evaluate", user=user, role=role, model=candidate.key,
                                 details={"evaluation_set": str(eval_dir), "n": measured["n"], "accuracy": measured["accuracy"]})
                    st.rerun()
        elif problems:
            cols[1].warning("Not shown to be better than the active version: " + "; ".join(problems) + ".")
            reason = cols[1].text_input("Reason to promote anyway", key=f"reason-{model_id}")
        if cols[2].button("Promote", key=f"promote-{model_id}", type="primary", disabled=bool(unevaluated)):
            with guarded("promoting"):
                try:
                    promote(model_id, pick, user=user, override_reason=reason or None)
                except RegistryError as exc:
                    st.error(str(exc))
                else:
                    audit.record("promote", user=user, role=role, model=f"{model_id}@{pick}", details={"from": active.version if active else None, "override_reason": reason or None, "problems": problems})
                    st.cache_resource.clear()
                    st.rerun()
        confirm = cols[3].checkbox(f"Delete {pick}", key=f"confirm-delete-{model_id}", help="Tick, then press Delete: a deleted version cannot be restored.")
        if cols[3].button("Delete", key=f"delete-{model_id}", disabled=not confirm):
            with guarded("deleting the version"):
                try:
                    delete_version(model_id, pick)
                except RegistryError as exc:
                    st.error(str(exc))
                else:
                    audit.record("delete_version", user=user, role=role, model=f"{model_id}@{pick}")
                    st.rerun()
    target = rollback_target(model_id)
    if target and st.button(f"Roll back to {target}", key=f"rollback-{model_id}"):
        with guarded("rolling back"):
            restored = rollback(model_id, user=user)
            audit.record("rollback", user=user, role=role, model=restored.key, details={"from": active.version if active else None})
            st.cache_resource.clear()
            st.rerun()

    for v in mine:
        m = v.manifest
        # In backticks: Markdown would link "id@1.0.0-site-d" as an e-mail address.
        with st.expander(f"{m.name} — `{m.key}`" + (" (active)" if v.active else "")):
            st.markdown(f"**Intended use.** {m.intended_use}")
            st.markdown(
                f"**Input.** {m.input.size[0]} x {m.input.size[1]} px, {m.input.channels} channel(s).  \n"
                f"**Classes (output order).** {', '.join(m.label(c) for c in m.classes)} — {m.head} head.  \n"
                f"**Temperature.** {m.temperature:g}. **Thresholds.** {dict(m.thresholds) or 'none (most probable class)'}.  \n"
                f"**Weights sha256.** `{m.weights_sha256}`"
            )
            test = m.metrics.get("test") if m.metrics else None
            if test:
                c = st.columns(4)
                c[0].metric("Test accuracy", f"{test['accuracy']:.3f}")
                c[1].metric("Macro AUROC", f"{test['auroc_macro']:.3f}" if test.get("auroc_macro") is not None else "—")
                c[2].metric("ECE (calibrated)", f"{test['ece']:.3f}")
                if "covid" in test.get("per_class", {}):
                    c[3].metric("COVID sensitivity", f"{test['per_class']['covid']['recall']:.3f}")
            figures = sorted((v.path / "figures").glob("*.json")) if (v.path / "figures").is_dir() else []
            wanted = [f for f in figures if f.stem.endswith(("reliability", "confusion", "roc"))] + [f for f in figures if f.stem.startswith("training")]
            for start in range(0, len(wanted), 2):
                c = st.columns(2)
                for col, path in zip(c, wanted[start : start + 2]):
                    try:
                        col.plotly_chart(pio.from_json(path.read_text(encoding="utf-8")), width="stretch", key=f"{m.key}-{path.stem}")
                    except ValueError:
                        col.caption(f"{path.name} could not be read.")
            if m.ood:
                ood = dict(m.ood)
                st.markdown(f"**Input gate.** {ood.get('method', 'fitted')}: warning above {ood.get('warn')}, rejection above {ood.get('reject')}"
                            + (f"; on the test split {ood['test_rates']}" if ood.get("test_rates") else "") + ".")
            external = external_rows(v.path, m.key)
            if external:
                st.markdown("**Films called COVID-19, by source** (JSRT: a hospital no model here trained on)")
                st.dataframe(pd.DataFrame(external), hide_index=True, width="stretch")
            card = v.path / "README.md"
            if card.is_file():
                st.markdown("**Model card**")
                st.markdown(card.read_text(encoding="utf-8"))

st.divider()
st.subheader("Validate at this site")
st.caption(
    "Before clinical use: score a model on this hospital's own labelled films (upload them on the Training data page; "
    "any folder names, e.g. covid, normal, nodule; every film that is not in covid counts as not COVID-19). The result "
    "is recorded, listed here and shown on Diagnose beside the model."
)
checked = [d for d in list_datasets() if (d.report() or {}).get("ok")]
if not checked:
    st.info("No checked dataset yet: upload the site's labelled films on the Training data page first.")
else:
    by_dataset = {d.id: d for d in checked}
    c = st.columns([2, 2, 1])
    dataset_id = c[0].selectbox("Site films", list(by_dataset), format_func=lambda i: f"{by_dataset[i].name} ({i})", key="validate-data")
    version_key = c[1].selectbox("Model version", [v.key for v in versions], key="validate-model",
                                 format_func=lambda k: k + (" (active)" if any(v.key == k and v.active for v in versions) else ""))
    target_sensitivity = c[2].number_input("Target sensitivity", 0.5, 0.99, 0.95, step=0.01, key="validate-target")
    if st.button("Validate", type="primary", key="validate-run"):
        from cxr_core.models.loading import load_model
        from cxr_core.state.site_validations import record_validation
        from cxr_core.training.validation import validate_site

        with guarded("validating the model"), st.spinner("Scoring every film through the app's own prediction path…"):
            version = next(v for v in versions if v.key == version_key)
            result = validate_site(load_model(version.path), by_dataset[dataset_id].root, target_sensitivity=float(target_sensitivity))
            record_validation(result, user=user, role=role, data_name=by_dataset[dataset_id].name)
            st.session_state["validation-shown"] = {**result.as_dict(), "data_name": by_dataset[dataset_id].name,
                                                    "root": str(by_dataset[dataset_id].root)}
            st.session_state.pop("adopted-shown", None)
    shown = st.session_state.get("validation-shown")
    if shown:
        validated = next((v for v in versions if v.key == shown["model"]), None)
        if validated:  # a statement, not an expression: Streamlit would write an expression's value (None) on the page
            render_validation(shown, validated.manifest.label)
        else:
            render_validation(shown)
        offered = shown.get("suggested_threshold")
        if validated and offered and validated.manifest.classes[0] in validated.manifest.thresholds:
            with st.expander(f"Adopt p ≥ {offered['value']} as this site's COVID-19 threshold (a new version of {validated.model_id})"):
                st.caption(f"Registers a candidate with `{validated.key}`'s weights and this threshold. Nothing changes until it "
                           "is evaluated and promoted below, and a rollback undoes it. These films chose the threshold, so "
                           "they flatter it: judge it on the fixed evaluation set and on other films of this site.")
                c = st.columns([1, 3])
                stamp = datetime.now(timezone.utc).strftime("%Y%m%d")
                new_version = c[0].text_input("New version", value=f"{validated.version}-site-{stamp}", key="adopt-version").strip()
                why = c[1].text_input("Why this site adopts it (kept with the version)", key="adopt-reason")
                if st.button("Register the new version", key="adopt-run", disabled=not (why.strip() and new_version)):
                    with guarded("registering the site threshold"):
                        chosen_on = {"model": shown["model"], "data_name": shown.get("data_name", ""), "root": shown.get("root", ""),
                                     "data_sha256": shown["data_sha256"],
                                     "n": shown["n"], "sensitivity": offered["sensitivity"], "specificity": offered["specificity"],
                                     "target_sensitivity": offered.get("target_sensitivity")}
                        from cxr_core.training.dataset import scan_folder

                        root = Path(shown["root"]) if shown.get("root") else None
                        films = [r.path for r in scan_folder(root)] if root and root.is_dir() else []
                        adopted = adopt_site_threshold(validated.model_id, validated.version, float(offered["value"]),
                                                       new_version=new_version, user=user, reason=why, chosen_on=chosen_on,
                                                       chosen_films=films)
                        audit.record("adopt_site_threshold", user=user, role=role, model=adopted.key,
                                     details={"base": validated.key, "threshold": float(offered["value"]), "reason": why.strip(),
                                              "data_sha256": shown["data_sha256"]})
                        st.session_state["adopted-shown"] = adopted.key
                        st.rerun()
        if st.session_state.get("adopted-shown"):
            st.success(f"Registered `{st.session_state['adopted-shown']}` as a candidate: evaluate it, then promote it, under its "
                       "model above.")
    past = list_validations()
    if past:
        st.markdown("**Recorded validations** (newest first)")
        st.dataframe(pd.DataFrame([{
            "when": v.created, "who": v.user, "model": v.model, "films": v.data_name, "n": v.n,
            "COVID-19 sensitivity": v.result["covid_sensitivity"]["value"], "specificity": v.result["non_covid_specificity"]["value"],
            "AUROC": v.result["auroc"]["value"], "films it was fitted on": v.result.get("fitted_films", 0),
            "data sha256": v.data_sha256[:12]} for v in past]), hide_index=True, width="stretch")
        c = st.columns([3, 1])
        picked = c[0].selectbox("Report of", past, format_func=lambda v: f"#{v.id}: {v.model} on {v.data_name}, {v.created[:16]}",
                                key="validation-report")
        labelled = next((x for x in versions if x.key == picked.model), None)
        c[1].download_button(
            "Download the report", picked.report(labelled.manifest.label) if labelled else picked.report(),
            file_name=f"cxr-site-validation-{picked.id}.md", mime="text/markdown", icon=":material/download:",
            help="The figures with their intervals, the confusion matrix and reliability, as Markdown, for the hospital's "
                 "records. No file names.",
            on_click=lambda: audit.record("export_validation_report", user=user, role=role, model=picked.model,
                                          details={"validation_id": picked.id}))

st.divider()
st.subheader("Installation check")
st.caption(
    "The same checks as `python -m cxr_core check` (for monitoring): the state folder is writable, the database opens, "
    "the audit trail's hash chain is intact, the image checks' files are there, and each model's weights match their "
    "manifest and predict a sample film."
)
if st.button("Run the check", key="health_check", icon=":material/health_and_safety:"):
    from cxr_core.state.health import check_health

    with guarded("checking the installation"), st.spinner("Checking the installation…"):
        report = check_health()
        st.dataframe(pd.DataFrame(report.rows()).rename(columns={"name": "check"}), hide_index=True, width="stretch")
        if report.ok:
            st.success("Every check passed.")
        else:
            st.error("Failed: " + ", ".join(c.name for c in report.checks if not c.ok) + ". See the details above.")
