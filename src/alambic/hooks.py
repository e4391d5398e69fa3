"""The one place that registers forward hooks: capture named modules' outputs without editing models.

Example:
    >>> with capture_features(model, ["layer2", "layer3"]) as features:
    ...     logits = model(images)
    >>> features["layer2"].shape
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Iterator

from torch import Tensor, nn

from alambic.errors import ConfigError


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP / DataParallel (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


def resolve_module(model: nn.Module, path: str, *, side: str = "model") -> nn.Module:
    """The submodule at ``path`` (``layer3`` / ``encoder.layer.5``); a wrong path says what is near."""
    modules = dict(unwrap_model(model).named_modules())
    if path in modules and path != "":
        return modules[path]
    names = [name for name in modules if name]
    close = difflib.get_close_matches(path, names, n=3, cutoff=0.5)
    hint = f" did you mean {', '.join(close)}?" if close else ""
    top = sorted({name.split(".")[0] for name in names})
    raise ConfigError(
        f"the {side} has no module {path!r}.{hint} Top-level modules: {', '.join(top)} "
        "(print(model) lists every module)"
    )


@contextlib.contextmanager
def capture_features(
    model: nn.Module, paths: list[str], *, side: str = "model"
) -> Iterator[dict[str, Tensor]]:
    """Capture the outputs of the modules at ``paths`` during forward passes inside the block.

    Paths are validated before anything runs. The dict is refilled on every forward pass; handles
    are removed on exit, even after an exception.
    """
    features: dict[str, Tensor] = {}
    handles = []
    try:
        for path in dict.fromkeys(paths):
            module = resolve_module(model, path, side=side)

            def hook(_module, _inputs, output, path=path):
                features[path] = output[0] if isinstance(output, (tuple, list)) else output

            handles.append(module.register_forward_hook(hook))
        yield features
    finally:
        for handle in handles:
            handle.remove()
