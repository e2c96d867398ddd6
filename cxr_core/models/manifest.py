"""manifest.json: everything needed to use a model folder, validated on read.

A model is a folder ``weights/<id>/`` holding ``model.safetensors`` and
``manifest.json`` (in the spirit of MONAI bundles' metadata.json and torchvision's
weight enums: the weights carry their transforms and metadata).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

from cxr_core.errors import ManifestError

MANIFEST_NAME = "manifest.json"
WEIGHTS_NAME = "model.safetensors"
SCHEMA_VERSION = 1
HEAD_TYPES = ("softmax", "sigmoid")
#: what a model folder's network does: classifiers serve Diagnose; a segmenter (the lung
#: segmenter) is used by the pipeline and never offered as a model to read films with
TASKS = ("classification", "segmentation")
#: how a film's grey levels reach the network: "fixed" keeps them; "standardise" gives every
#: film zero mean and unit spread first (then ``mean + std * z``, so a network normalised for
#: [0, 1] films sees films of one exposure), which removes a site's brightness and contrast;
#: "clahe" gives every film the same local-contrast processing (CLAHE, clip CLAHE_CLIP, 8x8
#: tiles, at the network's input size), so a site's own processing, or its absence, cannot
#: stand in for disease
INTENSITY_MODES = ("fixed", "standardise", "clahe")
#: the CLAHE clip limit of intensity "clahe" (OpenCV's units: 2 is what processing software ships)
CLAHE_CLIP = 2.0
#: what part of the film the network sees: "film" the whole of it; "lungs" the box around
#: both lung fields (the lung segmenter's), widened by ``crop_margin`` of its size per side,
#: so borders, labels, collimation and the body's framing are out of sight
CROP_MODES = ("film", "lungs")

DEFAULT_INTENDED_USE = (
    "Decision support for trained clinicians reading frontal (PA/AP) adult chest radiographs. "
    "Not a diagnosis; not for use as the sole basis of a clinical decision."
)


@dataclass(frozen=True)
class InputSpec:
    """How pixels become the network's input tensor."""

    size: tuple[int, int] = (224, 224)  # (height, width)
    channels: int = 3
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    # The training films were resized without keeping the aspect ratio, so inference does the same.
    resize: str = "stretch"
    #: burned-in text and markers were inpainted in training, so they are before every
    #: prediction too (cxr_core.imaging.annotations): the model has never seen them.
    mask_burned_in: bool = False
    #: see INTENSITY_MODES
    intensity: str = "fixed"
    #: see CROP_MODES; ``crop_segmenter`` is the segmenter (id@version) the model was trained with
    crop: str = "film"
    crop_margin: float = 0.0
    crop_segmenter: str = ""


@dataclass(frozen=True)
class Manifest:
    """A model folder's manifest. ``classes`` are in output order.

    Heads: ``softmax`` has one logit per class; ``sigmoid`` is binary with a single logit
    for ``classes[0]`` (the positive class) and ``classes[1]`` its complement.
    """

    id: str
    version: str
    name: str
    architecture: str
    classes: tuple[str, ...]
    head: str
    weights_sha256: str
    input: InputSpec = field(default_factory=InputSpec)
    class_labels: Mapping[str, str] = field(default_factory=dict)
    cam_target_layers: tuple[str, ...] = ()
    thresholds: Mapping[str, float] = field(default_factory=dict)
    temperature: float = 1.0
    training_data: Mapping[str, Any] = field(default_factory=dict)
    metrics: Mapping[str, Any] = field(default_factory=dict)
    training: Mapping[str, Any] = field(default_factory=dict)
    #: the fitted out-of-distribution gate: {"file", "sha256", "warn", "reject", ...}; empty = none
    ood: Mapping[str, Any] = field(default_factory=dict)
    #: when to say "uncertain": {"min_probability", "min_margin"} (defaults in cxr_core.inference)
    abstention: Mapping[str, float] = field(default_factory=dict)
    intended_use: str = DEFAULT_INTENDED_USE
    weights_file: str = WEIGHTS_NAME
    created: str = ""
    task: str = "classification"
    schema_version: int = SCHEMA_VERSION

    @property
    def key(self) -> str:
        """``id@version``, how results and logs name the model."""
        return f"{self.id}@{self.version}"

    @property
    def n_outputs(self) -> int:
        return 1 if self.head == "sigmoid" else len(self.classes)

    @property
    def positive_class(self) -> str | None:
        return self.classes[0] if self.head == "sigmoid" else None

    def label(self, cls: str) -> str:
        """Human-readable class name (``covid`` -> ``COVID-19``)."""
        return self.class_labels.get(cls, cls.replace("_", " "))

    def to_json(self) -> str:
        data = asdict(self)
        data["input"]["size"] = list(self.input.size)
        return json.dumps(data, indent=2, sort_keys=False) + "\n"


def _require(data: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in data:
        raise ManifestError(f"{where}: required field '{key}' is missing.")
    value = data[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ManifestError(f"{where}: field '{key}' has the wrong type ({type(value).__name__}).")
    return value


def _floats(value: Any, key: str, where: str) -> tuple[float, ...]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, (int, float)) for v in value):
        raise ManifestError(f"{where}: '{key}' must be a list of numbers.")
    return tuple(float(v) for v in value)


def parse_manifest(data: Mapping[str, Any], where: str = "manifest.json") -> Manifest:
    """Validate a decoded manifest and build a :class:`Manifest`; raise ManifestError otherwise."""
    if not isinstance(data, Mapping):
        raise ManifestError(f"{where}: expected a JSON object.")
    schema = data.get("schema_version", SCHEMA_VERSION)
    if schema != SCHEMA_VERSION:
        raise ManifestError(f"{where}: schema_version {schema!r} is not supported (expected {SCHEMA_VERSION}).")

    model_id = _require(data, "id", str, where)
    if not model_id or "/" in model_id or "@" in model_id or model_id.startswith("."):
        raise ManifestError(f"{where}: id {model_id!r} is not a valid folder name.")
    version = _require(data, "version", str, where)
    architecture = _require(data, "architecture", str, where)
    classes = tuple(_require(data, "classes", list, where))
    if len(classes) < 2 or not all(isinstance(c, str) and c for c in classes):
        raise ManifestError(f"{where}: 'classes' must list at least two class names.")
    if len(set(classes)) != len(classes):
        raise ManifestError(f"{where}: 'classes' has duplicates.")
    head = _require(data, "head", str, where)
    if head not in HEAD_TYPES:
        raise ManifestError(f"{where}: head must be one of {HEAD_TYPES}, got {head!r}.")
    if head == "sigmoid" and len(classes) != 2:
        raise ManifestError(f"{where}: a sigmoid head is binary and needs exactly two classes, got {len(classes)}.")
    sha = _require(data, "weights_sha256", str, where).lower()
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise ManifestError(f"{where}: weights_sha256 is not a sha256 hex digest.")

    raw_input = data.get("input", {})
    if not isinstance(raw_input, Mapping):
        raise ManifestError(f"{where}: 'input' must be an object.")
    size = raw_input.get("size", [224, 224])
    if isinstance(size, int):
        size = [size, size]
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(s, int) and 16 <= s <= 4096 for s in size)):
        raise ManifestError(f"{where}: input.size must be [height, width] between 16 and 4096.")
    channels = raw_input.get("channels", 3)
    if channels not in (1, 3):
        raise ManifestError(f"{where}: input.channels must be 1 or 3.")
    mean = _floats(raw_input.get("mean", [0.485, 0.456, 0.406][:channels] if channels == 3 else [0.5]), "input.mean", where)
    std = _floats(raw_input.get("std", [0.229, 0.224, 0.225][:channels] if channels == 3 else [0.25]), "input.std", where)
    if len(mean) != channels or len(std) != channels or any(s <= 0 for s in std):
        raise ManifestError(f"{where}: input.mean/std need one value per channel (std > 0).")
    resize = raw_input.get("resize", "stretch")
    if resize != "stretch":
        raise ManifestError(f"{where}: input.resize {resize!r} is not supported (only 'stretch').")
    mask_burned_in = raw_input.get("mask_burned_in", False)
    if not isinstance(mask_burned_in, bool):
        raise ManifestError(f"{where}: input.mask_burned_in must be true or false.")
    intensity = raw_input.get("intensity", "fixed")
    if intensity not in INTENSITY_MODES:
        raise ManifestError(f"{where}: input.intensity must be one of {INTENSITY_MODES}, got {intensity!r}.")
    crop = raw_input.get("crop", "film")
    if crop not in CROP_MODES:
        raise ManifestError(f"{where}: input.crop must be one of {CROP_MODES}, got {crop!r}.")
    crop_margin = raw_input.get("crop_margin", 0.0)
    if not isinstance(crop_margin, (int, float)) or isinstance(crop_margin, bool) or not 0.0 <= crop_margin <= 1.0:
        raise ManifestError(f"{where}: input.crop_margin must be a number in [0, 1].")
    crop_segmenter = raw_input.get("crop_segmenter", "")
    if not isinstance(crop_segmenter, str) or (crop == "lungs" and "@" not in crop_segmenter):
        raise ManifestError(f"{where}: a lung crop needs input.crop_segmenter (the segmenter's id@version).")
    task = data.get("task", "classification")
    if task not in TASKS:
        raise ManifestError(f"{where}: task must be one of {TASKS}, got {task!r}.")

    thresholds = data.get("thresholds", {})
    if not isinstance(thresholds, Mapping) or not all(
        k in classes and isinstance(v, (int, float)) and 0.0 < v < 1.0 for k, v in thresholds.items()
    ):
        raise ManifestError(f"{where}: thresholds must map class names to probabilities in (0, 1).")
    temperature = data.get("temperature", 1.0)
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
        raise ManifestError(f"{where}: temperature must be a positive number.")
    layers = data.get("cam_target_layers", [])
    if not isinstance(layers, list) or not all(isinstance(x, str) and x for x in layers):
        raise ManifestError(f"{where}: cam_target_layers must be a list of module paths.")
    labels = data.get("class_labels", {})
    if not isinstance(labels, Mapping) or not all(isinstance(v, str) for v in labels.values()):
        raise ManifestError(f"{where}: class_labels must map class names to text.")
    for key in ("training_data", "metrics", "training"):
        if not isinstance(data.get(key, {}), Mapping):
            raise ManifestError(f"{where}: '{key}' must be an object.")
    ood = data.get("ood", {})
    if not isinstance(ood, Mapping) or (ood and not (
        isinstance(ood.get("file"), str) and Path(ood["file"]).name == ood["file"] and ood["file"].endswith(".safetensors")
        and isinstance(ood.get("sha256"), str) and len(ood["sha256"]) == 64
    )):
        raise ManifestError(f"{where}: 'ood' must name a .safetensors file in the folder and its sha256.")
    abstention = data.get("abstention", {})
    if not isinstance(abstention, Mapping) or not all(
        k in ("min_probability", "min_margin") and isinstance(v, (int, float)) and 0.0 <= v < 1.0 for k, v in abstention.items()
    ):
        raise ManifestError(f"{where}: 'abstention' takes min_probability and min_margin in [0, 1).")
    weights_file = data.get("weights_file", WEIGHTS_NAME)
    if not isinstance(weights_file, str) or Path(weights_file).name != weights_file or not weights_file.endswith(".safetensors"):
        raise ManifestError(f"{where}: weights_file must be a .safetensors file name inside the folder.")

    return Manifest(
        id=model_id,
        version=version,
        name=str(data.get("name") or model_id),
        architecture=architecture,
        classes=classes,
        head=head,
        weights_sha256=sha,
        input=InputSpec(size=(size[0], size[1]), channels=channels, mean=mean, std=std, resize=resize, mask_burned_in=mask_burned_in, intensity=intensity,
                        crop=crop, crop_margin=float(crop_margin), crop_segmenter=crop_segmenter),
        class_labels=dict(labels),
        cam_target_layers=tuple(layers),
        thresholds={k: float(v) for k, v in thresholds.items()},
        temperature=float(temperature),
        training_data=dict(data.get("training_data", {})),
        metrics=dict(data.get("metrics", {})),
        training=dict(data.get("training", {})),
        ood=dict(ood),
        abstention={k: float(v) for k, v in abstention.items()},
        intended_use=str(data.get("intended_use") or DEFAULT_INTENDED_USE),
        weights_file=weights_file,
        created=str(data.get("created", "")),
        task=task,
        schema_version=SCHEMA_VERSION,
    )


def read_manifest(folder: Path) -> Manifest:
    path = Path(folder) / MANIFEST_NAME
    where = f"{Path(folder).name}/{MANIFEST_NAME}"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ManifestError(f"{where} is missing.") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{where} cannot be read.") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{where} is not valid JSON (line {exc.lineno}).") from exc
    return parse_manifest(data, where)
