"""Language-model data from local files: plain text cut into windows, and prompt/completion or chat JSONL.

Batches are dicts in the Hugging Face convention: ``input_ids`` ``[B, T]`` and ``labels`` ``[B, T]``
aligned with them (the model or loss shifts by one), ``-100`` where no loss is taken; JSONL rows padded to
a common length add ``attention_mask``. Every data set records ``unit_counts`` ``[N]``: per item, the
bytes or characters (its tokenizer's ``unit``) of text that its *predicted* labels stand for (positions
``1..T-1`` whose label is not ``-100``), so ``sum(loss_in_nats) / (ln 2 * unit_counts.sum())`` is bits per
byte (or per character) whatever the tokenizer. For byte and character tokenizers a count is the number
of predicted tokens; for a Hugging Face tokenizer it is the UTF-8 length of those tokens decoded.

- ``text``: the corpus is tokenized once into one id tensor (:class:`TextBlocks`) and cut into windows of
  ``block_size`` tokens starting every ``stride`` tokens; a last partial window is dropped. Validation is
  ``valid_file``, or the last ``valid_fraction`` of the text by characters, split before tokenizing so no
  window crosses it; validation windows never overlap (stride = ``block_size``).
- ``jsonl``: one object a line, ``{"prompt": str, "completion": str}`` or ``{"messages": [{"role",
  "content"}, ...]}`` ending with an ``assistant`` message (rendered by a Hugging Face tokenizer's chat
  template, a GGUF file's included). The loss is on the completion, or on every assistant message of a
  chat (:func:`encode_chat`), only; EOS is appended to a completion when the tokenizer has one. Rows are right-padded to the longest one; a row longer than
  ``max_length`` loses the start of its prompt first, then the end of its completion. With ``packing``,
  rows are concatenated and cut into ``block_size`` blocks (prompts keep ``-100``), without padding.
  Validation is ``valid_file`` or the last ``valid_fraction`` of the rows.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from alambic.data.info import LMDatasetInfo
from alambic.data.tokenizers import ByteTokenizer, CharTokenizer, HFTokenizer, Tokenizer, load_tokenizer
from alambic.errors import ConfigError, DataError

IGNORE_INDEX = -100  # labels that take no loss (PyTorch's cross_entropy default ignore_index)
LM_DATASETS = ("text", "jsonl")


class TextBlocks(Dataset):
    """Windows of ``block_size`` tokens over one id tensor, starting at ``starts``; yields
    ``{"input_ids": [T], "labels": [T]}`` (labels equal the inputs: every token after the first is predicted).
    :func:`cut_windows` makes one from a tokenized corpus.

    Args:
        ids: ``[N]`` the tokenized corpus.
        starts: ``[W]`` where each window starts.
        block_size: Tokens per window.
        unit_counts: ``[W]`` the bytes or characters each window's predicted tokens stand for.
        unit: What ``unit_counts`` counts (``"byte"``, ``"char"``).
    """

    def __init__(
        self, ids: Tensor, starts: Tensor, *, block_size: int, unit_counts: Tensor, unit: str
    ) -> None:
        self.ids, self.starts, self.block_size = ids, starts, block_size
        self.unit_counts, self.unit = unit_counts, unit

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {key: value[0] for key, value in self.get_batch([index]).items()}

    def get_batch(self, indices: list[int]) -> dict[str, Tensor]:
        """A whole batch ``{"input_ids": [B, T], "labels": [B, T]}`` in one gather."""
        positions = self.starts[indices].unsqueeze(1) + torch.arange(self.block_size)  # [B, T]
        ids = self.ids[positions]
        return {"input_ids": ids, "labels": ids.clone()}

    def subset(self, indices: Tensor) -> TextBlocks:
        """The windows at ``indices``, sharing the id tensor."""
        return TextBlocks(
            self.ids,
            self.starts[indices],
            block_size=self.block_size,
            unit_counts=self.unit_counts[indices],
            unit=self.unit,
        )


def cut_windows(
    ids: Tensor, tokenizer: Tokenizer, *, block_size: int, stride: int | None = None
) -> TextBlocks:
    """Windows of ``block_size`` tokens starting every ``stride`` (default ``block_size``) tokens; a last
    partial window is dropped.

    Example:
        >>> blocks = cut_windows(torch.arange(10), ByteTokenizer(), block_size=4, stride=3)
        >>> blocks.starts.tolist(), blocks[1]["input_ids"].tolist()
        ([0, 3, 6], [3, 4, 5, 6])
    """
    ids = ids.long()
    starts = torch.arange(0, max(len(ids) - block_size + 1, 0), stride or block_size)
    if isinstance(tokenizer, (ByteTokenizer, CharTokenizer)):  # one token, one unit
        unit_counts = torch.full((len(starts),), block_size - 1, dtype=torch.long)
    else:  # decode each window's predicted tokens
        unit_counts = torch.tensor(
            [
                tokenizer.count_units(ids[start + 1 : start + block_size].tolist())
                for start in starts.tolist()
            ],
            dtype=torch.long,
        )
    return TextBlocks(ids, starts, block_size=block_size, unit_counts=unit_counts, unit=tokenizer.unit)


class TokenRows(Dataset):
    """Rows of equal length held as columns ``{key: [N, L]}`` (``input_ids``, ``labels``, and
    ``attention_mask`` when padded); yields ``{key: [L]}``. ``unit_counts`` ``[N]`` as :class:`TextBlocks`."""

    def __init__(self, columns: dict[str, Tensor], unit_counts: Tensor, unit: str) -> None:
        self.columns, self.unit_counts, self.unit = columns, unit_counts, unit

    def __len__(self) -> int:
        return len(self.unit_counts)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {key: value[index] for key, value in self.columns.items()}

    def get_batch(self, indices: list[int]) -> dict[str, Tensor]:
        """A whole batch ``{key: [B, L]}``."""
        return {key: value[indices] for key, value in self.columns.items()}

    def subset(self, indices: Tensor) -> TokenRows:
        """The rows at ``indices``."""
        columns = {key: value[indices] for key, value in self.columns.items()}
        return TokenRows(columns, self.unit_counts[indices], self.unit)


def read_text(path: str | Path) -> str:
    """A UTF-8 text file's contents (gzip-compressed when its name ends in ``.gz``), or a one-line DataError."""
    try:
        if str(path).endswith(".gz"):
            with gzip.open(path, "rt", encoding="utf-8") as file:
                return file.read()
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path} does not exist; set train_file / valid_file to a UTF-8 text file") from None
    except (OSError, EOFError, UnicodeDecodeError) as error:  # gzip.BadGzipFile is an OSError
        raise DataError(f"cannot read {path} as UTF-8 text: {error}") from None


def json_lines(path: str | Path) -> Iterator[tuple[int, Any]]:
    """``(line number, value)`` of each non-blank line of a JSONL file; a line that is not JSON is a
    one-line DataError naming the file and the line."""
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}, line {number}: not valid JSON ({error.msg})") from None


def read_jsonl(path: str | Path) -> list[dict]:
    """The rows of a JSONL file, each ``{"prompt", "completion"}`` or ``{"messages": [...]}``, checked;
    a malformed line is a one-line DataError naming the file and the line number."""
    rows = []
    for number, row in json_lines(path):
        problem = _row_problem(row)
        if problem:
            raise DataError(f"{path}, line {number}: {problem}")
        rows.append(row)
    if not rows:
        raise DataError(f"{path} holds no rows; expected one JSON object a line")
    return rows


def _row_problem(row: object) -> str | None:
    """What is wrong with a JSONL row, or None."""
    if (
        isinstance(row, dict)
        and isinstance(row.get("prompt"), str)
        and isinstance(row.get("completion"), str)
    ):
        return None if row["completion"] else "the completion is empty"
    if isinstance(row, dict) and isinstance(row.get("messages"), list) and row["messages"]:
        return messages_problem(row["messages"], answered=True)
    return 'expected {"prompt": str, "completion": str} or {"messages": [{"role": ..., "content": ...}, ...]}'


def messages_problem(messages: list, *, answered: bool = False) -> str | None:
    """What is wrong with a conversation ``[{"role": str, "content": str}, ...]`` (``answered``: that must
    end with the assistant's message), or None."""
    for message in messages:
        if not (
            isinstance(message, dict)
            and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str)
        ):
            return 'each message must be {"role": str, "content": str}'
    if answered and messages[-1]["role"] != "assistant":
        return "the last message must be the assistant's (the one the loss is taken on)"
    if messages[0]["role"] == "assistant":
        return "the conversation must open with a system or user message, not the assistant's"
    return None


def _row_texts(row: dict) -> list[str]:
    if "messages" in row:
        return [message["content"] for message in row["messages"]]
    return [row["prompt"], row["completion"]]


def encode_row(row: dict, tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """``(ids, labels)`` of a checked JSONL row: labels are the ids of the completion (EOS appended when the
    tokenizer has one) or of every assistant message of a chat row, -100 elsewhere."""
    if "messages" in row:
        return encode_chat(row["messages"], tokenizer)
    prompt, completion = tokenizer.encode(row["prompt"]), tokenizer.encode(row["completion"])
    if tokenizer.eos_id is not None:
        completion.append(int(tokenizer.eos_id))
    return prompt + completion, [IGNORE_INDEX] * len(prompt) + completion


def encode_chat(messages: list[dict], tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """``(ids, labels)`` of a conversation rendered by the tokenizer's chat template, the loss on every
    assistant message: each one's tokens are what the template adds after the conversation before it with
    its generation prompt (the answer and its end-of-turn tokens, e.g. ChatML's ``<|im_end|>`` and newline).

    The template must render each conversation as a prefix of the longer one (ChatML and most templates
    do); one that does not (e.g. one that drops earlier reasoning) is a one-line DataError."""
    if not isinstance(tokenizer, HFTokenizer):
        raise ConfigError("chat rows (messages) need a Hugging Face tokenizer folder with a chat template")
    ids: list[int] = []
    labels: list[int] = []
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.chat_ids(messages[:turn], add_generation_prompt=True)
        full = tokenizer.chat_ids(messages[: turn + 1])
        if full[: len(prompt)] != prompt or prompt[: len(ids)] != ids:
            raise DataError(
                "the chat template does not render a conversation as its prompt followed by the answer; "
                "use prompt/completion rows"
            )
        labels += [IGNORE_INDEX] * (len(prompt) - len(ids)) + full[len(prompt) :]
        ids = full
    return ids, labels


def read_prompts(path: str | Path) -> list[dict]:
    """The rows of a prompt file, each ``{"messages": [...], "reference": str | None}`` or ``{"prompt": str,
    "reference": str | None}``: a conversation without its final assistant message, or a prompt text. A
    final assistant message (or a ``completion``) is the row's reference answer, so one file can hold the
    prompts and the answers ROUGE-L is measured against. A malformed line is a one-line DataError."""
    rows = []
    for number, row in json_lines(path):
        messages = row.get("messages") if isinstance(row, dict) else None
        if isinstance(messages, list) and messages:
            problem = messages_problem(messages)
            if problem:
                raise DataError(f"{path}, line {number}: {problem}")
            answered = messages[-1]["role"] == "assistant"
            reference = messages[-1]["content"] if answered else None
            rows.append({"messages": messages[:-1] if answered else messages, "reference": reference})
        elif isinstance(row, dict) and isinstance(row.get("prompt"), str) and row["prompt"]:
            completion = row.get("completion")
            rows.append(
                {"prompt": row["prompt"], "reference": completion if isinstance(completion, str) else None}
            )
        else:
            raise DataError(
                f'{path}, line {number}: expected {{"messages": [{{"role": ..., "content": ...}}, ...]}} or '
                '{"prompt": str} (a final assistant message or a "completion" is the reference answer)'
            )
    if not rows:
        raise DataError(f"{path} holds no prompts; expected one JSON object a line")
    return rows


def encode_prompt(row: dict, tokenizer: Tokenizer) -> list[int]:
    """The ids a model answers from: a conversation (or a ``prompt`` text as one user message) rendered by
    the chat template with its generation prompt; a tokenizer without a chat template encodes a ``prompt``
    text as it is (and refuses a conversation)."""
    chat = isinstance(tokenizer, HFTokenizer) and bool(getattr(tokenizer.hf, "chat_template", None))
    if "messages" in row:
        if not isinstance(tokenizer, HFTokenizer):
            raise ConfigError("chat prompts (messages) need a Hugging Face tokenizer with a chat template")
        return tokenizer.chat_ids(row["messages"], add_generation_prompt=True)
    if chat:
        return tokenizer.chat_ids([{"role": "user", "content": row["prompt"]}], add_generation_prompt=True)
    return tokenizer.encode(row["prompt"])


def fit_row(ids: list[int], labels: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """``(ids, labels)`` of at most ``max_length`` tokens: the start of the prompt (the tokens before the
    first label) goes first, keeping one prompt token when there is one so the first answer token is
    predicted, then the end of the row."""
    prompt = next((index for index, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))
    drop = min(max(len(ids) - max_length, 0), max(prompt - 1, 0))
    return ids[drop : drop + max_length], labels[drop : drop + max_length]


def _unit_counts(ids: Tensor, labels: Tensor, tokenizer: Tokenizer) -> Tensor:
    """Per row, the units the predicted labels (positions 1.., not -100) stand for."""
    counted = labels[:, 1:] != IGNORE_INDEX  # [N, L - 1]
    if isinstance(tokenizer, (ByteTokenizer, CharTokenizer)):
        return counted.sum(1)
    return torch.tensor(
        [tokenizer.count_units(row[1:][mask].tolist()) for row, mask in zip(ids, counted)], dtype=torch.long
    )


def pad_rows(pairs: list[tuple[list[int], list[int]]], tokenizer: Tokenizer) -> TokenRows:
    """Rows right-padded to the longest one: padding has label -100 and attention mask 0."""
    length = max(len(ids) for ids, _ in pairs)
    pad_id = tokenizer.pad_id if isinstance(tokenizer, HFTokenizer) else 0
    ids = torch.full((len(pairs), length), pad_id, dtype=torch.long)
    labels = torch.full((len(pairs), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(pairs), length), dtype=torch.long)
    for row, (row_ids, row_labels) in enumerate(pairs):
        ids[row, : len(row_ids)] = torch.tensor(row_ids)
        labels[row, : len(row_labels)] = torch.tensor(row_labels)
        mask[row, : len(row_ids)] = 1
    columns = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return TokenRows(columns, _unit_counts(ids, labels, tokenizer), tokenizer.unit)


def pack_rows(pairs: list[tuple[list[int], list[int]]], tokenizer: Tokenizer, block_size: int) -> TokenRows:
    """Rows concatenated and cut into blocks of ``block_size`` tokens (a last partial block dropped)."""
    ids = torch.tensor([token for row_ids, _ in pairs for token in row_ids], dtype=torch.long)
    labels = torch.tensor([label for _, row_labels in pairs for label in row_labels], dtype=torch.long)
    blocks = len(ids) // block_size
    ids = ids[: blocks * block_size].view(blocks, block_size)
    labels = labels[: blocks * block_size].view(blocks, block_size)
    return TokenRows(
        {"input_ids": ids, "labels": labels}, _unit_counts(ids, labels, tokenizer), tokenizer.unit
    )


def build_lm_datasets(
    kind: str,
    *,
    train_file: str | Path,
    valid_file: str | Path | None = None,
    valid_fraction: float = 0.1,
    tokenizer: str = "bytes",
    block_size: int = 128,
    stride: int | None = None,
    max_length: int = 512,
    packing: bool = False,
) -> tuple[Dataset, Dataset, LMDatasetInfo, Tokenizer]:
    """Language-model train and validation sets from local files (see the module's docstring).

    Args:
        kind: ``"text"`` (plain text) or ``"jsonl"`` (prompt/completion or chat rows).
        train_file: The training file.
        valid_file: The validation file; default: the last ``valid_fraction`` of ``train_file``.
        valid_fraction: Share of the text (by characters) or of the rows held out, in (0, 1).
        tokenizer: ``"bytes"``, ``"chars"`` (the characters of the training and validation text, as
            nanoGPT) or a tokenizer folder (alambic's or Hugging Face's), see
            :func:`alambic.data.tokenizers.load_tokenizer`.
        block_size: Tokens per window (``text``) or per packed block (``jsonl`` with ``packing``).
        stride: Tokens between training windows (``text``); default ``block_size``.
        max_length: Longest padded JSONL row.
        packing: Pack JSONL rows into blocks instead of padding them.

    Returns:
        ``(train, valid, info, tokenizer)``; ``info.num_classes`` is the vocabulary size.

    Example:
        >>> train, valid, info, tokenizer = build_lm_datasets("text", train_file="input.txt", tokenizer="chars")
        >>> train[0]["input_ids"].shape, info.unit
        (torch.Size([128]), 'char')
    """
    if kind not in LM_DATASETS:
        raise ConfigError(f"unknown language-model data kind {kind!r}; valid kinds: {', '.join(LM_DATASETS)}")
    _check_sizes(block_size=block_size, stride=stride, max_length=max_length)
    if valid_file is None and not 0.0 < valid_fraction < 1.0:
        raise ConfigError(
            f"valid_fraction must be strictly between 0 and 1 (or set valid_file), got {valid_fraction!r}"
        )
    if kind == "text":
        train_text = read_text(train_file)
        if valid_file is None:
            cut = len(train_text) - round(len(train_text) * valid_fraction)
            train_text, valid_text = train_text[:cut], train_text[cut:]
        else:
            valid_text = read_text(valid_file)
        loaded = load_tokenizer(tokenizer, corpus=train_text + valid_text)
        train = cut_windows(_ids(loaded, train_text), loaded, block_size=block_size, stride=stride)
        valid = cut_windows(_ids(loaded, valid_text), loaded, block_size=block_size)
    else:
        rows = read_jsonl(train_file)
        if valid_file is None:
            cut = len(rows) - max(1, round(len(rows) * valid_fraction))
            if cut < 1:
                raise DataError(f"{train_file} has {len(rows)} rows: too few to hold out a validation share")
            rows, valid_rows = rows[:cut], rows[cut:]
        else:
            valid_rows = read_jsonl(valid_file)
        corpus = "".join(text for row in rows + valid_rows for text in _row_texts(row))
        loaded = load_tokenizer(tokenizer, corpus=corpus)
        train, valid = (
            _rows_dataset(part, loaded, block_size, max_length, packing) for part in (rows, valid_rows)
        )
    for role, dataset in (("training", train), ("validation", valid)):
        if len(dataset) == 0:
            raise DataError(
                f"the {role} data is shorter than one block of {block_size} tokens; lower block_size"
                + (" or raise valid_fraction" if role == "validation" and valid_file is None else "")
            )
    width = block_size if kind == "text" or packing else train.columns["input_ids"].shape[1]
    info = LMDatasetInfo(
        kind, loaded.vocab_size, (width,), [], None, None, unit=loaded.unit, tokenizer=loaded
    )
    return train, valid, info, loaded


def _ids(tokenizer: Tokenizer, text: str) -> Tensor:
    return torch.tensor(tokenizer.encode(text), dtype=torch.long)


def _rows_dataset(
    rows: list[dict], tokenizer: Tokenizer, block_size: int, max_length: int, packing: bool
) -> TokenRows:
    encoded = [encode_row(row, tokenizer) for row in rows]
    if packing:
        return pack_rows(encoded, tokenizer, block_size)
    return pad_rows([fit_row(ids, labels, max_length) for ids, labels in encoded], tokenizer)


def _check_sizes(**sizes: int | None) -> None:
    for name, value in sizes.items():
        minimum = 1 if name == "stride" else 2  # a window of 2 tokens predicts one
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
            raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
