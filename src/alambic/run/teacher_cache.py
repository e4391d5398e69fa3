"""``alambic cache-teacher``: a run config's trained teacher run once over its training set, its outputs stored
(:mod:`alambic.core.cache`) for offline distillation."""

from __future__ import annotations

from pathlib import Path

from alambic.config import RunConfig
from alambic.config.base import is_pretrained_language_model
from alambic.core.cache import cache_teacher
from alambic.core.distiller import feature_paths
from alambic.core.optim import make_accelerator
from alambic.errors import ConfigError
from alambic.losses import get_loss_spec
from alambic.run.building import build_named_model, build_run_datasets, build_run_transfer
from alambic.run.stages import stage_train_set


def cache_teacher_outputs(
    config: RunConfig,
    out_dir: str | Path,
    *,
    top_k: int | None = None,
    dtype: str = "float32",
    shard_size: int = 50_000,
) -> dict:
    """``alambic cache-teacher``: run the config's trained teacher once over its training set; returns the manifest.

    Stores the logits and every teacher feature the distill terms compare. The teacher comes from
    ``teacher.model.checkpoint`` (a run's ``teacher/model.safetensors`` works). With ``data.transfer``
    the transfer rows are cached too, after the training set's (their indices continue from its size).
    Under ``accelerate launch`` / ``torchrun`` the shards of ``shard_size`` samples are dealt out to the
    processes (each on its own device), which write them into one folder; process 0 writes the manifest.
    """
    trained_in_run = config.teacher is not None and "teacher" in config.stages and config.teacher.train
    if config.teacher is None or not (
        config.teacher.model.checkpoint
        or (is_pretrained_language_model(config.teacher.model.arch) and not trained_in_run)
    ):
        raise ConfigError(
            "cache-teacher needs a trained teacher: give teacher.model.checkpoint "
            "(for example --set teacher.model.checkpoint=runs/NAME/teacher/model.safetensors)"
        )
    train_set, _, info = build_run_datasets(config)
    teacher = build_named_model(config.teacher.model, info, "teacher", config.task)
    terms = [term for term in config.distill.terms if get_loss_spec(term.loss).needs_teacher]
    accelerator = (
        make_accelerator()
    )  # one process, or this one of a launch (its own GPU where there are GPUs)
    transfer = build_run_transfer(config, train_set)
    return cache_teacher(
        teacher,
        stage_train_set(train_set if transfer is None else transfer, config.distill.train.augment),
        out_dir,
        features=list(dict.fromkeys(feature_paths(terms, "teacher"))),
        top_k=top_k,
        dtype=dtype,
        batch_size=config.data.eval_batch_size,
        shard_size=shard_size,
        device=accelerator.device,
        process_index=accelerator.process_index,
        num_processes=accelerator.num_processes,
        barrier=accelerator.wait_for_everyone,
        dynamic_padding=config.data.dynamic_padding,
    )
