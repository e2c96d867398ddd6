"""Build the made-up sites that site adaptation (issue 31) is measured on, from the shared data.

    python scripts/build_sites.py var/sites [--data ../shared/data]

Each site is a labelled folder (symbolic links to the shared films and a metadata.csv with their
patient ids, no split: ``adapt`` splits a site's patients in half); each replay folder is the shared
``train`` and ``val`` splits less the films its site took, so that no replayed film is a site film.
Films are taken in order of their path in the shared folder, as the notebook drew them:

- ``mixed``: the 1st-130th validation COVID-19 films, `openist` normals and NIH pneumonias
  (`docs/experiments/2026-12-05-site-adaptation-openist.md`); replay ``replay-cxr``;
- ``mixed2``: the 131st-260th of each (`openist`: the 144 left)
  (`docs/experiments/2026-12-05-adapt-replay-validation.md`); replay ``replay-cxr2``;
- ``jsrt-covid``: the 261st-353rd validation COVID-19 films, the first 53 JSRT normals and the first
  54 JSRT nodules (`docs/experiments/2026-12-06-adapt-jsrt-site.md`); replay ``replay-cxr3``;
- ``jsrt``: every JSRT film; replay the shared folder itself.

JSRT is a hospital no shipped model may be fitted or selected on: a site built from it measures
``adapt``, and the models adapted there are never shipped.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cxr_core.training.dataset import Record, scan_folder  # noqa: E402

SITES: dict[str, dict[str, tuple[int, int]]] = {
    # group -> (first, last) in path order, 1-based and inclusive
    "mixed": {"covid": (1, 130), "openist": (1, 130), "nih": (1, 130)},
    "mixed2": {"covid": (131, 260), "openist": (131, 274), "nih": (131, 260)},
    "jsrt-covid": {"covid": (261, 353), "jsrt-normal": (1, 53), "jsrt-nodule": (1, 54)},
    "jsrt": {"jsrt-normal": (1, 93), "jsrt-nodule": (1, 154)},
}
REPLAY = {"mixed": "replay-cxr", "mixed2": "replay-cxr2", "jsrt-covid": "replay-cxr3"}


def _in_path_order(records: list[Record]) -> list[Record]:
    # By path in the shared folder (``test/...`` before ``train/...``), as the notebook's sites were
    # drawn: this order gives the held-out halves it reports (mixed: 61 normals, 53 pneumonias).
    return sorted(records, key=lambda r: str(r.path))


def groups(data: Path, cxr: list[Record]) -> dict[str, list[Record]]:
    """The shared films a site draws from, each group in path order; ``cxr``: the records of ``data/cxr``."""
    extra = scan_folder(data / "cxr-extra")
    jsrt = scan_folder(data / "cxr-external" / "jsrt")
    return {
        "covid": _in_path_order([r for r in cxr if r.split == "val" and r.label == "covid"]),
        "openist": _in_path_order([r for r in extra if r.source == "openist"]),
        "nih": _in_path_order([r for r in extra if r.source == "nih_pneumonia"]),
        "jsrt-normal": _in_path_order([r for r in jsrt if r.label == "normal"]),
        "jsrt-nodule": _in_path_order([r for r in jsrt if r.label == "nodule"]),
    }


def _write(folder: Path, records: list[Record], with_split: bool) -> None:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    rows = []
    for r in records:
        link = folder / r.label / r.path.name
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink():
            raise SystemExit(f"two films named {r.path.name} under {r.label}: {folder} cannot hold both")
        link.symlink_to(r.path.resolve())
        row = {"file": f"{r.label}/{r.path.name}", "label": r.label, "source": r.source or "",
               "patient_id": r.patient_id or ""}
        if with_split:
            row["split"] = r.split or ""
        rows.append(row)
    with open(folder / "metadata.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["file", "label", "source", "patient_id"] + (["split"] if with_split else []))
        writer.writeheader()
        writer.writerows(rows)


def build(out: Path, data: Path) -> dict[str, int]:
    """Every site and replay folder under ``out``; returns films per folder."""
    everything = scan_folder(data / "cxr")
    pool = groups(data, everything)
    cxr = [r for r in everything if r.split in ("train", "val")]
    counts: dict[str, int] = {}
    for site, spec in SITES.items():
        films = [r for group, (first, last) in spec.items() for r in pool[group][first - 1 : last]]
        _write(out / site, films, with_split=False)
        counts[site] = len(films)
        if site in REPLAY:
            taken = {r.path.resolve() for r in films}
            replay = [r for r in cxr if r.path.resolve() not in taken]
            _write(out / REPLAY[site], replay, with_split=True)
            counts[REPLAY[site]] = len(replay)
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--data", default="../shared/data")
    args = parser.parse_args()
    for folder, n in build(Path(args.out), Path(args.data)).items():
        sys.stdout.write(f"{folder}: {n} films\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
