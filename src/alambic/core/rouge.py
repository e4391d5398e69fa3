"""ROUGE-L: how much of a reference answer a generated answer recovers, in order (Lin 2004, "ROUGE: A
Package for Automatic Evaluation of Summaries", https://aclanthology.org/W04-1013/).

With ``LCS`` the length of the longest common subsequence of the candidate's and the reference's tokens,
``R = LCS / len(reference)``, ``P = LCS / len(candidate)`` and ``F = 2PR / (P + R)`` (Lin's F-measure with
beta = 1, as ``rouge-score``'s ``rougeL``, which MiniLLM and DistiLLM report x 100). Tokens are the text
lowercased and cut into runs of letters and digits (``rouge-score``'s tokenizer, without its optional
stemmer, and for any script): ``"Sports."`` matches ``"sports"``. An empty side scores 0.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_TOKEN = re.compile(r"[^\W_]+")  # letters and digits, any script


def rouge_tokens(text: str) -> list[str]:
    """The tokens ROUGE-L compares: ``text`` lowercased, runs of letters and digits.

    Example:
        >>> rouge_tokens("Sci/Tech, mostly.")
        ['sci', 'tech', 'mostly']
    """
    return _TOKEN.findall(text.lower())


def lcs_length(first: Sequence[str], second: Sequence[str]) -> int:
    """The length of the longest common subsequence of two token lists (dynamic programming, one row)."""
    if len(second) > len(first):
        first, second = second, first
    row = [0] * (len(second) + 1)
    for token in first:
        diagonal = 0  # the previous row's value one column left
        for column, other in enumerate(second, start=1):
            above = row[column]
            row[column] = diagonal + 1 if token == other else max(row[column - 1], above)
            diagonal = above
    return row[-1]


def rouge_l(candidate: str, reference: str) -> dict[str, float]:
    """ROUGE-L of a candidate answer against a reference: ``{"precision", "recall", "f"}`` in [0, 1].

    Example:
        >>> rouge_l("the cat sat on the mat", "the cat is on the mat")["f"]  # LCS 5 of 6 and 6 tokens
        0.8333333333333334
    """
    candidate_tokens, reference_tokens = rouge_tokens(candidate), rouge_tokens(reference)
    common = lcs_length(candidate_tokens, reference_tokens)
    if common == 0:
        return {"precision": 0.0, "recall": 0.0, "f": 0.0}
    precision, recall = common / len(candidate_tokens), common / len(reference_tokens)
    return {"precision": precision, "recall": recall, "f": 2 * precision * recall / (precision + recall)}


def mean_rouge_l(candidates: Sequence[str], references: Sequence[str]) -> float:
    """The mean ROUGE-L F-measure over pairs of candidate and reference answers (0 for no pair)."""
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates for {len(references)} references: give one each")
    scores = [rouge_l(candidate, reference)["f"] for candidate, reference in zip(candidates, references)]
    return sum(scores) / len(scores) if scores else 0.0
