"""stories260K into a quarter-size student: sequence-level, token-level and on-policy KD (issue 15).

The teacher is llama2.c's stories260K (a 260K-parameter Llama trained on TinyStories). It samples
``--train-samples`` stories of ``--new-tokens`` tokens from the BOS token (temperature 1, seed
``--seed``): the training set. A student Llama with a quarter of its parameters (dim 32, 4 layers,
4 heads, 2 kv heads, FFN 96, tied embeddings, the teacher's 512-token vocabulary) starts from the
same random weights in every variant and takes the same optimizer steps, batch size and seed:

- ``lm_ce``: sequence-level KD (Kim & Rush 2016), next-token cross-entropy on the teacher's samples;
- ``forward_kl``, ``reverse_kl``, ``jsd`` (beta 0.5): token-level KD on the same samples, the
  teacher scoring every position;
- on-policy GKD (Agarwal et al. 2024): ``OnPolicyBatches`` with mix 0.5 replaces half the batches'
  completions by the student's own samples, scored by the teacher through ``jsd`` (beta 0.5).

Each student is evaluated on ``--eval-samples`` FRESH teacher samples (another seed): its perplexity
on them (next-token cross-entropy; the teacher's own perplexity is the floor) and the mean per-token
KL(teacher || student) there. The generated sets are kept in ``--cache-dir``, so a rerun does not
generate them again.

    OMP_NUM_THREADS=1 python benchmarks/lm_stories260k.py \\
        --checkpoint ../shared/data/weights/tinystories-llama2c-stories260K/stories260K.bin

Needs the hf extra (transformers). Speed numbers belong here, never in tests.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import sys
import time
from datetime import date
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sst2_minilm import cpu_name  # noqa: E402

from alambic import distill  # noqa: E402
from alambic.core.evaluate_lm import evaluate_causal_lm  # noqa: E402
from alambic.core.llm import IGNORE_INDEX, OnPolicyBatches, teacher_generations  # noqa: E402
from alambic.models.llama2c import load_llama2c  # noqa: E402

DEFAULT_CHECKPOINT = (
    Path(__file__).resolve().parents[2]
    / "shared/data/weights/tinystories-llama2c-stories260K/stories260K.bin"
)
BOS = 1  # llama2.c's tokenizers: 0 <unk>, 1 <s>, 2 </s>
JSD = {"loss": "jsd", "params": {"beta": 0.5}}
# name -> (terms, fraction of batches the student completes itself)
VARIANTS = {
    "sequence-level KD: lm_ce on teacher samples": ([{"loss": "lm_ce"}], 0.0),
    "token-level: forward_kl": ([{"loss": "forward_kl"}], 0.0),
    "token-level: reverse_kl": ([{"loss": "reverse_kl"}], 0.0),
    "token-level: jsd (beta 0.5)": ([JSD], 0.0),
    "on-policy GKD: jsd (beta 0.5), mix 0.5": ([JSD], 0.5),
}


def student_config():
    """A Llama with about a quarter of stories260K's parameters, on its tokenizer."""
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=32, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=512, max_position_embeddings=512, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=True, hidden_act="silu", bos_token_id=BOS, eos_token_id=2,
    )  # fmt: skip


def generations(
    teacher: torch.nn.Module, checkpoint: Path, samples: int, new_tokens: int, seed: int, cache_dir: Path
) -> list[dict]:
    """The teacher's ``samples`` continuations of BOS (``[samples, 1 + new_tokens]``), read from the cache
    when it holds them for this checkpoint and these settings, as ``{input_ids, labels}`` rows."""
    digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()[:12]
    path = cache_dir / f"stories260k-{digest}-n{samples}-t{new_tokens}-s{seed}.pt"
    if path.exists():
        ids = torch.load(path, weights_only=True)
    else:
        start = time.perf_counter()
        prompts = torch.full((samples, 1), BOS, dtype=torch.long)
        ids = teacher_generations(teacher, prompts, new_tokens, batch_size=128, seed=seed).ids
        cache_dir.mkdir(parents=True, exist_ok=True)
        torch.save(ids, path)
        print(
            f"generated {samples} x {new_tokens} tokens (seed {seed}) in {time.perf_counter() - start:.0f} s -> {path}"
        )
    labels = ids.clone()
    labels[:, :1] = IGNORE_INDEX  # the BOS prompt is not predicted
    return [{"input_ids": row, "labels": label} for row, label in zip(ids, labels, strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--train-samples", type=int, default=8192)
    parser.add_argument("--eval-samples", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--epochs", type=int, default=1, help="passes over the training samples, every variant"
    )
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/alambic-stories260k"))
    parser.add_argument("--variants", default=None, help="comma-separated substrings of the variant names")
    args = parser.parse_args()
    if not args.checkpoint.exists():
        raise SystemExit(f"{args.checkpoint} is absent (optional asset); pass --checkpoint")
    from transformers import LlamaForCausalLM

    teacher = load_llama2c(args.checkpoint)
    train = generations(
        teacher, args.checkpoint, args.train_samples, args.new_tokens, args.seed, args.cache_dir
    )
    held_out = generations(
        teacher, args.checkpoint, args.eval_samples, args.new_tokens, args.seed + 1000, args.cache_dir
    )
    eval_loader = DataLoader(held_out, batch_size=64)
    torch.manual_seed(args.seed)
    initial = LlamaForCausalLM(student_config())
    steps = args.epochs * -(-args.train_samples // args.batch_size)
    teacher_params = sum(p.numel() for p in teacher.parameters())
    student_params = sum(p.numel() for p in initial.parameters())
    print(
        f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, {date.today()}; "
        f"teacher {teacher_params:,} parameters, student {student_params:,} ({student_params / teacher_params:.1%}); "
        f"{args.train_samples} training and {args.eval_samples} held-out samples of {args.new_tokens} tokens; "
        f"{steps} steps of {args.batch_size}, AdamW lr {args.lr}, cosine, clip 1.0",
        flush=True,
    )

    floor = evaluate_causal_lm(teacher, eval_loader)
    rows = [("teacher (floor)", floor["perplexity"], 0.0, None)]
    untrained = evaluate_causal_lm(initial, eval_loader, teacher=teacher)
    rows.append(("student, untrained", untrained["perplexity"], untrained["kl_to_teacher"], None))
    chosen = [
        name for name in VARIANTS if args.variants is None or any(s in name for s in args.variants.split(","))
    ]
    for name in chosen:
        terms, mix = VARIANTS[name]
        student = copy.deepcopy(initial)
        loader = DataLoader(train, batch_size=args.batch_size, shuffle=True)
        if mix > 0:
            loader = OnPolicyBatches(loader, student, mix=mix, seed=args.seed)
        start = time.perf_counter()
        student = distill(
            None if terms == [{"loss": "lm_ce"}] else teacher, student, loader, terms=terms,
            epochs=args.epochs, seed=args.seed, optimizer="adamw", lr=args.lr, weight_decay=0.01,
            warmup_epochs=0.05, grad_clip=1.0, eval_every=0, log_every=10_000,
        )  # fmt: skip
        seconds = time.perf_counter() - start
        metrics = evaluate_causal_lm(student, eval_loader, teacher=teacher)
        rows.append((name, metrics["perplexity"], metrics["kl_to_teacher"], seconds))
        print(
            f"{name}: perplexity {metrics['perplexity']:.3f}, KL {metrics['kl_to_teacher']:.4f}, {seconds:.0f} s",
            flush=True,
        )

    print(f"\n| model | held-out perplexity | KL(teacher ‖ student), nats/token | train s ({steps} steps) |")
    print("|---|---:|---:|---:|")
    for name, perplexity, kl, seconds in rows:
        print(f"| {name} | {perplexity:.3f} | {kl:.4f} | {'' if seconds is None else f'{seconds:.0f}'} |")


if __name__ == "__main__":
    main()
