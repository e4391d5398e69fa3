"""Several teachers as one: averaged soft targets (output fusion) or averaged parameters (weight fusion).

An :class:`EnsembleModel` is an ordinary ``nn.Module``, so the frozen :class:`alambic.core.distiller.Teacher`
wraps it like any other teacher and every logit loss (``kd``, ``dkd``, ``dist``, ...) distills from it.
Its ``logits`` are ``T * log(p_avg)`` with ``p_avg = sum_k w_k softmax(z_k / T)``, so that
``softmax(logits / T) = p_avg`` exactly: a ``kd`` term at the same ``T`` sees the stated average of the
teachers' softened probabilities. Its submodule ``members`` returns every teacher's raw logits
``[B, K, C]``, which a term reads through the usual hooks (``teacher: members``), e.g. the
``ensemble_kd`` loss, which also weights teachers by their correctness on each sample's label.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from alambic.core.batches import call_model, logits_of
from alambic.errors import ConfigError
from alambic.losses.ensemble import ensemble_probabilities, fixed_weights


class _Members(nn.Module):
    """Every member's logits stacked ``[B, K, C]`` (the hook path ``members`` of an ensemble)."""

    def __init__(self, models: Sequence[nn.Module]) -> None:
        super().__init__()
        self.models = nn.ModuleList(models)

    def forward(self, inputs) -> Tensor:
        outputs = [logits_of(call_model(model, inputs)) for model in self.models]
        shapes = {tuple(output.shape) for output in outputs}
        if len(shapes) != 1:
            raise ConfigError(
                f"ensemble members predict different shapes {sorted(shapes)}; give them one class count"
            )
        return torch.stack(outputs, dim=1)  # [B, K, C]


class EnsembleModel(nn.Module):
    """Teachers fused by their outputs: ``forward`` returns ``T * log(p_avg)`` (see the module docstring).

    Example:
        >>> teacher = Teacher(EnsembleModel([teacher_a, teacher_b], temperature=4.0), terms)
        >>> student = distill(EnsembleModel([teacher_a, teacher_b], temperature=4.0), student, loader)
    """

    def __init__(
        self,
        models: Sequence[nn.Module],
        *,
        temperature: float = 1.0,
        weighting: str = "fixed",
        weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if len(models) < 2:
            raise ConfigError(f"an ensemble needs at least two teachers, got {len(models)}")
        if not temperature > 0:
            raise ConfigError(f"ensemble temperature must be > 0, got {temperature}")
        if weighting == "correct":
            raise ConfigError(
                "weighting 'correct' needs each sample's label, which the teacher never sees: keep the "
                "ensemble's weighting fixed and use the term {loss: ensemble_kd, teacher: members, "
                "params: {weighting: correct}}"
            )
        fixed_weights(weights, len(models))  # checked now, not at the first batch
        self.members = _Members(models)
        self.temperature, self.weighting, self.weights = float(temperature), weighting, weights

    def forward(self, inputs) -> Tensor:
        member_logits = self.members(inputs)  # [B, K, C]
        probabilities = ensemble_probabilities(
            member_logits, temperature=self.temperature, weighting=self.weighting, weights=self.weights
        )
        return self.temperature * probabilities.clamp_min(1e-12).log()  # [B, C]


def average_weights(models: Sequence[nn.Module], weights: Sequence[float] | None = None) -> nn.Module:
    """One model whose parameters and buffers are the (weighted) average of ``models``' (same architecture).

    Averaging works when the models share their initialisation and stay in one basin (Wortsman et al.
    2022, "model soups", arXiv:2203.05482); independently initialised networks usually average badly.
    Integer buffers (BatchNorm's step counter) are taken from the first model.

    Example:
        >>> fused = average_weights([teacher_a, teacher_b])
        >>> student = distill(fused, student, loader)
    """
    if len(models) < 2:
        raise ConfigError(f"averaging weights needs at least two models, got {len(models)}")
    coefficients = fixed_weights(weights, len(models))
    states = [model.state_dict() for model in models]
    fused = copy.deepcopy(models[0])
    averaged = {}
    for key, value in states[0].items():
        others = [state.get(key) for state in states[1:]]
        if any(other is None or other.shape != value.shape for other in others):
            raise ConfigError(
                f"cannot average weights: {key!r} is missing or differs in shape between the models; "
                "weight fusion needs one architecture (use output fusion otherwise)"
            )
        if not value.is_floating_point():
            averaged[key] = value.clone()
            continue
        # on the first model's device: members trained on a GPU and members loaded from files can meet
        stacked = torch.stack([state[key].float().to(value.device) for state in states])  # [K, ...]
        weight = coefficients.to(value.device).view(-1, *([1] * value.dim()))
        averaged[key] = (weight * stacked).sum(dim=0).to(value.dtype)
    fused.load_state_dict(averaged)
    return fused
