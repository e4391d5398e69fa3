"""The distill stage of a causal-LM run as sequence-level or on-policy KD (``distill.sequence_kd``,
``distill.on_policy``), over :mod:`alambic.core.llm`.

- Sequence-level KD (Kim & Rush 2016): the teacher continues prompts taken from the training windows;
  its generations are written once to ``RUN/teacher_generations/`` (``generations.safetensors``, the
  token ids ``[N, P + M]``, and ``settings.json``: the settings, the seed and the teacher's checksum)
  and read back on resume. The distilled student trains on them instead of the training windows; the
  baseline does not (it is the student without a teacher, on the training data).
- Sequence-level KD on a prompt file (``distill.sequence_kd.prompts_file``): the teacher answers each of
  the file's prompts once (chat template and generation prompt; one by one, stopping at its EOS), written
  to ``RUN/teacher_generations/`` (``answers.safetensors``: the ids of every prompt + answer end to end,
  ``lengths`` and ``prompt_lengths``; ``settings.json`` adds the file's sha256) and read back on resume;
  the student trains on prompt + answer, right-padded, the loss on the answer.
- On-policy KD (GKD, Agarwal et al. 2024): the distill stage's loader is wrapped in
  :class:`~alambic.core.llm.OnPolicyBatches`; text windows get their first ``prompt_tokens`` labels
  masked so that the rest of each window is the completion the student samples.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.data import Dataset, default_collate

from alambic.config.base import hf_path
from alambic.core.cache import teacher_checksum
from alambic.core.checkpoint import atomic_write_text
from alambic.core.llm import IGNORE_INDEX, OnPolicyBatches, generate_answers, teacher_generations
from alambic.data.lm import TokenRows, encode_prompt, pad_rows, read_prompts, read_text
from alambic.data.tokenizers import Tokenizer, load_tokenizer
from alambic.errors import ConfigError, DataError
from alambic.files import dumps_json, writing

GENERATIONS_DIR = "teacher_generations"
ANSWERS_FILE = "answers.safetensors"


def prompts_of(train_set: Any, count: int, prompt_tokens: int, seed: int) -> Tensor:
    """The first ``prompt_tokens`` tokens of ``count`` training windows drawn with ``seed`` -> ``[N, P]``.

    The windows are a seeded permutation, repeated when ``count`` exceeds their number."""
    order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(seed))
    indices = order.repeat(-(-count // len(order)))[:count].tolist()
    return torch.stack([train_set[index]["input_ids"][:prompt_tokens] for index in indices])


class GeneratedRows(Dataset):
    """Token rows ``{"input_ids": [T], "labels": [T]}`` whose first ``prompt_tokens`` labels are -100."""

    def __init__(self, ids: Tensor, prompt_tokens: int) -> None:
        self.ids = ids
        self.labels = ids.clone()
        self.labels[:, :prompt_tokens] = IGNORE_INDEX

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"input_ids": self.ids[index], "labels": self.labels[index]}

    def get_batch(self, indices: list[int]) -> dict[str, Tensor]:
        return {"input_ids": self.ids[indices], "labels": self.labels[indices]}


def generation_settings(settings: Any, seed: int, teacher: nn.Module) -> dict:
    """What the stored generations were made from: a change in any of it makes new ones."""
    return {**settings.model_dump(), "seed": seed, "teacher_checksum": teacher_checksum(teacher)}


def sequence_kd_set(
    run_dir: Path,
    settings: Any,
    teacher: nn.Module,
    train_set: Any,
    *,
    seed: int,
    accelerator: Any,
    tokenizer: Tokenizer | None = None,
    progress: Any = None,
) -> Dataset:
    """The teacher's generations for ``distill.sequence_kd``: read from ``run_dir/teacher_generations``
    when they were made with the same settings and teacher, else generated (main process) and written;
    with a ``prompts_file``, its prompts' answers (:func:`prompt_file_set`, which needs ``tokenizer``;
    ``progress(done, total)`` follows them)."""
    if settings.prompts_file is not None:
        if tokenizer is None:
            raise ConfigError("distill.sequence_kd.prompts_file needs the run's tokenizer (a text data set)")
        return prompt_file_set(
            run_dir, settings, teacher, tokenizer, seed=seed, accelerator=accelerator, progress=progress
        )
    folder = run_dir / GENERATIONS_DIR
    wanted = generation_settings(settings, seed, teacher)
    if accelerator.is_main_process and stored_settings(folder) != wanted:
        prompts = prompts_of(train_set, settings.samples, settings.prompt_tokens, seed)
        rows = teacher_generations(
            teacher.to(accelerator.device),
            prompts,
            settings.new_tokens,
            batch_size=settings.batch_size,
            temperature=settings.temperature,
            top_k=settings.top_k,
            seed=seed,
        )
        with writing(folder):
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "settings.json").unlink(missing_ok=True)  # written last: it marks a complete folder
            save_file({"input_ids": rows.ids.contiguous()}, str(folder / "generations.safetensors"))
            atomic_write_text(folder / "settings.json", dumps_json(wanted, indent=2))
    accelerator.wait_for_everyone()
    return GeneratedRows(
        load_file(str(folder / "generations.safetensors"))["input_ids"], settings.prompt_tokens
    )


def prompt_ids(path: str | Path, tokenizer: Tokenizer) -> list[list[int]]:
    """The token ids of each prompt of a prompt file (:func:`alambic.data.lm.read_prompts`), rendered with
    the chat template's generation prompt (:func:`alambic.data.lm.encode_prompt`)."""
    return [encode_prompt(row, tokenizer) for row in read_prompts(path)]


def stop_ids(tokenizer: Tokenizer) -> tuple[int, ...]:
    """The token an answer ends at: the tokenizer's EOS (ChatML's ``<|im_end|>`` for SmolLM2), if any."""
    return () if tokenizer.eos_id is None else (int(tokenizer.eos_id),)


def rouge_prompts(settings: Any, tokenizer: Tokenizer) -> tuple[list[list[int]], list[str], list[str]]:
    """``evaluate.rouge``'s prompts (token ids, with the generation prompt), reference answers and prompt
    texts (each row's last message, or its ``prompt``): the first ``max_prompts`` rows of its file, each of
    which must hold its answer (final assistant message or ``completion``), else a one-line DataError."""
    rows = read_prompts(settings.file)[: settings.max_prompts]
    missing = [number for number, row in enumerate(rows, start=1) if not row["reference"]]
    if missing:
        raise DataError(
            f"evaluate.rouge.file {settings.file}: row {missing[0]} has no reference answer; end each "
            'conversation with the assistant\'s answer (or give "completion")'
        )
    texts = [row["messages"][-1]["content"] if "messages" in row else row["prompt"] for row in rows]
    return [encode_prompt(row, tokenizer) for row in rows], [row["reference"] for row in rows], texts


def answer_rows(prompts: list[list[int]], answers: list[list[int]], tokenizer: Tokenizer) -> TokenRows:
    """Rows of prompt + answer, right-padded, the labels -100 on the prompt and the padding."""
    pairs = [
        (prompt + answer, [IGNORE_INDEX] * len(prompt) + answer) for prompt, answer in zip(prompts, answers)
    ]
    return pad_rows(pairs, tokenizer)


def prompt_file_set(
    run_dir: Path,
    settings: Any,
    teacher: nn.Module,
    tokenizer: Tokenizer,
    *,
    seed: int,
    accelerator: Any,
    progress: Any = None,
) -> TokenRows:
    """``distill.sequence_kd.prompts_file``: the teacher's answer to each prompt of the file (at most
    ``new_tokens`` tokens, ending at its EOS; ``temperature`` and ``top_k``, ``top_k: 1`` greedy), one
    prompt at a time, written once to ``run_dir/teacher_generations/`` and read back when the settings,
    the file's contents, the prompts' token ids (tokenizer and chat template) and the teacher are the same."""
    folder = run_dir / GENERATIONS_DIR
    prompts = prompt_ids(settings.prompts_file, tokenizer)
    text = read_text(settings.prompts_file).encode("utf-8")
    rendered = json.dumps(prompts).encode("utf-8")  # the ids: a new tokenizer or chat template changes them
    wanted = {
        key: value
        for key, value in generation_settings(settings, seed, teacher).items()
        if key not in ("samples", "prompt_tokens", "batch_size")  # the window prompts' settings
    } | {
        "prompts_sha256": hashlib.sha256(text).hexdigest(),
        "prompt_ids_sha256": hashlib.sha256(rendered).hexdigest(),
    }
    if accelerator.is_main_process and stored_settings(folder, ANSWERS_FILE) != wanted:
        answers = generate_answers(
            teacher.to(accelerator.device), prompts, settings.new_tokens, stop_ids=stop_ids(tokenizer),
            temperature=settings.temperature, top_k=settings.top_k,
            progress=progress, seed=seed,
        )  # fmt: skip
        rows = [prompt + answer for prompt, answer in zip(prompts, answers)]
        tensors = {
            "input_ids": torch.tensor([token for row in rows for token in row], dtype=torch.long),
            "lengths": torch.tensor([len(row) for row in rows], dtype=torch.long),
            "prompt_lengths": torch.tensor([len(prompt) for prompt in prompts], dtype=torch.long),
        }
        with writing(folder):
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "settings.json").unlink(missing_ok=True)  # written last: it marks a complete folder
            save_file(tensors, str(folder / ANSWERS_FILE))
            atomic_write_text(folder / "settings.json", dumps_json(wanted, indent=2))
    accelerator.wait_for_everyone()
    return answer_rows(*stored_answers(folder), tokenizer)


def stored_answers(folder: Path) -> tuple[list[list[int]], list[list[int]]]:
    """``(prompts, answers)`` of a prompt file's stored answers (``answers.safetensors``)."""
    tensors = load_file(str(folder / ANSWERS_FILE))
    rows = tensors["input_ids"].split(tensors["lengths"].tolist())
    prompt_lengths = tensors["prompt_lengths"].tolist()
    return (
        [row[:length].tolist() for row, length in zip(rows, prompt_lengths)],
        [row[length:].tolist() for row, length in zip(rows, prompt_lengths)],
    )


def stored_settings(folder: Path, data_file: str = "generations.safetensors") -> dict | None:
    """The settings of a complete generations folder (``settings.json`` beside ``data_file``), or None."""
    path = folder / "settings.json"
    if not (path.is_file() and (folder / data_file).is_file()):
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        return None


class PromptMasked(Dataset):
    """Token rows with their first ``prompt_tokens`` labels set to -100 (a prompt for on-policy KD)."""

    def __init__(self, dataset: Any, prompt_tokens: int) -> None:
        self.dataset, self.prompt_tokens = dataset, prompt_tokens

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return self.mask(self.dataset[index])

    def get_batch(self, indices: list[int]) -> dict[str, Tensor]:
        if hasattr(self.dataset, "get_batch"):
            return self.mask(self.dataset.get_batch(indices))
        return self.mask(default_collate([self.dataset[index] for index in indices]))

    def mask(self, row: dict[str, Tensor]) -> dict[str, Tensor]:
        labels = row["labels"].clone()
        labels[..., : self.prompt_tokens] = IGNORE_INDEX
        return {**row, "labels": labels}


def on_policy_data(train_set: Any, settings: Any) -> Any:
    """The distill stage's training set for ``distill.on_policy``: prompts marked when it sets
    ``prompt_tokens``, else the data's own (jsonl prompt / completion rows)."""
    if settings.prompt_tokens is None:
        return train_set
    return PromptMasked(train_set, settings.prompt_tokens)


def on_policy_loader(loader: Any, student: nn.Module, settings: Any, seed: int) -> OnPolicyBatches:
    """``loader`` whose batches are, with probability ``settings.mix``, completed by ``student``."""
    return OnPolicyBatches(loader, student, mix=settings.mix, temperature=settings.temperature, seed=seed)


def language_model_probe_set(config: Any, teacher: nn.Module, train_set: Any) -> Any:
    """What the pre-flight tries the distill terms on: one teacher generation of the full length
    (``distill.sequence_kd``: the teacher's and the student's context must hold prompt + new tokens),
    the prompt-marked windows (``distill.on_policy``), else None (the training set)."""
    distill = config.distill
    if config.evaluate.rouge is not None:  # read and rendered before the run directory exists
        rouge_prompts(config.evaluate.rouge, run_text_tokenizer(config))
    if distill.sequence_kd is not None and distill.sequence_kd.prompts_file is not None:
        return prompt_file_probe(config, teacher)
    if distill.sequence_kd is not None:
        settings = distill.sequence_kd
        prompts = prompts_of(train_set, 1, settings.prompt_tokens, config.seed)
        try:
            rows = teacher_generations(
                teacher, prompts, settings.new_tokens, top_k=settings.top_k, seed=config.seed
            )
        except (IndexError, RuntimeError) as error:  # positions past the model's context, mostly
            length = settings.prompt_tokens + settings.new_tokens
            raise ConfigError(
                f"distill.sequence_kd: the teacher cannot generate {length} tokens (prompt_tokens + "
                f"new_tokens): {str(error).splitlines()[0]}; fit them in its context"
            ) from error
        return GeneratedRows(rows.ids, settings.prompt_tokens)
    if distill.on_policy is not None:
        return on_policy_data(train_set, distill.on_policy)
    return None


def prompt_file_probe(config: Any, teacher: nn.Module) -> TokenRows:
    """The pre-flight's row for ``distill.sequence_kd.prompts_file``: the file read and rendered (a bad row
    or a tokenizer without a chat template fails here), and the teacher's ``new_tokens`` tokens after its
    longest prompt, without stopping (the teacher's and the student's context must hold them)."""
    settings = config.distill.sequence_kd
    tokenizer = run_text_tokenizer(config)
    longest = max(prompt_ids(settings.prompts_file, tokenizer), key=len)
    try:
        answer = generate_answers(teacher, [longest], settings.new_tokens, top_k=1)[0]
    except (IndexError, RuntimeError) as error:  # positions past the model's context, mostly
        raise ConfigError(
            f"distill.sequence_kd: the teacher cannot answer the longest prompt of {settings.prompts_file} "
            f"({len(longest)} tokens) with {settings.new_tokens} new tokens: {str(error).splitlines()[0]}; "
            "fit them in its context"
        ) from error
    return answer_rows([longest], [answer], tokenizer)


def run_text_tokenizer(config: Any) -> Tokenizer:
    """The run's tokenizer, loaded (``data.tokenizer``, else the ``hf:`` teacher's, else bytes), as
    :func:`alambic.run.building.run_tokenizer` names it (which this module cannot import: a cycle)."""
    spec = config.data.tokenizer or (hf_path(config.teacher.model.arch) if config.teacher else None)
    return load_tokenizer(spec or "bytes")
