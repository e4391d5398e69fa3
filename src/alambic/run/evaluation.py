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
from alambic.core.evaluate import evaluate_classifier, profile_model
from alambic.core.evaluate_lm import evaluate_causal_lm, generation_speed, sample_texts

SAMPLE_PROMPTS = 3  # fixed prompts sampled from every model of a language-model run (report.md)
SAMPLE_PROMPT_TOKENS = 16
SAMPLE_NEW_TOKENS = 64


def stage_evaluator(config: RunConfig, loader: Any, info: Any, accelerator: Accelerator) -> Callable:
    """``evaluate(student) -> metrics`` for a stage's per-epoch evaluation on the prepared ``loader``."""
    if config.task == "causal-lm":
        return lambda model: language_model_metrics(model, loader, info, accelerator)
    return lambda model: evaluate_classifier(
        model, loader, num_classes=info.num_classes, accelerator=accelerator
    )


def language_model_metrics(
    model: nn.Module, loader: Any, info: Any, accelerator: Accelerator, teacher: nn.Module | None = None
) -> dict[str, Any]:
    """Held-out loss, perplexity, next-token accuracy (also as ``accuracy``, which the loop shows), bits
    per unit of the tokenizer when it has one (byte, character), and KL(teacher || student) with a teacher."""
    metrics = evaluate_causal_lm(
        model,
        loader,
        accelerator=accelerator,
        teacher=teacher,
        units_per_token=getattr(info, "units_per_token", None),
    )
    return {**metrics, "accuracy": metrics["next_token_accuracy"]}


def summary_metrics(
    config: RunConfig,
    model: nn.Module,
    loader: Any,
    info: Any,
    accelerator: Accelerator,
    example: Any,
    teacher: nn.Module | None,
) -> dict[str, Any]:
    """What ``summary.json`` holds for one model: its task's metrics, then its size and speed (main process)."""
    if config.task == "causal-lm":
        metrics = language_model_metrics(model, loader, info, accelerator, teacher)
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
    if config.task == "causal-lm":
        prompts = example_prompts(loader)
        speed = generation_speed(
            model, prompts[:1], new_tokens=SAMPLE_NEW_TOKENS, threads=evaluation.latency_threads or 1
        )
        samples = sample_texts(model, prompts, new_tokens=SAMPLE_NEW_TOKENS, seed=config.seed)
        profile = {**profile, "generation": speed, "samples": samples}
    return {**metrics, **profile}


def example_prompts(loader: Any) -> Any:
    """The first tokens of the first held-out rows: the fixed prompts every model continues."""
    batch = next(iter(loader))
    ids = batch["input_ids"] if isinstance(batch, dict) else batch[0]["input_ids"]
    return ids[:SAMPLE_PROMPTS, :SAMPLE_PROMPT_TOKENS].cpu()
