"""alambic: knowledge distillation for PyTorch.

Example:
    >>> from alambic import distill
    >>> student = distill(teacher, student, train_loader, epochs=5)
"""

from alambic.config import LoopSettings, RunConfig, Term, TrainConfig, load_config
from alambic.core.api import distill, train_module
from alambic.core.cache import CachedTeacher
from alambic.core.callbacks import BestWeights, Callback, EarlyStopping, History
from alambic.core.distiller import Distiller, Teacher
from alambic.data import IndexedDataset
from alambic.errors import AlambicError, ConfigError, DataError
from alambic.losses import get_loss, list_losses, register_loss

__version__ = "0.1.0"

__all__ = [
    "AlambicError",
    "BestWeights",
    "CachedTeacher",
    "Callback",
    "ConfigError",
    "DataError",
    "Distiller",
    "EarlyStopping",
    "History",
    "IndexedDataset",
    "LoopSettings",
    "RunConfig",
    "Teacher",
    "Term",
    "TrainConfig",
    "distill",
    "get_loss",
    "list_losses",
    "load_config",
    "register_loss",
    "train_module",
]
