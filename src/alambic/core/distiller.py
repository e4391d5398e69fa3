"""The distillation setup: a frozen teacher, a trainable module (student + connectors), and terms.

The teacher is never a submodule of the trainable module, so the optimizer, DDP and checkpoints see
only what trains.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from alambic.config.base import Term
from alambic.core.batches import (  # noqa: F401  (split_batch re-exported)
    call_model,
    is_output_field,
    logits_of,
    output_options,
    read_output_field,
    split_batch,
)
from alambic.core.connectors import make_connector
from alambic.core.fused_output import (
    HIDDEN,
    WEIGHT,
    check_fused_terms,
    fused_student_outputs,
    fused_teacher_outputs,
    fused_term_value,
    output_projection,
    teacher_fuses,
)
from alambic.core.hooks import capture_features, unwrap_model
from alambic.data.transfer import UNLABELLED
from alambic.errors import AlambicError, ConfigError, first_line
from alambic.losses import build_loss, get_loss_spec


def _paths(value: str | list[str]) -> list[str]:
    return list(value) if isinstance(value, list) else [value]


def feature_paths(terms: Sequence[Term], side: str) -> list[str]:
    return [path for term in terms for path in _paths(getattr(term, side)) if path != "logits"]


def _pick(outputs: dict[str, Tensor], value: str | list[str]) -> Tensor | list[Tensor]:
    """One output, or the list of outputs a multi-feature term compares."""
    return [outputs[path] for path in value] if isinstance(value, list) else outputs[value]


def _attention_mask(inputs: Any) -> Tensor | None:
    """The batch's ``attention_mask`` (1 = real token) when its inputs are a dict that has one."""
    return inputs.get("attention_mask") if isinstance(inputs, Mapping) else None


def _rows(value: Any, rows: Tensor) -> Any:
    """Rows ``rows`` (positions in the batch) of a tensor, of each tensor of a list; None stays None."""
    if isinstance(value, list):
        return [_rows(item, rows) for item in value]
    return value.index_select(0, rows) if isinstance(value, Tensor) else value


def _logits_shape(outputs: dict[str, Tensor], weight: Tensor) -> Tensor:
    """A stand-in with the shape fused logits would have, ``[B, T, V]`` (no storage), for the checks."""
    hidden = outputs[HIDDEN]
    return hidden.new_empty(()).expand(*hidden.shape[:-1], weight.shape[0])


def _shape(value: Tensor | list[Tensor]) -> tuple[int, ...] | list[tuple[int, ...]]:
    return [tuple(item.shape) for item in value] if isinstance(value, list) else tuple(value.shape)


class Teacher:
    """A frozen teacher: eval mode, no gradients, run under ``torch.no_grad``.

    A plain object, not an ``nn.Module``, so it can never become part of the trainable module.
    Calling it returns ``{"logits": ..., path: feature, ...}`` for the outputs the terms ask for.
    """

    def __init__(
        self,
        model: nn.Module,
        terms: Sequence[Term] = (),
        *,
        vocab_size: int | None = None,
        dtype: torch.dtype | None = None,
        fused_output: bool = False,
    ):
        """``vocab_size`` slices the teacher's logits to the first ``vocab_size`` entries: for a student of
        the same tokenizer whose vocabulary is not padded as the teacher's is (32000 vs 32064).
        ``dtype`` (``torch.bfloat16``) runs a copy of the teacher in that dtype, half the memory where it
        runs (the model given is untouched); its outputs are returned as float32. ``torch.int8`` stores
        the copy's Linear weights in int8 (torchao's weight-only quantization, a quarter of their memory),
        with activations and outputs in float32. ``fused_output`` (a float32 causal LM whose logits only
        token terms on the student's logits read): its last hidden states and output projection are
        returned instead of its logits, which the fused terms make one chunk at a time."""
        self.model = unwrap_model(model).eval().requires_grad_(False)
        self.vocab_size = vocab_size
        self.dtype = dtype
        if dtype == torch.int8:
            self.model = int8_weight_copy(self.model)
            self.dtype = None  # inputs and activations stay float32
        elif dtype is not None:
            self.model = copy.deepcopy(self.model).to(dtype)
        self.feature_paths = feature_paths(
            [t for t in terms if get_loss_spec(t.loss).needs_teacher], "teacher"
        )
        self.fused = fused_output and dtype is None and teacher_fuses(self.model, terms)

    def to(self, device: torch.device | str) -> Teacher:
        self.model.to(device)
        return self

    @torch.no_grad()  # not inference_mode: its tensors cannot be saved for the student's backward pass
    def __call__(self, inputs: Any, index: Tensor | None = None) -> dict[str, Tensor]:
        """The outputs the terms ask for; ``index`` (the samples' positions) is for cached teachers."""
        if self.fused:
            return fused_teacher_outputs(self.model, inputs, self.feature_paths, self.vocab_size)
        if self.dtype is not None:
            inputs = _cast_floating(inputs, self.dtype)
        outputs = model_outputs(self.model, inputs, self.feature_paths, side="teacher")
        if self.dtype is not None:
            outputs = {name: value.float() for name, value in outputs.items()}
        if self.vocab_size is not None and "logits" in outputs:
            outputs["logits"] = outputs["logits"][
                ..., : self.vocab_size
            ]  # the padding rows of a padded vocabulary
        return outputs

    def launch(self, inputs: Any, index: Tensor | None, stream: torch.cuda.Stream) -> Callable[[], dict]:
        """Start the forward pass on a second CUDA ``stream`` and return a function that waits for its outputs.

        The caller launches the student's forward in between, so the GPU runs both at once where their
        kernels leave it room; the outputs are read only after the current stream waits for ``stream``.
        """
        main = torch.cuda.current_stream()
        stream.wait_stream(main)  # the batch was copied to the device on the main stream
        with torch.cuda.stream(stream):
            outputs = self(inputs, index)

        def ready() -> dict[str, Tensor]:
            main.wait_stream(stream)
            for value in outputs.values():
                value.record_stream(main)  # their memory is not reused by the side stream while in use
            return outputs

        return ready


def int8_weight_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose Linear weights are int8 with per-channel scales (torchao, weight-only)."""
    import logging

    # torchao logs the GPU kernels it cannot load here, and torch a deprecation of torchao's
    quiet = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in quiet]
    try:
        for logger in quiet:
            logger.setLevel(logging.ERROR)
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError:
        raise ConfigError(
            "an int8 teacher needs torchao: pip install 'alambic[quant]' (or use teacher_dtype: bfloat16)"
        ) from None
    finally:
        for logger, level in zip(quiet, levels):
            logger.setLevel(level)
    quantized = copy.deepcopy(model)
    if not any(isinstance(module, nn.Linear) for module in quantized.modules()):
        raise ConfigError(
            "teacher_dtype int8 quantizes Linear weights, and this teacher has none (a convnet): use bfloat16"
        )
    quantize_(quantized, Int8WeightOnlyConfig())
    return quantized


def _cast_floating(inputs: Any, dtype: torch.dtype) -> Any:
    """Floating tensors (images) to ``dtype``; token ids and masks stay as they are."""
    if isinstance(inputs, Mapping):
        return {key: _cast_floating(value, dtype) for key, value in inputs.items()}
    return inputs.to(dtype) if isinstance(inputs, Tensor) and inputs.is_floating_point() else inputs


def model_outputs(model: nn.Module, inputs: Any, paths: list[str], *, side: str) -> dict[str, Tensor]:
    """``{"logits": ..., path: value}``: module paths through hooks, output fields from the output object."""
    if not paths:  # logits only (the common case): no hooks, no output fields, one call
        return {"logits": logits_of(call_model(model, inputs))}
    hooked = [path for path in paths if not is_output_field(path)]
    with capture_features(model, hooked, side=side) as features:
        output = call_model(model, inputs, **output_options(paths))
    mask = _attention_mask(inputs)
    fields = {path: read_output_field(output, path, mask) for path in paths if is_output_field(path)}
    try:
        logits = {"logits": logits_of(output)}
    except AlambicError:
        if not fields and not features:
            raise
        logits = {}  # a bare encoder (embedding models) has no logits; its terms compare other outputs
    return {**logits, **features, **fields}


class Distiller(nn.Module):
    """Student (+ connectors, + learned losses) with its terms: ``forward`` returns each weighted term and ``total``.

    Connectors and learned losses (CRD's embeddings and memory bank, VID's regressor, ...) are sized
    by one probing pass (:meth:`build_modules`); they train and are checkpointed with the student but
    are never part of it.

    ``unlabelled_rows``: the batches may hold rows without labels (a transfer set, label
    :data:`~alambic.data.transfer.UNLABELLED`): terms that need labels then average over the labelled
    rows only (0 for a batch without any), and teacher terms over every row. Finding the rows costs a
    host-device sync per step, so it is on only for such data (:func:`alambic.core.api.distill` and the
    run's distill stage turn it on when the training set holds a transfer set).

    ``fused_output`` (a Hugging Face causal-LM student): the student runs without its output projection
    and its token terms project its last hidden states one chunk of tokens at a time
    (:mod:`alambic.core.fused_output`), so its whole ``[B, T, V]`` logits never exist; terms that need
    them whole are refused here.

    Example:
        >>> module = Distiller(student, [Term(loss="ce", weight=0.1), Term(loss="kd", weight=0.9)])
        >>> losses = module(images, labels, teacher(images))
        >>> losses["total"].backward()
    """

    def __init__(
        self,
        student: nn.Module,
        terms: Sequence[Term],
        *,
        unlabelled_rows: bool = False,
        fused_output: bool = False,
    ):
        super().__init__()
        if not terms:
            raise ConfigError("a distillation setup needs at least one term (for example ce and kd)")
        self.student = student
        self.connectors = nn.ModuleDict()  # term index -> adapter; see build_modules
        self.learned_losses = nn.ModuleDict()  # term index -> learned loss module; see build_modules
        self.terms = list(terms)
        self.names = names = [term.name for term in self.terms]  # computed once: the keys losses log under
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ConfigError(f"two terms log under the same name {duplicates}; combine them into one term")
        self.student_paths = feature_paths(self.terms, "student")
        self.specs = [get_loss_spec(term.loss) for term in self.terms]  # looked up once, not every step
        self.needs_teacher = any(spec.needs_teacher for spec in self.specs)
        if unlabelled_rows and not self.needs_teacher:
            raise ConfigError(
                "the training data holds rows without labels (a transfer set) that only a teacher labels, but "
                "no term reads the teacher; add one (kd) or remove the transfer set"
            )
        # rows without labels are dropped from label terms only when the data may hold some and a term needs labels
        self.unlabelled_rows = unlabelled_rows and any(spec.needs_labels for spec in self.specs)
        self.has_token_terms = any(spec.inputs == "tokens" for spec in self.specs)
        self.uses_mask = any(spec.takes_mask for spec in self.specs)
        self.fused_output = fused_output
        if fused_output:  # refused here, before the pre-flight's first batch
            check_fused_terms(self.terms)
            output_projection(student)

    def student_outputs(self, inputs: Any) -> dict[str, Tensor]:
        """The student's logits (with ``fused_output``, its last hidden states) and the features its terms compare."""
        if self.fused_output:
            return fused_student_outputs(self.student, inputs, self.student_paths)
        return model_outputs(self.student, inputs, self.student_paths, side="student")

    @property
    def needs_probe(self) -> bool:
        """Whether a term may need a connector or a learned loss, i.e. whether a probing pass is worth running."""
        return any(self._wants_connector(term) or get_loss_spec(term.loss).learned for term in self.terms)

    def _wants_connector(self, term: Term) -> bool:
        spec = get_loss_spec(term.loss)
        if term.student == "logits" or term.connector == "none" or not spec.needs_teacher or spec.learned:
            return False
        return term.connector != "auto" or spec.same_shape

    @torch.no_grad()
    def build_modules(
        self,
        inputs: Any,
        teacher: Teacher | None,
        num_samples: int | None = None,
        sample_index: Tensor | None = None,
    ) -> None:
        """Create connectors and learned losses from one probing forward pass (before the optimizer exists).

        ``auto`` creates a connector only when the loss needs equal shapes and they differ. Learned
        losses get both sides' shapes and ``num_samples`` (the training set's size).
        """
        wanted = [
            (index, term)
            for index, term in enumerate(self.terms)
            if self._wants_connector(term) or get_loss_spec(term.loss).learned
        ]
        if not wanted or teacher is None:  # callers check needs_probe first to skip the probe batch
            return
        was_training = self.training
        self.eval()  # no BatchNorm statistics are updated by the probe
        try:
            student_outputs, teacher_outputs = self.student_outputs(inputs), teacher(inputs, sample_index)
        finally:
            self.train(was_training)
        device = next(iter(student_outputs.values())).device
        for index, term in wanted:
            student_shape = _shape(_pick(student_outputs, term.student))
            teacher_shape = _shape(_pick(teacher_outputs, term.teacher))
            if get_loss_spec(term.loss).learned:
                loss = build_loss(
                    term.loss,
                    term.params,
                    student_shape=student_shape,
                    teacher_shape=teacher_shape,
                    num_samples=num_samples,
                )
                self.learned_losses[str(index)] = loss.to(device)
            elif term.connector != "auto" or student_shape != teacher_shape:
                connector = make_connector(student_shape, teacher_shape, term.connector)
                self.connectors[str(index)] = connector.to(device)

    def term_value(
        self,
        index: int,
        student_outputs: dict,
        teacher_outputs: dict | None,
        labels: Tensor | None,
        epoch: float | None = None,
        sample_index: Tensor | None = None,
        mask: Tensor | None = None,
        labelled: Tensor | None = None,
    ) -> Tensor:
        """The unweighted value of term ``index`` (through its connector); losses that ask get the epoch,
        the sample indices, the attention mask. ``labelled`` (:meth:`labelled_rows`): a term that needs
        labels sees only those rows, and is 0 when there are none."""
        term, spec, key = self.terms[index], self.specs[index], str(index)
        if HIDDEN in student_outputs and term.student == "logits":  # fused_output: chunk by chunk
            return fused_term_value(self.student, term, student_outputs, teacher_outputs, labels)
        student_value = _pick(student_outputs, term.student)
        if key in self.connectors:
            student_value = self.connectors[key](student_value)
        teacher_value = _pick(teacher_outputs, term.teacher) if spec.needs_teacher else None
        if labelled is not None and spec.needs_labels:
            if labelled.numel() == 0:  # nothing to average: 0, not the NaN of a mean over no row
                return torch.zeros((), device=labels.device)
            student_value, teacher_value, labels, sample_index, mask = (
                _rows(value, labelled) for value in (student_value, teacher_value, labels, sample_index, mask)
            )
        if not (spec.needs_epoch or spec.needs_index or spec.takes_mask or spec.learned):
            return spec.fn(student_value, teacher_value, labels=labels, **term.params)  # most terms
        state = {"epoch": epoch} if spec.needs_epoch else {}
        if spec.needs_index:
            state["index"] = sample_index
        if spec.takes_mask:
            state["mask"] = mask
        if spec.learned:
            if key not in self.learned_losses:
                raise ConfigError(f"term {term.name!r} is a learned loss: call build_modules before training")
            return self.learned_losses[key](student_value, teacher_value, labels=labels, **state)
        return spec.fn(student_value, teacher_value, labels=labels, **state, **term.params)

    def labelled_rows(self, labels: Tensor | None) -> Tensor | None:
        """The batch positions of the rows that have labels, when some may not (``unlabelled_rows``) and a
        term needs them; None: every row counts."""
        if not self.unlabelled_rows or labels is None or labels.dim() != 1:
            return None
        return (labels != UNLABELLED).nonzero().squeeze(1)  # [L]; a host-device sync on a GPU

    def forward(
        self,
        inputs: Any,
        labels: Tensor | None,
        teacher_outputs: dict[str, Tensor] | Callable[[], dict[str, Tensor]] | None,
        epoch: float | None = None,
        sample_index: Tensor | None = None,
        token_scale: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Weighted term values and their ``total``.

        ``teacher_outputs`` may be a function that waits for them (:meth:`Teacher.launch`): it is called
        after the student's forward pass has been launched.
        ``epoch`` (1-based) reaches losses that need it (DKD's warm-up); ``sample_index`` (the batch's
        positions in the training set) reaches those that keep per-sample state (CRD's memory bank);
        ``token_scale`` multiplies token losses so that they average over the tokens of the whole
        gradient-accumulation window (the loop computes it).
        """
        student_outputs = self.student_outputs(inputs)
        if teacher_outputs is not None and not isinstance(teacher_outputs, Mapping):  # a deferred one
            teacher_outputs = teacher_outputs()
        mask = _attention_mask(inputs) if self.uses_mask else None
        labelled = self.labelled_rows(labels)
        losses, total = {}, None
        for index, (term, spec, name) in enumerate(zip(self.terms, self.specs, self.names)):
            value = term.weight * self.term_value(
                index, student_outputs, teacher_outputs, labels, epoch, sample_index, mask, labelled
            )
            if token_scale is not None and spec.inputs == "tokens":
                value = value * token_scale
            losses[name] = value
            total = value if total is None else total + value  # one add per term (a stack costs two ops)
        losses["total"] = total
        return losses

    @torch.no_grad()
    def check(
        self,
        inputs: Any,
        labels: Tensor | None,
        teacher: Teacher | None,
        sample_index: Tensor | None = None,
    ) -> None:
        """Run every term once on a real batch before step 0, turning any failure into a one-line error."""
        if self.needs_teacher and teacher is None:
            needing = [t.loss for t in self.terms if get_loss_spec(t.loss).needs_teacher]
            raise ConfigError(f"terms {needing} need a teacher, but none was given")
        if any(get_loss_spec(t.loss).needs_labels for t in self.terms) and labels is None:
            raise ConfigError(
                "a term needs labels (ce), but the batches carry none; yield (inputs, labels) or a 'labels' key"
            )
        if any(get_loss_spec(t.loss).needs_index for t in self.terms) and sample_index is None:
            needing = [t.loss for t in self.terms if get_loss_spec(t.loss).needs_index]
            raise ConfigError(
                f"terms {needing} keep per-sample state and need the samples' indices; yield "
                "(inputs, labels, index) batches (alambic.data.IndexedDataset wraps a data set so)"
            )
        was_training = self.training
        self.eval()
        try:
            teacher_outputs = (
                teacher(inputs, sample_index) if (teacher is not None and self.needs_teacher) else None
            )
            student_outputs = self.student_outputs(inputs)
            if self.fused_output:  # the vocabulary is the output projection's rows
                weight = output_projection(self.student)[1]
                student_outputs = {**student_outputs, "logits": _logits_shape(student_outputs, weight)}
            if teacher_outputs is not None and WEIGHT in teacher_outputs:  # a fused teacher's vocabulary
                teacher_outputs = {
                    **teacher_outputs,
                    "logits": _logits_shape(teacher_outputs, teacher_outputs[WEIGHT]),
                }
            if teacher_outputs is not None and "logits" in teacher_outputs and "logits" in student_outputs:
                classes_student, classes_teacher = (
                    student_outputs["logits"].shape[-1],
                    teacher_outputs["logits"].shape[-1],
                )
                if classes_student != classes_teacher and student_outputs["logits"].dim() == 3:
                    raise ConfigError(
                        f"the teacher's vocabulary has {classes_teacher} tokens and the student's "
                        f"{classes_student}: token losses need one tokenizer; derive the student from the "
                        "teacher (alambic derive) or give it the teacher's tokenizer"
                        + (
                            f" (if both use one tokenizer and the teacher's vocabulary is only padded, pass "
                            f"teacher_vocab_size={classes_student})"
                            if classes_teacher > classes_student
                            else ""
                        )
                    )
                if classes_student != classes_teacher:
                    raise ConfigError(
                        f"teacher predicts {classes_teacher} classes but the student {classes_student}; "
                        "give the student the teacher's number of classes"
                    )
            for index, term in enumerate(self.terms):
                try:
                    value = self.term_value(
                        index,
                        student_outputs,
                        teacher_outputs,
                        labels,
                        epoch=1.0,
                        sample_index=sample_index,
                        mask=_attention_mask(inputs),
                        labelled=self.labelled_rows(labels),
                    )
                except (ValueError, RuntimeError, KeyError, TypeError, IndexError) as error:
                    message = first_line(error)
                    raise ConfigError(f"term {term.name!r} fails on the first batch: {message}") from error
                if value.dim() != 0:
                    raise ConfigError(
                        f"loss {term.loss!r} returned shape {tuple(value.shape)}, expected a scalar"
                    )
        finally:
            self.train(was_training)
