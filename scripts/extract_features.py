"""Pooled features and logits of a shipped model on labelled folders, through the app's own
reading and preprocessing, for last-layer experiments (docs/experiments/2026-12-05-last-layer-loso.md).

    python scripts/extract_features.py --model densenet121-covid3 --out var/features/densenet.npz \
        ../shared/data/cxr ../shared/data/cxr-extra ../shared/data/cxr-external/jsrt

The .npz holds ``features`` (N, C) float32, ``logits`` (N, K) float32 and, per film, ``path``,
``split``, ``label``, ``source``, ``patient`` and ``folder`` (the FOLDER argument's name). Unreadable
files are logged and left out. Nothing is fitted here.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cxr_core.errors import CxrError  # noqa: E402
from cxr_core.imaging.io import read_image  # noqa: E402
from cxr_core.imaging.preprocess import to_batch  # noqa: E402
from cxr_core.inference import predict_with_features  # noqa: E402
from cxr_core.models.loading import load_model, resolve_model  # noqa: E402
from cxr_core.training.dataset import scan_folder  # noqa: E402

log = logging.getLogger("extract_features")


def _cap_train(records: list, n: int) -> list:  # type: ignore[type-arg]
    """Every val/test record, and at most ``n`` train records per (source, label), by a stable hash."""
    groups: dict[tuple[str, str], list] = {}  # type: ignore[type-arg]
    for r in records:
        if r.split == "train":
            groups.setdefault((r.source or "", r.label), []).append(r)
    keep = {id(r) for g in groups.values() for r in sorted(g, key=lambda r: hashlib.sha256(str(r.path.name).encode()).hexdigest())[:n]}
    return [r for r in records if r.split != "train" or id(r) in keep]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--model", default=None)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--train-per-group", type=int, default=0, metavar="N",
                        help="at most N train films per (source, label), chosen by a hash of the path (0: all); val and test are whole")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    model = load_model(resolve_model(args.model).path)
    columns: dict[str, list[str]] = {k: [] for k in ("path", "split", "label", "source", "patient", "folder")}
    features: list[np.ndarray] = []
    logits: list[np.ndarray] = []

    def read(path: Path):  # type: ignore[no-untyped-def]
        try:
            return read_image(path).pixels
        except CxrError as exc:
            log.warning("unreadable %s: %s", path.name, exc)
            return None

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=2) as pool:
        for folder in args.folders:
            records = scan_folder(folder)
            if args.train_per_group:
                records = _cap_train(records, args.train_per_group)
            log.info("%s: %d films", folder, len(records))
            for start in range(0, len(records), args.batch_size):
                chunk = records[start : start + args.batch_size]
                pairs = [(r, px) for r, px in zip(chunk, pool.map(read, [r.path for r in chunk])) if px is not None]
                batch = to_batch([px for _, px in pairs], model.manifest.input)
                out, pooled = predict_with_features(model, batch)
                logits.append(out.numpy())
                features.append(pooled)
                for record, _ in pairs:
                    columns["path"].append(str(record.path.relative_to(folder)))
                    columns["split"].append(record.split or "")
                    columns["label"].append(record.label)
                    columns["source"].append(record.source or folder.name)
                    columns["patient"].append(record.patient_id or record.path.stem)
                    columns["folder"].append(folder.name)
                if (start // args.batch_size) % 20 == 0:
                    done = sum(len(f) for f in features)
                    log.info("%d films, %.1f films/s", done, done / (time.monotonic() - started))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        args.out, features=np.concatenate(features), logits=np.concatenate(logits),
        model=np.array(model.manifest.key), **{k: np.array(v) for k, v in columns.items()},
    )
    log.info("wrote %s: %d films in %.0f s", args.out, sum(len(f) for f in features), time.monotonic() - started)


if __name__ == "__main__":
    main()
