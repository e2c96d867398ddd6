"""Models: what is installed, what each model is for, and how it was made (read-only)."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from cxr_core import config
from pages._common import enter_page, model_folders

enter_page()
st.title("Models")
st.caption(
    f"Model folders under `{config.weights_dir()}`: each holds model.safetensors and manifest.json. "
    "Weights are verified against the manifest's sha256 when a model is loaded."
)

folders = model_folders()
if not folders:
    st.error("No trained model is installed. Add a model folder (model.safetensors + manifest.json); see the README.")
    st.stop()

rows = []
for folder in folders:
    m = folder.manifest
    rows.append(
        {
            "model": m.key if m else folder.path.name,
            "name": m.name if m else "",
            "architecture": m.architecture if m else "",
            "head": m.head if m else "",
            "classes": ", ".join(m.classes) if m else "",
            "status": "usable" if folder.ok else f"unusable: {folder.problem}",
        }
    )
st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")

for folder in folders:
    m = folder.manifest
    if m is None:
        continue
    with st.expander(f"{m.name} — {m.key}"):
        st.markdown(f"**Intended use.** {m.intended_use}")
        st.markdown(
            f"**Input.** {m.input.size[0]} x {m.input.size[1]} px, {m.input.channels} channel(s), "
            f"mean {list(m.input.mean)}, std {list(m.input.std)}.  \n"
            f"**Classes (output order).** {', '.join(m.label(c) for c in m.classes)} — {m.head} head.  \n"
            f"**Temperature.** {m.temperature:g}. **Thresholds.** {dict(m.thresholds) or 'none (most probable class)'}.  \n"
            f"**Grad-CAM layer.** {', '.join(m.cam_target_layers) or 'default'}.  \n"
            f"**Weights sha256.** `{m.weights_sha256}`"
        )
        if m.metrics:
            st.markdown("**Metrics**")
            st.json(dict(m.metrics), expanded=False)
        if m.training_data:
            st.markdown("**Training data**")
            st.json(dict(m.training_data), expanded=False)
        card = folder.path / "README.md"
        if card.is_file():
            st.markdown("**Model card**")
            st.markdown(card.read_text(encoding="utf-8"))
