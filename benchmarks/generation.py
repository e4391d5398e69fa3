"""Generation speed at batch 1: ``sample_tokens`` through the key/value cache vs recomputing the prefix.

Loads llama2.c's stories260K (``llama2c:PATH``, a 260K-parameter Llama) and generates greedily from the
BOS token with ``alambic.core.llm.sample_tokens``: once through the model's cache (one token per step), once
through a wrapper whose forward takes only ``input_ids`` (the whole prefix every step), and, for
reference, with Hugging Face ``generate`` (greedy, ``min_new_tokens`` so it does not stop at ``</s>``).
Round-robin, median of ``--repeats`` runs, one thread; checks that the paths give the same tokens.

    OMP_NUM_THREADS=1 python benchmarks/generation.py \\
        --checkpoint ../shared/data/weights/tinystories-llama2c-stories260K/stories260K.bin

Needs the hf extra (transformers). Speed numbers belong here, never in tests.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sst2_minilm import cpu_name  # noqa: E402

from alambic.core.llm import sample_tokens  # noqa: E402
from alambic.models.llama2c import load_llama2c  # noqa: E402

DEFAULT_CHECKPOINT = (
    Path(__file__).resolve().parents[2]
    / "shared/data/weights/tinystories-llama2c-stories260K/stories260K.bin"
)


class FullPrefix(torch.nn.Module):
    """The model behind a forward that takes only ``input_ids``: no cache, the whole prefix every step."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--tokens", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if not args.checkpoint.exists():
        raise SystemExit(f"{args.checkpoint} is absent (optional asset); pass --checkpoint")
    torch.set_num_threads(1)
    model = load_llama2c(args.checkpoint)
    prompt = torch.tensor([[1]])  # BOS
    print(
        f"stories260K, batch 1, greedy from BOS, torch {torch.__version__}, {cpu_name()}, {date.today()}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, median of {args.repeats} (round-robin)\n"
    )
    print("| new tokens | path | tokens/s | ms per token |")
    print("|---|---|---|---|")
    for new_tokens in args.tokens:
        runners = {
            "sample_tokens, KV cache": lambda n=new_tokens: sample_tokens(model, prompt, n, top_k=1),
            "sample_tokens, full prefix": lambda n=new_tokens: sample_tokens(
                FullPrefix(model), prompt, n, top_k=1
            ),
            "HF generate (reference)": lambda n=new_tokens: model.generate(
                prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0
            ),
        }
        outputs = {label: run() for label, run in runners.items()}  # warm-up, and the tokens to compare
        if not torch.equal(outputs["sample_tokens, KV cache"], outputs["sample_tokens, full prefix"]):
            raise SystemExit("the cached and full-prefix paths gave different greedy tokens")
        timings = {label: [] for label in runners}
        for _ in range(args.repeats):
            for label, run in runners.items():
                start = time.perf_counter()
                run()
                timings[label].append(time.perf_counter() - start)
        for label, values in timings.items():
            seconds = statistics.median(values)
            print(
                f"| {new_tokens} | {label} | {new_tokens / seconds:.0f} | {1000 * seconds / new_tokens:.2f} |"
            )


if __name__ == "__main__":
    main()
