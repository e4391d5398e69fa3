"""Pre-flight: everything a run config names is built and tried on real data before anything trains.

``alambic run`` calls :func:`preflight` after the data sets are read and before the run directory is
created (or, with ``--resume``, before it is written to). Every model the stages will build is built
(kwargs, checkpoints, Hugging Face folders, derived students, a strategy's teachers, peers and
assistants), its number of outputs is checked against the data set, and every stage's terms run once
on the first batch of the real training data with the module paths, connectors and learned losses they
name, and with the teacher cache when one is configured. The models are then dropped: each stage
builds its own from the run's seed, so a checked run trains exactly as an unchecked one would.
"""

from __future__ import annotations

from typing import Any

from accelerate.utils import set_seed
from torch import nn

from alambic.config import RunConfig, Term, TrainConfig
from alambic.core.batches import example_input, index_of, split_batch
from alambic.core.distiller import Distiller, Teacher
from alambic.data import find_transfer, token_lengths
from alambic.data.loaders import make_loader
from alambic.errors import ConfigError
from alambic.run.augment import input_embeddings
from alambic.run.building import (
    build_named_model,
    check_num_classes,
    derive_from_teacher,
    wants_teacher_embeddings,
)
from alambic.run.lm_distill import language_model_probe_set, on_policy_loader
from alambic.run.stages import distill_teacher, stage_train_set
from alambic.strategies.ensemble import EnsembleModel
from alambic.strategies.online import MutualDistiller, SelfDistiller

PROBE_BATCH = 64  # rows of the first batch the terms are tried on (the stage's batch size when smaller)


def preflight(
    config: RunConfig,
    train_set: Any,
    test_set: Any,
    info: Any,
    *,
    teacher_trained: bool = False,
    transfer: Any = None,
) -> None:
    """Build every model of ``config`` and run every stage's terms on one real batch; raise a one-line
    :class:`~alambic.errors.ConfigError` for the first thing that would fail once training has begun.

    ``teacher_trained``: a resumed run directory holds the teacher its teacher stage trained.
    ``transfer``: the distill stage's training set with its transfer rows (``data.transfer``); the
    distill terms also run on a batch of transfer rows alone.
    """
    _check_teacher_source(config, teacher_trained)
    set_seed(config.seed)
    example = example_input(test_set)
    stages = config.stages

    def build(model_config, side: str, teacher: nn.Module | None = None) -> nn.Module:
        model = build_named_model(model_config, info, side, config.task, teacher=teacher)
        check_num_classes(model, example, info.num_classes, side)
        return model

    def probe(
        module: nn.Module, terms_train: TrainConfig, teacher: Any, data: Any = None, on_policy=None
    ) -> None:
        data = train_set if data is None else data
        dataset = stage_train_set(data, terms_train.augment, terms_train.mix, terms_train.mix_alpha)
        if config.data.group_by_length:
            token_lengths(dataset)  # a ConfigError for data without an attention mask, before any stage
        loader = make_loader(
            dataset,
            batch_size=min(terms_train.batch_size, PROBE_BATCH),
            shuffle=False,
            dynamic_padding=config.data.dynamic_padding,
        )
        batch = next(iter(loader))
        if on_policy is not None:  # the student's samples, as the stage will make them
            batch = on_policy_loader([batch], module.student, on_policy, config.seed).on_policy(batch)
        inputs, labels = split_batch(batch)
        if teacher is not None and module.needs_probe:
            module.build_modules(inputs, teacher, num_samples=len(dataset), sample_index=index_of(batch))
        module.check(inputs, labels, teacher, index_of(batch))
        combined = find_transfer(dataset)
        if combined is not None:  # transfer rows alone: the teacher labels them, label terms give 0
            first = len(combined.labelled)
            batch = dataset.get_batch(list(range(first, min(len(dataset), first + loader.batch_size))))
            module.check(*split_batch(batch), teacher, index_of(batch))

    derived = config.student.model.arch == "derive:teacher"
    embeddings = _check_teacher_embeddings(config)
    wanted = (
        derived
        or embeddings
        or bool({"teacher", "distill", "evaluate"} & set(stages))
        or config.strategy is not None
    )
    teacher = build(config.teacher.model, "teacher") if config.teacher is not None and wanted else None
    if teacher is not None and config.data.transfer is not None and config.data.transfer.augment is not None:
        input_embeddings(teacher, "of the run")  # data.transfer.augment finds neighbours in its table
    if config.teacher is not None and config.teacher.train is not None and "teacher" in stages:
        probe(Distiller(teacher, config.teacher.terms), config.teacher.train, None)
    if derived:
        student = derive_from_teacher(teacher, config.student.model)
        check_num_classes(student, example, info.num_classes, "student")
    else:
        student = build(config.student.model, "student", teacher)
    if "baseline" in stages:
        probe(Distiller(student, config.baseline.terms), config.baseline.train or config.distill.train, None)
    if config.strategy is not None:
        _strategy_preflight(config, student, teacher, build, probe, example)
    elif "distill" in stages and teacher is not None:
        # the teacher built here has the stage's weights when they come from its checkpoint (not trained here)
        loaded = config.loads_teacher() and not teacher_trained
        distill_set = train_set if transfer is None else transfer
        live_or_cached = distill_teacher(config, teacher, distill_set, check_weights=loaded, preload=False)
        probe(
            Distiller(student, config.distill.terms, unlabelled_rows=transfer is not None),
            config.distill.train,
            live_or_cached,
            data=language_model_probe_set(config, teacher, train_set) if transfer is None else transfer,
            on_policy=config.distill.on_policy,
        )


def _check_teacher_source(config: RunConfig, teacher_trained: bool) -> None:
    """A stage that needs the single teacher gets it from a checkpoint, the teacher stage, or the run."""
    kind = config.strategy.kind if config.strategy is not None else None
    if config.teacher is None or kind in ("ensemble", "mutual", "self_distill"):
        return
    from_teacher = config.student.model.arch == "derive:teacher" or wants_teacher_embeddings(
        config.student.model
    )
    wanted = {"distill", "evaluate"} & set(config.stages) or from_teacher
    if wanted and not (config.loads_teacher() or "teacher" in config.stages or teacher_trained):
        raise ConfigError(
            "distill and evaluate need a teacher: add the 'teacher' stage, give teacher.model.checkpoint, "
            "or load a pretrained causal LM (llama2c:PATH, hf:PATH)"
        )


def _check_teacher_embeddings(config: RunConfig) -> bool:
    """Whether the student asks for the teacher's embeddings, which only a single-teacher run gives."""
    if not wants_teacher_embeddings(config.student.model):
        return False
    if config.teacher is None or config.strategy is not None:
        raise ConfigError(
            "student.model.kwargs.init_embeddings: teacher needs a run with a teacher and no strategy; "
            "remove it, or initialise the student in Python (alambic.models.init_from_teacher_embeddings)"
        )
    return True


def _strategy_preflight(config: RunConfig, student, teacher, build, probe, example) -> None:
    """A strategy's own models (ensemble members, assistants, peers, exits) built and probed."""
    strategy, terms, train = config.strategy, config.distill.terms, config.distill.train
    if strategy.kind == "ensemble":
        members = [build(model, f"teacher_{k}") for k, model in enumerate(strategy.teachers, 1)]
        if strategy.train is not None and "teacher" in config.stages:
            probe(Distiller(members[0], [Term(loss="ce")]), strategy.train, None)
        teacher = EnsembleModel(
            members,
            temperature=strategy.temperature or 1.0,
            weighting=strategy.weighting,
            weights=strategy.weights,
        )
    if "distill" not in config.stages:
        return
    if strategy.kind in ("ensemble", "born_again", "assistants") and teacher is not None:
        for k, model_config in enumerate(getattr(strategy, "assistants", []), 1):
            assistant = build(model_config, f"assistant_{k}")
            probe(Distiller(assistant, terms), strategy.train or train, Teacher(teacher, terms))
            teacher = assistant
        probe(Distiller(student, terms), train, Teacher(teacher, terms))
    elif strategy.kind == "mutual":
        peers = [build(model, f"peer_{k}") for k, model in enumerate(strategy.peers, 1)]
        module = MutualDistiller([student, *peers], terms, strategy.peer_terms, alternate=strategy.alternate)
        probe(module, train, None)
    elif strategy.kind == "self_distill":
        module = SelfDistiller(
            student,
            strategy.exits,
            example_input=example,
            terms=terms,
            temperature=strategy.temperature,
            kd_weight=strategy.kd_weight,
        )
        probe(module, train, None)
