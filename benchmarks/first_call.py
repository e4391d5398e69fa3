"""A first call that starts at once (issue 25): what ``import alambic`` and the first ``distill()`` of a process
cost, in fresh processes.

Rows, each the median over ``--repeats`` fresh interpreters (wall and process CPU seconds):

  import torch / import alambic:  ``python -c "import X"`` (``benchmarks/speed.py``'s ``import_times``)
  first / second distill():       two identical one-epoch calls on the tiny pair (784-128-10 teacher ->
                                  784-32-10 student, 1024 synthetic rows, batch 128) in a process where only
                                  ``import alambic`` has run (``speed.py``'s ``cold_start``)
  hand loop first / second:       the same for a hand-written KD loop with ``torch.optim.SGD``: PyTorch's own
                                  first-call cost (its optimizer imports ``torch._dynamo`` on first use)

and whether ``torch._dynamo`` / ``torch.distributed.tensor`` were imported by the two ``distill()`` calls.
Goals: first ``distill()`` at most 0.3 s slower than the second; ``import alambic`` at most 0.3 s above
``import torch``.

    OMP_NUM_THREADS=1 python benchmarks/first_call.py [--repeats 7]

Run it with another interpreter (a venv's ``bin/python``) to measure that install. Speed lives here, never
in tests.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import speed  # noqa: E402  (cold_start and import_times of benchmarks/speed.py)

LOADED = ("torch._dynamo", "torch.distributed.tensor")


def child(order: str) -> None:
    """One fresh process: ``speed.cold_start(order)``, then which of ``LOADED`` it imported; one JSON line."""
    times = speed.cold_start(order)
    times.update({module: module in sys.modules for module in LOADED})
    print(json.dumps(times))


def run_child(order: str) -> dict:
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, __file__, "--child", order]
    result = subprocess.run(command, capture_output=True, text=True, env=environment, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    imports = speed.import_times(args.repeats)
    runs: dict[str, list[dict]] = {"distill": [], "hand": []}
    for _ in range(args.repeats):  # interleaved, so a noisy minute hits both alike
        for order in runs:
            runs[order].append(run_child(order))

    def median(order: str, key: str) -> float:
        return statistics.median(run[key] for run in runs[order])

    rows = [
        ("import torch", *imports["torch"], ""),
        ("import alambic", *imports["alambic"], ""),
        ("import alambic - import torch", imports["alambic"][0] - imports["torch"][0],
         imports["alambic"][1] - imports["torch"][1], "<= 0.3"),
        ("first distill()", median("distill", "distill-first"), median("distill", "distill-first-cpu"), ""),
        ("second distill()", median("distill", "distill-second"), median("distill", "distill-second-cpu"), ""),
        ("first - second distill()", statistics.median(r["distill-first"] - r["distill-second"] for r in runs["distill"]),
         statistics.median(r["distill-first-cpu"] - r["distill-second-cpu"] for r in runs["distill"]), "<= 0.3"),
        ("hand loop: first - second (PyTorch's own)", statistics.median(r["hand-first"] - r["hand-second"] for r in runs["hand"]),
         statistics.median(r["hand-first-cpu"] - r["hand-second-cpu"] for r in runs["hand"]), ""),
    ]  # fmt: skip
    print(
        f"python {sys.version.split()[0]} at {sys.executable}; median of {args.repeats} fresh processes each"
    )
    print(f"| {'measure':<42} | wall s | CPU s | goal |")
    print(f"|{'-' * 44}|-------:|------:|------|")
    for name, wall, cpu, goal in rows:
        met = "" if not goal else (" met" if wall <= 0.3 else " not met")
        print(f"| {name:<42} | {wall:6.3f} | {cpu:5.3f} | {goal}{met} |")
    for module in LOADED:
        count = sum(run[module] for run in runs["distill"])
        print(f"{module} imported by the two distill() calls: {count} of {args.repeats} processes")


if __name__ == "__main__":
    main()
