"""Rewrite a model folder's card (README.md) from its manifest, after a measurement.

    python scripts/refresh_model_card.py weights/ID [--abstention DATA_DIR [--split test]]

Keeps the card's data checks and its hand-written reviewer's note, and adds the report of
``scripts/measure_gate.py`` when ``gate_measurement.json`` is in the folder. With
``--abstention``, first measures how the app's "uncertain" rule behaves on that split
(through the app's own reading and prediction path, as ``python -m cxr_core evaluate``
does) and stores it in the manifest's metrics for that split; for a split the training left
sealed (``train --seal-test``) it stores that split's whole evaluation, which unseals it.
The weights are not touched.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cxr_core.models.loading import load_model, update_manifest  # noqa: E402
from cxr_core.models.manifest import read_manifest  # noqa: E402
from cxr_core.training.evaluate import evaluate_folder  # noqa: E402
from cxr_core.training.finalize import refresh_model_card  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--abstention", type=Path, default=None, help="labelled data (train/val/test folders) to measure abstention on")
    parser.add_argument("--split", default="test")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.abstention:
        model = load_model(args.folder)
        measured = evaluate_folder(model, args.abstention, split=args.split)
        if measured.abstention is None:
            raise SystemExit("no abstention figures came back")
        manifest = read_manifest(args.folder)
        metrics = {**manifest.metrics}
        if "accuracy" in metrics.get(args.split, {}):
            # Training's own figures for the split stay as they were; only abstention is added.
            metrics[args.split] = {**metrics[args.split], "abstention": measured.abstention.as_dict()}
        else:
            # A split sealed at training (train --seal-test) or never evaluated: this is its evaluation.
            metrics[args.split] = measured.as_dict()
        metrics.pop(f"{args.split}_sealed", None)
        update_manifest(args.folder, replace(manifest, metrics=metrics))
        logging.info("abstention on %s (n = %d): %s", args.split, measured.n, measured.abstention.as_dict())
    refresh_model_card(args.folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
