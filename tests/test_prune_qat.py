"""Pruning (magnitude and channel), recovery by distillation, and QAT + KD: on the zoo models and digits."""

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tolerance import close
from torch.utils.data import DataLoader

from alambic.compress.prune import channel_prune, magnitude_prune, recover, weight_sparsity
from alambic.compress.qat import (
    ActivationFakeQuant,
    FakeQuantWrapper,
    fake_quantize_weight,
    prepare_qat,
    qat_distill,
    qat_terms,
    strip_qat,
)
from alambic.core.checkpoint import save_weights
from alambic.core.evaluate import count_flops, count_parameters, evaluate_classifier
from alambic.data import build_datasets
from alambic.errors import ConfigError
from alambic.models import build_model
from alambic.models.surgery import load_resized

ZOO = [
    ("mlp", (1, 28, 28), {"hidden": [64, 32]}),
    ("cnn", (3, 32, 32), {"width": 8}),
    ("resnet20", (3, 32, 32), {}),
    ("resnet8x4", (3, 32, 32), {}),
]


@pytest.fixture(scope="module")
def digits():
    """A digits MLP trained briefly (the float original) and its data."""
    train_set, test_set, _ = build_datasets("digits")
    torch.manual_seed(0)
    model = build_model("mlp", num_classes=10, input_shape=(64,), hidden=[128, 64])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    loader = DataLoader(train_set, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    for _ in range(15):
        for inputs, labels in loader:
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(inputs), labels).backward()
            optimizer.step()
    return model.eval(), train_set, test_set


def _accuracy(model, dataset):
    return evaluate_classifier(model, DataLoader(dataset, batch_size=256), num_classes=10)["accuracy"]


def test_magnitude_pruning_reaches_the_sparsity_the_file_shows(digits, tmp_path):
    model, _, test_set = digits
    pruned = magnitude_prune(copy.deepcopy(model), 0.6)
    assert not any("mask" in key or "orig" in key for key in pruned.state_dict())  # permanent
    save_weights(pruned, tmp_path / "pruned.safetensors")
    stored = load_file(str(tmp_path / "pruned.safetensors"))
    weights = [value for key, value in stored.items() if key.endswith("weight")]
    zeros, total = sum(int((w == 0).sum()) for w in weights), sum(w.numel() for w in weights)
    report = weight_sparsity(pruned)
    assert report["zeros"] == zeros and report["weights"] == total
    assert abs(zeros / total - 0.6) < 1e-3
    assert weight_sparsity(model)["sparsity"] == 0.0  # the original is left alone
    # the global threshold removes the smallest weights: every survivor is at least as large as any pruned one
    original = torch.cat([model.state_dict()[key].flatten() for key in stored if key.endswith("weight")])
    kept = torch.cat([w.flatten() for w in weights]) != 0
    assert original.abs()[kept].min() >= original.abs()[~kept].max()
    # a moderately pruned model stays close to its float original on real inputs: 0.972 -> 0.950 here (360
    # samples); the model trained on this CPU's BLAS, so allow 0.05 (pruning the largest weights: ~0.1)
    assert _accuracy(pruned, test_set) > _accuracy(model, test_set) - 0.05


@pytest.mark.parametrize("name, shape, kwargs", ZOO)
def test_channel_pruning_really_shrinks_and_reloads(name, shape, kwargs, tmp_path):
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, input_shape=shape, **kwargs).eval()
    inputs = torch.randn(4, *shape)
    untouched = channel_prune(model, 0.0).eval()
    expected = model(inputs)  # outputs up to size 27 (resnet20): float rounding scales with them
    torch.testing.assert_close(untouched(inputs), expected, **close(expected))
    small = channel_prune(model, 0.5).eval()
    assert count_parameters(small) < 0.6 * count_parameters(model)
    assert count_flops(small, inputs) < 0.6 * count_flops(model, inputs)
    assert small(inputs).shape == (4, 10)
    save_weights(small, tmp_path / "small.safetensors")
    rebuilt = build_model(name, num_classes=10, input_shape=shape, **kwargs)
    load_resized(rebuilt, load_file(str(tmp_path / "small.safetensors")))
    assert count_parameters(rebuilt) == count_parameters(small)
    expected = small(inputs)
    torch.testing.assert_close(rebuilt.eval()(inputs), expected, **close(expected))


def test_channel_pruning_keeps_the_strongest_units():
    model = build_model("mlp", num_classes=3, input_shape=(4,), hidden=[4])
    with torch.no_grad():
        model.hidden[0][0].weight.copy_(torch.tensor([[1.0] * 4, [5.0] * 4, [0.1] * 4, [3.0] * 4]))
    small = channel_prune(model, 0.5)
    assert torch.equal(small.hidden[0][0].weight, torch.tensor([[5.0] * 4, [3.0] * 4]))
    assert torch.equal(small.head.weight, model.head.weight[:, [1, 3]])


def test_pruning_rejects_what_it_cannot_do():
    with pytest.raises(ConfigError, match="sparsity must be in"):
        magnitude_prune(build_model("mlp", num_classes=2, input_shape=(4,)), 1.0)
    with pytest.raises(ConfigError, match="magnitude pruning"):
        channel_prune(torch.nn.Sequential(torch.nn.Linear(4, 2)), 0.5)


def test_recovery_distills_the_pruned_model_and_keeps_its_zeros(digits):
    model, train_set, test_set = digits
    pruned = magnitude_prune(copy.deepcopy(model), 0.9)
    pruned_accuracy = _accuracy(pruned, test_set)
    loader = DataLoader(train_set, batch_size=64, shuffle=True)
    recovered = recover(pruned, model, loader, epochs=3, optimizer="adamw", lr=3e-3, weight_decay=0.0)
    assert not any("mask" in key for key in recovered.state_dict())
    assert weight_sparsity(recovered)["sparsity"] == pytest.approx(
        0.9, abs=1e-3
    )  # pruned weights stayed zero
    assert _accuracy(recovered, test_set) > pruned_accuracy + 0.05


def test_weight_fake_quantization_lies_on_the_int8_grid():
    weight = torch.randn(6, 5, requires_grad=True)
    quantized = fake_quantize_weight(weight)
    scale = weight.detach().abs().amax(dim=1, keepdim=True) / 127  # [6, 1]
    steps = quantized.detach() / scale
    assert torch.allclose(steps, steps.round(), atol=1e-4) and steps.abs().max() <= 127 + 1e-4
    assert ((quantized - weight).abs() <= scale / 2 + 1e-6).all()
    quantized.sum().backward()
    assert torch.equal(weight.grad, torch.ones_like(weight))  # straight-through inside the range


def test_activation_fake_quantization_tracks_its_range_and_passes_gradients_inside_it():
    quant = ActivationFakeQuant()
    x = torch.linspace(-1.0, 3.0, 101, requires_grad=True)
    y = quant(x)  # training mode: the range is observed first
    assert float(quant.low) == pytest.approx(-1.0) and float(quant.high) == pytest.approx(3.0)
    assert len(torch.unique(y.detach())) <= 256 and (y - x).abs().max() <= 4.0 / 255
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    quant.eval()
    outside = torch.tensor([10.0], requires_grad=True)
    quant(outside).sum().backward()
    assert outside.grad.item() == 0.0  # clipped: no gradient outside the calibrated range


def test_prepare_and_strip_qat_keep_the_float_model_layout(digits):
    model = digits[0]
    prepared = prepare_qat(model)
    assert sum(isinstance(m, FakeQuantWrapper) for m in prepared.modules()) == 3
    stripped = strip_qat(prepared)
    assert list(stripped.state_dict()) == list(model.state_dict())
    assert not any(isinstance(m, FakeQuantWrapper) for m in model.modules())  # the original is untouched


def test_qat_terms_expose_the_temperature():
    terms = qat_terms(temperature=1.5, kd_weight=0.8)
    assert [(term["loss"], term["weight"]) for term in terms] == [("ce", pytest.approx(0.2)), ("kd", 0.8)]
    assert terms[1]["params"] == {"temperature": 1.5}
    with pytest.raises(ConfigError, match="temperature must be > 0"):
        qat_terms(temperature=0.0)
    with pytest.raises(ConfigError, match="kd_weight"):
        qat_terms(kd_weight=1.5)


def test_a_qat_kd_run_trains_and_its_temperature_reaches_the_loss(digits):
    model, train_set, test_set = digits
    teacher = copy.deepcopy(model)
    student = build_model("mlp", num_classes=10, input_shape=(64,), hidden=[32])
    loader = DataLoader(train_set, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    settings = {"epochs": 5, "optimizer": "adamw", "lr": 5e-3, "weight_decay": 0.0, "kd_weight": 1.0}
    cold = qat_distill(teacher, student, loader, temperature=1.0, **settings)
    assert list(cold.state_dict()) == list(student.state_dict())
    assert not torch.equal(cold.head.weight, student.head.weight)
    assert _accuracy(cold, test_set) > 0.85  # learned from the teacher alone (kd_weight 1: no labels)
    hot = qat_distill(teacher, student, loader, temperature=8.0, **settings)
    assert not torch.allclose(hot.head.weight, cold.head.weight, atol=1e-4)


def test_qat_wraps_convolutions_and_stays_close_to_the_float_model():
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10, input_shape=(3, 32, 32)).eval()
    inputs = torch.randn(8, 3, 32, 32)
    prepared = prepare_qat(model)
    assert (
        sum(isinstance(m, FakeQuantWrapper) for m in prepared.modules()) == 20
    )  # 19 convolutions + the head
    prepared.train()
    prepared(inputs).sum().backward()  # gradients reach the float weights through the fake quantization
    assert prepared.conv1.layer.weight.grad is not None
    prepared = prepare_qat(model).eval()
    for module in prepared.modules():  # observe activation ranges with BatchNorm as in the float model
        if isinstance(module, ActivationFakeQuant):
            module.train()
    prepared(inputs)
    expected, simulated = model(inputs), prepared.eval()(inputs)
    assert not torch.equal(expected, simulated)  # int8 rounding is simulated
    assert (simulated - expected).abs().max() < 0.1 * expected.abs().max()


def test_a_partial_stage_train_override_keeps_the_stage_defaults():
    from alambic.config import load_config

    config = load_config(
        Path(__file__).resolve().parents[1] / "recipes" / "digits.yaml",
        ["compress.recover.train.epochs=3", "compress.quantize.qat_train.optimizer=sgd"],
    )
    recover, qat = config.compress.recover.train, config.compress.quantize.qat_train
    assert (recover.epochs, recover.optimizer, recover.lr) == (3, "adamw", 0.001)
    assert (qat.epochs, qat.optimizer, qat.lr, qat.weight_decay) == (1, "sgd", 0.0005, 0.0)
