"""Models: the zoo (``build_model``), user factories, and safe weight loading.

Example:
    >>> from alambic.models import build_model, load_weights
    >>> teacher = build_model("resnet56", num_classes=10, input_shape=(3, 32, 32))
    >>> info = load_weights(teacher, "resnet56-4bfd9763.th")  # doctest: +SKIP
"""

from alambic.models.cifar_resnet import CifarResNet, WideCifarResNet
from alambic.models.loading import load_weights
from alambic.models.lora import merge_lora, trainable_parameters, with_lora
from alambic.models.text import init_from_teacher_embeddings, teacher_embedding_table
from alambic.models.zoo import build_factory_model, build_model, list_models, model_options, register_model

__all__ = [
    "CifarResNet",
    "WideCifarResNet",
    "build_factory_model",
    "build_model",
    "init_from_teacher_embeddings",
    "list_models",
    "load_weights",
    "merge_lora",
    "model_options",
    "register_model",
    "teacher_embedding_table",
    "trainable_parameters",
    "with_lora",
]
