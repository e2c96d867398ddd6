"""Diagnose: drop chest X-rays, get class probabilities and Grad-CAM overlays."""

from __future__ import annotations

import io
from collections import OrderedDict

import pandas as pd
import streamlit as st
from PIL import Image

from cxr_core import config
from cxr_core.cam import CAM_METHODS, Explanation, explain
from cxr_core.charts import probability_chart
from cxr_core.errors import CxrError
from cxr_core.inference import predict
from cxr_core.io import XrayImage, read_image
from cxr_core.models import LoadedModel
from cxr_core.overlay import COLORMAPS, fit_within, render_overlay
from cxr_core.report import StudyResult, result_rows, results_csv
from pages._common import cached_model, enter_page, guarded, model_folders, render_disclaimer

DISPLAY_SIDE = 1024  # px: films are shown at most this large; downloads are full resolution
KEEP_EXPLANATIONS = 4  # full-resolution maps are large: keep only the most recent per session

enter_page()
st.title("Diagnose")

folders = [f for f in model_folders() if f.ok and f.manifest]
if not folders:
    st.error(
        "No trained model is installed, so no prediction can be made. "
        f"An administrator must add a model folder (model.safetensors + manifest.json) under `{config.weights_dir()}`."
    )
    render_disclaimer()
    st.stop()

by_key = {f.manifest.key: f for f in folders if f.manifest}
model_key = st.selectbox(
    "Model",
    list(by_key),
    format_func=lambda k: f"{by_key[k].manifest.name} — {k}",  # type: ignore[union-attr]
    help="Every installed model; the result always names the model and version that produced it.",
)
folder = by_key[model_key]
model: LoadedModel | None = None
with guarded("loading the model"):
    model = cached_model(str(folder.path), folder.manifest.weights_sha256)  # type: ignore[union-attr]
if model is None:
    st.stop()
manifest = model.manifest

uploads = st.file_uploader(
    "Chest X-rays — DICOM (any transfer syntax, with or without .dcm), PNG, JPEG, BMP or TIFF",
    accept_multiple_files=True,
    max_upload_size=config.max_file_bytes() // (1024 * 1024),
    help="Drag and drop one or many files. Files stay in this session's memory and are not stored.",
)
if not uploads:
    st.info("Drop one or more chest radiographs above to get class probabilities and heatmaps.")
    render_disclaimer()
    st.stop()

# --- Read and predict (each file once per session, each (file, model) pair once) -----------

images: dict[str, XrayImage | str] = st.session_state.setdefault("diagnose_images", {})
predictions: dict[tuple[str, str], object] = st.session_state.setdefault("diagnose_predictions", {})
current_ids = {u.file_id for u in uploads}
for stale in [k for k in images if k not in current_ids]:
    del images[stale]
for stale in [k for k in predictions if k[0] not in current_ids]:
    del predictions[stale]

new = [u for u in uploads if u.file_id not in images]
if new:
    bar = st.progress(0.0, text=f"Reading {len(new)} file(s)…")
    for i, upload in enumerate(new, start=1):
        try:
            images[upload.file_id] = read_image(upload.getvalue(), name=upload.name)
        except CxrError as exc:
            images[upload.file_id] = str(exc)
        bar.progress(i / len(new), text=f"Read {i} of {len(new)}")
    bar.empty()

todo = [u for u in uploads if isinstance(images[u.file_id], XrayImage) and (u.file_id, model.key) not in predictions]
if todo:
    with guarded("predicting"), st.spinner(f"Predicting {len(todo)} image(s) with {manifest.name}…"):
        for upload, prediction in zip(todo, predict(model, [images[u.file_id] for u in todo])):  # type: ignore[misc]
            predictions[(upload.file_id, model.key)] = prediction

results: list[StudyResult] = []
for upload in uploads:
    item = images[upload.file_id]
    if isinstance(item, XrayImage):
        results.append(
            StudyResult(upload.name, item.sha256, predictions.get((upload.file_id, model.key)), item.warnings)  # type: ignore[arg-type]
        )
    else:
        results.append(StudyResult(upload.name, None, None, (), item))

# --- Summary table ---------------------------------------------------------------------------

if len(uploads) > 1 or results[0].error:
    st.subheader(f"Results ({len(uploads)} file(s))")
    table = pd.DataFrame(result_rows(results, include_names=True))
    st.dataframe(table, hide_index=True, width="stretch")
    include_names = st.checkbox(
        "Include file names in the CSV",
        value=False,
        help="File names can contain patient names or record numbers; they are left out unless you ask.",
    )
    st.download_button(
        "Download results (CSV)",
        results_csv(results, include_names=include_names),
        file_name="cxr-results.csv",
        mime="text/csv",
    )
    for result in results:
        if result.error:
            st.error(f"{result.name}: {result.error}")

readable = [(u, r) for u, r in zip(uploads, results) if r.prediction is not None]
if not readable:
    render_disclaimer()
    st.stop()

# --- One study in detail -------------------------------------------------------------------

st.divider()
if len(readable) > 1:
    index = st.selectbox(
        "Study", range(len(readable)), format_func=lambda i: f"{i + 1}. {readable[i][0].name}", key="diagnose_study"
    )
else:
    index = 0
upload, result = readable[index]
image = images[upload.file_id]
assert isinstance(image, XrayImage) and result.prediction is not None
prediction = result.prediction

st.subheader(upload.name)
predicted = prediction.predicted
p_pred = prediction.probability(predicted) if predicted else None
st.markdown(
    f"**Prediction: {manifest.label(predicted) if predicted else 'none'}**"
    + (f" (p = {p_pred:.3f})" if p_pred is not None else "")
    + f"  \nModel: **{manifest.name}**, version **{manifest.version}** (`{manifest.key}`)"
)
render_disclaimer()
for warning in image.warnings:
    st.warning(warning)

controls = st.columns(4)
target = controls[0].selectbox(
    "Heatmap for class",
    list(manifest.classes),
    index=list(manifest.classes).index(predicted) if predicted else 0,
    format_func=manifest.label,
    key=f"diagnose_target_{upload.file_id}",
)
method = controls[1].selectbox(
    "Method",
    list(CAM_METHODS),
    format_func=lambda m: CAM_METHODS[m].label + (" (slow)" if CAM_METHODS[m].perturbation else ""),
    key="diagnose_method",
)
colormap = controls[2].selectbox("Colormap", list(COLORMAPS), key="diagnose_colormap")
opacity = controls[3].slider("Opacity", 0.0, 1.0, 0.4, 0.05, key="diagnose_opacity")

explanations: OrderedDict[tuple[str, str, str], Explanation] = st.session_state.setdefault(
    "diagnose_explanations", OrderedDict()
)
cache_key = (upload.file_id, model.key, method)
explanation = explanations.get(cache_key)
if explanation is None:
    with guarded("computing the heatmap"):
        if CAM_METHODS[method].perturbation:
            bar = st.progress(0.0, text=f"{CAM_METHODS[method].label}: masking feature maps…")
            explanation = explain(model, image, method=method, progress=lambda f: bar.progress(f))
            bar.empty()
        else:
            with st.spinner(f"Computing {CAM_METHODS[method].label} for every class…"):
                explanation = explain(model, image, method=method)
        explanations[cache_key] = explanation
        while len(explanations) > KEEP_EXPLANATIONS:
            explanations.popitem(last=False)
else:
    explanations.move_to_end(cache_key)

left, right = st.columns(2)
film = fit_within(image.to_uint8(), DISPLAY_SIDE)
window = image.metadata.window
left.image(
    film,
    caption="Image" + (f" (window C {window.center:g} / W {window.width:g}, {window.source})" if window else ""),
    width="stretch",
)
if explanation is not None:
    heatmap = explanation.heatmap(target)
    small_film = fit_within(image.pixels, DISPLAY_SIDE)
    small_map = fit_within(heatmap.scaled, DISPLAY_SIDE)
    right.image(
        render_overlay(small_film, small_map, colormap=colormap, opacity=opacity),
        caption=f"{CAM_METHODS[method].label} for {manifest.label(target)} (p = {heatmap.probability:.3f}), "
        f"layer {explanation.layer}",
        width="stretch",
    )

    def full_resolution_png() -> bytes:
        buffer = io.BytesIO()
        rgb = render_overlay(image.pixels, heatmap.scaled, colormap=colormap, opacity=opacity)
        Image.fromarray(rgb).save(buffer, format="PNG")
        return buffer.getvalue()

    right.download_button(
        "Download overlay (full resolution PNG)",
        full_resolution_png,
        file_name=f"cxr-{method}-{target}-{image.sha256[:12]}.png",
        mime="image/png",
    )
    right.caption(
        "The heatmap shows which regions drove the model's score for this class. "
        "It is not a segmentation of disease."
    )

st.plotly_chart(probability_chart(prediction, manifest.label), width="stretch", key=f"chart_{upload.file_id}")
if prediction.thresholds:
    st.caption(
        "Dashed marks: decision thresholds. "
        + "; ".join(f"{manifest.label(c)} is called at p ≥ {t:.2f}" for c, t in prediction.thresholds.items())
    )

with st.expander("Image metadata"):
    st.table(pd.DataFrame(image.metadata.as_rows(), columns=["Field", "Value"]).set_index("Field"))
    st.caption(f"Image sha256: {image.sha256}. Patient identifiers are not read from the file.")
