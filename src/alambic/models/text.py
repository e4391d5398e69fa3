"""Small non-Transformer text students over a teacher's tokenizer ids: a BiLSTM and a Kim (2014) CNN.

Both take the tokenized batches of text data sets (``input_ids`` and ``attention_mask``, ``[B, T]``),
ignore padding wherever it sits, and return logits ``[B, num_classes]``. Their embedding table can be
initialised from the teacher's, projected to the student's width by PCA
(:func:`init_from_teacher_embeddings`; in a run config, ``student.model.kwargs.init_embeddings: teacher``).

Parameter counts at the default sizes, for a 30,522-token vocabulary (BERT uncased, MiniLM) and two
classes, against MiniLM-L6's 22.7M: ``bilstm`` 9.70M (9.16M of them the embedding table), ``kim_cnn``
9.52M (the same table and 0.36M of convolutions). Without the table both are under 0.6M parameters.

References:
    Kim 2014, "Convolutional Neural Networks for Sentence Classification", https://arxiv.org/abs/1408.5882
    Tang et al. 2019, "Distilling Task-Specific Knowledge from BERT into Simple Neural Networks",
    https://arxiv.org/abs/1903.12136
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence

from alambic.errors import ConfigError
from alambic.models.zoo import register_model


def _text_options(name: str, input_shape: tuple[int, ...], vocab_size, embedding_dim, dropout) -> None:
    if len(input_shape) != 1:
        raise ConfigError(
            f"model {name!r} reads token ids (input_shape (max_length,)), got input_shape {input_shape}; "
            "use it with a text data set"
        )
    if vocab_size is None:
        raise ConfigError(
            f"model {name!r} needs vocab_size: use a text data set (its tokenizer gives it) or set "
            "model.kwargs.vocab_size"
        )
    for option, value in (("vocab_size", vocab_size), ("embedding_dim", embedding_dim)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} {option} must be a positive integer, got {value!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ConfigError(f"{name} dropout must be in [0, 1), got {dropout!r}")


def _positive_int(name: str, option: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} {option} must be a positive integer, got {value!r}")
    return value


def real_tokens_first(input_ids: Tensor, attention_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Each row's real tokens moved to its front, in order (left or right padding alike), and their counts.

    Returns ``(input_ids [B, T], lengths [B])``; a row without real tokens counts one (its first id).
    """
    if attention_mask is None:
        lengths = torch.full(input_ids.shape[:1], input_ids.shape[1], device=input_ids.device)
        return input_ids, lengths
    padding = (attention_mask == 0).to(torch.uint8)  # [B, T]
    order = torch.sort(padding, dim=1, stable=True).indices  # real tokens first, order kept
    lengths = attention_mask.ne(0).sum(1).clamp_min(1)  # [B]
    return input_ids.gather(1, order), lengths


@register_model("bilstm")
def bilstm(
    *,
    num_classes: int,
    input_shape: tuple[int, ...],
    vocab_size: int | None = None,
    embedding_dim: int = 300,
    hidden: int = 150,
    layers: int = 1,
    dropout: float = 0.1,
) -> nn.Module:
    """Bidirectional LSTM over word embeddings (Tang et al. 2019's student): the last forward and
    backward states of the top layer, concatenated ``[B, 2 * hidden]``, dropout, a linear ``head``.

    Padding is skipped with packed sequences. ``vocab_size`` defaults to the data's tokenizer's.
    Default size (30,522 tokens, 2 classes): 9.70M parameters (MiniLM-L6: 22.7M).
    Hook paths: ``embedding``, ``head``.
    """
    _text_options("bilstm", input_shape, vocab_size, embedding_dim, dropout)
    hidden, layers = _positive_int("bilstm", "hidden", hidden), _positive_int("bilstm", "layers", layers)
    return BiLSTMClassifier(vocab_size, num_classes, embedding_dim, hidden, layers, float(dropout))


class BiLSTMClassifier(nn.Module):
    """See :func:`bilstm`."""

    def __init__(
        self, vocab_size: int, num_classes: int, embedding_dim: int, hidden: int, layers: int, dropout: float
    ) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embedding_dim)
        self.lstm = nn.LSTM(
            embedding_dim,
            hidden,
            num_layers=layers,
            batch_first=True,
            bidirectional=True,
            dropout=dropout if layers > 1 else 0.0,
        )
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(2 * hidden, num_classes)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embedding

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None
    ) -> Tensor:
        del token_type_ids  # one segment per sentence; present in BERT tokenizers' batches
        input_ids, lengths = real_tokens_first(input_ids, attention_mask)
        embedded = self.dropout(self.embedding(input_ids))  # [B, T, E]
        packed = pack_padded_sequence(embedded, lengths.cpu(), batch_first=True, enforce_sorted=False)
        _, (last, _) = self.lstm(packed)  # last: [layers * 2, B, hidden]
        sentence = torch.cat([last[-2], last[-1]], dim=-1)  # [B, 2 * hidden]: forward and backward
        return self.head(self.dropout(sentence))  # [B, num_classes]


@register_model("kim_cnn")
def kim_cnn(
    *,
    num_classes: int,
    input_shape: tuple[int, ...],
    vocab_size: int | None = None,
    embedding_dim: int = 300,
    filters: int = 100,
    widths: Sequence[int] = (3, 4, 5),
    dropout: float = 0.5,
) -> nn.Module:
    """Kim (2014)'s CNN: parallel 1-D convolutions (``filters`` each, one per width in ``widths``) over
    word embeddings, ReLU, max over time (real tokens only), concatenated, dropout, a linear ``head``.

    ``vocab_size`` defaults to the data's tokenizer's.
    Default size (30,522 tokens, 2 classes): 9.52M parameters (MiniLM-L6: 22.7M).
    Hook paths: ``embedding``, ``convs.0``, ``convs.1``, ..., ``head``.
    """
    _text_options("kim_cnn", input_shape, vocab_size, embedding_dim, dropout)
    filters = _positive_int("kim_cnn", "filters", filters)
    if isinstance(widths, (int, str)) or not widths:
        raise ConfigError(
            f"kim_cnn widths must be a list of positive integers such as [3, 4, 5], got {widths!r}"
        )
    widths = [_positive_int("kim_cnn", "widths", width) for width in widths]
    return KimCNN(vocab_size, num_classes, embedding_dim, filters, widths, float(dropout))


class KimCNN(nn.Module):
    """See :func:`kim_cnn`."""

    def __init__(
        self,
        vocab_size: int,
        num_classes: int,
        embedding_dim: int,
        filters: int,
        widths: list[int],
        dropout: float,
    ) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embedding_dim)
        # wide convolutions (zero padding width - 1 on both sides): a sentence shorter than a width still counts
        self.convs = nn.ModuleList(
            nn.Conv1d(embedding_dim, filters, width, padding=width - 1) for width in widths
        )
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(filters * len(widths), num_classes)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embedding

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None
    ) -> Tensor:
        del token_type_ids  # one segment per sentence; present in BERT tokenizers' batches
        input_ids, lengths = real_tokens_first(input_ids, attention_mask)
        real = torch.arange(input_ids.shape[1], device=input_ids.device) < lengths[:, None]  # [B, T]
        # padding embedded as zeros, the same as the convolution's own zero padding
        embedded = self.embedding(input_ids) * real.unsqueeze(-1)  # [B, T, E]
        embedded = self.dropout(embedded).transpose(1, 2)  # [B, E, T]
        pooled = []
        for conv in self.convs:
            features = F.relu(conv(embedded))  # [B, filters, T + width - 1]
            width = conv.kernel_size[0]
            # window j covers tokens j - width + 1 .. j: it holds a real token when j < length + width - 1
            window = torch.arange(features.shape[-1], device=features.device)
            touches_real = window < (lengths[:, None] + width - 1)  # [B, T + width - 1]
            features = features.masked_fill(~touches_real.unsqueeze(1), float("-inf"))
            pooled.append(features.amax(dim=-1))  # [B, filters]
        return self.head(self.dropout(torch.cat(pooled, dim=-1)))  # [B, num_classes]


def teacher_embedding_table(teacher: nn.Module) -> Tensor:
    """The teacher's input embedding table ``[V, H_t]`` (a Hugging Face model's ``get_input_embeddings()``)."""
    get_embeddings = getattr(teacher, "get_input_embeddings", None)
    embeddings = get_embeddings() if callable(get_embeddings) else None
    if not isinstance(getattr(embeddings, "weight", None), Tensor):
        raise ConfigError(
            f"init_embeddings: teacher needs a teacher with an input embedding table (a Hugging Face model); "
            f"{type(teacher).__name__} has none; remove student.model.kwargs.init_embeddings"
        )
    return embeddings.weight.detach()


@torch.no_grad()
def init_from_teacher_embeddings(student: nn.Module, teacher_embeddings: Tensor) -> nn.Module:
    """Fill the student's embedding table ``[V, E]`` from the teacher's ``[V_t, H_t]`` (ids below ``V``).

    When ``E < H_t``, the teacher's rows are centred and projected on their top ``E`` principal
    components (``(X - mean(X)) @ components``, from an SVD, each component's sign set so that its
    largest entry is positive); when ``E == H_t`` they are copied. Returns ``student``.

    Example:
        >>> init_from_teacher_embeddings(student, teacher.get_input_embeddings().weight)  # doctest: +SKIP
    """
    if not callable(getattr(student, "get_input_embeddings", None)):
        raise ConfigError(
            f"{type(student).__name__} has no embedding table to initialise (get_input_embeddings); "
            "remove init_embeddings or use a text student (bilstm, kim_cnn, hf-config)"
        )
    table = student.get_input_embeddings().weight  # [V, E]
    vocab_size, width = table.shape
    if teacher_embeddings.dim() != 2 or teacher_embeddings.shape[0] < vocab_size:
        raise ConfigError(
            f"the teacher's embedding table {tuple(teacher_embeddings.shape)} does not cover the student's "
            f"{vocab_size} token ids; build the student with the teacher's tokenizer (vocab_size)"
        )
    if width > teacher_embeddings.shape[1]:
        raise ConfigError(
            f"the student's embedding_dim {width} is wider than the teacher's {teacher_embeddings.shape[1]}; "
            f"set embedding_dim to at most {teacher_embeddings.shape[1]}"
        )
    rows = teacher_embeddings[:vocab_size].to(device=table.device, dtype=torch.float64)  # [V, H_t]
    if width == rows.shape[1]:
        table.copy_(rows)
        return student
    centred = rows - rows.mean(0)  # [V, H_t]
    _, _, right = torch.linalg.svd(centred, full_matrices=False)  # right: [H_t, H_t], rows by variance
    components = right[:width].T  # [H_t, E]
    largest = components.abs().argmax(0)  # sklearn's svd_flip, so the result does not depend on the LAPACK
    components = components * components[largest, torch.arange(width)].sign()
    table.copy_(centred @ components)  # [V, E]
    return student
