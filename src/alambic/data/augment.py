"""Text augmentation for distillation: new inputs for the teacher to label (a transfer set).

A teacher can teach on inputs nobody labelled (Hinton et al.'s transfer set), and a small labelled text
set can be enlarged with sentences derived from it. Two papers do it for BERT teachers:

- Tang et al. 2019, "Distilling Task-Specific Knowledge from BERT into Simple Neural Networks"
  (https://arxiv.org/abs/1903.12136), section 3.3: each word is masked with probability ``p_mask``, or
  replaced by a word of the same part of speech with ``p_pos``; then, with ``p_ng``, an n-gram
  (n uniform in 1..5) of the example is kept; 20 draws per sentence, duplicates removed.
- Jiao et al. 2020, "TinyBERT" (https://arxiv.org/abs/1909.10351), section 3.1: words are replaced by
  close words (BERT's predictions, or GloVe nearest neighbours for words of several pieces).

Here the replacement of Tang et al.'s second rule is TinyBERT's idea without an extra model: one of the
``k`` nearest tokens, by cosine similarity, in the **teacher's own input-embedding table**. Per draw and
per word (the words of the teacher's fast tokenizer, ``word_ids()``), one uniform number ``u``:
``u < mask`` replaces the word by the mask token (one mask for all its pieces), ``u < mask + neighbours``
replaces it by a neighbour, else it is kept. Only a word that is one whole token of the vocabulary, of
two characters or more with a letter, is replaced by a neighbour, and only by such tokens: word pieces
(``##ing``), special and added tokens, ``[unusedN]``, single characters, punctuation and numbers are
neither replaced nor chosen (a word of several pieces has no one embedding row; single-letter,
punctuation and digit neighbours are noise). Then, with probability ``ngram``, the draw keeps only ``n``
consecutive words (n uniform in ``1..max_ngram``), the text between them kept as it was.

Every number is drawn from ``numpy.random.default_rng([seed, index])`` of the sentence's index, all of
them whatever the probabilities, so the output depends on the seed and the sentence alone: not on the
thread count or the other sentences. Neighbours are shortlisted in float32 and ranked in float64 rounded
to 1e-9, ties broken by token id, so BLAS rounding differences across CPUs and thread counts do not
change them.

The output holds the new sentences only: a draw equal to any input sentence, or to an earlier draw, is
dropped (the labelled set already holds the originals), so a sentence yields *up to* ``copies`` lines.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from alambic.errors import ConfigError, OutputError
from alambic.files import atomic_write_text, dumps_json

FORMAT = 1  # of the sidecar JSON; a change of the algorithm that changes outputs bumps it
RANK_DECIMALS = 9  # similarities rounded before ranking: BLAS results differ in their last bits


def sidecar_path(out_path: str | Path) -> Path:
    """The JSON written beside an augmented file: ``OUT.json`` (``transfer.txt`` -> ``transfer.txt.json``)."""
    out_path = Path(out_path)
    return out_path.with_name(out_path.name + ".json")


def replaceable_tokens(tokenizer: Any, vocab_size: int) -> np.ndarray:
    """``[vocab_size]`` bools: the ids that are a whole word of two characters or more with a letter, and
    encode back to themselves.

    A token qualifies when its decoded text has two characters or more (single letters are noise: MiniLM's
    nearest token to ``wit`` is ``w``), one of them a letter, and the tokenizer encodes that text to that
    one id: word pieces (``##ing`` encodes to ``#``, ``#``, ``ing``), ``[unusedN]`` and tokens the
    tokenizer never produces fail; special and added tokens are excluded by name.
    """
    ids = list(range(vocab_size))
    texts = tokenizer.batch_decode([[index] for index in ids])
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    excluded = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    return np.array([
        index not in excluded and list(codes) == [index] and len(text.strip()) > 1
        and any(char.isalpha() for char in text)
        for index, text, codes in zip(ids, texts, encoded, strict=True)
    ])  # fmt: skip


def nearest_neighbours(
    embeddings: np.ndarray, queries: np.ndarray, candidates: np.ndarray, k: int, *, chunk: int = 256
) -> np.ndarray:
    """The ``k`` candidate ids closest to each query id by cosine similarity, nearest first: ``[Q, k]``.

    Args:
        embeddings: ``[V, D]`` the teacher's input-embedding table.
        queries: ``[Q]`` token ids whose neighbours are wanted (a query is never its own neighbour).
        candidates: ``[C]`` token ids a neighbour is chosen from (``C > k``).
        k: neighbours per query.
        chunk: queries per matrix product (``chunk x C`` similarities in memory at once).

    Example:
        >>> table = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.0]])
        >>> nearest_neighbours(table, np.array([0]), np.arange(4), 2)
        array([[1, 2]])
    """
    table = np.asarray(embeddings, dtype=np.float64)
    table = table / np.maximum(np.linalg.norm(table, axis=1, keepdims=True), 1e-12)  # rows of norm 1
    candidate_rows = table[candidates].astype(np.float32)  # [C, D]
    # a float32 product shortlists k + 8 candidates; their float64 similarities, rounded, then decide
    # (ties by id), so BLAS rounding in the last bits of either never changes the neighbours
    shortlist = min(k + 8, len(candidates) - 1)
    found = np.empty((len(queries), k), dtype=np.int64)
    for begin in range(0, len(queries), chunk):
        ids = queries[begin : begin + chunk]
        similarity = table[ids].astype(np.float32) @ candidate_rows.T  # [c, C]
        similarity[ids[:, None] == candidates[None, :]] = -np.inf  # not its own neighbour
        best = candidates[np.argpartition(-similarity, shortlist, axis=1)[:, : shortlist + 1]]  # [c, s]
        exact = np.round(np.einsum("cd,csd->cs", table[ids], table[best]), RANK_DECIMALS)  # [c, s]
        exact[best == ids[:, None]] = -np.inf
        order = np.lexsort((best, -exact), axis=-1)[:, :k]  # by similarity, then by id
        found[begin : begin + len(ids)] = np.take_along_axis(best, order, axis=1)
    return found


def sentence_words(tokenizer: Any, texts: list[str]) -> list[list[tuple[int, int, int]]]:
    """Each sentence's words as ``(start, end, token id)`` character spans; the id is -1 for a word of
    several tokens. Needs a fast tokenizer (``word_ids()`` and offsets)."""
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError("text augmentation needs a fast (Rust) Hugging Face tokenizer for word boundaries")
    encoding = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    sentences = []
    for index in range(len(texts)):
        words: dict[int, list[tuple[int, int, int]]] = {}
        offsets, ids = encoding["offset_mapping"][index], encoding["input_ids"][index]
        for word, (start, end), token in zip(encoding.word_ids(index), offsets, ids, strict=True):
            if word is not None:
                words.setdefault(word, []).append((start, end, token))
        sentences.append([
            (pieces[0][0], pieces[-1][1], pieces[0][2] if len(pieces) == 1 else -1) for pieces in words.values()
        ])  # fmt: skip
    return sentences


def augment_sentence(
    text: str,
    words: list[tuple[int, int, int]],
    rng: np.random.Generator,
    *,
    copies: int,
    mask: float,
    neighbours: float,
    ngram: float,
    max_ngram: int,
    mask_token: str,
    neighbour_text: dict[int, list[str]],
) -> list[str]:
    """``copies`` draws of one sentence (duplicates and unchanged ones included), as described above.

    ``neighbour_text[id]`` lists the texts of the ``k`` neighbours of a replaceable token id.
    """
    if not words:
        return []
    choice = rng.random((copies, len(words)))  # per word: mask, neighbour or keep
    pick = rng.random((copies, len(words)))  # which neighbour
    cut = rng.random(copies) < ngram
    lengths = rng.integers(1, max_ngram + 1, size=copies)
    starts = rng.random(copies)
    gaps = [""] + [text[words[i - 1][1] : words[i][0]] for i in range(1, len(words))]
    drawn = []
    for copy in range(copies):
        pieces = []
        for position, (start, end, token) in enumerate(words):
            if choice[copy, position] < mask:
                piece = mask_token
            elif choice[copy, position] < mask + neighbours and token in neighbour_text:
                options = neighbour_text[token]
                piece = options[int(pick[copy, position] * len(options))]
            else:
                piece = text[start:end]
            pieces.append(piece)
        first, last = 0, len(words)
        if cut[copy]:
            size = min(int(lengths[copy]), len(words))
            first = int(starts[copy] * (len(words) - size + 1))
            last = first + size
        inner = "".join(gaps[position] + pieces[position] for position in range(first + 1, last))
        head = (text[: words[0][0]] if first == 0 else "") + pieces[first]
        tail = text[words[-1][1] :] if last == len(words) else ""
        drawn.append((head + inner + tail).strip())
    return drawn


def augment_texts(
    texts: list[str],
    tokenizer: Any,
    embeddings: np.ndarray,
    *,
    copies: int,
    mask: float,
    neighbours: float,
    ngram: float,
    k: int,
    max_ngram: int,
    seed: int,
) -> tuple[list[str], dict[str, int]]:
    """The new sentences drawn from ``texts`` (each input's in draw order), and counts of what was dropped.

    Args:
        texts: input sentences.
        tokenizer: the teacher's fast Hugging Face tokenizer.
        embeddings: ``[V, D]`` the teacher's input-embedding table (rows past the tokenizer's are unused).
        copies: draws per sentence (Tang et al.: 20).
        mask, neighbours, ngram: the probabilities above (Tang et al.: 0.1, 0.1, 0.25).
        k: neighbours to choose from (TinyBERT: 15).
        max_ngram: longest n-gram kept (Tang et al.: 5).
        seed: the seed of every draw.

    Example:
        >>> lines, counts = augment_texts(["a fine film"], tokenizer, table, copies=20, mask=0.1,
        ...                               neighbours=0.1, ngram=0.25, k=15, max_ngram=5, seed=0)
    """
    if mask > 0 and tokenizer.mask_token is None:
        raise ConfigError("the teacher's tokenizer has no mask token; set the masking probability to 0")
    words = sentence_words(tokenizer, texts)
    neighbour_text: dict[int, list[str]] = {}
    if neighbours > 0:
        vocab_size = min(len(tokenizer), len(embeddings))
        replaceable = replaceable_tokens(tokenizer, vocab_size)
        candidates = np.flatnonzero(replaceable)
        if len(candidates) <= k:
            raise ConfigError(
                f"the teacher's vocabulary has {len(candidates)} whole-word tokens, too few for {k} neighbours; "
                "lower k or set the neighbour probability to 0"
            )
        used = sorted({token for sentence in words for _, _, token in sentence if 0 <= token < vocab_size})
        queries = np.array([token for token in used if replaceable[token]], dtype=np.int64)
        found = nearest_neighbours(embeddings, queries, candidates, k)
        names = tokenizer.batch_decode([[int(token)] for token in np.unique(found)])
        text_of = dict(zip(np.unique(found).tolist(), (name.strip() for name in names), strict=True))
        neighbour_text = {
            int(query): [text_of[int(token)] for token in row] for query, row in zip(queries, found)
        }
    seen = set(texts)
    lines: list[str] = []
    drawn = 0
    for index, (text, sentence) in enumerate(zip(texts, words, strict=True)):
        rng = np.random.default_rng([seed, index])
        for line in augment_sentence(
            text, sentence, rng, copies=copies, mask=mask, neighbours=neighbours, ngram=ngram,
            max_ngram=max_ngram, mask_token=tokenizer.mask_token or "", neighbour_text=neighbour_text,
        ):  # fmt: skip
            drawn += 1
            if line and line not in seen:
                seen.add(line)
                lines.append(line)
    counts = {"inputs": len(texts), "drawn": drawn, "written": len(lines), "dropped": drawn - len(lines)}
    return lines, counts


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def teacher_fingerprint(tokenizer: Any, embeddings: np.ndarray) -> dict[str, str]:
    """sha256 digests of the tokenizer's vocabulary and of the embedding table (float32 bytes)."""
    vocabulary = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode()
    table = np.ascontiguousarray(embeddings, dtype=np.float32)
    return {"vocabulary_sha256": _sha256(vocabulary), "embeddings_sha256": _sha256(table.tobytes())}


def write_augmented(
    texts: list[str],
    out_path: str | Path,
    tokenizer: Any,
    embeddings: np.ndarray,
    *,
    describe: dict | None = None,
    **settings: Any,
) -> dict:
    """Write :func:`augment_texts`'s sentences to ``out_path`` (one per line) and a JSON sidecar beside it,
    each atomically; reuse them when the sidecar records the same settings, inputs and teacher.

    ``settings`` are :func:`augment_texts`'s keyword arguments; ``describe`` (the source file, the teacher's
    name) is stored in the sidecar but does not decide reuse. A file at ``out_path`` that has no sidecar
    is not alambic's and is never overwritten. Returns the sidecar's record, with ``reused``.

    Example:
        >>> record = write_augmented(sentences, "transfer.txt", tokenizer, table, copies=20, mask=0.1,
        ...                          neighbours=0.1, ngram=0.25, k=15, max_ngram=5, seed=0)
        >>> record["counts"]["written"], record["reused"]
    """
    out_path, sidecar = Path(out_path), sidecar_path(out_path)
    key = {
        "format": FORMAT,
        "settings": dict(sorted(settings.items())),
        "inputs_sha256": _sha256("\n".join(texts).encode()),
        "teacher": teacher_fingerprint(tokenizer, embeddings),
    }
    if out_path.exists():
        previous = _read_sidecar(sidecar, out_path)
        if previous.get("key") == key and previous.get("output_sha256") == _sha256(out_path.read_bytes()):
            return {**previous, "reused": True}
    lines, counts = augment_texts(texts, tokenizer, embeddings, **settings)
    text = "".join(line + "\n" for line in lines)
    record = {
        "key": key,
        "describe": describe or {},
        "counts": counts,
        "output_sha256": _sha256(text.encode()),
    }
    atomic_write_text(out_path, text)
    atomic_write_text(sidecar, dumps_json(record, indent=2) + "\n")
    return {**record, "reused": False}


def _read_sidecar(sidecar: Path, out_path: Path) -> dict:
    """The sidecar of an existing output (``{}`` when unreadable: it is rewritten), or a one-line error
    when there is none: the file is someone else's."""
    if not sidecar.is_file():
        raise OutputError(
            f"{out_path} exists and is not an augmented file alambic wrote (no {sidecar.name} beside it); "
            "remove it or pick another --out"
        )
    try:
        record = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}
