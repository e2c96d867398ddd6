"""Class activation maps through pytorch-grad-cam, for every class at the cost of about one.

The fast path (the default layer, i.e. the backbone's last feature map): run the
backbone once, then hand the library the *head* as the model and K copies of the
feature map as the input, one copy per class target. The library's per-method maths
(Grad-CAM weights, HiResCAM's element-wise product, ...) is untouched; only the
backward pass shrinks from the whole network to a pooling and a linear layer. The
head is copied per call, so concurrent sessions never share hooks.

Other layers (the depth progression) and perturbation methods (Score-CAM, whose
masks multiply the *image*) use the whole network, under the model's lock because
the hooks sit on the shared module.

Heatmaps come back at the original image's resolution, raw (the method's own units,
so maps can share one colour scale) and min-max scaled per map.
"""

from __future__ import annotations

import copy
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import cv2
import numpy as np
import torch
from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, ScoreCAM, XGradCAM
from pytorch_grad_cam.base_cam import BaseCAM
from pytorch_grad_cam.utils.model_targets import BinaryClassifierOutputTarget, ClassifierOutputTarget

from cxr_core.errors import ExplanationError
from cxr_core.imaging.film import XrayImage
from cxr_core.imaging.preprocess import WHOLE_FILM, Box, box_pixels, lung_crop_boxes, to_input
from cxr_core.inference import Prediction, logits_to_probabilities, make_prediction
from cxr_core.models.loading import LoadedModel
from cxr_core.models.manifest import Manifest

log = logging.getLogger(__name__)

ProgressCallback = Callable[[float], None]


class _RawCamMixin:
    """Keep each method's own maths but skip the library's min-max scaling and resize.

    Raw values are what make a common colour scale across maps honest; scaling is
    done afterwards, once, at the original image size. Returns (B, h, w) >= 0 at the
    target layer's resolution.
    """

    def compute_cam_per_layer(self, input_tensor, targets, eigen_smooth):  # type: ignore[no-untyped-def]
        acts = [a.cpu().numpy() for a in self.activations_and_grads.activations]  # type: ignore[attr-defined]
        grads = [g.cpu().numpy() for g in self.activations_and_grads.gradients]  # type: ignore[attr-defined]
        cams = []
        for i, layer in enumerate(self.target_layers):  # type: ignore[attr-defined]
            cam = self.get_cam_image(  # type: ignore[attr-defined]
                input_tensor, layer, targets, acts[i], grads[i] if i < len(grads) else None, eigen_smooth
            )
            cams.append(np.maximum(cam, 0).astype(np.float32))
        return cams

    def aggregate_multi_layers(self, cams):  # type: ignore[no-untyped-def]
        return cams[0]


class _SharedMaskScoreCAM(ScoreCAM):
    """Score-CAM whose masked forward passes serve every target of the same image.

    The library runs ``channels`` masked forwards per (image, target) pair; the outputs
    do not depend on the target, so one set per distinct image is enough. Batches of
    masks are reported through ``progress``.
    """

    batch_size = 32
    progress: ProgressCallback | None = None

    def get_cam_weights(self, input_tensor, target_layer, targets, activations, grads):  # type: ignore[no-untyped-def]
        store = self.activations_and_grads.activations
        with torch.no_grad():
            acts = torch.from_numpy(activations).to(self.device)
            up = torch.nn.functional.interpolate(acts, size=input_tensor.shape[-2:], mode="bilinear", align_corners=True)
            flat = up.flatten(2)
            lo, hi = flat.min(-1)[0][..., None, None], flat.max(-1)[0][..., None, None]
            masks = (up - lo) / (hi - lo + 1e-8)  # (B, channels, H, W)
            weights = []
            cached: torch.Tensor | None = None
            for b, target in enumerate(targets):
                same = b > 0 and torch.equal(input_tensor[b], input_tensor[b - 1]) and torch.equal(acts[b], acts[b - 1])
                if not same or cached is None:
                    outputs = []
                    n = masks.shape[1]
                    for start in range(0, n, self.batch_size):
                        batch = input_tensor[b][None] * masks[b, start : start + self.batch_size, None]
                        before = len(store)
                        outputs.append(self.model(batch).float())
                        del store[before:]  # the forward hook would otherwise keep every masked batch
                        if self.progress is not None:
                            self.progress(min(1.0, (start + self.batch_size) / n))
                    cached = torch.cat(outputs)  # (channels, n_outputs)
                scores = torch.stack([target(o) for o in cached]).reshape(-1).float()
                weights.append(torch.softmax(scores, dim=0).cpu().numpy())
            return np.stack(weights)


def _raw(cls: type[BaseCAM]) -> type[BaseCAM]:
    return type(f"Raw{cls.__name__}", (_RawCamMixin, cls), {})


@dataclass(frozen=True)
class CamMethod:
    name: str
    label: str
    cam_class: type[BaseCAM]
    #: needs the whole network (masks the image) rather than the head
    perturbation: bool = False
    #: the map is the same for every class
    class_agnostic: bool = False


CAM_METHODS: dict[str, CamMethod] = {
    m.name: m
    for m in (
        CamMethod("gradcam", "Grad-CAM", _raw(GradCAM)),
        CamMethod("gradcam++", "Grad-CAM++", _raw(GradCAMPlusPlus)),
        CamMethod("hirescam", "HiResCAM", _raw(HiResCAM)),
        CamMethod("xgradcam", "XGrad-CAM", _raw(XGradCAM)),
        CamMethod("layercam", "LayerCAM", _raw(LayerCAM)),
        CamMethod("eigencam", "Eigen-CAM (class-agnostic)", _raw(EigenCAM), class_agnostic=True),
        CamMethod("scorecam", "Score-CAM", _raw(_SharedMaskScoreCAM), perturbation=True),
    )
}


@dataclass(frozen=True, eq=False)
class Heatmap:
    """One class's map. Kept at the CAM layer's resolution and resized on demand: a 2k film's
    full-resolution maps cost 14 MB each, and a session keeps several explanations.

    ``raw`` and ``scaled`` are (H, W) at ``shape`` (the film's resolution unless asked
    otherwise); :meth:`at` gives them at any other size, e.g. for display.
    """

    target: str
    probability: float
    low: np.ndarray  # (h, w) float32 >= 0 at the layer's resolution, the method's own units
    shape: tuple[int, int]  # (H, W)
    #: the part of the film the network saw, as fractions (top, bottom, left, right): the
    #: whole film, or a model's lung crop; the map covers that box and is zero outside it
    box: Box = WHOLE_FILM

    def at(self, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """(raw, scaled) resized to ``shape``. Bilinear resizing is linear, so min-max after
        resizing equals the library's normalise -> resize -> normalise, with the full range used."""
        if self.box == WHOLE_FILM:
            raw = resize_maps(self.low[None], shape)
        else:
            top, bottom, left, right = box_pixels(self.box, shape)
            raw = np.zeros((1, *shape), np.float32)
            raw[:, top:bottom, left:right] = resize_maps(self.low[None], (bottom - top, right - left))
        return raw[0], scale_minmax(raw)[0]

    @property
    def raw(self) -> np.ndarray:
        """(H, W) float32 >= 0 at ``shape``."""
        return self.at(self.shape)[0]

    @property
    def scaled(self) -> np.ndarray:
        """(H, W) float32 in [0, 1] at ``shape``, min-max over this map."""
        return self.at(self.shape)[1]

    @property
    def peak(self) -> float:
        return float(self.raw.max())


@dataclass(frozen=True, eq=False)
class Explanation:
    model: str  # "id@version"
    method: str
    layer: str
    prediction: Prediction
    heatmaps: tuple[Heatmap, ...]

    def heatmap(self, target: str) -> Heatmap:
        for heatmap in self.heatmaps:
            if heatmap.target == target:
                return heatmap
        raise ExplanationError(f"No heatmap for class {target!r} in this explanation.")

    def describe(self, target: str, label: Callable[[str], str] = str) -> str:
        """What the map for ``target`` shows, in one line (the page's caption, an export's description)."""
        method = CAM_METHODS[self.method]
        return (
            f"{method.label} for {label(target)} (p = {self.heatmap(target).probability:.3f}), layer {self.layer}"
            + (" — this method ignores the class: the same map for every class" if method.class_agnostic else "")
        )


def get_method(name: str) -> CamMethod:
    try:
        return CAM_METHODS[name.lower()]
    except KeyError:
        raise ExplanationError(f"Unknown CAM method {name!r}; choose one of {', '.join(CAM_METHODS)}.") from None


def class_targets(manifest: Manifest, classes: Sequence[str]) -> list[Callable[[torch.Tensor], torch.Tensor]]:
    """pytorch-grad-cam targets for class names: a logit, or +/- the single logit of a binary head."""
    targets: list[Callable[[torch.Tensor], torch.Tensor]] = []
    for cls in classes:
        if cls not in manifest.classes:
            raise ExplanationError(f"{manifest.key} has no class {cls!r}; its classes are {', '.join(manifest.classes)}.")
        index = manifest.classes.index(cls)
        if manifest.head == "sigmoid":
            # classes[0] is the positive class: +logit; classes[1] its complement: -logit.
            targets.append(BinaryClassifierOutputTarget(1 if index == 0 else 0))
        else:
            targets.append(ClassifierOutputTarget(index))
    return targets


def compute_raw_cams(
    model: LoadedModel,
    batch: torch.Tensor,
    method: str,
    classes: Sequence[str],
    layer: str | None = None,
    progress: ProgressCallback | None = None,
) -> tuple[np.ndarray, torch.Tensor]:
    """Raw CAMs of one image for several classes.

    Args:
        batch: (1, C, H, W) normalised input.
        classes: K class names.
        layer: module path; None for the model's default CAM layer.

    Returns:
        (cams, logits): cams (K, h, w) float32 >= 0 at the layer's resolution;
        logits (1, n_outputs) from the same forward pass.
    """
    if batch.ndim != 4 or batch.shape[0] != 1:
        raise ValueError(f"expected one image of shape (1, C, H, W), got {tuple(batch.shape)}")
    spec = get_method(method)
    manifest = model.manifest
    targets = class_targets(manifest, classes)
    default_layer = manifest.cam_target_layers[0] if manifest.cam_target_layers else None
    layer = layer or default_layer
    if layer is None:
        raise ExplanationError(f"{manifest.key} names no CAM layer.")
    try:
        model.network.get_submodule(layer)
    except AttributeError:
        raise ExplanationError(f"{manifest.key} has no layer {layer!r}.") from None
    network = model.network
    batch = batch.to(model.device)
    k = len(targets)

    backbone_out = _is_backbone_output(network, layer)
    if backbone_out and not spec.perturbation:
        with torch.no_grad():
            features = network.backbone(batch)
            logits = network.head(features).float().cpu()
        head = copy.deepcopy(network.head)  # private hooks: no lock needed
        feats = features.detach().repeat(k, 1, 1, 1).requires_grad_(True)
        with torch.enable_grad(), _hooked(spec, head, head.feature_map) as cam:
            cams = cam(input_tensor=feats, targets=targets)
        return cams, logits

    with model.lock, torch.enable_grad(), _hooked(spec, network, network.get_submodule(layer), progress) as cam:
        inputs = batch.repeat(k, 1, 1, 1)
        if not spec.perturbation:
            # Weights are frozen: gradients reach inner activations only through the input.
            inputs.requires_grad_(True)
        cams = cam(input_tensor=inputs, targets=targets)
        logits = cam.outputs[:1].detach().float().cpu()
    return cams, logits


@contextmanager
def _hooked(
    spec: CamMethod, module: torch.nn.Module, layer: torch.nn.Module, progress: ProgressCallback | None = None
) -> Iterator[BaseCAM]:
    """A CAM whose hooks are removed on exit, whatever happens.

    Not the library's own ``with``: its ``__exit__`` swallows IndexError and prints.
    """
    cam = spec.cam_class(model=module, target_layers=[layer])
    if spec.perturbation:
        cam.progress = progress  # type: ignore[attr-defined]
    try:
        yield cam
    finally:
        cam.activations_and_grads.release()


def _is_backbone_output(network: torch.nn.Module, layer: str) -> bool:
    """True when ``layer``'s output is the backbone's output (its last child)."""
    if layer in ("head.feature_map",):
        return True
    backbone = getattr(network, "backbone", None)
    if backbone is None or not layer.startswith("backbone."):
        return False
    children = list(backbone.named_children())
    return bool(children) and layer == f"backbone.{children[-1][0]}"


def scale_minmax(cams: np.ndarray) -> np.ndarray:
    """(K, h, w) -> per-map min-max to [0, 1], as pytorch-grad-cam's scale_cam_image does."""
    lo = cams.min(axis=(1, 2), keepdims=True)
    hi = cams.max(axis=(1, 2), keepdims=True)
    scaled = (cams - lo) / (hi - lo + 1e-7)
    # A flat map (all zero, or constant up to float noise) has nothing to show; stretching
    # its rounding noise to [0, 1] would paint a confident-looking pattern.
    flat = (hi - lo) <= 1e-5 * np.maximum(np.abs(hi), 1e-12)
    return np.where(flat, 0.0, scaled).astype(np.float32)


def resize_maps(maps: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(K, h, w) -> (K, H, W), bilinear."""
    height, width = shape
    return np.stack([cv2.resize(m, (width, height), interpolation=cv2.INTER_LINEAR) for m in maps]).astype(np.float32)


def explain(
    model: LoadedModel,
    image: XrayImage,
    *,
    method: str = "gradcam",
    targets: Sequence[str] | None = None,
    layer: str | None = None,
    progress: ProgressCallback | None = None,
    size: tuple[int, int] | None = None,
) -> Explanation:
    """Heatmaps of ``image`` for ``targets`` (default: every class), at the image's resolution
    or at ``size`` (H, W) when given (a grid of panels needs no 2k-pixel maps).

    The prediction comes from the same forward pass as the maps.
    """
    manifest = model.manifest
    classes = list(targets) if targets else list(manifest.classes)
    box = lung_crop_boxes([image.pixels], manifest.input)[0]
    batch = to_input(image.pixels, manifest.input, box).unsqueeze(0)
    raw_low, logits = compute_raw_cams(model, batch, method, classes, layer=layer, progress=progress)
    probs = logits_to_probabilities(logits, manifest)[0]
    prediction = make_prediction(manifest, probs)
    shape = tuple(size or image.shape)
    heatmaps = tuple(
        Heatmap(target=cls, probability=prediction.probability(cls), low=np.ascontiguousarray(raw_low[i]), shape=shape, box=box)  # type: ignore[arg-type]
        for i, cls in enumerate(classes)
    )
    used_layer = layer or (manifest.cam_target_layers[0] if manifest.cam_target_layers else "")
    return Explanation(model=manifest.key, method=get_method(method).name, layer=used_layer, prediction=prediction, heatmaps=heatmaps)
