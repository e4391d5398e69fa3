"""A run's plan: the list of stages it executes, as data.

:func:`alambic.run.planners.plan` turns a :class:`~alambic.config.RunConfig` into a list of
:class:`Stage`: what model each stage builds (and from which earlier stage's model), which terms it trains
with, its training settings, its teacher, its data and the trainable module a strategy wraps it in. Each
strategy registers the planner of its ``strategy.kind`` with :func:`register_planner` (plain KD is the
planner of ``None``). The pipeline executes the plan (:func:`alambic.run.stages.run_plan`), the pre-flight
probes the same plan (:mod:`alambic.run.preflight`), and ``--resume`` reads which settings each stage folder
trained from it (:mod:`alambic.run.resume`), so none of them can drift from what a run does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn

from alambic.config import ModelConfig, RunConfig, Term, TrainConfig
from alambic.errors import ConfigError
from alambic.run.building import (
    build_named_model,
    check_num_classes,
    derive_from_teacher,
    wants_teacher_embeddings,
)

Models = dict[str, nn.Module]  # the models the stages before have built, by their summary name


@dataclass
class Builder:
    """Builds the models of a run's stages from their configs (the pipeline's and the pre-flight's)."""

    config: RunConfig
    info: Any
    example: Any  # one test batch's inputs: each model built is run on it once (output size checked)
    train_set: Any = None  # the run's training set: calibration text of a student derived by importance
    measure: bool = True  # false: a student derived by importance keeps as many layers by position
    derived: dict[int, dict] = field(default_factory=dict)  # derive reports, by teacher (id)

    def named(self, model_config: ModelConfig, side: str, teacher: nn.Module | None = None) -> nn.Module:
        """The model of ``model_config`` (its checkpoint loaded), its number of outputs checked."""
        model = build_named_model(model_config, self.info, side, self.config.task, teacher=teacher)
        check_num_classes(model, self.example, self.info.num_classes, side)
        return model

    def student(self, models: Models) -> nn.Module:
        """The run's student: derived from the teacher's layers (``derive:teacher``), else built from its
        config (with the teacher's embeddings when it asks for them); baseline and distilled start alike."""
        model_config = self.config.student.model
        if model_config.arch == "derive:teacher":  # a copy of the teacher's layers: the teacher stays intact
            model = self._derived(models["teacher"], model_config)
            check_num_classes(model, self.example, self.info.num_classes, "student")
            return model
        return self.named(model_config, "student", teacher=models.get("teacher"))

    def _derived(self, teacher: nn.Module, model_config: ModelConfig) -> nn.Module:
        """A student derived from ``teacher``; the layers chosen by importance are measured once per
        teacher (the baseline and the distilled student keep the same ones), and not at all while only
        shapes matter (``measure`` false: the pre-flight)."""
        report = self.derived.get(id(teacher))
        if report is not None:  # the same teacher: the same layers, without measuring them again
            kwargs = {"keep": report["kept_layers"]}
            model = derive_from_teacher(teacher, model_config.model_copy(update={"kwargs": kwargs}))
            model.derive_report = report
            return model
        model = derive_from_teacher(
            teacher, model_config, self.config if self.measure else None, train_set=self.train_set
        )
        self.derived[id(teacher)] = model.derive_report
        return model


Build = Callable[[Builder, Models], nn.Module]


@dataclass(frozen=True, eq=False)  # hashed by identity: the pre-flight reuses what one build made
class FromConfig:
    """The :class:`Stage` ``build`` of a model config (no other model needed); the config stays readable
    (``alambic export --model peer_1`` rebuilds the architecture from it)."""

    model_config: ModelConfig
    side: str

    def __call__(self, builder: Builder, models: Models) -> nn.Module:
        return builder.named(self.model_config, self.side)


def build_config(model_config: ModelConfig, side: str) -> Build:
    """The :class:`Stage` ``build`` of a model config (no other model needed)."""
    return FromConfig(model_config, side)


def build_student(builder: Builder, models: Models) -> nn.Module:
    """The :class:`Stage` ``build`` of the run's student."""
    return builder.student(models)


@dataclass
class Companion:
    """A model trained inside another stage's module and saved in its own folder (a mutual-learning peer)."""

    model: str  # its name in summary.json and its folder
    build: Build
    seed: int  # set before it is built
    architecture: str


@dataclass
class Stage:
    """One stage of a run: a model built, then loaded (finished), trained, or used as built.

    ``train`` None: the model is used as built (a checkpoint, a pretrained language model, a fused
    ensemble) and never trained. ``runs``: the stage is in ``config.stages`` and trains when it has not
    finished; otherwise a finished stage is loaded and an unfinished one skipped, or refused with
    ``missing`` when a later stage needs it (``required``).
    """

    name: str  # in status.json, metrics.jsonl, timings.json: teacher, baseline-seed1, assistant_1, distill
    model: str  # the model's name in summary.json: teacher, baseline, distilled, peer_1, ...
    folder: str | None  # the run-directory folder of its model.safetensors; None: nothing saved
    build: Build
    architecture: str
    settings: Literal["teacher", "baseline", "distill"] = "distill"  # the config part it trains from (resume)
    terms: list[Term] = field(default_factory=list)
    train: TrainConfig | None = None
    teacher: str | None = None  # the model (by name) whose outputs it learns from
    data: Literal["train", "distill"] = "train"  # distill: with the transfer rows or the LM recipe's data
    seed: int = 0  # set before the model is built
    train_seed: int | None = None  # set before it trains, when not ``seed`` (an ensemble member's data order)
    runs: bool = True
    required: bool = False
    missing: str = ""
    # the module trained instead of Distiller(model, terms): (model, companions, example inputs) -> module
    trainable: Callable[[nn.Module, list[nn.Module], Any], nn.Module] | None = None
    companions: list[Companion] = field(default_factory=list)
    repeats: str | None = None  # the stage this one repeats with another seed (probed once, before a run)

    @property
    def folders(self) -> list[str]:
        """Every folder the stage saves a model in: its own, then its companions'."""
        own = [self.folder] if self.folder is not None else []
        return own + [companion.model for companion in self.companions]


Planner = Callable[[RunConfig], list[Stage]]
_PLANNERS: dict[str | None, Planner] = {}


def register_planner(kind: str | None) -> Callable[[Planner], Planner]:
    """Register the planner of ``strategy.kind`` (``None``: plain KD, one frozen teacher)."""

    def register(planner: Planner) -> Planner:
        if kind in _PLANNERS:
            raise ValueError(f"a planner for strategy {kind!r} is registered already")
        _PLANNERS[kind] = planner
        return planner

    return register


def planner_for(config: RunConfig) -> Planner:
    """The registered planner of ``config``'s strategy."""
    kind = config.strategy.kind if config.strategy is not None else None
    if kind not in _PLANNERS:
        raise ConfigError(f"strategy {kind!r} has no planner; known: {sorted(map(str, _PLANNERS))}")
    return _PLANNERS[kind]


def teacher_stage(config: RunConfig, *, required: bool = True) -> Stage | None:
    """The single teacher of a run, when a stage needs it: from its own weights (a checkpoint, a
    pretrained causal LM), or trained (or loaded, finished) in the ``teacher`` stage.

    ``required``: a run without one is refused (``missing``); else (a teacher that a strategy only
    evaluates) it is left out."""
    if config.teacher is None:
        return None
    from_teacher = config.student.model.arch == "derive:teacher" or wants_teacher_embeddings(
        config.student.model
    )
    if not (from_teacher or {"teacher", "distill", "evaluate"} & set(config.stages)):
        return None
    own_weights = config.loads_teacher()
    return Stage(
        name="teacher",
        model="teacher",
        folder="teacher",
        build=build_config(config.teacher.model, "teacher"),
        architecture=config.teacher.model.arch,
        settings="teacher",
        terms=config.teacher.terms,
        train=None if own_weights else config.teacher.train,
        seed=config.seed,
        runs="teacher" in config.stages or own_weights,
        required=required,
        missing=(
            "distill and evaluate need a teacher: add the 'teacher' stage, give teacher.model.checkpoint, "
            "or load a pretrained causal LM (llama2c:PATH, hf:PATH)"
        ),
    )


def baseline_stage(config: RunConfig, seed: int | None = None, suffix: str = "") -> Stage:
    """The student trained alone on its labels (``baseline`` terms), from the distilled student's weights."""
    return Stage(
        name="baseline" + suffix,
        model="baseline" + suffix,
        folder="baseline" + suffix,
        build=build_student,
        architecture=config.student.model.arch,
        settings="baseline",
        terms=config.baseline.terms,
        train=config.baseline.train or config.distill.train,
        seed=config.seed if seed is None else seed,
        runs="baseline" in config.stages,
        repeats="baseline" if suffix else None,
    )


def distill_stage(config: RunConfig, teacher: str | None = "teacher", **fields: Any) -> Stage:
    """The distilled student (folder ``student/``), learning from ``teacher`` with the ``distill`` terms."""
    values = {
        "name": "distill",
        "model": "distilled",
        "folder": "student",
        "build": build_student,
        "architecture": config.student.model.arch,
        "terms": config.distill.terms,
        "train": config.distill.train,
        "teacher": teacher,
        "data": "distill",
        "seed": config.seed,
        "runs": "distill" in config.stages,
        **fields,
    }
    return Stage(**values)


def saved_models(stages: list[Stage]) -> dict[str, tuple[str, Build]]:
    """``{model: (folder, build)}`` for every model the plan saves, in order (``student`` first, as the
    name of the distilled student's)."""
    saved: dict[str, tuple[str, Build]] = {}
    for stage in stages:
        if stage.folder is not None:
            saved[stage.model] = (stage.folder, stage.build)
        for companion in stage.companions:
            saved[companion.model] = (companion.model, companion.build)
    if "distilled" in saved:
        saved = {"student": saved["distilled"], **saved}
    return saved


def settings_of_folders(stages: list[Stage]) -> dict[str, str]:
    """``{folder: settings}``: which part of the config each folder of a run directory trained from."""
    return {folder: stage.settings for stage in stages for folder in stage.folders}


def describe(stages: list[Stage]) -> list[dict[str, Any]]:
    """The plan as ``summary.json`` records it: each stage's name, model, folder, teacher, whether it trains,
    and its terms (``{"name", "weight"}``, ``name`` as its values are logged in ``metrics.jsonl``)."""
    return [
        {
            "stage": stage.name,
            "model": stage.model,
            "folder": stage.folder,
            "teacher": stage.teacher,
            "trains": stage.train is not None,
            "terms": [{"name": term.name, "weight": term.weight} for term in stage.terms],
            **(
                {"companions": [companion.model for companion in stage.companions]}
                if stage.companions
                else {}
            ),
        }
        for stage in stages
    ]
