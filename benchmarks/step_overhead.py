"""What alambic adds to one training step where only overhead is left (issue 18), in process CPU time.

Tiny MLPs (784-128-10 teacher -> 784-32-10 student), one batch of 128 held in memory, Hinton's terms
(0.1 ce + 0.9 kd, T = 4). It times, interleaved over rounds, the minimum per step of:

  hand:    teacher under no_grad, student, the loss written out, backward, SGD step
  alambic: Teacher, Distiller (terms and total), the non-finite watch, backward, the same SGD step

and the per-batch cost of a user's own DataLoader over a TensorDataset, over ``IndexedDataset`` of it,
and over ``IndexedDataset`` with its batched fetch (``__getitems__``) switched off.

    OMP_NUM_THREADS=1 python benchmarks/step_overhead.py [--rounds 15]

Run it at two commits (``PYTHONPATH=<checkout>/src``) to compare them. Speed lives here, never in tests.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from alambic.config import Term
from alambic.core.distiller import Distiller, Teacher
from alambic.core.monitor import FiniteGuard
from alambic.core.optim import make_accelerator
from alambic.data import IndexedDataset


def mlp(hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def per_call_us(function, calls: int) -> float:
    started = time.process_time()
    for _ in range(calls):
        function()
    return (time.process_time() - started) / calls * 1e6


def step_rows(rounds: int) -> dict[str, float]:
    torch.manual_seed(0)
    teacher, student = mlp(128), mlp(32)
    teacher.eval().requires_grad_(False)
    terms = [Term(loss="ce", weight=0.1), Term(loss="kd", weight=0.9, params={"temperature": 4.0})]
    distiller, live = Distiller(student, terms), Teacher(teacher, terms)
    guard = FiniteGuard(make_accelerator("no"), "bench", capacity=4096)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)
    images, labels = torch.randn(128, 784), torch.randint(0, 10, (128,))

    def hand():
        with torch.no_grad():
            teacher_logits = teacher(images)
        logits = student(images)
        soft = F.kl_div(F.log_softmax(logits / 4, -1), F.log_softmax(teacher_logits / 4, -1),
                        reduction="batchmean", log_target=True)  # fmt: skip
        loss = 0.1 * F.cross_entropy(logits, labels) + 0.9 * 16 * soft
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def alambic():
        losses = distiller(images, labels, live(images, None), 1, None, None)
        guard.watch(losses, 1)
        losses["total"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    best = {"hand": float("inf"), "alambic": float("inf")}
    for _ in range(rounds):
        for name, function in (("hand", hand), ("alambic", alambic)):
            best[name] = min(best[name], per_call_us(function, 300))
        guard.count, guard.steps = 0, []  # the watch's buffer, emptied as the loop's log steps do
    return best


def loader_rows(rounds: int) -> dict[str, float]:
    data = TensorDataset(torch.randn(128 * 100, 784), torch.randint(0, 10, (128 * 100,)))

    class PerSample(IndexedDataset):
        __getitems__ = None  # PyTorch then fetches sample by sample

    loaders = {
        "DataLoader(dataset)": DataLoader(data, batch_size=128, shuffle=True),
        "DataLoader(IndexedDataset(dataset))": DataLoader(IndexedDataset(data), batch_size=128, shuffle=True),
        "the same, fetched sample by sample": DataLoader(PerSample(data), batch_size=128, shuffle=True),
    }
    best = dict.fromkeys(loaders, float("inf"))
    for _ in range(rounds):
        for name, loader in loaders.items():
            started = time.process_time()
            for _batch in loader:
                pass
            best[name] = min(best[name], (time.process_time() - started) / len(loader) * 1e6)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    step = step_rows(args.rounds)
    print(f"tiny-pair step, min CPU us: hand {step['hand']:.0f}, alambic {step['alambic']:.0f}, "
          f"extra {step['alambic'] - step['hand']:.0f} us ({step['alambic'] / step['hand']:.3f}x)")  # fmt: skip
    for name, value in loader_rows(max(args.rounds // 2, 3)).items():
        print(f"{name}: {value:.0f} us per batch of 128 (min CPU)")


if __name__ == "__main__":
    main()
