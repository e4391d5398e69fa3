"""Pipeline pieces that the end-to-end CLI tests do not isolate."""

import torch

from alambic.data import build_datasets
from alambic.data.datasets import Augmentation, InMemoryDataset
from alambic.pipeline import _stage_train_set


def test_a_stage_can_turn_augmentation_off_without_touching_the_shared_set():
    images = torch.randint(
        0, 256, (8, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    train_set = InMemoryDataset(
        images, torch.zeros(8), augmentation=Augmentation(crop_padding=2, horizontal_flip=False)
    )
    plain = _stage_train_set(train_set, False)
    assert plain.augmentation is None and train_set.augmentation is not None
    assert torch.equal(plain[3][0], images[3].float() / 255)  # no jitter
    torch.manual_seed(0)
    jittered = [train_set[3][0] for _ in range(5)]
    assert any(not torch.equal(x, images[3].float() / 255) for x in jittered)
    assert _stage_train_set(train_set, None) is train_set
    assert _stage_train_set(train_set, True) is train_set
    digits, _, _ = build_datasets("digits")
    assert _stage_train_set(digits, False) is digits  # nothing to turn off
