"""Imports with one-line errors: a user's ``package.module:function`` (a model or dataset factory), and
the optional packages behind alambic's extras (transformers, onnx, optuna, torchao, ...)."""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from typing import Any

from alambic.errors import ConfigError

FACTORY_PATTERN = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def import_callable(spec: Any, *, what: str) -> Callable:
    """The callable named by ``spec`` (``"package.module:function"``); ``what`` names it in errors.

    Example:
        >>> make = import_callable("my_project.models:small_cnn", what="model factory")
    """
    if not isinstance(spec, str) or not FACTORY_PATTERN.match(spec):
        raise ConfigError(f'{what} must be "package.module:function", got {spec!r}')
    module_name, function_name = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(
            f"cannot import {what} module {module_name!r} ({error}); is it on PYTHONPATH?"
        ) from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ConfigError(f"module {module_name!r} has no function {function_name!r} (from {what} {spec!r})")
    return function


def require(module: str, extra: str, *, purpose: str | None = None) -> Any:
    """Import the optional package ``module``, or raise a one-line error naming the extra that installs it.

    Example:
        >>> transformers = require("transformers", "hf", purpose="Hugging Face models")
    """
    try:
        return importlib.import_module(module)
    except ImportError:
        needs = f"{purpose} need" if purpose else "this needs"
        raise ConfigError(
            f"{needs} the {module} package, which is not installed: pip install 'alambic[{extra}]'"
        ) from None
