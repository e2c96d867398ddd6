"""Batch augmentation on tensors, before normalisation.

Chosen for radiographs: small rotations, translations and zoom (patient positioning),
brightness/contrast/gamma (exposure and processing differ between sites), sharpness
(blur to unsharp-masking: detectors, grids and edge-enhancement settings differ, and on
the shared data Kermany's training normals are sharper than its pneumonias and than its
test normals, so an unaugmented model learns "sharp means normal"), Gaussian noise
(detector noise). Horizontal flips are off by default: they swap laterality
(the heart moves to the right), which is not a variation real films show.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentConfig:
    rotate_deg: float = 10.0
    translate: float = 0.08  # fraction of the side
    scale: tuple[float, float] = (0.9, 1.1)
    brightness: float = 0.1  # additive, on [0, 1] pixels
    contrast: float = 0.2  # multiplicative, 1 +/- this
    gamma: float = 0.2  # exponent 1 +/- this
    noise_std: float = 0.02  # upper bound of the per-image noise level
    hflip: bool = False
    #: x + s (x - blur(x)), s uniform in +/- this: -1 is a Gaussian blur of sigma
    #: SHARPNESS_SIGMA (at 224 px), positive values unsharp-mask
    sharpness: float = 1.0
    #: width/height stretch, log-uniform in [1/(1+a), 1+a]: the shared films were squeezed
    #: to a square from their own aspect ratios, which differ between sources and ages, so
    #: a body's proportions say something about where a film came from, not about the lungs
    aspect: float = 0.0
    #: each edge cropped away independently by up to this fraction of the side, the rest
    #: stretched back to the frame: collimation moves one edge at a time (neck in or out,
    #: abdomen in or out), which a centred zoom cannot show. On the shared data 1.3.0 calls
    #: most of Kermany's test-collection normals normal as framed, but cropping 10% off
    #: their top and bottom turns 100 of 234 viral, while its validation normals (drawn from
    #: Kermany's training collection) move 8 of 120
    edge_crop: float = 0.0
    #: probability of each acquisition artefact per film (black frame, local-contrast
    #: processing, a burned-in box, a lower resolution, a JPEG re-encode; see
    #: :func:`acquire`), 0 = off. Probed on 1.3.0 with `openist` normals (a source it never
    #: saw): a black frame of 8% of the side turned 271 of 274 COVID-19 (identity: 122)
    #: and 77 of 150 validation normals; CLAHE turned 267 of 274: films from the COVID-19
    #: collections differ from the normals in exactly these, so a model learns them as the
    #: disease unless every class shows them
    acquisition: float = 0.0
    #: the same probability for films of the positive class (the first training class,
    #: COVID-19); None = ``acquisition``. Meant to even out artefacts the public COVID-19 films
    #: already carry, without taking them off the films whose validation scores set the
    #: threshold. Measured with 0 (DenseNet121, 2 epochs from 1.3.1): unseen `openist` normals
    #: called COVID-19 rose from 74 to 151 of 239, their median p(COVID-19) from 0.13 to 0.37:
    #: what counts as "normal" moved toward the artefacts instead
    #: (docs/experiments/2026-12-06-densenet-acquisition-non-covid.md). Kept for experiments.
    acquisition_positive: float | None = None

    @classmethod
    def none(cls) -> "AugmentConfig":
        return cls(0.0, 0.0, (1.0, 1.0), 0.0, 0.0, 0.0, 0.0, False, 0.0, 0.0, 0.0, 0.0)


#: the widest edge crop the CLI and the Training page accept: beyond it lung apices and
#: bases start to leave the frame
MAX_EDGE_CROP = 0.3

#: the widest aspect stretch the CLI and the Training page accept: 0.5 already turns a
#: square film into a 1.5:1 one, wider than any chest film is squeezed from
MAX_ASPECT = 0.5


#: blur sigma, in pixels of a 224 px image, behind the sharpness augmentation: a blur of
#: 1.2 px turned a third of the validation normals "viral" in the first DenseNet121
SHARPNESS_SIGMA = 1.5


def _gaussian_blur(batch: torch.Tensor, sigma: float) -> torch.Tensor:
    """(N, 1, H, W) -> (N, 1, H, W), separable Gaussian, edges replicated."""
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=batch.dtype, device=batch.device)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    out = F.pad(batch, (radius, radius, radius, radius), mode="replicate")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1))
    return F.conv2d(out, kernel.view(1, 1, -1, 1))


def augment(batch: torch.Tensor, config: AugmentConfig, generator: torch.Generator, positive: torch.Tensor | None = None) -> torch.Tensor:
    """(N, 1, H, W) float in [0, 1] -> augmented (N, 1, H, W) in [0, 1]. Randomness from ``generator``.

    ``positive`` (N,) bool marks the films of the positive class, for
    ``config.acquisition_positive``; without it every film is drawn at ``config.acquisition``."""
    n = batch.shape[0]

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return torch.rand(n, generator=generator) * (hi - lo) + lo

    out = batch
    if config.rotate_deg or config.translate or config.scale != (1.0, 1.0) or config.hflip or config.aspect or config.edge_crop:
        angle = uniform(-config.rotate_deg, config.rotate_deg) * math.pi / 180
        zoom = uniform(*config.scale)
        tx, ty = uniform(-config.translate, config.translate) * 2, uniform(-config.translate, config.translate) * 2
        flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0) if config.hflip else torch.ones(n)
        zoom_x, zoom_y = zoom, zoom
        if config.aspect:
            # Drawn only when asked, so runs recorded without it replay the same stream.
            half = uniform(-1.0, 1.0) * math.log1p(config.aspect) / 2
            zoom_x, zoom_y = zoom * torch.exp(half), zoom * torch.exp(-half)
        # Output -> input coordinates: rotation after a per-axis scale by 1/zoom.
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.stack([torch.stack([cos / zoom_x * flip, -sin / zoom_y, tx], 1), torch.stack([sin / zoom_x * flip, cos / zoom_y, ty], 1)], 1)
        if config.edge_crop:
            # Drawn last and only when asked, so earlier options keep their random stream.
            left, right, top, bottom = (uniform(0.0, config.edge_crop) for _ in range(4))
            # The window [-1 + 2 left, 1 - 2 right] x [-1 + 2 top, 1 - 2 bottom] of the film,
            # stretched to the frame, is what the affine above then moves: input = S (theta x) + o.
            window = torch.stack([1.0 - left - right, 1.0 - top - bottom], 1).unsqueeze(2)
            offset = torch.stack([left - right, top - bottom], 1)
            theta = theta * window
            theta[:, :, 2] += offset
        grid = F.affine_grid(theta, list(out.shape), align_corners=False)
        # Areas brought in from outside the film are black, as a collimated border is.
        out = F.grid_sample(out, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if config.sharpness:
        # Blur sits before exposure and noise, where the detector and reconstruction put it.
        amount = uniform(-config.sharpness, config.sharpness).view(n, 1, 1, 1)
        blurred = _gaussian_blur(out, SHARPNESS_SIGMA * out.shape[-1] / 224)
        out = out + amount * (out - blurred)
    if config.gamma:
        gamma = uniform(1 - config.gamma, 1 + config.gamma).view(n, 1, 1, 1)
        out = out.clamp(1e-6, 1).pow(gamma)
    if config.contrast or config.brightness:
        contrast = uniform(1 - config.contrast, 1 + config.contrast).view(n, 1, 1, 1)
        brightness = uniform(-config.brightness, config.brightness).view(n, 1, 1, 1)
        mean = out.mean(dim=(2, 3), keepdim=True)
        out = (out - mean) * contrast + mean + brightness
    if config.noise_std:
        level = uniform(0, config.noise_std).view(n, 1, 1, 1)
        out = out + torch.randn(out.shape, generator=generator) * level
    out = out.clamp(0.0, 1.0)
    if config.acquisition:
        # Drawn last and only when asked, so runs recorded without it replay the same stream.
        probability: float | torch.Tensor = config.acquisition
        if config.acquisition_positive is not None and positive is not None:
            probability = torch.where(positive.bool(), config.acquisition_positive, config.acquisition)
        out = acquire(out, probability, generator)
    return out


#: widest black frame per edge, as a fraction of the side (collimation, scanner borders)
MAX_FRAME = 0.12
#: CLAHE clip limits drawn (OpenCV's units; 2-4 is what processing software ships)
CLAHE_CLIP = (1.0, 4.0)
#: side of a burned-in box, as a fraction of the film's side (labels, markers, redactions)
BOX_SIDE = (0.05, 0.2)
#: largest downsampling factor (a film resampled from 1/3 of the input size, then back)
MAX_DOWNSAMPLE = 3.0
#: lowest JPEG quality drawn
MIN_JPEG_QUALITY = 30


def acquire(batch: torch.Tensor, probability: float | torch.Tensor, generator: torch.Generator, *, occluders: bool = True) -> torch.Tensor:
    """(N, 1, H, W) in [0, 1] -> the same films with acquisition artefacts, each drawn
    independently with ``probability``: a black frame on each edge (up to MAX_FRAME), CLAHE
    local-contrast processing, one black or white box near an edge, resampling from a lower
    resolution, a JPEG re-encode, in the order a film meets them. Random draws come from
    ``generator`` (a fixed number per film, so the stream does not depend on the pixels);
    OpenCV does the pixel work. ``occluders=False`` leaves out the frame and the box, which
    hide anatomy: for a target that is drawn on the anatomy (a lung mask), not on the film.
    ``probability`` is one for every film or (N,), one per film; the draws are the same either way."""
    import cv2
    import numpy as np

    n, _, height, width = batch.shape
    draws = torch.rand(n, 16, generator=generator).numpy()
    chances = np.broadcast_to(np.asarray(probability, dtype=np.float64), (n,))
    films = (batch[:, 0].numpy() * 255.0 + 0.5).astype(np.uint8)
    out = np.empty_like(films)
    for i, (film, d, chance) in enumerate(zip(films, draws, chances)):
        film = film.copy()
        if occluders and d[0] < chance:
            top, bottom, left, right = (int(f * MAX_FRAME * side) for f, side in zip(d[1:5], (height, height, width, width)))
            film[:top], film[height - bottom :], film[:, :left], film[:, width - right :] = 0, 0, 0, 0
        if d[5] < chance:
            clip = CLAHE_CLIP[0] + d[6] * (CLAHE_CLIP[1] - CLAHE_CLIP[0])
            film = cv2.createCLAHE(clipLimit=float(clip), tileGridSize=(8, 8)).apply(film)
        if occluders and d[7] < chance:
            side = BOX_SIDE[0] + d[8] * (BOX_SIDE[1] - BOX_SIDE[0])
            bh, bw = max(1, int(side * height)), max(1, int(side * width * 1.5))
            # Along the top or bottom edge, where labels and redactions sit; black or white.
            y = 0 if d[9] < 0.5 else height - bh
            x = int(d[10] * max(0, width - bw))
            film[y : y + bh, x : x + bw] = 0 if d[14] < 0.5 else 255
        if d[11] < chance:
            factor = 1.0 + d[12] * (MAX_DOWNSAMPLE - 1.0)
            small = cv2.resize(film, (max(8, int(width / factor)), max(8, int(height / factor))), interpolation=cv2.INTER_AREA)
            film = cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)
        if d[13] < chance:
            quality = int(MIN_JPEG_QUALITY + d[15] * (95 - MIN_JPEG_QUALITY))
            ok, encoded = cv2.imencode(".jpg", film, [cv2.IMWRITE_JPEG_QUALITY, quality])
            film = cv2.imdecode(encoded, cv2.IMREAD_GRAYSCALE) if ok else film
        out[i] = film
    return torch.from_numpy(out.astype(np.float32) / 255.0).unsqueeze(1).to(batch.dtype)
