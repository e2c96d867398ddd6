"""Does a heatmap point at what the model uses? ROAD scores against a random map.

ROAD (Rong et al. 2022, as implemented in pytorch-grad-cam's metrics): pixels are
removed and filled by noisy linear imputation, which avoids the out-of-distribution
artefacts of blacking them out.

* ``drop``: the target's probability minus its probability once the top ``fraction`` of
  the map's pixels is removed. A faithful map gives a large drop.
* ``keep``: the probability when only the top ``fraction`` is kept, minus the original.
  A faithful map loses little (close to 0 or positive).

The same two numbers for a random smooth map (same resolution as the CAM, fixed seed
per image) are the baseline: a map is informative when it beats it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from pytorch_grad_cam.metrics.road import NoisyLinearImputer, RemoveLeastRelevantFirst, RemoveMostRelevantFirst

from cxr_core.imaging.film import XrayImage
from cxr_core.imaging.preprocess import crop_box, lung_crop_boxes, to_input
from cxr_core.inference import logits_to_probabilities, predict_logits
from cxr_core.models.loading import LoadedModel


@dataclass(frozen=True)
class Faithfulness:
    target: str
    probability: float
    drop: float
    keep: float
    random_drop: float
    random_keep: float
    fraction: float

    @property
    def beats_random(self) -> bool:
        return self.drop > self.random_drop

    def describe(self) -> str:
        return (
            f"removing the top {self.fraction:.0%}: -{self.drop:.2f} (random map -{self.random_drop:.2f}); "
            f"keeping only it: {self.keep:+.2f} (random {self.random_keep:+.2f})"
        )


def random_map(shape: tuple[int, int], seed_text: str, cells: int = 7) -> np.ndarray:
    """A smooth random map: uniform noise on a cells x cells grid, upsampled (like a CAM)."""
    seed = int.from_bytes(hashlib.sha256(seed_text.encode()).digest()[:8], "big")
    coarse = np.random.default_rng(seed).random((cells, cells), dtype=np.float32)
    return cv2.resize(coarse, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)


def faithfulness(model: LoadedModel, image: XrayImage, heatmap: np.ndarray, target: str, fraction: float = 0.2) -> Faithfulness:
    """ROAD drop/keep of ``heatmap`` ((H, W) at any resolution, higher = more relevant) for ``target``."""
    manifest = model.manifest
    box = lung_crop_boxes([image.pixels], manifest.input)[0]
    x = to_input(image.pixels, manifest.input, box)  # (C, h, w)
    size = tuple(x.shape[-2:])
    # The map covers the film; the network saw the box (the whole film, or a lung crop).
    cam = cv2.resize(crop_box(np.asarray(heatmap, np.float32), box), (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
    rand = random_map(size, image.sha256 + target)  # type: ignore[arg-type]
    remove_top = RemoveMostRelevantFirst(100 * (1 - fraction), NoisyLinearImputer())
    keep_top = RemoveLeastRelevantFirst(100 * fraction, NoisyLinearImputer())
    # The imputer draws noise from torch's global generator: seed a private fork so scores
    # are reproducible and other users of the generator are unaffected.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(image.sha256[:8], 16))
        batch = torch.stack(
            [
                x,
                remove_top(x, torch.from_numpy(cam)),
                keep_top(x, torch.from_numpy(cam)),
                remove_top(x, torch.from_numpy(rand)),
                keep_top(x, torch.from_numpy(rand)),
            ]
        )
    probs = logits_to_probabilities(predict_logits(model, batch), manifest)[:, manifest.classes.index(target)]
    p0, p_cam_removed, p_cam_kept, p_rand_removed, p_rand_kept = (float(p) for p in probs)
    return Faithfulness(
        target=target,
        probability=p0,
        drop=p0 - p_cam_removed,
        keep=p_cam_kept - p0,
        random_drop=p0 - p_rand_removed,
        random_keep=p_rand_kept - p0,
        fraction=fraction,
    )
