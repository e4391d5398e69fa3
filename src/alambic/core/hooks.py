"""The one place that registers forward hooks: capture named modules' outputs without editing models.

Example:
    >>> with capture_features(model, ["layer2", "layer3"]) as features:
    ...     logits = model(images)
    >>> features["layer2"].shape
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from alambic.errors import ConfigError
from alambic.models.loading import unwrap_model


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
        "(`alambic inspect ARCH` lists every module with its output shape)"
    )


INPUT_SUFFIX = ":input"  # "fc:input" names what the module receives (e.g. the pooled embedding before fc)


@contextlib.contextmanager
def capture_features(
    model: nn.Module, paths: list[str], *, side: str = "model"
) -> Iterator[dict[str, Tensor]]:
    """Capture the outputs (or, for ``path:input``, the first input) of named modules during forward passes.

    Paths are validated before anything runs. The dict is refilled on every forward pass; handles
    are removed on exit, even after an exception.

    Example:
        >>> with capture_features(model, ["layer3", "fc:input"]) as features:
        ...     model(images)   # features["fc:input"] is the pooled vector the classifier sees
    """
    features: dict[str, Tensor] = {}
    handles = []
    try:
        for path in dict.fromkeys(paths):
            wants_input = path.endswith(INPUT_SUFFIX)
            module = resolve_module(model, path.removesuffix(INPUT_SUFFIX), side=side)

            def hook(_module, inputs, output, path=path, wants_input=wants_input):
                value = inputs if wants_input else output
                features[path] = value[0] if isinstance(value, (tuple, list)) else value

            handles.append(module.register_forward_hook(hook))
        yield features
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def transform_inputs(
    model: nn.Module, transforms: Mapping[str, Callable[[Tensor], Tensor]], *, side: str = "model"
) -> Iterator[None]:
    """Pass the first input of named modules through a function before they run (forward pre-hooks).

    Used to put a gate on a value that no module outputs on its own, such as each attention head's
    context vector entering the attention output projection. Paths are validated before anything runs;
    handles are removed on exit, even after an exception.

    Example:
        >>> gate = torch.ones(4, requires_grad=True)
        >>> with transform_inputs(model, {"encoder.0": lambda x: x * gate}):
        ...     model(inputs).sum().backward()   # gate.grad: the output's sensitivity to each input
    """
    handles = []
    try:
        modules = {path: resolve_module(model, path, side=side) for path in transforms}
        for path, module in modules.items():

            def pre_hook(_module, args, transform=transforms[path]):
                return (transform(args[0]), *args[1:])

            handles.append(module.register_forward_pre_hook(pre_hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class ModuleRow:
    """One line of :func:`module_table`."""

    path: str
    kind: str
    output_shape: tuple[int, ...] | None
    parameters: int


def module_table(model: nn.Module, example_input: Tensor, *, max_depth: int | None = None) -> list[ModuleRow]:
    """Every named module with its output shape on ``example_input``: what a term's ``student:`` / ``teacher:`` can name.

    Example:
        >>> for row in module_table(build_model("resnet20", num_classes=10, input_shape=(3, 32, 32)),
        ...                         torch.randn(1, 3, 32, 32)):
        ...     print(row.path, row.output_shape)
    """
    model = unwrap_model(model)
    names = [
        name
        for name, _ in model.named_modules()
        if name and (max_depth is None or name.count(".") < max_depth)
    ]
    with torch.no_grad(), capture_features(model, names) as features:
        was_training = model.training
        model.eval()
        try:
            model(example_input)
        finally:
            model.train(was_training)
    modules = dict(model.named_modules())
    return [
        ModuleRow(
            path=name,
            kind=type(modules[name]).__name__,
            output_shape=tuple(features[name].shape) if isinstance(features.get(name), Tensor) else None,
            parameters=sum(p.numel() for p in modules[name].parameters()),
        )
        for name in names
    ]
