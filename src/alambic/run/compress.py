"""``alambic compress``: distilled student -> prune -> recover -> quantize -> export, each stage measured.

The chain reads a run directory (or runs a config first) and writes ``RUN_DIR/compress/``:

```
compress/
  weights/                  ROW.safetensors of every float row (a structurally pruned one is rebuilt
                            from the architecture and this file by alambic.models.surgery.load_resized)
  onnx/                     ROW.onnx (float32) of every float row, and int8.onnx
  export/                   the final student: model.onnx, model-int8.onnx, model.pt2, model.safetensors
                            (a Hugging Face student: the folder model-hf/ from save_pretrained, with
                            its tokenizer); the float files hold the last float stage (the QAT-trained
                            model, fake quantization stripped, when compress.quantize.qat)
  summary.json              per stage: accuracy, size on disk, parameters, FLOPs, sparsity, latency in
                            PyTorch and in onnxruntime at each batch size; each export's check
  report.md, plots/compress.png   the table, and accuracy against latency and against size
```

Rows: ``teacher`` and ``baseline`` (when the run has them), ``distilled``, ``pruned``, ``recovered``
(pruned then distilled from the unpruned student), ``int8`` (onnxruntime, from the last float stage, after
QAT + KD when ``compress.quantize.qat``). Size on disk is the safetensors file for PyTorch rows and the
ONNX file for the int8 row; ``onnx_size_bytes`` gives the float ONNX file of every row for a like-for-like
comparison. Latency is the median of ``evaluate.latency_repeats`` runs with ``evaluate.latency_threads``.

A run on tokenized text (a Hugging Face student) goes through the same chain with dict inputs; its
int8 stage needs ``compress.quantize.method: dynamic`` and its prune stage ``prune.method: heads``
(attention heads, :mod:`alambic.compress.head_pruning`) or ``magnitude``.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from alambic.compress.export import default_export_path, export_model, export_onnx
from alambic.compress.prune import prune_model, recover, weight_sparsity
from alambic.compress.qat import qat_distill
from alambic.compress.quantize import evaluate_onnx, onnx_parity, onnx_profile, quantize_onnx
from alambic.config import CompressConfig, RunConfig, load_config
from alambic.core.batches import real_inputs, take
from alambic.core.checkpoint import atomic_write_text, save_weights
from alambic.core.evaluate import count_flops, count_parameters, evaluate_classifier, profile_model
from alambic.core.lock import run_lock
from alambic.data.loaders import make_loader
from alambic.errors import AlambicError, ConfigError
from alambic.files import dumps_json
from alambic.run.artifacts import build_run_architecture, load_saved, stored_run_data
from alambic.run.building import RunData, build_named_model, build_run_data, run_tokenizer
from alambic.run.compress_report import write_compress_report
from alambic.run.pipeline import run
from alambic.run.rundir import check_run_dir, run_directory

ROW_ORDER = ("teacher", "baseline", "distilled", "pruned", "recovered", "qat", "int8")


class _Context:
    """What every stage shares: the config, data, folders, and the rows measured so far."""

    def __init__(
        self, config: RunConfig, run_dir: Path, out: Path | None, data: RunData, progress: Any
    ) -> None:
        self.config, self.run_dir, self.progress = config, run_dir, progress
        self.settings: CompressConfig = config.compress or CompressConfig()
        self.out = out or run_dir / "compress"
        self.train_set, self.test_set, self.info = data.datasets
        plain_train = data.plain_train_set
        self.eval_set = self.test_set
        subset = self.settings.eval_subset
        if subset is not None and subset < len(self.test_set):
            indices = torch.linspace(0, len(self.test_set) - 1, subset).long().tolist()
            self.eval_set = torch.utils.data.Subset(self.test_set, indices)

        self.calibration = real_inputs(plain_train, self.settings.quantize.calibration_samples)  # [N, ...]
        self.check_inputs = real_inputs(self.test_set, 64)  # [64, ...], or {key: [64, T]} for text
        self.example = take(self.check_inputs, 1)
        self.tokenizer = run_tokenizer(config)
        self.rows: dict[str, dict] = {}
        self.exports: list[dict] = []
        self.final_name = "distilled"  # the row whose model the float exports hold
        self.int8_export: dict | None = None

    def say(self, message: str) -> None:
        if self.progress is not None:
            self.progress(message)

    def loader(self, batch_size: int) -> Any:
        return make_loader(self.train_set, batch_size=batch_size, shuffle=True, seed=self.config.seed)

    def eval_loader(self) -> Any:
        return torch.utils.data.DataLoader(self.eval_set, batch_size=self.config.data.eval_batch_size)


def _timing(evaluation) -> dict[str, Any]:
    """The latency settings of ``evaluate:`` as keyword arguments of the profilers."""
    return {
        "batch_sizes": tuple(evaluation.batch_sizes),
        "repeats": evaluation.latency_repeats,
        "threads": evaluation.latency_threads,
    }


def _load_models(context: _Context) -> dict[str, nn.Module]:
    config, models = context.config, {}
    sources = {
        **({"teacher": (config.teacher.model, "teacher")} if config.teacher else {}),
        "baseline": (config.student.model, "baseline"),
        "distilled": (config.student.model, "student"),
    }
    for name, (model_config, folder) in sources.items():
        weights = context.run_dir / folder / "model.safetensors"
        if weights.is_file():
            model = build_run_architecture(config, name, context.info)
            models[name] = load_saved(model, weights).eval()
        elif name == "teacher" and model_config.checkpoint:
            models[name] = build_named_model(model_config, context.info, task=context.config.task).eval()
    if "distilled" not in models:
        raise AlambicError(
            f"{context.run_dir} has no student/model.safetensors; run the distill stage first "
            "(alambic run CONFIG.yaml) or give alambic compress the config"
        )
    return models


def _measure(context: _Context, name: str, model: nn.Module, **extra: Any) -> dict:
    """Accuracy, size, parameters, FLOPs, sparsity, latency in PyTorch and onnxruntime of a float model."""
    context.say(f"measuring {name}")
    evaluation = context.config.evaluate
    model = model.eval()
    metrics = evaluate_classifier(model, context.eval_loader(), num_classes=context.info.num_classes)
    weights = context.out / "weights" / f"{name}.safetensors"
    save_weights(model, weights)
    timing = _timing(evaluation)
    profile = profile_model(model, context.example, **timing)
    onnx_path = export_onnx(model, context.check_inputs, context.out / "onnx" / f"{name}.onnx")
    ort = onnx_profile(onnx_path, context.example, **timing)
    row = {
        "accuracy": metrics["accuracy"],
        "macro_f1": metrics["macro_f1"],
        "num_samples": metrics["num_samples"],
        "parameters": profile["parameters"],
        "size_bytes": weights.stat().st_size,
        "onnx_size_bytes": ort["size_bytes"],
        "flops": profile["flops"],
        "sparsity": weight_sparsity(model)["sparsity"],
        "latency_ms": profile["latency_ms"],
        "onnxruntime_latency_ms": ort["latency_ms"],
        "latency_threads": profile["latency_threads"],
        **extra,
    }
    context.rows[name] = row
    return row


def _stage_prune_recover(context: _Context, distilled: nn.Module) -> nn.Module:
    import copy

    settings = context.settings
    current = distilled
    if "prune" in settings.stages:
        context.say(f"pruning ({settings.prune.method}, {settings.prune.amount})")
        pruned = prune_model(
            distilled,
            method=settings.prune.method,
            amount=settings.prune.amount,
            loader=context.loader(settings.recover.train.batch_size),  # heads are scored on training batches
        )
        _measure(context, "pruned", pruned, method=settings.prune.method, amount=settings.prune.amount)
        current, context.final_name = pruned, "pruned"
        if "recover" in settings.stages:
            context.say("recovering: distilling the unpruned student into the pruned one")
            train = settings.recover.train
            started = time.perf_counter()
            recovered = recover(
                copy.deepcopy(pruned),
                distilled,
                context.loader(train.batch_size),
                terms=settings.recover.terms,
                seed=context.config.seed,
                grad_accum=train.grad_accum,
                **train.loop().model_dump(),
            )
            _measure(context, "recovered", recovered, train_seconds=round(time.perf_counter() - started, 3))
            current, context.final_name = recovered, "recovered"
    return current


def _stage_quantize(
    context: _Context, float_model: nn.Module, models: dict[str, nn.Module]
) -> tuple[nn.Module, Path]:
    """QAT + KD when asked, then int8 in onnxruntime; returns the float model it started from and the int8 file."""
    settings = context.settings.quantize
    if settings.qat:
        teacher = models.get("teacher") if settings.qat_teacher == "teacher" else float_model
        if teacher is None:
            raise AlambicError(
                "compress.quantize.qat_teacher is 'teacher' but the run has no teacher weights"
            )
        context.say(f"quantization-aware training with KD (T = {settings.qat_temperature})")
        train = settings.qat_train
        started = time.perf_counter()
        float_model = qat_distill(
            teacher,
            float_model,
            context.loader(train.batch_size),
            temperature=settings.qat_temperature,
            kd_weight=settings.qat_kd_weight,
            seed=context.config.seed,
            grad_accum=train.grad_accum,
            **train.loop().model_dump(),
        ).eval()
        _measure(
            context,
            "qat",
            float_model,
            temperature=settings.qat_temperature,
            train_seconds=round(time.perf_counter() - started, 3),
        )
        context.final_name = "qat"  # the float exports hold the QAT-trained weights
    context.say(f"quantizing to int8 ({settings.method})")
    source = export_onnx(float_model, context.check_inputs, context.out / "onnx" / "int8-source.onnx")
    options = {"per_channel": settings.per_channel}
    if settings.method == "static":
        options |= {"activation_type": settings.activation_type, "reduce_range": settings.reduce_range}
    int8 = quantize_onnx(
        source,
        context.out / "onnx" / "int8.onnx",
        method=settings.method,
        calibration_inputs=context.calibration,
        **options,
    )
    evaluation = context.config.evaluate
    metrics = evaluate_onnx(int8, context.eval_set, num_classes=context.info.num_classes)
    ort = onnx_profile(int8, context.example, **_timing(evaluation))
    context.rows["int8"] = {
        "accuracy": metrics["accuracy"],
        "macro_f1": metrics["macro_f1"],
        "num_samples": metrics["num_samples"],
        "parameters": count_parameters(float_model),
        "size_bytes": ort["size_bytes"],
        "onnx_size_bytes": ort["size_bytes"],
        "flops": count_flops(float_model, context.example),
        "latency_ms": {},
        "onnxruntime_latency_ms": ort["latency_ms"],
        "latency_threads": ort["latency_threads"],
        "method": settings.method + (" after QAT + KD" if settings.qat else ""),
        "quantized_from": context.final_name,
        "calibration_samples": len(context.calibration) if settings.method == "static" else 0,
    }
    parity = onnx_parity(source, int8, context.check_inputs)
    context.rows["int8"] |= {
        "max_abs_diff_to_float": parity["max_abs_diff"],
        "prediction_agreement_to_float": parity["prediction_agreement"],
    }
    source.unlink()
    return float_model, int8


def _stage_export(context: _Context, final: nn.Module, int8: Path | None) -> None:
    """Export ``final`` (the row ``context.final_name``) in every format, and copy the int8 file."""
    import shutil

    folder = context.out / "export"
    description = {
        "arch": context.config.student.model.arch,
        "kwargs": context.config.student.model.kwargs,
        "input_shape": list(context.info.input_shape),
        "num_classes": context.info.num_classes,
    }
    for export_format in context.settings.export_formats:
        context.say(f"exporting {export_format}")
        path = default_export_path(folder, "model", export_format, final)
        report = export_model(
            final,
            context.check_inputs,
            path,
            export_format=export_format,
            description={**description, "row": context.final_name},
            tokenizer=context.tokenizer,
        )
        context.exports.append({**report, "model": context.final_name})
    if int8 is not None:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(int8, folder / "model-int8.onnx")
        context.int8_export = {
            "path": str(folder / "model-int8.onnx"),
            "size_bytes": (folder / "model-int8.onnx").stat().st_size,
            "model": "int8",
            "quantized_from": context.final_name,
            "max_abs_diff_to_float": context.rows["int8"]["max_abs_diff_to_float"],
            "prediction_agreement_to_float": context.rows["int8"]["prediction_agreement_to_float"],
        }


def _check_inputs_supported(settings: Any, text: bool) -> None:
    """Refuse, before any work, the stages that need one input tensor when the run's inputs are tokens
    (``text``), and head pruning when they are not."""
    if not text:
        if "prune" in settings.stages and settings.prune.method == "heads":
            raise ConfigError(
                "head pruning is for Transformer students (BERT family) on tokenized text; this run's "
                "model takes one tensor: use --set compress.prune.method=channel or magnitude"
            )
        return
    if "quantize" in settings.stages and settings.quantize.method == "static":
        raise ConfigError(
            "static int8 calibrates one input tensor; this run's model takes tokenized text: "
            "use dynamic int8 (--set compress.quantize.method=dynamic)"
        )
    if "prune" in settings.stages and settings.prune.method == "channel":
        raise ConfigError(
            "channel pruning knows the zoo's mlp, cnn and CIFAR ResNets, not a Transformer: use "
            "--set compress.prune.method=heads (attention heads) or magnitude, or leave pruning out "
            "(--set compress.stages=[quantize,export])"
        )


def compress_run(
    source: str | Path,
    *,
    overrides: list[str] | None = None,
    data_dir: str | None = None,
    run_dir: str | Path | None = None,
    out: str | Path | None = None,
    progress: Any = None,
) -> dict:
    """Run the compression chain of a run directory (or of a config, after running it); returns the summary.

    Args:
        source: A run directory with a distilled student, or a YAML config (its stages run first).
        overrides: ``key.path=value`` settings, e.g. ``compress.prune.amount=0.3``.
        data_dir: Overrides ``data.data_dir``.
        run_dir: For a config: the run directory to create (default ``output_dir/name``).
        out: Where the compression results go (default ``RUN_DIR/compress``).
        progress: Called with a one-line message as each step starts.

    Example:
        >>> summary = compress_run("runs/mnist-demo", overrides=["compress.quantize.method=dynamic"])
        >>> summary["models"]["int8"]["accuracy"]
    """
    source = Path(source)
    train_first = not source.is_dir()
    if not train_first:
        run_dir = check_run_dir(source)
        config = load_config(run_dir / "config.yaml", overrides or [])
    else:
        config = load_config(source, overrides or [])
        if data_dir is not None:
            config.data.data_dir = data_dir
        config.stages = [stage for stage in config.stages if stage in ("teacher", "baseline", "distill")] or [
            "distill"
        ]
        if "distill" not in config.stages:
            config.stages.append("distill")

        run_dir = run_directory(config, run_dir)
    # read once: for training, calibration and checks (a finished teacher-samples run's rows: without its teacher)
    data = (None if train_first else stored_run_data(config, run_dir)) or build_run_data(
        config, data_dir=data_dir
    )
    # refused settings fail before anything trains
    _check_inputs_supported(
        config.compress or CompressConfig(), isinstance(real_inputs(data.test_set, 1), dict)
    )
    with run_lock(run_dir):  # one writer per run directory, from its training to the compressed files
        if train_first:
            run(config, run_dir=run_dir, datasets=data.datasets)
        return _compress_chain(config, run_dir, out, data, progress)


def _compress_chain(config: RunConfig, run_dir: Path, out, data: RunData, progress: Any) -> dict:
    context = _Context(config, Path(run_dir), Path(out) if out else None, data, progress)
    started = datetime.now(timezone.utc)
    models = _load_models(context)
    for name, model in models.items():
        _measure(context, name, model)
    final, int8 = _stage_prune_recover(context, models["distilled"]), None
    if "quantize" in context.settings.stages:
        final, int8 = _stage_quantize(context, final, models)
    if "export" in context.settings.stages:
        _stage_export(context, final, int8)
    summary = {
        "run_name": config.name,
        "dataset": config.data.dataset,
        "created": started.isoformat(timespec="seconds"),
        "evaluated_samples": len(context.eval_set),
        "test_samples": len(context.test_set),
        "torch_version": torch.__version__,
        "onnxruntime_version": __import__("onnxruntime").__version__,
        "compress": context.settings.model_dump(mode="json"),
        "models": {name: context.rows[name] for name in ROW_ORDER if name in context.rows},
        "exports": context.exports,  # each names its row ("model"): the float model the file holds
        "int8_export": context.int8_export,
    }
    atomic_write_text(context.out / "summary.json", dumps_json(summary, indent=2))
    write_compress_report(context.out)
    return summary
