"""Token-level distillation of a character-level GPT on Tiny Shakespeare (issue 4, demonstration 3).

Trains a GPT-2-style character model as the teacher, then a student with about a quarter of its
parameters alone (next-token cross-entropy) and distilled with each token-level divergence, all with
one schedule and seed; prints validation loss, perplexity and a sample of each, in markdown.

    python benchmarks/lm_shakespeare.py --data ../shared/data/tinyshakespeare/input.txt \\
        [--epochs 2] [--teacher-epochs 4] [--divergences forward_kl,reverse_kl,...]

Needs the hf extra (transformers). Speed numbers belong here, never in tests.
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from datetime import date

import torch
from torch.utils.data import DataLoader, Dataset

from alambic import distill

DIVERGENCES = ["forward_kl", "reverse_kl", "jsd", "tvd", "skew_kl", "skew_reverse_kl"]


class Blocks(Dataset):
    """Non-overlapping blocks of ``block + 1`` characters as ``{input_ids, labels}`` (HF label convention)."""

    def __init__(self, ids: torch.Tensor, block: int):
        self.ids, self.block = ids, block

    def __len__(self) -> int:
        return (len(self.ids) - 1) // self.block

    def __getitem__(self, index: int) -> dict:
        window = self.ids[index * self.block : (index + 1) * self.block]
        return {"input_ids": window, "labels": window}


def gpt(vocab: int, layers: int, width: int, heads: int, block: int) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab, n_positions=block, n_embd=width, n_layer=layers, n_head=heads,
        resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1,
    )  # fmt: skip
    return GPT2LMHeadModel(config)


@torch.no_grad()
def validation_loss(model: torch.nn.Module, loader: DataLoader) -> float:
    model.eval()
    total, count = 0.0, 0
    for batch in loader:
        logits = model(input_ids=batch["input_ids"]).logits[:, :-1]  # [B, T-1, V]
        targets = batch["labels"][:, 1:]
        total += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
        ).item()
        count += targets.numel()
    return total / count


@torch.no_grad()
def sample(model: torch.nn.Module, prompt: torch.Tensor, chars: list[str], length: int = 160) -> str:
    model.eval()
    generator = torch.Generator().manual_seed(0)
    ids = prompt[None]
    for _ in range(length):
        logits = model(input_ids=ids[:, -model.config.n_positions :]).logits[0, -1]
        ids = torch.cat(
            [ids, torch.multinomial(torch.softmax(logits / 0.8, -1), 1, generator=generator)[None]], 1
        )
    return "".join(chars[i] for i in ids[0].tolist())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/tinyshakespeare/input.txt")
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--teacher-epochs", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=2, help="epochs of every student")
    parser.add_argument("--divergences", default=",".join(DIVERGENCES))
    parser.add_argument(
        "--limit", type=int, default=None, help="use only the first N characters (smoke runs)"
    )
    args = parser.parse_args()

    with open(args.data, encoding="utf-8") as handle:
        text = handle.read()[: args.limit]
    chars = sorted(set(text))
    ids = torch.tensor([chars.index(c) for c in text], dtype=torch.long)
    split = int(0.9 * len(ids))
    train = DataLoader(Blocks(ids[:split], args.block), batch_size=args.batch_size, shuffle=True)
    val = DataLoader(Blocks(ids[split:], args.block), batch_size=64)
    settings = {"optimizer": "adamw", "lr": 2e-3, "weight_decay": 0.01, "warmup_epochs": 0.1, "log_every": 50}
    print(
        f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, {date.today()}; "
        f"{len(ids):,} characters, vocabulary {len(chars)}, {len(train)} batches of {args.batch_size}x{args.block} per epoch"
    )

    rows = []

    def report(name: str, model: torch.nn.Module, seconds: float, epochs: int) -> None:
        loss = validation_loss(model, val)
        params = sum(p.numel() for p in model.parameters())
        rows.append(
            (
                name,
                params,
                epochs,
                loss,
                math.exp(loss),
                seconds,
                sample(model, ids[split : split + 32], chars),
            )
        )
        print(f"{name}: val loss {loss:.4f}, perplexity {math.exp(loss):.3f}, {seconds:.0f} s", flush=True)

    torch.manual_seed(0)
    teacher = gpt(len(chars), layers=4, width=128, heads=4, block=args.block)
    start = time.perf_counter()
    teacher = distill(
        None, teacher, train, terms=[{"loss": "lm_ce"}], epochs=args.teacher_epochs, seed=0, **settings
    )
    report("teacher", teacher, time.perf_counter() - start, args.teacher_epochs)

    def student() -> torch.nn.Module:
        torch.manual_seed(1)
        return gpt(len(chars), layers=2, width=80, heads=4, block=args.block)

    start = time.perf_counter()
    alone = distill(None, student(), train, terms=[{"loss": "lm_ce"}], epochs=args.epochs, seed=1, **settings)
    report("student alone (lm_ce)", alone, time.perf_counter() - start, args.epochs)
    for divergence in args.divergences.split(","):
        terms = [{"loss": "lm_ce", "weight": 0.1}, {"loss": divergence, "weight": 0.9}]
        start = time.perf_counter()
        distilled = distill(teacher, student(), train, terms=terms, epochs=args.epochs, seed=1, **settings)
        report(
            f"distilled: 0.1 lm_ce + 0.9 {divergence}", distilled, time.perf_counter() - start, args.epochs
        )

    print("\n| model | parameters | epochs | val loss (nats/char) | perplexity | train s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, params, epochs, loss, perplexity, seconds, _ in rows:
        print(f"| {name} | {params:,} | {epochs} | {loss:.4f} | {perplexity:.3f} | {seconds:.0f} |")
    print("\nSamples (temperature 0.8, seed 0, after a 32-character validation prompt):\n")
    for name, *_, text in rows:
        print(f"**{name}**\n```\n{text}\n```")


if __name__ == "__main__":
    main()
