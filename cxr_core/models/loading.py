"""Model folders: discover, verify, load and write them.

Loading checks, in order: the manifest parses, the architecture is registered, the
weights file's sha256 equals the manifest's, the classifier head's size fits the
classes, and the state dict matches the architecture exactly. Each failure raises a
specific :class:`~cxr_core.errors.ModelError`. Weights are only ever read with
safetensors: no pickle, nothing executable.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from cxr_core import config
from cxr_core.errors import (
    ChecksumMismatchError,
    HeadMismatchError,
    ManifestError,
    ModelError,
    ModelNotFoundError,
    NoModelInstalledError,
)
from cxr_core.fileio import atomic_write, sha256_file
from cxr_core.models.architectures import CxrNet, build_network, get_architecture
from cxr_core.models.feature_gate import load_gate_for
from cxr_core.models.manifest import MANIFEST_NAME, Manifest, read_manifest

log = logging.getLogger(__name__)


def select_device(preference: str | None = None) -> torch.device:
    """CUDA when available, else CPU; ``preference`` or ``CXR_DEVICE`` overrides ("cpu", "cuda:1")."""
    wanted = preference or os.environ.get("CXR_DEVICE")
    if wanted:
        try:
            device = torch.device(wanted)
        except RuntimeError as exc:
            raise ModelError(f"CXR_DEVICE={wanted!r} is not a valid device name.") from exc
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ModelError(f"Device {wanted!r} was asked for but CUDA is not available on this machine.")
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass(frozen=True)
class ModelFolder:
    """A folder under the weights directory: its manifest, or why it is unusable."""

    path: Path
    manifest: Manifest | None
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.manifest is not None and self.problem is None


def discover_models(root: Path | None = None, task: str = "classification") -> list[ModelFolder]:
    """Every sub-folder of ``root`` holding a manifest.json, valid or not, sorted by name,
    but for valid ones of another ``task`` (the lung segmenter is no model to read films with).

    With the default root (the weights folder) the model registry applies: a model id
    whose active version was trained here resolves to that version's folder
    (:mod:`cxr_core.models.versions`). Only manifests are read (cheap); weights are verified
    when a model is loaded.
    """
    use_registry = root is None
    root = Path(root) if root is not None else config.weights_dir()
    pointer: dict[str, str] = {}
    if use_registry:
        from cxr_core.models.pointer import RegistryError, read_pointer, registry_dir

        try:
            pointer = dict(read_pointer()["active"])
        except RegistryError as exc:
            log.error("%s", exc)
        for model_id, version in list(pointer.items()):
            try:
                read_manifest(registry_dir() / model_id / version)
            except ManifestError:
                # A pointer to a missing or broken version must not leave the app without a model.
                log.error("active version %s@%s is unreadable; using the shipped version", model_id, version)
                del pointer[model_id]
    folders = sorted(p for p in root.iterdir() if p.is_dir() and (p / MANIFEST_NAME).exists()) if root.is_dir() else []
    found: list[ModelFolder] = []
    seen: set[str] = set()
    for folder in folders + [registry_dir() / i / v for i, v in pointer.items()] if pointer else folders:
        try:
            manifest = read_manifest(folder)
        except ManifestError as exc:
            found.append(ModelFolder(folder, None, str(exc)))
            continue
        if manifest.task != task:
            continue
        if pointer.get(manifest.id) not in (None, manifest.version):
            continue  # another version of this model is the active one
        if manifest.id in seen:
            found.append(ModelFolder(folder, manifest, f"Another folder already provides model id {manifest.id!r}."))
            continue
        if not (folder / manifest.weights_file).is_file():
            found.append(ModelFolder(folder, manifest, f"Weights file {manifest.weights_file} is missing."))
            continue
        seen.add(manifest.id)
        found.append(ModelFolder(folder, manifest))
    return found


def installed_models(root: Path | None = None) -> list[ModelFolder]:
    """The usable models (manifest valid, weights file present)."""
    return [m for m in discover_models(root) if m.ok]


def resolve_model(model_id: str | None = None, root: Path | None = None) -> ModelFolder:
    """The folder of ``model_id`` (or of the default model when None)."""
    models = installed_models(root)
    if not models:
        where = Path(root) if root is not None else config.weights_dir()
        raise NoModelInstalledError(
            f"No trained model is installed (looked in {where}). "
            "Add a model folder (model.safetensors + manifest.json) there; see the README."
        )
    wanted = model_id or config.default_model_id()
    if wanted is None and root is None:
        from cxr_core.models.pointer import RegistryError, default_model_id

        try:
            wanted = default_model_id()
        except RegistryError as exc:
            log.error("%s", exc)
    if wanted is None:
        # Nothing chosen: the first model id by name, wherever its active version lives (a
        # promoted version sits in the registry, after the shipped folders).
        return min(models, key=lambda m: m.manifest.id if m.manifest else "")
    name, _, version = wanted.partition("@")
    for model in models:
        assert model.manifest is not None
        if model.manifest.id == name and (not version or model.manifest.version == version):
            return model
    available = ", ".join(m.manifest.key for m in models if m.manifest)
    raise ModelNotFoundError(f"Model {wanted!r} is not installed. Installed: {available}.")


@dataclass(eq=False)
class LoadedModel:
    """A verified network ready for inference, shared across threads and sessions.

    Forward passes without hooks are thread-safe; anything that registers hooks on
    ``network`` (CAMs on inner layers) must hold ``lock``.
    """

    manifest: Manifest
    network: CxrNet
    device: torch.device
    path: Path
    lock: threading.RLock = field(default_factory=threading.RLock)
    #: the out-of-distribution gate fitted for this model (cxr_core.imaging.gate), if any
    feature_gate: Any = None

    @property
    def key(self) -> str:
        return self.manifest.key


def load_model(folder: Path | str, device: torch.device | str | None = None) -> LoadedModel:
    """Load and verify the model folder; raises a specific ModelError on any mismatch."""
    folder = Path(folder)
    manifest = _manifest_for(folder, "classification")
    arch = get_architecture(manifest.architecture)
    state = _verified_state(folder, manifest)

    fc = state.get("head.fc.weight")
    if fc is None or fc.ndim != 2:
        raise ModelError(f"{folder.name}: the weights have no classifier head (head.fc.weight).")
    if fc.shape[0] != manifest.n_outputs:
        raise HeadMismatchError(
            f"{folder.name}: the classifier head has {fc.shape[0]} output(s) but the manifest's "
            f"{manifest.head} head over {len(manifest.classes)} classes needs {manifest.n_outputs}."
        )
    # Build on the meta device and adopt the loaded tensors (assign=True): no random
    # initialisation to compute and throw away, and no second copy of the weights in memory.
    with torch.device("meta"):
        network = build_network(arch.name, manifest.n_outputs, manifest.input.channels)
    reference = network.state_dict()
    state = {k: v.to(reference[k].dtype) if k in reference else v for k, v in state.items()}
    try:
        network.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise ModelError(f"{folder.name}: the weights do not fit architecture {arch.name}: {str(exc)[:300]}") from exc
    if any(t.is_meta for t in list(network.parameters()) + list(network.buffers())):
        raise ModelError(f"{folder.name}: the weights leave parts of {arch.name} unset.")
    for layer in manifest.cam_target_layers:
        try:
            network.get_submodule(layer)
        except AttributeError as exc:
            raise ManifestError(f"{folder.name}: CAM layer {layer!r} does not exist in {arch.name}.") from exc

    feature_gate = load_gate_for(folder, dict(manifest.ood)) if manifest.ood else None
    target = select_device(str(device)) if device is not None else select_device()
    network.requires_grad_(False)  # inference only: CAM gradients flow to activations, never to weights
    network.eval().to(target)
    if target.type == "cuda":
        # Tensor-core convolutions want NHWC; inference runs these under bf16 autocast.
        network.to(memory_format=torch.channels_last)
    log.info("loaded %s (%s) on %s", manifest.key, arch.name, target)
    return LoadedModel(manifest=manifest, network=network, device=target, path=folder, feature_gate=feature_gate)


def _write_folder(network: torch.nn.Module, manifest: Manifest, folder: Path | str, half: bool, **fields: Any) -> Manifest:
    """Write the weights (float16 when ``half``) then ``manifest.json`` with their sha256."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {}
    for key, tensor in network.state_dict().items():
        tensor = tensor.detach().to("cpu").contiguous()
        if half and tensor.is_floating_point():
            tensor = tensor.to(torch.float16)
        state[key] = tensor
    weights = folder / manifest.weights_file
    metadata = {"format": "pt", "id": manifest.id, "version": manifest.version, "architecture": manifest.architecture}
    atomic_write(weights, lambda p: save_file(state, str(p), metadata=metadata))
    final = replace(
        manifest,
        weights_sha256=sha256_file(weights),
        created=manifest.created or datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **fields,
    )
    atomic_write(folder / MANIFEST_NAME, lambda p: p.write_text(final.to_json(), encoding="utf-8"))
    # Round-trip through the validator so a folder we write is always one we can read.
    read_manifest(folder)
    return final


def save_model_folder(
    network: CxrNet, manifest: Manifest, folder: Path | str, *, half: bool = True
) -> Manifest:
    """Write ``model.safetensors`` then ``manifest.json`` (with the weights' sha256) into ``folder``.

    Floating tensors are stored as float16 when ``half`` (half the size, no measurable
    change in outputs at inference in float32). Returns the manifest as written.
    """
    arch = get_architecture(manifest.architecture)
    return _write_folder(network, manifest, folder, half, cam_target_layers=manifest.cam_target_layers or (arch.default_cam_layer,))


def save_segmenter_folder(network: torch.nn.Module, manifest: Manifest, folder: Path | str, *, half: bool = True) -> Manifest:
    """As :func:`save_model_folder`, for a segmentation network (no classifier head, no CAM layers)."""
    if manifest.task != "segmentation":
        raise ManifestError("a segmenter's manifest must say task: segmentation")
    return _write_folder(network, manifest, folder, half)


def _manifest_for(folder: Path, task: str) -> Manifest:
    """The folder's manifest, refused (ModelError) when it is a model of another task."""
    manifest = read_manifest(folder)
    if manifest.task != task:
        wanted = "a classifier" if task == "classification" else "a segmenter"
        raise ModelError(f"{folder.name} is a {manifest.task} model, not {wanted}.")
    return manifest


def _verified_state(folder: Path, manifest: Manifest) -> dict[str, torch.Tensor]:
    """The weights file's tensors, after its sha256 matched the manifest's."""
    weights = folder / manifest.weights_file
    if not weights.is_file():
        raise ModelError(f"{folder.name}: weights file {manifest.weights_file} is missing.")
    actual = sha256_file(weights)
    if actual != manifest.weights_sha256:
        raise ChecksumMismatchError(
            f"{folder.name}: the weights file does not match its manifest (sha256 {actual[:12]}... "
            f"expected {manifest.weights_sha256[:12]}...). It may be corrupt or replaced; reinstall the model."
        )
    try:
        return load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(f"{folder.name}: the weights file is not a readable safetensors file.") from exc


@dataclass(eq=False)
class LoadedSegmenter:
    """A verified segmentation network on the CPU or GPU: film (N, 1, H, W) -> logits (N, 1, H, W)."""

    manifest: Manifest
    network: torch.nn.Module
    device: torch.device
    path: Path

    @property
    def key(self) -> str:
        return self.manifest.key


def load_segmenter(folder: Path | str, device: torch.device | str | None = None) -> LoadedSegmenter:
    """Load and verify a segmenter's model folder (manifest task ``segmentation``)."""
    from cxr_core.models.architectures import build_segmenter

    folder = Path(folder)
    manifest = _manifest_for(folder, "segmentation")
    state = _verified_state(folder, manifest)
    network = build_segmenter(manifest.architecture)
    reference = network.state_dict()
    state = {k: v.to(reference[k].dtype) if k in reference else v for k, v in state.items()}
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelError(f"{folder.name}: the weights do not fit architecture {manifest.architecture}: {str(exc)[:300]}") from exc
    target = select_device(str(device)) if device is not None else select_device()
    network.requires_grad_(False)
    network.eval().to(target)
    log.info("loaded %s (%s) on %s", manifest.key, manifest.architecture, target)
    return LoadedSegmenter(manifest=manifest, network=network, device=target, path=folder)


def update_manifest(folder: Path | str, manifest: Manifest) -> Manifest:
    """Rewrite ``manifest.json`` (atomically) for weights already in ``folder``.

    The weights' digest is recomputed and must equal the one the new manifest carries,
    so a manifest can never be paired with weights it does not describe.
    """
    folder = Path(folder)
    actual = sha256_file(folder / manifest.weights_file)
    if actual != manifest.weights_sha256:
        raise ChecksumMismatchError(f"{folder.name}: refusing to write a manifest for different weights.")
    atomic_write(folder / MANIFEST_NAME, lambda p: p.write_text(manifest.to_json(), encoding="utf-8"))
    return read_manifest(folder)
