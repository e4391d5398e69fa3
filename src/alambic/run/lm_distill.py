"""The distill stage of a causal-LM run as sequence-level or on-policy KD (``distill.sequence_kd``,
``distill.on_policy``), over :mod:`alambic.core.llm`.

- Sequence-level KD (Kim & Rush 2016): the teacher continues prompts taken from the training windows;
  its generations are written once to ``RUN/teacher_generations/`` (``generations.safetensors``, the
  token ids ``[N, P + M]``, and ``settings.json``: the settings, the seed and the teacher's checksum)
  and read back on resume. The distilled student trains on them instead of the training windows; the
  baseline does not (it is the student without a teacher, on the training data).
- On-policy KD (GKD, Agarwal et al. 2024): the distill stage's loader is wrapped in
  :class:`~alambic.core.llm.OnPolicyBatches`; text windows get their first ``prompt_tokens`` labels
  masked so that the rest of each window is the completion the student samples.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.data import Dataset, default_collate

from alambic.core.cache import teacher_checksum
from alambic.core.checkpoint import atomic_write_text
from alambic.core.llm import IGNORE_INDEX, OnPolicyBatches, teacher_generations
from alambic.errors import ConfigError
from alambic.files import dumps_json, writing

GENERATIONS_DIR = "teacher_generations"


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
    run_dir: Path, settings: Any, teacher: nn.Module, train_set: Any, *, seed: int, accelerator: Any
) -> GeneratedRows:
    """The teacher's generations for ``distill.sequence_kd``: read from ``run_dir/teacher_generations``
    when they were made with the same settings and teacher, else generated (main process) and written."""
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
