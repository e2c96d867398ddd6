"""Models: what is installed, what each model is for, and how it was made (read-only)."""

from __future__ import annotations

import pandas as pd
import plotly.io as pio
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
        test = m.metrics.get("test") if m.metrics else None
        if test:
            cols = st.columns(4)
            cols[0].metric("Test accuracy", f"{test['accuracy']:.3f}")
            cols[1].metric("Macro AUROC", f"{test['auroc_macro']:.3f}" if test.get("auroc_macro") is not None else "—")
            cols[2].metric("ECE (calibrated)", f"{test['ece']:.3f}")
            if "covid" in test.get("per_class", {}):
                cols[3].metric("COVID sensitivity", f"{test['per_class']['covid']['recall']:.3f}")
        figures = sorted((folder.path / "figures").glob("*.json")) if (folder.path / "figures").is_dir() else []
        wanted = [f for f in figures if f.stem.endswith(("reliability", "confusion", "roc"))] + [f for f in figures if f.stem.startswith("training")]
        for row in range(0, len(wanted), 2):
            cols = st.columns(2)
            for col, path in zip(cols, wanted[row : row + 2]):
                try:
                    col.plotly_chart(pio.from_json(path.read_text(encoding="utf-8")), width="stretch", key=f"{m.key}-{path.stem}")
                except ValueError:
                    col.caption(f"{path.name} could not be read.")
        if m.ood:
            ood = dict(m.ood)
            st.markdown(
                f"**Input gate.** {ood.get('method', 'fitted')}: warning above {ood.get('warn')}, rejection above {ood.get('reject')}"
                + (f"; on the test split {ood['test_rates']}" if ood.get("test_rates") else "")
                + "."
            )
        if m.metrics:
            st.markdown("**All metrics**")
            st.json(dict(m.metrics), expanded=False)
        if m.training_data:
            st.markdown("**Training data**")
            st.json(dict(m.training_data), expanded=False)
        card = folder.path / "README.md"
        if card.is_file():
            st.markdown("**Model card**")
            st.markdown(card.read_text(encoding="utf-8"))
