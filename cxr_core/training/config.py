"""TrainConfig: everything that determines a training run, serialisable to JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from cxr_core.models.manifest import INTENSITY_MODES
from cxr_core.training.augment import AugmentConfig

BALANCE_MODES = ("weights", "sampler", "source", "none")


@dataclass(frozen=True)
class TrainConfig:
    data_dir: str
    arch: str
    out: str  # the model folder to write
    model_id: str
    version: str = "1.0.0"
    name: str = ""
    #: model classes in output order; with ``binary_positive`` they are (positive, "other")
    classes: tuple[str, ...] = ("covid", "normal", "viral_pneumonia")
    binary_positive: str | None = None
    #: multi-class only: folder labels trained as extra outputs after ``classes`` and dropped
    #: from the exported model (its softmax renormalises over ``classes``). On the shared
    #: data, bacterial pneumonia gives the network children with pneumonia that are not
    #: viral, so "child with opacities" cannot stand in for "viral pneumonia".
    aux_classes: tuple[str, ...] = ()
    #: progressive resizing: (input size, epochs) phases; the last size is deployed
    schedule: tuple[tuple[int, int], ...] = ((224, 10),)
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-4
    label_smoothing: float = 0.0
    #: "weights" (loss weights), "sampler" (balanced sampling), "source" (loss weights that
    #: balance every (source, label) group, so that within one source no class is favoured:
    #: the shared data's sources each hold only some classes) or "none"
    balance: str = "weights"
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    #: "random", "imagenet", or a checkpoint path (safetensors or a torch weights-only file)
    init: str = "random"
    #: epochs with the backbone frozen (head only) before full fine-tuning
    freeze_epochs: int = 0
    #: learning rate multiplier per backbone stage, from the head backwards (discriminative LRs)
    layer_decay: float = 1.0
    #: stop after this many epochs of the final phase without improvement (0: never)
    patience: int = 0
    select_on: str = "loss"  # "loss" or "accuracy" on validation
    val_fraction: float = 0.1
    #: the positive class's threshold is chosen on validation for this sensitivity
    target_sensitivity: float | None = 0.95
    seed: int = 0
    workers: int = 2
    device: str | None = None
    channels_last: bool = True
    amp: bool = True  # bf16 autocast on CUDA
    #: bf16 autocast on CPUs with native bf16 (AMX or AVX512-BF16): about twice as fast there
    amp_cpu: bool = True
    #: inpaint burned-in text and markers on every film (and so at inference: InputSpec)
    mask_burned_in: bool = False
    #: every N optimiser steps of the final phase, add the weights to a running average;
    #: the average (batch-norm statistics recomputed) is the model exported (0: off, the
    #: best final-phase epoch on validation is)
    average_every: int = 0
    #: more labelled folders merged with ``data_dir`` (checked across all of them as one set)
    extra_data_dirs: tuple[str, ...] = ()
    #: "film" or "lungs": what the network sees (cxr_core.models.manifest.CROP_MODES); a lung crop
    #: uses the installed lung segmenter, recorded in the model's manifest
    crop: str = "film"
    crop_margin: float = 0.1
    #: "fixed", "standardise" or "clahe": what every film's grey levels get before the network
    #: (cxr_core.models.manifest.INTENSITY_MODES)
    intensity: str = "fixed"
    #: probability per training step of MixStyle (cxr_core.training.mixstyle): the channel
    #: statistics of early feature maps mixed between films of the batch; 0 = off
    mix_style: float = 0.0
    #: weight of a distillation term that keeps the outputs near those of the ``init`` model
    #: (learning without forgetting: cxr_core.training.distill); 0 = off. With it, a model class
    #: other than the first may have no films: the ``init`` model's view of it is what is kept
    distill: float = 0.0
    #: films of these sources get no distillation term (a site adaptation's own films, so that
    #: what the base model got wrong there is learned from the labels alone)
    distill_skip_sources: tuple[str, ...] = ()
    #: the distillation term compares only the model classes without training films (each on its
    #: own, every other class pooled): the labels alone decide among the rest
    distill_missing_only: bool = False
    #: the exported weights are (1 - a) * init + a * the run's best (WiSE-FT:
    #: cxr_core.training.interpolate); 1 = the run's own weights. Needs ``init`` to be a model
    #: with exactly this model's outputs
    interpolate: float = 1.0

    @property
    def data_dirs(self) -> tuple[str, ...]:
        """Every labelled folder the run reads, ``data_dir`` first."""
        return (self.data_dir, *self.extra_data_dirs)

    @property
    def total_epochs(self) -> int:
        return sum(epochs for _, epochs in self.schedule)

    @property
    def final_size(self) -> int:
        return self.schedule[-1][0]

    def size_at(self, epoch: int) -> int:
        """Input size of 0-based ``epoch``."""
        seen = 0
        for size, epochs in self.schedule:
            seen += epochs
            if epoch < seen:
                return size
        return self.final_size

    def in_final_phase(self, epoch: int) -> bool:
        return epoch >= self.total_epochs - self.schedule[-1][1]

    @property
    def model_classes(self) -> tuple[str, ...]:
        return (self.binary_positive, "other") if self.binary_positive else tuple(self.classes)

    @property
    def training_classes(self) -> tuple[str, ...]:
        """The network's outputs while training: the model's classes, then ``aux_classes``."""
        return self.model_classes + tuple(self.aux_classes)

    @property
    def n_outputs(self) -> int:
        """Outputs of the network being trained (the exported model drops the auxiliary ones)."""
        return 1 if self.head == "sigmoid" else len(self.training_classes)

    @property
    def head(self) -> str:
        return "sigmoid" if self.binary_positive else "softmax"

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["schedule"] = [list(p) for p in self.schedule]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["classes"] = tuple(values.get("classes", ()))
        values["aux_classes"] = tuple(values.get("aux_classes", ()))
        values["extra_data_dirs"] = tuple(values.get("extra_data_dirs", ()))
        values["distill_skip_sources"] = tuple(values.get("distill_skip_sources", ()))
        values["schedule"] = tuple(tuple(p) for p in values.get("schedule", ((224, 10),)))
        aug = dict(values.get("augment") or {})
        if "scale" in aug:
            aug["scale"] = tuple(aug["scale"])
        if aug and "sharpness" not in aug:
            # A run recorded before the sharpness augmentation existed resumes as it was trained.
            aug["sharpness"] = 0.0
        if data and "amp_cpu" not in data:
            values["amp_cpu"] = False  # recorded before CPU bf16 existed: resume in fp32
        values["augment"] = AugmentConfig(**aug)
        return cls(**values)

    def validate(self) -> None:
        if not self.schedule or any(size < 32 or epochs < 1 for size, epochs in self.schedule):
            raise ValueError("schedule needs (size >= 32, epochs >= 1) phases")
        if self.balance not in BALANCE_MODES:
            raise ValueError("balance must be weights, sampler, source or none")
        if self.select_on not in ("loss", "accuracy"):
            raise ValueError("select_on must be loss or accuracy")
        if self.binary_positive is None and len(self.classes) < 2:
            raise ValueError("a multi-class model needs at least two classes")
        if self.aux_classes and self.binary_positive:
            raise ValueError("auxiliary classes are for multi-class models (a binary model already uses every folder)")
        if set(self.aux_classes) & set(self.classes) or len(set(self.aux_classes)) != len(self.aux_classes):
            raise ValueError("auxiliary classes must differ from the model's classes and from each other")
        if self.batch_size < 2:
            raise ValueError("batch_size must be at least 2")
        if self.crop not in ("film", "lungs") or not 0.0 <= self.crop_margin <= 1.0:
            raise ValueError("crop must be film or lungs, with a margin in [0, 1]")
        if self.intensity not in INTENSITY_MODES:
            raise ValueError(f"intensity must be one of {', '.join(INTENSITY_MODES)}")
        if not 0.0 <= self.mix_style <= 1.0:
            raise ValueError("mix_style is a probability in [0, 1]")
        if self.augment.acquisition_positive is not None and not self.augment.acquisition:
            # augment() draws no artefact at all without the rate for the other classes.
            raise ValueError("acquisition_positive (--acquisition-positive Q) sets the COVID-19 films' rate beside "
                             "acquisition (--acquisition P); without P > 0 no film gets artefacts")
        if self.distill < 0:
            raise ValueError("distill is a weight >= 0")
        if self.distill_missing_only and self.binary_positive:
            raise ValueError("distill_missing_only is for multi-class models (a binary model's two classes always have films)")
        if self.distill and self.init in ("random", "imagenet"):
            raise ValueError("distill keeps a trained model's outputs: init must be that model's weights")
        if not 0.0 <= self.interpolate <= 1.0:
            raise ValueError("interpolate is a weight in [0, 1]")
        if self.interpolate < 1.0 and self.init in ("random", "imagenet"):
            raise ValueError("interpolate moves the weights toward a trained model: init must be that model's weights")
        if self.average_every < 0:
            raise ValueError("average_every must be 0 (off) or a number of steps")
