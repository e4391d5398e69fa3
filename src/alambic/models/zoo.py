"""The model zoo: a name -> builder registry, small baseline models, and user factories.

Every zoo builder takes ``num_classes`` and ``input_shape`` (one sample's shape, e.g. ``(3, 32, 32)``
or ``(64,)``) plus its own keyword arguments. A name of the form ``"package.module:function"`` is a
user factory instead, called as ``function(**kwargs)``.
"""

from __future__ import annotations

import difflib
import inspect
import math
from collections.abc import Callable, Sequence

from torch import nn

from alambic.errors import ConfigError
from alambic.imports import import_callable
from alambic.models.cifar_resnet import CifarResNet, WideCifarResNet

ModelBuilder = Callable[..., nn.Module]

_MODEL_BUILDERS: dict[str, ModelBuilder] = {}


def register_model(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    """Decorator adding a builder ``fn(*, num_classes, input_shape, **kwargs) -> nn.Module`` to the zoo.

    Example:
        >>> @register_model("tiny_linear")
        ... def tiny_linear(*, num_classes, input_shape):
        ...     return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes))
    """

    def decorator(builder: ModelBuilder) -> ModelBuilder:
        if name in _MODEL_BUILDERS:
            raise ValueError(f"model {name!r} is already registered")
        _MODEL_BUILDERS[name] = builder
        return builder

    return decorator


def list_models() -> list[str]:
    """Names of the registered zoo models, sorted."""
    return sorted(_MODEL_BUILDERS)


def build_model(name: str, *, num_classes: int, input_shape: tuple[int, ...], **kwargs) -> nn.Module:
    """Build a zoo model by name, or call a user factory ``"package.module:function"``.

    Args:
        name: A name from :func:`list_models`, or ``"package.module:function"``.
        num_classes: Number of output logits (not passed to user factories).
        input_shape: Shape of one input sample, e.g. ``(3, 32, 32)`` (not passed to user factories).
        **kwargs: The builder's own options, e.g. ``hidden=[128]`` for ``mlp``.

    Returns:
        The model, in training mode, on the CPU.

    Raises:
        ConfigError: Unknown name, bad arguments, or a factory that cannot be imported.

    Example:
        >>> model = build_model("resnet20", num_classes=10, input_shape=(3, 32, 32))
        >>> sum(parameter.numel() for parameter in model.parameters())
        269722
    """
    if ":" in name:
        return build_factory_model(name, kwargs)
    if name not in _MODEL_BUILDERS:
        close = difflib.get_close_matches(name, list_models(), n=3)
        hint = f"did you mean {', '.join(repr(match) for match in close)}? " if close else ""
        raise ConfigError(
            f"unknown model {name!r}; {hint}zoo models: {', '.join(list_models())}; "
            'or give a user factory as "package.module:function"'
        )
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}")
    input_shape = tuple(input_shape)
    if not input_shape or not all(isinstance(size, int) and size > 0 for size in input_shape):
        raise ConfigError(
            f"input_shape must be a tuple of positive integers such as (3, 32, 32), got {input_shape!r}"
        )
    options = model_options(name)
    unknown = sorted(set(kwargs) - set(options))
    if unknown:
        raise ConfigError(
            f"model {name!r} got unknown option(s) {', '.join(unknown)}; valid options: {', '.join(options) or 'none'}"
        )
    return _MODEL_BUILDERS[name](num_classes=num_classes, input_shape=input_shape, **kwargs)


def model_options(name: str) -> list[str]:
    """The options a zoo model's builder takes besides ``num_classes`` and ``input_shape`` ([] when unknown)."""
    builder = _MODEL_BUILDERS.get(name)
    if builder is None:
        return []
    return [
        parameter.name
        for parameter in inspect.signature(builder).parameters.values()
        if parameter.name not in ("num_classes", "input_shape")
    ]


def build_factory_model(spec: str, kwargs: dict) -> nn.Module:
    """Call a user factory ``package.module:function`` with exactly ``kwargs``; it must return a module."""
    function = import_callable(spec, what="model factory")
    model = function(**kwargs)
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"model factory {spec!r} returned {type(model).__name__}; expected a torch.nn.Module"
        )
    return model


def _image_shape(name: str, input_shape: tuple[int, ...], min_size: int) -> tuple[int, int, int]:
    if len(input_shape) != 3 or min(input_shape[1:]) < min_size:
        raise ConfigError(
            f"model {name!r} needs image inputs (channels, height, width) of at least {min_size}x{min_size}, "
            f"got input_shape {input_shape}; use 'mlp' for flat features"
        )
    return input_shape  # type: ignore[return-value]


@register_model("mlp")
def mlp(
    *,
    num_classes: int,
    input_shape: tuple[int, ...],
    hidden: Sequence[int] = (256, 256),
    dropout: float = 0.0,
) -> nn.Module:
    """Multi-layer perceptron on the flattened input: ``[Linear, ReLU, Dropout] * len(hidden)`` + ``head``.

    Hook paths: ``hidden.0``, ``hidden.1``, ... (each block's output) and ``head``.
    """
    if isinstance(hidden, int) or not all(isinstance(width, int) and width > 0 for width in hidden):
        raise ConfigError(
            f"mlp hidden must be a list of positive integers such as [256, 256], got {hidden!r}"
        )
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"mlp dropout must be in [0, 1), got {dropout!r}")
    return MLP(math.prod(input_shape), list(hidden), num_classes, dropout)


class MLP(nn.Module):
    """See :func:`mlp`."""

    def __init__(self, in_features: int, hidden: list[int], num_classes: int, dropout: float) -> None:
        super().__init__()
        blocks = []
        for width in hidden:
            blocks.append(nn.Sequential(nn.Linear(in_features, width), nn.ReLU(), nn.Dropout(dropout)))
            in_features = width
        self.hidden = nn.Sequential(*blocks)
        self.head = nn.Linear(in_features, num_classes)

    def forward(self, x):
        return self.head(self.hidden(x.flatten(1)))  # [B, num_classes]


@register_model("cnn")
def cnn(*, num_classes: int, input_shape: tuple[int, ...], width: int = 32) -> nn.Module:
    """Small convnet: three conv-BN-ReLU blocks (``width``, ``2 * width``, ``4 * width`` channels, the
    first two max-pooled), global average pooling, and a linear ``head``.

    Hook paths: ``block1``, ``block2``, ``block3``, ``head``.
    """
    in_channels, _, _ = _image_shape("cnn", input_shape, min_size=4)
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ConfigError(f"cnn width must be a positive integer, got {width!r}")
    return SmallCNN(in_channels, width, num_classes)


class SmallCNN(nn.Module):
    """See :func:`cnn`."""

    def __init__(self, in_channels: int, width: int, num_classes: int) -> None:
        super().__init__()

        def block(in_planes: int, planes: int, pool: bool) -> nn.Sequential:
            layers = [
                nn.Conv2d(in_planes, planes, 3, padding=1, bias=False),
                nn.BatchNorm2d(planes),
                nn.ReLU(),
            ]
            return nn.Sequential(*layers, nn.MaxPool2d(2)) if pool else nn.Sequential(*layers)

        self.block1 = block(in_channels, width, pool=True)
        self.block2 = block(width, 2 * width, pool=True)
        self.block3 = block(2 * width, 4 * width, pool=False)
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        out = self.block3(self.block2(self.block1(x)))  # [B, 4 * width, H / 4, W / 4]
        return self.head(out.mean(dim=(2, 3)))  # [B, num_classes]


def _register_cifar_resnet(name: str, blocks_per_stage: int) -> None:
    def builder(*, num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
        in_channels, _, _ = _image_shape(name, input_shape, min_size=4)
        return CifarResNet(blocks_per_stage, num_classes=num_classes, in_channels=in_channels)

    builder.__doc__ = f"ResNet-{6 * blocks_per_stage + 2} for CIFAR (He et al. 2016, option-A shortcuts)."
    register_model(name)(builder)


def _register_wide_cifar_resnet(name: str, blocks_per_stage: int) -> None:
    def builder(*, num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
        in_channels, _, _ = _image_shape(name, input_shape, min_size=4)
        return WideCifarResNet(
            blocks_per_stage, (32, 64, 128, 256), num_classes=num_classes, in_channels=in_channels
        )

    builder.__doc__ = f"CRD's ResNet-{6 * blocks_per_stage + 2}x4 for CIFAR (option-B shortcuts)."
    register_model(name)(builder)


for _depth in (20, 32, 44, 56):
    _register_cifar_resnet(f"resnet{_depth}", (_depth - 2) // 6)
_register_wide_cifar_resnet("resnet8x4", 1)
_register_wide_cifar_resnet("resnet32x4", 5)
