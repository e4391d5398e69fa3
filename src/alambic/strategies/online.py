"""Students that teach each other or themselves: Deep Mutual Learning and "Be Your Own Teacher".

Both are trainable modules with the :class:`alambic.core.distiller.Distiller` interface (``forward`` returns
named, weighted losses and ``total``; ``check``; ``student``), so the one loop in
:func:`alambic.core.loop.fit` trains them, with its logging, checkpoints and resume. No teacher is given to
the loop: the targets come from inside the module, detached.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from torch import Tensor, nn

from alambic.config.base import Term
from alambic.core.api import as_terms, train_settings
from alambic.core.api import train_module as core_train_module
from alambic.core.batches import call_model, logits_of
from alambic.core.distiller import Distiller
from alambic.core.hooks import capture_features
from alambic.core.optim import make_accelerator
from alambic.errors import ConfigError, first_line
from alambic.losses import get_loss, get_loss_spec

DML_TERMS = (Term(loss="ce", weight=1.0), Term(loss="kd", weight=1.0, params={"temperature": 1.0}))


class _TeacherFreeModule(nn.Module):
    """A trainable module that brings its own targets (:class:`~alambic.core.trainable.Trainable`)."""

    needs_teacher = False
    needs_probe = False
    has_token_terms = False

    def build_modules(
        self, inputs: Any, teacher: Any, num_samples: int | None = None, sample_index: Any = None
    ) -> None:
        """Nothing to size from a probing pass: every part is built in ``__init__``."""

    @torch.no_grad()
    def check(
        self, inputs: Any, labels: Tensor | None, teacher: Any, sample_index: Tensor | None = None
    ) -> None:
        """Run every term once on a real batch before step 0: one-line errors instead of a failure at step 1."""
        if labels is None:
            raise ConfigError(f"{type(self).__name__} trains on labels, but the batches carry none")
        was_training = self.training
        self.eval()
        try:
            losses = self(inputs, labels, None, 1.0, sample_index)
        except (ValueError, RuntimeError, KeyError, TypeError, IndexError) as error:
            message = first_line(error)
            raise ConfigError(f"{type(self).__name__} fails on the first batch: {message}") from error
        finally:
            self.train(was_training)
        if losses["total"].dim() != 0:
            raise ConfigError(f"{type(self).__name__}: the total loss is not a scalar")


class MutualDistiller(_TeacherFreeModule):
    """Peers trained together: each peer's teacher terms compare it with every *other* peer's current outputs.

    Deep Mutual Learning (Zhang et al. 2018, arXiv:1706.00384): peer ``k`` minimises its own terms, where a
    term that needs a teacher (``kd``, ``dkd``, ``dist``, ...) is averaged over the other peers' logits of
    the same batch, detached, i.e. ``L_k = CE(z_k, y) + 1/(K-1) sum_{j != k} KL(p_j || p_k)`` with the
    default terms. By default all peers step together on one optimizer: each loss reaches only its own
    peer, so the sum's gradient is every peer's own gradient, and all see the outputs of the step's
    forward pass. ``alternate=True`` updates one peer per step, in turn (peer ``step mod K``), against
    the others' current outputs, as Zhang et al.'s Algorithm 1 and "implicit" online KD alternate: only
    that peer's losses enter ``total``, so the other peers get no gradient and the optimizer (which
    skips parameters without one) leaves them, their momentum and weight decay untouched; every
    peer's terms are still logged. The turn is a buffer, so a resumed run continues with the right peer.
    Online KD with a still-training teacher is the two-peer case with asymmetric terms: ``peer_terms``
    gives peer ``k`` its own list (e.g. the teacher on ``ce`` alone).

    Example:
        >>> module = MutualDistiller([student, peer])
        >>> losses = module(images, labels, None)   # peer0/ce, peer0/kd, peer1/ce, peer1/kd, total
    """

    def __init__(
        self,
        peers: Sequence[nn.Module],
        terms: Sequence[Term] = DML_TERMS,
        peer_terms: Sequence[Sequence[Term] | None] | None = None,
        alternate: bool = False,
    ) -> None:
        super().__init__()
        self.alternate = alternate
        self.register_buffer("turn", torch.zeros((), dtype=torch.long))  # steps taken, for alternate
        self._turn: int | None = None  # host copy of the buffer, so choosing a peer needs no device sync
        if len(peers) < 2:
            raise ConfigError(f"mutual learning needs at least two peers, got {len(peers)}")
        if peer_terms is not None and len(peer_terms) != len(peers):
            raise ConfigError(f"peer_terms must give one list per peer ({len(peers)}), got {len(peer_terms)}")
        chosen = [list(peer_terms[k] if peer_terms and peer_terms[k] else terms) for k in range(len(peers))]
        for term in (term for peer in chosen for term in peer):
            spec = get_loss_spec(term.loss)
            if spec.learned or term.student != "logits" or term.teacher != "logits":
                raise ConfigError(
                    f"mutual learning compares the peers' logits; term {term.name!r} compares "
                    f"{term.student!r} with {term.teacher!r}{' and is learned' if spec.learned else ''}"
                )
        self.distillers = nn.ModuleList(
            Distiller(peer, peer_terms_k) for peer, peer_terms_k in zip(peers, chosen)
        )

    @property
    def peers(self) -> list[nn.Module]:
        return [distiller.student for distiller in self.distillers]

    @property
    def student(self) -> nn.Module:
        """Peer 0: the model the run exports as its student."""
        return self.distillers[0].student

    def forward(
        self,
        inputs: Any,
        labels: Tensor | None,
        teacher_outputs: dict | None = None,
        epoch: float | None = None,
        sample_index: Tensor | None = None,
        token_scale: Tensor | None = None,
    ) -> dict[str, Tensor]:
        outputs = [distiller.student_outputs(inputs) for distiller in self.distillers]
        losses: dict[str, Tensor] = {}
        for k, distiller in enumerate(self.distillers):
            others = [{"logits": outputs[j]["logits"].detach()} for j in range(len(outputs)) if j != k]
            for index, term in enumerate(distiller.terms):
                targets = others if get_loss_spec(term.loss).needs_teacher else [None]
                values = [
                    distiller.term_value(index, outputs[k], target, labels, epoch, sample_index)
                    for target in targets
                ]
                losses[f"peer{k}/{term.name}"] = term.weight * torch.stack(values).mean()
        if not (self.alternate and self.training):
            losses["total"] = torch.stack(list(losses.values())).sum()
            return losses
        if self._turn is None:
            self._turn = int(self.turn)  # once, after a resume has loaded the buffer
        active = f"peer{self._turn % len(self.distillers)}/"
        losses["total"] = torch.stack(
            [value for name, value in losses.items() if name.startswith(active)]
        ).sum()
        losses = {name: value if name.startswith(active) or name == "total" else value.detach()
                  for name, value in losses.items()}  # fmt: skip
        self._turn += 1
        self.turn.fill_(self._turn)
        return losses


def _exit_head(shape: tuple[int, ...], num_classes: int, path: str) -> nn.Module:
    """A classifier on an intermediate feature: a linear layer on a vector, pooled first on a feature map."""
    if len(shape) == 2:
        return nn.Linear(shape[1], num_classes)
    if len(shape) == 4:
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(shape[1], num_classes))
    raise ConfigError(
        f"exit {path!r}: an exit reads a vector [B, D] or a feature map [B, C, H, W], got {shape}"
    )


class SelfDistiller(_TeacherFreeModule):
    """Be Your Own Teacher (Zhang et al. 2019, arXiv:1905.08094): shallow exits distilled from the deepest.

    A classifier head is put on each named intermediate module (``exits``, module paths read by hooks;
    the model is not edited). The deepest exit (the model's own output) trains on ``terms`` (teacher-free,
    default ``ce``); each shallow exit on ``(1 - kd_weight) * CE + kd_weight * kd(exit, deepest, T)``,
    the deepest output detached. BYOT's heads are bottleneck convolutions and it adds an L2 hint between
    features; here a head is pooling + one linear layer and there is no hint. The heads are trained and
    checkpointed with the student, never part of it.

    Example:
        >>> module = SelfDistiller(model, ["hidden.0", "hidden.1"], example_input=images[:1])
        >>> student = train_teacher_free(module, loader, epochs=10)   # without the heads
    """

    def __init__(
        self,
        student: nn.Module,
        exits: Sequence[str],
        *,
        example_input: Any,
        terms: Sequence[Term] = (Term(loss="ce"),),
        temperature: float = 3.0,
        kd_weight: float = 0.5,
    ) -> None:
        super().__init__()
        if not exits:
            raise ConfigError("self-distillation needs at least one exit (an intermediate module path)")
        if not 0.0 <= kd_weight <= 1.0 or not temperature > 0:
            raise ConfigError(
                f"kd_weight must be in [0, 1] and temperature > 0, got {kd_weight}, {temperature}"
            )
        for term in terms:
            if get_loss_spec(term.loss).needs_teacher or term.student != "logits":
                raise ConfigError(
                    f"the deepest exit trains on teacher-free logit terms (ce); got {term.name!r}"
                )
        self.student, self.exit_paths = student, list(exits)
        self.terms, self.temperature, self.kd_weight = list(terms), float(temperature), float(kd_weight)
        was_training = student.training
        student.eval()
        with torch.no_grad(), capture_features(student, self.exit_paths, side="student") as features:
            num_classes = logits_of(call_model(student, example_input)).shape[-1]
            shapes = {path: tuple(features[path].shape) for path in self.exit_paths}
        student.train(was_training)
        self.exits = nn.ModuleList(_exit_head(shapes[path], num_classes, path) for path in self.exit_paths)

    def forward(
        self,
        inputs: Any,
        labels: Tensor | None,
        teacher_outputs: dict | None = None,
        epoch: float | None = None,
        sample_index: Tensor | None = None,
        token_scale: Tensor | None = None,
    ) -> dict[str, Tensor]:
        with capture_features(self.student, self.exit_paths, side="student") as features:
            logits = logits_of(call_model(self.student, inputs))  # [B, C], the deepest exit
        losses = {
            term.name: term.weight * get_loss(term.loss)(logits, None, labels=labels, **term.params)
            for term in self.terms
        }
        target = logits.detach()
        kd = get_loss("kd")
        for path, head in zip(self.exit_paths, self.exits):
            exit_logits = head(features[path])  # [B, C]
            losses[f"exit:{path}/ce"] = (1.0 - self.kd_weight) * F.cross_entropy(exit_logits, labels)
            losses[f"exit:{path}/kd"] = self.kd_weight * kd(exit_logits, target, temperature=self.temperature)
        losses["total"] = torch.stack(list(losses.values())).sum()
        return losses


def train_teacher_free(
    module: nn.Module,
    train_loader: Any,
    *,
    epochs: int = 1,
    eval_loader: Any = None,
    num_classes: int | None = None,
    run_dir: str | Path | None = None,
    seed: int | None = 0,
    **train: Any,
) -> nn.Module:
    """Train a module that brings its own targets (:class:`MutualDistiller`, :class:`SelfDistiller`) with the
    one loop, no teacher given.

    ``train`` takes the settings of :class:`alambic.config.TrainConfig` (``optimizer``, ``lr``, ...);
    ``run_dir`` keeps ``metrics.jsonl`` and resumable checkpoints. Returns the module's ``student``.

    Example:
        >>> student = train_teacher_free(SelfDistiller(model, ["hidden.0"], example_input=x[:1]), loader, epochs=5)
    """
    settings = train_settings(epochs=epochs, **train)
    if seed is not None:
        set_seed(seed)
    accelerator = make_accelerator("no")
    accelerator.gradient_accumulation_steps = settings.grad_accum
    return core_train_module(
        module,
        train_loader,
        settings.loop(),
        accelerator=accelerator,
        eval_loader=eval_loader,
        num_classes=num_classes,
        run_dir=run_dir,
    )


def mutual_learning(
    peers: Sequence[nn.Module],
    train_loader: Any,
    *,
    terms: Sequence[Term | dict] | None = None,
    peer_terms: Sequence[Sequence[Term | dict] | None] | None = None,
    alternate: bool = False,
    **train: Any,
) -> list[nn.Module]:
    """Train ``peers`` together, each distilled from the others' current outputs (Deep Mutual Learning).

    Args:
        peers: two or more models predicting the same classes; they are trained in place.
        train_loader: yields ``(inputs, labels)`` (or dicts with ``labels``).
        terms: every peer's terms (default ``ce + kd(T=1)``, the paper's); teacher terms average over
            the other peers' detached logits.
        peer_terms: one list per peer (None entries take ``terms``): online KD with a still-training
            teacher is ``peer_terms=[None, [{"loss": "ce"}]]`` (the teacher learns from labels only).
        alternate: update one peer per step, in turn, instead of all together (see :class:`MutualDistiller`).
        **train: ``epochs``, ``eval_loader``, ``num_classes``, ``run_dir``, ``seed`` and the settings of
            :class:`alambic.config.TrainConfig`, as :func:`train_teacher_free` takes them.

    Example:
        >>> student, peer = mutual_learning([student, peer], loader, epochs=10, optimizer="adamw", lr=1e-3)
    """
    chosen_terms = as_terms(terms) if terms is not None else list(DML_TERMS)
    chosen_peer_terms = (
        [as_terms(item) if item is not None else None for item in peer_terms]
        if peer_terms is not None
        else None
    )
    module = MutualDistiller(peers, chosen_terms, chosen_peer_terms, alternate=alternate)
    train_teacher_free(module, train_loader, **train)
    return module.peers


def train_module(*args: Any, **kwargs: Any) -> nn.Module:
    """Deprecated: the old name of :func:`train_teacher_free` (alambic 0.1's README showed it), kept so that
    code written for it still runs; it clashed with :func:`alambic.train_module` (the one loop for every
    module), a different function.

    Example:
        >>> student = train_module(SelfDistiller(model, ["layer1"], example_input=x[:1]), loader)  # warns
    """
    warnings.warn(
        "alambic.strategies.online.train_module is deprecated: call train_teacher_free (same arguments)",
        DeprecationWarning,
        stacklevel=2,
    )
    return train_teacher_free(*args, **kwargs)
