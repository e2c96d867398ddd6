"""Benchmark: ``python -m cxr_core.bench [--json] [--smoke] [--model ID ...] [--folder DIR]``.

Measures, in one run and on whatever device is present (medians of repeats after
warm-up; ratios are taken within this run):

1. plain forward pass per model: batch 1 latency, and images/s at the best batch size;
2. all-class Grad-CAM for one image as a ratio to one forward pass, and the naive way
   (pytorch-grad-cam once per class on the whole network) as the baseline;
3. one study end to end: read pydicom-data's RG1_J2KR (1955x1841 JPEG 2000 DICOM),
   preprocess, predict (gated), all-class CAM, overlay at full resolution, per stage;
4. batch inference over a folder with decoding overlapped (images/s);
5. training throughput and the share of step time spent preparing data;
6. peak resident memory of a process that loads every model and uses it once.

``--json`` prints one object; without it a table. ``--smoke`` runs each part once on tiny
inputs (for CI: it checks the benchmark runs, its figures mean nothing).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from cxr_core.models.loading import LoadedModel, installed_models, load_model, resolve_model, select_device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _input(model: LoadedModel, batch: int) -> torch.Tensor:
    spec = model.manifest.input
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch, spec.channels, *spec.size, generator=generator)


def bench_forward(model: LoadedModel, repeats: int, warmup: int, batches: tuple[int, ...]) -> dict[str, Any]:
    from cxr_core.inference import predict_logits

    one = _input(model, 1)
    forward_s = median_seconds(lambda: predict_logits(model, one), model.device, repeats, warmup)
    rates = {}
    for size in batches:
        x = _input(model, size)
        rates[size] = size / median_seconds(lambda x=x: predict_logits(model, x), model.device, max(1, repeats // 2), min(warmup, 1))
    best = max(rates, key=rates.get)  # type: ignore[arg-type]
    return {"forward_s": forward_s, "best_batch": best, "forward_batch_images_per_s": rates[best], "batch_rates": rates}


def bench_cam(model: LoadedModel, forward_s: float, repeats: int, warmup: int) -> dict[str, float]:
    from pytorch_grad_cam import GradCAM

    from cxr_core.explain.cam import class_targets, compute_raw_cams

    x = _input(model, 1)
    classes = list(model.manifest.classes)
    ours = median_seconds(lambda: compute_raw_cams(model, x, "gradcam", classes), model.device, repeats, warmup)
    network = copy.deepcopy(model.network).requires_grad_(True)
    layer = network.get_submodule(model.manifest.cam_target_layers[0])
    targets = class_targets(model.manifest, classes)

    def naive() -> None:
        for target in targets:
            with GradCAM(model=network, target_layers=[layer]) as cam:
                cam(input_tensor=x.to(model.device), targets=[target])

    baseline = median_seconds(naive, model.device, max(1, repeats // 2), min(warmup, 1))
    return {"all_class_cam_s": ours, "naive_cam_s": baseline, "all_class_cam_over_forward": ours / forward_s, "naive_cam_over_forward": baseline / forward_s}


def bench_e2e(model: LoadedModel, study: Path, repeats: int, warmup: int) -> dict[str, Any]:
    from cxr_core.explain.cam import explain
    from cxr_core.explain.overlay import render_overlay
    from cxr_core.imaging.io import read_image
    from cxr_core.inference import predict

    data = study.read_bytes()

    def once() -> dict[str, float]:
        stages: dict[str, float] = {}
        t = time.perf_counter()
        image = read_image(data)
        stages["read_decode"] = time.perf_counter() - t
        t = time.perf_counter()
        prediction = predict(model, [image])[0]
        _sync(model.device)
        stages["predict_gate"] = time.perf_counter() - t
        t = time.perf_counter()
        explanation = explain(model, image)
        _sync(model.device)
        stages["all_class_cam"] = time.perf_counter() - t
        t = time.perf_counter()
        render_overlay(image.pixels, explanation.heatmap(prediction.decision or model.manifest.classes[0]).scaled)
        stages["overlay_full_res"] = time.perf_counter() - t
        stages["total"] = sum(stages.values())
        return stages

    for _ in range(warmup):
        once()
    runs = [once() for _ in range(repeats)]
    medians = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    return {"e2e_single_study_s": medians["total"], "stages_s": medians}


def _folder(source: Path | None, n: int) -> tuple[Path, str]:
    """A folder of n films: copies of the shared test JPEGs when given, else synthetic 512 px PNGs."""
    from PIL import Image

    tmp = Path(tempfile.mkdtemp(prefix="cxr-bench-"))
    files = sorted(source.glob("**/*.jpg"))[:n] if source and source.is_dir() else []
    if files:
        for i, path in enumerate(files):
            (tmp / f"{i:05d}.jpg").write_bytes(path.read_bytes())
        return tmp, f"{len(files)} shared test JPEGs (224 px)"
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (512, 512), dtype=np.uint8)).save(tmp / f"{i:05d}.png")
    return tmp, f"{n} synthetic 512 px PNGs"


def bench_batch(model: LoadedModel, folder: Path, batch: int, repeats: int) -> tuple[float, float]:
    """Images/s over the folder through the app's batch path (decode, preprocess, gate,
    predict), and its ratio to the plain forward pass of as many images at the same batch
    size. The two are timed alternately, ``repeats`` times each, and the medians compared,
    so drift in a busy machine's speed hits both alike."""
    from cxr_core.batch import predict_paths
    from cxr_core.inference import predict_logits

    paths = sorted(str(p) for p in folder.iterdir())
    workers = max(2, (os.cpu_count() or 2) // 2)
    list(predict_paths(model, paths[: batch * 2], batch_size=batch))  # warm-up
    x = _input(model, batch)
    full, rest = divmod(len(paths), batch)

    def plain() -> None:
        for _ in range(full):
            predict_logits(model, x)
        if rest:
            predict_logits(model, x[:rest])

    def app_path() -> None:
        for _ in predict_paths(model, paths, batch_size=batch, workers=workers):
            pass

    plain_s, app_s = [], []
    for _ in range(repeats):
        plain_s.append(median_seconds(plain, model.device, 1, 0))
        app_s.append(median_seconds(app_path, model.device, 1, 0))
    rate = len(paths) / statistics.median(app_s)
    return rate, statistics.median(plain_s) / statistics.median(app_s)


def bench_train(model: LoadedModel, steps: int, batch: int) -> dict[str, float]:
    from cxr_core.imaging.preprocess import normalise, to_network_input
    from cxr_core.training.augment import AugmentConfig, augment

    network = copy.deepcopy(model.network).train().requires_grad_(True)
    device = model.device
    channels_last = device.type == "cuda"
    if channels_last:
        network = network.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4)
    size = model.manifest.input.size[0]
    pixels = np.random.default_rng(0).integers(0, 255, (batch * 4, size, size), dtype=np.uint8)
    labels = torch.zeros(batch, dtype=torch.long)
    config = AugmentConfig()
    data_time = step_time = 0.0
    for step in range(steps + 1):
        start = time.perf_counter()
        generator = torch.Generator().manual_seed(step)
        idx = np.sort(np.random.default_rng(step).choice(len(pixels), batch, replace=False))
        x = to_network_input(augment(normalise(torch.from_numpy(pixels[idx])), config, generator), model.manifest.input).to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        _sync(device)
        prepared = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = network(x).float()
        loss = torch.nn.functional.cross_entropy(logits, labels.to(device)) if logits.shape[1] > 1 else logits.mean()
        loss.backward()
        optimizer.step()
        _sync(device)
        if step:  # the first step pays for allocations
            data_time += prepared - start
            step_time += time.perf_counter() - start
    return {"train_images_per_s": steps * batch / step_time, "train_data_fraction": data_time / step_time}


def app_rss_mb(model_keys: list[str]) -> float:
    """Peak RSS of a fresh process that loads every model and uses each once (what the app holds)."""
    code = (
        "import resource, sys\n"
        "from cxr_core.models.loading import resolve_model, load_model\n"
        "from cxr_core.explain.cam import explain\nfrom cxr_core.inference import predict\nfrom cxr_core.imaging.io import read_image\n"
        "import numpy as np\nimport streamlit, plotly, pandas\n"
        "image = read_image(sys.argv[1])\n"
        "for key in sys.argv[2:]:\n"
        "    m = load_model(resolve_model(key).path)\n"
        "    predict(m, [image]); explain(m, image)\n"
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec, so a child of a big parent
        # would report the parent's size.
        "print(next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:')) / 1024"
        " if sys.platform.startswith('linux') else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(_study()), *model_keys], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    return float(out.stdout.strip().splitlines()[-1])


def bench_grid(model: LoadedModel, study: Path, repeats: int, warmup: int) -> float:
    """The Compare page's 3x3 grid (Grad-CAM, Grad-CAM++, HiResCAM x every class) on one
    read study, maps and overlays at the page's panel size: seconds until it can be drawn."""
    from cxr_core.explain.compare import compute_grid, grid_specs, overlays, scale_panels
    from cxr_core.imaging.io import read_image

    image = read_image(study.read_bytes())  # read once on upload, as the page does
    key = model.manifest.key
    models = {key: model}
    classes = list(model.manifest.classes)
    specs = grid_specs("method", ["gradcam", "gradcam++", "hirescam"], models, studies=1, model=key, method="gradcam",
                       target=classes[0], row_axis="class", row_values=classes)

    def once() -> None:
        panels = compute_grid(specs, models, [image], display_side=512)
        scaled, _ = scale_panels(panels, shared=True)
        overlays(panels, [image], scaled, colormap="jet", opacity=0.4, threshold=0.0)
        _sync(model.device)

    return median_seconds(once, model.device, repeats, warmup)


def _study() -> Path:
    import data_store

    return Path(data_store.__file__).parent / "data" / "RG1_J2KR.dcm"


def run(model_keys: list[str] | None, smoke: bool, folder: Path | None) -> dict[str, Any]:
    repeats, warmup = (1, 0) if smoke else (7, 2)
    keys = model_keys or [m.manifest.key for m in installed_models() if m.manifest]
    device = select_device()
    result: dict[str, Any] = {
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else f" ({os.cpu_count()} CPU threads, torch {torch.get_num_threads()})"),
        "smoke": smoke, "forward_s": {}, "forward_batch_images_per_s": {}, "best_batch": {}, "all_class_cam_over_forward": {},
        "naive_cam_over_forward": {}, "e2e_single_study_s": {}, "e2e_stages_s": {}, "batch_images_per_s": {},
        "batch_over_forward_rate": {}, "train_images_per_s": {}, "train_data_fraction": {}, "compare_grid_s": {},
    }
    bench_folder, folder_note = _folder(folder, 16 if smoke else 128)
    result["batch_folder"] = folder_note
    loaded_keys: list[str] = []
    for requested in keys:
        model = load_model(resolve_model(requested).path)
        # Report under the full id@version so results from different versions never merge.
        key = model.manifest.key
        loaded_keys.append(key)
        fwd = bench_forward(model, repeats, warmup, (2,) if smoke else (8, 16, 32, 64) if device.type == "cuda" else (8, 16, 32))
        result["forward_s"][key] = fwd["forward_s"]
        result["forward_batch_images_per_s"][key] = fwd["forward_batch_images_per_s"]
        result["best_batch"][key] = fwd["best_batch"]
        cam = bench_cam(model, fwd["forward_s"], repeats, warmup)
        result["all_class_cam_over_forward"][key] = cam["all_class_cam_over_forward"]
        result["naive_cam_over_forward"][key] = cam["naive_cam_over_forward"]
        e2e = bench_e2e(model, _study(), repeats if not smoke else 1, warmup)
        result["e2e_single_study_s"][key] = e2e["e2e_single_study_s"]
        result["e2e_stages_s"][key] = e2e["stages_s"]
        result["compare_grid_s"][key] = bench_grid(model, _study(), repeats if not smoke else 1, warmup)
        rate, ratio = bench_batch(model, bench_folder, fwd["best_batch"], 1 if smoke else 3)
        result["batch_images_per_s"][key] = rate
        result["batch_over_forward_rate"][key] = ratio
        train = bench_train(model, 2 if smoke else 8, 4 if smoke else 16)
        result["train_images_per_s"][key] = train["train_images_per_s"]
        result["train_data_fraction"][key] = train["train_data_fraction"]
        del model
    result["app_rss_mb"] = app_rss_mb(loaded_keys)
    return result


def table(result: dict[str, Any]) -> str:
    lines = [f"device: {result['device']}{'  (SMOKE: figures meaningless)' if result['smoke'] else ''}", f"batch folder: {result['batch_folder']}", ""]
    header = f"{'model':34} {'fwd b1 ms':>10} {'fwd img/s':>10} {'CAM/fwd':>8} {'naive/fwd':>9} {'e2e s':>7} {'batch img/s':>11} {'batch/fwd':>9} {'train img/s':>11} {'data %':>7}"
    lines.append(header)
    for key in result["forward_s"]:
        lines.append(
            f"{key:34} {result['forward_s'][key] * 1000:10.1f} {result['forward_batch_images_per_s'][key]:10.1f} "
            f"{result['all_class_cam_over_forward'][key]:8.2f} {result['naive_cam_over_forward'][key]:9.2f} {result['e2e_single_study_s'][key]:7.3f} "
            f"{result['batch_images_per_s'][key]:11.1f} {result['batch_over_forward_rate'][key]:9.2f} {result['train_images_per_s'][key]:11.1f} "
            f"{100 * result['train_data_fraction'][key]:6.1f}%"
        )
    lines += ["", "end-to-end stages (s): " + json.dumps({k: {s: round(v, 3) for s, v in st.items()} for k, st in result["e2e_stages_s"].items()}),
              "Compare page 3x3 grid on the 2k study (3 gradient methods x classes), s: " + json.dumps({k: round(v, 3) for k, v in result["compare_grid_s"].items()}),
              f"app process peak RSS with all models: {result['app_rss_mb']:.0f} MB"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cxr_core.bench")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="one tiny pass of everything (CI)")
    parser.add_argument("--model", action="append", help="model id (repeatable; default: every installed model)")
    parser.add_argument("--folder", type=Path, help="images for the batch test (default: ../shared/data/cxr/test if present)")
    args = parser.parse_args(argv)
    default = Path(__file__).resolve().parents[2] / "shared" / "data" / "cxr" / "test"
    result = run(args.model, args.smoke, args.folder or (default if default.is_dir() else None))
    print(json.dumps(result, default=str) if args.json else table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

