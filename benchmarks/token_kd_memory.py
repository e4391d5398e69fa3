"""Peak memory and time of token-level KD at a 32k vocabulary: naive, chunked and fused (issue 15, benchmark 3).

Every variant computes the same forward KL per token (temperature 2, shifted labels, a masked prompt
and padding) from the student's last hidden states ``[B, T, H]``, its output projection ``[V, H]`` and
bias, and the teacher's logits ``[B, T, V]``, then its gradient with respect to all three:

  naive        ``logits = hidden @ W.T + b``, then log_softmax on the whole logits, no chunks
  checkpoint   the chunked loss as it was before (each chunk under activation checkpointing)
  chunked-C    ``alambic.losses.get_loss("forward_kl")(logits, ..., chunk_size=C)`` (default: None, 32
               tokens at this vocabulary; 64, then 4096, were the defaults before)
  fused-C      ``fused_linear_token_loss(hidden, W, teacher_logits, bias=b, chunk_size=C)``: the
               student's logits exist one chunk at a time (default: 64 tokens at this vocabulary)
  fused-both-C the same from the teacher's hidden states and head (its logits one chunk at a time too)

Memory: each variant runs in a fresh process whose large allocations are all mmap'd
(``MALLOC_MMAP_THRESHOLD_``, so that glibc returns every freed tensor to the system and the resident
set follows what torch holds); after the inputs are built, the process resets its peak resident set
(``/proc/self/clear_refs``) and reports ``VmHWM - VmRSS`` after one forward + backward: what the loss
and its backward allocate above their inputs (the weight's gradient included, as in every variant).
Time: the median of ``--repeats`` forward + backward passes in the same process.

    OMP_NUM_THREADS=1 python benchmarks/token_kd_memory.py            # 4 x 512 tokens, H 512, V 32000
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from alambic.losses import get_loss
from alambic.losses.token_chunks import fused_linear_token_loss

TEMPERATURE = 2.0
# the loss alone, from the student's logits (a leaf: the model that made them is not measured)
LOSS_VARIANTS = ["naive", "checkpoint-1024", "chunked-4096", "chunked-1024", "chunked-256", "chunked-64",
                 "chunked-default"]  # fmt: skip
# the output projection and the loss, from the student's last hidden states
PROJECTION_VARIANTS = ["projection+naive", "projection+chunked-default", "fused-1024", "fused-256", "fused-default",
                       "fused-both-256"]  # fmt: skip


def _inputs(variant: str, batch: int, length: int, hidden_size: int, vocabulary: int):
    teacher_hidden, projection = variant.startswith("fused-both"), variant.startswith(("projection", "fused"))
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(batch, length, hidden_size, generator=generator).requires_grad_(True)
    weight = (torch.randn(vocabulary, hidden_size, generator=generator) / hidden_size**0.5).requires_grad_(
        True
    )
    bias = torch.zeros(vocabulary).requires_grad_(True)
    teacher_weight = torch.randn(vocabulary, hidden_size, generator=generator) / hidden_size**0.5
    teacher_states = torch.randn(batch, length, hidden_size, generator=generator)
    teacher = teacher_states if teacher_hidden else F.linear(teacher_states, teacher_weight)
    labels = torch.randint(0, vocabulary, (batch, length), generator=generator)
    labels[:, : length // 8] = -100  # a prompt
    labels[: batch // 2, -length // 16 :] = -100  # padding
    if not projection:  # the loss alone: the student's logits are its input
        with torch.no_grad():
            hidden = F.linear(hidden, weight).requires_grad_(True)  # [B, T, V]
        weight = bias = None
    return hidden, weight, bias, teacher, teacher_weight if teacher_hidden else None, labels


def _naive(logits, teacher, labels):
    log_s = F.log_softmax(logits[:, :-1] / TEMPERATURE, dim=-1)  # [B, T - 1, V]
    log_t = F.log_softmax(teacher[:, :-1] / TEMPERATURE, dim=-1)
    per_token = (log_t.exp() * (log_t - log_s)).sum(-1)  # [B, T - 1]
    counted = labels[:, 1:] != -100
    return TEMPERATURE**2 * per_token[counted].mean()


def _checkpointed(logits, teacher, labels, chunk_size):
    """The chunked loss before this benchmark: counted rows gathered whole, each chunk checkpointed."""
    counted = labels[:, 1:] != -100
    student_rows, teacher_rows = logits[:, :-1][counted], teacher[:, :-1][counted]  # [N, V]

    def chunk(s, t):
        log_s, log_t = F.log_softmax(s / TEMPERATURE, -1), F.log_softmax(t / TEMPERATURE, -1)
        return (log_t.exp() * (log_t - log_s)).sum()

    total = sum(
        checkpoint(
            chunk, student_rows[i : i + chunk_size], teacher_rows[i : i + chunk_size], use_reentrant=False
        )
        for i in range(0, student_rows.shape[0], chunk_size)
    )
    return TEMPERATURE**2 * total / student_rows.shape[0]


def _loss(variant, hidden, weight, bias, teacher, teacher_weight, labels):
    size = None if variant.endswith(("naive", "default")) else int(variant.rsplit("-", 1)[1])
    if variant.startswith("fused"):
        return fused_linear_token_loss(
            hidden, weight, teacher, bias=bias, teacher_weight=teacher_weight, labels=labels,
            params={"temperature": TEMPERATURE}, chunk_size=size,
        )  # fmt: skip
    logits = F.linear(hidden, weight, bias) if variant.startswith("projection") else hidden  # [B, T, V]
    if variant.endswith("naive"):
        return _naive(logits, teacher, labels)
    if variant.startswith("checkpoint"):
        return _checkpointed(logits, teacher, labels, size)
    return get_loss("forward_kl")(logits, teacher, labels=labels, temperature=TEMPERATURE, chunk_size=size)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def child(variant: str, batch: int, length: int, hidden_size: int, vocabulary: int, repeats: int) -> dict:
    _loss(
        variant, *_inputs(variant, 2, 16, 8, 32)
    ).backward()  # lazy imports and first-call setup, not measured
    inputs = _inputs(variant, batch, length, hidden_size, vocabulary)
    leaves = [leaf for leaf in inputs[:3] if leaf is not None]
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # reset VmHWM, the peak resident set, to the current one
    start = time.perf_counter()
    value = _loss(variant, *inputs)
    value.backward()
    first = time.perf_counter() - start
    peak = _status_kib("VmHWM") - before
    times = []
    for _ in range(repeats):
        for leaf in leaves:
            leaf.grad = None
        start = time.perf_counter()
        _loss(variant, *inputs).backward()
        times.append(time.perf_counter() - start)
    return {"variant": variant, "value": value.item(), "peak_mib": peak / 1024, "seconds": statistics.median(times),
            "first_seconds": first, "grad_hidden_norm": leaves[0].grad.norm().item()}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocabulary", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--variants", default=",".join(LOSS_VARIANTS + PROJECTION_VARIANTS))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = (args.batch, args.length, args.hidden, args.vocabulary, args.repeats)
    if args.child:
        print(json.dumps(child(args.child, *shape)))
        return
    environment = {
        **os.environ,
        "MALLOC_MMAP_THRESHOLD_": "65536",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }
    rows = []
    for variant in args.variants.split(","):
        command = [sys.executable, __file__, "--child", variant] + [
            f"--{key}={getattr(args, key)}" for key in ("batch", "length", "hidden", "vocabulary", "repeats")
        ]
        output = subprocess.run(command, env=environment, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(output.strip().splitlines()[-1]))
        print(f"done {variant}", file=sys.stderr, flush=True)
    print(f"{args.batch} x {args.length} tokens, hidden {args.hidden}, vocabulary {args.vocabulary}, fp32, "
          f"OMP_NUM_THREADS={environment['OMP_NUM_THREADS']}, torch {torch.__version__}")  # fmt: skip
    for title, names, reference in (
        ("the loss alone, from the student's logits", LOSS_VARIANTS, "naive"),
        ("the output projection and the loss, from the student's hidden states", PROJECTION_VARIANTS, "projection+naive"),
    ):  # fmt: skip
        table = [row for row in rows if row["variant"] in names]
        naive = next((row for row in table if row["variant"] == reference), None)
        if naive is None:
            continue
        print(f"\n{title}\n")
        print("| variant | loss | peak MiB above inputs | memory: naive / variant (goal >= 4) "
              "| seconds fwd+bwd (median) | time: variant / naive (goal <= 1.1) |")  # fmt: skip
        print("|---|---|---|---|---|---|")
        for row in table:
            memory_ratio, time_ratio = naive["peak_mib"] / row["peak_mib"], row["seconds"] / naive["seconds"]
            print(f"| {row['variant']} | {row['value']:.5f} | {row['peak_mib']:.0f} | {memory_ratio:.1f}"
                  f"{' (met)' if memory_ratio >= 4 else ''} | {row['seconds']:.2f} | {time_ratio:.2f}"
                  f"{' (met)' if time_ratio <= 1.1 else ''} |")  # fmt: skip


if __name__ == "__main__":
    main()
