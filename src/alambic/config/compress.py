"""``compress``: the settings of ``alambic compress`` (prune, recover, quantize, export)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from alambic.config.base import StrictModel, Term, TrainConfig


class PruneConfig(StrictModel):
    """``compress.prune``: ``magnitude`` zeroes weights (amount = sparsity); ``channel`` removes units;
    ``heads`` removes the least important attention heads of a BERT-family student."""

    method: Literal["magnitude", "channel", "heads"] = "channel"
    # magnitude: fraction of weights zeroed; channel: of units removed; heads: of attention heads removed
    amount: float = Field(0.5, ge=0, lt=1)


def _train_over(defaults: dict):
    """A ``before`` validator: a partial ``train`` mapping keeps this stage's defaults for the keys it omits."""

    def merge(value: Any) -> Any:
        return {**defaults, **value} if isinstance(value, dict) else value

    return merge


RECOVER_TRAIN = {"epochs": 1, "optimizer": "adamw", "lr": 0.001}


QAT_TRAIN = {"epochs": 1, "optimizer": "adamw", "lr": 0.0005, "weight_decay": 0.0}


class RecoverConfig(StrictModel):
    """``compress.recover``: distill the unpruned student into the pruned one."""

    terms: list[Term] = Field(
        default_factory=lambda: [
            Term(loss="ce", weight=0.1),
            Term(loss="kd", weight=0.9, params={"temperature": 4.0}),
        ]
    )
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(**RECOVER_TRAIN))
    _train_defaults = field_validator("train", mode="before")(_train_over(RECOVER_TRAIN))


class QuantizeConfig(StrictModel):
    """``compress.quantize``: onnxruntime int8, optionally after quantization-aware training with KD."""

    method: Literal["static", "dynamic"] = "static"
    calibration_samples: int = Field(256, ge=1)  # training samples that calibrate static ranges
    activation_type: Literal["uint8", "int8"] = "uint8"  # uint8 (U8S8) is the fast one on x86 CPUs
    per_channel: bool = True
    reduce_range: bool = False  # 7-bit weights, for CPUs without VNNI where U8S8 products can saturate
    qat: bool = False  # quantization-aware training with KD before quantizing
    qat_teacher: Literal["teacher", "float"] = "teacher"  # the run's teacher, or the float student itself
    qat_temperature: float = Field(2.0, gt=0)  # Distiller: high temperatures can hurt low-bit students
    qat_kd_weight: float = Field(0.9, ge=0, le=1)
    qat_train: TrainConfig = Field(default_factory=lambda: TrainConfig(**QAT_TRAIN))
    _train_defaults = field_validator("qat_train", mode="before")(_train_over(QAT_TRAIN))


class CompressConfig(StrictModel):
    """``alambic compress``: distilled student -> prune -> recover -> quantize -> export, each measured."""

    stages: list[Literal["prune", "recover", "quantize", "export"]] = Field(
        default_factory=lambda: ["prune", "recover", "quantize", "export"]
    )
    prune: PruneConfig = Field(default_factory=PruneConfig)
    recover: RecoverConfig = Field(default_factory=RecoverConfig)
    quantize: QuantizeConfig = Field(default_factory=QuantizeConfig)
    export_formats: list[Literal["onnx", "torch-export", "safetensors"]] = Field(
        default_factory=lambda: ["onnx", "torch-export", "safetensors"]
    )
    eval_subset: int | None = Field(None, ge=1)  # evaluate on this many test samples (evenly spread)

    @model_validator(mode="after")
    def _recover_after_prune(self) -> CompressConfig:
        if "recover" in self.stages and "prune" not in self.stages:
            raise ValueError(
                "stage 'recover' distills into the pruned student; add 'prune' to compress.stages"
            )
        return self
