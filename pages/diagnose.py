"""Diagnose: drop chest X-rays, get gated, calibrated class probabilities and Grad-CAM overlays."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pandas as pd
import streamlit as st
import streamlit.components.v1 as components

from cxr_core import config
from cxr_core.errors import CxrError
from cxr_core.explain.cam import CAM_METHODS, Explanation, explain
from cxr_core.explain.charts import probability_chart
from cxr_core.explain.export import Provenance, labelled_png
from cxr_core.explain.overlay import COLORMAPS, colorize, fit_within, render_overlay
from cxr_core.explain.viewer import heat_layer, viewer_html
from cxr_core.imaging.film import XrayImage
from cxr_core.imaging.io import read_image
from cxr_core.inference import DISCLAIMER, Prediction, call_headline, predict
from cxr_core.metrics import unseen_hospital_note, unseen_sources
from cxr_core.models.loading import LoadedModel
from cxr_core.models.site_threshold import threshold_origin
from cxr_core.report import StudyResult, results_csv, short_status, worklist_order, worklist_rows
from cxr_core.state import audit
from cxr_core.state.site_validations import UNVALIDATED, site_badge
from cxr_core.study import StudyView, contrast_stretched, draw_boxes, study_view
from pages._common import (
    cached_model,
    current_user,
    default_model_key,
    enter_page,
    gate_override,
    guarded,
    model_folders,
    render_disclaimer,
)

DISPLAY_SIDE = 1024  # px: films are shown at most this large; downloads are full resolution
VIEWER_HEIGHT = 560  # px: each pane of the film viewer
KEEP_EXPLANATIONS = 4  # full-resolution maps are large: keep only the most recent per session

enter_page()
st.title("Diagnose")
user, role = current_user()

folders = [f for f in model_folders() if f.ok and f.manifest]
if not folders:
    st.error(
        "No trained model is installed, so no prediction can be made. "
        f"An administrator must add a model folder (model.safetensors + manifest.json) under `{config.weights_dir()}`."
    )
    render_disclaimer()
    st.stop()

by_key = {f.manifest.key: f for f in folders if f.manifest}
default_key, default_chosen = default_model_key()
model_key = st.selectbox(
    "Model",
    list(by_key),
    index=list(by_key).index(default_key) if default_key in by_key else 0,
    format_func=lambda k: f"{by_key[k].manifest.name} — {k}" + (" (default)" if k == default_key else ""),  # type: ignore[union-attr]
    help="Every installed model; the result always names the model and version that produced it. "
    + ("The default was chosen by an administrator on the Models page." if default_chosen
       else "No default has been chosen on the Models page: the first model by name is offered."),
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

# --- Session state: decoded films, per-study options, predictions, overrides -------------------

state = st.session_state
images: dict[str, XrayImage | str] = state.setdefault("diagnose_images", {})
options: dict[str, dict[str, bool]] = state.setdefault("diagnose_options", {})  # file -> {"correct", "mask"}
views: dict[tuple[str, bool, bool], StudyView] = state.setdefault("diagnose_views", {})
predictions: dict[tuple[str, bool, bool, str], Prediction] = state.setdefault("diagnose_predictions", {})
# The same views contrast-stretched, predicted only for films whose brightness is flagged.
stretched: dict[tuple[str, bool, bool, str], Prediction] = state.setdefault("diagnose_stretched", {})
current_ids = {u.file_id for u in uploads}
for store in (images, options):
    for stale in [k for k in store if k not in current_ids]:
        del store[stale]
for store in (views, predictions, stretched):
    for stale in [k for k in store if k[0] not in current_ids]:
        del store[stale]

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


def variant(file_id: str) -> tuple[str, bool, bool]:
    chosen = options.setdefault(file_id, {"correct": False, "mask": False})
    return (file_id, chosen["correct"], chosen["mask"])


def view_of(key: tuple[str, bool, bool]) -> StudyView:
    if key not in views:
        original = images[key[0]]
        assert isinstance(original, XrayImage)
        views[key] = study_view(original, correct=key[1], mask_text=key[2])
    return views[key]


todo = [u for u in uploads if isinstance(images[u.file_id], XrayImage) and (*variant(u.file_id), model.key) not in predictions]
if todo:
    with guarded("predicting"), st.spinner(f"Predicting {len(todo)} image(s) with {manifest.name}…"):
        films = [view_of(variant(u.file_id)).image for u in todo]
        for upload, film, prediction in zip(todo, films, predict(model, films)):
            predictions[(*variant(upload.file_id), model.key)] = prediction
            audit.record(
                "prediction", user=user, role=role, image_sha256=film.sha256, model=model.key,
                details={"prediction": prediction.predicted, "decision": prediction.decision, "uncertain": prediction.uncertain,
                         "gate": prediction.gate_outcome, "probabilities": {c: round(p, 4) for c, p in prediction.as_dict().items()},
                         "corrected": variant(upload.file_id)[1], "masked": variant(upload.file_id)[2], "warnings": list(film.warnings)},
            )

results: list[StudyResult] = []
for upload in uploads:
    item = images[upload.file_id]
    if isinstance(item, XrayImage):
        prediction = predictions.get((*variant(upload.file_id), model.key))
        notes = item.warnings + (prediction.gate.reasons if prediction and prediction.gate else ())
        results.append(StudyResult(upload.name, item.sha256, prediction, notes))
    else:
        results.append(StudyResult(upload.name, None, None, (), item))

# --- Worklist: flagged studies first ----------------------------------------------------------------

if len(uploads) > 1 or results[0].error:
    st.subheader(f"Worklist ({len(uploads)} file(s))")
    table = pd.DataFrame(worklist_rows(results, manifest.label))
    # Why a study needs a look sits beside its number, where a narrow screen still shows it.
    st.dataframe(table.iloc[worklist_order(results)], hide_index=True, width="stretch",
                 column_config={"Why": st.column_config.TextColumn("Why", width="large"),
                                "Status": st.column_config.TextColumn("Status", width="small")})
    include_names = st.checkbox(
        "Include file names in the CSV",
        value=False,
        help="File names can contain patient names or record numbers; they are left out unless you ask.",
    )
    st.download_button(
        "Download results (CSV)",
        results_csv(results, include_names=include_names, label=manifest.label),
        file_name="cxr-results.csv",
        mime="text/csv",
        on_click=lambda: audit.record("export_csv", user=user, role=role, model=model.key, details={"studies": len(results), "file_names": include_names}),
    )
    for result in results:
        if result.error:
            st.error(f"{result.name}: {result.error}")

readable = [(u, r) for u, r in zip(uploads, results) if r.prediction is not None]
# Studies keep the worklist's numbers (upload order, unreadable files included), so the
# thumbnail and the study picker name a film by the same number as the table and the CSV.
numbers = [n for n, r in enumerate(results, start=1) if r.prediction is not None]
if not readable:
    render_disclaimer()
    st.stop()

# --- Thumbnail strip: flagged studies first; a click opens the study ---------------------------------

if len(readable) > 1:
    thumbs: dict[str, np.ndarray] = state.setdefault("diagnose_thumbs", {})
    for stale in [k for k in thumbs if k not in current_ids]:
        del thumbs[stale]
    ordered = worklist_order([r for _, r in readable])
    per_page, columns = 12, 6
    pages = (len(ordered) + per_page - 1) // per_page
    page_no = st.number_input("Thumbnail page", 1, pages, 1, key="diagnose_thumb_page") if pages > 1 else 1
    cells = st.columns(columns)
    for slot, i in enumerate(ordered[(page_no - 1) * per_page : page_no * per_page]):
        thumb_upload, thumb_result = readable[i]
        item = images[thumb_upload.file_id]
        if thumb_upload.file_id not in thumbs and isinstance(item, XrayImage):
            thumbs[thumb_upload.file_id] = fit_within(item.to_uint8(), 160)
        with cells[slot % columns]:
            st.image(thumbs[thumb_upload.file_id], caption=f"{numbers[i]}. {short_status(thumb_result)}", width="stretch")
            if st.button("Open", key=f"open_{thumb_upload.file_id}", width="stretch"):
                st.session_state["diagnose_study"] = i
                st.rerun()

# --- One study in detail -------------------------------------------------------------------------

st.divider()
if len(readable) > 1:
    # The first study needing a look opens by default (worklist order: rejected, warned, uncertain, the rest).
    if st.session_state.get("diagnose_study", 0) >= len(readable):
        del st.session_state["diagnose_study"]  # fewer studies than before: start again
    st.session_state.setdefault("diagnose_study", worklist_order([r for _, r in readable])[0])
    index = st.selectbox(
        "Study", range(len(readable)), format_func=lambda i: f"{numbers[i]}. {readable[i][0].name}", key="diagnose_study"
    )
else:
    index = 0
upload, result = readable[index]
file_id = upload.file_id
key = variant(file_id)
view = view_of(key)
image = view.image
prediction = result.prediction
assert prediction is not None
gate = prediction.gate
st.subheader(upload.name)

# Gate: accepted / warning / rejected, shown plainly.
if gate is not None and gate.outcome == "rejected":
    st.error("**Not analysed: this does not look like a frontal chest radiograph.**  \n" + "  \n".join(f"- {r}" for r in gate.reasons))
elif gate is not None and gate.outcome == "warning":
    st.warning("**Check before relying on this result.**  \n" + "  \n".join(f"- {r}" for r in gate.reasons))
else:
    st.success("Input checks passed: frontal chest radiograph.", icon=":material/check_circle:")

# Offer the corrections the quality check suggests.
fixes = st.columns(2)
if view.quality.fixable and not key[1] and (gate is None or gate.correctable):
    what = " and ".join(w for w in (f"turn it by {90 * view.quality.rotation} degrees" if view.quality.rotation else "", "invert it" if view.quality.inverted else "") if w)
    if fixes[0].button(f"Correct the film ({what})", key=f"fix_{file_id}"):
        options[file_id]["correct"] = True
        audit.record("correct_film", user=user, role=role, image_sha256=image.sha256, details={"rotation": view.quality.rotation, "inverted": view.quality.inverted})
        st.rerun()
elif key[1]:
    if fixes[0].button("Undo the correction", key=f"unfix_{file_id}"):
        options[file_id]["correct"] = False
        st.rerun()
if manifest.input.mask_burned_in:
    fixes[1].caption(f"{manifest.name} masks burned-in text and markers itself before every prediction (it was trained that way).")
elif view.boxes:
    masked = fixes[1].toggle(
        f"Mask {len(view.boxes)} burned-in text/marker region(s) before inference",
        value=key[2],
        key=f"mask_{file_id}",
        help="Markers and labels can steer a model (a shortcut). Masking fills them from their surroundings.",
    )
    if masked != key[2]:
        options[file_id]["mask"] = masked
        st.rerun()

if gate is not None and gate.rejected and not gate_override(file_id, gate, image.sha256, model.key):
    render_disclaimer()
    st.stop()

if gate is not None and gate.rejected:
    st.caption(f"Shown after an override by {user}: the input check rejected this image.")

top = prediction.most_probable
if prediction.predicted:
    headline = call_headline(prediction, manifest)
elif prediction.uncertain:
    headline = (
        f"**Uncertain** — the model does not favour one class clearly "
        f"(most probable: {manifest.label(top)}, p = {prediction.probability(top):.3f}). "
        "Read the film without relying on this result."
    )
else:
    headline = f"**Rejected input** — the model would have said {manifest.label(prediction.decision or '')}."
st.markdown(headline + f"  \nModel: **{manifest.name}**, version **{manifest.version}** (`{manifest.key}`)")
with guarded("reading the site validation"):
    badge = site_badge(manifest.key)
    st.caption(badge)
    if badge in UNVALIDATED:
        # Say what the model did at a hospital it never saw, loudest when it calls COVID-19.
        positive = manifest.classes[0]
        unseen = unseen_hospital_note(unseen_sources(model.path, manifest.key, positive, manifest.training_data), manifest.label(positive))
        if unseen:
            (st.warning if prediction.decision == positive else st.caption)(f"⚠️ {unseen}")
st.caption(f"⚠️ {DISCLAIMER}")
for warning in image.warnings:
    st.warning(warning)

controls = st.columns(4)
target = controls[0].selectbox(
    "Heatmap for class",
    list(manifest.classes),
    index=list(manifest.classes).index(prediction.decision) if prediction.decision in manifest.classes else 0,
    format_func=manifest.label,
    key=f"diagnose_target_{file_id}",
)
method = controls[1].selectbox(
    "Method",
    list(CAM_METHODS),
    format_func=lambda m: CAM_METHODS[m].label + (" (slow)" if CAM_METHODS[m].perturbation else ""),
    key="diagnose_method",
)
colormap = controls[2].selectbox("Colormap", list(COLORMAPS), key="diagnose_colormap")
opacity = controls[3].slider("Opacity", 0.0, 1.0, 0.4, 0.05, key="diagnose_opacity")

explanations: OrderedDict[tuple[object, ...], Explanation] = state.setdefault("diagnose_explanations", OrderedDict())
cache_key = (*key, model.key, method)
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

film = fit_within(image.to_uint8(), DISPLAY_SIDE)
window = image.metadata.window
marks = None
if view.boxes and not view.masked:
    outline = draw_boxes(np.zeros((*film.shape, 3), np.uint8), view.boxes, film.shape[0] / image.shape[0])
    marks = np.dstack([outline, np.where(outline.any(axis=2), 255, 0).astype(np.uint8)])
film_caption = ("Image" + (f" (window C {window.center:g} / W {window.width:g}, {window.source})" if window else "")
                + (f"; {len(view.boxes)} burned-in text/marker region(s) outlined" if view.boxes and not view.masked else "")
                + ("; text masked" if view.masked else ""))
heatmap = explanation.heatmap(target) if explanation is not None else None
shows = explanation.describe(target, manifest.label) if explanation is not None else "No heatmap"
heat = None
if heatmap is not None:
    on_film = heatmap.at(film.shape)[1]
    heat = heat_layer(colorize(on_film, colormap), on_film, opacity)
# One viewer for both panes: windowing and zoom on the film, and the overlay follows.
components.html(viewer_html(film, heat, marks=marks, height=VIEWER_HEIGHT), height=VIEWER_HEIGHT + 60)
under = st.columns(2)
under[0].caption(film_caption)
under[1].caption(shows)
if heatmap is not None:

    def full_resolution_png() -> bytes:
        rgb = render_overlay(image.pixels, heatmap.scaled, colormap=colormap, opacity=opacity)
        called = manifest.label(prediction.predicted) if prediction.predicted else "none shown (uncertain or rejected)"
        provenance = Provenance(model.key, manifest.name, f"{shows}. Prediction: {called}.", image.sha256)
        audit.record("export_overlay", user=user, role=role, image_sha256=image.sha256, model=model.key, details={"method": method, "target": target})
        return labelled_png(rgb, provenance)

    st.download_button(
        "Download overlay (full resolution PNG)",
        full_resolution_png,
        file_name=f"cxr-{method}-{target}-{image.sha256[:12]}.png",
        mime="image/png",
    )
    st.caption("The heatmap shows which regions drove the model's score for this class. It is not a segmentation of disease.")

st.plotly_chart(probability_chart(prediction, manifest.label), width="stretch", key=f"chart_{file_id}")
captions = ["Probabilities are calibrated (temperature scaling on the validation set)." if manifest.temperature != 1.0 else "Probabilities are not calibrated for this model."]
if prediction.thresholds:
    captions.append(
        "Dashed marks: decision thresholds — "
        + "; ".join(f"{manifest.label(c)} is called at p ≥ {t:.2f} ({threshold_origin(manifest, c)})" for c, t in prediction.thresholds.items())
        + "."
    )
st.caption(" ".join(captions))


def side_by_side(before: tuple[str, Prediction], after: tuple[str, Prediction]) -> None:
    """One film's probabilities two ways, and the change from the first to the second."""
    (first, p), (second, q) = before, after
    st.dataframe(
        pd.DataFrame(
            {"class": [manifest.label(c) for c in manifest.classes], first: [round(x, 3) for x in p.probabilities],
             second: [round(x, 3) for x in q.probabilities], "change": [round(b - a, 3) for a, b in zip(p.probabilities, q.probabilities)]}
        ),
        hide_index=True,
        width="stretch",
    )


# With and without masking, so the effect of burned-in text on the answer is visible.
if view.boxes and not manifest.input.mask_burned_in:
    other_key = (file_id, key[1], not key[2])
    other = predictions.get((*other_key, model.key))
    if other is None:
        other = predict(model, [view_of(other_key).image])[0]
        predictions[(*other_key, model.key)] = other
    masked_p, plain_p = (prediction, other) if key[2] else (other, prediction)
    st.markdown("**Effect of masking the burned-in text**")
    side_by_side(("without masking", plain_p), ("with masking", masked_p))

# A film much brighter or darker than the training films: the same film contrast-stretched,
# so the effect of the display window on the answer is visible, not only warned about.
def _call(p: Prediction) -> str:
    return manifest.label(p.predicted) if p.predicted else "uncertain"


if view.quality.exposure and not (gate is not None and gate.rejected):
    with guarded("comparing the film contrast-stretched"):
        stretch_key = (*key, model.key)
        if stretch_key not in stretched:
            stretched[stretch_key] = predict(model, [contrast_stretched(image)])[0]
        other = stretched[stretch_key]
        st.markdown("**Effect of the display window**")
        side_by_side(("as read", prediction), ("contrast stretched", other))
        st.caption(
            f"The film is {view.quality.exposure} overall than the training films (median grey {view.quality.median_grey:.2f}). "
            f"Stretched between its 0.5th and 99.5th percentiles it is called {_call(other)}; as read, {_call(prediction)}. "
            "Neither rendering is the right one; a large change means the answer depends on how the film was windowed."
        )

with st.expander("Image metadata"):
    st.table(pd.DataFrame(image.metadata.as_rows(), columns=["Field", "Value"]).set_index("Field"))
    quality = view.quality
    st.caption(
        f"Image sha256: {image.sha256}. Patient identifiers are not read from the file. "
        f"Gate: {gate.outcome if gate else 'n/a'}"
        + (f", feature distance {gate.distance:.2f}" if gate and gate.distance is not None else "")
        + f"; similarity to an upright chest film {quality.chest_likeness:.2f}."
    )
