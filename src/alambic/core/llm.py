"""Sequence-level and on-policy distillation for causal language models.

Batches are dicts of ``input_ids`` ``[B, T]`` and ``labels`` (the HF convention: aligned with the
inputs, ``-100`` on prompt and padding tokens). The prompt of a row is its leading ``-100`` labels.

- Sequence-level KD (Kim & Rush 2016): the student learns from the teacher's own generations:
  :func:`teacher_generations` builds that data set from prompts; train on it with ``lm_ce``.
- On-policy distillation (GKD, Agarwal et al. 2024): :class:`OnPolicyBatches` wraps a loader; with
  probability ``mix`` (GKD's lambda) a batch's completions are replaced by the *student's* samples
  from the same prompts, which the teacher then scores through the usual token terms (``jsd``,
  ``reverse_kl``, ...). ``mix = 0`` is plain supervised KD, ``mix = 1`` fully on-policy.
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from alambic.core.batches import call_model, logits_of
from alambic.errors import ConfigError
from alambic.models.lora import is_lora

IGNORE_INDEX = -100


@torch.no_grad()
def sample_tokens(
    model: nn.Module,
    prompt_ids: Tensor,
    new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    max_context: int | None = None,
    stop_ids: tuple[int, ...] = (),
) -> Tensor:
    """Continue ``prompt_ids [B, P]`` by ``new_tokens`` sampled tokens -> ``[B, P + new_tokens]``, or fewer
    once every row has drawn one of ``stop_ids`` (an end-of-sequence token; a row that stopped earlier than
    others goes on, so cut each row after its first stop id: :func:`generate_answers` does at batch 1).

    The model runs in eval mode (its mode is restored); ``top_k=1`` is greedy decoding. A model whose
    forward takes a key/value cache (every Hugging Face causal LM, see :func:`cache_argument`) reads the
    prompt once, then one token per step through its cache; other models, and sequences longer than
    ``max_context``, recompute the whole (cropped) prefix for every token. Both paths sample with the
    same code from ``generator``, so greedy tokens are the same, and a seed gives the same samples up to
    float rounding. Not Hugging Face's ``generate``: it stops at the end-of-sequence token (rows here have
    exactly ``new_tokens``), draws from the global RNG, and applies the checkpoint's own
    ``generation_config`` (top_p, repetition penalty), which would change the distribution sampled.

    Example:
        >>> ids = sample_tokens(model, torch.tensor([[1]]), 32, top_k=1)  # doctest: +SKIP
    """
    if temperature <= 0:
        raise ConfigError(f"sampling temperature must be > 0, got {temperature} (use top_k=1 for greedy)")
    was_training = model.training
    model.eval()
    try:
        fits = max_context is None or prompt_ids.shape[1] + new_tokens <= max_context
        argument = cache_argument(model) if fits else None
        ids, cache = prompt_ids, None
        stopped = torch.zeros(len(prompt_ids), dtype=torch.bool)  # [B]
        for _ in range(new_tokens):
            if argument is not None:  # the prompt at the first step, then only the last token
                step = ids if cache is None else ids[:, -1:]
                output = model(input_ids=step, **{argument: cache}, use_cache=True)
                cache = _cache_of(output)
                if cache is None:  # it returned no cache after all: recompute the prefix from the next step
                    argument = None
            else:
                context = ids if max_context is None else ids[:, -max_context:]
                output = call_model(model, {"input_ids": context})
            next_ids = _choose(logits_of(output)[:, -1], temperature, top_k, generator)  # [B, 1]
            ids = torch.cat([ids, next_ids.to(ids.device)], dim=1)
            if stop_ids:
                stopped |= torch.isin(next_ids[:, 0].cpu(), torch.tensor(stop_ids))
                if bool(stopped.all()):
                    break
        return ids
    finally:
        model.train(was_training)


CACHE_ARGUMENTS = ("cache", "past_key_values")  # transformers 5 renames past_key_values to cache


def cache_argument(model: nn.Module) -> str | None:
    """The key/value cache argument of ``model``'s forward (``cache`` or ``past_key_values``, taken with
    ``use_cache``), or None when it has none. A LoRA model's forward passes its keyword arguments on to the
    model it adapts, whose signature says."""
    forward = model.get_base_model().forward if is_lora(model) else model.forward
    try:
        parameters = inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return None
    if "use_cache" not in parameters:
        return None
    return next((name for name in CACHE_ARGUMENTS if name in parameters), None)


def _cache_of(output: Any) -> Any:
    for name in CACHE_ARGUMENTS:
        cache = output.get(name) if isinstance(output, dict) else getattr(output, name, None)
        if cache is not None:
            return cache
    return None


def _choose(
    logits: Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None
) -> Tensor:
    """One token per row from ``logits [B, V]`` at ``temperature``, among the ``top_k`` best -> ``[B, 1]``."""
    logits = logits.float() / temperature
    if top_k is not None:
        threshold = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    probabilities = torch.softmax(logits, dim=-1)
    return torch.multinomial(probabilities.cpu(), 1, generator=generator)


def prompt_length(labels: Tensor) -> int:
    """The number of leading ``-100`` labels, which must be the same for every row of the batch."""
    counted = labels != IGNORE_INDEX  # [B, T]
    first = torch.where(
        counted.any(1),
        counted.float().argmax(1),
        torch.full_like(counted[:, 0], labels.shape[1], dtype=torch.long),
    )
    if (first != first[0]).any():
        raise ConfigError(
            f"on-policy batches need one prompt length per batch, got {sorted(set(first.tolist()))}; "
            "bucket the data by prompt length or left-pad the prompts"
        )
    return int(first[0])


class OnPolicyBatches:
    """A loader whose batches are, with probability ``mix``, completed by the student itself (GKD).

    Example:
        >>> loader = OnPolicyBatches(loader, student, mix=0.5)
        >>> distill(teacher, student, loader, terms=[{"loss": "jsd", "params": {"beta": 0.5}}])
    """

    def __init__(
        self, loader: Any, student: nn.Module, *, mix: float = 0.5, temperature: float = 1.0, seed: int = 0
    ) -> None:
        if not 0.0 <= mix <= 1.0:
            raise ConfigError(f"mix (GKD's lambda) must be in [0, 1], got {mix}")
        self.loader, self.student, self.mix, self.temperature, self.seed = (
            loader,
            student,
            mix,
            temperature,
            seed,
        )
        self.epoch = 0
        self.dataset = getattr(loader, "dataset", None)
        self.sampler = getattr(loader, "sampler", None)

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.loader, "set_epoch"):
            self.loader.set_epoch(epoch)
        elif hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[dict]:
        choice = random.Random(
            self.seed * 100_003 + self.epoch
        )  # which batches go on-policy: seeded per epoch
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        for batch in self.loader:
            yield self.on_policy(batch, generator) if choice.random() < self.mix else batch

    def on_policy(self, batch: dict, generator: torch.Generator | None = None) -> dict:
        """The batch with every completion replaced by the student's sample from the same prompt."""
        device = next(self.student.parameters()).device
        ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
        prompt = prompt_length(labels)
        if prompt == 0:
            raise ConfigError("on-policy distillation needs prompts: mark them with -100 labels")
        sampled = sample_tokens(
            self.student,
            ids[:, :prompt],
            ids.shape[1] - prompt,
            temperature=self.temperature,
            generator=generator,
        )
        new_labels = sampled.clone()
        new_labels[:, :prompt] = IGNORE_INDEX
        rest = {k: v for k, v in batch.items() if k not in ("input_ids", "labels", "attention_mask")}
        return {
            **rest,
            "input_ids": sampled,
            "labels": new_labels,
            "attention_mask": torch.ones_like(sampled),
        }


def generate_answers(
    model: nn.Module,
    prompts: list[list[int]],
    new_tokens: int,
    *,
    stop_ids: tuple[int, ...] = (),
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
    max_context: int | None = None,
    progress: Any = None,
) -> list[list[int]]:
    """Each prompt's answer: at most ``new_tokens`` tokens, ending at the first of ``stop_ids`` (kept) ->
    one id list per prompt, the prompt not repeated. Prompts of any lengths are answered one by one, in
    order, from one generator seeded with ``seed`` (batch 1: no padding enters the model, so an answer is
    the same whatever the other prompts; ``top_k=1`` is greedy). ``progress(done, total)`` at 0 and after each.

    Example:
        >>> answers = generate_answers(teacher, [tokenizer.chat_ids(messages, add_generation_prompt=True)],
        ...                            64, stop_ids=(tokenizer.eos_id,), top_k=1)  # doctest: +SKIP
    """
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    answers = []
    if progress is not None:
        progress(0, len(prompts))
    for done, prompt in enumerate(prompts, start=1):
        ids = sample_tokens(
            model, torch.tensor([prompt], dtype=torch.long, device=device), new_tokens,
            temperature=temperature, top_k=top_k, generator=generator, max_context=max_context,
            stop_ids=stop_ids,
        )[0, len(prompt) :].tolist()  # fmt: skip
        stops = [index for index, token in enumerate(ids) if token in stop_ids]
        answers.append(ids[: stops[0] + 1] if stops else ids)
        if progress is not None:
            progress(done, len(prompts))
    return answers


class _Rows(torch.utils.data.Dataset):
    def __init__(self, ids: Tensor, labels: Tensor) -> None:
        self.ids, self.labels = ids, labels

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        return {"input_ids": self.ids[index], "labels": self.labels[index]}


def teacher_generations(
    teacher: nn.Module,
    prompt_ids: Tensor,
    new_tokens: int,
    *,
    batch_size: int = 64,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
) -> torch.utils.data.Dataset:
    """Sequence-level KD data: the teacher's continuations of ``prompt_ids [N, P]``, prompts masked in the labels.

    Example:
        >>> data = teacher_generations(teacher, prompts, new_tokens=64)
        >>> distill(None, student, DataLoader(data, batch_size=32, shuffle=True), terms=[{"loss": "lm_ce"}])
    """
    generator = torch.Generator().manual_seed(seed)
    device = next(teacher.parameters()).device
    pieces = [
        sample_tokens(
            teacher, prompt_ids[start : start + batch_size].to(device), new_tokens,
            temperature=temperature, top_k=top_k, generator=generator,
        ).cpu()
        for start in range(0, len(prompt_ids), batch_size)
    ]  # fmt: skip
    ids = torch.cat(pieces)
    labels = ids.clone()
    labels[:, : prompt_ids.shape[1]] = IGNORE_INDEX
    return _Rows(ids, labels)
