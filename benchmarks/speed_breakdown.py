"""Where the per-step time of a cached-teacher KD step goes (MNIST 800-800 student), piece by piece.

    OMP_NUM_THREADS=1 python benchmarks/speed_breakdown.py --data-dir ../shared/data/mnist

Best of 3 passes over 60 batches of 128 for each piece; speed lives here, never in tests.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import speed  # noqa: E402

from alambic.config import Term  # noqa: E402
from alambic.core.cache import CachedTeacher  # noqa: E402
from alambic.core.distiller import Distiller  # noqa: E402
from alambic.core.monitor import FiniteGuard  # noqa: E402
from alambic.core.optim import make_accelerator  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="../shared/data/mnist")
    args = parser.parse_args()
    setting = argparse.Namespace(pair="mnist-mlp", data_dir=args.data_dir, subset=10000, batch_size=128)
    train, loader, teacher, student = speed.setting(setting)
    terms = [Term(loss="ce", weight=0.1), Term(loss="kd", weight=0.9, params={"temperature": 4.0})]
    with tempfile.TemporaryDirectory() as folder:
        speed.build_cache(setting, Path(folder) / "cache")
        cached = CachedTeacher(Path(folder) / "cache", terms=terms)
        module = Distiller(student, terms)
        batches = list(loader)[:60]
        optimizer = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        guard = FiniteGuard(make_accelerator(), "distill")
        scalars = {"ce": torch.tensor(1.0), "kd": torch.tensor(2.0), "total": torch.tensor(3.0)}

        def plain_step(batch):
            loss = F.cross_entropy(student(batch[0]), batch[1])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        def distiller_step(batch):
            loss = module(batch[0], batch[1], cached(batch[0], batch[2]), 1, batch[2], None)["total"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        accelerator = make_accelerator()
        tiny = torch.nn.Linear(3, 3)
        tiny_optimizer = torch.optim.SGD(tiny.parameters(), lr=0.1)
        wrapped = torch.nn.Linear(3, 3)
        wrapped, wrapped_optimizer = accelerator.prepare(
            wrapped, torch.optim.SGD(wrapped.parameters(), lr=0.1)
        )
        x = torch.randn(2, 3)

        def tiny_step(_batch):
            tiny(x).sum().backward()
            tiny_optimizer.step()
            tiny_optimizer.zero_grad(set_to_none=True)

        def accelerate_tiny_step(_batch):  # the wrappers fit() uses around every step
            with accelerator.accumulate(wrapped), accelerator.autocast():
                loss = wrapped(x).sum()
            accelerator.backward(loss)
            wrapped_optimizer.step()
            wrapped_optimizer.zero_grad(set_to_none=True)

        pieces = {
            "tiny step, plain": tiny_step,
            "tiny step, in Accelerate's wrappers": accelerate_tiny_step,
            "read cached teacher rows": lambda b: cached(b[0], b[2]),
            "non-finite watch": lambda b: guard.watch(scalars, 1),
            "student forward + ce": lambda b: F.cross_entropy(student(b[0]), b[1]),
            "Distiller forward (ce + kd)": lambda b: module(b[0], b[1], cached(b[0], b[2]), 1, b[2], None),
            "plain step (forward, ce, backward, SGD)": plain_step,
            "Distiller step (cached teacher, ce + kd)": distiller_step,
        }
        for name, piece in pieces.items():
            best = float("inf")
            for _ in range(3):
                started = time.perf_counter()
                for batch in batches:
                    piece(batch)
                best = min(best, (time.perf_counter() - started) / len(batches))
            print(f"| {name} | {best * 1e3:.3f} |")


if __name__ == "__main__":
    main()
