"""Rewrite a model folder's card (README.md) from its manifest, after a measurement.

    python scripts/refresh_model_card.py weights/ID [--abstention DATA_DIR [--split test]]

Keeps the card's data checks and its hand-written reviewer's note, and adds the report of
``scripts/measure_gate.py`` when ``gate_measurement.json`` is in the folder. With
``--abstention``, first measures how the app's "uncertain" rule behaves on that split
(through the app's own reading and prediction path, as ``python -m cxr_core evaluate``
does) and stores it in the manifest's metrics for that split; for a split the training left
sealed (``train --seal-test``) it stores that split's whole evaluation, which unseals it, and
draws that split's figures (confusion, ROC, reliability) into ``figures/``, as training does
for a split it evaluates. The weights are not touched.
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
from cxr_core.training import figures  # noqa: E402
from cxr_core.training.evaluate import score_folder  # noqa: E402
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
        scored = score_folder(model, args.abstention, split=args.split)
        measured = scored.metrics
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
            # Otherwise the Models page would show no figures for it, or an older version's.
            figures.save(figures.evaluation_figures(measured, scored.probs, scored.labels, model.manifest.classes, args.split), [args.folder / "figures"])
        metrics.pop(f"{args.split}_sealed", None)
        update_manifest(args.folder, replace(manifest, metrics=metrics))
        logging.info("abstention on %s (n = %d): %s", args.split, measured.n, measured.abstention.as_dict())
    refresh_model_card(args.folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
