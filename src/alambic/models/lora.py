"""LoRA students: a model's weights frozen, low-rank adapters on chosen linear layers trained.

Hu et al. 2021, LoRA: Low-Rank Adaptation of Large Language Models, https://arxiv.org/abs/2106.09685:
a frozen weight ``W [out, in]`` gets an update ``(alpha / r) * B A`` with ``A [r, in]`` and ``B [out, r]``,
``B`` starting at zero, so the adapted model starts exactly as the model it adapts. The adapters come from
Hugging Face ``peft`` (an optional extra: ``pip install alambic[lora]``), imported inside these functions.

Example:
    >>> student, _ = derive_student(teacher, layers=2)            # initialised from a larger model
    >>> student = with_lora(student, r=8, alpha=16, target_modules=["q_proj", "v_proj"])
    >>> trainable_parameters(student)                              # (adapters, everything)
    (4096, 1234567)
    >>> distill(teacher, student, loader, terms=[{"loss": "forward_kl"}])
    >>> merge_lora(student).save_pretrained("student-hf")         # a plain model again
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from torch import nn

from alambic.errors import ConfigError, first_line
from alambic.imports import require

ALL_LINEAR = "all-linear"  # peft's name for every linear layer but the output head


def with_lora(
    model: nn.Module,
    *,
    r: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    target_modules: Sequence[str] | str | None = None,
) -> nn.Module:
    """``model`` with LoRA adapters of rank ``r`` on ``target_modules``; only the adapters train.

    Args:
        model: any ``nn.Module`` (a Hugging Face causal LM or classifier, or a model of your own with named
            ``nn.Linear`` layers); the adapters are inserted into it in place.
        r: the adapters' rank.
        alpha: their scale is ``alpha / r``.
        dropout: dropout on the adapters' input while training.
        target_modules: names (or name endings) of the linear layers to adapt, ``"all-linear"``, or None
            for peft's default for the model's type (``q_proj`` and ``v_proj`` for Llama, ``c_attn`` for
            GPT-2); a model of your own needs them named.

    Returns:
        A ``peft`` model: it is called as ``model`` was, module paths gain the prefix ``base_model.model.``,
        and :func:`merge_lora` folds the adapters back into plain weights. A Hugging Face classifier's head
        also trains (peft's ``SEQ_CLS`` task).
    """
    peft = require("peft", "lora", purpose="LoRA students")
    if r < 1 or alpha <= 0 or not 0 <= dropout < 1:
        raise ConfigError(f"LoRA needs r >= 1, alpha > 0 and 0 <= dropout < 1; got {r}, {alpha}, {dropout}")
    targets = (
        target_modules if target_modules is None or isinstance(target_modules, str) else list(target_modules)
    )
    config = peft.LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        task_type=_task_type(model),
    )
    try:
        return peft.get_peft_model(model, config)
    except ValueError as error:  # unknown target names, or no default for the model's type
        raise ConfigError(
            f"cannot add LoRA adapters to {type(model).__name__}: {first_line(error).rstrip('.')}; set lora.target_modules "
            f"to names of its linear layers (q_proj, v_proj, ...) or {ALL_LINEAR!r}"
        ) from None


def _task_type(model: nn.Module) -> str | None:
    """peft's task for a Hugging Face model: ``CAUSAL_LM`` (generation), ``SEQ_CLS`` (its head trains too)."""
    name = type(model).__name__
    if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
        return "CAUSAL_LM"
    if name.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    return None


def is_lora(model: nn.Module) -> bool:
    """Whether ``model`` carries LoRA adapters (a ``peft`` model); False when peft was never imported."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def merge_lora(model: nn.Module) -> nn.Module:
    """The plain model with the adapters folded into its weights (peft's ``merge_and_unload``), loadable
    by ``from_pretrained`` once saved; any other model is returned as it is. ``model`` is used up."""
    return model.merge_and_unload() if is_lora(model) else model


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts: the adapters (and any head that trains) against everything."""
    trainable = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
    return trainable, sum(parameter.numel() for parameter in model.parameters())
