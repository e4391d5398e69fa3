"""How a run evaluates its models, by task: a classifier's accuracy and F1, or a language model's
held-out perplexity, next-token accuracy, bits per byte / character, KL to the teacher, generation speed
and fixed-prompt samples. The per-epoch evaluation of a stage and the final summary both come from here.

A causal-LM run evaluates at most ``evaluate.max_tokens`` held-out tokens (``evaluate.epoch_max_tokens``
per epoch): whole windows spread evenly over the held-out set (:func:`held_out_windows`), the same for
every model of one evaluation; KL to the teacher, bits per unit and the samples' prompts come from them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor, nn

from alambic.config import RunConfig
from alambic.core.batches import real_inputs
from alambic.core.evaluate import evaluate_classifier, profile_model
from alambic.core.evaluate_lm import answer_rouge, evaluate_causal_lm, generation_speed, sample_texts
from alambic.data.lm import TextBlocks, TokenRows
from alambic.data.loaders import make_loader
from alambic.errors import ConfigError
from alambic.models.lora import is_lora, trainable_parameters
from alambic.run.lm_distill import rouge_prompts, stop_ids

SAMPLE_PROMPTS = 3  # fixed prompts sampled from every model of a language-model run (report.md)
SAMPLE_PROMPT_TOKENS = 16
SAMPLE_NEW_TOKENS = 64
# evaluate.max_tokens / epoch_max_tokens "auto": at most 10^12 parameter-tokens (parameters of the largest
# model evaluated x tokens; a forward pass costs about 2 FLOPs per parameter and token, so about 2 TFLOPs a
# model: tens of seconds on one CPU core). Held-out sets of the packaged recipes (up to 111k tokens through
# models under 1M parameters: < 10^11) are evaluated whole; WikiText-2's 245k-token test file through a
# 135M-parameter model is cut to 7,434 tokens (58 windows of 128).
AUTO_PARAMETER_TOKENS = 10**12


def window_tokens(dataset: Any) -> Tensor | None:
    """``[W]`` the tokens each held-out window holds (padding not counted); None for another kind of set."""
    if isinstance(dataset, TextBlocks):
        return torch.full((len(dataset),), dataset.block_size, dtype=torch.long)
    if isinstance(dataset, TokenRows):
        mask = dataset.columns.get("attention_mask")
        if mask is not None:
            return mask.sum(1).long()
        return torch.full((len(dataset),), dataset.columns["input_ids"].shape[1], dtype=torch.long)
    return None


def held_out_windows(dataset: Any, max_tokens: int | str, parameters: int) -> tuple[Any, dict[str, Any]]:
    """The held-out windows an evaluation reads, and what ``summary.json`` says of them.

    ``max_tokens``: a number of tokens, ``"all"``, or ``"auto"`` (:data:`AUTO_PARAMETER_TOKENS` divided by
    ``parameters``, the largest evaluated model's). Of the ``W`` windows holding ``T`` tokens, ``k =
    max_tokens * W // T`` (at least 1) are kept: window ``(2i + 1) * W // (2k)`` for ``i < k``, the middle
    of each of ``k`` equal parts of the set. When every window fits, the set itself is returned (the same
    batches as without a budget)."""
    tokens = window_tokens(dataset)
    record: dict[str, Any] = {"max_tokens": max_tokens}
    if max_tokens == "auto":
        record["parameters"] = parameters
        budget = max(1, AUTO_PARAMETER_TOKENS // max(parameters, 1))
    else:
        budget = None if max_tokens == "all" else int(max_tokens)
    if tokens is None or not len(tokens):  # not a set of token windows: evaluated whole
        return dataset, {**record, "windows": len(dataset), "of_windows": len(dataset)}
    windows, total = len(tokens), int(tokens.sum())
    keep = windows if budget is None else min(windows, max(1, budget * windows // max(total, 1)))
    chosen = dataset
    if keep < windows:
        indices = torch.div((2 * torch.arange(keep) + 1) * windows, 2 * keep, rounding_mode="floor")  # [k]
        chosen, tokens = dataset.subset(indices), tokens[indices]
    record |= {"budget_tokens": budget, "windows": keep, "of_windows": windows, "tokens": int(tokens.sum()),
               "of_tokens": total, "rule": "the middle window of each of k equal parts of the held-out set"}  # fmt: skip
    return chosen, record


def parameter_count(*models: nn.Module) -> int:
    """The largest parameter count among ``models``."""
    return max((sum(p.numel() for p in model.parameters()) for model in models), default=0)


def evaluation_progress(progress: Any, label: str, unit: str) -> Callable[[int, int | None], None] | None:
    """``report(done, total)`` for the evaluation functions: forwards to ``progress.evaluation(label, done,
    total, unit)`` (the CLI's :class:`~alambic.console.ProgressBar`); None when ``progress`` has none."""
    report = getattr(progress, "evaluation", None)
    if report is None:
        return None
    return lambda done, total: report(label, done, total, unit)


def eval_loader(config: RunConfig, dataset: Any, accelerator: Accelerator) -> Any:
    """The prepared loader of a held-out set, in ``data.eval_batch_size`` batches."""
    loader = make_loader(
        dataset,
        batch_size=config.data.eval_batch_size,
        shuffle=False,
        dynamic_padding=config.data.dynamic_padding,
    )
    return accelerator.prepare(loader)


def stage_evaluator(
    config: RunConfig,
    dataset: Any,
    info: Any,
    accelerator: Accelerator,
    *,
    stage: str = "",
    progress: Any = None,
) -> Callable:
    """``evaluate(student) -> metrics`` for a stage's per-epoch evaluation on the held-out ``dataset``; a
    language model's on the windows ``evaluate.epoch_max_tokens`` keeps (chosen at the first evaluation,
    from the student's size)."""
    if config.task != "causal-lm":
        loader = eval_loader(config, dataset, accelerator)
        watch = evaluation_progress(progress, stage, "samples")
        return lambda model: evaluate_classifier(
            model, loader, num_classes=info.num_classes, accelerator=accelerator, progress=watch
        )
    chosen: dict[str, Any] = {}

    def evaluate(model: nn.Module) -> dict[str, Any]:
        if not chosen:
            windows, record = held_out_windows(
                dataset, config.evaluate.epoch_max_tokens, parameter_count(model)
            )
            chosen.update(windows=windows, loader=eval_loader(config, windows, accelerator), record=record)
        watch = evaluation_progress(progress, stage, "windows")
        return language_model_metrics(model, chosen["loader"], chosen["windows"], accelerator, progress=watch)

    return evaluate


def language_model_metrics(
    model: nn.Module,
    loader: Any,
    dataset: Any,
    accelerator: Accelerator,
    teacher: nn.Module | None = None,
    progress: Callable[[int, int | None], None] | None = None,
) -> dict[str, Any]:
    """Held-out loss, perplexity, next-token accuracy (also as ``accuracy``, which the loop shows), bits
    per byte or character (``bits_per_unit``, with ``unit``: the units ``dataset`` records its counted
    tokens to cover), and KL(teacher || student) with a teacher."""
    counts = getattr(dataset, "unit_counts", None)
    units = float(counts.sum()) if counts is not None else None
    metrics = evaluate_causal_lm(
        model, loader, accelerator=accelerator, teacher=teacher, units=units, progress=progress
    )
    if "bits_per_unit" in metrics:
        metrics["unit"] = getattr(dataset, "unit", None)
    return {**metrics, "accuracy": metrics["next_token_accuracy"]}


def summary_metrics(
    config: RunConfig,
    model: nn.Module,
    loader: Any,
    dataset: Any,
    info: Any,
    accelerator: Accelerator,
    example: Any,
    teacher: nn.Module | None,
    progress: Callable[[int, int | None], None] | None = None,
    rouge_progress: Callable[[int, int | None], None] | None = None,
) -> dict[str, Any]:
    """What ``summary.json`` holds for one model: its task's metrics, then its size and speed (main process);
    a language model's also its generation speed and its continuations of fixed prompts (same seed), the
    prompts from the windows evaluated (``dataset``: :func:`held_out_windows`)."""
    if config.task == "causal-lm":
        metrics = language_model_metrics(model, loader, dataset, accelerator, teacher, progress)
    else:
        metrics = evaluate_classifier(
            model, loader, num_classes=info.num_classes, accelerator=accelerator, progress=progress
        )
        # a class absent from the test split has no accuracy: null, not NaN, keeps the JSON strict
        metrics["per_class_accuracy"] = [None if v != v else v for v in metrics["per_class_accuracy"]]
    if not accelerator.is_main_process:
        return metrics
    evaluation = config.evaluate
    profile = profile_model(
        model.to("cpu"),
        example,
        batch_sizes=tuple(evaluation.batch_sizes),
        repeats=evaluation.latency_repeats,
        threads=evaluation.latency_threads,
    )
    if is_lora(model):  # parameters counts the frozen weights and the adapters; these alone trained
        profile["trainable_parameters"] = trainable_parameters(model)[0]
    if config.task == "causal-lm":
        prompts = example_prompts(dataset)
        threads = evaluation.latency_threads or 1
        window = context_length(model)
        speed = generation_speed(
            model, prompts[:1], new_tokens=SAMPLE_NEW_TOKENS, threads=threads, max_context=window
        )
        continuations = sample_texts(
            model, prompts, new_tokens=SAMPLE_NEW_TOKENS, seed=config.seed, max_context=window
        )
        samples = [
            {"prompt": decode(info, prompt.tolist()), "continuation": decode(info, ids)}
            for prompt, ids in zip(prompts, continuations)
        ]
        profile = {**profile, "generation": speed, "samples": samples}
        if evaluation.rouge is not None:
            rouge = rouge_record(evaluation.rouge, model, info, window, rouge_progress)
            profile = {**profile, "rouge_l": rouge["rouge_l"], "rouge": rouge}
    return {**metrics, **profile}


ROUGE_REFERENCE = "the file's answers"  # what evaluate.rouge scores answers against, named in summary.json


def rouge_record(
    settings: Any,
    model: nn.Module,
    info: Any,
    max_context: int | None,
    progress: Callable[[int, int | None], None] | None = None,
) -> dict[str, Any]:
    """``summary.json``'s ``rouge`` of one model: ROUGE-L of its greedy answers to ``evaluate.rouge``'s
    prompts against the file's answers (:func:`alambic.core.evaluate_lm.answer_rouge`), and which file;
    ``progress(done, total)`` follows the prompts answered."""
    tokenizer = getattr(info, "tokenizer", None)
    if tokenizer is None:
        raise ConfigError("evaluate.rouge reads text prompts and needs the run's tokenizer (a text data set)")
    prompts, references, texts = rouge_prompts(settings, tokenizer)
    result = answer_rouge(
        model,
        prompts,
        references,
        tokenizer.decode,
        new_tokens=settings.new_tokens,
        stop_ids=stop_ids(tokenizer),
        max_context=max_context,
        samples=settings.samples,
        progress=progress,
    )
    for answer, text in zip(result["answers"], texts):  # the question, not the whole rendered template
        answer["prompt"] = text
    return {"file": settings.file, "reference": ROUGE_REFERENCE, **result}


def example_prompts(dataset: Any) -> Any:
    """The first tokens of held-out rows spread over the set: the fixed prompts every model continues."""
    rows = real_inputs(dataset, SAMPLE_PROMPTS)["input_ids"]  # [P, T]
    return rows[:, :SAMPLE_PROMPT_TOKENS]


def context_length(model: nn.Module) -> int | None:
    """The longest sequence a Hugging Face model's positions allow (``max_position_embeddings`` /
    ``n_positions``); None when it does not say."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions"):
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    return None


def decode(info: Any, ids: list[int]) -> Any:
    """Token ids as text with the run's tokenizer (the ids themselves when there is none, as for llama2.c)."""
    tokenizer = getattr(info, "tokenizer", None)
    return tokenizer.decode(ids) if tokenizer is not None else ids
