"""Films of held-out sources a model calls COVID-19 at its shipped threshold and at the threshold
re-chosen, without the 0.5 cap, for a validation COVID-19 sensitivity.

    python scripts/probe_threshold.py --model resnet50-covid-binary --validation ../shared/data/cxr:val \
        --held-out ../shared/data/cxr-extra [--target-sensitivity 0.95] [--json OUT]

p(COVID-19) is calibrated with the model's own temperature, through the app's preprocessing
(without the input gate). The threshold is chosen on the validation folder's COVID-19 films
only; nothing is fitted on the held-out folders, which must be sources the model never saw.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cxr_core.models.loading import load_model, resolve_model  # noqa: E402
from cxr_core.training.calibration import choose_threshold  # noqa: E402
from scripts.probe_ensemble import POSITIVE, _records, p_covid  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--validation", required=True, metavar="FOLDER[:SPLIT]")
    parser.add_argument("--held-out", nargs="+", required=True, metavar="FOLDER[:SPLIT]")
    parser.add_argument("--target-sensitivity", type=float, default=0.95)
    parser.add_argument("--json")
    args = parser.parse_args()

    model = load_model(resolve_model(args.model).path)
    shipped = model.manifest.thresholds.get(POSITIVE)
    val = [r for r in _records(args.validation) if r.label == POSITIVE]
    p_val = p_covid(model, [r.path for r in val])[0]
    p_val = p_val[~np.isnan(p_val)]
    uncapped = choose_threshold(p_val, np.ones(len(p_val), bool), args.target_sensitivity, cap=1.0)
    held = [r for target in args.held_out for r in _records(target)]
    p_held = p_covid(model, [r.path for r in held])[0]
    groups = sorted({f"{r.source}/{r.label}" for r in held})
    result = {"model": model.manifest.key, "shipped_threshold": shipped, "uncapped_threshold": round(float(uncapped), 4),
              "validation_covid": len(p_val), "held_out": {}}
    for group in groups:
        mask = np.array([f"{r.source}/{r.label}" == group for r in held])
        p = p_held[mask]
        result["held_out"][group] = {"n": int(mask.sum()), "called_at_shipped": int((p >= shipped).sum()),
                                     "called_uncapped": int((p >= uncapped).sum())}
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
