"""Pre-flight: everything a run config names is built and tried on real data before anything trains.

``alambic run`` calls :func:`preflight` after the data sets are read and before the run directory is
created (or, with ``--resume``, before it is written to). It walks the run's plan
(:func:`alambic.run.planners.plan`), the same list of stages the pipeline executes: every model a stage
builds is built (kwargs, checkpoints, Hugging Face folders, derived students, a strategy's teachers, peers
and assistants), its number of outputs is checked against the data set, and every stage that trains runs
its terms once on the first batch of the real training data, with its teacher (the teacher cache when one
is configured), its data and its strategy's trainable module. The models are then dropped: each stage
builds its own from the run's seed, so a checked run trains exactly as an unchecked one would.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from accelerate.utils import set_seed
from torch import nn

from alambic.config import RunConfig, TrainConfig
from alambic.core.batches import example_input, index_of, split_batch
from alambic.core.distiller import Distiller
from alambic.data import find_transfer, token_lengths
from alambic.data.loaders import make_loader
from alambic.errors import ConfigError
from alambic.run.augment import input_embeddings
from alambic.run.building import wants_teacher_embeddings
from alambic.run.lm_distill import language_model_probe_set, on_policy_loader
from alambic.run.plan import Builder, Stage
from alambic.run.planners import plan
from alambic.run.stages import distill_teacher, stage_finished, stage_train_set

PROBE_BATCH = 64  # rows of the first batch the terms are tried on (the stage's batch size when smaller)


def preflight(
    config: RunConfig,
    train_set: Any,
    test_set: Any,
    info: Any,
    *,
    run_dir: str | Path | None = None,
    transfer: Any = None,
) -> None:
    """Build every model of ``config``'s plan and run every training stage's terms on one real batch; raise
    a one-line :class:`~alambic.errors.ConfigError` for the first thing that would fail once training began.

    ``run_dir``: a resumed run directory, whose finished stages are loaded rather than trained (a teacher
    its teacher stage trained, say). ``transfer``: the distill stage's training set with its transfer rows
    (``data.transfer``); the terms of stages that learn from a teacher also run on transfer rows alone.
    """
    stages = plan(config)
    finished = {stage.name: run_dir is not None and stage_finished(Path(run_dir), stage) for stage in stages}
    for stage in stages:  # a stage a later one needs, which neither runs nor has finished
        if stage.required and stage.train is not None and not stage.runs and not finished[stage.name]:
            raise ConfigError(stage.missing)
    _check_teacher_embeddings(config)
    set_seed(config.seed)
    builder = Builder(config, info, example_input(test_set), measure=False)  # shapes: layers by position
    models: dict[str, nn.Module] = {}
    built: dict[Any, nn.Module] = {}  # by build function: the baseline's student is the distilled one's
    by_name = {stage.model: stage for stage in stages}
    for stage in stages:
        if stage.repeats is not None:  # the same stage with another seed
            continue
        if stage.build not in built:
            built[stage.build] = stage.build(builder, models)
        models[stage.model] = model = built[stage.build]
        companions = [companion.build(builder, models) for companion in stage.companions]
        if stage.model == "teacher" and config.data.transfer is not None and config.data.transfer.augment:
            input_embeddings(model, "of the run")  # data.transfer.augment finds neighbours in its table
        if stage.train is None or not stage.runs:
            continue
        teacher = None
        if stage.teacher is not None:
            source = by_name[stage.teacher]  # its weights are the run's when it is not trained in the run
            loaded = source.train is None and not finished[source.name]
            distill_set = train_set if transfer is None else transfer
            teacher = distill_teacher(
                config,
                models[stage.teacher],
                distill_set,
                check_weights=loaded,
                preload=False,
                terms=stage.terms,
            )
        if config.distill.fused_output and stage.trainable is not None:
            raise ConfigError(
                f"distill.fused_output applies to plain KD's distill stage; stage {stage.name!r} of strategy "
                f"{config.strategy.kind!r} trains a module of its own; remove the setting"
            )
        module = (
            stage.trainable(model, companions, builder.example)
            if stage.trainable is not None
            else Distiller(
                model,
                stage.terms,
                unlabelled_rows=stage.data == "distill" and transfer is not None,
                fused_output=teacher is not None and config.distill.fused_output,
            )
        )
        _probe(config, stage, module, teacher, _probe_data(config, stage, models, train_set, transfer))


def _probe_data(config: RunConfig, stage: Stage, models: dict, train_set: Any, transfer: Any) -> Any:
    """What a stage's terms are tried on: its training set, or (learning from a teacher) the transfer
    set or the language-model recipe's data."""
    if stage.data != "distill":
        return train_set
    if transfer is not None:
        return transfer
    probe_set = language_model_probe_set(config, models[stage.teacher], train_set) if stage.teacher else None
    return train_set if probe_set is None else probe_set


def _probe(config: RunConfig, stage: Stage, module: nn.Module, teacher: Any, data: Any) -> None:
    """The stage's terms on the first batch of its data (and on a batch of transfer rows alone)."""
    train: TrainConfig = stage.train
    dataset = stage_train_set(data, train.augment, train.mix, train.mix_alpha)
    if config.data.group_by_length:
        token_lengths(dataset)  # a ConfigError for data without an attention mask, before any stage
    loader = make_loader(
        dataset,
        batch_size=min(train.batch_size, PROBE_BATCH),
        shuffle=False,
        dynamic_padding=config.data.dynamic_padding,
    )
    batch = next(iter(loader))
    on_policy = config.distill.on_policy if stage.data == "distill" else None
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


def _check_teacher_embeddings(config: RunConfig) -> None:
    """The student asks for the teacher's embeddings, which only a single-teacher run gives."""
    if not wants_teacher_embeddings(config.student.model):
        return
    if config.teacher is None or config.strategy is not None:
        raise ConfigError(
            "student.model.kwargs.init_embeddings: teacher needs a run with a teacher and no strategy; "
            "remove it, or initialise the student in Python (alambic.models.init_from_teacher_embeddings)"
        )
