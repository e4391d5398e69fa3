"""YAML run configs: read (with ``extends:``), overridden (``--set key.path=value``), validated, written."""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from alambic.config.base import format_validation_error
from alambic.config.run import RunConfig
from alambic.errors import ConfigError


def _parse_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``key.path=value`` overrides; a path that does not fit the config is a one-line error."""
    for override in overrides:
        try:
            data = _apply_override(data, override)
        except (TypeError, ValueError, IndexError, AttributeError):
            key = override.split("=", 1)[0]
            raise ConfigError(
                f"--set {key}: that path does not fit the config (a list takes an index, a value has no keys)"
            ) from None
    return data


def _apply_override(data: dict, override: str) -> dict:
    """One ``key.path=value`` (value parsed as YAML; list items by index: ``distill.terms.1.weight``)."""
    if "=" not in override:
        raise ConfigError(f"--set expects key.path=value, got {override!r}")
    data = copy.deepcopy(data)
    key, value = override.split("=", 1)
    parts = key.strip().split(".")
    node: Any = data
    for depth, part in enumerate(parts[:-1]):
        child = node[int(part)] if isinstance(node, list) else node.get(part)
        if child is None:
            if isinstance(node, list):
                raise ConfigError(f"--set {key}: {'.'.join(parts[: depth + 1])} does not exist")
            child = node[part] = {}
        node = child
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"--set {key}: index {last} is out of range (the list has {len(node)} items)")
        node[int(last)] = _parse_scalar(value)
    else:
        node[last] = _parse_scalar(value)
    return data


def config_from_dict(data: dict, overrides: list[str] | None = None) -> RunConfig:
    """Validate a plain dict (after overrides) into a :class:`RunConfig`, or raise :class:`ConfigError`."""
    if overrides:
        # Override into the resolved config, so defaults (such as the default terms) can be changed too;
        # when the file alone is invalid, the overrides may be what fixes it: validate below and report.
        with contextlib.suppress(ValidationError):
            data = RunConfig.model_validate(data).model_dump(mode="json")
        data = apply_overrides(data, overrides)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(f"invalid config: {format_validation_error(error)}") from None


def _read_mapping(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(
            f"config file {path} does not exist (`alambic recipes` lists the packaged recipes, run by name)"
        )
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"{path} is not UTF-8 text (byte {error.start}: {error.reason}); save it as UTF-8"
        ) from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path} is not valid YAML{where}: {getattr(error, 'problem', error)}") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path} must hold a mapping of keys (data, teacher, student, ...), got {type(data).__name__}"
        )
    return data


def _merge(base: dict, child: dict) -> dict:
    """``child`` over ``base``: mappings merge key by key, anything else (lists included) is replaced."""
    merged = dict(base)
    for key, value in child.items():
        merged[key] = (
            _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
        )
    return merged


def read_config_file(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """A YAML config as a dict, with ``extends: other.yaml`` (relative to the file) merged underneath.

    A method recipe is then a few lines over a shared setting: ``extends: cifar10-resnet56-resnet20.yaml``
    plus its ``name`` and ``distill.terms``.
    """
    path = Path(path)
    if path.resolve() in _seen:
        raise ConfigError(f"{path} extends itself (through {' -> '.join(map(str, _seen))})")
    data = _read_mapping(path)
    base = data.pop("extends", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: extends must be one file name, got {base!r}")
    return _merge(read_config_file(path.parent / base, (*_seen, path.resolve())), data)


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config (following ``extends:``), apply ``--set`` overrides and validate it."""
    return config_from_dict(read_config_file(path), overrides)


def dump_config(config: RunConfig) -> str:
    """The resolved config as YAML (every default written out)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
