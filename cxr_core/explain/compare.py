"""Heatmap grids: one or two studies, one axis varied (method, model, class or depth).

Panels that share (study, model, method, layer) come from one :func:`explain` call,
which yields every requested class from one backbone pass; maps are computed at
display size, not at the film's full resolution.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cxr_core.errors import ExplanationError
from cxr_core.explain.cam import CAM_METHODS, explain
from cxr_core.explain.export import wrap_text
from cxr_core.explain.faithfulness import Faithfulness, faithfulness
from cxr_core.explain.overlay import fit_within, render_overlay
from cxr_core.imaging.film import XrayImage
from cxr_core.imaging.lungs import LungOverlap, film_lung_fields, lung_overlap
from cxr_core.models.architectures import get_architecture
from cxr_core.models.loading import LoadedModel

AXES = {"method": "CAM method", "model": "Model", "class": "Target class", "depth": "Network depth"}


@dataclass(frozen=True)
class PanelSpec:
    study: int  # index into the studies
    model: str  # id@version
    method: str
    target: str
    layer: str  # module path
    label: str  # what this column shows (the varied value)
    row_label: str = ""  # what this row shows, when rows vary something too ("" otherwise)


@dataclass(frozen=True, eq=False)
class Panel:
    spec: PanelSpec
    raw: np.ndarray  # (h, w) float32 >= 0 at display size
    probability: float  # of spec.target
    predicted: str | None
    lung: LungOverlap
    faithfulness: Faithfulness | None = None


def depth_layers(model: LoadedModel) -> list[str]:
    """The backbone's stages, shallow to deep (Lang et al.'s progression)."""
    return list(get_architecture(model.manifest.architecture).stage_layers)


def default_layer(model: LoadedModel) -> str:
    return model.manifest.cam_target_layers[0] if model.manifest.cam_target_layers else depth_layers(model)[-1]


def _target_for(model: LoadedModel, wanted: str) -> str:
    """``wanted`` if the model has it. A binary covid-vs-other model has no 'normal' or 'viral
    pneumonia': both are part of its negative class, so that is the class explained."""
    classes = model.manifest.classes
    if wanted in classes:
        return wanted
    return classes[1] if model.manifest.head == "sigmoid" else classes[0]


def _layer_for(model: LoadedModel, layer: str | None, reference: LoadedModel) -> str:
    """``layer`` (a stage of ``reference``'s backbone, or any module path) for ``model``: the
    same stage of the model's own backbone when the architectures differ, so "network
    depth" compares like with like across models (every registered backbone has five)."""
    if layer is None:
        return default_layer(model)
    mine, theirs = depth_layers(model), depth_layers(reference)
    if layer in mine or layer not in theirs:
        return layer
    return mine[round(theirs.index(layer) * (len(mine) - 1) / max(len(theirs) - 1, 1))]


def _apply(axis: str, value: str, setting: dict[str, str | None]) -> None:
    setting[{"method": "method", "model": "model", "class": "target", "depth": "layer"}[axis]] = value


def grid_specs(
    axis: str,
    values: Sequence[str],
    models: dict[str, LoadedModel],
    *,
    studies: int,
    model: str,
    method: str,
    target: str,
    layer: str | None = None,
    row_axis: str | None = None,
    row_values: Sequence[str] = (),
) -> list[PanelSpec]:
    """Panels row by row: one column per value of ``axis``; rows are the values of ``row_axis``
    (e.g. 3 methods x 3 classes), one block of them per study (studies are the outer grouping),
    else one row per study."""
    for a in (axis, row_axis):
        if a is not None and a not in AXES:
            raise ExplanationError(f"Unknown axis {a!r}; choose one of {', '.join(AXES)}.")
    if not values:
        raise ExplanationError("Pick at least one value to compare.")
    if row_axis == axis:
        raise ExplanationError("Rows and columns must vary different things.")
    if row_axis is None or not row_values:
        rows: list[tuple[int, str | None]] = [(s, None) for s in range(studies)]
    else:
        rows = [(s, v) for s in range(studies) for v in row_values]
    specs = []
    for study, row_value in rows:
        for value in values:
            setting: dict[str, str | None] = {"model": model, "method": method, "target": target, "layer": layer}
            if row_value is not None and row_axis is not None:
                _apply(row_axis, row_value, setting)
            _apply(axis, value, setting)
            loaded = models[str(setting["model"])]
            cls = str(setting["target"])
            target_ = _target_for(loaded, cls)
            layer_ = _layer_for(loaded, setting["layer"], models[model])
            label = {
                "method": CAM_METHODS[str(setting["method"])].label if setting["method"] in CAM_METHODS else value,
                "model": str(setting["model"]),
                "class": loaded.manifest.label(cls),
                "depth": value,
            }[axis]
            row_label = ""
            if row_value is not None and row_axis is not None:
                row_label = {"method": CAM_METHODS[row_value].label if row_value in CAM_METHODS else row_value,
                             "class": models[model].manifest.label(row_value)}.get(row_axis, row_value)
            # Say so when a model shows another class or layer than the row or column names.
            if target_ != cls:
                label += f" → {loaded.manifest.label(target_)}"
            if setting["layer"] is not None and layer_ != setting["layer"]:
                label += f" → {layer_}"
            specs.append(PanelSpec(study, str(setting["model"]), str(setting["method"]), target_, layer_, label, row_label))
    return specs


def row_titles(specs: Sequence[PanelSpec], columns: int, study_names: Sequence[str]) -> list[str]:
    """One title per row of the grid (``columns`` panels a row): the study's name when there
    are several, and what the row varies, when it varies something."""
    several = len({s.study for s in specs}) > 1
    titles = []
    for first in specs[::columns]:
        parts = ([study_names[first.study]] if several else []) + ([first.row_label] if first.row_label else [])
        titles.append(" · ".join(parts))
    return titles


def describe_panel(spec: PanelSpec, study_names: Sequence[str]) -> str:
    """A panel in words that stand alone (a warning, a table): study, row and column."""
    parts = [study_names[spec.study]] if len(study_names) > 1 else []
    return " · ".join(parts + [p for p in (spec.row_label, spec.label) if p])


#: a class whose probability is below this is not worth a lung-field warning: its heatmap
#: explains a class the model does not see in the film, and may lie anywhere
NEGLIGIBLE_PROBABILITY = 0.05


def lung_warnings(panels: Sequence[Panel], study_names: Sequence[str], min_probability: float = NEGLIGIBLE_PROBABILITY) -> list[str]:
    """The panels whose heatmap lies mostly outside the lung fields, each named with its study
    and its share, leaving out classes the model gives less than ``min_probability``."""
    return [f"{describe_panel(p.spec, study_names)} ({p.lung.share:.0%})" for p in panels
            if p.lung.mostly_outside and p.probability >= min_probability]


def compute_grid(
    specs: Sequence[PanelSpec],
    models: dict[str, LoadedModel],
    studies: Sequence[XrayImage],
    *,
    display_side: int = 512,
    with_faithfulness: bool = False,
    progress: Callable[[float, str], None] | None = None,
) -> list[Panel]:
    """Compute every panel; ``progress(fraction, message)`` after each group of maps."""
    groups: OrderedDict[tuple[int, str, str, str], list[PanelSpec]] = OrderedDict()
    for spec in specs:
        groups.setdefault((spec.study, spec.model, spec.method, spec.layer), []).append(spec)
    panels: dict[PanelSpec, Panel] = {}
    # One lung field per study (the segmenter's, or the atlas's when it is not installed).
    fields = film_lung_fields([im.pixels for im in studies])
    steps = len(groups) + (len(specs) if with_faithfulness else 0)
    done = 0
    for (study, model_key, method, layer), members in groups.items():
        image, model = studies[study], models[model_key]
        shape = fit_within(image.pixels, display_side).shape
        targets = list(OrderedDict.fromkeys(s.target for s in members))

        def inner(fraction: float, _done: int = done, _label: str = CAM_METHODS[method].label) -> None:
            if progress is not None:
                progress((_done + fraction) / steps, f"{_label}: masked forward passes")

        explanation = explain(model, image, method=method, targets=targets, layer=layer, size=shape, progress=inner)
        for spec in members:
            heatmap = explanation.heatmap(spec.target)
            raw = heatmap.raw
            panels[spec] = Panel(spec, raw, heatmap.probability, explanation.prediction.predicted, lung_overlap(raw, fields[study]))
        done += 1
        if progress is not None:
            progress(done / steps, f"maps {done} of {len(groups)}")
    if with_faithfulness:
        for spec in specs:
            panel = panels[spec]
            score = faithfulness(models[spec.model], studies[spec.study], panel.raw, spec.target)
            panels[spec] = Panel(panel.spec, panel.raw, panel.probability, panel.predicted, panel.lung, score)
            done += 1
            if progress is not None:
                progress(done / steps, "faithfulness scores")
    return [panels[s] for s in specs]


@dataclass(frozen=True)
class Scale:
    """One shared colour scale: the panels of one model, method and layer."""

    model: str
    method: str
    layer: str
    top: float  # the largest raw value among those panels; they are divided by it


def _units(item: PanelSpec | Scale) -> tuple[str, str, str]:
    """What raw CAM units depend on: the network, the method and the layer."""
    return (item.model, item.method, item.layer)


def scale_panels(panels: Sequence[Panel], shared: bool) -> tuple[list[np.ndarray], tuple[Scale, ...]]:
    """Maps in [0, 1] for display, and the shared scales used (none when not ``shared``).

    Shared: raw maps divided by the largest raw value among the panels of the same model,
    method and layer, so across studies and classes a weak map looks weak. Raw CAM units
    differ between methods, networks and layers (Grad-CAM++'s weights are not Grad-CAM's,
    a shallow stage's activations are not the last one's), so those never share a scale:
    one would flatten the others. Not shared: each map min-max scaled on its own (every
    map looks confident).
    """
    if shared:
        tops: dict[tuple[str, str, str], float] = {}
        for p in panels:
            tops[_units(p.spec)] = max(tops.get(_units(p.spec), 0.0), float(p.raw.max()))
        scaled = [np.clip(p.raw / (tops[_units(p.spec)] or 1.0), 0, 1).astype(np.float32) for p in panels]
        return scaled, tuple(Scale(*units, top) for units, top in tops.items())
    out = []
    for p in panels:
        lo, hi = float(p.raw.min()), float(p.raw.max())
        out.append(((p.raw - lo) / (hi - lo)).astype(np.float32) if hi - lo > 1e-12 * max(abs(hi), 1e-12) else np.zeros_like(p.raw))
    return out, ()


def describe_scales(scales: Sequence[Scale]) -> str:
    """One sentence for the grid's caption: the shared scale, or each scale by what tells them apart."""
    if not scales:
        return "Each map scaled to its own range."
    if len(scales) == 1:
        return f"Shared scale: 0 to {scales[0].top:.3g} (raw CAM units)."
    return (
        "One scale per model, method and layer (their raw CAM units are not comparable), shared across studies and classes: "
        + "; ".join(f"{name} 0 to {s.top:.3g}" for s, name in zip(scales, _scale_names(scales)))
        + "."
    )


def _scale_names(scales: Sequence[Scale]) -> list[str]:
    """Each scale named by what tells it apart from the others (model, method and/or layer)."""
    differ = [i for i in range(3) if len({_units(s)[i] for s in scales}) > 1]
    names = []
    for s in scales:
        parts = [s.model, CAM_METHODS[s.method].label if s.method in CAM_METHODS else s.method, s.layer]
        names.append(" / ".join(parts[i] for i in differ) or "shared scale")
    return names


def panel_title(panel: Panel, manifest_label: Callable[[str], str] = str) -> str:
    lungs = "empty map" if panel.lung.empty else f"lungs {panel.lung.share:.0%}"
    parts = [panel.spec.label, f"p({manifest_label(panel.spec.target)}) = {panel.probability:.2f}", lungs]
    if panel.faithfulness is not None:
        f = panel.faithfulness
        parts.append(f"drop {f.drop:+.2f} (random {f.random_drop:+.2f})")
    return " · ".join(parts)


def overlays(panels: Sequence[Panel], studies: Sequence[XrayImage], scaled: Sequence[np.ndarray], *, colormap: str, opacity: float, threshold: float) -> list[np.ndarray]:
    """(h, w, 3) uint8 overlay per panel, film at the panel's size."""
    out = []
    for panel, heat in zip(panels, scaled):
        film = fit_within(studies[panel.spec.study].pixels, max(heat.shape))
        out.append(render_overlay(film, heat, colormap=colormap, opacity=opacity, threshold=threshold))
    return out


@dataclass(frozen=True)
class ColourBar:
    """One colour scale to draw beside a grid: what it covers, and the value of its top colour."""

    name: str
    top: float | None  # raw CAM units; None: every map stretched to its own range (0 to 1)


def colour_bars(scales: Sequence[Scale]) -> list[ColourBar]:
    """A bar per shared scale, named by what tells the scales apart; one 0-to-1 bar when maps are not shared."""
    if not scales:
        return [ColourBar("each map's own range", None)]
    return [ColourBar(name, s.top) for s, name in zip(scales, _scale_names(scales))]


def grid_png(
    tiles: Sequence[np.ndarray],
    titles: Sequence[str],
    columns: int,
    tile_side: int = 384,
    *,
    rows_titled: Sequence[str] = (),
    bars: Sequence[ColourBar] = (),
    colormap: str = "jet",
) -> Image.Image:
    """Tile overlays into one image with a caption under each, for export: row titles in a
    left margin when given, and a colour bar per scale under the grid."""
    from cxr_core.explain.overlay import colorize

    rows = (len(tiles) + columns - 1) // columns
    caption_h = 44
    # White space between cells: square tiles fill their cells, and two films side by side
    # with no gap read as one picture.
    gap = 8
    font = ImageFont.load_default(size=13)
    margin = 150 if any(rows_titled) else 0
    bar_h = 40 if bars else 0
    width = margin + columns * tile_side + (columns - 1) * gap
    height = rows * (tile_side + caption_h) + (rows - 1) * gap
    canvas = Image.new("RGB", (width, height + bar_h * len(bars)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, title in enumerate(rows_titled[:rows]):
        y0 = r * (tile_side + caption_h + gap) + tile_side // 2 - 20
        for k, text in enumerate(wrap_text(draw, title, font, margin - 12)[:4]):
            draw.text((4, y0 + 15 * k), text, fill="black", font=font)
    for i, (tile, title) in enumerate(zip(tiles, titles)):
        r, c = divmod(i, columns)
        picture = Image.fromarray(tile)
        # Fit the tile either way: a 224 px JPEG beside a 2k DICOM should fill its cell too.
        fit = tile_side / max(picture.size)
        picture = picture.resize((max(1, round(picture.width * fit)), max(1, round(picture.height * fit))), Image.Resampling.LANCZOS)
        x0, y0 = margin + c * (tile_side + gap), r * (tile_side + caption_h + gap)
        canvas.paste(picture, (x0 + (tile_side - picture.width) // 2, y0 + (tile_side - picture.height) // 2))
        for k, text in enumerate(wrap_text(draw, title, font, tile_side - 8)[:3]):
            draw.text((x0 + 4, y0 + tile_side + 2 + 14 * k), text, fill="black", font=font)
    ramp_w = min(360, width - margin - 200)
    for k, bar in enumerate(bars):
        y0 = height + k * bar_h + 8
        ramp = colorize(np.tile(np.linspace(0.0, 1.0, ramp_w, dtype=np.float32), (14, 1)), colormap)
        canvas.paste(Image.fromarray(ramp), (margin + 4, y0))
        top = "1 (each map's maximum)" if bar.top is None else f"{bar.top:.3g}"
        draw.text((margin + 8 + ramp_w, y0), f"0 to {top}: {bar.name}", fill="black", font=font)
    return canvas
