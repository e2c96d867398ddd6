"""cxr: chest X-ray decision support. Entry point: ``streamlit run app.py``."""

from __future__ import annotations

import logging

import streamlit as st

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

st.set_page_config(page_title="cxr — chest X-ray decision support", page_icon="🩻", layout="wide")

# Pages check this flag (pages._common.enter_page): they only run behind this script.
st.session_state["cxr_entry"] = True

navigation = st.navigation(
    {
        "Clinical": [
            st.Page("pages/diagnose.py", title="Diagnose", icon=":material/radiology:", default=True),
            st.Page("pages/compare.py", title="Compare", icon=":material/compare:"),
        ],
        "Admin": [
            st.Page("pages/models.py", title="Models", icon=":material/model_training:"),
        ],
    }
)
navigation.run()
