"""The stages of a run whose config names a ``strategy``: composed from the pipeline's own pieces.

Each strategy changes where the targets come from, never the loop: an ensemble or a weight average is
the teacher; born-again generations and teacher assistants are consecutive distill stages, each
model saved in its own folder (``generation_1/``, ``assistant_1/``, ...) before the next starts;
mutual learning and self-distillation train a :class:`~alambic.strategies.online.MutualDistiller` /
:class:`~alambic.strategies.online.SelfDistiller` in the distill stage. A finished stage is loaded,
not trained again, so ``--resume`` continues a chain where it stopped.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

from accelerate.utils import set_seed
from torch import nn

from alambic.config import ModelConfig, Term
from alambic.core.batches import example_input
from alambic.core.checkpoint import save_weights
from alambic.core.distiller import Teacher
from alambic.errors import ConfigError
from alambic.losses import get_loss_spec
from alambic.run.building import build_named_model, check_num_classes
from alambic.run.rundir import write_status
from alambic.run.stages import (
    RunContext,
    add_timing,
    load_finished_stage,
    load_or_train,
    train_stage,
    transfer_data,
)
from alambic.strategies.ensemble import EnsembleModel, average_weights
from alambic.strategies.online import MutualDistiller, SelfDistiller


def run_strategy_stages(context: RunContext) -> dict[str, nn.Module]:
    """Teacher side, baseline, then the strategy's student side; returns every model to evaluate."""
    config, info = context.config, context.info
    strategy, stages = config.strategy, config.stages
    example = example_input(context.test_set)

    def builder(model_config: ModelConfig, side: str) -> Callable[[], nn.Module]:
        def build() -> nn.Module:
            model = build_named_model(model_config, info, side, config.task)
            check_num_classes(model, example, info.num_classes, side)
            return model

        return build

    build_student = builder(config.student.model, "student")
    models: dict[str, nn.Module] = {}
    if strategy.kind == "ensemble":
        _ensemble_teacher(context, models, builder)
    elif config.teacher is not None:
        _single_teacher(context, models, builder(config.teacher.model, "teacher"))
    if "baseline" in stages or _done(context, "baseline"):
        write_status(context.run_dir, context.accelerator, state="running", stage="baseline")
        train = config.baseline.train or config.distill.train
        models["baseline"] = load_or_train(context, "baseline", build_student, config.baseline.terms, train)
    if not ("distill" in stages or _done(context, "student")):
        return models
    if strategy.kind in ("ensemble", "born_again", "assistants"):
        if "teacher" not in models:
            raise ConfigError(
                "distill needs a teacher: add the 'teacher' stage or give teacher.model.checkpoint"
            )
        links = (
            [
                (f"generation_{g}", build_student, config.student.model.arch)
                for g in range(1, strategy.generations)
            ]
            if strategy.kind == "born_again"
            else [
                (f"assistant_{k}", builder(model_config, f"assistant_{k}"), model_config.arch)
                for k, model_config in enumerate(getattr(strategy, "assistants", []), 1)
            ]
        )
        teacher = models["teacher"]
        for name, build, arch in links:
            write_status(context.run_dir, context.accelerator, state="running", stage=name)
            train = getattr(strategy, "train", None) or config.distill.train
            teacher = models[name] = load_or_train(
                context,
                name,
                build,
                config.distill.terms,
                train,
                Teacher(teacher, config.distill.terms),
                **transfer_data(context),
            )
            context.architectures[name] = arch
        write_status(context.run_dir, context.accelerator, state="running", stage="distill")
        models["distilled"] = load_or_train(
            context,
            "distill",
            build_student,
            config.distill.terms,
            config.distill.train,
            Teacher(teacher, config.distill.terms),
            **transfer_data(context),
        )
    elif strategy.kind == "mutual":
        models.update(_mutual(context, build_student, builder))
    else:
        models["distilled"] = _self_distill(context, build_student, example)
    return models


def _done(context: RunContext, folder: str) -> bool:
    return (context.run_dir / folder / "model.safetensors").is_file()


def _single_teacher(context: RunContext, models: dict, build: Callable[[], nn.Module]) -> None:
    """One teacher, as the plain pipeline has it: loaded from its checkpoint, or trained in the run."""
    config = context.config
    if config.loads_teacher() and not _done(context, "teacher"):
        models["teacher"] = build()
    elif "teacher" in config.stages or _done(context, "teacher"):
        write_status(context.run_dir, context.accelerator, state="running", stage="teacher")
        models["teacher"] = load_or_train(
            context, "teacher", build, config.teacher.terms, config.teacher.train
        )


def ensemble_temperature(terms: list[Term]) -> float:
    """The temperature of the first logit term that softens the teacher (its default when not set), else 1."""
    for term in terms:
        spec = get_loss_spec(term.loss)
        if spec.needs_teacher and term.teacher == "logits" and "temperature" in spec.hyper_parameters:
            return float(term.params.get("temperature", spec.hyper_parameters["temperature"]))
    return 1.0


def _ensemble_teacher(context: RunContext, models: dict, builder) -> None:
    """Every member loaded or trained (``teacher_k/``), then fused by outputs or by weights as ``teacher``.

    Members share one initialisation (the run's seed: a weight average needs one basin, as in model
    soups) and differ by the data order and dropout of their training (seed + k).
    """
    config, strategy = context.config, context.config.strategy
    members = []
    for k, model_config in enumerate(strategy.teachers, 1):
        name = f"teacher_{k}"
        set_seed(config.seed)
        model = builder(model_config, name)()
        if _done(context, name):
            load_finished_stage(model, context.run_dir / name / "model.safetensors", name)
        elif model_config.checkpoint is None:
            if "teacher" not in config.stages:
                raise ConfigError(f"{name} has no checkpoint: add the 'teacher' stage to train it")
            write_status(context.run_dir, context.accelerator, state="running", stage=name)
            set_seed(config.seed + k)
            member_context = dataclasses.replace(
                context, config=config.model_copy(update={"seed": config.seed + k})
            )
            started = time.perf_counter()
            model = train_stage(member_context, name, model, [Term(loss="ce")], strategy.train, None)
            add_timing(context, name, time.perf_counter() - started)
        models[name] = model
        context.architectures[name] = model_config.arch
        members.append(model)
    if strategy.fusion == "weights":
        models["teacher"] = average_weights(members, strategy.weights)
        context.architectures["teacher"] = f"weight average of {len(members)} {strategy.teachers[0].arch}"
        return
    temperature = strategy.temperature or ensemble_temperature(config.distill.terms)
    models["teacher"] = EnsembleModel(
        members, temperature=temperature, weighting=strategy.weighting, weights=strategy.weights
    )
    context.architectures["teacher"] = f"ensemble of {len(members)} ({strategy.weighting}, T={temperature:g})"


def _mutual(context: RunContext, build_student, builder) -> dict[str, nn.Module]:
    """Student (peer 0) and peers trained together; each peer saved in ``peer_k/``, the student last."""
    config, strategy = context.config, context.config.strategy
    set_seed(config.seed)
    student = build_student()  # the baseline's initialisation
    peers = []
    for k, model_config in enumerate(strategy.peers, 1):
        set_seed(config.seed + k)  # peers start apart, as in DML
        peers.append(builder(model_config, f"peer_{k}")())
        context.architectures[f"peer_{k}"] = model_config.arch
    names = [f"peer_{k}" for k in range(1, len(peers) + 1)]
    if _done(context, "student") and all(_done(context, name) for name in names):
        for model, folder in zip([student, *peers], ["student", *names]):
            load_finished_stage(model, context.run_dir / folder / "model.safetensors", folder)
    else:  # a stage killed after its last epoch resumes from that checkpoint and only saves
        write_status(context.run_dir, context.accelerator, state="running", stage="distill")
        started = time.perf_counter()
        if strategy.alternate and context.accelerator.num_processes > 1:
            raise ConfigError(
                "strategy.alternate leaves the waiting peers without gradients, which DDP refuses; "
                "run it in one process or set alternate: false"
            )
        module = MutualDistiller(
            [student, *peers], config.distill.terms, strategy.peer_terms, alternate=strategy.alternate
        )
        train_stage(
            context, "distill", student, config.distill.terms, config.distill.train, None, module=module
        )
        if context.accelerator.is_main_process:
            for name, peer in zip(names, module.peers[1:]):
                save_weights(peer, context.run_dir / name / "model.safetensors", metadata={"stage": name})
        context.accelerator.wait_for_everyone()
        add_timing(context, "distill", time.perf_counter() - started)
    return {"distilled": student, **dict(zip(names, peers))}


def _self_distill(context: RunContext, build_student, example) -> nn.Module:
    """The student with exits on its intermediate modules; only the student (no exit) is saved."""
    config, strategy = context.config, context.config.strategy
    set_seed(config.seed)
    student = build_student()
    if _done(context, "student"):
        load_finished_stage(student, context.run_dir / "student" / "model.safetensors", "distill")
        return student
    write_status(context.run_dir, context.accelerator, state="running", stage="distill")
    module = SelfDistiller(
        student,
        strategy.exits,
        example_input=example,
        terms=config.distill.terms,
        temperature=strategy.temperature,
        kd_weight=strategy.kd_weight,
    )
    started = time.perf_counter()
    student = train_stage(
        context, "distill", student, config.distill.terms, config.distill.train, None, module=module
    )
    add_timing(context, "distill", time.perf_counter() - started)
    return student
