"""Typed training configuration, resolved once and saved with every run."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from pneumonia import atomic
from pneumonia.card import DEFAULT_MIN_SENSITIVITY, RULES
from pneumonia.data import DEFAULT_SPLIT_SEED, DEFAULT_VAL_FRACTION
from pneumonia.preprocess import PreprocessSpec
from pneumonia.training.augment import AugmentConfig
from pneumonia.training.model import ARCHS, ModelConfig


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run.

    The defaults are the v2 recipe (docs/model.md): EfficientNet-Lite0 from ImageNet weights,
    fine-tuned end to end at 160 px with the shape-breaking augmentation, AdamW with a
    one-cycle schedule (peak 1e-3), batch 32, 4 epochs, one member; calibrated and thresholded
    on the stressed validation.

    Attributes:
        seeds: One ensemble member is trained per seed; their logits are averaged.
        split_seed: Seed of the patient-grouped validation split (fixed across members).
        val_fraction: Share of each class's training images held out as validation patients.
        epochs: Maximum epochs per member.
        patience: Stop a member after this many epochs without a better checkpoint.
        schedule: "onecycle" (linear warm-up over the first 30% of steps from lr / 25, then
            cosine to lr / 1e4) or "cosine" (``warmup_epochs`` of linear warm-up, then cosine).
        calibrate_on: "stressed" fits temperature and bias on the stressed validation pooled
            (every perturbation, clean included); "clean" on the validation split as it is.
        threshold_rule / min_sensitivity: How the operating threshold is chosen on validation, a
            rule of :data:`pneumonia.card.RULES` ("stressed_youden" maximises Youden's J on the
            pooled stressed validation and keeps the clean validation's sensitivity at least
            ``min_sensitivity``; "min_sensitivity" and "youden" use the clean validation).
        stress_seed: Seed of the stressed validation's random perturbations (noise).
        device: "auto" (CUDA when present, else CPU), "cpu" or "cuda".
        precision: Training arithmetic: "auto" (bfloat16 autocast and channels-last memory on
            CUDA, float32 on CPU, where bfloat16 is slow on most processors), "fp32", or "bf16"
            (autocast on either device). Evaluation, calibration and export stay float32.
        max_images: Use at most this many training images (for smoke tests); None for all.
        threads: Torch CPU threads; None uses every core. The count a run used is recorded in
            its environment.json (another count gives other weights: docs/model.md).
    """

    preprocess: PreprocessSpec = field(
        default_factory=lambda: PreprocessSpec(size=160, normalization=ARCHS["effnet_lite0"])
    )
    model: ModelConfig = field(default_factory=lambda: ModelConfig(arch="effnet_lite0"))
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    seeds: tuple[int, ...] = (0,)
    split_seed: int = DEFAULT_SPLIT_SEED
    val_fraction: float = DEFAULT_VAL_FRACTION
    epochs: int = 4
    patience: int = 8
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    schedule: str = "onecycle"
    calibrate_on: str = "stressed"
    threshold_rule: str = "stressed_youden"
    min_sensitivity: float = DEFAULT_MIN_SENSITIVITY
    stress_seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    max_images: int | None = None
    threads: int | None = None

    def __post_init__(self) -> None:
        if not self.seeds:
            raise ValueError("seeds must name at least one seed")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(
                f"epochs and batch_size must be >= 1, got {self.epochs}, {self.batch_size}"
            )
        if not 0.5 <= self.min_sensitivity < 1.0:
            raise ValueError(f"min_sensitivity must be in [0.5, 1), got {self.min_sensitivity}")
        choices = {
            "schedule": ("onecycle", "cosine"),
            "calibrate_on": ("stressed", "clean"),
            "threshold_rule": tuple(RULES),
            "device": ("auto", "cpu", "cuda"),
            "precision": ("auto", "fp32", "bf16"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"{name} must be one of {list(allowed)}, got {getattr(self, name)!r}"
                )
        # The spec states what the network does to its input; it follows the architecture.
        if self.preprocess.normalization != self.model.normalization:
            object.__setattr__(
                self, "preprocess", replace(self.preprocess, normalization=self.model.normalization)
            )

    def with_overrides(self, **kw: Any) -> TrainConfig:
        return replace(self, **{k: v for k, v in kw.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["preprocess"] = self.preprocess.to_dict()
        d["model"] = self.model.to_dict()
        d["augment"] = self.augment.to_dict()
        d["seeds"] = list(self.seeds)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        kw = dict(d)
        kw["preprocess"] = PreprocessSpec.from_dict(kw["preprocess"])
        kw["model"] = ModelConfig.from_dict(kw["model"])
        kw["augment"] = AugmentConfig.from_dict(kw["augment"])
        kw["seeds"] = tuple(kw["seeds"])
        return cls(**kw)

    def save(self, path: Path) -> None:
        atomic.write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> TrainConfig:
        return cls.from_dict(json.loads(path.read_text()))
