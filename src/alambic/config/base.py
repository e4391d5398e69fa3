"""Settings that functions below the run layer receive: a term, a model, a training stage's loop."""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from alambic.errors import ConfigError
from alambic.imports import package_file
from alambic.losses import check_hyper_parameters, get_loss_spec

STAGES = ("teacher", "baseline", "distill", "evaluate", "report")


class StrictModel(BaseModel):
    """A config section: unknown keys, wrong types and inf / NaN values are refused with the key's path."""

    # inf and NaN are never a setting (lr: .inf, weight: .nan): refused with the key's path
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def _non_finite(value: Any, path: str) -> str | None:
    """The path of the first inf / NaN number inside a hyper-parameter value (lists and mappings too)."""
    if isinstance(value, float) and not math.isfinite(value):
        return path
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    return next((found for key, item in items if (found := _non_finite(item, f"{path}.{key}"))), None)


class Term(StrictModel):
    """One distillation term: a registered loss, its weight, its hyper-parameters, what it compares."""

    loss: str
    weight: float = 1.0
    params: dict[str, Any] = Field(default_factory=dict)
    # "logits", a module path ("layer3"), "path:input" (what the module receives), or, for losses that
    # compare several features (fsp, review_kd), a list of paths
    student: str | list[str] = "logits"
    teacher: str | list[str] = "logits"
    # maps the student's feature to the teacher's shape: auto (when the loss needs equal shapes and
    # they differ), none, linear (vectors / tokens), conv1x1 (feature maps, + BN, resized if needed)
    connector: Literal["auto", "none", "linear", "conv1x1"] = "auto"

    @model_validator(mode="after")
    def _known_loss(self) -> Term:
        try:
            spec = get_loss_spec(self.loss)
            check_hyper_parameters(self.loss, self.params)
        except ConfigError as error:
            raise ValueError(str(error)) from None
        bad = _non_finite(self.params, "params")
        if bad is not None:
            raise ValueError(f"{bad} must be a finite number")
        temperature = self.params.get("temperature")
        if temperature is not None and (
            isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0
        ):
            raise ValueError(
                f"temperature must be > 0 (a number), got {temperature!r} (Hinton et al. use 1 to 20; try 4)"
            )
        if not spec.needs_teacher and self.teacher != "logits":
            raise ValueError(f"loss {self.loss!r} does not use the teacher; remove 'teacher: {self.teacher}'")
        lists = isinstance(self.student, list), isinstance(self.teacher, list)
        if spec.multi_feature and not (all(lists) and len(self.student) == len(self.teacher) >= 1):
            raise ValueError(
                f"loss {self.loss!r} compares lists of features: give student and teacher as lists of "
                f"module paths of one length (got student {self.student!r}, teacher {self.teacher!r})"
            )
        if not spec.multi_feature and any(lists):
            raise ValueError(f"loss {self.loss!r} compares one feature; give one module path, not a list")
        if spec.multi_feature and self.connector not in ("auto", "none"):
            raise ValueError(f"loss {self.loss!r} builds its own adapters; leave connector on auto")
        return self

    @property
    def name(self) -> str:
        """The key this term's value is logged under."""
        if self.student == "logits":
            return self.loss
        if isinstance(self.student, list):
            return f"{self.loss}:{self.student[0]}..{self.student[-1]}"
        return f"{self.loss}:{self.student}"


class LoraSettings(StrictModel):
    """LoRA adapters on a model (:func:`alambic.models.lora.with_lora`): its weights frozen, low-rank
    updates of ``target_modules`` trained; merged into plain weights on export."""

    r: int = Field(8, ge=1)  # rank
    alpha: float = Field(16.0, gt=0)  # the update is scaled by alpha / r
    dropout: float = Field(0.0, ge=0, lt=1)
    # linear layers' names (q_proj, v_proj, c_attn, ...), "all-linear", or None: peft's default for the model type
    target_modules: (
        Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)]
        | Literal["all-linear"]
        | None
    ) = None


HF_PREFIX = "hf:"  # a Hugging Face model: hf:FOLDER or hf:HUB_ID
LLAMA2C_PREFIX = "llama2c:"  # a llama2.c checkpoint, loaded as a Hugging Face Llama
HF_CONFIG = "hf-config"  # a Hugging Face model built from scratch from a config written in the YAML


def hf_path(arch: str) -> str | None:
    """The folder, hub id or ``.gguf`` file of an ``hf:`` architecture (``hf:pkg:PACKAGE/FILE``: a file an
    installed package ships, see :func:`alambic.imports.package_file`), else None."""
    return package_file(arch.removeprefix(HF_PREFIX)) if arch.startswith(HF_PREFIX) else None


def is_pretrained_language_model(arch: str) -> bool:
    """Whether ``arch`` loads a whole pretrained model from its own file (``hf:``, ``llama2c:``): in a
    causal-LM run, the trained teacher unless the run has a teacher stage."""
    return arch.startswith((HF_PREFIX, LLAMA2C_PREFIX))


def is_transformers_model(arch: str) -> bool:
    """Whether ``arch`` builds a ``transformers`` model (``hf:``, ``hf-config``, ``llama2c:``), which a
    student can be derived from (``derive:teacher``)."""
    return is_pretrained_language_model(arch) or arch == HF_CONFIG


class ModelConfig(StrictModel):
    """A model: a zoo name (``resnet20``, ``mlp``), a user factory ``package.module:function``, a
    Hugging Face model ``hf:PATH_OR_ID`` (kwargs go to :func:`alambic.models.hf.load_hf_model`: task, ...), a
    llama2.c checkpoint ``llama2c:PATH`` (a ``.bin`` loaded as a Hugging Face Llama; no kwargs), or,
    for the student, ``derive:teacher``: fewer of the trained teacher's layers, initialised from them
    (kwargs ``layers``, ``keep`` or ``every`` go to :func:`alambic.models.hf.derive_student`). ``lora``
    adapts the built model (after its checkpoint is loaded) with LoRA (:class:`LoraSettings`)."""

    arch: str
    kwargs: dict[str, Any] = Field(default_factory=dict)
    checkpoint: str | None = None  # weights to load (safetensors, or a torch checkpoint read weights_only)
    lora: LoraSettings | None = None  # adapt the model with LoRA: only the adapters train (students)


class LoopSettings(StrictModel):
    """What the training loop (:func:`alambic.core.loop.fit`) runs with: budget, optimizer, schedule,
    evaluation, logging and checkpoint cadence, compilation."""

    epochs: int = Field(10, ge=1)
    # optimizer steps: the stage stops after exactly this many (mid-epoch too) and its schedule spans
    # them; epochs is then ignored (the epochs run are as many as the steps need)
    max_steps: int | None = Field(None, ge=1)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(5e-4, ge=0)
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0)
    milestones: list[int] = Field(default_factory=list)  # epochs, for schedule: step
    gamma: float = Field(0.1, gt=0)  # step decay factor
    grad_clip: float | None = Field(None, gt=0)
    eval_every: int = Field(1, ge=0)  # epochs; 0 = only at the end
    log_every: int = Field(20, ge=1)  # optimizer steps
    checkpoint_every: int = Field(1, ge=1)  # epochs
    compile: bool = False  # torch.compile the student's (and teacher's) forward pass
    # CUDA graphs (torch.compile mode reduce-overhead) over the whole loss, a live teacher and the
    # optimizer step: for small, host-bound steps on a GPU; needs CUDA, one process, grad_accum 1
    cuda_graphs: bool = False
    channels_last: bool = False  # NHWC memory format for convnets (faster on GPUs, and with bf16)
    # a live teacher's forward on a second CUDA stream, overlapping the student's (no effect on CPU)
    overlap_teacher: bool = False

    @model_validator(mode="after")
    def _milestones(self) -> LoopSettings:
        if self.schedule == "step" and not self.milestones:
            raise ValueError(
                "schedule 'step' needs milestones (epochs at which the lr is multiplied by gamma)"
            )
        return self


class EarlyStoppingConfig(StrictModel):
    """``train.early_stopping``: stop when ``monitor`` (an evaluation metric, or ``train_total``) has not
    improved by more than ``min_delta`` for ``patience`` evaluations."""

    monitor: str = "loss"
    patience: int = Field(3, ge=1)
    min_delta: float = Field(0.0, ge=0)
    mode: Literal["auto", "max", "min"] = "auto"  # auto: max for accuracy, F1, AUC; min otherwise


class TrainConfig(LoopSettings):
    """One training stage of a run config: the loop's settings (:class:`LoopSettings`) and how its
    batches are made (size, accumulation, augmentation, mixing)."""

    batch_size: int = Field(64, ge=1)
    # micro-batches per step; a last, shorter window of an epoch is scaled as a full one (Accelerate)
    grad_accum: int = Field(1, ge=1)
    augment: bool | None = None  # this stage only; None follows data.augment (false turns it off here)
    # mixup / cutmix of each sample with a random partner (teacher and student see the same mixed view)
    mix: Literal["none", "mixup", "cutmix"] = "none"
    mix_alpha: float = Field(1.0, gt=0)  # lam ~ Beta(mix_alpha, mix_alpha)
    early_stopping: EarlyStoppingConfig | None = None
    # an evaluation metric (accuracy, loss, perplexity, ...): the student returned and saved is the
    # one of the epoch where it was best
    keep_best: str | None = None

    def loop(self, **changes: Any) -> LoopSettings:
        """The loop's part of these settings (with ``changes``, e.g. ``lr=...``), as ``fit`` takes them."""
        return LoopSettings(**{**self.model_dump(include=set(LoopSettings.model_fields)), **changes})


def format_validation_error(error: ValidationError) -> str:
    """One line per problem: ``key.path: message (got value)``."""
    lines = []
    for item in error.errors():
        path = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key (check its spelling and level)"
        elif item["type"] == "missing":
            message = "required key is missing"
        got = "" if item["type"] in ("missing", "value_error") else f" (got {item.get('input')!r})"
        lines.append(f"{path}: {message}{got}")
    return "; ".join(lines)
