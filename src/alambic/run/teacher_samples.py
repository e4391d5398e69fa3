"""``data.dataset: teacher-samples``: a causal-LM data set made of the teacher's own generations.

A teacher without a tokenizer (a llama2.c checkpoint works on token ids) can still teach: it writes its
own training text. Every row is ``prompt`` (default: the teacher's BOS token) continued by ``new_tokens``
tokens sampled through its key/value cache (:func:`alambic.core.llm.teacher_generations`), the prompt's
labels ``-100``. ``samples`` training rows come from the seed, ``validation`` held-out rows from another
random stream (seed + 2^31 mod 2^32, never the training rows' own), so the validation rows are fresh samples.

They are generated once per run: :func:`teacher_sample_datasets` reads them back from
``RUN/teacher_samples/`` (``samples.safetensors``: ``train`` ``[N, P + M]`` and ``validation``; and
``settings.json``: the settings, the seed and the teacher's checksum) when that folder holds them for the
same settings and teacher, else generates them in memory; :func:`write_teacher_samples` writes them once
the run directory exists (the pre-flight writes nothing), with the vocabulary in the file's metadata, so
that ``export`` and ``compress`` read a finished run's rows back without building its teacher
(:func:`stored_sample_datasets`). Commands that rebuild a run's data without its directory (``tune``,
``cache-teacher``, ``compress`` of a config) generate the same rows again from the seed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from alambic.core.cache import teacher_checksum
from alambic.core.checkpoint import atomic_write_text
from alambic.core.llm import IGNORE_INDEX, teacher_generations
from alambic.data import LMDatasetInfo
from alambic.data.lm import TokenRows
from alambic.errors import ConfigError, DataError, first_line
from alambic.files import dumps_json, writing
from alambic.run.lm_distill import stored_settings

SAMPLES_DIR = "teacher_samples"
SAMPLES_FILE = "samples.safetensors"
# torch's CPU generator keeps 32 bits of a seed: the validation rows use seed + 2^31 (mod 2^32), never the
# training rows' stream of the same seed
VALIDATION_SEED_OFFSET = 2**31


def sample_settings(settings: Any, seed: int, teacher: nn.Module) -> dict:
    """What the rows are made from (``data.teacher_samples``, its prompt and seed resolved, the teacher's
    checksum): a change in any of it makes new rows."""
    return {
        **settings.model_dump(),
        "prompt": prompt_ids(settings, teacher),
        "seed": seed if settings.seed is None else settings.seed,
        "teacher_checksum": teacher_checksum(teacher),
    }


def prompt_ids(settings: Any, teacher: nn.Module) -> list[int]:
    """``data.teacher_samples.prompt``, else ``[bos_token_id]`` of the teacher's config."""
    if settings.prompt is not None:
        return list(settings.prompt)
    bos = getattr(getattr(teacher, "config", None), "bos_token_id", None)
    if bos is None:
        raise ConfigError(
            "data.teacher_samples: the teacher's config has no bos_token_id to start its samples from; "
            "set data.teacher_samples.prompt (token ids, e.g. [1])"
        )
    return [int(bos)]


def generate_rows(teacher: nn.Module, wanted: dict) -> dict[str, Tensor]:
    """``{"train": [samples, P + M], "validation": [validation, P + M]}`` token ids sampled from ``teacher``."""
    length = len(wanted["prompt"]) + wanted["new_tokens"]
    context = getattr(getattr(teacher, "config", None), "max_position_embeddings", None)
    if context is not None and length > context:
        raise ConfigError(
            f"data.teacher_samples: prompt ({len(wanted['prompt'])}) + new_tokens ({wanted['new_tokens']}) "
            f"= {length} tokens exceed the teacher's context of {context}; lower new_tokens"
        )
    rows = {}
    for split, count, seed in (
        ("train", wanted["samples"], wanted["seed"]),
        ("validation", wanted["validation"], (wanted["seed"] + VALIDATION_SEED_OFFSET) % 2**32),
    ):
        prompts = torch.tensor([wanted["prompt"]], dtype=torch.long).repeat(count, 1)  # [N, P]
        try:
            generated = teacher_generations(
                teacher, prompts, wanted["new_tokens"], batch_size=wanted["batch_size"],
                temperature=wanted["temperature"], top_k=wanted["top_k"], seed=seed,
            )  # fmt: skip
        except (IndexError, RuntimeError) as error:  # token ids or positions past the model's, mostly
            raise ConfigError(
                f"data.teacher_samples: the teacher cannot generate {len(wanted['prompt'])} + "
                f"{wanted['new_tokens']} tokens from prompt {wanted['prompt']}: {str(error).splitlines()[0]}; "
                "fit prompt and new_tokens in its vocabulary and context"
            ) from error
        rows[split] = generated.ids.contiguous()
    return rows


def teacher_sample_datasets(
    teacher: nn.Module, settings: Any, *, seed: int, run_dir: Path | None = None
) -> tuple[TokenRows, TokenRows, LMDatasetInfo]:
    """The train and validation sets of ``data.dataset: teacher-samples`` and their info: read from
    ``run_dir/teacher_samples`` when it holds them for these settings and this teacher, else generated.

    Example:
        >>> train, valid, info = teacher_sample_datasets(load_llama2c("stories260K.bin"), settings, seed=0)  # doctest: +SKIP
    """
    teacher = teacher.cpu()
    wanted = sample_settings(settings, seed, teacher)
    folder = None if run_dir is None else Path(run_dir) / SAMPLES_DIR
    if folder is not None and stored_settings(folder, SAMPLES_FILE) == wanted:
        rows = load_file(str(folder / SAMPLES_FILE))
    else:
        rows = generate_rows(teacher, wanted)
    return _sample_datasets(rows, wanted, teacher.get_output_embeddings().out_features)


def _sample_datasets(
    rows: dict[str, Tensor], wanted: dict, vocabulary: int
) -> tuple[TokenRows, TokenRows, Any]:
    prompt = len(wanted["prompt"])
    train, valid = (token_rows(rows[split], prompt) for split in ("train", "validation"))
    info = LMDatasetInfo(
        "teacher-samples", vocabulary, (rows["train"].shape[1],), [], None, None, unit="token",
        generated={"settings": wanted, "rows": rows, "vocabulary": vocabulary},
    )  # fmt: skip
    return train, valid, info


def stored_sample_datasets(
    run_dir: str | Path, settings: Any, *, seed: int
) -> tuple[TokenRows, TokenRows, LMDatasetInfo] | None:
    """A finished run's samples read back without building its teacher, or None.

    What ``alambic export`` and ``alambic compress`` check a run's models on: the rows the run trained on,
    when ``run_dir/teacher_samples`` holds them for ``settings`` and ``seed`` (the teacher's part of the
    settings, its checksum and default prompt, is taken as written: building the teacher to compare it is
    what this avoids) and records the vocabulary (folders written before it did: None).

    Example:
        >>> train, valid, info = stored_sample_datasets("runs/lm-stories260k", config.data.teacher_samples, seed=0)
    """
    folder = Path(run_dir) / SAMPLES_DIR
    stored = stored_settings(folder, SAMPLES_FILE)
    ours = {**settings.model_dump(), "seed": seed if settings.seed is None else settings.seed}
    if settings.prompt is None:
        del ours["prompt"]  # the teacher's BOS token: stored resolved
    else:
        ours["prompt"] = list(settings.prompt)
    if stored is None or any(stored.get(key) != value for key, value in ours.items()):
        return None
    try:
        with safe_open(str(folder / SAMPLES_FILE), framework="pt") as handle:
            vocabulary = (handle.metadata() or {}).get("vocabulary", "")
        rows = load_file(str(folder / SAMPLES_FILE)) if vocabulary.isdigit() else None
    except (SafetensorError, OSError) as error:
        raise DataError(
            f"cannot read {folder / SAMPLES_FILE} ({first_line(error)}); delete {folder} and run "
            f"alambic run {Path(run_dir) / 'config.yaml'} --resume {run_dir} to generate the samples again"
        ) from None
    return None if rows is None else _sample_datasets(rows, stored, int(vocabulary))


def token_rows(ids: Tensor, prompt_tokens: int) -> TokenRows:
    """Rows of token ids ``[N, T]`` whose first ``prompt_tokens`` labels are -100; one unit per predicted token."""
    labels = ids.clone()
    labels[:, :prompt_tokens] = IGNORE_INDEX
    counts = torch.full((len(ids),), ids.shape[1] - prompt_tokens, dtype=torch.long)
    return TokenRows({"input_ids": ids, "labels": labels}, counts, "token")


def write_teacher_samples(run_dir: Path, generated: dict) -> None:
    """Write a run's teacher samples (``info.generated``) to ``run_dir/teacher_samples`` unless it holds them."""
    folder = run_dir / SAMPLES_DIR
    if stored_settings(folder, SAMPLES_FILE) == generated["settings"]:
        return
    with writing(folder):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "settings.json").unlink(missing_ok=True)  # written last: it marks a complete folder
        metadata = {"vocabulary": str(generated["vocabulary"])}  # read back without the teacher
        save_file(generated["rows"], str(folder / SAMPLES_FILE), metadata=metadata)
        atomic_write_text(folder / "settings.json", dumps_json(generated["settings"], indent=2))
