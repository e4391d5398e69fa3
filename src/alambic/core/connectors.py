"""Connectors: small learned adapters that map a student feature to the teacher feature's shape.

They are created from one probing forward pass (so users never size them by hand), train with the
student, are saved in its training checkpoints, and are never part of the exported student.
"""

from __future__ import annotations

from torch import nn

from alambic.errors import ConfigError

CONNECTORS = ("auto", "none", "linear", "conv1x1")


def make_connector(
    student_shape: tuple[int, ...], teacher_shape: tuple[int, ...], kind: str = "auto"
) -> nn.Module:
    """A connector from ``student_shape`` to ``teacher_shape`` (batch dimension first).

    Feature maps ``[B, C, H, W]`` get a 1x1 conv + BatchNorm (FitNets' regressor as in CRD's code),
    followed by a bilinear resize when the spatial sizes differ; vectors ``[B, D]`` and token
    features ``[B, T, D]`` get a linear layer on the last dimension.

    Example:
        >>> make_connector((8, 16, 32, 32), (8, 64, 8, 8))   # conv1x1 16->64 + BN + resize to 8x8
    """
    if len(student_shape) != len(teacher_shape):
        raise ConfigError(
            f"cannot connect a student feature {tuple(student_shape)} to a teacher feature {tuple(teacher_shape)}"
        )
    if len(student_shape) == 4:
        if kind not in ("auto", "conv1x1"):
            raise ConfigError(
                f"feature maps {tuple(student_shape)} need connector conv1x1 (or auto), not {kind!r}"
            )
        layers = [
            nn.Conv2d(student_shape[1], teacher_shape[1], kernel_size=1, bias=False),
            nn.BatchNorm2d(teacher_shape[1]),
        ]
        if tuple(student_shape[2:]) != tuple(teacher_shape[2:]):
            layers.append(nn.Upsample(size=tuple(teacher_shape[2:]), mode="bilinear", align_corners=False))
        return nn.Sequential(*layers)
    if len(student_shape) in (2, 3):
        if kind not in ("auto", "linear"):
            raise ConfigError(
                f"features {tuple(student_shape)} need connector linear (or auto), not {kind!r}"
            )
        return nn.Linear(student_shape[-1], teacher_shape[-1])
    raise ConfigError(
        f"no connector for features of shape {tuple(student_shape)}; use features of 2, 3 or 4 dimensions"
    )
