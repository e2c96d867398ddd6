"""Heatmap grids, shared scales, faithfulness, lung overlap and reviewer feedback."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cxr_core.errors import CxrError, ExplanationError
from cxr_core.explain.compare import (
    Panel,
    PanelSpec,
    compute_grid,
    depth_layers,
    describe_scales,
    grid_png,
    grid_specs,
    scale_panels,
)
from cxr_core.explain.faithfulness import faithfulness, random_map
from cxr_core.imaging.io import read_image
from cxr_core.imaging.lungs import lung_field, lung_overlap
from cxr_core.models.architectures import ARCHITECTURES, build_network
from cxr_core.models.loading import load_model
from cxr_core.state.feedback import Feedback, feedback_csv, list_feedback, record_feedback, review_verdict
from tests.synthetic import make_labelled_folder


@pytest.fixture(scope="module")
def chest(dicom_data: Path):  # type: ignore[no-untyped-def]
    return read_image(dicom_data / "RG1_J2KR.dcm")


@pytest.mark.parametrize("arch", sorted(a for a in ARCHITECTURES if a != "tiny-test"))
def test_depth_progression_resolves_for_every_architecture(arch: str) -> None:
    from cxr_core.models.architectures import get_architecture

    net = build_network(arch, 2)
    stages = get_architecture(arch).stage_layers
    assert len(stages) == 5
    sizes = []
    hooks = [net.get_submodule(layer).register_forward_hook(lambda m, i, o: sizes.append(o.shape[-1])) for layer in stages]
    with torch.no_grad():
        net(torch.zeros(1, 3, 96, 96))
    for h in hooks:
        h.remove()
    assert sizes == sorted(sizes, reverse=True)  # shallow to deep: resolution never grows


def test_grid_over_methods_classes_and_depth(densenet, resnet, chest) -> None:  # type: ignore[no-untyped-def]
    models = {densenet.key: densenet, resnet.key: resnet}
    specs = grid_specs("method", ["gradcam", "hirescam", "layercam"], models, studies=1, model=densenet.key, method="gradcam",
                       target="covid", row_axis="class", row_values=["covid", "normal", "viral_pneumonia"])
    assert len(specs) == 9 and {s.target for s in specs} == {"covid", "normal", "viral_pneumonia"}
    panels = compute_grid(specs, models, [chest], display_side=256)
    assert all(p.raw.shape == (256, 241) for p in panels)  # display size, aspect kept (1955 x 1841 film)
    # Same class, same method: the same raw (unscaled) map whichever way the grid was asked
    # for; the 3x3 grid computes three classes per pass, this one panel alone.
    by_key = {(p.spec.method, p.spec.target): p for p in panels}
    alone = compute_grid(grid_specs("class", ["normal"], models, studies=1, model=densenet.key, method="hirescam", target="covid"),
                         models, [chest], display_side=256)[0]
    in_grid = by_key[("hirescam", "normal")]
    assert in_grid.probability == pytest.approx(alone.probability, abs=1e-6)
    np.testing.assert_allclose(in_grid.raw, alone.raw, rtol=1e-4, atol=1e-6 * float(alone.raw.max()))
    assert float(alone.raw.max()) > 0 and not np.isclose(float(alone.raw.max()), 1.0)  # raw CAM units, not min-max scaled

    across_models = grid_specs("model", list(models), models, studies=2, model=densenet.key, method="gradcam", target="normal")
    # The binary model has no 'normal': its negative class ('other') holds normals, and the label says so.
    assert [s.target for s in across_models] == ["normal", "other", "normal", "other"]
    assert across_models[1].label.endswith("→ " + resnet.manifest.label("other")) and "→" not in across_models[0].label
    # Models x depth: each model at the same stage of its own backbone.
    mixed = grid_specs("model", list(models), models, studies=1, model=densenet.key, method="gradcam", target="covid",
                       row_axis="depth", row_values=depth_layers(densenet))
    assert [s.layer for s in mixed if s.model == resnet.key] == [f"backbone.{n}" for n in ("relu", "layer1", "layer2", "layer3", "layer4")]
    assert [s.layer for s in mixed if s.model == densenet.key] == depth_layers(densenet)
    assert all(p.raw.size for p in compute_grid(mixed[-2:], models, [chest], display_side=64))
    depth = grid_specs("depth", depth_layers(densenet), models, studies=1, model=densenet.key, method="gradcam", target="covid")
    assert [s.layer for s in depth][-1] == "backbone.norm5"
    with pytest.raises(ExplanationError):
        grid_specs("method", ["gradcam"], models, studies=1, model=densenet.key, method="gradcam", target="covid", row_axis="method", row_values=["x"])


def _panel(raw: np.ndarray, study: int = 0, method: str = "gradcam", target: str = "covid") -> Panel:
    return Panel(PanelSpec(study, "m@1", method, target, "backbone.x", "x"), raw.astype(np.float32), 0.5, "covid", lung_overlap(raw))


def _bump() -> np.ndarray:
    yy, xx = np.mgrid[0:64, 0:64]
    return np.exp(-((yy - 32) ** 2 + (xx - 32) ** 2) / 50.0)


def test_shared_scale_keeps_a_weak_map_weak() -> None:
    strong, weak = _panel(_bump() * 2.0), _panel(_bump() * 0.2, study=1)
    shared, scales = scale_panels([strong, weak], shared=True)
    assert len(scales) == 1 and scales[0].top == pytest.approx(2.0, rel=1e-3)
    assert shared[0].max() == pytest.approx(1.0) and shared[1].max() < 0.2
    assert describe_scales(scales) == "Shared scale: 0 to 2 (raw CAM units)."
    separate, none = scale_panels([strong, weak], shared=False)
    assert none == () and separate[0].max() == pytest.approx(1.0) and separate[1].max() == pytest.approx(1.0)
    assert describe_scales(none) == "Each map scaled to its own range."


def test_methods_never_share_a_scale_but_studies_and_classes_do() -> None:
    """Grad-CAM++'s raw maps run larger than Grad-CAM's: one scale would flatten Grad-CAM's (seen in the browser)."""
    grid = [
        _panel(_bump() * 0.6, study=0, method="gradcam++"), _panel(_bump() * 0.02, study=0, method="gradcam"),
        _panel(_bump() * 0.3, study=1, method="gradcam++"), _panel(_bump() * 0.01, study=1, method="gradcam", target="normal"),
    ]
    scaled, scales = scale_panels(grid, shared=True)
    assert {(s.method, round(s.top, 3)) for s in scales} == {("gradcam++", 0.6), ("gradcam", 0.02)}
    # Each method's strongest map fills its scale; the other study stays at half, as its raw values are.
    assert [round(float(m.max()), 3) for m in scaled] == [1.0, 1.0, 0.5, 0.5]
    assert describe_scales(scales).endswith("Grad-CAM++ 0 to 0.6; Grad-CAM 0 to 0.02.")


def test_lung_overlap() -> None:
    field = lung_field((200, 200))
    assert 0.3 < field.mean() < 0.5 and field[100, 50] and not field[5, 5]
    corner = np.zeros((200, 200), np.float32)
    corner[:25, :25] = 1.0  # a burned-in label in the corner
    lungs = field.astype(np.float32)
    assert lung_overlap(corner).mostly_outside and lung_overlap(corner).share < 0.05
    assert lung_overlap(lungs).share == pytest.approx(1.0) and not lung_overlap(lungs).mostly_outside
    assert lung_overlap(np.zeros((50, 50))).empty and not lung_overlap(np.zeros((50, 50))).mostly_outside


@pytest.fixture(scope="module")
def patch_model(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """cnn5 trained a few epochs on films whose class is a bright patch's position."""
    from cxr_core.training.config import TrainConfig
    from cxr_core.training.finalize import finalize
    from cxr_core.training.trainer import train

    root = tmp_path_factory.mktemp("patch")
    data = make_labelled_folder(root / "data", size=64, per_class={"train": 40, "val": 10, "test": 10})
    config = TrainConfig(data_dir=str(data), arch="cnn5", out=str(root / "w" / "patch"), model_id="patch", schedule=((64, 6),),
                         batch_size=16, lr=3e-3, workers=1, device="cpu", target_sensitivity=None)
    result, prepared = train(config, root / "run")
    manifest = finalize(config, root / "run", prepared, result)
    assert manifest.metrics["test"]["accuracy"] > 0.8, manifest.metrics["test"]
    return load_model(root / "w" / "patch", device="cpu"), data


def test_gradcam_is_more_faithful_than_a_random_map(patch_model) -> None:  # type: ignore[no-untyped-def]
    from cxr_core.explain.cam import explain

    model, data = patch_model
    drops, random_drops = [], []
    for cls in model.manifest.classes:
        for path in sorted((data / "test" / cls).iterdir())[:4]:
            image = read_image(path)
            heatmap = explain(model, image, targets=[cls], layer="backbone.block3").heatmaps[0]
            score = faithfulness(model, image, heatmap.raw, cls)
            drops.append(score.drop)
            random_drops.append(score.random_drop)
    assert np.mean(drops) > np.mean(random_drops) + 0.05, (np.mean(drops), np.mean(random_drops))


def test_random_map_is_reproducible() -> None:
    a, b = random_map((32, 40), "abc"), random_map((32, 40), "abc")
    assert a.shape == (32, 40) and np.array_equal(a, b) and not np.array_equal(a, random_map((32, 40), "abd"))


def test_feedback_persists_across_restarts(tmp_path: Path) -> None:
    import cxr_core.state.db as db

    path = tmp_path / "app.sqlite3"
    sha = "ab" * 32
    record_feedback(Feedback("m@1", sha, "gradcam", "covid", "backbone.norm5", "covid", True, False, "heatmap on the label"), db=path)
    record_feedback(Feedback("m@1", "cd" * 32, "eigencam", "normal", "backbone.norm5", "normal", None, True), db=path)
    db._initialised.clear()  # as a new process would start
    rows = list_feedback(sha, db=path)
    assert len(rows) == 1 and rows[0].agree_prediction is True and rows[0].agree_heatmap is False
    assert rows[0].comment == "heatmap on the label" and rows[0].created
    assert len(list_feedback(db=path)) == 2
    text = feedback_csv(list_feedback(db=path))
    assert text.splitlines()[0].startswith("id,created,user,model,image_sha256") and sha in text
    with pytest.raises(CxrError, match="Nothing to record"):
        record_feedback(Feedback("m@1", sha, "gradcam", "covid", "x", None, None, None, "  "), db=path)
    # Every review is in the audit trail too: the verdicts, not the free-text comment.
    from cxr_core.state.audit import entries, verify_chain

    reviews = entries(action="review", db=path)
    assert len(reviews) == 2 and {e.image_sha256 for e in reviews} == {sha, "cd" * 32}
    first = next(e for e in reviews if e.image_sha256 == sha)
    assert first.details["agree_prediction"] is True and first.details["agree_heatmap"] is False
    assert "heatmap on the label" not in json.dumps(first.details) and verify_chain(db=path).ok
    assert [review_verdict(v) for v in (True, False, None)] == ["agree", "disagree", "no opinion"]


def test_grid_png_export() -> None:
    tiles = [np.full((100, 80, 3), 200, np.uint8) for _ in range(6)]
    png = grid_png(tiles, [f"panel {i} · p = 0.5 · lungs 80%" for i in range(6)], columns=3, tile_side=120)
    assert png.size == (3 * 120 + 2 * 8, 2 * (120 + 44) + 8)
    # Tiles smaller than their cell are enlarged to fill it (a 224 px JPEG beside a 2k DICOM):
    # the 100 x 80 tile becomes 120 x 96, centred.
    cell = np.asarray(png)[:120, :120]
    grey = np.all(cell == 200, axis=2)
    rows, cols = np.where(grey)
    assert (rows.min(), rows.max() + 1, cols.min(), cols.max() + 1) == (0, 120, 12, 108)
    # Square tiles fill their cells; white columns keep neighbours apart.
    square = grid_png([np.full((50, 50, 3), 90, np.uint8) for _ in range(2)], ["a", "b"], columns=2, tile_side=120)
    pixels = np.asarray(square)[:120]
    assert np.all(pixels[:, :120] == 90) and np.all(pixels[:, 120:128] == 255) and np.all(pixels[:, 128:248] == 90)


def test_two_studies_keep_their_rows_as_an_outer_grouping(densenet) -> None:  # type: ignore[no-untyped-def]
    from cxr_core.explain.compare import row_titles

    models = {densenet.key: densenet}
    specs = grid_specs("method", ["gradcam", "hirescam"], models, studies=2, model=densenet.key, method="gradcam",
                       target="covid", row_axis="class", row_values=["covid", "viral_pneumonia"])
    assert [(s.study, s.target, s.method) for s in specs] == [
        (0, "covid", "gradcam"), (0, "covid", "hirescam"), (0, "viral_pneumonia", "gradcam"), (0, "viral_pneumonia", "hirescam"),
        (1, "covid", "gradcam"), (1, "covid", "hirescam"), (1, "viral_pneumonia", "gradcam"), (1, "viral_pneumonia", "hirescam")]
    # Column labels say the column; the row says the rest, with display names.
    assert {s.label for s in specs} == {"Grad-CAM", "HiResCAM"}
    covid, viral = densenet.manifest.label("covid"), densenet.manifest.label("viral_pneumonia")
    assert viral != "viral_pneumonia"
    assert row_titles(specs, 2, ["prior.dcm", "current.dcm"]) == [
        f"prior.dcm · {covid}", f"prior.dcm · {viral}", f"current.dcm · {covid}", f"current.dcm · {viral}"]
    one = grid_specs("method", ["gradcam"], models, studies=1, model=densenet.key, method="gradcam", target="covid")
    assert row_titles(one, 1, ["film.dcm"]) == [""]
    two = grid_specs("method", ["gradcam"], models, studies=2, model=densenet.key, method="gradcam", target="covid")
    assert row_titles(two, 1, ["a.dcm", "b.dcm"]) == ["a.dcm", "b.dcm"]


def test_lung_warning_names_the_study_and_skips_negligible_classes() -> None:
    from cxr_core.explain.compare import lung_warnings

    corner = np.zeros((64, 64), np.float32)
    corner[:10, :10] = 1.0
    likely = Panel(PanelSpec(1, "m@1", "gradcam", "covid", "backbone.x", "Grad-CAM", "COVID-19"), corner, 0.6, "covid", lung_overlap(corner))
    negligible = Panel(PanelSpec(0, "m@1", "gradcam", "viral_pneumonia", "backbone.x", "Grad-CAM", "Viral pneumonia"), corner, 0.01,
                       "covid", lung_overlap(corner))
    inside = _panel(lung_field((64, 64)).astype(np.float32))
    warnings = lung_warnings([likely, negligible, inside], ["prior.dcm", "current.dcm"])
    assert len(warnings) == 1 and warnings[0].startswith("current.dcm · COVID-19 · Grad-CAM (")


def test_exported_grid_has_row_titles_and_a_colour_bar_per_scale() -> None:
    from cxr_core.explain.compare import colour_bars

    grid = [_panel(_bump() * 0.6, method="gradcam++"), _panel(_bump() * 0.02, method="gradcam")]
    _, scales = scale_panels(grid, shared=True)
    bars = colour_bars(scales)
    assert [(b.name, round(b.top or 0, 3)) for b in bars] == [("Grad-CAM++", 0.6), ("Grad-CAM", 0.02)]
    assert [b.top for b in colour_bars(())] == [None]
    tiles = [np.full((64, 64, 3), 128, np.uint8)] * 2
    plain = grid_png(tiles, ["a", "b"], 2, tile_side=100)
    titled = grid_png(tiles, ["a", "b"], 2, tile_side=100, rows_titled=["prior.dcm"], bars=bars, colormap="jet")
    assert titled.width == plain.width + 150 and titled.height == plain.height + 2 * 40
    pixels = np.asarray(titled)
    # The left margin holds dark text; each bar runs from the colormap's blue to its red.
    assert (pixels[:, :150].min(axis=2) < 100).any()
    bar_row = pixels[plain.height + 8 + 7, 150:]
    coloured = bar_row[(bar_row.max(axis=1) - bar_row.min(axis=1)) > 60]
    assert coloured[0][2] > coloured[0][0] and coloured[-1][0] > coloured[-1][2]


def test_colour_bar_colours_are_the_overlay_colours() -> None:
    from cxr_core.explain.overlay import colorize, colorscale

    stops = colorscale("inferno", steps=5)
    assert [t for t, _ in stops] == [0.0, 0.25, 0.5, 0.75, 1.0]
    r, g, b = colorize(np.array([[1.0]], np.float32), "inferno")[0, 0].tolist()
    assert stops[-1][1] == f"rgb({r},{g},{b})"
