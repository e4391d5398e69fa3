"""Tests for alambic.core.evaluate: metrics against sklearn and hand values, profiling, evaluation loop."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from subprocesses import run_two_process_script
from torch import nn

from alambic.core.evaluate import (
    classification_metrics,
    count_flops,
    count_parameters,
    evaluate_classifier,
    measure_latency,
    profile_model,
    size_on_disk,
)
from alambic.errors import AlambicError


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_sklearn(seed: int) -> None:
    metrics_module = pytest.importorskip("sklearn.metrics")
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 5, (200,), generator=generator)  # classes 0..4
    predictions = torch.randint(0, 4, (200,), generator=generator)  # class 4 is never predicted
    # num_classes=7: classes 5 and 6 occur nowhere and must not drag the macro mean down.
    metrics = classification_metrics(predictions, labels, num_classes=7)

    assert metrics["accuracy"] == pytest.approx(metrics_module.accuracy_score(labels, predictions))
    expected_f1 = metrics_module.f1_score(labels, predictions, average="macro", zero_division=0)
    assert metrics["macro_f1"] == pytest.approx(expected_f1)
    assert metrics["num_samples"] == 200
    assert metrics["errors"] == int((labels != predictions).sum())
    recall = metrics_module.recall_score(labels, predictions, average=None, labels=range(5), zero_division=0)
    assert metrics["per_class_accuracy"][:5] == pytest.approx(list(recall))
    assert metrics["per_class_accuracy"][4] == 0.0
    assert all(math.isnan(value) for value in metrics["per_class_accuracy"][5:])


def test_metrics_hand_computed() -> None:
    labels = torch.tensor([0, 0, 1, 1, 1, 2])
    predictions = torch.tensor([0, 1, 1, 1, 0, 0])
    metrics = classification_metrics(predictions, labels, num_classes=4)

    assert metrics["accuracy"] == pytest.approx(3 / 6)
    assert metrics["errors"] == 3
    assert metrics["num_samples"] == 6
    assert metrics["per_class_accuracy"][:3] == pytest.approx([1 / 2, 2 / 3, 0.0])
    assert math.isnan(metrics["per_class_accuracy"][3])  # class 3 has no sample
    # F1 per class = 2TP / (2TP + FP + FN): class 0 -> 2/5, class 1 -> 4/6, class 2 -> 0; class 3 excluded.
    assert metrics["macro_f1"] == pytest.approx((2 / 5 + 4 / 6 + 0.0) / 3)


def test_metrics_accept_logits_and_reject_bad_labels() -> None:
    logits = torch.tensor([[2.0, 0.1], [0.3, 0.9], [1.0, 0.0]])
    metrics = classification_metrics(logits, torch.tensor([0, 1, 1]), num_classes=2)
    assert metrics["accuracy"] == pytest.approx(2 / 3)
    with pytest.raises(AlambicError, match="num_classes=3"):
        classification_metrics(torch.tensor([0, 1]), torch.tensor([0, 3]), num_classes=3)


def test_count_parameters_linear() -> None:
    assert count_parameters(nn.Linear(3, 2)) == 8
    shared = nn.Linear(4, 4)
    assert count_parameters(nn.Sequential(shared, shared)) == 20  # a tied weight counts once


def test_size_on_disk_is_four_bytes_per_fp32_parameter_plus_header() -> None:
    model = nn.Sequential(nn.Linear(100, 50), nn.ReLU(), nn.Linear(50, 10))
    payload = 4 * count_parameters(model)
    size = size_on_disk(model)
    assert payload <= size <= payload + 1024  # safetensors adds a small JSON header


def test_count_flops_linear_is_two_per_multiply_accumulate() -> None:
    model = nn.Linear(10, 5)
    assert count_flops(model, torch.randn(1, 10)) == 2 * 10 * 5
    assert count_flops(model, torch.randn(8, 10)) == 2 * 10 * 5  # per sample, whatever the batch


class _KeywordModel(nn.Module):
    """Takes keyword inputs and returns a dict with logits, like a Hugging Face model."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(10, 5)

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.linear(features * mask)}


def test_count_flops_dict_input_and_modes_restored() -> None:
    model = _KeywordModel().train()
    example = {"features": torch.randn(1, 10), "mask": torch.ones(1, 10)}
    assert count_flops(model, example) == 100
    assert model.training


def test_measure_latency_returns_positive_numbers() -> None:
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).train()
    result = measure_latency(model, torch.randn(1, 16), batch_size=8, repeats=5, warmup=1)
    assert result["median_ms"] > 0
    assert result["p90_ms"] >= result["median_ms"]
    assert result["repeats"] == 5
    assert result["batch_size"] == 8
    assert model.training  # mode restored


def test_measure_latency_pins_and_restores_threads() -> None:
    before = torch.get_num_threads()
    result = measure_latency(nn.Linear(4, 2), torch.randn(1, 4), batch_size=2, repeats=2, threads=1)
    assert result["threads"] == 1
    assert torch.get_num_threads() == before


def test_profile_model_keys() -> None:
    model = nn.Linear(10, 5)
    profile = profile_model(model, torch.randn(1, 10), batch_sizes=(1, 4), repeats=2)
    assert profile["parameters"] == 55
    assert profile["flops"] == 100
    assert profile["size_bytes"] >= 4 * 55
    assert set(profile["latency_ms"]) == {"1", "4"}
    assert all(value > 0 for value in profile["latency_ms"].values())
    assert profile["latency_device"] == "cpu"


class _NegateInTraining(nn.Module):
    """Identity in eval mode, negation in train mode: wrong answers unless evaluation switches to eval."""

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return -inputs if self.training else inputs


def _identity_model() -> nn.Module:
    """Logits equal the inputs in eval mode (and their negation in train mode)."""
    linear = nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.eye(3))
    return nn.Sequential(_NegateInTraining(), linear)


# Logits (= inputs) and labels with a hand-known answer: predictions [0, 1, 2, 0] -> 2 errors.
INPUTS = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
LABELS = torch.tensor([0, 1, 0, 2])


def test_evaluate_classifier_known_outputs_and_mode_restored() -> None:
    model = _identity_model().train()
    model[1].eval()  # a mixed-mode model must come back mixed
    loader = [(INPUTS[:2], LABELS[:2]), [INPUTS[2:], LABELS[2:]]]
    metrics = evaluate_classifier(model, loader, num_classes=3)

    assert metrics["accuracy"] == pytest.approx(0.5)  # in train mode the model would negate its logits
    assert metrics["errors"] == 2
    assert metrics["num_samples"] == 4
    assert metrics["per_class_accuracy"] == pytest.approx([0.5, 1.0, 0.0])
    assert metrics["loss"] == pytest.approx(float(F.cross_entropy(INPUTS, LABELS)))
    assert model.training and model[0].training and not model[1].training


def test_evaluate_classifier_dict_batches_and_output_objects() -> None:
    class ObjectOutput(nn.Module):
        def forward(self, inputs: torch.Tensor) -> SimpleNamespace:
            return SimpleNamespace(logits=inputs)

    class DictOutput(nn.Module):
        def forward(self, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"logits": inputs}

    loader = [{"inputs": INPUTS[:3], "labels": LABELS[:3]}, {"inputs": INPUTS[3:], "labels": LABELS[3:]}]
    for model in (ObjectOutput(), DictOutput()):
        metrics = evaluate_classifier(model, loader, num_classes=3)
        assert metrics["errors"] == 2
        assert metrics["loss"] == pytest.approx(float(F.cross_entropy(INPUTS, LABELS)))

    with pytest.raises(AlambicError, match="'labels'"):
        evaluate_classifier(DictOutput(), [{"inputs": INPUTS, "label": LABELS}], num_classes=3)
    with pytest.raises(AlambicError, match="no batches"):
        evaluate_classifier(DictOutput(), [], num_classes=3)


def test_evaluate_classifier_uses_gather_for_metrics() -> None:
    class DroppingAccelerator:
        """Stands in for a multi-process gather that drops the last sample as padding."""

        device = torch.device("cpu")

        def gather_for_metrics(self, tensors):
            return tuple(tensor[:-1] for tensor in tensors)

    metrics = evaluate_classifier(
        _identity_model(), [(INPUTS, LABELS)], num_classes=3, accelerator=DroppingAccelerator()
    )
    assert metrics["num_samples"] == 3
    assert metrics["errors"] == 1


@pytest.fixture
def fresh_accelerate_state():
    """Clear accelerate's process-wide singleton state after the test, so other tests start clean."""
    state = pytest.importorskip("accelerate.state")
    yield
    state.AcceleratorState._reset_state(reset_partial_state=True)


def test_evaluate_classifier_with_real_accelerator(fresh_accelerate_state) -> None:
    import accelerate

    dataset = torch.utils.data.TensorDataset(INPUTS, LABELS)
    accelerator = accelerate.Accelerator(cpu=True)
    model, loader = accelerator.prepare(_identity_model(), torch.utils.data.DataLoader(dataset, batch_size=3))
    metrics = evaluate_classifier(model, loader, num_classes=3, accelerator=accelerator)
    assert metrics["num_samples"] == 4
    assert metrics["errors"] == 2


# Runs in a fresh interpreter: accelerate's state is a process-wide singleton, and forking the
# pytest process after another test built an Accelerator hangs the children.
TWO_PROCESS_SCRIPT = """
import accelerate, torch
from torch import nn
from alambic.core.evaluate import evaluate_classifier

def run():
    accelerator = accelerate.Accelerator(cpu=True)
    # 5 samples, batch 2, 2 processes: the last round pads with duplicated samples.
    inputs = torch.tensor([[2.0, 0, 0], [0, 3.0, 0], [0, 0, 1.0], [1.0, 0, 0], [2.0, 0, 0]])
    labels = torch.tensor([0, 1, 0, 2, 0])
    linear = nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.eye(3))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(inputs, labels), batch_size=2)
    model, loader = accelerator.prepare(linear, loader)
    metrics = evaluate_classifier(model, loader, num_classes=3, accelerator=accelerator)
    assert accelerator.num_processes == 2, accelerator.num_processes
    assert (metrics["num_samples"], metrics["errors"]) == (5, 2), metrics
    print("OK", accelerator.process_index, metrics["num_samples"], flush=True)

if __name__ == "__main__":
    accelerate.debug_launcher(run, num_processes=2)
"""


@pytest.mark.slow
def test_evaluate_classifier_two_processes_drops_padding() -> None:
    pytest.importorskip("accelerate")
    run_two_process_script(TWO_PROCESS_SCRIPT)


@pytest.mark.parametrize("num_classes", [2, 4])
def test_roc_auc_matches_sklearn_binary_and_macro_one_vs_rest(num_classes: int) -> None:
    from sklearn.metrics import roc_auc_score

    from alambic.core.evaluate import roc_auc

    generator = torch.Generator().manual_seed(num_classes)
    labels = torch.randint(0, num_classes, (200,), generator=generator)
    logits = torch.randn(200, num_classes, generator=generator) + 1.5 * F.one_hot(labels, num_classes)
    probabilities = logits.softmax(-1)
    if num_classes == 2:
        expected = roc_auc_score(labels.numpy(), probabilities[:, 1].numpy())
    else:
        expected = roc_auc_score(labels.numpy(), probabilities.numpy(), multi_class="ovr", average="macro")
    # the same float64 arithmetic on the same ranks: equal up to summation order
    assert roc_auc(probabilities, labels) == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert 0.7 < expected < 1.0  # informative scores, so a swapped class or score would show


def test_roc_auc_skips_classes_without_samples_and_needs_two_classes() -> None:
    from alambic.core.evaluate import roc_auc

    probabilities = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1]])
    labels = torch.tensor([0, 1, 0, 1])  # class 2 never occurs: averaged over classes 0 and 1
    assert roc_auc(probabilities, labels) == pytest.approx(1.0)
    assert roc_auc(probabilities, torch.zeros(4, dtype=torch.long)) is None


def test_evaluate_classifier_reports_roc_auc() -> None:
    metrics = evaluate_classifier(_identity_model(), [(INPUTS, LABELS)], num_classes=3)
    assert metrics["roc_auc"] is not None and 0.0 <= metrics["roc_auc"] <= 1.0
