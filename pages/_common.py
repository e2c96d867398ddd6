"""Streamlit helpers shared by the pages: cached models, the disclaimer, error display."""

from __future__ import annotations

import logging
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import streamlit as st

from cxr_core import config
from cxr_core.errors import CxrError
from cxr_core.imaging.gate import GateResult
from cxr_core.inference import DISCLAIMER
from cxr_core.models.loading import LoadedModel, ModelFolder, discover_models, load_model

log = logging.getLogger("cxr.pages")


ENTRY_FLAG = "cxr_entry"


def oidc_configured() -> bool:
    """Whether Streamlit's built-in OIDC login is set up (an ``[auth]`` secrets section)."""
    try:
        return "auth" in st.secrets
    except Exception:  # noqa: BLE001 - no secrets file at all
        return False


def restore_oidc_user(action: str = "session_resumed") -> None:
    """A page reload starts a new Streamlit session; an OIDC sign-in lives in Streamlit's
    identity cookie, so the user carries over without signing in again. (Password sign-ins
    last for the tab's session: nothing in the browser holds them.)"""
    if st.session_state.get("user", "anonymous") != "anonymous" or not oidc_configured():
        return
    if not getattr(st.user, "is_logged_in", False):
        return
    from cxr_core.state import audit
    from cxr_core.state.users import list_users

    email = str(st.user.get("email") or st.user.get("sub") or "")
    if not email:
        return
    known = {u.name: u.role for u in list_users()}
    st.session_state["user"], st.session_state["role"] = email, known.get(email, "radiologist")
    audit.record(action, user=email, role=st.session_state["role"], details={"method": "oidc"})


def enter_page(role: str | None = None) -> None:
    """Run a page only behind app.py, and only for a user allowed to see it.

    On the first request after the server starts, Streamlit can still be in its legacy
    multipage mode (a pages/ folder exists) and run a file of pages/ directly, skipping
    app.py and whatever it sets up (page config, sign-in). Such a session is sent to the
    entry script first; from then on every run goes through it.

    ``role="admin"`` pages need an admin signed in; clinical pages need any signed-in user
    when ``CXR_REQUIRE_LOGIN`` is set, and are open otherwise.
    """
    from cxr_core.state.users import require_login_everywhere

    if not st.session_state.get(ENTRY_FLAG):
        st.switch_page("app.py")
    user, current = current_user()
    if role == "admin" and current != "admin":
        st.warning("This page is for administrators. Sign in with an admin account." if user == "anonymous" else f"Signed in as {user} ({current}): this page needs an admin account.")
        st.page_link("pages/account.py", label="Sign in", icon=":material/login:")
        st.stop()
    if role is None and require_login_everywhere() and user == "anonymous":
        st.warning("Sign in to use the app.")
        st.page_link("pages/account.py", label="Sign in", icon=":material/login:")
        st.stop()


@st.cache_resource(show_spinner="Loading model…", max_entries=8)
def cached_model(path: str, weights_sha256: str) -> LoadedModel:
    """One LoadedModel per (folder, weights digest), shared by every session.

    Keyed on the digest too, so a replaced weights file is loaded afresh rather than
    served stale. Sharing is safe: see LoadedModel (hooks only under its lock).
    """
    del weights_sha256  # part of the cache key only
    return load_model(path)


def current_user() -> tuple[str, str]:
    """(user name, role) of this session; "anonymous" until signed in."""
    return str(st.session_state.get("user", "anonymous")), str(st.session_state.get("role", "anonymous"))


def name_field(purpose: str) -> str:
    """Inside a form: a "Your name" box when nobody is signed in (sign-in is optional), else nothing."""
    if current_user()[0] != "anonymous":
        return ""
    return st.text_input("Your name (you are not signed in; it is recorded with this)", max_chars=100, key=f"name-{purpose}")


def accountable_user(typed: str) -> tuple[str, str]:
    """(user, role) to record a clinical decision against: the signed-in user, or the name typed
    with it (marked as not signed in); ("", role) when neither is given."""
    user, role = current_user()
    if user != "anonymous":
        return user, role
    return (f"{typed.strip()} (not signed in)" if typed.strip() else ""), role


def model_folders() -> list[ModelFolder]:
    return discover_models()


def default_model_key() -> tuple[str | None, bool]:
    """(id@version of the model Diagnose offers first, whether an admin chose it)."""
    from cxr_core.models.loading import resolve_model
    from cxr_core.models.pointer import default_model_id

    try:
        chosen = default_model_id() is not None or bool(config.default_model_id())
        folder = resolve_model()
    except CxrError:
        return None, False
    return (folder.manifest.key if folder.manifest else None), chosen


def gate_override(subject: str, gate: GateResult, image_sha256: str, model_key: str) -> bool:
    """For a rejected image: the clinician's recorded override, asked for once per (``subject``
    (an upload's id), model) in a session, on every page.

    Returns True when this session has overridden the rejection (the caller shows the
    result, marked as such); otherwise renders the form and returns False.
    """
    overridden: set[tuple[str, str]] = st.session_state.setdefault("gate_overrides", set())
    if (subject, model_key) in overridden:
        return True
    with st.form(f"override_{subject}_{model_key}"):
        st.markdown("A clinician may still look at the model's output, for example when the check is wrong. This is recorded.")
        reason = st.text_input("Why show the result anyway?", max_chars=300)
        typed = name_field(f"override-{subject}-{model_key}")
        if st.form_submit_button("Show the result anyway"):
            user, role = accountable_user(typed)
            if not reason.strip():
                st.error("Give a reason to override the check.")
            elif not user:
                st.error("An override is a clinical decision: sign in, or type your name, so that it is recorded against you.")
            else:
                from cxr_core.state import audit
                overridden.add((subject, model_key))
                audit.record("override_gate", user=user, role=role, image_sha256=image_sha256, model=model_key,
                             details={"reasons": list(gate.reasons), "justification": reason.strip()})
                st.rerun()
    return False


def choose_evaluation_set(key: str, exclude: str | None = None) -> Path | None:
    """A picker for the fixed evaluation set: the server's, an uploaded dataset that passed its
    check, another folder typed in, or none. Returns the folder, or None."""
    from cxr_core.state.datasets import evaluation_choices

    choices = evaluation_choices(exclude)
    other, nothing = "Another folder on the server…", "None"
    labels = [c.label for c in choices] + [other, nothing]
    picked = st.selectbox("Evaluation set (fixed; never trained on)", labels, key=key,
                          help="Labelled films of this hospital that no model is trained on: every candidate is measured on "
                               "them, and images also found there are left out of training.")
    if picked == other:
        typed = st.text_input("Folder of the evaluation set, on the server", key=f"{key}-path").strip()
        return Path(typed) if typed else None
    return next((c.path for c in choices if c.label == picked), None)


def estimate_cell(e: dict | None, missing: str = "not measurable") -> str:
    """A stored estimate as a table cell (:func:`cxr_core.training.validation.estimate_text`)."""
    from cxr_core.training.validation import estimate_text

    return estimate_text(e, missing)


def render_validation(result: dict, label: Callable[[str], str] = lambda c: c.replace("_", " ")) -> None:
    """A site validation's figures (``SiteValidation.as_dict()``): the four rates with their
    intervals, AUROC, calibration, the confusion matrix (classes as ``label`` names them), the
    suggested threshold, warnings."""
    import pandas as pd
    import plotly.graph_objects as go


    st.markdown(f"**`{result['model']}`** on {result['n']} films: " + ", ".join(f"{k} {v}" for k, v in result["counts"].items()))
    for warning in result["warnings"]:
        st.warning(warning)
    rows = [("COVID-19 sensitivity", result["covid_sensitivity"]), ("Specificity (not COVID-19 left alone)", result["non_covid_specificity"]),
            ("PPV", result["ppv"]), ("NPV", result["npv"])]
    table = [{"figure": name, "value (95% CI); films": estimate_cell(e)} for name, e in rows]
    a = result["auroc"]
    table.append({"figure": "AUROC, COVID-19 vs not (bootstrap CI)",
                  "value (95% CI); films": estimate_cell(a)})
    table.append({"figure": "ECE on the model's own classes", "value (95% CI); films": "—" if result["ece"] is None else f"{result['ece']:.3f}"})
    st.dataframe(pd.DataFrame(table), hide_index=True, width="stretch")
    st.caption(f"At the model's COVID-19 threshold {result['threshold']}. Intervals: Wilson score (rates), percentile bootstrap (AUROC).")
    render_predictive_values(result)
    left, right = st.columns(2)
    confusion = pd.DataFrame(result["confusion_matrix"], index=[f"folder {name}" for name in result["labels"]],
                             columns=[f"called {label(c)}" for c in result["classes"]])
    left.dataframe(confusion, width="stretch")
    if result["reliability"]:
        fig = go.Figure()
        fig.add_scatter(x=[0, 1], y=[0, 1], mode="lines", name="perfect", line=dict(dash="dot", color="grey"))
        bins = result["reliability"]
        fig.add_scatter(x=[b["confidence"] for b in bins], y=[b["accuracy"] for b in bins], mode="lines+markers", name="this site",
                        text=[f"{b['n']} films" for b in bins])
        fig.update_layout(height=300, title="Reliability on this site's films", xaxis_title="confidence", yaxis_title="accuracy",
                          margin=dict(t=40), xaxis_range=[0, 1], yaxis_range=[0, 1])
        right.plotly_chart(fig, width="stretch")
    t = result.get("suggested_threshold")
    if t:
        st.info(f"A site threshold of {t['value']} would reach COVID-19 sensitivity {t['sensitivity']:.3f} on these films, at "
                f"specificity {t['specificity']:.3f} (target {t['target_sensitivity']}). Offered, not applied: adopting it makes a "
                "new version of the model, which is evaluated and promoted like any other; these films chose it, so they "
                "flatter it.")


def render_predictive_values(result: dict) -> None:
    """PPV and NPV at a COVID-19 share the admin types in: the validation films' share is whatever
    was gathered, and a clinic's PPV depends on its own (:func:`cxr_core.training.validation.predictive_values_at`)."""
    from cxr_core.training.validation import covid_share, predictive_values_at, value_range_text

    if predictive_values_at(result, 0.5) is None:
        return  # sensitivity or specificity not measurable here
    share = 100 * covid_share(result)
    prevalence = st.number_input(
        f"COVID-19 share among the films you read (%): PPV and NPV above are at these films' {share:.1f}%",
        min_value=0.1, max_value=99.9, value=min(max(round(share, 1), 0.1), 99.9), step=1.0, key="validation-prevalence")
    at = predictive_values_at(result, prevalence / 100)
    assert at is not None
    st.markdown(f"At {prevalence:g}% COVID-19: **PPV {value_range_text(at['ppv'])}**, **NPV {value_range_text(at['npv'])}** "
                "(ranges over the sensitivity and specificity intervals).")


def render_disclaimer() -> None:
    st.caption(f"⚠️ {DISCLAIMER}")


@contextmanager
def guarded(what: str) -> Iterator[None]:
    """Show expected errors plainly and unexpected ones without a traceback.

    A clinician sees a sentence; the full traceback goes to the server log with a
    reference number that support can search for.
    """
    try:
        yield
    except CxrError as exc:
        st.error(str(exc))
    except Exception:  # noqa: BLE001 - last line of defence for the UI
        ref = uuid.uuid4().hex[:8]
        log.exception("unexpected error while %s (ref %s)", what, ref)
        st.error(f"Something went wrong while {what}. Nothing was lost; please try again. (Reference {ref})")


if __name__ == "__main__":
    # Requested as a page in Streamlit's legacy mode: this module is not a page.
    st.switch_page("app.py")
