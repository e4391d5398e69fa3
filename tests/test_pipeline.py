"""Pipeline pieces that the end-to-end CLI tests do not isolate."""

import torch

from alambic.data import build_datasets
from alambic.data.datasets import Augmentation, InMemoryDataset
from alambic.data.loaders import IndexedDataset
from alambic.run.stages import stage_train_set


def test_a_stage_can_turn_augmentation_off_without_touching_the_shared_set():
    images = torch.randint(
        0, 256, (8, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    train_set = InMemoryDataset(
        images, torch.zeros(8), augmentation=Augmentation(crop_padding=2, horizontal_flip=False)
    )
    plain = stage_train_set(train_set, False)
    assert isinstance(plain, IndexedDataset)  # every stage's batches carry sample indices
    assert plain.dataset.augmentation is None and train_set.augmentation is not None
    image, label, index = plain[3]
    assert torch.equal(image, images[3].float() / 255) and index == 3  # no jitter
    torch.manual_seed(0)
    jittered = [train_set[3][0] for _ in range(5)]
    assert any(not torch.equal(x, images[3].float() / 255) for x in jittered)
    assert stage_train_set(train_set, None).dataset is train_set
    assert stage_train_set(train_set, True).dataset is train_set
    digits, _, _ = build_datasets("digits")
    assert stage_train_set(digits, False).dataset is digits  # nothing to turn off


def test_a_model_factory_gets_exactly_its_kwargs_including_num_classes(tmp_path, monkeypatch):
    from torch import nn

    from alambic.config import ModelConfig
    from alambic.run.building import build_named_model

    (tmp_path / "alambic_factory_nc.py").write_text(
        "from torch import nn\ndef make(num_classes, width):\n    return nn.Linear(width, num_classes)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    _, _, info = build_datasets("digits")
    model = build_named_model(
        ModelConfig(arch="alambic_factory_nc:make", kwargs={"num_classes": 10, "width": 64}), info
    )
    assert isinstance(model, nn.Linear) and model.out_features == 10 and model.in_features == 64
