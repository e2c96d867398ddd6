"""How often a model calls COVID-19 on films of each (source, label) group: the figure that
tells whether it holds up at hospitals it was not trained on.

    python scripts/measure_external.py --model densenet121-covid3 \
        ../shared/data/cxr-external/jsrt ../shared/data/cxr-extra:test ../shared/data/cxr:test [--json OUT]

Each FOLDER[:SPLIT] is a labelled folder (with metadata.csv for sources); every label is
counted, whether or not the model has a class of that name (a JSRT nodule is "not
COVID-19" all the same). "Called COVID-19" is the model's decision through the app's own
path (cxr_core.inference.predict: temperature, the COVID threshold, the same preprocessing);
the input gate is reported beside it (rejected films are counted, and their call too, so
that the two figures can be read apart).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cxr_core.errors import CxrError  # noqa: E402
from cxr_core.imaging.io import read_image  # noqa: E402
from cxr_core.inference import predict  # noqa: E402
from cxr_core.models.loading import load_model, resolve_model  # noqa: E402
from cxr_core.training.dataset import scan_folder  # noqa: E402


def measure(model_id: str | None, targets: list[str], batch_size: int = 32) -> dict[str, object]:
    model = load_model(resolve_model(model_id).path)
    positive = "covid"
    groups: dict[str, Counter[str]] = defaultdict(Counter)

    def read(record):  # type: ignore[no-untyped-def]
        try:
            return read_image(record.path)
        except CxrError:
            return None

    for target in targets:
        folder, _, split = target.partition(":")
        records = [r for r in scan_folder(folder) if not split or r.split == split]
        with ThreadPoolExecutor(max_workers=2) as pool:
            for start in range(0, len(records), batch_size):
                chunk = records[start : start + batch_size]
                pairs = list(zip(chunk, pool.map(read, chunk)))
                for record, image in pairs:
                    if image is None:
                        groups[f"{record.source or Path(folder).name}/{record.label}"]["unreadable"] += 1
                kept = [(r, im) for r, im in pairs if im is not None]
                for (record, _), result in zip(kept, predict(model, [im for _, im in kept], batch_size=batch_size)):
                    counts = groups[f"{record.source or Path(folder).name}/{record.label}"]
                    counts["n"] += 1
                    counts["called_covid"] += int(result.decision == positive)
                    counts[f"most_probable:{result.most_probable}"] += 1
                    counts[f"gate:{result.gate_outcome}"] += 1
    rows = {}
    for group, counts in sorted(groups.items()):
        n = counts["n"]
        rows[group] = {"n": n, "called_covid": counts["called_covid"], "called_covid_rate": round(counts["called_covid"] / n, 4) if n else None,
                       **{k: v for k, v in sorted(counts.items()) if ":" in k}}
    return {"model": model.key, "targets": targets, "groups": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("targets", nargs="+", metavar="FOLDER[:SPLIT]")
    parser.add_argument("--model")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args()
    result = measure(args.model, args.targets)
    print(f"{result['model']}: films called COVID-19, by source/label")
    for group, row in result["groups"].items():  # type: ignore[union-attr]
        print(f"  {group:32s} {row['called_covid']:5d} of {row['n']:5d} ({100 * (row['called_covid_rate'] or 0):.1f}%)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
