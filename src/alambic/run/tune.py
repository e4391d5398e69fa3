"""Automatic tuning: ``alambic tune CONFIG --trials N --study DIR`` searches the distill stage with Optuna.

Searched: the distillation loss (``method``), its ``temperature``, the weights of ``ce`` and of the
method, and the learning rate; in budget mode also the student's width and depth, under a size (MB)
and / or latency (ms, batch 1) limit. Candidates over the limit are discarded before they train.
Each trial distills on a training split and is scored by accuracy on a held-out *validation* split
of the training set (``val_fraction``), never on the test set; a median pruner stops trials whose
per-epoch validation accuracy falls below the median of earlier trials at that epoch. Trials live in
``DIR/study.db`` (SQLite): a search that was stopped or killed resumes where it was with the same
command, and the teacher, trained once on the training split, is kept in ``DIR/teacher.safetensors``.
``DIR/best.yaml`` is the config with the best trial's settings, runnable with ``alambic run``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
from torch import nn

from alambic.config import ModelConfig, RunConfig, Term, dump_config
from alambic.core.api import train_module
from alambic.core.batches import call_model, example_input, logits_of, split_batch
from alambic.core.checkpoint import atomic_write_text, load_weights_file, save_weights
from alambic.core.distiller import Distiller, Teacher
from alambic.core.evaluate import evaluate_classifier, measure_latency, size_on_disk
from alambic.core.monitor import MetricsLog
from alambic.core.optim import make_accelerator
from alambic.data.loaders import make_loader
from alambic.errors import ConfigError, NonFiniteLossError
from alambic.files import dumps_json
from alambic.imports import require
from alambic.losses import get_loss_spec
from alambic.run.building import build_named_model, build_run_datasets, check_num_classes

DEFAULT_METHODS = ("kd", "dkd", "dist")
MLP_WIDTHS = (16, 32, 64, 128, 256, 512, 1024)
CNN_WIDTHS = (4, 8, 16, 32, 64)


def _check_methods(methods: Sequence[str]) -> list[str]:
    for method in methods:
        spec = get_loss_spec(method)
        if not (spec.needs_teacher and spec.inputs == "logits" and "temperature" in spec.hyper_parameters):
            raise ConfigError(
                f"tune searches logit losses with a temperature (kd, dkd, dist, kd_logit_std, ...); "
                f"{method!r} is not one"
            )
    if not methods:
        raise ConfigError("give at least one method to search, e.g. --methods kd,dkd")
    return list(methods)


def student_space(trial: Any, model: ModelConfig) -> ModelConfig:
    """The student a budget trial proposes: ``mlp`` depth 1-3 x width, or ``cnn`` width."""
    if model.arch == "mlp":
        depth = trial.suggest_int("depth", 1, 3)
        width = trial.suggest_categorical("width", list(MLP_WIDTHS))
        kwargs = {**model.kwargs, "hidden": [width] * depth}
    elif model.arch == "cnn":
        kwargs = {**model.kwargs, "width": trial.suggest_categorical("width", list(CNN_WIDTHS))}
    else:
        raise ConfigError(f"the budget search sizes mlp and cnn students; the student is {model.arch!r}")
    return ModelConfig(arch=model.arch, kwargs=kwargs)


def over_budget(
    model: nn.Module,
    example: Any,
    *,
    max_size_mb: float | None,
    max_latency_ms: float | None,
    repeats: int = 20,
) -> str | None:
    """Why ``model`` breaks the budget (size in MB of its safetensors file, median ms at batch 1, 1 thread), or None."""
    if max_size_mb is not None:
        size_mb = size_on_disk(model) / 1e6
        if size_mb > max_size_mb:
            return f"{size_mb:.3f} MB > {max_size_mb} MB"
    if max_latency_ms is not None:
        latency = measure_latency(model, example, batch_size=1, repeats=repeats, threads=1)["median_ms"]
        if latency > max_latency_ms:
            return f"{latency:.3f} ms > {max_latency_ms} ms"
    return None


def _split(train_set: Any, val_fraction: float, seed: int) -> tuple[Any, Any]:
    """A seeded train / validation split of the training set (the validation part without augmentation)."""
    count = len(train_set)
    val_size = max(1, round(count * val_fraction))
    if val_size >= count:
        raise ConfigError(f"val_fraction {val_fraction} leaves no training samples out of {count}")
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    fit_index, val_index = order[val_size:], order[:val_size]
    if hasattr(train_set, "subset"):
        fit_set, val_set = train_set.subset(fit_index), train_set.subset(val_index)
        val_set.augmentation = None
        return fit_set, val_set
    return torch.utils.data.Subset(train_set, fit_index.tolist()), torch.utils.data.Subset(
        train_set, val_index.tolist()
    )


def _check_study_dir(study_dir: Path, settings: dict) -> None:
    """A new study writes its settings; a resumed one must have been started with the same."""
    path = study_dir / "search.json"
    text = dumps_json(settings, indent=2, sort_keys=True)
    if path.is_file():
        if path.read_text() != text:
            raise ConfigError(
                f"--study {study_dir} was started with other settings (see {path}); resume it with the "
                "same config, --set and search options, or pick a new --study folder"
            )
        return
    study_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)


def _teacher(
    config: RunConfig, study_dir: Path, build: Callable, fit_set: Any, val_loader: Any, accelerator, log
):
    """The study's teacher: from its checkpoint, from ``teacher.safetensors``, or trained once on the training split."""
    set_seed(config.seed)
    model = build(config.teacher.model)
    path = study_dir / "teacher.safetensors"
    if path.is_file():
        load_weights_file(model, path, fix=f"delete {path} to train the study's teacher again")
    elif config.teacher.model.checkpoint is None:
        if config.teacher.train is None:
            raise ConfigError("teacher: give model.checkpoint (a trained teacher) or train (to train one)")
        train = config.teacher.train
        model = train_module(
            Distiller(model, config.teacher.terms),
            _fit_loader(fit_set, train, config),
            train.loop(),
            accelerator=accelerator,
            stage="teacher",
            log=log,
            evaluate=lambda student: evaluate_classifier(
                student, val_loader, num_classes=_classes(student, val_loader)
            ),
        )
        save_weights(model, path, metadata={"stage": "teacher"})
    return model


def _classes(model: nn.Module, loader: Any) -> int:
    inputs, _ = split_batch(next(iter(loader)))
    with torch.no_grad():
        return logits_of(call_model(model.eval(), inputs)).shape[-1]


def best_config(config: RunConfig, params: dict, student: dict | None) -> RunConfig:
    """``config`` with a trial's settings: its terms, learning rate and (budget mode) student."""
    best = copy.deepcopy(config)
    if best.baseline.train is None:  # the baseline keeps the budget and lr it had
        best.baseline.train = copy.deepcopy(config.distill.train)
    best.distill.terms = [
        Term(loss="ce", weight=params["ce_weight"]),
        Term(
            loss=params["method"],
            weight=params["distill_weight"],
            params={"temperature": params["temperature"]},
        ),
    ]
    best.distill.train.lr = params["lr"]
    if student is not None:
        best.student.model = ModelConfig.model_validate(student)
    return best


def tune(
    config: RunConfig,
    *,
    trials: int,
    study_dir: str | Path,
    methods: Sequence[str] = DEFAULT_METHODS,
    max_size_mb: float | None = None,
    max_latency_ms: float | None = None,
    val_fraction: float = 0.2,
    lr_range: float = 5.0,
) -> dict:
    """Search the distill stage of ``config`` for ``trials`` finished trials in all (a resumed study counts its own).

    Args:
        config: a plain run config (teacher, student, distill); its ``distill.train`` is each trial's
            budget and its ``lr`` the centre of the searched range.
        trials: finished (completed or pruned) trials the study should hold at the end.
        study_dir: folder of ``study.db``, ``teacher.safetensors``, ``metrics.jsonl``, ``best.yaml``.
        methods: distillation losses to choose from (logit losses with a temperature).
        max_size_mb, max_latency_ms: budget mode: the student's width and depth are searched too, and
            a candidate over either limit is discarded (pruned, untrained).
        val_fraction: share of the training set held out to score the trials.
        lr_range: the learning rate is searched in ``[lr / lr_range, lr * lr_range]`` (log scale).

    Returns:
        ``{"best_value", "best_params", "best_student", "best_config", "trials": [...]}``.

    Example:
        >>> result = tune(load_config("recipes/digits.yaml"), trials=20, study_dir="runs/digits-tune")
        >>> result["best_params"]["temperature"]
    """
    optuna = require("optuna", "tune", purpose="alambic tune")
    if config.strategy is not None or config.teacher is None:
        raise ConfigError("alambic tune searches plain teacher -> student distillation; remove strategy:")
    if trials < 1:
        raise ConfigError(f"--trials must be at least 1, got {trials}")
    methods = _check_methods(methods)
    study_dir = Path(study_dir)
    budget = {"max_size_mb": max_size_mb, "max_latency_ms": max_latency_ms}
    settings = {
        "config": dump_config(config), "methods": methods, **budget,
        "val_fraction": val_fraction, "lr_range": lr_range,
    }  # fmt: skip
    if max_size_mb is not None or max_latency_ms is not None:
        student_space(optuna.trial.FixedTrial({"depth": 1, "width": 16}), config.student.model)  # arch check
    _check_study_dir(study_dir, settings)
    search = _prepare_search(config, study_dir, methods, budget, val_fraction, lr_range)
    study = _open_study(optuna, config, study_dir)
    states = optuna.trial.TrialState
    finished = len(study.get_trials(deepcopy=False, states=(states.COMPLETE, states.PRUNED)))
    if trials > finished:
        study.optimize(lambda trial: _run_trial(search, trial, optuna), n_trials=trials - finished)
    return _summary(study, config, study_dir, states)


@dataclass
class _Search:
    """What every trial of a study shares: its data, the teacher, the budget and where it logs."""

    config: RunConfig
    methods: list[str]
    budget: dict  # max_size_mb, max_latency_ms (None: not limited)
    lr_range: float
    info: Any
    fit_set: Any
    val_loader: Any
    example: Any
    teacher: nn.Module
    accelerator: Any
    log: MetricsLog

    def build(self, model_config: ModelConfig) -> nn.Module:
        model = build_named_model(model_config, self.info)
        check_num_classes(model, self.example, self.info.num_classes, "model")
        return model


def _prepare_search(
    config: RunConfig, study_dir: Path, methods: list[str], budget: dict, val_fraction: float, lr_range: float
) -> _Search:
    """The validation split, the loaders and the study's teacher (trained once, or read back)."""
    train_set, _, info = build_run_datasets(config)
    fit_set, val_set = _split(train_set, val_fraction, config.seed)
    val_loader = make_loader(
        val_set,
        batch_size=config.data.eval_batch_size,
        shuffle=False,
        dynamic_padding=config.data.dynamic_padding,
    )
    search = _Search(
        config, methods, budget, lr_range, info, fit_set, val_loader, example_input(val_set),
        teacher=None, accelerator=make_accelerator(config.precision), log=MetricsLog(study_dir / "metrics.jsonl"),
    )  # fmt: skip
    search.teacher = _teacher(
        config, study_dir, search.build, fit_set, val_loader, search.accelerator, search.log
    )
    return search


def _open_study(optuna: Any, config: RunConfig, study_dir: Path) -> Any:
    """The study in ``study_dir/study.db``, new or resumed; a trial killed while running is marked failed."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=config.name,
        storage=f"sqlite:///{(study_dir / 'study.db').resolve()}",
        load_if_exists=True,
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=config.seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1),
    )
    states = optuna.trial.TrialState
    for stale in study.get_trials(deepcopy=False, states=(states.RUNNING,)):
        study.tell(stale.number, state=states.FAIL)  # killed mid-trial: it is run again as a new trial
    return study


def _run_trial(search: _Search, trial: Any, optuna: Any) -> float:
    """One trial: propose settings (and a student in budget mode), discard it over budget, else distill it;
    its score is the last epoch's validation accuracy."""
    config, train = search.config, search.config.distill.train
    params = {
        "method": trial.suggest_categorical("method", search.methods),
        "temperature": trial.suggest_float("temperature", 1.0, 10.0, log=True),
        "ce_weight": trial.suggest_float("ce_weight", 0.0, 1.0),
        "distill_weight": trial.suggest_float("distill_weight", 0.1, 10.0, log=True),
        "lr": trial.suggest_float("lr", train.lr / search.lr_range, train.lr * search.lr_range, log=True),
    }
    limited = any(limit is not None for limit in search.budget.values())
    student_config = student_space(trial, config.student.model) if limited else config.student.model
    trial.set_user_attr("student", student_config.model_dump(mode="json"))
    set_seed(config.seed)
    student = search.build(student_config)
    reason = over_budget(student, search.example, **search.budget, repeats=config.evaluate.latency_repeats)
    if reason is not None:
        trial.set_user_attr("over_budget", reason)
        raise optuna.TrialPruned(f"over budget: {reason}")
    terms = best_config(config, params, None).distill.terms
    scores: list[float] = []  # validation accuracy after each epoch

    def evaluate_and_prune(model: nn.Module) -> dict:
        metrics = evaluate_classifier(model, search.val_loader, num_classes=search.info.num_classes)
        scores.append(metrics["accuracy"])
        trial.report(metrics["accuracy"], len(scores))
        if trial.should_prune():
            raise optuna.TrialPruned(
                f"epoch {len(scores)}: validation accuracy {metrics['accuracy']:.4f} below the median"
            )
        return metrics

    try:
        train_module(
            Distiller(student, terms),
            _fit_loader(search.fit_set, train, config),
            train.loop(lr=params["lr"], eval_every=1),
            accelerator=search.accelerator,
            teacher=Teacher(search.teacher, terms),
            stage=f"trial_{trial.number}",
            log=search.log,
            evaluate=evaluate_and_prune,
        )
    except NonFiniteLossError as error:  # a diverging setting is a bad trial, not the end of the search
        trial.set_user_attr("diverged", str(error))
        raise optuna.TrialPruned(f"diverged: {error}") from None
    return scores[-1]


def _summary(study: Any, config: RunConfig, study_dir: Path, states: Any) -> dict:
    """The study's trials and best result; ``best.yaml`` and ``trials.json`` written atomically."""
    records = [
        {
            "number": trial.number,
            "state": trial.state.name,
            "value": trial.value,
            "params": trial.params,
            **trial.user_attrs,
        }
        for trial in study.get_trials(deepcopy=False)
    ]
    atomic_write_text(study_dir / "trials.json", dumps_json(records, indent=2))
    result = {
        "best_value": None,
        "best_params": None,
        "best_student": None,
        "best_config": None,
        "trials": records,
    }
    if study.get_trials(deepcopy=False, states=(states.COMPLETE,)):
        best = study.best_trial
        student = best.user_attrs.get("student")
        best_run = best_config(config, best.params, student)
        best_run.name = f"{config.name}-tuned"
        path = study_dir / "best.yaml"
        header = f"# the best of {len(records)} trials of alambic tune (trial {best.number}, validation accuracy {best.value:.4f})\n"
        atomic_write_text(path, header + dump_config(best_run))
        result.update(
            best_value=best.value, best_params=best.params, best_student=student, best_config=str(path)
        )
    return result


def _fit_loader(fit_set: Any, train: Any, config: RunConfig) -> Any:
    """The shuffled training loader of a study's teacher or trial."""
    return make_loader(
        fit_set,
        batch_size=train.batch_size,
        shuffle=True,
        seed=config.seed,
        dynamic_padding=config.data.dynamic_padding,
        group_by_length=config.data.group_by_length,
    )
