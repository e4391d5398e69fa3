"""The ``alambic`` command line: each subcommand is a thin wrapper over one public function."""

from __future__ import annotations

import contextlib
import functools
import json
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from alambic import __version__
from alambic.commands.augment import augment
from alambic.commands.explore import inspect, losses
from alambic.commands.options import Debug, yaml_mapping
from alambic.config import load_config
from alambic.config.base import hf_path
from alambic.console import (
    ProgressBar,
    console,
    print_compress_summary,
    print_summary,
    print_table,
    print_tune_trials,
)
from alambic.core.cache import cache_size_bytes
from alambic.errors import AlambicError
from alambic.models.hf import derive_to_folder, is_gguf
from alambic.models.importance import CALIBRATION_BLOCK, CALIBRATION_WINDOWS
from alambic.packaged import demo_overrides, packaged_recipes, recipe_path, recipe_purpose
from alambic.run.artifacts import evaluate_checkpoint, export_run
from alambic.run.compress import compress_run
from alambic.run.pipeline import evaluate_run, run
from alambic.run.report import write_report
from alambic.run.teacher_cache import cache_teacher_outputs
from alambic.run.tune import tune as tune_study

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Knowledge distillation for PyTorch.")


def _print_version(value: bool) -> None:
    if value:
        console.print(f"alambic {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Show the version and exit."),
    ] = False,
) -> None:
    """Knowledge distillation for PyTorch."""


error_console = Console(stderr=True)


def user_errors(command):
    """Turn :class:`AlambicError` into a one-line message and exit code 2 (a traceback only with --debug)."""

    @functools.wraps(command)
    def wrapper(*args: Any, debug: bool = False, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except AlambicError as error:
            if debug:
                raise
            # escaped: messages quote settings such as `--set compress.stages=[quantize,export]`,
            # which Rich would otherwise read as markup tags and drop
            error_console.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            error_console.print("interrupted; the last checkpoint is kept (continue with --resume)")
            raise typer.Exit(130) from None

    return wrapper


class Terminated(KeyboardInterrupt):
    """SIGTERM (what job schedulers send before killing a job), raised in the main thread as a clean stop."""


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """While the block runs, SIGTERM raises :class:`Terminated`: the run is marked interrupted, not left running."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise Terminated(f"stopped by signal {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_and_report(config, run_dir: Path | None, resume: bool) -> Path:
    target = run_dir or Path(config.output_dir) / config.name
    try:
        with stop_on_sigterm(), ProgressBar() as bar:
            run_dir = run(config, run_dir=run_dir, resume=resume, progress=bar)
    except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM from a job scheduler
        how = "stopped by SIGTERM" if isinstance(stop, Terminated) else "interrupted"
        error_console.print(
            f"{how}: {target} keeps its last checkpoint; continue with "
            f"alambic run {target / 'config.yaml'} --resume {target}",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(143 if isinstance(stop, Terminated) else 130) from None
    summary_path = run_dir / "summary.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        print_summary(summary)
        if summary.get("non_finite"):
            error_console.print(
                f"warning: not finite (written as null in summary.json): {', '.join(summary['non_finite'])}; "
                "look for NaN or infinite values in the test inputs",
                highlight=False,
                soft_wrap=True,
            )
    console.print(
        f"run directory: {run_dir}" + ("  (report.md inside)" if (run_dir / "report.md").is_file() else "")
    )
    return run_dir


@app.command()
@user_errors
def demo(
    task: Annotated[
        str,
        typer.Option(
            help="classification, or lm: a character-level language model on Tiny Shakespeare (packaged)"
        ),
    ] = "classification",
    dataset: Annotated[str, typer.Option(help="digits (built in), mnist or fashion-mnist")] = "digits",
    data_dir: Annotated[str | None, typer.Option(help="folder with the MNIST-format idx files")] = None,
    out: Annotated[Path, typer.Option(help="parent folder of the run directory")] = Path("runs"),
    set_: Annotated[list[str] | None, typer.Option("--set", help="override: key.path=value")] = None,
    threads: Annotated[
        int | None,
        typer.Option(
            help="torch CPU threads; default 1 for --task lm (its small models train fastest on one)"
        ),
    ] = None,
    debug: Debug = False,
) -> None:
    """Train a teacher, a baseline student and a distilled student; compare all three."""
    from datetime import datetime

    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    recipe, data_overrides = demo_overrides(task, dataset, data_dir)
    name = "lm" if task == "lm" else dataset
    overrides = [f"output_dir={out}", f"name={name}-demo-{stamp}", *data_overrides, *(set_ or [])]
    previous = torch.get_num_threads()
    if threads or task == "lm":  # several threads on tiny matrices mostly wait on each other, and on a
        torch.set_num_threads(threads or 1)  # shared machine on other processes (8x slower measured)
    try:
        _run_and_report(load_config(recipe, overrides), None, False)
    finally:
        torch.set_num_threads(previous)


@app.command(name="run")
@user_errors
def run_command(
    config: Annotated[Path, typer.Argument(help="YAML run config (see recipes/)")],
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="override: key.path=value (repeatable)")
    ] = None,
    resume: Annotated[Path | None, typer.Option(help="continue the stopped run in this directory")] = None,
    out: Annotated[Path | None, typer.Option(help="run directory (default: output_dir/name)")] = None,
    debug: Debug = False,
) -> None:
    """Run the stages of a YAML config (or a packaged recipe by name: digits, mnist-hinton, ...)."""
    _run_and_report(load_config(recipe_path(config), set_ or []), resume or out, resume is not None)


@app.command()
@user_errors
def recipes(debug: Debug = False) -> None:
    """List the packaged recipes (run one from any folder: alambic run NAME) with their purpose."""
    table = Table(title="packaged recipes: alambic run NAME")
    for column in ("name", "purpose"):
        table.add_column(column, overflow="fold")
    folder = packaged_recipes()
    for path in sorted(folder.rglob("*.yaml")):
        if "data" not in path.relative_to(folder).parts:
            table.add_row(str(path.relative_to(folder).with_suffix("")), recipe_purpose(path))
    print_table(table)


@app.command()
@user_errors
def tune(
    config: Annotated[Path, typer.Argument(help="YAML run config: teacher, student, distill (see recipes/)")],
    trials: Annotated[
        int, typer.Option(help="finished trials the study should hold (a resumed study counts its own)")
    ],
    study: Annotated[
        Path, typer.Option(help="study folder: study.db (SQLite), teacher, best.yaml; reuse it to resume")
    ],
    methods: Annotated[str, typer.Option(help="losses to choose from, comma-separated")] = "kd,dkd,dist",
    max_size_mb: Annotated[float | None, typer.Option(help="budget mode: student size limit (MB)")] = None,
    max_latency_ms: Annotated[
        float | None, typer.Option(help="budget mode: latency limit (ms, batch 1, 1 thread)")
    ] = None,
    val_fraction: Annotated[
        float, typer.Option(help="share of the training set that scores the trials")
    ] = 0.2,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="override: key.path=value (repeatable)")
    ] = None,
    debug: Debug = False,
) -> None:
    """Search temperature, loss weights, method and lr (and, with a budget, the student's size) with Optuna."""
    with stop_on_sigterm():
        result = tune_study(
            load_config(config, set_ or []),
            trials=trials,
            study_dir=study,
            methods=[method.strip() for method in methods.split(",") if method.strip()],
            max_size_mb=max_size_mb,
            max_latency_ms=max_latency_ms,
            val_fraction=val_fraction,
        )
    print_tune_trials(study, result)
    if result["best_config"]:
        console.print(
            f"best: trial validation accuracy {100 * result['best_value']:.2f}%; run it with "
            f"alambic run {result['best_config']}"
        )


@app.command(name="eval")
@user_errors
def eval_command(
    path: Annotated[
        Path, typer.Argument(help="a run directory, or a model checkpoint with --arch and --dataset")
    ],
    arch: Annotated[
        str | None, typer.Option(help="architecture of a checkpoint (zoo name or module:function)")
    ] = None,
    dataset: Annotated[str | None, typer.Option(help="data set to evaluate a checkpoint on")] = None,
    data_dir: Annotated[str | None, typer.Option(help="data folder")] = None,
    kwargs: Annotated[
        str, typer.Option(help="a checkpoint's model arguments as YAML, e.g. '{hidden: [64]}'")
    ] = "{}",
    debug: Debug = False,
) -> None:
    """Re-evaluate the saved models of a run (and rebuild its report), or one checkpoint."""
    if path.is_dir():
        with stop_on_sigterm(), ProgressBar() as bar:  # a stopped re-evaluation leaves the status as it was
            summary = evaluate_run(path, data_dir=data_dir, progress=bar)
        print_summary(summary)
        return

    if arch is None or dataset is None:
        raise AlambicError(
            f"{path} is not a run directory; to evaluate a checkpoint give --arch and --dataset"
        )
    model_kwargs = yaml_mapping(kwargs, "--kwargs")
    print_summary(
        evaluate_checkpoint(path, arch=arch, dataset=dataset, data_dir=data_dir, kwargs=model_kwargs)
    )


@app.command()
@user_errors
def report(
    run_dir: Annotated[Path, typer.Argument(help="a run directory with summary.json")], debug: Debug = False
) -> None:
    """Rebuild report.md and its plots from a run directory."""
    console.print(f"wrote {write_report(run_dir)}")


@app.command()
@user_errors
def derive(
    teacher: Annotated[
        str, typer.Argument(help="a Hugging Face model folder, hub id or .gguf file (hf: optional)")
    ],
    out: Annotated[Path, typer.Option(help="new folder for the student")],
    layers: Annotated[
        int | None, typer.Option(help="keep N layers: evenly spread (first and last), or by --by importance")
    ] = None,
    keep: Annotated[str | None, typer.Option(help="keep these teacher layers, e.g. 0,5")] = None,
    every: Annotated[int | None, typer.Option(help="keep every K-th layer from 0 (DistilBERT: 2)")] = None,
    by: Annotated[
        str,
        typer.Option(help="position, or importance: the N layers of highest Block Influence (ShortGPT)"),
    ] = "position",
    calibration: Annotated[
        Path | None, typer.Option(help="--by importance: a UTF-8 text file the layers are measured on")
    ] = None,
    calibration_windows: Annotated[int, typer.Option(help="--by importance: windows of that text")] = (
        CALIBRATION_WINDOWS
    ),
    block_size: Annotated[int, typer.Option(help="--by importance: tokens per window")] = CALIBRATION_BLOCK,
    task: Annotated[
        str | None,
        typer.Option(help="sequence-classification, causal-lm or embedding (default: causal-lm for .gguf)"),
    ] = None,
    num_labels: Annotated[
        int | None,
        typer.Option(help="classes of the classification head (a new head if the teacher has none)"),
    ] = None,
    offline: Annotated[bool, typer.Option(help="never reach the network")] = False,
    debug: Debug = False,
) -> None:
    """Build a smaller student of the teacher's family, initialised from its embeddings, chosen layers and head."""
    try:
        kept = [int(index) for index in keep.split(",")] if keep else None
    except ValueError:
        raise AlambicError(f"--keep takes layer indices like 0,5; got {keep!r}") from None
    teacher = hf_path(teacher) or teacher
    task = task or ("causal-lm" if is_gguf(teacher) else "sequence-classification")
    report = derive_to_folder(
        teacher, out, task=task, layers=layers, keep=kept, every=every, num_labels=num_labels,
        local_files_only=offline, by=by, calibration=calibration, windows=calibration_windows,
        block_size=block_size,
    )  # fmt: skip
    new = ", ".join(f"{name} {'x'.join(map(str, shape))}" for name, shape in report["new_tensors"].items())
    influence = report.get("block_influence")
    measured = (
        f"Block Influence on {report['calibration_tokens']:,} tokens: "
        + " ".join(f"{index}:{score:.3f}" for index, score in enumerate(influence))
        + "; "
        if influence
        else ""
    )
    console.print(
        f"{report['family']}: {measured}kept teacher layers {report['kept_layers']} of {report['teacher_layers']}; "
        f"copied {report['copied_tensors']} tensors from the teacher, newly initialised: {new or 'none'}; "
        f"{report['student_parameters']:,} parameters (teacher {report['teacher_parameters']:,}); "
        f"tokenizer {report['tokenizer']}; wrote {out}"
    )


app.command()(user_errors(augment))
app.command()(user_errors(losses))
app.command()(user_errors(inspect))


@app.command(name="cache-teacher")
@user_errors
def cache_teacher_command(
    config: Annotated[Path, typer.Argument(help="YAML run config whose trained teacher and data to use")],
    out: Annotated[Path, typer.Option(help="new folder for the cache")],
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="override: key.path=value (repeatable)")
    ] = None,
    top_k: Annotated[
        int | None,
        typer.Option(help="store the k largest log-probabilities and the tail mass (LM vocabularies)"),
    ] = None,
    dtype: Annotated[str, typer.Option(help="float32 or float16 storage")] = "float32",
    shard_size: Annotated[
        int, typer.Option(help="samples per shard file; processes of a launch share the shards out")
    ] = 50_000,
    debug: Debug = False,
) -> None:
    """Run the teacher once over the training set and store what the distill terms need (offline KD)."""
    import time

    started = time.perf_counter()
    manifest = cache_teacher_outputs(
        load_config(config, set_ or []), out, top_k=top_k, dtype=dtype, shard_size=shard_size
    )
    console.print(
        f"cached {', '.join(manifest['fields'])} for {manifest['num_samples']:,} samples in "
        f"{time.perf_counter() - started:.1f} s ({cache_size_bytes(out) / 2**20:.1f} MiB, {manifest['dtype']}); "
        f"train from it with --set distill.teacher_cache={out}"
    )


@app.command(name="export")
@user_errors
def export_command(
    source: Annotated[Path, typer.Argument(help="a run directory, or a .safetensors checkpoint with --arch")],
    export_format: Annotated[
        str, typer.Option("--format", help="onnx, torch-export or safetensors")
    ] = "onnx",
    out: Annotated[
        Path | None,
        typer.Option(
            help="file to write (default RUN_DIR/export/MODEL.EXT); for a Hugging Face model's "
            "safetensors, the save_pretrained folder (default RUN_DIR/export/MODEL-hf)"
        ),
    ] = None,
    model: Annotated[
        str,
        typer.Option(
            help="for a run directory: student, baseline, teacher or another model it saves (peer_1, ...)"
        ),
    ] = "student",
    data_dir: Annotated[str | None, typer.Option(help="data folder (for the check on real inputs)")] = None,
    arch: Annotated[str | None, typer.Option(help="architecture of a checkpoint")] = None,
    dataset: Annotated[str | None, typer.Option(help="data set of a checkpoint")] = None,
    debug: Debug = False,
) -> None:
    """Export a student (ONNX with dynamic batch, torch.export program, safetensors) and check it."""
    report = export_run(
        source, out, export_format=export_format, model=model, data_dir=data_dir, arch=arch, dataset=dataset
    )
    console.print(
        f"wrote {report['path']} ({report['size_bytes']:,} bytes, {report['parameters']:,} parameters); "
        f"max |difference| to PyTorch {report['max_abs_diff']:.3g} on {report['checked_samples']} "
        f"test inputs in {report['runtime']}"
    )


@app.command()
@user_errors
def compress(
    source: Annotated[
        Path, typer.Argument(help="a run directory with a distilled student, or a YAML config")
    ],
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="override: key.path=value, e.g. compress.prune.amount=0.3"),
    ] = None,
    data_dir: Annotated[str | None, typer.Option(help="data folder")] = None,
    out: Annotated[Path | None, typer.Option(help="for a config: the run directory to create")] = None,
    debug: Debug = False,
) -> None:
    """Prune, recover by distillation, quantize to int8 and export the student; measure every stage."""
    with stop_on_sigterm():
        summary = compress_run(
            source,
            overrides=set_ or [],
            data_dir=data_dir,
            run_dir=out,
            progress=lambda line: console.print(line),
        )
    print_compress_summary(summary)


def main() -> None:
    """Entry point of the ``alambic`` console script."""
    import logging

    # transformers imports torchao when it is installed (alambic[quant]), which logs every GPU kernel
    # library it cannot load on a CPU build; the command's output is ours to keep readable
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    app(prog_name="alambic")


if __name__ == "__main__":
    sys.exit(main())
