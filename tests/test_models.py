"""Tests for alambic.models: the zoo, user factories, weight loading, and the pretrained teachers."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tolerance import close
from torch import nn

from alambic.errors import ConfigError
from alambic.models import build_model, list_models, load_weights, register_model, zoo
from alambic.models.cifar_resnet import OptionAShortcut


def shared_data_dir() -> Path:
    """``$ALAMBIC_SHARED_DATA``, else ``../shared/data`` beside the checkout."""
    if os.environ.get("ALAMBIC_SHARED_DATA"):
        return Path(os.environ["ALAMBIC_SHARED_DATA"])
    return Path(__file__).resolve().parents[2] / "shared" / "data"


WEIGHTS_DIR = shared_data_dir() / "weights" / "cifar10-resnet-akamaster"
CHECKPOINTS = {
    "resnet20": ("resnet20-12fca82f.th", 91.78, 81.03),
    "resnet32": ("resnet32-d509ac18.th", 92.78, 82.56),
    "resnet44": ("resnet44-014dd654.th", 93.14, 82.67),
    "resnet56": ("resnet56-4bfd9763.th", 93.62, 83.20),
}
requires_weights = pytest.mark.skipif(
    not WEIGHTS_DIR.is_dir(), reason=f"pretrained weights {WEIGHTS_DIR} are absent (set ALAMBIC_SHARED_DATA)"
)
CIFAR_JPEG_DIR = shared_data_dir() / "cifar10-jpeg"
requires_cifar_jpeg = pytest.mark.skipif(
    not (CIFAR_JPEG_DIR / "cifar10-jpeg-yoongikim.tar.gz").is_file(),
    reason=f"CIFAR-10 JPEG tarball in {CIFAR_JPEG_DIR} is absent (set ALAMBIC_SHARED_DATA)",
)


def num_parameters(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


# --------------------------------------------------------------------------------------------------
# zoo


TEXT_MODELS = {"bilstm", "kim_cnn"}  # token-id inputs: tests/test_text_students.py


@pytest.mark.parametrize("name", sorted(set(list_models()) - TEXT_MODELS))
@pytest.mark.parametrize("input_shape", [(3, 32, 32), (1, 28, 28), (64,)])
def test_zoo_forward_shapes(name: str, input_shape: tuple[int, ...]):
    if len(input_shape) == 1 and name != "mlp":
        with pytest.raises(ConfigError, match="needs image inputs"):
            build_model(name, num_classes=7, input_shape=input_shape)
        return
    model = build_model(name, num_classes=7, input_shape=input_shape)
    logits = model(torch.randn(2, *input_shape))
    assert logits.shape == (2, 7)
    logits.sum().backward()
    assert all(parameter.grad is not None for parameter in model.parameters())


@pytest.mark.parametrize(
    "name, num_classes, expected",
    [
        ("resnet20", 10, 269_722),
        ("resnet32", 10, 464_154),
        ("resnet44", 10, 658_586),
        ("resnet56", 10, 853_018),
        ("resnet8x4", 100, 1_233_540),  # CRD paper: 1.23M
        ("resnet32x4", 100, 7_433_860),  # CRD paper: 7.43M
    ],
)
def test_resnet_parameter_counts(name: str, num_classes: int, expected: int):
    assert num_parameters(build_model(name, num_classes=num_classes, input_shape=(3, 32, 32))) == expected


def test_cifar_resnet_module_names_match_checkpoint_layout():
    keys = set(build_model("resnet20", num_classes=10, input_shape=(3, 32, 32)).state_dict())
    assert {"conv1.weight", "bn1.running_var", "layer3.2.bn2.weight", "linear.weight", "linear.bias"} <= keys
    assert not any("shortcut" in key for key in keys)  # option A has no parameters
    wide_keys = set(build_model("resnet8x4", num_classes=100, input_shape=(3, 32, 32)).state_dict())
    assert {"layer1.0.downsample.0.weight", "layer3.0.downsample.1.running_mean", "fc.weight"} <= wide_keys


def test_option_a_shortcut_subsamples_and_zero_pads_channels():
    x = torch.randn(2, 16, 8, 8)
    out = OptionAShortcut(padding_channels=8)(x)
    assert out.shape == (2, 32, 4, 4)
    torch.testing.assert_close(out[:, 8:24], x[:, :, ::2, ::2])
    assert out[:, :8].abs().sum() == 0 and out[:, 24:].abs().sum() == 0


def reference_cifar_resnet_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """He et al. CIFAR ResNet written out functionally from its description, using the model's weights."""

    def conv_bn(x, conv, bn, stride=1):
        out = F.conv2d(x, conv.weight, stride=stride, padding=1)
        return F.batch_norm(
            out, bn.running_mean, bn.running_var, bn.weight, bn.bias, training=False, eps=bn.eps
        )

    out = F.relu(conv_bn(x, model.conv1, model.bn1))
    for stage in (model.layer1, model.layer2, model.layer3):
        for block in stage:
            stride = block.conv1.stride[0]
            residual = F.relu(conv_bn(out, block.conv1, block.bn1, stride))
            residual = conv_bn(residual, block.conv2, block.bn2)
            shortcut = out
            if stride != 1 or out.shape[1] != residual.shape[1]:
                padding = residual.shape[1] // 4
                shortcut = F.pad(out[:, :, ::2, ::2], (0, 0, 0, 0, padding, padding))
            out = F.relu(residual + shortcut)
    return F.linear(out.mean(dim=(2, 3)), model.linear.weight, model.linear.bias)


def test_cifar_resnet_matches_reference_forward():
    torch.manual_seed(0)
    model = build_model("resnet32", num_classes=10, input_shape=(3, 32, 32))
    for module in model.modules():  # non-trivial BN statistics so that every term matters
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.bias.data.uniform_(-0.5, 0.5)
    model.eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = reference_cifar_resnet_forward(model, x)
        # the same ops, so equal here; logits of size 334 (these BN statistics) need an atol of their size
        # where a kernel sums in another order, not the default 1e-5
        torch.testing.assert_close(model(x), expected, **close(expected))


def test_mlp_options_and_errors():
    model = build_model("mlp", num_classes=3, input_shape=(2, 4), hidden=[5], dropout=0.5)
    assert [module.out_features for module in model.modules() if isinstance(module, nn.Linear)] == [5, 3]
    assert [module.p for module in model.modules() if isinstance(module, nn.Dropout)] == [0.5]
    assert model(torch.randn(4, 2, 4)).shape == (4, 3)
    with pytest.raises(ConfigError, match="list of positive integers"):
        build_model("mlp", num_classes=3, input_shape=(8,), hidden=[0])
    with pytest.raises(ConfigError, match="dropout"):
        build_model("mlp", num_classes=3, input_shape=(8,), dropout=1.0)


def test_unknown_model_suggests_close_matches():
    with pytest.raises(
        ConfigError,
        match=r"unknown model 'resnet65'; did you mean 'resnet56'.*zoo models: bilstm, cnn, kim_cnn, mlp",
    ):
        build_model("resnet65", num_classes=10, input_shape=(3, 32, 32))


def test_bad_arguments_are_config_errors():
    with pytest.raises(ConfigError, match="unknown option.*widht.*valid options: width"):
        build_model("cnn", num_classes=10, input_shape=(3, 32, 32), widht=8)
    with pytest.raises(ConfigError, match="num_classes"):
        build_model("cnn", num_classes=0, input_shape=(3, 32, 32))
    with pytest.raises(ConfigError, match="input_shape must be a tuple of positive integers"):
        build_model("cnn", num_classes=10, input_shape=(3, -1, 32))


def test_register_model_adds_to_zoo(monkeypatch):
    monkeypatch.setattr(zoo, "_MODEL_BUILDERS", dict(zoo._MODEL_BUILDERS))

    @register_model("tiny_linear")
    def tiny_linear(*, num_classes, input_shape):
        return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[0], num_classes))

    assert "tiny_linear" in list_models()
    assert build_model("tiny_linear", num_classes=2, input_shape=(3,))(torch.randn(1, 3)).shape == (1, 2)
    with pytest.raises(ValueError, match="already registered"):
        register_model("tiny_linear")(tiny_linear)


@pytest.fixture
def factory_module(tmp_path: Path, monkeypatch) -> str:
    source = textwrap.dedent(
        """
        from torch import nn

        def make(width=4):
            return nn.Linear(3, width)

        def not_a_model():
            return "model"
        """
    )
    (tmp_path / "alambic_test_model_factories.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "alambic_test_model_factories"


def test_user_factory(factory_module: str):
    model = build_model(f"{factory_module}:make", num_classes=10, input_shape=(3,), width=6)
    assert isinstance(model, nn.Linear) and model.out_features == 6  # num_classes is not injected


@pytest.mark.parametrize(
    "suffix, message",
    [(":not_a_model", "returned str"), (":missing", "has no function"), ("_nope:make", "cannot import")],
)
def test_user_factory_errors(factory_module: str, suffix: str, message: str):
    with pytest.raises(ConfigError, match=message):
        build_model(factory_module + suffix, num_classes=10, input_shape=(3,))


# --------------------------------------------------------------------------------------------------
# load_weights on files written in the test


@pytest.fixture
def small_model() -> nn.Module:
    torch.manual_seed(0)
    return build_model("resnet20", num_classes=10, input_shape=(3, 32, 32))


def fresh_resnet20(num_classes: int = 10) -> nn.Module:
    torch.manual_seed(1)
    return build_model("resnet20", num_classes=num_classes, input_shape=(3, 32, 32))


def assert_same_weights(first: nn.Module, second: nn.Module) -> None:
    for (name, left), right in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        torch.testing.assert_close(left, right, msg=name)


def test_load_plain_state_dict(tmp_path: Path, small_model: nn.Module):
    torch.save(small_model.state_dict(), tmp_path / "plain.pt")
    target = fresh_resnet20()
    info = load_weights(target, tmp_path / "plain.pt")
    assert info == {
        "path": str(tmp_path / "plain.pt"),
        "missing": [],
        "unexpected": [],
        "mismatched": [],
        "extra": {},
    }
    assert_same_weights(target, small_model)


def test_load_wrapped_prefixed_checkpoint(tmp_path: Path, small_model: nn.Module):
    state = {
        f"module._orig_mod.{key}": value
        for key, value in small_model.state_dict().items()
        if not key.endswith("num_batches_tracked")  # as in checkpoints saved before PyTorch 0.4.1
    }
    checkpoint = {"state_dict": state, "best_prec1": torch.tensor(91.5), "epoch": 3, "optimizer": {"lr": 0.1}}
    torch.save(checkpoint, tmp_path / "wrapped.th")
    target = fresh_resnet20()
    info = load_weights(target, tmp_path / "wrapped.th")
    assert info["extra"] == {"best_prec1": 91.5, "epoch": 3} and info["missing"] == []
    assert_same_weights(target, small_model)


def test_load_into_compiled_style_wrapper(tmp_path: Path, small_model: nn.Module):
    torch.save({"model": small_model.state_dict()}, tmp_path / "model.pt")
    wrapper = nn.Module()
    wrapper._orig_mod = fresh_resnet20()  # what torch.compile's OptimizedModule holds
    load_weights(wrapper, tmp_path / "model.pt")
    assert_same_weights(wrapper._orig_mod, small_model)


def test_load_safetensors_with_metadata(tmp_path: Path, small_model: nn.Module):
    state = {key: value.contiguous() for key, value in small_model.state_dict().items()}
    save_file(state, str(tmp_path / "weights.safetensors"), metadata={"source": "test"})
    target = fresh_resnet20()
    info = load_weights(target, tmp_path / "weights.safetensors")
    assert info["extra"] == {"source": "test"}
    assert_same_weights(target, small_model)


def test_shape_mismatch_lists_expected_and_got(tmp_path: Path, small_model: nn.Module):
    torch.save(small_model.state_dict(), tmp_path / "ten.pt")
    target = fresh_resnet20(num_classes=100)
    with pytest.raises(
        ConfigError, match=r"2 shape mismatch \(linear.weight: expected \(100, 64\), got \(10, 64\)"
    ):
        load_weights(target, tmp_path / "ten.pt")
    before = target.linear.weight.clone()
    info = load_weights(target, tmp_path / "ten.pt", strict=False)
    assert len(info["mismatched"]) == 2 and torch.equal(target.linear.weight, before)
    torch.testing.assert_close(target.conv1.weight, small_model.conv1.weight)


def test_missing_and_unexpected_keys(tmp_path: Path, small_model: nn.Module):
    missing = dict(small_model.state_dict())
    del missing["layer3.2.bn2.weight"]
    torch.save(missing, tmp_path / "missing.pt")
    unexpected = {**small_model.state_dict(), "extra_head.weight": torch.zeros(2)}
    torch.save(unexpected, tmp_path / "unexpected.pt")
    with pytest.raises(ConfigError, match=r"1 missing \(layer3.2.bn2.weight\); check the model name"):
        load_weights(fresh_resnet20(), tmp_path / "missing.pt")
    with pytest.raises(ConfigError, match=r"1 unexpected \(extra_head.weight\); check the model name"):
        load_weights(fresh_resnet20(), tmp_path / "unexpected.pt")
    info = load_weights(fresh_resnet20(), tmp_path / "missing.pt", strict=False)
    assert info["missing"] == ["layer3.2.bn2.weight"] and info["unexpected"] == []
    info = load_weights(fresh_resnet20(), tmp_path / "unexpected.pt", strict=False)
    assert info["missing"] == [] and info["unexpected"] == ["extra_head.weight"]


class NotAStateDict:
    """Pickled as a class reference, which weights_only=True refuses to load."""


def test_refuses_arbitrary_pickles_and_missing_files(tmp_path: Path):
    torch.save({"state_dict": NotAStateDict()}, tmp_path / "unsafe.pt")
    with pytest.raises(ConfigError, match="weights_only=True"):
        load_weights(fresh_resnet20(), tmp_path / "unsafe.pt")
    with pytest.raises(ConfigError, match="weights file not found"):
        load_weights(fresh_resnet20(), tmp_path / "absent.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="garbage.pt"):
        load_weights(fresh_resnet20(), tmp_path / "garbage.pt")


# --------------------------------------------------------------------------------------------------
# pretrained teachers (skipped when ../shared/data is absent)


@requires_weights
@pytest.mark.parametrize("name", sorted(CHECKPOINTS))
def test_pretrained_checkpoints_load_strictly(name: str):
    file_name, best_prec1, _ = CHECKPOINTS[name]
    model = build_model(name, num_classes=10, input_shape=(3, 32, 32))
    info = load_weights(model, WEIGHTS_DIR / file_name)
    assert info["missing"] == [] and info["unexpected"] == [] and info["mismatched"] == []
    assert info["extra"]["best_prec1"] == pytest.approx(best_prec1, abs=1e-3)


@pytest.fixture(scope="module")
def cifar_jpeg_test_batch() -> tuple[torch.Tensor, torch.Tensor]:
    from alambic.data import build_datasets

    _, test, _ = build_datasets("cifar10-jpeg", data_dir=str(CIFAR_JPEG_DIR))
    inputs = torch.stack([test[index][0] for index in range(len(test))])  # [10000, 3, 32, 32], normalised
    return inputs, test.labels


@pytest.mark.slow
@requires_weights
@requires_cifar_jpeg
@pytest.mark.parametrize("name", ["resnet20", "resnet56"])
def test_pretrained_accuracy_on_jpeg_cifar10(name: str, cifar_jpeg_test_batch):
    """The acceptance check: our architecture + loader + data pipeline reproduce the published numbers."""
    file_name, _, expected_accuracy = CHECKPOINTS[name]
    model = build_model(name, num_classes=10, input_shape=(3, 32, 32))
    load_weights(model, WEIGHTS_DIR / file_name)
    model.eval()
    inputs, labels = cifar_jpeg_test_batch
    with torch.inference_mode():
        predictions = torch.cat([model(batch).argmax(dim=1) for batch in inputs.split(250)])  # [10000]
    accuracy = 100.0 * float((predictions == labels).float().mean())
    assert accuracy == pytest.approx(expected_accuracy, abs=0.1)
