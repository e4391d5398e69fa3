"""Tokenizers for language-model data, all read from local files (nothing is downloaded).

Three kinds behind one :class:`Tokenizer` protocol, chosen by :func:`load_tokenizer`:

- ``"bytes"``: :class:`ByteTokenizer`, the UTF-8 bytes of the text (vocabulary 256, any text);
- ``"chars"``: :class:`CharTokenizer`, the sorted characters of a corpus (nanoGPT's Shakespeare
  tokenizer); a character outside it is a one-line :class:`~alambic.errors.DataError`;
- a folder: one that :meth:`Tokenizer.save` wrote (``alambic-tokenizer.json``), or a Hugging Face
  tokenizer folder (``AutoTokenizer.from_pretrained(path, local_files_only=True)``), wrapped in
  :class:`HFTokenizer`;
- a ``.gguf`` model file: the Hugging Face tokenizer stored in it (with its chat template), wrapped alike.

``unit`` names what bits-per-unit metrics divide by, and :meth:`Tokenizer.count_units` counts it: the
bytes or characters a run of ids stands for. For ``bytes`` and ``chars`` one id is one unit; for a Hugging
Face tokenizer the unit is the UTF-8 byte, counted by decoding the ids (special tokens skipped).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from alambic.errors import ConfigError, DataError
from alambic.files import dumps_json, writing
from alambic.imports import package_file, require

TOKENIZER_FILE = "alambic-tokenizer.json"  # not tokenizer.json: a Hugging Face folder holds that one


@runtime_checkable
class Tokenizer(Protocol):
    """What language-model data needs from a tokenizer (alambic's own or a wrapped Hugging Face one)."""

    unit: str  # "byte" or "char": what count_units counts and bits-per-unit metrics divide by
    vocab_size: int
    eos_id: int | None  # appended to completions when not None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def count_units(self, ids: list[int]) -> int: ...

    def save(self, folder: str | Path) -> None: ...


class ByteTokenizer:
    """UTF-8 bytes as ids (``0..255``): any text, no unknown characters, no end-of-sequence token.

    Example:
        >>> ByteTokenizer().encode("hé")
        [104, 195, 169]
    """

    unit = "byte"
    vocab_size = 256
    eos_id = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")  # a window may cut a character in two

    def count_units(self, ids: list[int]) -> int:
        return len(ids)

    def save(self, folder: str | Path) -> None:
        _write_spec(folder, {"type": "alambic-bytes"})


class CharTokenizer:
    """The sorted distinct characters of a corpus as ids, as nanoGPT's character-level Shakespeare.

    Example:
        >>> tokenizer = CharTokenizer.from_corpus("hello")
        >>> tokenizer.chars, tokenizer.encode("hole")
        ('ehlo', [2, 3, 1, 0])
    """

    unit = "char"
    eos_id = None

    def __init__(self, chars: str) -> None:
        if not chars or len(set(chars)) != len(chars):
            raise ConfigError("a character tokenizer needs a non-empty string of distinct characters")
        self.chars = chars
        self.vocab_size = len(chars)
        self.index = {char: position for position, char in enumerate(chars)}

    @classmethod
    def from_corpus(cls, corpus: str) -> CharTokenizer:
        if not corpus:
            raise DataError("the character tokenizer is built from the training text, which is empty")
        return cls("".join(sorted(set(corpus))))

    def encode(self, text: str) -> list[int]:
        try:
            return [self.index[char] for char in text]
        except KeyError as error:
            raise DataError(
                f"character {error.args[0]!r} is not among the {self.vocab_size} characters of the character "
                "tokenizer (built from the training text); use tokenizer: bytes, or add it to the training text"
            ) from None

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[index] for index in ids)

    def count_units(self, ids: list[int]) -> int:
        return len(ids)

    def save(self, folder: str | Path) -> None:
        _write_spec(folder, {"type": "alambic-chars", "chars": self.chars})


class HFTokenizer:
    """A Hugging Face tokenizer seen through :class:`Tokenizer`; ``hf`` is the wrapped one.

    ``encode`` adds no special tokens (plain text is cut into windows; chat templates add their own).
    ``vocab_size`` is ``len(hf)``, added tokens included. The unit is the UTF-8 byte: ``count_units``
    decodes the ids without special tokens and counts bytes (a window decoded on its own may differ from
    its share of the text by a byte at its edges, e.g. SentencePiece's dropped leading space).
    """

    unit = "byte"

    def __init__(self, hf: Any) -> None:
        self.hf = hf
        self.vocab_size = len(hf)
        self.eos_id = hf.eos_token_id

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids)

    def count_units(self, ids: list[int]) -> int:
        return len(self.hf.decode(ids, skip_special_tokens=True).encode("utf-8"))

    def save(self, folder: str | Path) -> None:
        with writing(folder):
            self.hf.save_pretrained(str(folder))

    @property
    def pad_id(self) -> int:
        """The padding id: the tokenizer's pad token, else its EOS, else 0 (padding is masked anyway)."""
        for candidate in (self.hf.pad_token_id, self.hf.eos_token_id):
            if candidate is not None:
                return int(candidate)
        return 0

    def chat_ids(self, messages: list[dict], *, add_generation_prompt: bool = False) -> list[int]:
        """The ids of ``messages`` rendered by the tokenizer's chat template."""
        if not getattr(self.hf, "chat_template", None):
            raise ConfigError(
                f"chat rows need a tokenizer with a chat template; {self.hf.name_or_path!r} has none"
            )
        ids = self.hf.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False
        )
        return list(ids)


def load_tokenizer(spec: str, corpus: str | None = None) -> Tokenizer:
    """The tokenizer named by ``spec``: ``"bytes"``, ``"chars"`` (built from ``corpus``), a folder or a
    ``.gguf`` model file.

    A folder is one written by :meth:`Tokenizer.save` (``alambic-tokenizer.json``) or a Hugging Face
    tokenizer folder, read offline; a GGUF file gives the tokenizer and chat template stored in it
    (:func:`gguf_tokenizer`). Hub ids are not fetched: download the tokenizer first.

    Example:
        >>> tokenizer = load_tokenizer("chars", corpus="to be or not to be")
        >>> tokenizer.vocab_size, tokenizer.unit
        (7, 'char')
    """
    if spec == "bytes":
        return ByteTokenizer()
    if spec == "chars":
        if corpus is None:
            raise ConfigError('tokenizer "chars" is built from the training text; pass corpus=')
        return CharTokenizer.from_corpus(corpus)
    spec = package_file(str(spec))  # pkg:PACKAGE/PATH: inside an installed package
    folder = Path(spec).expanduser()
    if str(spec).lower().endswith(".gguf"):  # a GGUF model file holds its tokenizer and chat template
        return HFTokenizer(gguf_tokenizer(folder))
    if not folder.is_dir():
        raise ConfigError(
            f'tokenizer must be "bytes", "chars", a local tokenizer folder or a .gguf file; {spec!r} is not a '
            "folder (check the path)"
        )
    if (folder / TOKENIZER_FILE).is_file():
        return _read_spec(folder / TOKENIZER_FILE)
    transformers = require("transformers", "hf", purpose="Hugging Face tokenizers")
    try:
        return HFTokenizer(transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True))
    except (OSError, ValueError, TypeError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"cannot load a tokenizer from {folder}: {reason}") from None


def gguf_tokenizer(path: str | Path) -> Any:
    """The ``transformers`` tokenizer stored in a GGUF model file (vocabulary, merges, special tokens and
    chat template), read offline; a file it cannot be read from is a one-line :class:`ConfigError`."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"{path}: no such GGUF file; give the path of a .gguf model file")
    transformers = require("transformers", "hf", purpose="Hugging Face tokenizers")
    require("gguf", "hf", purpose="GGUF model files")  # read by transformers' GGUF loader
    try:
        return transformers.AutoTokenizer.from_pretrained(
            str(path.parent.resolve()), gguf_file=path.name, local_files_only=True
        )
    except Exception as error:  # any failure: the GGUF parser raises ValueError, struct.error, KeyError...
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"cannot load a tokenizer from the GGUF file {path}: {reason}") from None


def _write_spec(folder: str | Path, spec: dict) -> None:
    path = Path(folder) / TOKENIZER_FILE
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(dumps_json(spec, ensure_ascii=False) + "\n", encoding="utf-8")


def _read_spec(path: Path) -> Tokenizer:
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{path}: not a readable tokenizer file ({error})") from None
    kind = spec.get("type") if isinstance(spec, dict) else None
    if kind == "alambic-bytes":
        return ByteTokenizer()
    if kind == "alambic-chars" and isinstance(spec.get("chars"), str):
        return CharTokenizer(spec["chars"])
    raise DataError(
        f'{path}: expected {{"type": "alambic-bytes"}} or {{"type": "alambic-chars", "chars": ...}}'
    )
