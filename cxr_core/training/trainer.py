"""The training loop: checkpointed every epoch, resumable, reporting progress to a file.

Randomness (shuffling, augmentation) is drawn from generators seeded by (seed, epoch,
step), so a run resumed after a crash continues exactly as the uninterrupted run
would have, up to non-deterministic kernels.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from cxr_core.errors import CxrError
from cxr_core.imaging.preprocess import normalise, to_network_input
from cxr_core.metrics import compute_metrics
from cxr_core.models.architectures import CxrNet, build_network, get_architecture
from cxr_core.models.loading import select_device
from cxr_core.models.manifest import InputSpec, Manifest
from cxr_core.training import distributed
from cxr_core.training.augment import augment
from cxr_core.training.averaging import WeightAverage, recompute_batchnorm
from cxr_core.training.config import TrainConfig
from cxr_core.training.dataset import LabelPlan
from cxr_core.training.images import ImageSet
from cxr_core.training.mixstyle import mixing_styles
from cxr_core.training.prepare import PreparedData, prepare_data, scan_folders
from cxr_core.training.run import RunDir, atomic_write, write_json

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class TrainingCancelled(CxrError):
    """The run was asked to stop; its last checkpoint can be resumed."""


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    best_epoch: int
    epochs_run: int
    history: tuple[dict[str, Any], ...]
    seconds: float
    #: with ``average_every``: snapshots averaged, batch-norm images and the average's validation
    averaged: dict[str, Any] | None = None


def label_plan(config: TrainConfig) -> LabelPlan:
    if config.binary_positive:
        labels = sorted({r.label for r in scan_folders(config.data_dirs)})
        return LabelPlan.binary(config.binary_positive, labels)
    plan = LabelPlan.multiclass(config.training_classes)
    if config.distill:
        # The first class is thresholded on validation films, so it must have them.
        return replace(plan, optional=frozenset(config.model_classes[1:]))
    return plan


def _labels(data_records: tuple, classes: tuple[str, ...]) -> np.ndarray:
    index = {c: i for i, c in enumerate(classes)}
    return np.array([index[r.label] for r in data_records], dtype=np.int64)


def model_films(config: TrainConfig, images: ImageSet) -> ImageSet:
    """``images`` without auxiliary-class films (``images`` itself when there are none)."""
    if not config.aux_classes:
        return images
    wanted = set(config.model_classes)
    return images.subset([i for i, r in enumerate(images.records) if r.label in wanted])


def model_data(config: TrainConfig, data: PreparedData) -> PreparedData:
    """``data`` without auxiliary-class films: what the exported model is calibrated and judged on."""
    if not config.aux_classes:
        return data
    test = None if data.test is None else model_films(config, data.test)
    return replace(data, train=model_films(config, data.train), val=model_films(config, data.val), test=test)


def drop_outputs(network: CxrNet, keep: int) -> CxrNet:
    """Keep the classifier's first ``keep`` outputs (the auxiliary classes come last)."""
    fc = network.head.fc
    if fc.out_features == keep:
        return network
    kept = torch.nn.Linear(fc.in_features, keep).to(fc.weight.device, fc.weight.dtype)
    with torch.no_grad():
        kept.weight.copy_(fc.weight[:keep])
        kept.bias.copy_(fc.bias[:keep])
    network.head.fc = kept
    return network


def load_exported(config: TrainConfig, run_dir: Path | str) -> CxrNet:
    """The run's best (or averaged) weights as the model to export: auxiliary outputs dropped, then
    moved toward the ``init`` model's weights when ``config.interpolate`` < 1."""
    network = load_best(build_network(config.arch, config.n_outputs), run_dir)
    if config.aux_classes:
        network = drop_outputs(network, len(config.model_classes))
    if config.interpolate < 1.0:
        from cxr_core.training.interpolate import interpolate_weights

        network = interpolate_weights(network, config.init, config.interpolate)
    return network


def param_groups(network: CxrNet, arch_name: str, lr: float, layer_decay: float) -> list[dict[str, Any]]:
    """Head at ``lr``; backbone stages at lr * decay^k, k counted from the deepest stage.

    With ``layer_decay`` 1 every group shares one rate. Stage boundaries come from the
    registry, so this works for every registered architecture.
    """
    arch = get_architecture(arch_name)
    children = list(network.backbone.named_children())
    stage_index = {name: i for i, name in enumerate(arch.stages)}
    groups: list[list[torch.nn.Parameter]] = [[] for _ in arch.stages]
    current = 0
    for name, module in children:
        groups[min(current, len(groups) - 1)].extend(module.parameters())
        if name in stage_index:
            current = stage_index[name] + 1
    out = [{"params": list(network.head.parameters()), "lr": lr, "name": "head"}]
    depth = len(groups)
    for i, params in enumerate(groups):
        if params:
            out.append({"params": params, "lr": lr * layer_decay ** (depth - i), "name": f"stage{i}"})
    return out


def predict_arrays(network: torch.nn.Module, pixels: np.ndarray, spec: InputSpec, device: torch.device, batch_size: int = 64, channels_last: bool = False) -> np.ndarray:
    """Logits (N, n_outputs) for uint8 images (N, S, S) already at the network's input size."""
    network.eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(pixels), batch_size):
            x = to_network_input(normalise(torch.from_numpy(pixels[start : start + batch_size])), spec).to(device)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            out.append(network(x).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 1), np.float32)


def probabilities(logits: np.ndarray, head: str, temperature: float = 1.0) -> np.ndarray:
    z = torch.as_tensor(logits, dtype=torch.float64) / temperature
    if head == "sigmoid":
        p = torch.sigmoid(z[:, 0])
        return torch.stack([p, 1 - p], 1).numpy()
    return torch.softmax(z, 1).numpy()


LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def sample_weights(config: TrainConfig, records: tuple, labels: np.ndarray) -> np.ndarray | None:
    """Per-training-film loss weights (N,) for ``balance="source"``, else None.

    Each (source, label) group gets the same total weight, so within one source the
    classes it holds weigh the same: on the shared data every COVID-19 film is an adult
    and every viral pneumonia a child, and plain class weights made "child" lean towards
    viral pneumonia about 2.8 : 1 (1127 paediatric training normals at weight 0.76 against
    1194 viral films at 1.98). Films without a source form one group per label. Weights
    average 1.
    """
    if config.balance != "source":
        return None
    groups = [(getattr(r, "source", None) or "", int(y)) for r, y in zip(records, labels)]
    counts: dict[tuple[str, int], int] = {}
    for g in groups:
        counts[g] = counts.get(g, 0) + 1
    weights = np.array([len(groups) / (len(counts) * counts[g]) for g in groups], dtype=np.float64)
    return weights / weights.mean()


def _loss_fn(config: TrainConfig, train_labels: np.ndarray, device: torch.device) -> LossFn:
    """``loss(logits, y, w)``: ``w`` (N,) per-film weights (``balance="source"``) or None."""
    k = len(config.training_classes)
    counts = np.bincount(train_labels, minlength=k).astype(np.float64)
    if config.head == "sigmoid":
        pos_weight = torch.tensor([counts[1] / max(counts[0], 1.0)], device=device) if config.balance == "weights" else None

        def bce(logits: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
            target = (y == 0).float()
            if config.label_smoothing:
                target = target * (1 - config.label_smoothing) + 0.5 * config.label_smoothing
            if w is None:
                return F.binary_cross_entropy_with_logits(logits[:, 0], target, pos_weight=pos_weight)
            return (F.binary_cross_entropy_with_logits(logits[:, 0], target, reduction="none") * w).sum() / w.sum()

        return bce
    weight = None
    if config.balance == "weights":
        weight = torch.tensor(counts.sum() / (k * np.maximum(counts, 1.0)), dtype=torch.float32, device=device)

    def ce(logits: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
        if w is None:
            return F.cross_entropy(logits, y, weight=weight, label_smoothing=config.label_smoothing)
        # Normalised by the batch's weight, as cross_entropy does with class weights.
        return (F.cross_entropy(logits, y, reduction="none", label_smoothing=config.label_smoothing) * w).sum() / w.sum()

    return ce


def cpu_has_native_bf16() -> bool:
    """True when this CPU computes bf16 in hardware (AMX or AVX512-BF16; Linux only).

    Elsewhere oneDNN emulates bf16 and autocast would be slower than fp32.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    return " amx_bf16" in flags or " avx512_bf16" in flags


def autocast_enabled(config: TrainConfig, device: torch.device) -> bool:
    if device.type == "cuda":
        return config.amp
    return device.type == "cpu" and config.amp_cpu and cpu_has_native_bf16()


def _epoch_order(config: TrainConfig, labels: np.ndarray, epoch: int) -> np.ndarray:
    rng = np.random.default_rng([config.seed, epoch])
    if config.balance == "sampler":
        counts = np.bincount(labels)
        weights = 1.0 / counts[labels]
        return rng.choice(len(labels), size=len(labels), replace=True, p=weights / weights.sum())
    return rng.permutation(len(labels))


def mix_style_layers(config: TrainConfig) -> tuple[str, ...]:
    """Where MixStyle acts: after the first two stages past the stem (DenseNet121's
    denseblock1-2, ResNet50's layer1-2), where the paper found style and content
    best separated; deeper statistics carry the content the label needs."""
    if not config.mix_style:
        return ()
    return get_architecture(config.arch).stage_layers[1:3]


def _set_backbone_trainable(network: CxrNet, trainable: bool) -> None:
    for p in network.backbone.parameters():
        p.requires_grad_(trainable)


def _validate(network: CxrNet, val: ImageSet, config: TrainConfig, size: int, spec: InputSpec, device: torch.device, cache: dict[int, np.ndarray]) -> dict[str, Any]:
    """Validation metrics as exported: ``val`` holds films of the model's classes only
    (:func:`model_films`); auxiliary outputs are dropped here."""
    if size not in cache:
        cache[size] = val.resized(size)
    logits = predict_arrays(network, cache[size], spec, device, channels_last=config.channels_last and device.type == "cuda")
    logits = logits[:, : len(config.model_classes)] if config.head == "softmax" else logits
    y = _labels(val.records, config.model_classes)
    probs = probabilities(logits, config.head)
    if config.head == "sigmoid":
        loss = float(F.binary_cross_entropy_with_logits(torch.as_tensor(logits[:, 0]), torch.as_tensor((y == 0).astype(np.float32))))
    else:
        loss = float(F.cross_entropy(torch.as_tensor(logits), torch.as_tensor(y)))
    metrics = compute_metrics(y, probs.argmax(1), probs, config.model_classes)
    return {
        "val_loss": round(loss, 5),
        "val_accuracy": round(metrics.accuracy, 4),
        "val_auroc": None if metrics.auroc_macro is None else round(metrics.auroc_macro, 4),
        "val_recall": {c: round(m.recall, 4) for c, m in metrics.per_class.items()},
    }


def train(
    config: TrainConfig,
    run_dir: Path | str,
    *,
    data: PreparedData | None = None,
    stop: threading.Event | None = None,
    log_every: int = 20,
) -> tuple[TrainResult, PreparedData]:
    """Train (or resume) into ``run_dir``; returns when every epoch ran or early stopping hit.

    ``stop`` cancels between steps: the last complete epoch's checkpoint remains and
    the run can be resumed.
    """
    config.validate()
    world = distributed.world_from_env()
    run = RunDir(run_dir)
    if run.config.exists():
        previous = TrainConfig.from_dict(json.loads(run.config.read_text()))
        if previous.as_dict() != config.as_dict():
            raise CxrError(f"{run.root} holds a run with a different configuration; use another run folder.")
    elif world.main:
        write_json(run.config, config.as_dict())

    torch.manual_seed(config.seed)
    device = distributed.start(world, select_device(config.device))
    if not world.main:
        run = RunDir(run.root, quiet=True)  # every rank trains; only rank 0 writes the run folder
    spec = final_spec(config)
    if data is None:
        run.event("preparing", message="reading and checking the data")
        data = prepare_data(
            config.data_dirs,
            label_plan(config),
            max(size for size, _ in config.schedule),
            val_fraction=config.val_fraction,
            workers=config.workers,
            progress=lambda i, n: run.event("preparing", done=i, total=n) if i % 2048 == 0 or i == n else None,
            mask_text=config.mask_burned_in,
            crop=spec,
        )
    if world.main:
        write_json(run.validation, data.report.as_dict())

    network = build_network(config.arch, config.n_outputs)
    if config.init != "random":
        from cxr_core.training.init import initialise

        initialise(network, config.arch, config.init)
    network.to(device)
    if config.channels_last:
        network.to(memory_format=torch.channels_last)
    # Forward and backward go through the DDP wrapper (gradients averaged across ranks);
    # state dicts, validation and checkpoints use the plain network.
    forward: torch.nn.Module = network
    if world.distributed:
        from torch.nn.parallel import DistributedDataParallel

        forward = DistributedDataParallel(network, device_ids=[device.index] if device.type == "cuda" else None)
    groups = param_groups(network, config.arch, config.lr, config.layer_decay)
    optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    y_train = _labels(data.train.records, config.training_classes)
    steps_per_epoch = math.ceil(len(y_train) / config.batch_size)
    total_steps = steps_per_epoch * config.total_epochs
    # Warm up over 20% of the steps, but over at least two: OneCycle divides by the warm-up length.
    warmup = min(0.5, max(0.2, 2.0 / max(total_steps, 1)))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[g["lr"] for g in groups], total_steps=max(total_steps, 4), pct_start=warmup, div_factor=20, final_div_factor=200
    )
    loss_fn = _loss_fn(config, y_train, device)
    w_train = sample_weights(config, data.train.records, y_train)
    teacher = None
    distil_classes: list[int] | None = None  # None: every class
    if config.distill and config.distill_missing_only:
        distil_classes = [i for i in range(len(config.model_classes)) if not (y_train == i).any()]
        log.info("distillation on the classes without training films only: %s",
                 ", ".join(config.model_classes[i] for i in distil_classes) or "none (the term is off)")
    if config.distill and distil_classes != []:  # [] : nothing to compare, so no teacher pass per step
        from cxr_core.training.distill import distillation_loss, load_teacher

        teacher = load_teacher(config.arch, 1 if config.head == "sigmoid" else len(config.model_classes), config.init, device)
        skip = set(config.distill_skip_sources)
        distilled = np.array([0.0 if (getattr(r, "source", None) or "") in skip else 1.0 for r in data.train.records])

    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {"epoch": -1, "value": None}
    start_epoch = 0
    average = WeightAverage()
    checkpoint = run.load_checkpoint()
    if checkpoint is not None:
        network.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        history = list(checkpoint["history"])
        best = dict(checkpoint["best"])
        start_epoch = int(checkpoint["epoch"]) + 1
        average = WeightAverage.from_state(checkpoint.get("average"))
        if world.main:
            # A run killed between saving a checkpoint and logging its epoch resumes after that
            # epoch: the progress file catches up from the checkpoint's history, so no epoch is missing.
            logged = {e.get("epoch") for e in run.events() if e["event"] == "epoch"}
            for record in history:
                if record["epoch"] not in logged:
                    run.event("epoch", **record, recovered=True)
        run.event("resumed", epoch=start_epoch)
        log.info("resuming %s at epoch %d", run.root, start_epoch)

    train_cache: dict[int, np.ndarray] = {}
    val_cache: dict[int, np.ndarray] = {}
    val_set = model_films(config, data.val)
    use_amp = autocast_enabled(config, device)
    started = time.time()
    run.event("start", epochs=config.total_epochs, steps_per_epoch=steps_per_epoch, device=str(device), n_train=len(y_train), n_val=len(data.val.records),
              first_epoch=start_epoch, world_size=world.size, bf16=use_amp)
    stale = 0
    for prev in history:
        stale = 0 if prev.get("improved") else stale + (1 if config.in_final_phase(prev["epoch"]) else 0)
    epoch_times: list[float] = []
    # Hooks only while the loop runs: validation (eval mode) never mixes, and the exported
    # or averaged network below is scored without them.
    style_generator = torch.Generator()
    with mixing_styles(network, mix_style_layers(config), config.mix_style, style_generator):
        for epoch in range(start_epoch, config.total_epochs):
            size = config.size_at(epoch)
            if size not in train_cache:
                train_cache = {size: data.train.resized(size)}  # keep one size in memory at a time
            pixels = train_cache[size]
            frozen = epoch < config.freeze_epochs
            _set_backbone_trainable(network, not frozen)
            network.train()
            if frozen:
                network.backbone.eval()  # frozen BN statistics too
            order = _epoch_order(config, y_train, epoch)
            style_generator.manual_seed(config.seed * 1_000_003 + epoch * 10_007 + 7_919 * world.rank + 1)  # a resumed run mixes as the uninterrupted one
            t0 = time.time()
            running, seen = 0.0, 0
            for step in range(steps_per_epoch):
                if distributed.any_rank(stop is not None and stop.is_set(), device):
                    run.event("cancelled", epoch=epoch, step=step)
                    raise TrainingCancelled("Training was cancelled; it can be resumed from its last completed epoch.")
                idx = np.sort(order[step * config.batch_size : (step + 1) * config.batch_size])
                if len(idx) < 2 * world.size:
                    scheduler.step()
                    continue
                # Each rank takes its share of the same global batch; DDP averages the gradients.
                idx = idx[world.rank :: world.size]
                generator = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch * 10_007 + step + 7_919 * world.rank)
                # Index 0 is the positive class, binary or not (LabelPlan): its films may draw artefacts at their own rate.
                x = augment(normalise(torch.from_numpy(pixels[idx])), config.augment, generator, positive=torch.from_numpy(y_train[idx] == 0))
                x = to_network_input(x, spec).to(device, non_blocking=True)
                if config.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                y = torch.from_numpy(y_train[idx]).to(device)
                w = None if w_train is None else torch.from_numpy(w_train[idx]).float().to(device)
                optimizer.zero_grad(set_to_none=True)
                with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
                    logits = forward(x)
                    if teacher is not None:
                        with torch.no_grad():
                            kept = teacher(x)
                loss = loss_fn(logits.float(), y, w)
                if teacher is not None:
                    d = torch.from_numpy(distilled[idx]).float().to(device) * (1.0 if w is None else w)
                    if d.sum() > 0:  # a batch of skipped films only has no term
                        loss = loss + config.distill * distillation_loss(logits, kept, config.head, d, classes=distil_classes)
                loss.backward()
                optimizer.step()
                scheduler.step()
                if config.average_every and config.in_final_phase(epoch) and (step + 1) % config.average_every == 0:
                    average.update(network)
                running += loss.item() * len(idx)
                seen += len(idx) * world.size
                if (step + 1) % log_every == 0 or step + 1 == steps_per_epoch:
                    elapsed = time.time() - t0
                    per_step = elapsed / (step + 1)
                    done_steps = epoch * steps_per_epoch + step + 1
                    epoch_rate = (sum(epoch_times) / len(epoch_times) / steps_per_epoch) if epoch_times else per_step
                    eta = epoch_rate * (total_steps - done_steps)
                    run.event("step", epoch=epoch, step=step + 1, steps=steps_per_epoch, size=size, loss=round(running * world.size / seen, 5), lr=scheduler.get_last_lr()[0], images_per_s=round(seen / elapsed, 2), eta_s=round(eta, 1))
            epoch_seconds = time.time() - t0
            epoch_times.append(epoch_seconds)
            record: dict[str, Any] = {"epoch": epoch, "size": size, "train_loss": round(running * world.size / max(seen, 1), 5), "seconds": round(epoch_seconds, 1), "frozen": frozen}
            # Rank 0 validates and tells the others, so every rank takes the same
            # early-stopping decision (batch-norm statistics differ slightly between ranks).
            record.update(distributed.from_main(lambda size=size: _validate(network, val_set, config, size, spec, device, val_cache), world))
            value = record["val_loss"] if config.select_on == "loss" else -record["val_accuracy"]
            improved = config.in_final_phase(epoch) and (best["value"] is None or value < best["value"])
            record["improved"] = improved
            if improved:
                best = {"epoch": epoch, "value": value}
                if world.main:
                    _save_best(network, run)
                stale = 0
            elif config.in_final_phase(epoch):
                stale += 1
            history.append(record)
            if world.main:
                run.save_checkpoint(
                    {
                        "model": network.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "epoch": epoch,
                        "history": history,
                        "best": best,
                        "average": average.state() if config.average_every else None,
                    }
                )
            distributed.barrier()  # nobody runs ahead of a checkpoint that a resume would need
            run.event("epoch", **record)
            log.info("epoch %d/%d: %s", epoch + 1, config.total_epochs, record)
            if config.patience and stale >= config.patience:
                run.event("early_stop", epoch=epoch, best_epoch=best["epoch"])
                break

    if world.distributed:
        digests = distributed.gather(distributed.parameter_digest(network))
        run.event("ranks", world_size=world.size, parameter_digests=digests, in_sync=len(set(digests)) == 1)
    averaged = None
    if config.average_every and average.count and world.main:
        averaged = _export_average(network, average, data, val_set, config, spec, device, run, train_cache, val_cache)
    result = TrainResult(run.root, int(best["epoch"]), len(history), tuple(history), time.time() - started, averaged)
    return result, data


def _export_average(network: CxrNet, average: WeightAverage, data: PreparedData, val: ImageSet, config: TrainConfig, spec: InputSpec, device: torch.device,
                    run: RunDir, train_cache: dict[int, np.ndarray], val_cache: dict[int, np.ndarray]) -> dict[str, Any]:
    """Replace the run's best weights by the final phase's weight average."""
    size = config.final_size
    average.apply_to(network)
    pixels = train_cache[size] if size in train_cache else data.train.resized(size)
    used = recompute_batchnorm(network, pixels, spec, device, seed=config.seed)
    record: dict[str, Any] = {"snapshots": average.count, "every_steps": config.average_every, "batchnorm_images": used}
    record.update(_validate(network, val, config, size, spec, device, val_cache))
    _save_best(network, run)
    run.event("averaged", **record)
    log.info("weight average of %d snapshots: %s", average.count, record)
    return record


def _save_best(network: CxrNet, run: RunDir) -> None:
    state = {k: v.detach().to("cpu").contiguous() for k, v in network.state_dict().items()}
    atomic_write(run.best, lambda p: save_file(state, str(p)))


def load_best(network: CxrNet, run_dir: Path | str) -> CxrNet:
    state = load_file(str(RunDir(run_dir).best))
    network.load_state_dict(state)
    return network


def manifest_for(config: TrainConfig, spec: InputSpec) -> Manifest:
    return Manifest(
        id=config.model_id,
        version=config.version,
        name=config.name or config.model_id,
        architecture=config.arch,
        classes=config.model_classes,
        head=config.head,
        weights_sha256="0" * 64,
        input=spec,
        class_labels={"covid": "COVID-19", "normal": "Normal", "viral_pneumonia": "Viral pneumonia", "bacterial_pneumonia": "Bacterial pneumonia", "other": "Other (not COVID-19)"},
    )


def final_spec(config: TrainConfig) -> InputSpec:
    """The exported model's input spec; a lung crop names the installed segmenter (ModelError without one)."""
    segmenter = ""
    if config.crop == "lungs":
        from cxr_core.errors import ModelError
        from cxr_core.imaging.lungs import load_default_segmenter

        loaded = load_default_segmenter()
        if loaded is None:
            raise ModelError("Training on lung crops needs the lung segmenter (weights/lung-segmenter), which is not installed.")
        segmenter = loaded.key
    return InputSpec(size=(config.final_size, config.final_size), channels=3, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                     mask_burned_in=config.mask_burned_in, intensity=config.intensity,
                     crop=config.crop, crop_margin=config.crop_margin if config.crop == "lungs" else 0.0, crop_segmenter=segmenter)

