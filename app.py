"""cxr: chest X-ray decision support. Entry point: ``streamlit run app.py``."""

from __future__ import annotations

import logging

import streamlit as st

from pages._common import restore_oidc_user

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

st.set_page_config(page_title="cxr — chest X-ray decision support", page_icon="🩻", layout="wide")

# Pages check this flag (pages._common.enter_page): they only run behind this script.
first_run = not st.session_state.get("cxr_entry")
st.session_state["cxr_entry"] = True
restore_oidc_user()

navigation = st.navigation(
    {
        "Clinical": [
            st.Page("pages/diagnose.py", title="Diagnose", icon=":material/radiology:", default=True),
            st.Page("pages/compare.py", title="Compare", icon=":material/compare:"),
        ],
        "Admin": [
            st.Page("pages/models.py", title="Models", icon=":material/model_training:"),
            st.Page("pages/data.py", title="Training data", icon=":material/folder_open:"),
            st.Page("pages/training.py", title="Training", icon=":material/monitoring:"),
            st.Page("pages/audit.py", title="Audit", icon=":material/policy:"),
        ],
        "Account": [
            st.Page("pages/account.py", title="Sign in" if st.session_state.get("user", "anonymous") == "anonymous" else f"{st.session_state['user']}", icon=":material/person:"),
        ],
    }
)
if first_run:
    # A session's first run may still be in Streamlit's legacy pages/ mode (the first
    # request after the server starts), which shows the pages/ files as the menu. Now
    # that st.navigation has been declared, run again so the real menu applies.
    st.rerun()
navigation.run()
