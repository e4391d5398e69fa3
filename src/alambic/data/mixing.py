"""Mixup and CutMix as a data set view, for augmentation-consistent distillation on small data sets.

Beyer et al. 2022 ("Knowledge distillation: A good teacher is patient and consistent",
arXiv:2106.05237) distill with aggressive mixing, the teacher evaluated on *exactly* the view the
student sees. In alambic the loop gives the teacher the batch it gives the student, so mixing the
samples before batching makes every view consistent by construction. Each sample is mixed with a
random partner, with its own ``lam ~ Beta(alpha, alpha)``; its label is the one of the larger share
(``kd`` is what matches the mixed view; ``ce`` sees the dominant label).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset

from alambic.errors import ConfigError

MIX_KINDS = ("mixup", "cutmix")


class MixedDataset(Dataset):
    """Yields ``(mixed input, dominant label)``: mixup (``lam x_i + (1 - lam) x_j``) or CutMix (a box of ``x_j``).

    Randomness comes from torch's global generator, which the loop seeds and checkpoints, so a resumed
    run mixes the same pairs. Index ``i`` keeps its position (per-sample losses see ``i``).

    Example:
        >>> train_set = MixedDataset(train_set, "cutmix", alpha=1.0)
    """

    def __init__(self, dataset: Dataset, kind: str = "mixup", alpha: float = 1.0) -> None:
        if kind not in MIX_KINDS:
            raise ConfigError(f"unknown mix {kind!r}; choose {' or '.join(MIX_KINDS)}")
        if not alpha > 0:
            raise ConfigError(f"mix alpha must be > 0 (Beta(alpha, alpha)), got {alpha}")
        sample = dataset[0][0]
        if not isinstance(sample, torch.Tensor) or not sample.is_floating_point():
            raise ConfigError(
                f"mix {kind!r} blends float inputs (images, feature vectors); this data set yields "
                f"{type(sample).__name__} inputs (token ids cannot be mixed): set train.mix: none"
            )
        self.dataset, self.kind, self.alpha = dataset, kind, float(alpha)
        self.augmentation = kind  # a random view per epoch: a teacher cache refuses it (alambic.core.cache)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        sample, label = self.dataset[index]
        partner = int(torch.randint(len(self.dataset), ()))
        other, other_label = self.dataset[partner]
        lam = float(torch.distributions.Beta(self.alpha, self.alpha).sample())
        if self.kind == "mixup":
            mixed = lam * sample + (1.0 - lam) * other
        else:
            mixed, lam = _cutmix(sample, other, lam)
        return mixed, label if lam >= 0.5 else other_label


def _cutmix(sample: torch.Tensor, other: torch.Tensor, lam: float) -> tuple[torch.Tensor, float]:
    """Paste a box covering ``1 - lam`` of the image from ``other`` (Yun et al. 2019); returns the kept share."""
    if sample.dim() < 2:
        raise ConfigError(
            f"cutmix needs images [C, H, W] or [H, W], got a sample of shape {tuple(sample.shape)}"
        )
    height, width = sample.shape[-2:]
    cut = (1.0 - lam) ** 0.5
    box_h, box_w = round(height * cut), round(width * cut)
    top = int(torch.randint(height - box_h + 1, ()))
    left = int(torch.randint(width - box_w + 1, ()))
    mixed = sample.clone()
    mixed[..., top : top + box_h, left : left + box_w] = other[..., top : top + box_h, left : left + box_w]
    return mixed, 1.0 - box_h * box_w / (height * width)
