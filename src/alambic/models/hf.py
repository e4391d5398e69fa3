"""Hugging Face models as teachers and students, and students derived from their teacher.

``transformers`` is an optional extra (``pip install alambic[hf]``), imported inside these functions.

Example:
    >>> teacher = load_hf_model("path/to/bert", task="sequence-classification", num_labels=2)
    >>> student, report = derive_student(teacher, layers=2)   # DistilBERT-style: copied embeddings,
    >>> report["kept_layers"]                                   # chosen layers and head
    [0, 5]
"""

from __future__ import annotations

import copy
import os
import re
import tempfile
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from alambic.errors import ConfigError
from alambic.files import dumps_json
from alambic.imports import require
from alambic.models.importance import (
    CALIBRATION_BLOCK,
    CALIBRATION_WINDOWS,
    block_influence,
    calibration_tokens,
    file_calibration,
    most_important,
)
from alambic.models.surgery import is_head_pruned, layer_list, load_head_pruned

GGUF_SUFFIX = ".gguf"
TASKS = {
    "sequence-classification": "AutoModelForSequenceClassification",
    "causal-lm": "AutoModelForCausalLM",
    "embedding": "AutoModel",
}


def transformers_module() -> Any:
    """The transformers package, or a one-line error saying how to install it."""
    return require("transformers", "hf", purpose="Hugging Face models")


def load_hf_model(
    name_or_path: str,
    *,
    task: str = "sequence-classification",
    num_labels: int | None = None,
    local_files_only: bool = False,
    attn_implementation: str = "eager",
    **kwargs: Any,
) -> nn.Module:
    """A ``transformers`` model from a local folder, a hub id or a GGUF file.

    Args:
        name_or_path: a folder written by ``save_pretrained`` (works offline), a hub id, or a ``.gguf``
            file (llama.cpp's format), dequantised by :func:`load_gguf_model`.
        task: ``sequence-classification``, ``causal-lm`` or ``embedding`` (the bare encoder).
        num_labels: classes of a classification head (a new head when it differs from the checkpoint's).
        local_files_only: never reach the network.
        attn_implementation: ``eager`` returns attention maps (``attentions.K`` terms); ``sdpa`` is faster
            but returns none.
        **kwargs: passed to ``from_pretrained`` (``dtype``, ``output_loading_info``, ...).
    """
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    auto = getattr(transformers_module(), TASKS[task])
    if num_labels is not None and task == "sequence-classification":
        kwargs.update(num_labels=num_labels, ignore_mismatched_sizes=True)
    if is_gguf(name_or_path):
        return load_gguf_model(name_or_path, auto, attn_implementation=attn_implementation, **kwargs)

    if is_head_pruned(name_or_path):  # per-layer head counts: rebuilt from the stored weight shapes
        labels = num_labels if task == "sequence-classification" else None
        return load_head_pruned(
            name_or_path,
            auto,
            num_labels=labels,
            local_files_only=True,
            attn_implementation=attn_implementation,
        )
    try:
        return auto.from_pretrained(
            name_or_path, local_files_only=local_files_only, attn_implementation=attn_implementation, **kwargs
        )
    except OSError as error:
        raise ConfigError(
            f"cannot load the Hugging Face model {name_or_path!r}: {str(error).splitlines()[0]}"
        ) from None


def is_gguf(name_or_path: str | Path) -> bool:
    """Whether ``name_or_path`` names a GGUF file (llama.cpp's format: ``*.gguf``)."""
    return str(name_or_path).lower().endswith(GGUF_SUFFIX)


def gguf_location(path: str | Path) -> tuple[str, str]:
    """``(folder, file name)`` of a GGUF file, as ``from_pretrained(folder, gguf_file=name)`` takes them;
    a file that does not exist is a one-line :class:`ConfigError`."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"{path}: no such GGUF file; give the path of a .gguf model file")
    return str(path.parent.resolve()), path.name


def load_gguf_model(path: str | Path, auto: Any, *, dtype: Any = "float32", **kwargs: Any) -> nn.Module:
    """A GGUF file loaded by ``auto.from_pretrained(folder, gguf_file=name)``, every weight dequantised to
    ``dtype`` (``float32`` unless asked: ``bfloat16``, ``float16``, a ``torch.dtype``).

    The result is a plain model: no ``quantization_config`` on its config and no quantizer attached, so
    ``save_pretrained``, deep copies and derived students treat it as any other. Anything ``transformers``
    cannot read (not GGUF, truncated, an architecture it does not support) is one :class:`ConfigError` line.
    """
    folder, name = gguf_location(path)
    transformers = transformers_module()
    require("gguf", "hf", purpose="GGUF model files")  # read by transformers' GGUF loader
    torch_dtype = dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype), None)
    if not isinstance(torch_dtype, torch.dtype) or not torch_dtype.is_floating_point:
        raise ConfigError(f"dtype {dtype!r} for {path}: give float32, bfloat16 or float16")
    if hasattr(transformers, "GgufConfig"):  # transformers 5 may keep GGUF blocks packed unless told
        kwargs.setdefault("quantization_config", transformers.GgufConfig(dequantize=True))
    try:
        loaded = auto.from_pretrained(
            folder, gguf_file=name, dtype=torch_dtype, local_files_only=True, **kwargs
        )
    except Exception as error:  # any failure: the GGUF parser raises ValueError, struct.error, KeyError...
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"cannot load the GGUF file {path}: {reason}") from None
    model = loaded[0] if isinstance(loaded, tuple) else loaded
    for holder, attribute in ((model.config, "quantization_config"), (model, "hf_quantizer")):
        if getattr(holder, attribute, None) is not None:  # weights are dense now: nothing to carry on
            delattr(holder, attribute)
    if getattr(model, "is_quantized", False):
        model.is_quantized = False
    return loaded


def hf_tokenizer(name_or_path: str | Path, *, local_files_only: bool = False) -> Any:
    """The ``transformers`` tokenizer of a model folder, hub id or GGUF file (its vocabulary, merges and
    chat template are stored in the file); raises ``OSError`` / ``ValueError`` when there is none."""
    transformers = transformers_module()
    if is_gguf(name_or_path):
        folder, name = gguf_location(name_or_path)
        require("gguf", "hf", purpose="GGUF model files")
        return transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    return transformers.AutoTokenizer.from_pretrained(str(name_or_path), local_files_only=local_files_only)


def build_hf_model(
    model_type: str, *, task: str = "causal-lm", attn_implementation: str = "eager", **config: Any
) -> nn.Module:
    """A Hugging Face model built from scratch, from a config written out (``arch: hf-config``).

    Args:
        model_type: A ``transformers`` model type: ``gpt2``, ``llama``, ``bert``, ...
        task: ``causal-lm``, ``sequence-classification`` or ``embedding``.
        **config: The config's fields (``n_layer`` / ``num_hidden_layers``, ``n_embd`` / ``hidden_size``,
            heads, ``vocab_size``, ...); the rest keep the model type's defaults.

    Example:
        >>> model = build_hf_model("gpt2", n_layer=2, n_embd=64, n_head=2, vocab_size=65, n_positions=256)
    """
    transformers = transformers_module()
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    try:
        hf_config = transformers.AutoConfig.for_model(model_type, **config)
    except (ValueError, KeyError) as error:
        raise ConfigError(
            f"cannot build a Hugging Face {model_type!r} config: {str(error).splitlines()[0]}; "
            "model_type is a transformers model type (gpt2, llama, bert, ...)"
        ) from None
    model = getattr(transformers, TASKS[task]).from_config(hf_config, attn_implementation=attn_implementation)
    return model


def choose_layers(
    num_layers: int, *, layers: int | None = None, keep: Sequence[int] | None = None, every: int | None = None
) -> list[int]:
    """Which teacher layers a derived student keeps: explicit ``keep``, ``every`` k-th from 0, or ``layers`` spread evenly.

    ``layers=n`` keeps the first and the last layer and spreads the rest evenly (6 -> 2: [0, 5];
    12 -> 4: [0, 4, 7, 11]); ``every=2`` keeps 0, 2, 4, ... as DistilBERT does.
    """
    given = sum(option is not None for option in (layers, keep, every))
    if given != 1:
        raise ConfigError(
            "choose the student's layers with exactly one of --layers N, --keep I,J,..., --every K"
        )
    if keep is not None:
        chosen = list(keep)
        bad = [i for i in chosen if not 0 <= i < num_layers]
        if bad or not chosen or sorted(set(chosen)) != chosen:
            raise ConfigError(
                f"--keep {chosen}: give increasing, distinct layer indices in 0..{num_layers - 1}"
            )
        return chosen
    if every is not None:
        if every < 1:
            raise ConfigError(f"--every must be >= 1, got {every}")
        return list(range(0, num_layers, every))
    if not 1 <= layers <= num_layers:
        raise ConfigError(f"--layers must be in 1..{num_layers} (the teacher has {num_layers}), got {layers}")
    if layers == 1:
        return [num_layers - 1]
    return [round(i * (num_layers - 1) / (layers - 1)) for i in range(layers)]


def check_layer_choice(
    by: str, *, layers: int | None = None, keep: Sequence[int] | None = None, every: int | None = None
) -> None:
    """A one-line :class:`ConfigError` unless ``by`` is ``position`` or ``importance``, and ``importance``
    comes with a layer count alone (``layers``, not ``keep`` / ``every``)."""
    if by not in ("position", "importance"):
        raise ConfigError(f"--by {by!r}: choose layers by position (the default) or importance")
    if by == "importance" and (layers is None or keep is not None or every is not None):
        raise ConfigError(
            "--by importance keeps the N most important layers: give --layers N (not keep/every)"
        )


def derive_student(
    teacher: nn.Module,
    *,
    layers: int | None = None,
    keep: Sequence[int] | None = None,
    every: int | None = None,
    by: str = "position",
    calibration: Tensor | Iterable[Any] | None = None,
    new_in_teacher: Collection[str] = (),
) -> tuple[nn.Module, dict]:
    """A student of the teacher's family with fewer layers, initialised from the teacher's weights.

    Embeddings, the chosen layers (renumbered) and the head are copied, as DistilBERT does; works for
    BERT-family encoders and Llama / GPT-2 style decoders (any ``transformers`` model whose blocks form
    one ``ModuleList``). Returns the student and a report: kept layers, how many tensors came from the
    teacher's checkpoint, the newly initialised ones (``new_tensors``: name -> shape; the student's own,
    and ``new_in_teacher``, those the teacher's loading initialised, such as a new classification head),
    parameter counts.

    ``by="importance"`` keeps the ``layers`` layers of highest Block Influence (ShortGPT, Men et al. 2024,
    arXiv:2403.03853; :func:`alambic.models.importance.block_influence`) measured on ``calibration`` (a
    ``[W, T]`` tensor of token ids, or samples / batches with ``input_ids``); the report then holds each
    teacher layer's ``block_influence`` and the ``calibration_tokens`` counted.

    Example:
        >>> student, report = derive_student(teacher, layers=10, by="importance", calibration=windows)
        >>> report["kept_layers"], report["block_influence"]
    """
    check_layer_choice(by, layers=layers, keep=keep, every=every)
    path, blocks = layer_list(teacher)
    scores = None
    if by == "importance":
        if calibration is None:
            raise ConfigError("--by importance measures the layers on calibration text: give some")
        scores = block_influence(teacher, calibration)
        chosen = most_important(scores, layers)
    else:
        chosen = choose_layers(len(blocks), layers=layers, keep=keep, every=every)
    student, copied, new = _copy_layers(teacher, path, chosen, new_in_teacher)
    report = {
        "family": type(teacher).__name__,
        "layer_list": path,
        "teacher_layers": len(blocks),
        "by": by,
        "kept_layers": chosen,
        "copied_tensors": copied,
        "new_tensors": new,
        "teacher_parameters": sum(p.numel() for p in teacher.parameters()),
        "student_parameters": sum(p.numel() for p in student.parameters()),
    }
    if scores is not None:
        report["block_influence"] = [round(score, 6) for score in scores]
        report["calibration_tokens"] = calibration_tokens(calibration)
    return student, report


def _copy_layers(
    teacher: nn.Module, path: str, chosen: list[int], new_in_teacher: Collection[str]
) -> tuple[nn.Module, int, dict]:
    """A model of the teacher's class with ``chosen`` layers copied (renumbered), the rest of its tensors
    copied by name; returns it, how many tensors came from the teacher, and the new ones (name -> shape)."""
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(chosen)
    student = type(teacher)(config)
    pattern = re.compile(rf"^{re.escape(path)}\.(\d+)\.")
    source = teacher.state_dict()
    state, copied, new = {}, 0, {}
    for key, value in student.state_dict().items():
        match = pattern.match(key)
        teacher_key = pattern.sub(f"{path}.{chosen[int(match.group(1))]}.", key, count=1) if match else key
        if teacher_key in source and source[teacher_key].shape == value.shape:
            state[key] = source[teacher_key].clone()
            if teacher_key in new_in_teacher:
                new[key] = list(value.shape)
            else:
                copied += 1
        else:
            state[key] = value
            new[key] = list(value.shape)
    student.load_state_dict(state)
    return student, copied, new


def derive_to_folder(
    teacher: str,
    out: str | Path,
    *,
    task: str = "sequence-classification",
    layers: int | None = None,
    keep: Sequence[int] | None = None,
    every: int | None = None,
    num_labels: int | None = None,
    local_files_only: bool = False,
    by: str = "position",
    calibration: str | Path | None = None,
    windows: int = CALIBRATION_WINDOWS,
    block_size: int = CALIBRATION_BLOCK,
) -> dict:
    """Derive a student from the Hugging Face model ``teacher`` (a folder, hub id or ``.gguf`` file) and save
    it (with the tokenizer, when the teacher has one) to the new folder ``out``; returns the report, also
    written to ``derive.json``.

    ``num_labels``: classes of the classification head (a new head when the checkpoint has none, as a
    sentence-transformers folder, or another size). The report's ``new_tensors`` names what neither the
    teacher's checkpoint nor its layers gave (name -> shape). ``by="importance"`` keeps the ``layers``
    layers of highest Block Influence on the first ``windows`` windows of ``block_size`` tokens of the text
    file ``calibration`` (tokenized by the teacher's tokenizer). The folder appears complete or not at all
    (written aside, then renamed).
    """
    out = Path(out)
    if out.exists():
        raise ConfigError(f"{out} already exists; choose a new folder for the derived student")
    check_layer_choice(by, layers=layers, keep=keep, every=every)  # before the teacher loads
    if by == "importance" and calibration is None:
        raise ConfigError("--by importance measures the layers on text: give --calibration FILE (UTF-8 text)")
    loaded = load_hf_model(
        teacher, task=task, num_labels=num_labels, local_files_only=local_files_only, output_loading_info=True
    )
    # a head-pruned folder is rebuilt from its weight shapes: every tensor comes from the checkpoint
    model, info = loaded if isinstance(loaded, tuple) else (loaded, {})
    new_in_teacher = {*info.get("missing_keys", ()), *(key for key, *_ in info.get("mismatched_keys", ()))}
    try:
        tokenizer = hf_tokenizer(teacher, local_files_only=local_files_only)
    except (OSError, ValueError):
        tokenizer = None
    ids = None
    if by == "importance":
        if tokenizer is None:
            raise ConfigError(
                f"--by importance tokenizes the calibration text, and {teacher} has no tokenizer"
            )
        ids = file_calibration(tokenizer, calibration, windows=windows, block_size=block_size)
    student, report = derive_student(
        model, layers=layers, keep=keep, every=every, by=by, calibration=ids, new_in_teacher=new_in_teacher
    )
    report["teacher"] = str(teacher)
    if ids is not None:
        report["calibration"] = {
            "file": str(calibration),
            "windows": ids.shape[0],
            "block_size": ids.shape[1],
        }
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as staging:
        student.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        report["tokenizer"] = "copied" if tokenizer is not None else "none found next to the teacher"
        (Path(staging) / "derive.json").write_text(dumps_json(report, indent=2))
        os.replace(staging, out)
    return report


def layer_pairs(
    student_layers: int, teacher_layers: int, mapping: str | Sequence[Sequence[int]] = "uniform"
) -> list[tuple[int, int]]:
    """Which teacher layer each student layer learns from, as ``(student, teacher)`` hidden-state indices.

    Indices count the embedding output as 0, so layer ``i`` is ``hidden_states.i``. ``uniform`` maps
    student layer ``i`` to teacher layer ``i * teacher_layers / student_layers`` (TinyBERT's
    ``g(m) = m * N / M``), ``last`` pairs the last layers only, and explicit pairs are checked.

    Example:
        >>> layer_pairs(2, 6)
        [(1, 3), (2, 6)]
    """
    if mapping == "uniform":
        if teacher_layers % student_layers:
            raise ConfigError(
                f"uniform mapping needs the teacher's {teacher_layers} layers to be a multiple of the "
                f"student's {student_layers}; give explicit pairs instead"
            )
        step = teacher_layers // student_layers
        return [(i, i * step) for i in range(1, student_layers + 1)]
    if mapping == "last":
        return [(student_layers, teacher_layers)]
    if isinstance(mapping, str):
        raise ConfigError(
            f"unknown layer mapping {mapping!r}: use uniform, last, or a list of [student, teacher] pairs"
        )
    pairs = [tuple(int(i) for i in pair) for pair in mapping]
    bad = [
        p for p in pairs if len(p) != 2 or not (0 <= p[0] <= student_layers and 0 <= p[1] <= teacher_layers)
    ]
    if bad:
        raise ConfigError(
            f"layer pairs {bad} are out of range: student 0..{student_layers}, teacher 0..{teacher_layers} "
            "(0 is the embedding output)"
        )
    return pairs


def hidden_state_terms(
    student_layers: int,
    teacher_layers: int,
    mapping: str | Sequence[Sequence[int]] = "uniform",
    *,
    loss: str = "hidden_mse",
    weight: float = 1.0,
    embeddings: bool = False,
) -> list[dict]:
    """One term per mapped layer pair (plus the embedding layer when asked), ready for ``distill(terms=...)``.

    Example:
        >>> hidden_state_terms(2, 6, embeddings=True)   # TinyBERT: embeddings, 1 -> 3, 2 -> 6
    """
    pairs = layer_pairs(student_layers, teacher_layers, mapping)
    if embeddings and (0, 0) not in pairs:
        pairs = [(0, 0), *pairs]
    return [
        {"loss": loss, "weight": weight, "student": f"hidden_states.{s}", "teacher": f"hidden_states.{t}"}
        for s, t in pairs
    ]
