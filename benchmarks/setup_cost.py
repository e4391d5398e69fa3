"""What a ``distill()`` call spends before its first step (issue 18), in process CPU time.

On a ``speed.py`` pair (default: Hinton's 1200-1200 -> 800-800 on MNIST), rounds of two calls of one
epoch each: ``distill(teacher, ...)`` on the user's ``DataLoader(dataset)``, and ``distill(CachedTeacher,
...)`` on ``DataLoader(IndexedDataset(dataset))``. For each it prints the ``CachedTeacher``'s construction
(its checks of the cache against the data and the teacher), the setup inside ``distill()`` up to the first
step (read by a callback's ``on_fit_start``), and the whole call. The first call of the process also pays
PyTorch's one-time costs (``torch._dynamo`` imported by the first optimizer step).

    OMP_NUM_THREADS=1 python benchmarks/setup_cost.py --data-dir ../shared/data/mnist [--pair mnist-mlp]

Speed numbers belong here, never in tests.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parent))
import speed  # noqa: E402  (the pairs and terms of benchmarks/speed.py)

from alambic import CachedTeacher, IndexedDataset, distill  # noqa: E402
from alambic.core.cache import cache_teacher  # noqa: E402
from alambic.core.callbacks import Callback  # noqa: E402


class FitStart(Callback):
    """Notes the process CPU time when the loop starts (after every check and set-up)."""

    def on_fit_start(self, state) -> None:
        self.cpu = time.process_time()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="../shared/data/mnist")
    parser.add_argument("--pair", default="mnist-mlp", choices=sorted(speed.PAIRS))
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    setting = argparse.Namespace(pair=args.pair, data_dir=args.data_dir, subset=None, batch_size=128)
    train, _, teacher, student = speed.setting(setting)
    initial = {key: value.clone() for key, value in student.state_dict().items()}
    with tempfile.TemporaryDirectory() as folder:
        cache = Path(folder) / "cache"
        cache_teacher(teacher, train, cache, batch_size=1024)
        for round_ in range(args.rounds):
            for cached in (False, True):
                student.load_state_dict(initial)
                data = IndexedDataset(train) if cached else train
                loader = DataLoader(
                    data, batch_size=128, shuffle=True, generator=torch.Generator().manual_seed(0)
                )
                mark, started = FitStart(), time.process_time()
                source = (
                    CachedTeacher(cache, teacher=teacher, dataset=train, terms=speed.kd_terms())
                    if cached
                    else teacher
                )
                built = time.process_time()
                distill(source, student, loader, terms=speed.kd_terms(), epochs=1, lr=0.05, log_every=10**9,
                        progress=False, callbacks=[mark])  # fmt: skip
                name = "distill(CachedTeacher)" if cached else "distill(teacher)     "
                print(f"round {round_ + 1} {name}: CachedTeacher built {1e3 * (built - started):6.1f} ms, "
                      f"setup to step 0 {1e3 * (mark.cpu - built):7.1f} ms, whole call "
                      f"{time.process_time() - started:6.2f} s (CPU)")  # fmt: skip


if __name__ == "__main__":
    main()
