"""CIFAR ResNets: the He et al. (2016) option-A family and the wider option-B family of the CRD repo.

- :class:`CifarResNet` (``resnet20/32/44/56``): https://arxiv.org/abs/1512.03385, Section 4.2. Three
  stages of 16, 32, 64 channels; a downsampling block's shortcut subsamples and zero-pads channels
  ("option A"), so shortcuts have no parameters. Module names and layout match the pretrained
  checkpoints of https://github.com/akamaster/pytorch_resnet_cifar10, so they load without renaming.
- :class:`WideCifarResNet` (``resnet8x4``, ``resnet32x4``): the CIFAR ResNets of CRD
  (Tian et al. 2020, https://arxiv.org/abs/1910.10699, github HobbitLong/RepDistiller
  ``models/resnet.py``): a 32-channel stem, stages of 64, 128, 256 channels, and 1x1 conv + BN
  shortcuts ("option B") wherever the shape changes. Module names match that repo (``downsample``,
  ``fc``) so its checkpoints load too.

Both return logits only; features are read with forward hooks on ``layer1``, ``layer2``, ``layer3``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class OptionAShortcut(nn.Module):
    """Parameter-free shortcut: subsample by 2 and zero-pad the channels on both sides."""

    def __init__(self, padding_channels: int) -> None:
        super().__init__()
        self.padding_channels = padding_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padding = self.padding_channels
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, padding, padding))  # [B, C + 2p, H / 2, W / 2]


class OptionABlock(nn.Module):
    """BasicBlock with an option-A shortcut (akamaster layout)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = OptionAShortcut(planes // 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))  # [B, planes, H', W']
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def make_stage(
    block: type[nn.Module], in_planes: int, planes: int, num_blocks: int, stride: int
) -> nn.Sequential:
    """``num_blocks`` blocks; the first takes ``in_planes`` at ``stride``, the rest ``planes`` at stride 1."""
    strides = [stride] + [1] * (num_blocks - 1)
    inputs = [in_planes] + [planes] * (num_blocks - 1)
    return nn.Sequential(*(block(width, planes, step) for width, step in zip(inputs, strides)))


class CifarResNet(nn.Module):
    """He et al. CIFAR ResNet with ``6 * blocks_per_stage + 2`` layers and option-A shortcuts.

    Args:
        blocks_per_stage: 3, 5, 7, 9 give ResNet-20, 32, 44, 56.
        num_classes: Size of the ``linear`` head.
        in_channels: Input image channels.
    """

    def __init__(self, blocks_per_stage: int, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.in_planes = 16
        self.conv1 = nn.Conv2d(in_channels, 16, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._make_stage(16, blocks_per_stage, stride=1)
        self.layer2 = self._make_stage(32, blocks_per_stage, stride=2)
        self.layer3 = self._make_stage(64, blocks_per_stage, stride=2)
        self.linear = nn.Linear(64, num_classes)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight)

    def _make_stage(self, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        stage = make_stage(OptionABlock, self.in_planes, planes, num_blocks, stride)
        self.in_planes = planes
        return stage

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))  # [B, 16, H, W]
        out = self.layer3(self.layer2(self.layer1(out)))  # [B, 64, H / 4, W / 4]
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)  # [B, 64]
        return self.linear(out)  # [B, num_classes]


class OptionBBlock(nn.Module):
    """BasicBlock with a 1x1 conv + BN shortcut when the shape changes (CRD layout)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))  # [B, planes, H', W']
        out = self.bn2(self.conv2(out))
        return F.relu(out + residual)


class WideCifarResNet(nn.Module):
    """CRD's CIFAR ResNet with ``6 * blocks_per_stage + 2`` layers and a configurable channel list.

    Args:
        blocks_per_stage: 1 gives resnet8x4, 5 gives resnet32x4.
        channels: Stem, stage 1, stage 2, stage 3 channels; ``(32, 64, 128, 256)`` for the x4 models.
        num_classes: Size of the ``fc`` head.
        in_channels: Input image channels.
    """

    def __init__(
        self,
        blocks_per_stage: int,
        channels: tuple[int, int, int, int] = (32, 64, 128, 256),
        num_classes: int = 100,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        stem, *stage_channels = channels
        self.in_planes = stem
        self.conv1 = nn.Conv2d(in_channels, stem, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.layer1 = self._make_stage(stage_channels[0], blocks_per_stage, stride=1)
        self.layer2 = self._make_stage(stage_channels[1], blocks_per_stage, stride=2)
        self.layer3 = self._make_stage(stage_channels[2], blocks_per_stage, stride=2)
        self.fc = nn.Linear(stage_channels[2], num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def _make_stage(self, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        stage = make_stage(OptionBBlock, self.in_planes, planes, num_blocks, stride)
        self.in_planes = planes
        return stage

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))  # [B, stem, H, W]
        out = self.layer3(self.layer2(self.layer1(out)))  # [B, channels[3], H / 4, W / 4]
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)  # [B, channels[3]]
        return self.fc(out)  # [B, num_classes]
