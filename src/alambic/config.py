"""Typed run configuration: pydantic models loaded from YAML, with ``--set key.path=value`` overrides.

Unknown keys and wrong types are rejected with the key's path. Configs hand flat arguments to
functions; the functions themselves never read a config object.

Example:
    >>> config = load_config("recipes/digits.yaml", overrides=["distill.train.epochs=3"])
    >>> config.distill.terms[1].params
    {'temperature': 4.0}
"""

from __future__ import annotations

import contextlib
import copy
import math
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from alambic.errors import ConfigError
from alambic.losses import check_hyper_parameters, get_loss_spec

STAGES = ("teacher", "baseline", "distill", "evaluate", "report")


class _Strict(BaseModel):
    # inf and NaN are never a setting (lr: .inf, weight: .nan): refused with the key's path
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def _non_finite(value: Any, path: str) -> str | None:
    """The path of the first inf / NaN number inside a hyper-parameter value (lists and mappings too)."""
    if isinstance(value, float) and not math.isfinite(value):
        return path
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    return next((found for key, item in items if (found := _non_finite(item, f"{path}.{key}"))), None)


class Term(_Strict):
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


class ModelConfig(_Strict):
    """A model: a zoo name (``resnet20``, ``mlp``), a user factory ``package.module:function``, a
    Hugging Face model ``hf:PATH_OR_ID`` (kwargs go to :func:`alambic.models.hf.load_hf_model`: task, ...), a
    llama2.c checkpoint ``llama2c:PATH`` (a ``.bin`` loaded as a Hugging Face Llama; no kwargs), or,
    for the student, ``derive:teacher``: fewer of the trained teacher's layers, initialised from them
    (kwargs ``layers``, ``keep`` or ``every`` go to :func:`alambic.models.hf.derive_student`)."""

    arch: str
    kwargs: dict[str, Any] = Field(default_factory=dict)
    checkpoint: str | None = None  # weights to load (safetensors, or a torch checkpoint read weights_only)


class TrainConfig(_Strict):
    """Optimizer, schedule and budget of one training stage."""

    epochs: int = Field(10, ge=1)
    batch_size: int = Field(64, ge=1)
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
    grad_accum: int = Field(
        1, ge=1
    )  # micro-batches per step; a last, shorter window of an epoch is scaled as a full one (Accelerate)
    eval_every: int = Field(1, ge=0)  # epochs; 0 = only at the end
    log_every: int = Field(20, ge=1)  # optimizer steps
    checkpoint_every: int = Field(1, ge=1)  # epochs
    augment: bool | None = None  # this stage only; None follows data.augment (false turns it off here)
    # mixup / cutmix of each sample with a random partner (teacher and student see the same mixed view)
    mix: Literal["none", "mixup", "cutmix"] = "none"
    mix_alpha: float = Field(1.0, gt=0)  # lam ~ Beta(mix_alpha, mix_alpha)
    compile: bool = False  # torch.compile the student's (and teacher's) forward pass
    channels_last: bool = False  # NHWC memory format for convnets (faster on GPUs, and with bf16)
    # a live teacher's forward on a second CUDA stream, overlapping the student's (no effect on CPU)
    overlap_teacher: bool = False

    @model_validator(mode="after")
    def _milestones(self) -> TrainConfig:
        if self.schedule == "step" and not self.milestones:
            raise ValueError(
                "schedule 'step' needs milestones (epochs at which the lr is multiplied by gamma)"
            )
        return self


def _default_ce() -> list[Term]:
    return [Term(loss="ce")]


class DataConfig(_Strict):
    """Which data set, where it lies, and how it is batched."""

    dataset: str = "digits"
    data_dir: str | None = None
    factory: str | None = None  # package.module:function, for dataset: custom
    factory_kwargs: dict[str, Any] = Field(default_factory=dict)
    augment: bool = False  # random crop with padding (+ horizontal flip for CIFAR)
    train_subset: int | None = Field(None, ge=1)
    test_fraction: float = Field(0.2, gt=0, lt=1)  # for data sets without a test split (digits)
    eval_batch_size: int = Field(256, ge=1)
    num_workers: int = Field(0, ge=0)
    # text sets (sst2): a transformers tokenizer (folder or hub id); default: the hf: teacher's own
    tokenizer: str | None = None
    max_length: int = Field(128, ge=2)


class TeacherConfig(_Strict):
    model: ModelConfig
    train: TrainConfig | None = None  # trains the teacher when no checkpoint is given
    terms: list[Term] = Field(default_factory=_default_ce)


class StudentConfig(_Strict):
    model: ModelConfig


class BaselineConfig(_Strict):
    """The student trained alone on labels, same budget as the distilled one unless ``train`` is given."""

    terms: list[Term] = Field(default_factory=_default_ce)
    train: TrainConfig | None = None

    @field_validator("terms")
    @classmethod
    def _no_teacher(cls, terms: list[Term]) -> list[Term]:
        for term in terms:
            if get_loss_spec(term.loss).needs_teacher:
                raise ValueError(
                    f"the baseline trains without a teacher, so it cannot use loss {term.loss!r}"
                )
        return terms


class DistillConfig(_Strict):
    terms: list[Term] = Field(
        default_factory=lambda: [
            Term(loss="ce", weight=0.1),
            Term(loss="kd", weight=0.9, params={"temperature": 4.0}),
        ]
    )
    train: TrainConfig = Field(default_factory=TrainConfig)
    # the teacher's weights in bfloat16 / float16 take half the memory (outputs come back as float32);
    # int8 stores its Linear weights in int8, a quarter (torchao weight-only; alambic[quant])
    teacher_dtype: Literal["float32", "bfloat16", "float16", "int8"] = "float32"
    # a folder written by `alambic cache-teacher`: the teacher's stored outputs replace its forward pass
    teacher_cache: str | None = None


class EvaluateConfig(_Strict):
    latency_repeats: int = Field(20, ge=1)
    batch_sizes: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [1, 64], min_length=1)
    # CPU threads while timing: 1 by default, as on a phone or an edge core, and because on a shared
    # machine several threads make small models' timings swing by 100x. null keeps torch's default.
    latency_threads: int | None = Field(1, ge=1)


class EnsembleStrategy(_Strict):
    """Several teachers as one: their averaged softened outputs, or one model of their averaged weights."""

    kind: Literal["ensemble"]
    teachers: list[ModelConfig] = Field(min_length=2)
    train: TrainConfig | None = None  # trains the teachers without a checkpoint (ce, data order seed + k)
    fusion: Literal["outputs", "weights"] = "outputs"
    weighting: Literal["fixed", "confidence", "entropy"] = "fixed"  # per-sample correctness: ensemble_kd
    weights: list[float] | None = None  # fixed weights, one per teacher (equal by default)
    temperature: float | None = Field(None, gt=0)  # of the average; default: the distill terms' temperature

    @model_validator(mode="after")
    def _sources(self) -> EnsembleStrategy:
        if self.train is None and any(model.checkpoint is None for model in self.teachers):
            raise ValueError("give every teacher a checkpoint, or strategy.train to train those without one")
        if self.weights is not None and len(self.weights) != len(self.teachers):
            raise ValueError(f"weights: one per teacher ({len(self.teachers)}), got {len(self.weights)}")
        return self


class MutualStrategy(_Strict):
    """Deep Mutual Learning: the student and its peers trained together, each distilled from the others."""

    kind: Literal["mutual"]
    peers: list[ModelConfig] = Field(min_length=1)  # trained beside the student (peer 0)
    # each peer's own terms, student first (online KD: a still-training teacher on [ce]); default distill.terms
    peer_terms: list[list[Term]] | None = None
    alternate: bool = False  # one peer updated per step, in turn (DML's Algorithm 1; "implicit" online KD)


class BornAgainStrategy(_Strict):
    """Born-again networks: generation k is distilled from generation k - 1 (the first from the teacher)."""

    kind: Literal["born_again"]
    generations: int = Field(2, ge=1)  # the last generation is the run's distilled student


class AssistantsStrategy(_Strict):
    """Teacher assistants: teacher -> assistant 1 -> ... -> student, each distilled from the one before."""

    kind: Literal["assistants"]
    assistants: list[ModelConfig] = Field(min_length=1)
    train: TrainConfig | None = None  # of every assistant; default distill.train


class SelfDistillStrategy(_Strict):
    """Be Your Own Teacher: classifier heads on intermediate modules, distilled from the deepest output."""

    kind: Literal["self_distill"]
    exits: list[str] = Field(min_length=1)  # module paths, e.g. [hidden.0, hidden.1] or [layer1, layer2]
    temperature: float = Field(3.0, gt=0)
    kd_weight: float = Field(0.5, ge=0, le=1)


Strategy = Annotated[
    EnsembleStrategy | MutualStrategy | BornAgainStrategy | AssistantsStrategy | SelfDistillStrategy,
    Field(discriminator="kind"),
]
TEACHER_FREE_STRATEGIES = ("mutual", "self_distill")


class PruneConfig(_Strict):
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


class RecoverConfig(_Strict):
    """``compress.recover``: distill the unpruned student into the pruned one."""

    terms: list[Term] = Field(
        default_factory=lambda: [
            Term(loss="ce", weight=0.1),
            Term(loss="kd", weight=0.9, params={"temperature": 4.0}),
        ]
    )
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(**RECOVER_TRAIN))
    _train_defaults = field_validator("train", mode="before")(_train_over(RECOVER_TRAIN))


class QuantizeConfig(_Strict):
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


class CompressConfig(_Strict):
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


class RunConfig(_Strict):
    """A whole run: data, models, the stages to run and how each trains."""

    name: str = "run"
    output_dir: str = "runs"
    seed: int = Field(0, ge=0, le=2**32 - 1)  # NumPy's seeds are 32-bit
    precision: Literal["no", "bf16", "fp16"] = "no"
    tensorboard: bool = False
    stages: list[Literal["teacher", "baseline", "distill", "evaluate", "report"]] = Field(
        default_factory=lambda: list(STAGES)
    )
    data: DataConfig = Field(default_factory=DataConfig)
    teacher: TeacherConfig | None = None  # optional only for strategies that bring their own targets
    student: StudentConfig
    baseline: BaselineConfig = Field(default_factory=BaselineConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    strategy: Strategy | None = None  # beyond one frozen teacher (see alambic.strategies); None: plain KD
    compress: CompressConfig | None = None  # read by `alambic compress` only

    @model_validator(mode="after")
    def _stage_augmentation(self) -> RunConfig:
        trains = [self.teacher.train if self.teacher else None, self.baseline.train, self.distill.train]
        trains += [getattr(self.strategy, "train", None)]
        if not self.data.augment and any(train is not None and train.augment for train in trains):
            raise ValueError(
                "a stage sets train.augment: true but data.augment is false; set data.augment: true "
                "and turn it off in the stages that train without it (train.augment: false)"
            )
        return self

    @model_validator(mode="after")
    def _derived_student(self) -> RunConfig:
        if self.teacher is None:
            if self.student.model.arch.startswith("derive:"):
                raise ValueError("student.model.arch derive:teacher needs a teacher (arch: hf:PATH)")
            return self
        if self.teacher.model.arch == "derive:teacher":
            raise ValueError("teacher.model.arch: derive:teacher is for the student (it copies the teacher)")
        if self.student.model.arch.startswith("derive:"):
            if self.student.model.arch != "derive:teacher":
                raise ValueError(f"student.model.arch {self.student.model.arch!r}: write derive:teacher")
            if not self.teacher.model.arch.startswith("hf:"):
                raise ValueError(
                    "student.model.arch derive:teacher needs a Hugging Face teacher (arch: hf:PATH)"
                )
            given = {
                key for key in ("layers", "keep", "every") if self.student.model.kwargs.get(key) is not None
            }
            if len(given) != 1 or set(self.student.model.kwargs) - {"layers", "keep", "every"}:
                raise ValueError(
                    "student.model.kwargs for derive:teacher: give exactly one of layers (N), keep ([I, J]) "
                    f"or every (K), got {self.student.model.kwargs}"
                )
        return self

    @model_validator(mode="after")
    def _teacher_source(self) -> RunConfig:
        kind = self.strategy.kind if self.strategy is not None else None
        if self.teacher is None:
            if kind not in (*TEACHER_FREE_STRATEGIES, "ensemble"):
                raise ValueError(
                    "teacher: required key is missing (only mutual and self_distill runs go without)"
                )
            if "teacher" in self.stages and kind != "ensemble":
                raise ValueError("the 'teacher' stage needs a teacher section; remove the stage or add one")
        elif kind == "ensemble":
            raise ValueError("an ensemble's teachers are strategy.teachers; remove the teacher section")
        elif (
            "teacher" in self.stages and self.teacher.model.checkpoint is None and self.teacher.train is None
        ):
            raise ValueError("teacher: give model.checkpoint (load a trained teacher) or train (train one)")
        untrained = kind == "ensemble" and any(model.checkpoint is None for model in self.strategy.teachers)
        if untrained and "teacher" not in self.stages:
            raise ValueError(
                "strategy.teachers without a checkpoint train in the 'teacher' stage; add it to stages"
            )
        if kind is not None and (self.distill.teacher_cache or self.distill.teacher_dtype != "float32"):
            raise ValueError(
                f"distill.teacher_cache and teacher_dtype apply to plain KD; strategy {kind!r} builds its own "
                "teachers: remove them"
            )
        if self.distill.teacher_cache and (
            self.distill.teacher_dtype != "float32" or self.distill.train.overlap_teacher
        ):
            raise ValueError(
                "distill.teacher_cache replays stored outputs, so teacher_dtype and train.overlap_teacher "
                "(which concern a live teacher's forward pass) do nothing: remove them"
            )
        if self.distill.teacher_cache and self.distill.train.mix != "none":
            raise ValueError(
                "distill.teacher_cache replays one view per sample, but train.mix makes a new one each "
                "epoch; use the live teacher with mixing (remove teacher_cache) or set train.mix: none"
            )
        if kind == "mutual" and self.strategy.alternate and self.distill.train.grad_accum != 1:
            raise ValueError(
                "strategy.alternate takes one peer per optimizer step: set distill.train.grad_accum: 1"
            )
        if kind is not None and self.student.model.arch.startswith("derive:"):
            raise ValueError("student.model.arch derive:teacher is for plain KD from a Hugging Face teacher")
        if kind == "self_distill" and any(
            get_loss_spec(term.loss).needs_teacher for term in self.distill.terms
        ):
            raise ValueError(
                "self_distill: the deepest exit trains on teacher-free distill.terms, such as [ce]"
            )
        return self


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


def _parse_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``key.path=value`` overrides; a path that does not fit the config is a one-line error."""
    for override in overrides:
        try:
            data = _apply_override(data, override)
        except (TypeError, ValueError, IndexError, AttributeError):
            key = override.split("=", 1)[0]
            raise ConfigError(
                f"--set {key}: that path does not fit the config (a list takes an index, a value has no keys)"
            ) from None
    return data


def _apply_override(data: dict, override: str) -> dict:
    """One ``key.path=value`` (value parsed as YAML; list items by index: ``distill.terms.1.weight``)."""
    if "=" not in override:
        raise ConfigError(f"--set expects key.path=value, got {override!r}")
    data = copy.deepcopy(data)
    key, value = override.split("=", 1)
    parts = key.strip().split(".")
    node: Any = data
    for depth, part in enumerate(parts[:-1]):
        child = node[int(part)] if isinstance(node, list) else node.get(part)
        if child is None:
            if isinstance(node, list):
                raise ConfigError(f"--set {key}: {'.'.join(parts[: depth + 1])} does not exist")
            child = node[part] = {}
        node = child
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"--set {key}: index {last} is out of range (the list has {len(node)} items)")
        node[int(last)] = _parse_scalar(value)
    else:
        node[last] = _parse_scalar(value)
    return data


def config_from_dict(data: dict, overrides: list[str] | None = None) -> RunConfig:
    """Validate a plain dict (after overrides) into a :class:`RunConfig`, or raise :class:`ConfigError`."""
    if overrides:
        # Override into the resolved config, so defaults (such as the default terms) can be changed too;
        # when the file alone is invalid, the overrides may be what fixes it: validate below and report.
        with contextlib.suppress(ValidationError):
            data = RunConfig.model_validate(data).model_dump(mode="json")
        data = apply_overrides(data, overrides)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(f"invalid config: {format_validation_error(error)}") from None


def _read_mapping(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist (see recipes/ for examples)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"{path} is not UTF-8 text (byte {error.start}: {error.reason}); save it as UTF-8"
        ) from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path} is not valid YAML{where}: {getattr(error, 'problem', error)}") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path} must hold a mapping of keys (data, teacher, student, ...), got {type(data).__name__}"
        )
    return data


def _merge(base: dict, child: dict) -> dict:
    """``child`` over ``base``: mappings merge key by key, anything else (lists included) is replaced."""
    merged = dict(base)
    for key, value in child.items():
        merged[key] = (
            _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
        )
    return merged


def read_config_file(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """A YAML config as a dict, with ``extends: other.yaml`` (relative to the file) merged underneath.

    A method recipe is then a few lines over a shared setting: ``extends: cifar10-resnet56-resnet20.yaml``
    plus its ``name`` and ``distill.terms``.
    """
    path = Path(path)
    if path.resolve() in _seen:
        raise ConfigError(f"{path} extends itself (through {' -> '.join(map(str, _seen))})")
    data = _read_mapping(path)
    base = data.pop("extends", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: extends must be one file name, got {base!r}")
    return _merge(read_config_file(path.parent / base, (*_seen, path.resolve())), data)


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config (following ``extends:``), apply ``--set`` overrides and validate it."""
    return config_from_dict(read_config_file(path), overrides)


def dump_config(config: RunConfig) -> str:
    """The resolved config as YAML (every default written out)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
