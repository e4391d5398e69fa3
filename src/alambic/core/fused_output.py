"""The student's output projection fused with its token terms (``distill.fused_output``).

A causal LM's logits ``[B, T, V]`` at a 49k vocabulary are the largest tensors of a distillation step:
the student's logits, their gradient and the fp32 log-probabilities of ``lm_ce`` each weigh as much as
the teacher's logits (403 MB at 8 x 256 tokens). With ``fused_output`` the student runs its body only
(``model.base_model``: embeddings, layers, final norm) and every token term projects its last hidden
states through the output projection one chunk of tokens at a time
(:func:`~alambic.losses.token_chunks.fused_linear_token_loss`, :func:`fused_linear_cross_entropy`,
after Liger-Kernel, Hsu et al. 2024, arXiv:2410.10989): the student's whole logits never exist.

The price is compute: each token term projects its chunks again (the projection is about as costly as
a 10-layer student's body at 49k x 576), so ``lm_ce`` + ``forward_kl`` project twice, in the forward pass
and in the gradient. A live fp32 teacher that is a causal LM too, and whose logits only those terms read,
hands its last hidden states and output projection instead of its logits (``Teacher(...,
fused_output=True)``), so its ``[B, T, V]`` logits are made one chunk at a time as well.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from alambic.config.base import Term
from alambic.core.batches import call_model, is_output_field, output_options, read_output_field
from alambic.core.hooks import capture_features, unwrap_model
from alambic.errors import ConfigError
from alambic.losses import get_loss_spec
from alambic.losses.token_chunks import fused_linear_cross_entropy, fused_linear_token_loss

HIDDEN = "last_hidden_state"  # the key of the last hidden states in fused outputs
WEIGHT, BIAS = "output_weight", "output_bias"  # a fused teacher's output projection, beside its HIDDEN
# configs that scale or cap the logits after the projection (Gemma 2, Cohere, Granite): not fused
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")
FUSED_SETTING = "distill.fused_output"


def output_projection(model: nn.Module) -> tuple[nn.Module, Tensor, Tensor | None]:
    """``(body, weight [V, H], bias [V] or None)`` of a Hugging Face causal LM (a peft model's base model),
    or a one-line :class:`ConfigError` saying why its logits cannot be fused with its losses."""
    model = unwrap_model(model)
    if callable(getattr(model, "get_base_model", None)):  # a peft (LoRA) model: its adapted causal LM
        model = model.get_base_model()
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    body = getattr(model, "base_model", None)
    if not isinstance(head, nn.Linear) or not isinstance(body, nn.Module) or body is model:
        raise ConfigError(
            f"{FUSED_SETTING} computes the student's token losses from its last hidden states and output "
            f"projection, and this student ({type(model).__name__}) has none: it needs a Hugging Face "
            "*ForCausalLM (an nn.Linear output embedding and a base model); remove the setting"
        )
    config = getattr(model, "config", None)
    for name in LOGIT_TRANSFORMS:
        value = getattr(config, name, None)
        if value not in (None, 1, 1.0):
            raise ConfigError(
                f"{FUSED_SETTING}: the student's config sets {name}={value}, which transforms its logits "
                "after the output projection; the fused losses do not; remove the setting"
            )
    return body, head.weight, head.bias


def check_fused_terms(terms: Sequence[Term]) -> None:
    """Refuse, in one line, a term that reads the student's logits and cannot take them chunk by chunk."""
    for term in terms:
        sides = term.student if isinstance(term.student, list) else [term.student]
        if "logits" not in sides:
            continue
        spec = get_loss_spec(term.loss)
        fusable = spec.inputs == "tokens" and (spec.needs_teacher or term.loss == "lm_ce")
        if not fusable or spec.learned or spec.needs_epoch or spec.needs_index or spec.takes_mask:
            raise ConfigError(
                f"term {term.name!r} ({term.loss}) reads the student's logits, which {FUSED_SETTING} never "
                "makes whole: it fuses lm_ce and the token divergences (forward_kl, reverse_kl, jsd, tvd, "
                "skew_kl, skew_reverse_kl); remove the term or the setting"
            )
        if term.teacher != "logits" and spec.needs_teacher:
            raise ConfigError(
                f"term {term.name!r}: {FUSED_SETTING} compares the student's logits with the teacher's "
                f"logits, not {term.teacher!r}; remove 'teacher: {term.teacher}' or the setting"
            )


def teacher_fuses(model: nn.Module, terms: Sequence[Term]) -> bool:
    """Whether a teacher can hand its hidden states and projection instead of its logits: a causal LM whose
    logits are read only by token terms on the student's logits (the terms ``fused_output`` fuses)."""
    reading = [term for term in terms if get_loss_spec(term.loss).needs_teacher and term.teacher == "logits"]
    if not reading or any(
        term.student != "logits" or get_loss_spec(term.loss).inputs != "tokens" for term in reading
    ):
        return False
    try:
        output_projection(model)
    except ConfigError:
        return False
    return True


def fused_teacher_outputs(
    model: nn.Module, inputs: Any, paths: list[str], vocab_size: int | None
) -> dict[str, Tensor]:
    """``{HIDDEN, WEIGHT [V, H_t], BIAS (if any), path: feature}``: the teacher without its logits;
    ``vocab_size`` keeps the projection's first rows (a padded vocabulary)."""
    outputs = fused_student_outputs(model, inputs, paths, side="teacher")
    _, weight, bias = output_projection(model)
    outputs[WEIGHT] = weight[:vocab_size]
    if bias is not None:
        outputs[BIAS] = bias[:vocab_size]
    return outputs


def fused_student_outputs(
    model: nn.Module, inputs: Any, paths: list[str], *, side: str = "student"
) -> dict[str, Tensor]:
    """``{HIDDEN: [B, T, H], path: feature, ...}``: the model's body run without its output projection."""
    body, _, _ = output_projection(model)
    hooked = [path for path in paths if not is_output_field(path)]
    with capture_features(model, hooked, side=side) as features:
        output = call_model(body, inputs, **output_options(paths))
    mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
    fields = {path: read_output_field(output, path, mask) for path in paths if is_output_field(path)}
    hidden = output[HIDDEN] if isinstance(output, Mapping) else getattr(output, HIDDEN, None)
    if not isinstance(hidden, Tensor):
        raise ConfigError(
            f"{FUSED_SETTING}: the {side}'s base model returned no {HIDDEN}; remove the setting"
        )
    return {HIDDEN: hidden, **dict(features), **fields}


def fused_term_value(
    model: nn.Module, term: Term, student_outputs: dict, teacher_outputs: dict | None, labels: Tensor | None
) -> Tensor:
    """The unweighted value of a token term on the student's logits, computed one chunk at a time."""
    _, weight, bias = output_projection(model)
    params = dict(term.params)
    chunk_size, shift_labels = params.pop("chunk_size", None), params.pop("shift_labels", True)
    hidden = student_outputs[HIDDEN]
    if term.loss == "lm_ce":
        if labels is None:
            raise ValueError("lm_ce needs labels (token ids, -100 where a token does not count)")
        return fused_linear_cross_entropy(
            hidden, weight, labels, bias=bias, shift_labels=shift_labels, chunk_size=chunk_size
        )
    teacher = teacher_outputs or {}
    projected = WEIGHT in teacher  # the teacher's logits made one chunk at a time too
    return fused_linear_token_loss(
        hidden,
        weight,
        teacher[HIDDEN] if projected else teacher["logits"],
        loss=term.loss,
        params=params,
        bias=bias,
        teacher_weight=teacher.get(WEIGHT),
        teacher_bias=teacher.get(BIAS),
        labels=labels,
        shift_labels=shift_labels,
        chunk_size=chunk_size,
    )
