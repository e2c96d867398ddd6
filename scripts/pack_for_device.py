"""Split a labelled data folder into parts small enough to send to a lent GPU machine.

    python scripts/pack_for_device.py ../shared/data/cxr --labels covid,normal,viral_pneumonia \
        [--out .devdata] [--part-mib 40] [--splits train,val,test]

Why: the machine a session is sometimes lent takes the working tree plus at most 64 MiB per
call, and the tracked tree alone is about 61 MiB (the two default models' weights). The
shared 3-class train, val and test JPEGs are about 87 MB, so they travel in parts, one per
call, each under its own folder ``.devdata/pN`` (ignored by git), while the model folders
are moved out of the working tree for those calls (they are tracked, so they travel too).

Each part keeps the data folder's own layout (``split/label/file``) and holds the
``metadata.csv`` rows of every packed file, so the parts copied into one folder on the
machine (``cp -r .devdata/pN/. /tmp/cxr/``, one call each, back to back: a machine goes
back 30 s after a call) rebuild exactly the folder the CPU runs train from: the test split
is packed too because the pipeline removes near-duplicates across splits, and without it
the training set would differ. ``EXPECTED`` in every part says how many images make the
whole, so the training call can refuse to start on a partial copy.

No image is changed: files are copied byte for byte. Checked on the shared data: the three
3-class splits packed in two parts of at most 45 MiB (46.1 and 38.9 MiB with metadata) and
copied back into one folder give the same prepared sets as the original folder (train 7085,
val 853, test 1051 films, the same files, labels, patients and sources).

On the machine (python3 there has torch, torchvision, scikit-learn, pandas and opencv, but
not plotly: send its wheel in ``.whl`` as the device notes say), after ``mv weights`` out of
the working tree here (move it back afterwards):

1. carry ``.devdata/p1``: ``mkdir -p /tmp/cxr && cp -r .devdata/p1/. /tmp/cxr/``
2. at once, carry ``.devdata/p2`` and ``.whl``: install the wheels into ``/tmp/site``, then
   ``cp -r .devdata/p2/. /tmp/cxr/``; compare ``find /tmp/cxr -type f ! -name metadata.csv
   ! -name EXPECTED | wc -l`` with ``EXPECTED`` and stop if they differ (the machine was
   replaced between calls); then ``python3 -m cxr_core -v train /tmp/cxr ... --device cuda
   --workers 16 --out /tmp/m/ID`` and ``tar czf $OUT/model.tgz -C /tmp/m ID`` (a model folder
   is more files than come back from a call).
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
from pathlib import Path

METADATA = "metadata.csv"


def select_files(root: Path, labels: list[str], splits: list[str]) -> list[Path]:
    """Images under ``root/split/label`` for the asked splits and labels, relative to ``root``, sorted."""
    chosen = []
    for split in splits:
        for label in labels:
            folder = root / split / label
            if not folder.is_dir():
                raise SystemExit(f"{folder} is not a folder: check --labels and --splits.")
            chosen += [p.relative_to(root) for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")]
    return chosen


def assign_parts(root: Path, files: list[Path], part_bytes: int) -> list[list[Path]]:
    """Files in order, a new part whenever the next file would take a part over ``part_bytes``."""
    parts: list[list[Path]] = [[]]
    used = 0
    for rel in files:
        size = (root / rel).stat().st_size
        if size > part_bytes:
            raise SystemExit(f"{rel} alone ({size} bytes) is larger than a part: raise --part-mib.")
        if used + size > part_bytes and parts[-1]:
            parts.append([])
            used = 0
        parts[-1].append(rel)
        used += size
    return parts


def pack(root: Path, labels: list[str], splits: list[str], out: Path, part_bytes: int) -> list[Path]:
    """Write ``out/p1``, ``out/p2``, ... and return their folders. ``out`` is emptied first."""
    files = select_files(root, labels, splits)
    if not files:
        raise SystemExit("No images matched.")
    wanted = {f.as_posix() for f in files}
    rows: list[dict[str, str]] = []
    fieldnames: list[str] = []
    if (root / METADATA).is_file():
        with open(root / METADATA, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            fieldnames = list(reader.fieldnames or [])
            rows = [row for row in reader if row.get("file") in wanted]
    if out.exists():
        # Emptied only when it holds nothing but earlier parts: a mistyped --out must not
        # delete someone's folder.
        strays = [p.name for p in out.iterdir() if not (p.is_dir() and p.name[:1] == "p" and p.name[1:].isdigit())]
        if strays:
            raise SystemExit(f"{out} holds more than earlier parts ({', '.join(sorted(strays)[:3])}...): choose another --out.")
        shutil.rmtree(out)
    folders = []
    for number, part in enumerate(assign_parts(root, files, part_bytes), start=1):
        folder = out / f"p{number}"
        for rel in part:
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(root / rel, folder / rel)
        if rows:
            with open(folder / METADATA, "w", newline="", encoding="utf-8") as handle:
                writer = csv.DictWriter(handle, fieldnames=fieldnames)
                writer.writeheader()
                writer.writerows(rows)
        (folder / "EXPECTED").write_text(f"{len(files)}\n")
        folders.append(folder)
    return folders


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--labels", required=True, help="label folders to pack, comma-separated")
    parser.add_argument("--splits", default="train,val,test")
    parser.add_argument("--out", type=Path, default=Path(".devdata"))
    parser.add_argument("--part-mib", type=float, default=40.0)
    args = parser.parse_args(argv)
    folders = pack(args.data, args.labels.split(","), args.splits.split(","), args.out, int(args.part_mib * 2**20))
    for folder in folders:
        images = [p for p in folder.rglob("*") if p.is_file() and p.parent != folder]
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        sys.stdout.write(f"{folder}: {len(images)} images, {size / 2**20:.1f} MiB\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
