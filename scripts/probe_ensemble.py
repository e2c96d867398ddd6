"""Would averaging the two shipped classifiers call fewer films of an unseen source COVID-19?

    python scripts/probe_ensemble.py --models densenet121-covid3 resnet50-covid-binary \
        --validation ../shared/data/cxr:val --held-out ../shared/data/cxr-extra [--json OUT]

Each model gives its calibrated p(COVID-19) (temperature applied; the app's own preprocessing,
without the input gate) for every film of the validation folder and of the held-out folders.
Reported, per held-out source: films called COVID-19 by each model at its own shipped
threshold, and by three combinations whose thresholds are chosen on the validation folder's
COVID-19 films for sensitivity ``--target-sensitivity`` (the rule the shipped thresholds
follow): the mean of the probabilities, both models agreeing (the smaller), either (the larger).
Each rule's held-out AUROC (COVID-19 against every other label) is printed too.
Nothing here is fitted on the held-out folders; they must be sources no model here trained on.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cxr_core.errors import CxrError  # noqa: E402
from cxr_core.imaging.io import read_image  # noqa: E402
from cxr_core.imaging.preprocess import to_batch  # noqa: E402
from cxr_core.inference import decide, logits_to_probabilities, predict_logits  # noqa: E402
from cxr_core.models.loading import LoadedModel, load_model, resolve_model  # noqa: E402
from cxr_core.training.calibration import choose_threshold  # noqa: E402
from cxr_core.training.dataset import scan_folder  # noqa: E402

POSITIVE = "covid"


def _records(target: str) -> list:
    folder, _, split = target.partition(":")
    return [r for r in scan_folder(folder) if not split or r.split == split]


def p_covid(model: LoadedModel, paths: list[Path], batch_size: int = 32,
            transform: Callable[[np.ndarray], np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Calibrated p(COVID-19) of each readable film, shape (N,), and whether the model's own
    threshold calls it, shape (N,) bool; NaN / False for a film that cannot be read.
    ``transform``: applied to each film's pixels ((H, W) float32 in [0, 1]) before preprocessing."""
    index = model.manifest.classes.index(POSITIVE)
    probs = np.full(len(paths), np.nan)
    called = np.zeros(len(paths), bool)
    for start in range(0, len(paths), batch_size):
        images, keep = [], []
        for i, path in enumerate(paths[start : start + batch_size], start):
            try:
                pixels = read_image(path).pixels
                images.append(pixels if transform is None else transform(pixels))
                keep.append(i)
            except CxrError:
                continue
        if not images:
            continue
        with torch.inference_mode():
            logits = predict_logits(model, to_batch(images, model.manifest.input))
        for i, row in zip(keep, logits_to_probabilities(logits, model.manifest)):
            probs[i] = row[index]
            called[i] = decide(row, model.manifest) == POSITIVE
    return probs, called


def called_by_group(called: np.ndarray, groups: list[str]) -> dict[str, list[int]]:
    """{group: [films called COVID-19, films]} for ``called`` (N,) bool and each film's group (N,),
    groups in sorted order."""
    out = {}
    for group in sorted(set(groups)):
        mask = np.array([g == group for g in groups])
        out[group] = [int(called[mask].sum()), int(mask.sum())]
    return out


def held_out_auroc(score: np.ndarray, positive: np.ndarray) -> float | None:
    """AUROC of scores (N,) (NaN: unreadable, left out) for ``positive`` (N,) bool, rounded; None
    when one side is empty."""
    ok = ~np.isnan(score)
    if positive[ok].all() or not positive[ok].any():
        return None
    return round(float(roc_auc_score(positive[ok], score[ok])), 4)


def threshold_on_validation(score: np.ndarray, positive: np.ndarray, target_sensitivity: float) -> tuple[float, dict[str, Any]]:
    """The COVID-19 threshold chosen on validation scores (N,) (NaN: unreadable, left out) for
    ``target_sensitivity``, as the shipped thresholds are, and the report's entry: that threshold
    and the validation sensitivity and specificity it gives, rounded."""
    ok = ~np.isnan(score)
    threshold = float(choose_threshold(score[ok], positive[ok], target_sensitivity))
    return threshold, {"threshold": round(threshold, 4),
                       "validation_sensitivity": round(float((score[ok & positive] >= threshold).mean()), 4),
                       "validation_specificity": round(float((score[ok & ~positive] < threshold).mean()), 4)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs=2, required=True)
    parser.add_argument("--validation", required=True, metavar="FOLDER[:SPLIT]")
    parser.add_argument("--held-out", nargs="+", required=True, metavar="FOLDER[:SPLIT]")
    parser.add_argument("--target-sensitivity", type=float, default=0.95)
    parser.add_argument("--json")
    args = parser.parse_args()

    val = _records(args.validation)
    held = [r for target in args.held_out for r in _records(target)]
    val_positive = np.array([r.label == POSITIVE for r in val])
    groups = [f"{r.source}/{r.label}" for r in held]
    held_positive = np.array([r.label == POSITIVE for r in held])
    p_val, p_held, own_called = [], [], []
    for model_id in args.models:
        model = load_model(resolve_model(model_id).path)
        p_val.append(p_covid(model, [r.path for r in val])[0])
        probs, called = p_covid(model, [r.path for r in held])
        p_held.append(probs)
        own_called.append(called)

    report: dict[str, dict] = defaultdict(dict)
    for name, called, probs in zip(args.models, own_called, p_held):
        report[f"{name} (own threshold)"] = {"threshold": None, "validation_sensitivity": None, "held_out": called_by_group(called, groups),
                                             "held_out_auroc": held_out_auroc(probs, held_positive)}
    for rule, combine in (("mean", np.mean), ("both (min)", np.min), ("either (max)", np.max)):
        score_held = combine(np.stack(p_held), axis=0)
        threshold, entry = threshold_on_validation(combine(np.stack(p_val), axis=0), val_positive, args.target_sensitivity)
        entry["held_out"] = called_by_group(score_held >= threshold, groups)
        entry["held_out_auroc"] = held_out_auroc(score_held, held_positive)
        report[rule] = entry
    for name, entry in report.items():
        total = sum(v[0] for v in entry["held_out"].values()), sum(v[1] for v in entry["held_out"].values())
        extra = "" if entry["threshold"] is None else f" threshold {entry['threshold']:.3f}, validation sensitivity {entry['validation_sensitivity']:.3f}"
        parts = ", ".join(f"{g} {c}/{n}" for g, (c, n) in entry["held_out"].items())
        print(f"{name:45s} held-out called COVID-19 {total[0]}/{total[1]} ({parts}){extra}, held-out AUROC {entry['held_out_auroc']}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
