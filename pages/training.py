"""Admin · Training: launch a fine-tuning or training job, watch it, cancel or resume it."""

from __future__ import annotations

import os
from datetime import datetime, timezone

import plotly.graph_objects as go
import streamlit as st

from cxr_core.models.architectures import ARCHITECTURES
from cxr_core.models.versions import list_versions
from cxr_core.state import audit
from cxr_core.state.datasets import list_datasets
from cxr_core.state.jobs import (
    CANCELLED,
    FAILED,
    FINISHED,
    PRESETS,
    QUEUED,
    RUNNING,
    JobSpec,
    cancel,
    create_job,
    describe_job_progress,
    job_runs,
    launch,
    list_jobs,
    log_tail,
    read_spec,
    read_state,
)
from cxr_core.training.adapt import CROSSFIT, site_adaptation_blocker, training_folders
from cxr_core.training.augment import MAX_ASPECT, MAX_EDGE_CROP
from cxr_core.training.run import RunDir
from pages._common import choose_evaluation_set, current_user, default_model_key, enter_page, guarded

enter_page(role="admin")
st.title("Training")
user, role = current_user()

datasets = [d for d in list_datasets() if d.trainable]  # checked, and confirmed by an admin
versions = list_versions()

with st.expander("Launch a job", expanded=not any(s.state in (RUNNING, QUEUED) for _, _, s in list_jobs())):
    if not datasets:
        st.info("Upload, check and confirm a dataset on the Training data page first (\"Use this dataset for training\").")
    else:
        by_id = {d.id: d for d in datasets}
        ids = list(by_id)
        preferred = st.session_state.get("training_dataset")
        dataset_id = st.selectbox("Dataset", ids, index=ids.index(preferred) if preferred in ids else 0,
                                  format_func=lambda i: f"{by_id[i].name} ({i})")
        preset = PRESETS[st.radio("Recipe", range(len(PRESETS)), format_func=lambda i: PRESETS[i].name, horizontal=True,
                                  key="training_preset")]
        st.caption(preset.description)
        active = [v for v in versions if v.active]
        if preset.fine_tune and active:
            default_id, _ = default_model_key()
            keys = [v.key for v in active]
            base_key = st.selectbox("Model to fine-tune (its active version)", keys,
                                    index=keys.index(default_id) if default_id in keys else 0,
                                    format_func=lambda k: k + (" (the default on Diagnose)" if k == default_id else ""))
            base = next(v for v in active if v.key == base_key)
            arch, classes, binary = base.manifest.architecture, tuple(base.manifest.classes), base.manifest.classes[0] if base.manifest.head == "sigmoid" else None
            model_id = base.model_id
            size_default = base.manifest.input.size[0]
        else:
            if preset.fine_tune:
                st.info("No registered model to fine-tune: this job trains a new one.")
            base_key = None
            arch = st.selectbox("Architecture", sorted(a for a in ARCHITECTURES if not a.endswith("-test")))
            kind = st.radio("Task", ["COVID-19 / normal / viral pneumonia", "COVID-19 vs other"], horizontal=True)
            binary = "covid" if kind.endswith("other") else None
            classes = ("covid", "other") if binary else ("covid", "normal", "viral_pneumonia")
            model_id = st.text_input("Model id", value=f"{arch}-{'covid-binary' if binary else 'covid3'}")
            size_default = 224
        # Keys carry the preset, so choosing another preset refills every field with its values.
        k = f"-{PRESETS.index(preset)}"
        with st.expander("Advanced: every setting of this job"):
            c = st.columns(4)
            epochs = c[0].number_input("Epochs", 1, 200, preset.epochs, key="epochs" + k)
            size = c[1].number_input("Image size (px)", 64, 512, size_default, step=32, key="size" + k)
            batch = c[2].number_input("Batch size", 2, 256, preset.batch_size, key="batch" + k)
            lr = c[3].number_input("Peak learning rate", 1e-6, 1e-1, preset.lr, format="%.6f", key="lr" + k)
            c = st.columns(4)
            balances = ["weights", "sampler", "source", "none"]
            balance = c[0].selectbox("Class balance", balances, index=balances.index(preset.balance), key="balance" + k,
                                     help="source: weights that balance every (source, label) group of metadata.csv "
                                          "(plain class weights when the data has no sources)")
            freeze = c[1].number_input("Frozen-backbone epochs", 0, 50, preset.freeze_epochs if base_key else 0, key="freeze" + k)
            decay = c[2].number_input("Per-stage LR factor", 0.1, 1.0, preset.layer_decay if base_key else 1.0, step=0.05, key="decay" + k)
            patience = c[3].number_input("Early stopping (epochs, 0 = off)", 0, 50, preset.patience, key="patience" + k)
            c = st.columns(4)
            augment = c[0].toggle("Augmentation", value=True, key="augment" + k)
            hflip = c[1].toggle("Horizontal flips", value=False, help="Off by default: flips swap laterality.", key="hflip" + k)
            mask_text = c[2].toggle("Mask burned-in text", value=False, key="mask" + k,
                                    help="Inpaint detected text and markers on every training film; the model then does the same before "
                                         "every prediction, so it cannot learn a hospital's labels instead of the lungs. "
                                         "A model fine-tuned from a masked one stays masked.")
            sensitivity = c[3].number_input("COVID sensitivity target", 0.5, 0.999, 0.95, key="sensitivity" + k)
            c = st.columns(6)
            zoom_min = c[0].number_input("Zoom from", 0.5, 1.0, preset.zoom[0], step=0.05, disabled=not augment, key="zoom0" + k,
                                         help="Zoom augmentation range; above 1 frames the chest more tightly. Models trained on one "
                                              "collection's framing learn it: a wider range (e.g. 0.85 to 1.35) breaks that shortcut.")
            zoom_max = c[1].number_input("Zoom to", 1.0, 2.0, preset.zoom[1], step=0.05, disabled=not augment, key="zoom1" + k)
            aspect = c[2].number_input("Aspect stretch", 0.0, MAX_ASPECT, preset.aspect, step=0.05, disabled=not augment, key="aspect" + k,
                                       help="Width/height stretched by up to 1 + this either way (films squeezed to a square from "
                                            "different shapes).")
            edge_crop = c[3].number_input("Edge crop", 0.0, MAX_EDGE_CROP, preset.edge_crop, step=0.05, disabled=not augment, key="edge" + k,
                                          help="Each edge cropped away by up to this share of the side, independently, and the "
                                               "rest stretched back: collimation moves one edge at a time (neck or abdomen in "
                                               "or out of the field).")
            acquisition = c[4].number_input("Acquisition artefacts", 0.0, 1.0, preset.acquisition, step=0.05, disabled=not augment,
                                            key="acquisition" + k,
                                            help="Each film, whatever its class, gets a black frame, local-contrast (CLAHE) processing, "
                                                 "a burned-in box, a lower resolution and a JPEG re-encode, each with this probability: "
                                                 "a hospital's processing then cannot stand in for a diagnosis.")
            average_every = c[5].number_input("Weight averaging (every N steps, 0 = off)", 0, 10_000, 0, key="average" + k,
                                              help="Export the average of the weights taken every N steps of the run (SWA), with "
                                                   "batch-norm statistics recomputed, instead of the best epoch. Compare the "
                                                   "candidate's evaluation before promoting it: on the shared data it did not help.")
        labels = (by_id[dataset_id].report() or {}).get("classes") or []
        aux_choices = [label for label in labels if label not in classes] if not binary else []
        aux = st.multiselect("Auxiliary classes (trained, then dropped)", aux_choices, default=[],
                             disabled=not aux_choices,
                             help="Other labelled folders of this dataset trained as extra outputs and removed from the "
                                  "exported model. Bacterial pneumonia this way shows the network children with pneumonia "
                                  "that is not viral, so being a child cannot stand in for viral pneumonia.")
        if preset.site_adaptation and not binary:
            st.caption("Left empty, a site adaptation trains every label of the site and of the replayed folders that the "
                       "model has no class for (e.g. nodule, pneumonia) as an auxiliary class: those films still teach it "
                       "what is not COVID-19.")
        replay: list[str] = []
        replay_share = 0.5
        distill = 0.0
        crossfit = 0
        blocked = None
        if preset.site_adaptation:
            found = [p for p in os.environ.get("CXR_REPLAY_DIRS", "").split(os.pathsep) if p]
            if not found and base_key:
                found = [str(p.resolve()) for p in training_folders(base.manifest, base.path)]
            typed = st.text_area("The model's training data on the server (folders, one per line), mixed in so it does not forget",
                                 value="\n".join(found), key="replay" + k,
                                 help="The first folder's test split also checks that COVID-19 sensitivity stays at 0.95 or "
                                      "above. Default: CXR_REPLAY_DIRS, else the folders the model's manifest says it was "
                                      "trained on, when they are on this server.")
            replay = [line.strip() for line in typed.splitlines() if line.strip()]
            replay_share = st.slider("Share of training films from those folders", 0.0, 0.9, 0.5, 0.05, key="replay-share" + k)
            keep = st.toggle("Keep the base model's answers (distillation)", value=False, key="distill" + k, disabled=not base_key,
                             help="Adds a term that keeps the adapted model's answers near the base model's on every film it "
                                  "trains on. Without training data to mix in, a 3-class model needs it when the site has no "
                                  "films of one of its classes (viral pneumonia). Measured at two made-up sites: better "
                                  "COVID-19 sensitivity and less forgetting, less gain in specificity than with the training "
                                  "data mixed in (docs/experiments/2026-12-06-adapt-distillation.md).")
            distill = 1.0 if keep else 0.0
            crossfit = int(st.number_input(
                "Cross-fit the threshold (folds, 0 = off)", 0, 5, CROSSFIT, key="crossfit" + k,
                help="That many more fine-tunes, each on all but one fold of this site's patients (and the replayed films), "
                     "score the fold they did not see; the COVID-19 threshold and temperature are chosen on all those scores "
                     "instead of the validation films' alone. Takes that many times longer; the weights are the same. Measured "
                     "with 3 at two made-up sites: the sensitivity asked was kept (0.93-0.97 at the site, 0.935-0.965 on the "
                     "shared test, against 0.84-0.92 without), and the site's non-COVID films lost 2-12 points of "
                     "specificity. Use it when promotion refuses an adapted model on sensitivity "
                     "(docs/experiments/2026-12-06-adapt-crossfit-threshold.md)."))
            if crossfit == 1:
                st.warning("Cross-fitting needs at least 2 folds; 1 is treated as off.")
                crossfit = 0
            eval_dir = None
            st.caption("The candidate is evaluated on the held-out half of this dataset's patients, before and after.")
            blocked = site_adaptation_blocker(classes, binary, labels, bool(replay), bool(keep))
            if blocked:
                st.warning(blocked)
        else:
            eval_dir = choose_evaluation_set("training_eval_set", exclude=st.session_state.get("training_dataset"))
        version = st.text_input("New version name", value=datetime.now(timezone.utc).strftime("%Y.%m.%d-%H%M"))
        if st.button("Launch", type="primary", disabled=bool(preset.site_adaptation and blocked)):
            with guarded("launching the job"):
                spec = JobSpec(
                    dataset=str(by_id[dataset_id].root), arch=arch, model_id=model_id.strip(), version=version.strip(), user=user,
                    classes=classes, binary_positive=binary, aux_classes=tuple(aux), base_model=base_key, schedule=((int(size), int(epochs)),),
                    batch_size=int(batch), lr=float(lr), balance=balance, freeze_epochs=int(freeze), layer_decay=float(decay),
                    patience=int(patience), target_sensitivity=float(sensitivity), augment=augment, hflip=hflip,
                    zoom=(float(zoom_min), float(zoom_max)), aspect=float(aspect), edge_crop=float(edge_crop), acquisition=float(acquisition),
                    average_every=int(average_every),
                    eval_dir=str(eval_dir) if eval_dir else None, mask_burned_in=mask_text,
                    site_adaptation=preset.site_adaptation, replay=tuple(replay), replay_share=float(replay_share),
                    distill=distill, crossfit=crossfit,
                )
                job_dir = create_job(spec)
                try:
                    launch(job_dir)
                except Exception:
                    import shutil

                    shutil.rmtree(job_dir, ignore_errors=True)
                    raise
                audit.record("launch_job", user=user, role=role, model=f"{spec.model_id}@{spec.version}",
                             details={"job": spec.job_id, "dataset": dataset_id, "base": base_key, "arch": arch, "epochs": int(epochs)})
                st.success(f"Job {spec.job_id} started.")


def _curves(events: list[dict], total_epochs: int) -> go.Figure:
    """Losses and validation accuracy against epochs, the x axis spanning the whole planned run
    (whole epochs as ticks), so that one finished epoch is one point at 1, not a lone dot."""
    epochs = [e for e in events if e["event"] == "epoch"]
    steps = [e for e in events if e["event"] == "step"]
    fig = go.Figure()
    if steps:
        fig.add_scatter(x=[e["epoch"] + e["step"] / e["steps"] for e in steps], y=[e["loss"] for e in steps], name="training loss (running)", mode="lines")
    if epochs:
        fig.add_scatter(x=[e["epoch"] + 1 for e in epochs], y=[e["val_loss"] for e in epochs], name="validation loss", mode="lines+markers")
        fig.add_scatter(x=[e["epoch"] + 1 for e in epochs], y=[e["val_accuracy"] for e in epochs], name="validation accuracy", mode="lines+markers", yaxis="y2")
    fig.update_layout(height=320, margin=dict(t=30), legend=dict(orientation="h", y=-0.25),
                      xaxis=dict(title="epoch", range=[0, max(1, total_epochs)], dtick=max(1, total_epochs // 10), tick0=0),
                      yaxis=dict(title="loss", rangemode="tozero"),
                      yaxis2=dict(title="validation accuracy", overlaying="y", side="right", range=[0, 1]))
    return fig


@st.fragment(run_every=2)
def job_panel(job_dir_name: str, listed_state: str) -> None:
    job_dir = next((d for d, _, _ in list_jobs() if d.name == job_dir_name), None)
    if job_dir is None:
        st.caption("The job was removed.")
        return
    spec, state = read_spec(job_dir), read_state(job_dir)
    if state.state != listed_state:
        st.rerun()  # the job list above shows the old state: refresh the whole page
    events = RunDir(job_dir / "run").events()
    run_events = [events, *(RunDir(d, quiet=True).events() for d in job_runs(job_dir, spec)[1:])]
    total_epochs = sum(e for _, e in spec.schedule)
    done_epochs = sum(e["event"] == "epoch" for e in events)
    badge = {RUNNING: "🟢 running", QUEUED: "⏳ starting", FINISHED: "✅ finished", FAILED: "❌ failed", CANCELLED: "⏹ cancelled"}[state.state]
    st.markdown(f"**`{spec.model_id}@{spec.version}`** — {badge} — device {state.device or '…'} — by {spec.user}, {spec.created[:16]}")
    if state.state in (RUNNING, QUEUED):
        progress = describe_job_progress(run_events, total_epochs)
        st.progress(progress.fraction, text=progress.text)
    else:
        st.progress(done_epochs / total_epochs if total_epochs else 0.0, text=f"{done_epochs}/{total_epochs} epochs")
    if state.error:
        (st.error if state.state == FAILED else st.info)(state.error)
    if events:
        st.plotly_chart(_curves(events, total_epochs), width="stretch", key=f"curves-{job_dir.name}-{len(events)}")
    cols = st.columns(3)
    if state.state in (RUNNING, QUEUED) and cols[0].button("Cancel", key=f"cancel-{job_dir.name}"):
        cancel(job_dir)
        audit.record("cancel_job", user=user, role=role, details={"job": job_dir.name})
    if state.state in (FAILED, CANCELLED) and cols[0].button("Resume from the last checkpoint", key=f"resume-{job_dir.name}"):
        with guarded("resuming the job"):
            launch(job_dir)
            audit.record("resume_job", user=user, role=role, details={"job": job_dir.name})
    if state.state == FINISHED and state.candidate:
        cols[1].page_link("pages/models.py", label=f"Review candidate {state.candidate}", icon=":material/fact_check:")
    with st.expander("Log"):
        st.code(log_tail(job_dir) or "(empty)", language=None)


jobs = list_jobs()
if not jobs:
    st.info("No job yet.")
    st.stop()
st.subheader("Jobs")
names = [d.name for d, _, _ in jobs]
states = {d.name: state.state for d, _, state in jobs}
chosen = st.selectbox("Job", names, format_func=lambda n: next(f"{spec.model_id}@{spec.version} — {state.state} ({n})" for d, spec, state in jobs if d.name == n))
job_panel(chosen, states[chosen])
