"""Forward hooks: paths validated before anything runs, features captured, handles removed."""

import pytest
import torch
from torch import nn

from alambic.config import Term
from alambic.distiller import Distiller, Teacher
from alambic.errors import ConfigError
from alambic.hooks import capture_features, resolve_module, unwrap_model


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(4, 6), nn.ReLU())
        self.head = nn.Linear(6, 3)

    def forward(self, inputs):
        return self.head(self.encoder(inputs))


def test_capture_returns_the_module_output_and_removes_its_hooks():
    model = Net()
    inputs = torch.randn(2, 4)
    with capture_features(model, ["encoder.0", "encoder"]) as features:
        model(inputs)
    torch.testing.assert_close(features["encoder.0"], model.encoder[0](inputs))
    torch.testing.assert_close(features["encoder"], torch.relu(model.encoder[0](inputs)))
    assert not model.encoder[0]._forward_hooks and not model.encoder._forward_hooks


def test_a_wrong_path_says_what_is_near():
    with pytest.raises(ConfigError, match=r"no module 'encoder\.1x'.*did you mean encoder\.1"):
        resolve_module(Net(), "encoder.1x", side="student")


def test_wrappers_are_unwrapped():
    model = Net()
    assert unwrap_model(nn.DataParallel(model)) is model
    assert resolve_module(nn.DataParallel(model), "head") is model.head


def test_a_feature_term_compares_named_modules_and_trains_only_the_student():
    student, teacher = Net(), Net()
    term = Term(loss="logit_mse", student="encoder", teacher="encoder")
    module = Distiller(student, [term])
    inputs = torch.randn(5, 4)
    losses = module(inputs, None, Teacher(teacher, [term])(inputs))
    expected = torch.mean((student.encoder(inputs) - teacher.encoder(inputs)) ** 2)
    torch.testing.assert_close(losses["logit_mse:encoder"], expected)
    losses["total"].backward()
    assert student.encoder[0].weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())
