"""Typed run configuration: pydantic models loaded from YAML, with ``--set key.path=value`` overrides.

Unknown keys and wrong types are rejected with the key's path. Configs hand flat arguments to
functions; the functions themselves never read a config object.

Example:
    >>> config = load_config("recipes/digits.yaml", overrides=["distill.train.epochs=3"])
    >>> config.distill.terms[1].params
    {'temperature': 4.0}
"""

from __future__ import annotations

from alambic.config.base import STAGES, LoopSettings, ModelConfig, Term, TrainConfig, format_validation_error
from alambic.config.compress import (
    QAT_TRAIN,
    RECOVER_TRAIN,
    CompressConfig,
    PruneConfig,
    QuantizeConfig,
    RecoverConfig,
)
from alambic.config.files import apply_overrides, config_from_dict, dump_config, load_config, read_config_file
from alambic.config.run import RunConfig
from alambic.config.sections import (
    BaselineConfig,
    DataConfig,
    DistillConfig,
    EvaluateConfig,
    StudentConfig,
    TeacherConfig,
    TeacherSamplesConfig,
    TransferConfig,
)
from alambic.config.strategies import (
    TEACHER_FREE_STRATEGIES,
    AssistantsStrategy,
    BornAgainStrategy,
    EnsembleStrategy,
    MutualStrategy,
    SelfDistillStrategy,
    Strategy,
)
from alambic.config.tracking import TRACKERS, TrackingConfig

__all__ = [
    "AssistantsStrategy",
    "BaselineConfig",
    "BornAgainStrategy",
    "CompressConfig",
    "DataConfig",
    "DistillConfig",
    "EnsembleStrategy",
    "EvaluateConfig",
    "ModelConfig",
    "MutualStrategy",
    "PruneConfig",
    "QAT_TRAIN",
    "QuantizeConfig",
    "RECOVER_TRAIN",
    "RecoverConfig",
    "RunConfig",
    "STAGES",
    "SelfDistillStrategy",
    "Strategy",
    "StudentConfig",
    "TEACHER_FREE_STRATEGIES",
    "TeacherConfig",
    "TeacherSamplesConfig",
    "TRACKERS",
    "TrackingConfig",
    "Term",
    "TrainConfig",
    "TransferConfig",
    "LoopSettings",
    "apply_overrides",
    "config_from_dict",
    "dump_config",
    "format_validation_error",
    "load_config",
    "read_config_file",
]
