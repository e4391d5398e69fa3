"""A whole run: :class:`RunConfig` and the checks that span its sections."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from alambic.config.base import STAGES, StrictModel
from alambic.config.compress import CompressConfig
from alambic.config.sections import (
    BaselineConfig,
    DataConfig,
    DistillConfig,
    EvaluateConfig,
    StudentConfig,
    TeacherConfig,
)
from alambic.config.strategies import TEACHER_FREE_STRATEGIES, Strategy
from alambic.config.tracking import TrackingConfig
from alambic.losses import get_loss_spec

LANGUAGE_MODEL_DATASETS = ("text", "jsonl")
HUGGING_FACE_ARCHS = ("hf:", "hf-config", "llama2c:")  # teachers built as transformers models (derivable)
LANGUAGE_MODEL_TERMS = {
    "teacher": [{"loss": "lm_ce"}],
    "baseline": [{"loss": "lm_ce"}],
    "distill": [{"loss": "lm_ce", "weight": 0.1}, {"loss": "forward_kl", "weight": 0.9}],
}


class RunConfig(StrictModel):
    """A whole run: data, models, the stages to run and how each trains."""

    name: str = "run"
    output_dir: str = "runs"
    # classification (images, tabular, text labels) or causal-lm (next-token prediction: data text / jsonl)
    task: Literal["classification", "causal-lm"] = "classification"
    seed: int = Field(0, ge=0, le=2**32 - 1)  # NumPy's seeds are 32-bit
    # the baseline and distill stages once per seed (the teacher and the data split once, with `seed`);
    # summary.json and the tables give each metric's mean, standard deviation and n over them
    seeds: list[Annotated[int, Field(ge=0, le=2**32 - 1)]] | None = Field(None, min_length=1)
    precision: Literal["no", "bf16", "fp16"] = "no"
    tensorboard: bool = False  # short for tracking: [tensorboard]
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)  # experiment trackers (Accelerate)
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

    @model_validator(mode="before")
    @classmethod
    def _language_model_defaults(cls, data: Any) -> Any:
        """A causal-LM run's default terms are token losses: ``lm_ce`` alone for the teacher and the
        baseline, ``0.1 lm_ce + 0.9 forward_kl`` (Hinton's mix, per token) for the distilled student."""
        if not isinstance(data, dict) or data.get("task") != "causal-lm":
            return data
        data = dict(data)
        for section, terms in LANGUAGE_MODEL_TERMS.items():
            value = data.get(section)
            if isinstance(value, dict) and "terms" not in value:
                data[section] = {**value, "terms": terms}
            elif value is None and section in ("baseline", "distill"):
                data[section] = {"terms": terms}
        return data

    @model_validator(mode="after")
    def _distinct_seeds(self) -> RunConfig:
        if self.seeds is not None and len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds {self.seeds} repeat a seed: give distinct ones, e.g. [0, 1, 2]")
        if self.seeds is not None and self.strategy is not None:
            raise ValueError("seeds repeats the plain baseline and distill stages; remove it or the strategy")
        return self

    @model_validator(mode="after")
    def _tensorboard_is_a_tracker(self) -> RunConfig:
        if self.tensorboard and "tensorboard" not in self.tracking.trackers:
            self.tracking.trackers.append("tensorboard")
        return self

    @model_validator(mode="after")
    def _task_data(self) -> RunConfig:
        language = self.data.dataset in LANGUAGE_MODEL_DATASETS
        if self.task == "causal-lm" and not (language or self.data.dataset == "custom"):
            raise ValueError(
                f"task causal-lm trains on text: set data.dataset to text or jsonl (got {self.data.dataset!r})"
            )
        if language and self.task != "causal-lm":
            raise ValueError(f"data.dataset {self.data.dataset} is language-model data: set task: causal-lm")
        if language and not self.data.train_file:
            raise ValueError(f"data.dataset {self.data.dataset} needs data.train_file (a local file)")
        return self

    @model_validator(mode="after")
    def _language_model_distillation(self) -> RunConfig:
        sequence_kd, on_policy = self.distill.sequence_kd, self.distill.on_policy
        for key, value in (("sequence_kd", sequence_kd), ("on_policy", on_policy)):
            if value is not None and self.task != "causal-lm":
                raise ValueError(f"distill.{key} distills language models: set task: causal-lm or remove it")
            if value is not None and (self.strategy is not None or self.distill.teacher_cache):
                raise ValueError(
                    f"distill.{key} needs the live teacher of plain KD: remove "
                    f"{'strategy' if self.strategy is not None else 'distill.teacher_cache'} or {key}"
                )
        if sequence_kd is not None and on_policy is not None:
            raise ValueError("distill.sequence_kd and distill.on_policy are two recipes: keep one of them")
        if sequence_kd is not None and sequence_kd.prompt_tokens > self.data.block_size:
            raise ValueError(
                f"distill.sequence_kd.prompt_tokens {sequence_kd.prompt_tokens} exceeds data.block_size "
                f"{self.data.block_size}: prompts are the first tokens of training windows"
            )
        if on_policy is not None:
            if on_policy.prompt_tokens is not None and on_policy.prompt_tokens >= self.data.block_size:
                raise ValueError(
                    f"distill.on_policy.prompt_tokens {on_policy.prompt_tokens} leaves nothing to sample in "
                    f"windows of data.block_size {self.data.block_size}: make it smaller"
                )
            specs = [get_loss_spec(term.loss) for term in self.distill.terms]
            if not any(spec.inputs == "tokens" and spec.needs_teacher for spec in specs):
                raise ValueError(
                    "distill.on_policy: the teacher scores the student's samples through a token divergence; "
                    "add one to distill.terms (forward_kl, reverse_kl, jsd, ...)"
                )
        return self

    @model_validator(mode="after")
    def _transfer_set(self) -> RunConfig:
        if self.data.transfer is None:
            return self
        if self.task != "classification":
            raise ValueError(
                "data.transfer adds unlabelled classification inputs; remove it for task causal-lm"
            )
        kind = self.strategy.kind if self.strategy is not None else None
        if kind in TEACHER_FREE_STRATEGIES:
            raise ValueError(f"data.transfer rows are labelled by a teacher, and strategy {kind!r} has none")
        if not any(get_loss_spec(term.loss).needs_teacher for term in self.distill.terms):
            raise ValueError(
                "data.transfer rows are labelled only by the teacher, but no distill term reads it; add one (kd)"
            )
        if self.data.transfer.augment is not None and (
            self.strategy is not None or self.distill.teacher_cache
        ):
            raise ValueError(
                "data.transfer.augment builds its sentences during the run, for the distill stage of a run "
                "without strategy or distill.teacher_cache; augment first (alambic augment) and give "
                "data.transfer.path instead"
            )
        return self

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
        if self.teacher.model.lora is not None:
            raise ValueError(
                "teacher.model.lora: LoRA adapts students (the teacher stays frozen while they learn); "
                "move it to student.model.lora"
            )
        if self.student.model.arch.startswith("derive:"):
            if self.student.model.arch != "derive:teacher":
                raise ValueError(f"student.model.arch {self.student.model.arch!r}: write derive:teacher")
            if not self.teacher.model.arch.startswith(HUGGING_FACE_ARCHS):
                raise ValueError(
                    "student.model.arch derive:teacher needs a Hugging Face teacher "
                    "(arch: hf:PATH, hf-config or llama2c:PATH)"
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
