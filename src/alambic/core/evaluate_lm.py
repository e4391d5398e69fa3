"""Causal language-model metrics: next-token loss, perplexity, accuracy, bits per unit, KL to a teacher,
generation speed, and fixed-seed samples for a report.

Batches follow the Hugging Face convention of :mod:`alambic.core.llm`: dicts of ``input_ids`` ``[B, T]``,
an optional ``attention_mask`` and ``labels`` aligned with the inputs (``-100`` where a token does not
count); the prediction at position ``t`` scores ``labels[t + 1]``. Sums are kept per row in float64 and
added up over the whole set, so every mean is over tokens, whatever the batch sizes and padding rows.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import islice
from typing import Any

import torch
import torch.nn.functional as F
from accelerate.utils import send_to_device
from torch import Tensor, nn

from alambic.core.batches import call_model, logits_of, model_device, split_batch
from alambic.core.evaluate import EvalMode, pinned_threads, rows_of, synchronize
from alambic.core.llm import generate_answers, sample_tokens
from alambic.core.rouge import rouge_l
from alambic.errors import AlambicError
from alambic.losses.token_chunks import CHUNK_LOGITS, counted_positions

UNITS_KEY = "units"  # optional batch key: per row, the units (bytes, characters) its counted tokens cover
SUMS = ("nll", "correct", "tokens", "kl", "units")  # per-row sums, in this order


def token_sums(logits: Tensor, labels: Tensor, teacher_logits: Tensor | None = None) -> Tensor:
    """Per-row float64 sums ``[B, 4]``: next-token negative log-likelihood (nats), correct argmax
    predictions, counted tokens, and ``KL(teacher || student)`` (0 without a teacher).

    The counted positions are gathered and scored in fp32 chunks of about 2^21 logits, so a large
    vocabulary never holds a second ``[B, T, V]`` fp32 copy of the logits.

    Args:
        logits: Student logits ``[B, T, V]``; position ``t`` predicts ``labels[t + 1]``.
        labels: ``[B, T]`` token ids, ``-100`` where a token does not count.
        teacher_logits: The teacher's logits ``[B, T, V]`` on the same inputs, or None.
    """
    rows, positions = counted_positions(logits.shape, labels, shift_labels=True)  # [N], [N]
    targets = labels[rows, positions + 1]  # [N]
    sums = torch.zeros(logits.shape[0], 4, dtype=torch.float64, device=logits.device)  # [B, 4]
    step = max(1, CHUNK_LOGITS // logits.shape[-1])
    for start in range(0, len(rows), step):
        chunk_rows, chunk_positions = rows[start : start + step], positions[start : start + step]
        log_p_s = F.log_softmax(logits[chunk_rows, chunk_positions].float(), dim=-1)  # [n, V]
        chunk_targets = targets[start : start + step]  # [n]
        per_token = torch.stack(
            [
                -log_p_s.gather(1, chunk_targets[:, None])[:, 0],  # nll [n]
                (log_p_s.argmax(-1) == chunk_targets).float(),  # correct [n]
                torch.ones_like(chunk_targets, dtype=torch.float32),  # tokens [n]
                torch.zeros_like(chunk_targets, dtype=torch.float32),  # kl [n]
            ],
            dim=1,
        ).double()  # [n, 4]
        if teacher_logits is not None:
            log_p_t = F.log_softmax(teacher_logits[chunk_rows, chunk_positions].float(), dim=-1)  # [n, V]
            per_token[:, 3] = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1).double()
        sums.index_add_(0, chunk_rows, per_token)
    return sums


def _batch_sums(model: nn.Module, teacher: nn.Module | None, batch: Any, device: torch.device) -> Tensor:
    """One batch's per-row sums ``[B, 5]`` (:data:`SUMS`), on ``device``."""
    batch = send_to_device(batch, device)
    units = batch.get(UNITS_KEY) if isinstance(batch, Mapping) else None
    if units is not None:
        batch = {key: value for key, value in batch.items() if key != UNITS_KEY}
    inputs, labels = split_batch(batch)
    if labels is None:
        raise AlambicError(
            "language-model evaluation batches need labels: a dict with 'input_ids' and 'labels' "
            "(-100 where a token does not count)"
        )
    logits = logits_of(call_model(model, inputs))  # [B, T, V]
    if logits.ndim != 3 or tuple(logits.shape[:2]) != tuple(labels.shape):
        raise AlambicError(
            f"expected logits [batch, tokens, vocabulary] matching labels {tuple(labels.shape)}, got "
            f"{tuple(logits.shape)}; evaluate_causal_lm scores one label per token"
        )
    teacher_logits = None
    if teacher is not None:
        teacher_output = call_model(teacher, send_to_device(inputs, model_device(teacher)))
        teacher_logits = logits_of(teacher_output).to(logits.device)  # [B, T, V]
        if teacher_logits.shape != logits.shape:
            raise AlambicError(
                f"the teacher's logits are {tuple(teacher_logits.shape)} and the student's "
                f"{tuple(logits.shape)}; kl_to_teacher needs one vocabulary (same tokenizer)"
            )
    sums = token_sums(logits, labels.long(), teacher_logits)  # [B, 4]
    row_units = torch.zeros(len(sums), 1, dtype=torch.float64, device=sums.device)  # [B, 1]
    if units is not None:
        row_units[:, 0] = torch.as_tensor(units, device=sums.device).reshape(-1).double()
    return torch.cat([sums, row_units], dim=1)  # [B, 5]


def evaluate_causal_lm(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    accelerator: Any = None,
    teacher: nn.Module | None = None,
    units_per_token: float | None = None,
    units: float | None = None,
    max_batches: int | None = None,
    progress: Callable[[int, int | None], None] | None = None,
) -> dict[str, Any]:
    """Next-token loss, perplexity and accuracy of a causal LM over a loader (and its KL to a teacher).

    The model (and the teacher) run in eval mode under ``torch.inference_mode()``, their modes restored
    after. Each row's sums are kept in float64; with an ``accelerate.Accelerator`` (loader and model
    from ``accelerator.prepare``) they are collected with ``gather_for_metrics``, so the numbers cover
    the whole set across processes and rows duplicated to pad the last batch are dropped.

    Bits per unit (bits per byte or per character, comparable across tokenizers) need the number of
    units the counted tokens cover: ``units_per_token`` (1 for byte and character tokenizers), or
    ``units`` (the total for the tokens evaluated), or else a ``units`` key in the batches (per row).

    Args:
        model: Maps ``input_ids`` (and ``attention_mask``) to logits ``[B, T, V]`` (a tensor, or an
            output with ``logits``).
        loader: Yields dicts with ``input_ids``, ``labels`` (aligned with the inputs, ``-100`` ignored)
            and optionally ``attention_mask`` and ``units``; or ``(input_ids, labels)`` pairs.
        accelerator: Optional ``accelerate.Accelerator``; batches go to ``accelerator.device``.
        teacher: A model with the same vocabulary; adds ``kl_to_teacher``.
        units_per_token: Units (bytes, characters) per counted token, for ``bits_per_unit``.
        units: Total units covered by the counted tokens, for ``bits_per_unit``.
        max_batches: Evaluate only the first ``max_batches`` batches (of each process).
        progress: Called before the first batch and after each with the rows (windows) evaluated so
            far and the loader's data set's length (None when it has none).

    Returns:
        ``{"loss", "perplexity", "next_token_accuracy", "tokens"}``: mean cross-entropy in nats over
        counted tokens, ``exp(loss)``, the fraction whose argmax is the label, and their count; plus
        ``"kl_to_teacher"`` (mean ``KL(p_teacher || p_student)`` at temperature 1, nats) with a teacher,
        and ``"bits_per_unit"`` (``loss / ln 2 * tokens / units``) and ``"units"`` when units are known.

    Example:
        >>> metrics = evaluate_causal_lm(student, test_loader, teacher=teacher, units_per_token=1)
        >>> print(f"ppl {metrics['perplexity']:.2f}, {metrics['bits_per_unit']:.3f} bits per byte")
    """
    if units_per_token is not None and units is not None:
        raise AlambicError("give units_per_token or units (the total), not both")
    for name, value in (("units_per_token", units_per_token), ("units", units), ("max_batches", max_batches)):
        if value is not None and value <= 0:
            raise AlambicError(f"{name} must be > 0, got {value}")
    device = accelerator.device if accelerator is not None else model_device(model)
    totals = torch.zeros(len(SUMS), dtype=torch.float64)
    batches = rows = 0
    total_rows = rows_of(loader)
    if progress is not None:
        progress(0, total_rows)
    teacher_mode = EvalMode(teacher if teacher is not None else nn.Identity())
    with EvalMode(model), teacher_mode, torch.inference_mode():
        for batch in islice(loader, max_batches):
            sums = _batch_sums(model, teacher, batch, device)  # [B, 5]
            if accelerator is not None:
                sums = accelerator.gather_for_metrics(sums)
            totals += sums.cpu().sum(0)
            batches, rows = batches + 1, rows + len(sums)
            if progress is not None:
                progress(rows, total_rows)
    if batches == 0:
        raise AlambicError("the evaluation loader yielded no batches; check the test split is not empty")
    return _metrics_of(totals, teacher is not None, units_per_token, units)


def _metrics_of(
    totals: Tensor, with_teacher: bool, units_per_token: float | None, units: float | None
) -> dict[str, Any]:
    """:func:`evaluate_causal_lm`'s metrics from the set's summed :data:`SUMS`."""
    nll, correct, tokens, kl, batch_units = totals.tolist()
    if tokens == 0:
        raise AlambicError("no token counted: every label is -100; check how the labels are built")
    loss = nll / tokens
    metrics: dict[str, Any] = {
        "loss": loss,
        "perplexity": math.exp(loss) if loss < 700 else math.inf,
        "next_token_accuracy": correct / tokens,
        "tokens": int(tokens),
    }
    if with_teacher:
        metrics["kl_to_teacher"] = kl / tokens
    total_units = tokens * units_per_token if units_per_token is not None else units or batch_units
    if total_units > 0:
        metrics["bits_per_unit"] = nll / math.log(2) / total_units
        metrics["units"] = total_units
    return metrics


def _prompt_rows(prompt_ids: Tensor | Sequence[Sequence[int]]) -> list[Tensor]:
    """Prompts as a list of ``[1, P]`` rows (a 1-D tensor is one prompt; rows may differ in length)."""
    if isinstance(prompt_ids, Tensor) and prompt_ids.ndim == 1:
        prompt_ids = prompt_ids[None]
    rows = [torch.as_tensor(row, dtype=torch.long).reshape(1, -1) for row in prompt_ids]
    if not rows or any(row.shape[1] == 0 for row in rows):
        raise AlambicError("give at least one prompt of at least one token")
    return rows


def generation_speed(
    model: nn.Module,
    prompt_ids: Tensor | Sequence[int],
    *,
    new_tokens: int = 64,
    repeats: int = 3,
    warmup: int = 1,
    threads: int | None = 1,
    max_context: int | None = None,
) -> dict[str, Any]:
    """Decoding speed at batch 1: greedy :func:`~alambic.core.llm.sample_tokens` (through the model's
    key/value cache when it has one), timed with ``time.perf_counter``, median over ``repeats`` after
    ``warmup`` untimed runs. The time covers reading the prompt and generating ``new_tokens`` tokens,
    so a short prompt makes it the decoding speed. CPU intra-op threads are pinned to ``threads`` while
    timing (None keeps the current number), as :func:`~alambic.core.evaluate.measure_latency` does.

    Args:
        model: A causal LM on its device (prompts are moved there).
        prompt_ids: One prompt, ``[P]`` or ``[1, P]`` (the first row of a larger batch).
        new_tokens: Tokens generated per run.
        repeats: Timed runs.
        warmup: Untimed runs first.
        threads: CPU intra-op threads during the runs.
        max_context: The model's context length, when prompt + new tokens may exceed it.

    Returns:
        ``{"tokens_per_s", "ms_per_token", "new_tokens", "prompt_tokens", "repeats", "device", "threads"}``.

    Example:
        >>> generation_speed(student, torch.tensor([1, 42, 7]), new_tokens=64)["tokens_per_s"]
    """
    if new_tokens < 1 or repeats < 1 or warmup < 0 or (threads is not None and threads < 1):
        raise ValueError(
            f"need new_tokens >= 1, repeats >= 1, warmup >= 0, threads None or >= 1; got new_tokens="
            f"{new_tokens}, repeats={repeats}, warmup={warmup}, threads={threads}"
        )
    device = model_device(model)
    prompt = _prompt_rows(prompt_ids)[0].to(device)  # [1, P]
    seconds: list[float] = []
    with pinned_threads(threads) as used_threads:
        for run in range(warmup + repeats):
            synchronize(device)
            start = time.perf_counter()
            sample_tokens(model, prompt, new_tokens, top_k=1, max_context=max_context)
            synchronize(device)
            if run >= warmup:
                seconds.append(time.perf_counter() - start)
    median_s = statistics.median(seconds)
    return {
        "tokens_per_s": new_tokens / median_s,
        "ms_per_token": median_s * 1000.0 / new_tokens,
        "new_tokens": new_tokens,
        "prompt_tokens": int(prompt.shape[1]),
        "repeats": repeats,
        "device": str(device),
        "threads": used_threads,
    }


def sample_texts(
    model: nn.Module,
    prompt_ids: Tensor | Sequence[Sequence[int]],
    *,
    new_tokens: int,
    seed: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    max_context: int | None = None,
) -> list[list[int]]:
    """Continuations of fixed prompts from a fixed seed, for a report: teacher and students given the
    same prompts and seed draw from the same random stream, so their samples differ only by the model.

    Each prompt is continued on its own (batch 1, so rows may differ in length and no padding enters the
    model), in order, from one ``torch.Generator`` seeded with ``seed``.

    Args:
        model: A causal LM on its device.
        prompt_ids: Prompts: ``[N, P]`` or ``[P]`` tensor, or a list of token-id lists.
        new_tokens: Tokens generated per prompt.
        seed: Seed of the sampling generator.
        temperature: Sampling temperature (> 0).
        top_k: Sample among the ``top_k`` best tokens (1 is greedy); None samples the whole vocabulary.
        max_context: The model's context length, when prompt + new tokens may exceed it.

    Returns:
        One list of ``new_tokens`` generated token ids per prompt (the prompt not repeated).

    Example:
        >>> [tokenizer.decode(ids) for ids in sample_texts(student, prompts, new_tokens=100, seed=0)]
    """
    generator = torch.Generator().manual_seed(seed)
    device = model_device(model)
    samples = []
    for prompt in _prompt_rows(prompt_ids):
        ids = sample_tokens(
            model,
            prompt.to(device),
            new_tokens,
            temperature=temperature,
            top_k=top_k,
            generator=generator,
            max_context=max_context,
        )  # [1, P + new_tokens]
        samples.append(ids[0, prompt.shape[1] :].tolist())
    return samples


def answer_rouge(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    references: Sequence[str],
    decode: Callable[[list[int]], str],
    *,
    new_tokens: int,
    stop_ids: tuple[int, ...] = (),
    max_context: int | None = None,
    samples: int = 3,
    progress: Callable[[int, int | None], None] | None = None,
) -> dict[str, Any]:
    """ROUGE-L of a model's greedy answers against reference answers (MiniLLM's and DistiLLM's protocol:
    greedy decoding on held-out prompts, the mean ROUGE-L F-measure of :mod:`alambic.core.rouge`).

    Each prompt is answered on its own (:func:`~alambic.core.llm.generate_answers`, batch 1), in at most
    ``new_tokens`` tokens ending at the first of ``stop_ids``, which is not decoded.

    Args:
        model: A causal LM on its device.
        prompts: Token ids of each prompt (a chat prompt ends with the template's generation prompt).
        references: One reference answer per prompt.
        decode: Token ids to text (the run's tokenizer).
        new_tokens: Most tokens an answer may take.
        stop_ids: Tokens that end an answer (the tokenizer's EOS).
        max_context: The model's context length, when prompt + new tokens may exceed it.
        samples: How many of the first answers to return whole.
        progress: Called with the prompts answered so far and their number.

    Returns:
        ``{"rouge_l": mean F, "prompts": N, "new_tokens", "decoding": "greedy", "answers": [{"prompt",
        "reference", "answer", "rouge_l"}, ...]}`` (the first ``samples`` answers).

    Example:
        >>> answer_rouge(student, prompts, references, tokenizer.decode, new_tokens=64, stop_ids=(2,))["rouge_l"]
    """
    if len(prompts) != len(references) or not prompts:
        raise AlambicError(
            f"give one reference per prompt, got {len(prompts)} prompts, {len(references)} references"
        )
    answers = generate_answers(
        model, [list(prompt) for prompt in prompts], new_tokens, stop_ids=stop_ids, top_k=1,
        max_context=max_context, progress=progress,
    )  # fmt: skip
    texts = [
        decode(answer[:-1] if answer and answer[-1] in stop_ids else answer).strip() for answer in answers
    ]
    scores = [rouge_l(text, reference)["f"] for text, reference in zip(texts, references)]
    shown = [
        {"prompt": decode(list(prompt)), "reference": reference, "answer": text, "rouge_l": score}
        for prompt, reference, text, score in islice(zip(prompts, references, texts, scores), samples)
    ]
    return {
        "rouge_l": sum(scores) / len(scores),
        "prompts": len(prompts),
        "new_tokens": new_tokens,
        "decoding": "greedy",
        "answers": shown,
    }
