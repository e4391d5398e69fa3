"""Forward hooks: paths validated before anything runs, features captured, handles removed."""

import pytest
import torch
from torch import nn

from alambic.config import Term
from alambic.core.distiller import Distiller, Teacher
from alambic.core.hooks import capture_features, resolve_module, transform_inputs, unwrap_model
from alambic.errors import ConfigError


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


class Wide(Net):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(4, 10), nn.ReLU())
        self.head = nn.Linear(10, 3)


def test_fitnet_gets_an_automatic_connector_that_trains_and_stays_out_of_the_student(tmp_path):
    from safetensors.torch import load_file
    from torch.utils.data import DataLoader, TensorDataset

    from alambic import distill
    from alambic.core.checkpoint import latest_checkpoint

    inputs = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
    labels = (inputs.sum(1) > 0).long()
    loader = DataLoader(TensorDataset(inputs, labels), batch_size=16)
    terms = [{"loss": "ce"}, {"loss": "fitnet", "weight": 1.0, "student": "encoder", "teacher": "encoder"}]
    student = distill(Wide(), Net(), loader, terms=terms, epochs=2, lr=0.05, run_dir=tmp_path)
    assert isinstance(student, Net)  # the connector is not part of the returned student
    saved = load_file(str(latest_checkpoint(tmp_path / "checkpoints") / "model.safetensors"))
    assert saved["connectors.1.weight"].shape == (10, 6)  # Linear 6 -> 10, sized from the probe
    assert not any(key.startswith("connectors") for key in student.state_dict())


def test_connectors_by_shape():
    from alambic.core.connectors import make_connector

    conv = make_connector((2, 16, 8, 8), (2, 64, 4, 4))
    assert conv(torch.randn(2, 16, 8, 8)).shape == (2, 64, 4, 4)
    assert make_connector((2, 5, 6), (2, 5, 9))(torch.randn(2, 5, 6)).shape == (2, 5, 9)
    with pytest.raises(ConfigError, match="conv1x1"):
        make_connector((2, 16, 8, 8), (2, 64, 8, 8), "linear")


def test_auto_adds_no_connector_when_shapes_match_or_the_loss_does_not_need_one():
    same = Distiller(Net(), [Term(loss="fitnet", student="encoder", teacher="encoder")])
    same.build_modules(torch.randn(3, 4), Teacher(Net(), same.terms))
    assert len(same.connectors) == 0
    relation = Distiller(Net(), [Term(loss="sp", student="encoder", teacher="encoder")])
    relation.build_modules(torch.randn(3, 4), Teacher(Wide(), relation.terms))
    assert len(relation.connectors) == 0  # sp compares batch relations: widths may differ


def test_a_path_ending_in_input_captures_what_the_module_receives():
    model = Net()
    inputs = torch.randn(2, 4)
    with capture_features(model, ["head:input", "head"]) as features:
        model(inputs)
    torch.testing.assert_close(features["head:input"], model.encoder(inputs))  # the head's input
    torch.testing.assert_close(features["head"], model(inputs))
    with pytest.raises(ConfigError, match="no module 'heda'"), capture_features(model, ["heda:input"]):
        pass


def test_transform_inputs_changes_what_a_module_receives_and_removes_its_hooks():
    model = Net()
    inputs = torch.randn(2, 4)
    with transform_inputs(model, {"head": lambda hidden: hidden * 0}):
        silenced = model(inputs)
    torch.testing.assert_close(silenced, model.head.bias.detach().expand(2, 3))
    assert not model.head._forward_pre_hooks
    torch.testing.assert_close(model(inputs), model.head(model.encoder(inputs)))
    with pytest.raises(ConfigError, match="did you mean head"), transform_inputs(model, {"haed": abs}):
        pass
