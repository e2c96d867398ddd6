"""Train the lung segmenter: a small U-Net from annotated lung masks.

The masks come as a CSV (``mask``, ``image``, ``source`` columns, paths relative to the
CSV's folder and to ``image_root``), as ``shared/data/lung-masks/masks.csv`` is. Training
uses the sources it is told to (``openist`` on the shared data) and holds out a share of
them, by file, to choose the epoch; films from any other hospital are for measuring it
(:func:`cxr_core.imaging.lungs.dice`), never for fitting it.

Films go through :func:`cxr_core.imaging.lungs.segmenter_input`, the exact path inference uses
(stretch to the square, per-film intensity standardisation). Augmentation is heavy on
purpose: the segmenter must work at hospitals whose exposure, processing and framing it
has not seen, so geometry (rotation, zoom, shift, aspect) moves film and mask together,
and exposure (gamma, contrast, blur to unsharp masking, noise) changes the film alone.
"""

from __future__ import annotations

import csv
import logging
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from cxr_core.errors import CxrError
from cxr_core.imaging.film import resize_pixels
from cxr_core.imaging.io import read_image
from cxr_core.imaging.lungs import SEGMENTER_SIZE, dice, postprocess_mask, segmenter_manifest
from cxr_core.models.architectures import build_segmenter
from cxr_core.models.manifest import Manifest
from cxr_core.training.augment import AugmentConfig, acquire, augment
from cxr_core.training.dataset import DatasetError, _bucket

log = logging.getLogger(__name__)

#: film and mask move together (positioning and framing differ between sites)
GEOMETRY = AugmentConfig(rotate_deg=12.0, translate=0.08, scale=(0.8, 1.2), brightness=0.0, contrast=0.0,
                         gamma=0.0, noise_std=0.0, sharpness=0.0, aspect=0.25)
#: the film alone (exposure, processing, detector): wider than the classifiers' defaults
EXPOSURE = AugmentConfig(rotate_deg=0.0, translate=0.0, scale=(1.0, 1.0), brightness=0.15, contrast=0.35,
                         gamma=0.45, noise_std=0.04, sharpness=1.0)


@dataclass(frozen=True)
class MaskPair:
    image: Path
    mask: Path
    source: str


@dataclass(frozen=True)
class SegmenterRun:
    """What a training run produced: the model folder and its validation figures."""

    folder: Path
    train_films: int
    val_films: int
    val_dice: float
    best_epoch: int
    epochs: int
    seconds: float


def read_mask_pairs(csv_path: Path | str, image_root: Path | str | None = None, sources: Sequence[str] | None = None) -> list[MaskPair]:
    """The (film, mask) pairs a masks.csv lists, optionally only some sources.

    ``image`` paths are relative to ``image_root`` (default: the CSV folder's parent, as in
    shared/data), ``mask`` paths to the CSV's folder.
    """
    csv_path = Path(csv_path)
    root = Path(image_root) if image_root is not None else csv_path.parent.parent
    pairs: list[MaskPair] = []
    with open(csv_path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = {"mask", "image"} - set(reader.fieldnames or ())
        if missing:
            raise DatasetError(f"{csv_path.name} needs the columns mask and image (missing: {', '.join(sorted(missing))}).")
        for row in reader:
            source = (row.get("source") or "").strip()
            if sources and source not in sources:
                continue
            for key in ("mask", "image"):
                if Path(row[key]).is_absolute() or ".." in Path(row[key]).parts:
                    raise DatasetError(f"{csv_path.name} names a file outside its folders: {row[key]!r}.")
            pairs.append(MaskPair(root / row["image"], csv_path.parent / row["mask"], source))
    if not pairs:
        raise DatasetError(f"{csv_path.name} lists no masks" + (f" of source {', '.join(sources)}." if sources else "."))
    return pairs


def held_out_for_epoch(pair: MaskPair, val_fraction: float = 0.1) -> bool:
    """Whether :func:`train_segmenter` holds ``pair`` out to choose its epoch (a hash of the
    file name, so the same films every run and for every candidate compared on them)."""
    return _bucket(pair.image.name, "lungs") < val_fraction


def load_pairs(pairs: Sequence[MaskPair], size: int = SEGMENTER_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Films as (N, size, size) float32 in [0, 1] and masks as (N, size, size) bool.

    Unreadable pairs raise: a training set with holes is a data problem to fix, not to skip.
    """
    films, masks = [], []
    for pair in pairs:
        try:
            pixels = read_image(pair.image).pixels
        except CxrError as exc:
            raise DatasetError(f"{pair.image.name}: {exc}") from exc
        try:
            mask = np.asarray(Image.open(pair.mask).convert("L"))
        except OSError as exc:
            raise DatasetError(f"{pair.mask.name} is not a readable mask image.") from exc
        films.append(resize_pixels(pixels, (size, size)))
        masks.append(cv2.resize((mask > 127).astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST) > 0)
    return np.stack(films).astype(np.float32), np.stack(masks)


def _standardise(batch: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) -> per-film zero mean, unit standard deviation (as segmenter_input does)."""
    mean = batch.mean(dim=(2, 3), keepdim=True)
    std = batch.std(dim=(2, 3), keepdim=True)
    return (batch - mean) / (std + 1e-6)


def _loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy plus soft Dice: BCE for calibrated pixels, Dice for thin structures at the edges."""
    bce = F.binary_cross_entropy_with_logits(logits, target)
    prob = torch.sigmoid(logits)
    inter = (prob * target).sum(dim=(1, 2, 3))
    soft_dice = (2 * inter + 1) / (prob.sum(dim=(1, 2, 3)) + target.sum(dim=(1, 2, 3)) + 1)
    return bce + (1 - soft_dice).mean()


def predict_masks(network: torch.nn.Module, films: np.ndarray, batch_size: int = 16) -> np.ndarray:
    """(N, S, S) float films in [0, 1] -> (N, S, S) bool masks (post-processed as inference does)."""
    network.eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(films), batch_size):
            x = _standardise(torch.from_numpy(films[start : start + batch_size]).unsqueeze(1))
            prob = torch.sigmoid(network(x))[:, 0].numpy()
            out.extend(postprocess_mask(p > 0.5) for p in prob)
    return np.stack(out)


def train_segmenter(
    pairs: Sequence[MaskPair],
    out: Path | str,
    *,
    epochs: int = 40,
    batch_size: int = 8,
    lr: float = 3e-3,
    val_fraction: float = 0.1,
    seed: int = 0,
    version: str = "1.0.0",
    processing: float = 0.0,
    progress: Callable[[int, int, float, float], None] | None = None,
) -> SegmenterRun:
    """Train a U-Net on ``pairs`` and write its model folder to ``out``.

    A ``val_fraction`` of the films (by a hash of the file name, so stable) chooses the
    epoch by Dice; the exported weights are that epoch's. ``processing`` is the probability of
    each of another site's processing steps on the film alone (CLAHE local contrast, a lower
    resolution, a JPEG re-encode: :func:`cxr_core.training.augment.acquire` without its
    frame and box, which would hide lung the mask still shows). ``progress(epoch, epochs,
    train_loss, val_dice)`` after each epoch.
    """
    from cxr_core.models.loading import save_segmenter_folder

    if epochs < 1 or batch_size < 2:
        raise ValueError("epochs >= 1 and batch_size >= 2")
    if not 0.0 <= processing <= 1.0:
        raise ValueError("processing is a probability, 0 to 1")
    started = time.monotonic()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    is_val = [held_out_for_epoch(p, val_fraction) for p in pairs]
    train_pairs = [p for p, v in zip(pairs, is_val) if not v]
    val_pairs = [p for p, v in zip(pairs, is_val) if v]
    if len(train_pairs) < batch_size or not val_pairs:
        raise DatasetError(f"Too few masks to train and validate ({len(train_pairs)} train, {len(val_pairs)} validation).")
    train_films, train_masks = load_pairs(train_pairs)
    val_films, val_masks = load_pairs(val_pairs)
    log.info("lung segmenter: %d training and %d validation films", len(train_films), len(val_films))

    manifest = segmenter_manifest(version=version)
    network = build_segmenter(manifest.architecture)
    optimiser = torch.optim.AdamW(network.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(train_films) / batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.15)
    films_t = torch.from_numpy(train_films).unsqueeze(1)
    masks_t = torch.from_numpy(train_masks.astype(np.float32)).unsqueeze(1)
    best_dice, best_epoch, best_state = -1.0, 0, None
    for epoch in range(epochs):
        network.train()
        order = torch.randperm(len(films_t), generator=generator)
        total = 0.0
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            if len(idx) < 2:
                continue  # batch norm needs two films
            moved = augment(torch.cat([films_t[idx], masks_t[idx]], dim=1), GEOMETRY, generator)
            film = augment(moved[:, :1], EXPOSURE, generator)
            if processing > 0:
                # acquire works on 8-bit pixels: exposure noise outside [0, 1] would wrap around.
                film = acquire(film.clamp(0.0, 1.0), processing, generator, occluders=False)
            target = (moved[:, 1:] > 0.5).float()
            loss = _loss(network(_standardise(film)), target)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            total += loss.item() * len(idx)
        predicted = predict_masks(network, val_films)
        val_dice = float(np.mean([dice(p, t) for p, t in zip(predicted, val_masks)]))
        train_loss = total / len(films_t)
        log.info("epoch %d/%d: train loss %.4f, validation Dice %.4f", epoch + 1, epochs, train_loss, val_dice)
        if progress is not None:
            progress(epoch + 1, epochs, train_loss, val_dice)
        if val_dice > best_dice:
            best_dice, best_epoch = val_dice, epoch + 1
            best_state = {k: v.detach().clone() for k, v in network.state_dict().items()}
    assert best_state is not None
    network.load_state_dict(best_state)
    seconds = time.monotonic() - started
    manifest = replace(
        manifest,
        training={
            "sources": sorted({p.source for p in pairs}),
            "train_films": len(train_films),
            "val_films": len(val_films),
            "epochs": epochs,
            "best_epoch": best_epoch,
            "batch_size": batch_size,
            "lr": lr,
            "seed": seed,
            "processing": processing,
            "seconds": round(seconds),
            "device": "cpu",
        },
        metrics={"val_dice": round(best_dice, 4)},
    )
    folder = Path(out)
    written = save_segmenter_folder(network, manifest, folder)
    (folder / "README.md").write_text(segmenter_card(written), encoding="utf-8")
    return SegmenterRun(folder, len(train_films), len(val_films), best_dice, best_epoch, epochs, seconds)


def segmenter_card(manifest: Manifest) -> str:
    """The lung segmenter's model card, from its manifest's facts and measurements."""
    m, tr, metrics = manifest, manifest.training, manifest.metrics
    lines = [f"# {m.name} ({m.key})", "", f"**Intended use.** {m.intended_use}", "",
             "## Model",
             f"- Architecture: {m.architecture} (segmentation-models-pytorch U-Net, ResNet-18 encoder cut after its fourth stage), "
             "one grey channel in, one lung logit per pixel out; random initialisation.",
             f"- Input: the film stretched to {m.input.size[0]}x{m.input.size[1]} px, standardised per film (zero mean, unit spread). "
             "Output: pixels with p > 0.5, the two largest regions kept (the second only if at least a fifth of the first), holes filled, "
             "resized to the film's own size.",
             f"- Weights: `{m.weights_file}` (fp16), sha256 `{m.weights_sha256}`.", "",
             "## Training data",
             f"- {tr.get('train_films')} films with lung masks from `{', '.join(tr.get('sources', []))}` (adult normal frontal films, "
             "a US teaching collection, as gathered in the OpenIST project), both lungs, heart excluded, 224 px; "
             f"{tr.get('val_films')} more held out (by a hash of the file name) to choose the epoch.",
             f"- {tr.get('epochs')} epochs, batch {tr.get('batch_size')}, AdamW one-cycle lr {tr.get('lr')}, BCE + soft Dice; "
             "augmentation: rotation, zoom, shift and aspect moving film and mask together; gamma, contrast, brightness, "
             "blur/unsharp and noise on the film"
             + (f"; another site's processing on the film (CLAHE local contrast, a lower resolution, a JPEG re-encode), "
                f"each with probability {tr['processing']}" if tr.get("processing") else "")
             + f". Best epoch {tr.get('best_epoch')} (validation Dice {metrics.get('val_dice')}); "
             f"{(tr.get('seconds') or 0) / 60:.0f} min on {tr.get('device', 'a 2-core CPU')}.", "",
             "## Evaluation"]
    external = metrics.get("external_dice")
    if external:
        lines.append(f"- At a hospital it never saw ({external['source']}, {external['n']} films, expert outlines): Dice mean "
                     f"{external['mean']}, median {external['median']}, 10th percentile {external['p10']}, worst {external['min']}.")
        for label, row in external.get("by_label", {}).items():
            lines.append(f"  - {label}: mean {row['mean']} (n = {row['n']}), worst {row['min']}")
    films = metrics.get("training_films")
    if films:
        lines.append(f"- On {films['n']} training films of the classifiers ({', '.join(films['films'])}): two lung regions found on "
                     f"{films['two_regions']:.1%} (two lungs touching make one); lung share of the frame median "
                     f"{films['lung_fraction']['median']}. The input check calls a film's lungs plausible when they cover "
                     f"{metrics['lung_fraction_range'][0]:.0%} to {metrics['lung_fraction_range'][1]:.0%} of the frame and span at least "
                     f"{metrics.get('lung_width_min', 0):.0%} of its width (the training films' 0.5th and 99.5th percentiles).")
    lines += ["", "## What it cannot do",
              "- It learned from one collection of adult normal films. Lungs hidden by dense consolidation, large effusions, "
              "a pneumothorax or surgery may be outlined short of their true edge, so a crop or a lung share on such a film "
              "can miss part of the disease.",
              "- Children's films, lateral views, rotated or inverted films and non-chest images are outside what it knows: "
              "its outline there means nothing (the input check warns when it does not find a plausible pair of lungs).",
              "- It outlines lung fields, not disease; it is not a diagnostic output.", ""]
    return "\n".join(lines)
