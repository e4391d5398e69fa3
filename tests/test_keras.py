"""Keras 3 models on the torch backend as student or teacher in distill() (skipped without Keras)."""

import os

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

os.environ.setdefault("KERAS_BACKEND", "torch")  # before Keras is first imported
keras = pytest.importorskip("keras")
if keras.backend.backend() != "torch":
    pytest.skip("Keras runs on another backend in this process (KERAS_BACKEND)", allow_module_level=True)

from alambic import Callback, distill  # noqa: E402
from alambic.models.keras import KerasModule, is_keras_model  # noqa: E402


def _data(n=256, features=8, classes=3):
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(n, features, generator=generator)
    labels = (inputs @ torch.randn(features, classes, generator=generator)).argmax(-1)
    return TensorDataset(inputs, labels)


def _keras_mlp(seed, hidden=16, dropout=0.0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(hidden, activation="relu"), keras.layers.Dropout(dropout),
         keras.layers.Dense(3)]
    )  # fmt: skip


def _accuracy(model, dataset):
    inputs, labels = dataset.tensors
    with torch.no_grad():
        return (model(inputs).argmax(-1) == labels).float().mean().item()


def _torch_teacher(dataset):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
    loader = DataLoader(dataset, batch_size=32, shuffle=True)
    return distill(
        None, model, loader, terms=[{"loss": "ce"}], epochs=15, optimizer="adamw", lr=1e-2, progress=False
    )


def test_a_keras_student_learns_from_a_torch_teacher_and_a_keras_teacher_teaches():
    dataset = _data()
    teacher = _torch_teacher(dataset)
    student = _keras_mlp(2, dropout=0.1)
    assert is_keras_model(student) and not is_keras_model(teacher)
    before = _accuracy(student, dataset)
    trained_as = []
    seen = type(
        "Seen", (Callback,), {"on_fit_start": lambda self, state: trained_as.append(type(state.student))}
    )
    trained, history = distill(
        teacher, student, DataLoader(dataset, batch_size=32, shuffle=True), epochs=10, optimizer="adamw",
        lr=1e-2, return_history=True, progress=False, callbacks=[seen()],
    )  # fmt: skip
    assert trained_as == [KerasModule]  # so that its dropout is on while it trains
    assert trained is student  # the Keras model itself comes back, trained
    losses = [value for _, value in history["train_total"]]
    assert losses[-1] < 0.5 * losses[0]
    assert _accuracy(student, dataset) > max(0.8, before + 0.2)

    torch_student = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    distill(student, torch_student, DataLoader(dataset, batch_size=32), epochs=10, optimizer="adamw", lr=1e-2,
            progress=False)  # fmt: skip
    assert _accuracy(torch_student, dataset) > 0.8


def test_the_train_mode_reaches_keras_dropout():
    wrapped = KerasModule(_keras_mlp(0, dropout=0.5))
    inputs = torch.randn(64, 8)
    wrapped.train()
    assert not torch.equal(wrapped(inputs), wrapped(inputs))  # dropout on
    wrapped.eval()
    assert torch.equal(wrapped(inputs), wrapped(inputs))
