"""What alambic adds to one training step where only overhead is left (issue 18), in process CPU time.

Tiny MLPs (784-128-10 teacher -> 784-32-10 student), one batch of 128 held in memory, Hinton's terms
(0.1 ce + 0.9 kd, T = 4). It times, interleaved over rounds, the minimum per step of:

  hand:    teacher under no_grad, student, the loss written out, backward, SGD step
  alambic: Teacher, Distiller (terms and total), the non-finite watch, backward, the same SGD step

then the step's pieces (teacher, student, terms, backward, watch), each written by hand and as alambic runs
it; and the per-batch cost of a user's own DataLoader over a TensorDataset, over ``IndexedDataset`` of it, and
over ``IndexedDataset`` with its batched fetch (``__getitems__``) switched off; and of alambic's own batched
loader as such, prepared by Accelerate, and as ``fit()`` serves it in one process (``training_loader``).

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
from alambic.data import IndexedDataset, InMemoryDataset, make_loader
from alambic.losses import get_loss


def mlp(hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def per_call_us(function, calls: int) -> float:
    started = time.process_time()
    for _ in range(calls):
        function()
    return (time.process_time() - started) / calls * 1e6


def tiny_pair():
    """Teacher, student, Distiller, Teacher wrapper, watch and one batch, the same for every row."""
    torch.manual_seed(0)
    teacher, student = mlp(128), mlp(32)
    teacher.eval().requires_grad_(False)
    terms = [Term(loss="ce", weight=0.1), Term(loss="kd", weight=0.9, params={"temperature": 4.0})]
    distiller, live = Distiller(student, terms), Teacher(teacher, terms)
    guard = FiniteGuard(make_accelerator("no"), "bench", capacity=4096)
    images, labels = torch.randn(128, 784), torch.randint(0, 10, (128,))
    return teacher, student, distiller, live, guard, images, labels


def step_rows(rounds: int) -> dict[str, float]:
    teacher, student, distiller, live, guard, images, labels = tiny_pair()
    optimizer = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)

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


def breakdown_rows(rounds: int) -> dict[str, tuple[float, float]]:
    """The step's pieces, each as written by hand and as alambic runs it: (hand us, alambic us), min CPU."""
    teacher, student, distiller, live, guard, images, labels = tiny_pair()
    with torch.no_grad():
        teacher_logits = teacher(images)
    teacher_outputs = live(images, None)
    kd, ce = get_loss("kd"), get_loss("ce")
    losses = distiller(images, labels, teacher_outputs, 1, None, None)

    def teacher_hand():
        with torch.no_grad():
            teacher(images)

    def hand_loss():
        logits = student(images)
        soft = F.kl_div(F.log_softmax(logits / 4, -1), F.log_softmax(teacher_logits / 4, -1),
                        reduction="batchmean", log_target=True)  # fmt: skip
        return 0.1 * F.cross_entropy(logits, labels) + 0.9 * 16 * soft

    def registry_loss():  # the registered kd / ce functions, weighted and summed by hand
        logits = student(images)
        return 0.1 * ce(logits, None, labels=labels) + 0.9 * kd(logits, teacher_logits, temperature=4.0)

    def alambic_loss():
        return distiller(images, labels, teacher_outputs, 1, None, None)["total"]

    def watch():
        guard.watch(losses, 1)
        if guard.count == guard.capacity:
            guard.count, guard.steps = 0, []

    pieces = {
        "teacher forward (no_grad / Teacher)": (teacher_hand, lambda: live(images, None)),
        "student forward (call / Distiller.student_outputs)": (lambda: student(images),
                                                               lambda: distiller.student_outputs(images)),
        "student + terms (written out / registry functions)": (hand_loss, registry_loss),
        "student + terms (written out / Distiller)": (hand_loss, alambic_loss),
        "student + terms + backward (written out / Distiller)": (lambda: hand_loss().backward(),
                                                                 lambda: alambic_loss().backward()),
        "non-finite watch (nothing / FiniteGuard.watch)": (lambda: None, watch),
    }  # fmt: skip
    best = {name: [float("inf"), float("inf")] for name in pieces}
    for _ in range(rounds):
        for name, functions in pieces.items():
            for side, function in enumerate(functions):
                best[name][side] = min(best[name][side], per_call_us(function, 300))
    return {name: (hand, ours) for name, (hand, ours) in best.items()}


def loader_rows(rounds: int) -> dict[str, float]:
    data = TensorDataset(torch.randn(128 * 100, 784), torch.randint(0, 10, (128 * 100,)))

    class PerSample(IndexedDataset):
        __getitems__ = None  # PyTorch then fetches sample by sample

    loaders = {
        "DataLoader(dataset)": DataLoader(data, batch_size=128, shuffle=True),
        "DataLoader(IndexedDataset(dataset))": DataLoader(IndexedDataset(data), batch_size=128, shuffle=True),
        "the same, fetched sample by sample": DataLoader(PerSample(data), batch_size=128, shuffle=True),
    }
    # the loop's own loader over alambic's batched view: as Accelerate prepares it (DataLoaderShard, what
    # fit() iterated up to fdf686c), and as fit() serves it now in one process (training_loader)
    batched = make_loader(IndexedDataset(InMemoryDataset(data.tensors[0], data.tensors[1])), batch_size=128,
                          shuffle=True)  # fmt: skip
    loaders["make_loader(IndexedDataset) itself"] = batched
    loaders["the same, prepared by Accelerate (DataLoaderShard)"] = make_accelerator(
        "no"
    ).prepare_data_loader(
        make_loader(
            IndexedDataset(InMemoryDataset(data.tensors[0], data.tensors[1])), batch_size=128, shuffle=True
        )
    )
    try:
        from alambic.core.loop import training_loader
    except ImportError:  # a commit before training_loader
        pass
    else:
        loaders["the same, as fit() serves it (training_loader)"] = training_loader(
            batched, make_accelerator("no")
        )
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
    for name, (hand, ours) in breakdown_rows(max(args.rounds // 2, 3)).items():
        print(f"{name}: {hand:.0f} / {ours:.0f} us, extra {ours - hand:.0f} us (min CPU)")
    for name, value in loader_rows(max(args.rounds // 2, 3)).items():
        print(f"{name}: {value:.0f} us per batch of 128 (min CPU)")


if __name__ == "__main__":
    main()
