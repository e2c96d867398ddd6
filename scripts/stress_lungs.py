"""How often the lung check objects to real chest films made to look like another hospital's.

    python scripts/stress_lungs.py weights/lung-segmenter [OTHER_FOLDER ...]

The films and changes of ``scripts/stress_gate.py`` (300 films of the shared test split and of
``cxr-extra``, chosen by a hash of the file name), through the app's own lung path
(:func:`cxr_core.imaging.lungs.lung_views`, :func:`cxr_core.imaging.lungs.implausible_lungs`)
with each segmenter's own plausible range. An objection is a warning on its own, and it also
keeps a film whose features are a little far from being taken for a chest film
(:func:`cxr_core.imaging.gate.judge`). JSRT is never used here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import cv2

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import stress_gate  # noqa: E402

from cxr_core.imaging.io import read_image  # noqa: E402
from cxr_core.imaging.lungs import implausible_lungs, lung_views  # noqa: E402
from cxr_core.models.loading import load_segmenter  # noqa: E402

VARIANTS = ("as is", "CLAHE", "gamma 0.6", "96 px resolution", "white border 5%", "burned-in label")


def main() -> int:
    folders = [Path(a) for a in sys.argv[1:]] or [Path("weights/lung-segmenter")]
    arrays = [(p.name, cv2.imread(str(p), cv2.IMREAD_GRAYSCALE)) for _, p in stress_gate._films(150)]
    for folder in folders:
        segmenter = load_segmenter(folder, device="cpu")
        for variant in VARIANTS:
            change = stress_gate.VARIANTS[variant]
            pixels = [read_image(stress_gate._png(change(a)), name=name).pixels for name, a in arrays]
            objected = [name for (name, _), view in zip(arrays, lung_views(pixels, segmenter)) if implausible_lungs(view, segmenter)]
            print(f"{segmenter.key} {variant:>18}: lung check objects to {len(objected):3d} of {len(arrays)}  {objected[:8]}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
