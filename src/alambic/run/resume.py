"""Which config changes a resumed run accepts: a corrected config continues a run without retraining.

Each training stage's result depends on a part of the config (its *settings*, :func:`stage_settings`).
``--resume`` with a config that differs from the stored one is accepted when every stage that has
started (a ``model.safetensors`` or checkpoints in its folder) keeps its settings: finished stages are
then loaded, not retrained, and the stages that had not started run with the new config. Settings that
never change what trains (``name``, ``output_dir``, ``stages``, ``tensorboard``, ``tracking``, ``evaluate``,
``compress``, ``data.data_dir``, ``data.num_workers``, ``data.eval_batch_size``) may always change.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alambic.config import RunConfig
from alambic.config.base import hf_path
from alambic.config.strategies import strategy_class
from alambic.errors import ConfigError
from alambic.run.plan import settings_of_folders
from alambic.run.planners import plan

# where the data lies and how it is read, not what it is: a moved data folder still continues a run
DATA_ACCESS = ("data_dir", "num_workers", "eval_batch_size")


def stage_settings(config: dict, stage: str) -> dict:
    """The part of a resolved config (``RunConfig.model_dump(mode="json")``) that ``stage`` trains from.

    ``stage`` is ``teacher``, ``baseline`` or ``distill`` (which covers a strategy's own folders).
    """
    # the transfer set is the distill stage's alone: the teacher and the baseline never see it
    data = {key: value for key, value in config["data"].items() if key not in (*DATA_ACCESS, "transfer")}
    teacher_arch = ((config.get("teacher") or {}).get("model") or {}).get("arch") or ""
    # the tokenizer the data is read with: data.tokenizer, else the hf: teacher's own (as the run resolves it)
    tokenizer = data.get("tokenizer") or hf_path(teacher_arch)
    common = {
        "seed": config["seed"],
        "precision": config["precision"],
        "task": config.get("task", "classification"),
        "data": {**data, "tokenizer": tokenizer},
    }
    strategy = config.get("strategy")
    teacher = {**common, "teacher": config.get("teacher")}
    if strategy is not None and strategy_class(strategy["kind"]).brings_teachers:
        teacher["strategy"] = strategy  # its members train in the teacher stage
    if stage == "teacher":
        return teacher
    student = {**common, "student": config["student"]}
    if config["student"]["model"]["arch"] == "derive:teacher":
        student["teacher_stage"] = teacher  # the student is a copy of the trained teacher's layers
    if stage == "baseline":
        baseline = config["baseline"]
        return {
            **student,
            "terms": baseline["terms"],
            "train": baseline["train"] or config["distill"]["train"],
        }
    transfer = config["data"].get("transfer")
    return {
        **student,
        "teacher_stage": teacher,
        "distill": config["distill"],
        "strategy": strategy,
        "transfer": transfer,
    }


def differences(old: Any, new: Any, path: str = "") -> list[str]:
    """``key.path: old -> new`` for every leaf that differs between two nested configs."""
    if isinstance(old, dict) and isinstance(new, dict):
        found = []
        for key in dict.fromkeys([*old, *new]):
            found += differences(old.get(key), new.get(key), f"{path}.{key}" if path else str(key))
        return found
    return [] if old == new else [f"{path or '(config)'}: {old!r} -> {new!r}"]


def started_stages(run_dir: Path, stored: dict) -> dict[str, list[Path]]:
    """The stages that have begun in ``run_dir`` (a saved model or checkpoints), with their folders, by the
    part of the config they train from (``teacher``, ``baseline``, ``distill``); the folders are those the
    plan of the ``stored`` config (the run directory's, resolved) names."""
    settings = settings_of_folders(plan(RunConfig.model_validate(stored)))
    started: dict[str, list[Path]] = {}
    for folder in sorted(path for path in run_dir.iterdir() if path.is_dir()):
        stage = settings.get(folder.name)
        checkpoints = folder / "checkpoints"
        begun = (folder / "model.safetensors").is_file() or (
            checkpoints.is_dir() and any(checkpoints.iterdir())
        )
        if stage is not None and begun:
            started.setdefault(stage, []).append(folder)
    return started


def check_resumable(run_dir: Path, stored: dict, wanted: dict) -> list[str]:
    """Refuse a resume whose config changes the settings of a stage that has begun; returns the changes.

    Raises:
        ConfigError: naming the first such stage, what changed, and the two ways out.
    """
    started = started_stages(run_dir, stored)
    for stage in ("teacher", "baseline", "distill"):  # the order they train in
        folders = started.get(stage)
        if not folders:
            continue
        changed = differences(stage_settings(stored, stage), stage_settings(wanted, stage))
        changed = list(dict.fromkeys(change.removeprefix("teacher_stage.") for change in changed))
        if changed:
            shown = "; ".join(changed[:3]) + (f" (and {len(changed) - 3} more)" if len(changed) > 3 else "")
            names = ", ".join(str(folder) for folder in folders)
            raise ConfigError(
                f"--resume {run_dir}: the {stage} stage has started ({names}) with other settings "
                f"({shown}); resume with its settings, or delete {names} to train it again with the new ones"
            )
    return differences(stored, wanted)
