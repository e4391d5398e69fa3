"""Load weights from a checkpoint file into a model, safely and with errors that say what differs.

``.safetensors`` files are read with safetensors; anything else with
``torch.load(..., weights_only=True)``, which refuses to run arbitrary pickled code. Checkpoints that
wrap the state dict (``{"state_dict": ...}``, ``{"model": ...}``, ``{"model_state_dict": ...}``) are
unwrapped, and the prefixes that ``DistributedDataParallel`` (``module.``) and ``torch.compile``
(``_orig_mod.``) add to every key are stripped.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from alambic.errors import ConfigError

_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_SHOWN = 5  # keys listed in an error message


def load_weights(model: nn.Module, path: str | Path, *, strict: bool = True) -> dict:
    """Load a checkpoint's weights into ``model`` in place.

    Args:
        model: The model to fill; a DDP- or ``torch.compile``-wrapped model is unwrapped.
        path: A ``.safetensors`` file, or a ``torch.save`` file holding a state dict, possibly nested
            under ``state_dict`` / ``model`` / ``model_state_dict``.
        strict: Require the checkpoint to fit exactly. With False, keys whose name and shape match are
            loaded and the rest is reported.

    Returns:
        ``{"path": str, "missing": [...], "unexpected": [...], "mismatched": [...], "extra": {...}}``:
        model keys absent from the file, file keys absent from the model, keys with different shapes
        (not loaded), and the checkpoint's scalar entries such as ``best_prec1`` or ``epoch``.
        BatchNorm ``num_batches_tracked`` counters, absent from checkpoints saved before PyTorch 0.4.1,
        are never counted as missing.

    Raises:
        ConfigError: The file is missing or unreadable, or (strict) it does not fit the model.

    Example:
        >>> model = build_model("resnet56", num_classes=10, input_shape=(3, 32, 32))  # doctest: +SKIP
        >>> load_weights(model, "resnet56-4bfd9763.th")["extra"]  # doctest: +SKIP
        {'best_prec1': 93.62...}
    """
    path = Path(path)
    checkpoint, metadata = _read_checkpoint(path)
    state_dict, extra = _unwrap(checkpoint, path)
    extra = {**metadata, **extra}
    target = unwrap_model(model)
    expected = target.state_dict()
    # Strip wrapper prefixes only from keys the model does not know as they are.
    state_dict = {
        key if key in expected else _strip_prefixes(key): value for key, value in state_dict.items()
    }
    missing = [key for key in expected if key not in state_dict and not key.endswith("num_batches_tracked")]
    unexpected = [key for key in state_dict if key not in expected]
    mismatched = [
        f"{key}: expected {tuple(expected[key].shape)}, got {tuple(state_dict[key].shape)}"
        for key in expected  # in the model's order, so the first one named is the first that differs
        if key in state_dict and expected[key].shape != state_dict[key].shape
    ]
    if strict and (missing or unexpected or mismatched):
        problems = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if keys:
                shown = "; ".join(keys[:_SHOWN]) + ("; ..." if len(keys) > _SHOWN else "")
                problems.append(f"{len(keys)} {label} ({shown})")
        raise ConfigError(
            f"{path} does not fit the {type(target).__name__}: {', '.join(problems)}; check the model name and "
            "num_classes, or pass strict=False to load only the matching keys"
        )
    loadable = {
        key: value
        for key, value in state_dict.items()
        if key in expected and expected[key].shape == value.shape
    }
    target.load_state_dict(loadable, strict=False)
    return {
        "path": str(path),
        "missing": missing,
        "unexpected": unexpected,
        "mismatched": mismatched,
        "extra": extra,
    }


def _read_checkpoint(path: Path) -> tuple[Any, dict[str, str]]:
    """The file's contents and, for safetensors, its string metadata."""
    if not path.is_file():
        raise ConfigError(f"weights file not found: {path}; check the path")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = dict(handle.metadata() or {})
            return load_file(str(path), device="cpu"), metadata
        except (SafetensorError, OSError) as error:
            raise ConfigError(f"cannot read safetensors file {path}: {error}") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True), {}
    except pickle.UnpicklingError as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(
            f"{path} cannot be loaded with weights_only=True ({first_line}); it is not a plain checkpoint, "
            "re-save it with torch.save(model.state_dict(), path) or as .safetensors"
        ) from None
    except Exception as error:  # garbage makes the unpickler fail in many ways (IndexError, KeyError, ...)
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(
            f"cannot read weights file {path}: {first_line} (corrupt or not a torch checkpoint)"
        ) from None


def _unwrap(checkpoint: Any, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Find the state dict inside a checkpoint; collect top-level scalars as extra information."""
    extra: dict[str, Any] = {}
    current = checkpoint
    for _ in range(3):  # e.g. {"model": {"state_dict": {...}}}
        if not isinstance(current, Mapping):
            break
        wrapper_key = next((key for key in _WRAPPER_KEYS if isinstance(current.get(key), Mapping)), None)
        if wrapper_key is None:
            break
        for key, value in current.items():
            if key != wrapper_key and _is_scalar(value):
                extra[str(key)] = value.item() if isinstance(value, torch.Tensor) else value
        current = current[wrapper_key]
    if not isinstance(current, Mapping) or not current:
        raise ConfigError(
            f"{path} holds {type(current).__name__}, not a state dict of tensors; save model.state_dict()"
        )
    tensors = {str(key): value for key, value in current.items() if isinstance(value, torch.Tensor)}
    if not tensors:
        raise ConfigError(
            f"{path} has no tensors at its top level or under {', '.join(_WRAPPER_KEYS)}; "
            f"found keys {', '.join(map(str, list(current)[:_SHOWN]))}"
        )
    return tensors, extra


def _is_scalar(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.numel() == 1
    return isinstance(value, (int, float, str, bool))


def _strip_prefixes(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix) :], True
    return key


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module under DDP / DataParallel (``.module``) and ``torch.compile`` (``._orig_mod``)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model
