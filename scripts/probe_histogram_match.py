"""Would mapping every film's grey levels onto one reference histogram make the shipped networks
call fewer films of an unseen source COVID-19? (docs/experiments/2026-12-06-histogram-match-loso.md)

    python scripts/probe_histogram_match.py --models densenet121-covid3 resnet50-covid-binary \
        --reference ../shared/data/cxr:train --validation ../shared/data/cxr:val \
        --held-out ../shared/data/cxr-extra [--json OUT]

The reference is the mean quantile function (256 levels) of ``--films`` films of the reference
folder (a seeded sample). Each film is mapped by rank onto it; the threshold is chosen on the mapped
validation films for ``--target-sensitivity`` (capped as the shipped thresholds are). Reported per
model: held-out films called COVID-19 as shipped, and mapped. Nothing is fitted on the held-out folders.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from probe_ensemble import POSITIVE, _records, called_by_group, p_covid, threshold_on_validation  # noqa: E402

from cxr_core.imaging.io import read_image  # noqa: E402
from cxr_core.models.loading import load_model, resolve_model  # noqa: E402

LEVELS = np.linspace(0.0, 1.0, 256)


def reference_quantiles(paths: list[Path]) -> np.ndarray:
    """(256,) mean over films of each film's grey-level quantiles at LEVELS."""
    return np.mean([np.quantile(read_image(p).pixels, LEVELS) for p in paths], axis=0)


def matcher(reference: np.ndarray):  # type: ignore[no-untyped-def]
    def match(pixels: np.ndarray) -> np.ndarray:
        """(H, W) in [0, 1] -> the same film with its grey levels replaced, by rank, by the reference's."""
        flat = pixels.ravel()
        order = np.argsort(flat, kind="stable")
        ranks = np.empty(flat.size, np.float64)
        ranks[order] = np.arange(flat.size) / max(flat.size - 1, 1)
        # Equal grey levels share one output value (the mean rank), so flat areas stay flat.
        values, inverse = np.unique(flat, return_inverse=True)
        mean_rank = np.bincount(inverse, ranks) / np.bincount(inverse)
        return np.interp(mean_rank, LEVELS, reference)[inverse].reshape(pixels.shape).astype(np.float32)

    return match


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", required=True)
    parser.add_argument("--reference", required=True, metavar="FOLDER[:SPLIT]")
    parser.add_argument("--films", type=int, default=1000)
    parser.add_argument("--validation", required=True, metavar="FOLDER[:SPLIT]")
    parser.add_argument("--held-out", nargs="+", required=True, metavar="FOLDER[:SPLIT]")
    parser.add_argument("--target-sensitivity", type=float, default=0.95)
    parser.add_argument("--json")
    args = parser.parse_args()

    pool = _records(args.reference)
    chosen = np.random.default_rng(0).choice(len(pool), min(args.films, len(pool)), replace=False)
    reference = reference_quantiles([pool[i].path for i in sorted(chosen)])
    match = matcher(reference)
    val = _records(args.validation)
    held = [r for target in args.held_out for r in _records(target)]
    val_positive = np.array([r.label == POSITIVE for r in val])
    groups = [f"{r.source}/{r.label}" for r in held]
    report: dict[str, object] = {"reference_quantiles": [round(float(v), 4) for v in reference[::32]], "models": {}}
    for model_id in args.models:
        model = load_model(resolve_model(model_id).path)
        _, shipped_called = p_covid(model, [r.path for r in held])
        p_val, _ = p_covid(model, [r.path for r in val], transform=match)
        p_held, _ = p_covid(model, [r.path for r in held], transform=match)
        threshold, entry = threshold_on_validation(p_val, val_positive, args.target_sensitivity)
        entry["shipped"] = called_by_group(shipped_called, groups)
        entry["matched"] = called_by_group(p_held >= threshold, groups)
        report["models"][model.manifest.key] = entry  # type: ignore[index]
        for name in ("shipped", "matched"):
            total = sum(v[0] for v in entry[name].values()), sum(v[1] for v in entry[name].values())
            parts = ", ".join(f"{g} {c}/{n}" for g, (c, n) in entry[name].items())
            print(f"{model.manifest.key} {name:8s} held-out called COVID-19 {total[0]}/{total[1]} ({parts})"
                  + (f" threshold {entry['threshold']:.3f}, validation sensitivity {entry['validation_sensitivity']:.3f}, "
                     f"specificity {entry['validation_specificity']:.3f}" if name == "matched" else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
