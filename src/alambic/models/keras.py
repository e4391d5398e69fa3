"""Keras 3 models on the torch backend (``KERAS_BACKEND=torch``): they are ``torch.nn.Module`` s already;
:class:`KerasModule` only passes PyTorch's train / eval mode on as Keras's ``training`` argument."""

from __future__ import annotations

from typing import Any

from torch import nn


def is_keras_model(model: Any) -> bool:
    """Whether ``model`` is a Keras layer or model (without importing Keras)."""
    return any(cls.__module__.split(".")[0] == "keras" for cls in type(model).__mro__)


class KerasModule(nn.Module):
    """A Keras model called as ``model(inputs, training=self.training)``.

    On the torch backend a Keras model's weights are its ``parameters()``, but it ignores
    ``.train()`` / ``.eval()``: its dropout and batch normalization follow the ``training`` argument,
    which is False when not given. This wrapper gives it, so a Keras student trains as it would in
    ``model.fit`` and a Keras teacher runs in inference mode.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, inputs: Any) -> Any:
        return self.model(inputs, training=self.training)


def as_torch_module(model: Any) -> Any:
    """A Keras model wrapped in :class:`KerasModule`; any other model as it is."""
    return KerasModule(model) if is_keras_model(model) else model
