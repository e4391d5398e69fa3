"""``train.cuda_graphs``: the loss, a live teacher and the optimizer step compiled as CUDA graphs train the
same student as the eager loop; refused in one line without CUDA."""

import copy

import pytest
import torch
from tolerance import close
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from alambic import distill
from alambic.config import LoopSettings, TrainConfig
from alambic.core import graphs
from alambic.core.monitor import FiniteGuard
from alambic.errors import ConfigError


def tiny_pair_and_loader():
    """A tiny MLP pair and a loader whose last batch is shorter (40 rows, batches of 16: 16, 16, 8)."""
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(40, 20, generator=generator)
    labels = torch.randint(0, 4, (40,), generator=generator)
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 4))
    student = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 4))
    return teacher, student, DataLoader(TensorDataset(inputs, labels), batch_size=16)


def train_twice(optimizer: str, **tolerances) -> None:
    """Train copies of one student without and with cuda_graphs; losses and weights must agree."""
    teacher, student, loader = tiny_pair_and_loader()
    results = []
    for cuda_graphs in (False, True):
        trained, history = distill(
            copy.deepcopy(teacher), copy.deepcopy(student), loader, epochs=2, optimizer=optimizer, lr=0.1,
            grad_clip=0.5, cuda_graphs=cuda_graphs, progress=False, return_history=True,
        )  # fmt: skip
        weights = torch.cat([p.detach().float().cpu().flatten() for p in trained.parameters()])
        losses = torch.tensor([value for _, value in history["train_total"]])
        results.append((weights, losses))
    (eager_weights, eager_losses), (graph_weights, graph_losses) = results
    assert not torch.equal(eager_weights, torch.cat([p.detach().flatten() for p in student.parameters()]))
    torch.testing.assert_close(graph_losses, eager_losses, **(tolerances or close(eager_losses)))
    torch.testing.assert_close(graph_weights, eager_weights, **(tolerances or close(eager_weights)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_cuda_graphs_train_the_same_student_on_a_gpu(optimizer):
    # compiled kernels sum in another order than eager ones: equal to float32 rounding over a few steps
    train_twice(optimizer, rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # dynamo traces the loss, teacher and step frames: ~8 s on a 2-core CPU
def test_the_graphed_loop_trains_the_same_student_on_cpu_through_the_eager_backend(monkeypatch):
    """The wiring (in-place compiled loss and teacher, tensor learning rates under the schedule, compiled
    step, clipping, the short last batch) on any machine: dynamo's eager backend records no CUDA graph."""
    monkeypatch.setattr(graphs, "GRAPH_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(graphs, "COMPILE_OPTIONS", {"backend": "eager", "dynamic": False})
    monkeypatch.setattr(graphs, "STEP_OPTIONS", {"backend": "eager", "dynamic": False})
    train_twice("sgd")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_cuda_graphs_without_cuda_is_a_one_line_error_before_training():
    teacher, student, loader = tiny_pair_and_loader()
    before = copy.deepcopy(student.state_dict())
    with pytest.raises(ConfigError, match="needs a CUDA GPU; use compile: true on CPU") as caught:
        distill(teacher, student, loader, cuda_graphs=True, progress=False)
    assert "\n" not in str(caught.value)
    assert all(torch.equal(before[name], value) for name, value in student.state_dict().items())


def test_cuda_graphs_is_a_training_setting():
    assert TrainConfig(cuda_graphs=True).loop().cuda_graphs
    assert not LoopSettings().cuda_graphs


def test_the_finite_guard_keeps_a_copy_of_each_step_losses():
    """CUDA graphs overwrite their outputs at the next replay: what the guard keeps must not be them."""
    accelerator = type("OneProcess", (), {"num_processes": 1})()
    guard = FiniteGuard(accelerator, "distill")
    losses = {"kd": torch.tensor(1.0), "total": torch.tensor(2.0)}
    guard.watch(losses, 1)
    for value in losses.values():
        value.fill_(float("nan"))  # what the next replay does to a graph's outputs
    assert guard.check(1) == {"kd": 1.0, "total": 2.0}
