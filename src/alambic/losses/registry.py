"""One small registry for distillation losses (and only losses).

A loss is a pure function ``fn(student, teacher, *, labels=None, **hyper) -> Tensor`` that never sees
hooks, configs or models. Registering it records what it compares (``inputs``), its paper and a
one-line description (the first line of its docstring), so ``alambic losses`` can list them.

A *learned* loss holds parameters or state (CRD's embeddings and memory bank, VID's regressor and
variances): it is an ``nn.Module`` class built once per term from the shapes of one probing pass,
``cls(student_shape, teacher_shape, num_samples=N, **hyper)``, then called like a function. It trains
and is saved with the student (never exported with it). :func:`build_loss` makes either kind callable.

Example:
    >>> from alambic.losses import get_loss
    >>> kd = get_loss("kd")
    >>> kd(student_logits, teacher_logits, temperature=4.0)
"""

from __future__ import annotations

import difflib
import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

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
    learned: bool = False  # an nn.Module class with its own parameters / state (see the module docstring)
    needs_index: bool = False  # the loop passes index= (the batch's dataset indices) to this loss
    multi_feature: bool = False  # compares lists of features (student: [a, b, c]), not one
    takes_mask: bool = False  # the loop passes mask= (the batch's attention_mask, 1 = real token)

    @property
    def description(self) -> str:
        doc = inspect.getdoc(self.fn) or ""
        return doc.splitlines()[0] if doc else ""


_LOSSES: dict[str, LossSpec] = {}
# given by the loop or the probe, never by the user
_LOOP_ARGUMENTS = ("labels", "mask", "epoch", "index", "num_samples")


def register_loss(
    name: str,
    *,
    inputs: str = "logits",
    paper: str = "",
    needs_teacher: bool = True,
    needs_labels: bool = False,
    needs_epoch: bool = False,
    same_shape: bool = False,
    needs_index: bool = False,
    multi_feature: bool = False,
) -> Callable[[Callable], Callable]:
    """Register a loss under ``name``: a function, or an ``nn.Module`` class for a learned loss.

    A function's keyword-only arguments after ``labels`` are its hyper-parameters; a class's are the
    keyword-only arguments of ``__init__`` (``num_samples`` is given by the loop, not the user).
    """

    def decorator(fn: Callable) -> Callable:
        if name in _LOSSES:
            raise ValueError(f"loss {name!r} is already registered (by {_LOSSES[name].fn.__module__})")
        learned = isinstance(fn, type) and issubclass(fn, nn.Module)
        signature = inspect.signature(fn.__init__ if learned else fn)
        hyper = {
            key: parameter.default
            for key, parameter in signature.parameters.items()
            if parameter.kind is inspect.Parameter.KEYWORD_ONLY and key not in _LOOP_ARGUMENTS
        }
        _LOSSES[name] = LossSpec(
            name,
            fn,
            inputs,
            paper,
            needs_teacher,
            needs_labels,
            needs_epoch,
            same_shape,
            hyper,
            learned,
            needs_index,
            multi_feature,
            "mask" in inspect.signature(fn.forward if learned else fn).parameters,
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


def build_loss(
    name: str,
    params: dict | None = None,
    *,
    student_shape: Any = None,
    teacher_shape: Any = None,
    num_samples: int | None = None,
) -> Callable:
    """A callable ``loss(student, teacher, *, labels=None, ...)`` for ``name`` with its hyper-parameters bound.

    A learned loss is instantiated from the shapes (tuples, or lists of tuples for multi-feature
    losses) and the training set's size; a function loss ignores them.

    Example:
        >>> crd = build_loss("crd", {"feature_dim": 128}, student_shape=(64, 64),
        ...                  teacher_shape=(64, 256), num_samples=50000)
        >>> crd(student_embedding, teacher_embedding, index=sample_indices)
    """
    spec = get_loss_spec(name)
    params = dict(params or {})
    check_hyper_parameters(name, params)
    if not spec.learned:
        return functools.partial(spec.fn, **params)
    if spec.needs_index and num_samples is None:
        raise ConfigError(f"loss {name!r} keeps one entry per training sample; give num_samples")
    extra = {"num_samples": num_samples} if spec.needs_index else {}
    return spec.fn(student_shape, teacher_shape, **extra, **params)
