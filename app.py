"""cxr: chest X-ray decision support. Entry point: ``streamlit run app.py``."""

from __future__ import annotations

import logging

import streamlit as st

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

st.set_page_config(page_title="cxr — chest X-ray decision support", page_icon="🩻", layout="wide")

navigation = st.navigation(
    {
        "Clinical": [
            st.Page("pages/diagnose.py", title="Diagnose", icon=":material/radiology:", default=True),
        ],
        "Admin": [
            st.Page("pages/models.py", title="Models", icon=":material/model_training:"),
        ],
    }
)
navigation.run()
