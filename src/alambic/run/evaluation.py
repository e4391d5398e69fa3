"""How a run evaluates its models, by task: a classifier's accuracy and F1, or a language model's
held-out perplexity, next-token accuracy, bits per byte / character, KL to the teacher, generation speed
and fixed-prompt samples. The per-epoch evaluation of a stage and the final summary both come from here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from accelerate import Accelerator
from torch import nn

from alambic.config import RunConfig
from alambic.core.batches import real_inputs
from alambic.core.evaluate import evaluate_classifier, profile_model
from alambic.core.evaluate_lm import evaluate_causal_lm, generation_speed, sample_texts
from alambic.models.lora import is_lora, trainable_parameters

SAMPLE_PROMPTS = 3  # fixed prompts sampled from every model of a language-model run (report.md)
SAMPLE_PROMPT_TOKENS = 16
SAMPLE_NEW_TOKENS = 64


def stage_evaluator(
    config: RunConfig, loader: Any, dataset: Any, info: Any, accelerator: Accelerator
) -> Callable:
    """``evaluate(student) -> metrics`` for a stage's per-epoch evaluation on the prepared ``loader`` (of
    ``dataset``)."""
    if config.task == "causal-lm":
        return lambda model: language_model_metrics(model, loader, dataset, accelerator)
    return lambda model: evaluate_classifier(
        model, loader, num_classes=info.num_classes, accelerator=accelerator
    )


def language_model_metrics(
    model: nn.Module, loader: Any, dataset: Any, accelerator: Accelerator, teacher: nn.Module | None = None
) -> dict[str, Any]:
    """Held-out loss, perplexity, next-token accuracy (also as ``accuracy``, which the loop shows), bits
    per byte or character (``bits_per_unit``, with ``unit``: the units ``dataset`` records its counted
    tokens to cover), and KL(teacher || student) with a teacher."""
    counts = getattr(dataset, "unit_counts", None)
    units = float(counts.sum()) if counts is not None else None
    metrics = evaluate_causal_lm(model, loader, accelerator=accelerator, teacher=teacher, units=units)
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
) -> dict[str, Any]:
    """What ``summary.json`` holds for one model: its task's metrics, then its size and speed (main process);
    a language model's also its generation speed and its continuations of fixed prompts (same seed)."""
    if config.task == "causal-lm":
        metrics = language_model_metrics(model, loader, dataset, accelerator, teacher)
    else:
        metrics = evaluate_classifier(model, loader, num_classes=info.num_classes, accelerator=accelerator)
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
    return {**metrics, **profile}


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
