"""Compare: heatmaps side by side (method, model, class or depth), and whether to trust them."""

from __future__ import annotations

import base64
import io
from typing import Callable

import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from PIL import Image
from plotly.subplots import make_subplots

from cxr_core import config
from cxr_core.errors import CxrError
from cxr_core.explain.cam import CAM_METHODS
from cxr_core.explain.compare import (
    AXES,
    colour_bars,
    compute_grid,
    depth_layers,
    describe_scales,
    grid_png,
    grid_specs,
    lung_warnings,
    overlays,
    panel_title,
    row_titles,
    scale_panels,
)
from cxr_core.explain.export import Provenance, labelled_png
from cxr_core.explain.overlay import COLORMAPS, colorscale
from cxr_core.imaging.film import XrayImage
from cxr_core.imaging.gate import GateResult
from cxr_core.imaging.io import read_image
from cxr_core.imaging.lungs import describe_lung_fields
from cxr_core.inference import predict
from cxr_core.state import audit
from cxr_core.state.feedback import Feedback, feedback_csv, list_feedback, record_feedback, review_verdict
from pages._common import (
    accountable_user,
    cached_model,
    current_user,
    enter_page,
    gate_override,
    guarded,
    model_folders,
    name_field,
    render_disclaimer,
)

DISPLAY_SIDE = 512
MAX_STUDIES = 2

enter_page()
who, who_role = current_user()
st.title("Compare heatmaps")

folders = [f for f in model_folders() if f.ok and f.manifest]
if not folders:
    st.error("No trained model is installed, so there is nothing to compare.")
    st.stop()

models = {}
with guarded("loading the models"):
    for f in folders:
        models[f.manifest.key] = cached_model(str(f.path), f.manifest.weights_sha256)  # type: ignore[union-attr]
if not models:
    st.stop()

uploads = st.file_uploader(
    "One study, or two side by side (e.g. a prior and a current film)",
    accept_multiple_files=True,
    max_upload_size=config.max_file_bytes() // (1024 * 1024),
    key="compare_upload",
)
if not uploads:
    st.info("Drop one or two chest radiographs to compare heatmaps.")
    render_disclaimer()
    st.stop()
if len(uploads) > MAX_STUDIES:
    st.warning(f"Only the first {MAX_STUDIES} files are compared.")
uploads = uploads[:MAX_STUDIES]

cache: dict[str, XrayImage | str] = st.session_state.setdefault("compare_images", {})
for upload in uploads:
    if upload.file_id not in cache:
        try:
            cache[upload.file_id] = read_image(upload.getvalue(), name=upload.name)
        except CxrError as exc:
            cache[upload.file_id] = str(exc)
studies: list[XrayImage] = []
names: list[str] = []
study_ids: list[str] = []
for upload in uploads:
    item = cache[upload.file_id]
    if isinstance(item, str):
        st.error(f"{upload.name}: {item}")
    else:
        studies.append(item)
        names.append(upload.name)
        study_ids.append(upload.file_id)
if not studies:
    st.stop()

# --- Controls --------------------------------------------------------------------------------

top = st.columns([1.2, 1, 1, 1])
axis = top[0].radio("Compare across", list(AXES), format_func=AXES.get, horizontal=False, key="compare_axis")
model_key = top[1].selectbox("Model", list(models), key="compare_model")
base = models[model_key]
# A selector whose value the grid varies anyway only says what a review refers to: its label says so.
varied = {axis, st.session_state.get(f"compare_rows_{axis}")}
method = top[2].selectbox("Method (for your review)" if "method" in varied else "Method", list(CAM_METHODS),
                          format_func=lambda m: CAM_METHODS[m].label, key="compare_method",
                          help="The grid shows several methods; this one is what your review below refers to." if "method" in varied else None)
target = top[3].selectbox("Class (for your review)" if "class" in varied else "Class", list(base.manifest.classes),
                          format_func=base.manifest.label, key="compare_target",
                          help="The grid shows several classes; this one is what your review below refers to." if "class" in varied else None)



def axis_choices(which: str) -> tuple[list[str], list[str], Callable[[str], str]]:
    """(options, default selection, label) for an axis."""
    if which == "method":
        return list(CAM_METHODS), ["gradcam", "gradcam++", "hirescam"], lambda v: CAM_METHODS[v].label + (" (slow)" if CAM_METHODS[v].perturbation else "")
    if which == "model":
        return list(models), list(models), lambda v: v
    if which == "class":
        return list(base.manifest.classes), list(base.manifest.classes), base.manifest.label
    layers = depth_layers(base)
    return layers, layers, lambda v: v


options, default, label = axis_choices(axis)
values = st.multiselect(f"Columns: {AXES[axis].lower()}", options, default=default, format_func=label, key=f"compare_values_{axis}_{model_key}")
row_axis, row_values = None, []
rows_choice = st.columns([1, 3])
row_axis = rows_choice[0].selectbox("Rows" + (" (within each study)" if len(studies) > 1 else ""), [None] + [a for a in AXES if a != axis],
                                    format_func=lambda a: ("one row" + (" per study" if len(studies) > 1 else "")) if a is None else AXES[a],
                                    key=f"compare_rows_{axis}")
if row_axis is not None:
    r_options, _, r_label = axis_choices(row_axis)
    row_values = rows_choice[1].multiselect(f"Rows: {AXES[row_axis].lower()}", r_options, default=r_options[:3], format_func=r_label, key=f"compare_row_values_{row_axis}_{model_key}")

display = st.columns(5)
shared = display[0].toggle("Shared colour scale", value=True, help="Raw CAM values on one scale wherever they are comparable (same model, method and layer: across studies and classes), so a weak map looks weak. Off: every map stretched to its own range.")
colormap = display[1].selectbox("Colormap", list(COLORMAPS), key="compare_colormap")
opacity = display[2].slider("Opacity", 0.0, 1.0, 0.45, 0.05, key="compare_opacity")
threshold = display[3].slider("Hide below", 0.0, 0.9, 0.0, 0.05, key="compare_threshold", help="Map values below this (after scaling) are not coloured.")
with_faith = display[4].toggle("Faithfulness scores", value=False, help="ROAD: remove or keep the top 20% of pixels and watch the probability; about 1 s per panel.")

if not values:
    st.info("Pick at least one value to compare.")
    st.stop()

# --- Compute (maps cached per session; display changes do not recompute) ------------------------

specs = None
with guarded("setting up the grid"):
    specs = grid_specs(axis, values, models, studies=len(studies), model=model_key, method=method, target=target, row_axis=row_axis, row_values=row_values)
if specs is None:
    st.stop()
# The input gate, as on Diagnose: a CT slice or a lateral film gets no heatmaps (they would
# explain a prediction the model was never made for) unless a clinician overrides, recorded.
gates: dict[tuple[str, str], GateResult | None] = st.session_state.setdefault("compare_gates", {})
blocked = False
for study_index, model_key_ in sorted({(s.study, s.model) for s in specs}):
    gate_key = (study_ids[study_index], model_key_)
    if gate_key not in gates:
        with guarded("checking the input"):
            gates[gate_key] = predict(models[model_key_], [studies[study_index]])[0].gate
    verdict = gates.get(gate_key)
    if verdict is None or verdict.outcome == "accepted":
        continue
    where = f"{names[study_index]} ({model_key_})"
    if verdict.rejected:
        st.error(f"**{where}: not a frontal chest radiograph by the input check; no heatmaps.**  \n" + "  \n".join(f"- {r}" for r in verdict.reasons))
        if not gate_override(study_ids[study_index], verdict, studies[study_index].sha256, model_key_):
            blocked = True
        else:
            st.caption(f"{where}: shown after an override; the input check rejected it.")
    else:
        st.warning(f"**{where}: check before relying on these heatmaps.**  \n" + "  \n".join(f"- {r}" for r in verdict.reasons))
if blocked:
    render_disclaimer()
    st.stop()

key = (tuple(u.file_id for u in uploads), tuple(specs), with_faith)
grids = st.session_state.setdefault("compare_grids", {})
panels = grids.get(key)
if panels is None:
    bar = st.progress(0.0, text="Computing heatmaps…")
    with guarded("computing the heatmaps"):
        panels = compute_grid(specs, models, studies, display_side=DISPLAY_SIDE, with_faithfulness=with_faith,
                              progress=lambda f, msg: bar.progress(min(1.0, f), text=msg))
        grids.clear()  # one grid per session is plenty of memory
        grids[key] = panels
        # One audit entry per study and model in the grid: what was computed and predicted.
        for study_index, film in enumerate(studies):
            for model_key_ in sorted({p.spec.model for p in panels if p.spec.study == study_index}):
                shown = [p for p in panels if p.spec.study == study_index and p.spec.model == model_key_]
                audit.record("compare", user=who, role=who_role, image_sha256=film.sha256, model=model_key_,
                             details={"predicted": shown[0].predicted, "axis": axis,
                                      "panels": [{"method": p.spec.method, "target": p.spec.target, "layer": p.spec.layer,
                                                  "probability": round(p.probability, 4)} for p in shown]})
    bar.empty()
if panels is None:
    st.stop()

scaled, scales = scale_panels(panels, shared)
tiles = overlays(panels, studies, scaled, colormap=colormap, opacity=opacity, threshold=threshold)
titles = [panel_title(p, models[p.spec.model].manifest.label) for p in panels]

columns = len(values)
rows = len(panels) // columns
labels_of_rows = row_titles([p.spec for p in panels], columns, names)
bars = colour_bars(scales)
fig = make_subplots(rows=rows, cols=columns, subplot_titles=[t.replace(" · ", "<br>", 1) for t in titles], horizontal_spacing=0.01,
                    vertical_spacing=0.08, row_titles=labels_of_rows if any(labels_of_rows) else None)
for i, tile in enumerate(tiles):
    buffer = io.BytesIO()
    Image.fromarray(tile).save(buffer, format="JPEG", quality=90)
    uri = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()
    unit = 1000 / max(tile.shape[:2])  # every panel spans 1000 units on its long side: zoom matches across studies
    r, c = divmod(i, columns)
    fig.add_trace(go.Image(source=uri, dx=unit, dy=unit, hoverinfo="skip"), row=r + 1, col=c + 1)
fig.update_xaxes(matches="x", showticklabels=False)
fig.update_yaxes(matches="y", showticklabels=False)
fig.update_annotations(font_size=11)
# Row titles on the left, where a row is read from (plotly puts them on the right).
for annotation in fig.layout.annotations:
    if annotation.text in labels_of_rows and annotation.textangle == 90:
        annotation.update(x=-0.01, xanchor="right", textangle=-90, font_size=12)
# A colour bar per shared scale, under the grid, in the overlays' own colours.
for k, bar in enumerate(bars):
    top_value = bar.top or 1.0  # each map's own range (None), or an empty map (0): a 0-to-1 bar
    fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", showlegend=False, hoverinfo="skip",
                             marker=dict(colorscale=colorscale(colormap), cmin=0.0, cmax=top_value, color=[0.0], showscale=True,
                                         colorbar=dict(orientation="h", x=0.5, xanchor="center", y=-0.01 - k * 60 / (380 * rows),
                                                       yanchor="top", len=0.6, thickness=12,
                                                       title=dict(text=bar.name + {None: " (0 to each map's maximum)", 0.0: " (every map empty)"}.get(bar.top, ""),
                                                                  side="top")))),
                  row=1, col=1)
fig.update_layout(height=380 * rows + 60 + 60 * len(bars), margin=dict(l=40 if any(labels_of_rows) else 5, r=5, t=70, b=10 + 60 * len(bars)),
                  dragmode="zoom")
st.plotly_chart(fig, width="stretch", key="compare_grid", config={"scrollZoom": True})
st.caption(
    describe_scales(scales)
    + " Zoom or pan any panel: the others follow."
    + (f" Studies, top to bottom: {', '.join(names)}." if len(studies) > 1 else "")
)

outside = lung_warnings(panels, names)
if outside:
    st.warning(
        "Most of the heatmap lies outside the lung fields for: "
        + "; ".join(outside)
        + ". Check for burned-in text, markers or borders driving the result. (Classes the model gives under 5% are not checked.)"
    )
st.caption(describe_lung_fields() + f" A flat map scores {panels[0].lung.lung_fraction:.0%}.")

if with_faith:
    table = pd.DataFrame(
        [
            {
                "panel": p.spec.label,
                "study": names[p.spec.study],
                "p(target)": round(p.probability, 3),
                "drop when top 20% removed": round(p.faithfulness.drop, 3),
                "random map": round(p.faithfulness.random_drop, 3),
                "change when only top 20% kept": round(p.faithfulness.keep, 3),
                "random map ": round(p.faithfulness.random_keep, 3),
                "beats random": p.faithfulness.beats_random,
            }
            for p in panels
            if p.faithfulness is not None
        ]
    )
    st.dataframe(table, hide_index=True, width="stretch")
    st.caption("ROAD (noisy linear imputation). A faithful map's removal lowers the probability more than a random map's.")


def _png_bytes() -> bytes:
    keys = list(dict.fromkeys(p.spec.model for p in panels))
    provenance = Provenance(
        ", ".join(keys),
        ", ".join(dict.fromkeys(models[k].manifest.name for k in keys)),
        f"Heatmaps across: {AXES[axis]}; {len(studies)} stud{'y' if len(studies) == 1 else 'ies'}. {describe_scales(scales)}",
        studies[0].sha256 if len(studies) == 1 else None,
    )
    return labelled_png(grid_png(tiles, titles, columns, rows_titled=labels_of_rows, bars=bars, colormap=colormap), provenance)


st.download_button(
    "Export grid (PNG)", _png_bytes, file_name=f"cxr-compare-{axis}.png", mime="image/png",
    on_click=lambda: audit.record("export_grid", user=who, role=who_role, details={"axis": axis, "panels": len(panels),
                                                                                  "images": [s.sha256 for s in studies]}),
)

render_disclaimer()

# --- Reviewer feedback -------------------------------------------------------------------------

st.subheader("Your review")
study_index = st.selectbox("Study", range(len(studies)), format_func=lambda i: names[i], key="compare_review_study") if len(studies) > 1 else 0
reviewed = [p for p in panels if p.spec.study == study_index]
anchor = next((p for p in reviewed if p.spec.model == model_key and p.spec.method == method and p.spec.target == target), reviewed[0])
manifest = models[anchor.spec.model].manifest
st.caption(
    f"About `{manifest.key}`: predicted {manifest.label(anchor.predicted) if anchor.predicted else 'none'}; "
    f"heatmap {CAM_METHODS[anchor.spec.method].label} for {manifest.label(anchor.spec.target)} at {anchor.spec.layer}."
)
choices = {"No opinion": None, "Agree": True, "Disagree": False}
with st.form("compare_feedback", clear_on_submit=True):
    c1, c2 = st.columns(2)
    on_prediction = c1.radio("The prediction", list(choices), horizontal=True)
    on_heatmap = c2.radio("The heatmap", list(choices), horizontal=True)
    comment = st.text_area("Comment", max_chars=2000, placeholder="What you see, and why you agree or not. No patient identifiers, please.")
    typed = name_field("review")
    if st.form_submit_button("Record review"):
        reviewer, reviewer_role = accountable_user(typed)
        if not reviewer:
            st.error("Sign in, or type your name, so that the review is recorded against you.")
        else:
            with guarded("recording the review"):
                record_feedback(
                    Feedback(
                        model=manifest.key, image_sha256=studies[study_index].sha256, method=anchor.spec.method, target=anchor.spec.target,
                        layer=anchor.spec.layer, predicted=anchor.predicted, agree_prediction=choices[on_prediction],
                        agree_heatmap=choices[on_heatmap], comment=comment, user=reviewer,
                    ),
                    role=reviewer_role,
                )
                st.success("Review recorded (and in the audit trail).")

with guarded("listing reviews"):
    mine = list_feedback(studies[study_index].sha256)
    everything = list_feedback(limit=10_000)
    if mine:
        st.dataframe(
            pd.DataFrame([{"when": f.created, "who": f.user, "model": f.model, "method": f.method, "class": f.target,
                           "prediction": review_verdict(f.agree_prediction), "heatmap": review_verdict(f.agree_heatmap), "comment": f.comment} for f in mine]),
            hide_index=True, width="stretch",
        )
    else:
        st.caption("No reviews of this image yet.")
    st.download_button("Download all reviews (CSV)", feedback_csv(everything), file_name="cxr-reviews.csv", mime="text/csv")
