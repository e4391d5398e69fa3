"""One small registry for distillation losses (and only losses).

A loss is a pure function ``fn(student, teacher, *, labels=None, **hyper) -> Tensor`` that never sees
hooks, configs or models. Registering it records what it compares (``inputs``), its paper and a
one-line description (the first line of its docstring), so ``alambic losses`` can list them.

Example:
    >>> from alambic.losses import get_loss
    >>> kd = get_loss("kd")
    >>> kd(student_logits, teacher_logits, temperature=4.0)
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

from alambic.errors import ConfigError


@dataclass(frozen=True)
class LossSpec:
    """What the registry knows of one loss."""

    name: str
    fn: Callable
    inputs: str  # "logits", "features", "tokens", ...
    paper: str
    needs_teacher: bool = True
    needs_labels: bool = False
    needs_epoch: bool = False  # the loop passes epoch= (1-based) to this loss
    same_shape: bool = False  # student and teacher values must have one shape (auto connectors make it so)
    hyper_parameters: dict = field(default_factory=dict)  # name -> default

    @property
    def description(self) -> str:
        doc = inspect.getdoc(self.fn) or ""
        return doc.splitlines()[0] if doc else ""


_LOSSES: dict[str, LossSpec] = {}


def register_loss(
    name: str,
    *,
    inputs: str = "logits",
    paper: str = "",
    needs_teacher: bool = True,
    needs_labels: bool = False,
    needs_epoch: bool = False,
    same_shape: bool = False,
) -> Callable[[Callable], Callable]:
    """Register ``fn`` under ``name``; its keyword-only arguments after ``labels`` are its hyper-parameters."""

    def decorator(fn: Callable) -> Callable:
        if name in _LOSSES:
            raise ValueError(f"loss {name!r} is already registered (by {_LOSSES[name].fn.__module__})")
        signature = inspect.signature(fn)
        hyper = {
            key: parameter.default
            for key, parameter in signature.parameters.items()
            if parameter.kind is inspect.Parameter.KEYWORD_ONLY and key not in ("labels", "mask", "epoch")
        }
        _LOSSES[name] = LossSpec(
            name, fn, inputs, paper, needs_teacher, needs_labels, needs_epoch, same_shape, hyper
        )
        return fn

    return decorator


def _unknown(name: str) -> ConfigError:
    names = sorted(_LOSSES)
    close = difflib.get_close_matches(name, names, n=3)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return ConfigError(f"unknown loss {name!r}: {hint}registered losses are {', '.join(names)}")


def get_loss_spec(name: str) -> LossSpec:
    """The :class:`LossSpec` registered under ``name``; unknown names raise with close matches."""
    if name not in _LOSSES:
        raise _unknown(name)
    return _LOSSES[name]


def get_loss(name: str) -> Callable:
    """The loss function registered under ``name``; unknown names raise with close matches and the list."""
    return get_loss_spec(name).fn


def list_losses() -> list[LossSpec]:
    """Every registered loss, sorted by name."""
    return [_LOSSES[name] for name in sorted(_LOSSES)]


def check_hyper_parameters(name: str, params: dict) -> None:
    """Reject hyper-parameters the loss does not take, naming the valid ones."""
    spec = get_loss_spec(name)
    unknown = sorted(set(params) - set(spec.hyper_parameters))
    if unknown:
        valid = ", ".join(f"{key}={value!r}" for key, value in spec.hyper_parameters.items()) or "none"
        raise ConfigError(
            f"loss {name!r} has no parameter {', '.join(map(repr, unknown))}; it takes: {valid}"
        )
