"""The language-model part of ``report.md``: held-out perplexity and its companions, the share of the
teacher's lead the distilled student won back, fixed-prompt samples side by side, and (``evaluate.rouge``)
each model's ROUGE-L with its greedy answers beside the reference answers."""

from __future__ import annotations

from typing import Any

from alambic.run.numbers import MISSING, is_number


def language_model_lines(models: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """A table per model and a line on the gap closed, for a run whose task is ``causal-lm``."""
    unit = next((model.get("unit") for _, model in models if model.get("unit")), None)
    bits = f"bits / {unit}" if unit else "bits / unit"
    lines = [
        "## Language model",
        "",
        f"| Model | Perplexity | Loss (nats) | {bits} | Next-token acc. (%) | KL(teacher ‖ model) | Tokens/s (batch 1) | ms / token |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, model in models:
        speed = model.get("generation") or {}
        lines.append(
            f"| {name} | {_cell(model.get('perplexity'), '.3f')} | {_cell(model.get('loss'), '.4f')} | "
            f"{_cell(model.get('bits_per_unit'), '.4f')} | {_cell(model.get('next_token_accuracy'), '.2f', 100)} | "
            f"{_cell(model.get('kl_to_teacher'), '.4f')} | {_cell(speed.get('tokens_per_s'), '.0f')} | "
            f"{_cell(speed.get('ms_per_token'), '.2f')} |"
        )
    lines += [
        "",
        "On the held-out text: loss and perplexity of the next token, KL of the model's next-token "
        "distribution from the teacher's (temperature 1), greedy generation with the key/value cache.",
    ]
    gap = gap_closed(dict(models))
    if gap is not None:
        lines += [
            "",
            f"- The distilled student closes **{100 * gap:.1f}%** of the gap in held-out loss between the "
            "student trained alone (baseline) and the teacher.",
        ]
    return lines


def gap_closed(models: dict[str, dict[str, Any]]) -> float | None:
    """``(baseline loss - distilled loss) / (baseline loss - teacher loss)``; None without the three or
    when the teacher is not better than the baseline."""
    losses = [models.get(name, {}).get("loss") for name in ("teacher", "baseline", "distilled")]
    if not all(is_number(loss) for loss in losses) or not losses[1] > losses[0]:
        return None
    teacher, baseline, distilled = losses
    return (baseline - distilled) / (baseline - teacher)


def sample_lines(models: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """Each model's continuation of the same prompts (same seed), prompt by prompt."""
    sampled = [(name, model["samples"]) for name, model in models if model.get("samples")]
    if not sampled:
        return answer_lines(models)
    lines = ["## Samples", "", "Every model continues the same held-out prompts with the same seed.", ""]
    for index, sample in enumerate(sampled[0][1]):
        lines += [f"**Prompt {index + 1}:** `{_inline(sample['prompt'])}`", ""]
        for name, samples in sampled:
            if index < len(samples):
                lines.append(f"- {name}: `{_inline(samples[index]['continuation'])}`")
        lines.append("")
    answers = answer_lines(models)
    return lines + answers if answers else lines


def answer_lines(models: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """``evaluate.rouge``: each model's ROUGE-L and its greedy answers beside the reference, prompt by prompt."""
    scored = [(name, model["rouge"]) for name, model in models if isinstance(model.get("rouge"), dict)]
    if not scored:
        return []
    first = scored[0][1]
    lines = [
        "## Answers (ROUGE-L)",
        "",
        f"Greedy answers to {first.get('prompts')} held-out prompts of `{first.get('file')}` (at most "
        f"{first.get('new_tokens')} tokens, stopping at EOS), scored against {first.get('reference')} by "
        "ROUGE-L F-measure (Lin 2004; x 100, as MiniLLM and DistiLLM report it).",
        "",
        "| Model | ROUGE-L |",
        "|---|---|",
        *(f"| {name} | {_cell(rouge.get('rouge_l'), '.2f', 100)} |" for name, rouge in scored),
        "",
    ]
    for index, sample in enumerate(first.get("answers") or []):
        lines += [f"**Prompt {index + 1}:** `{_inline(sample['prompt'])}`", ""]
        lines.append(f"- reference: `{_inline(sample['reference'])}`")
        for name, rouge in scored:
            shown = rouge.get("answers") or []
            if index < len(shown):
                lines.append(
                    f"- {name} ({_cell(shown[index].get('rouge_l'), '.1f', 100)}): `{_inline(shown[index]['answer'])}`"
                )
        lines.append("")
    return lines


def _inline(text: Any) -> str:
    """Text for one markdown code span: newlines shown as ⏎, backticks made plain."""
    return str(text).replace("\n", "⏎").replace("`", "'")


def _cell(value: Any, spec: str, scale: float = 1.0) -> str:
    return format(value * scale, spec) if is_number(value) else MISSING
