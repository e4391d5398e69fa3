"""Small text corpora written by tests: random sentences over a fixed vocabulary of words."""

import random
from pathlib import Path

WORDS = [
    "the",
    "cat",
    "sat",
    "on",
    "a",
    "mat",
    "and",
    "dog",
    "ran",
    "to",
    "park",
    "while",
    "birds",
    "sang",
    "over",
    "green",
    "hills",
]


def word_corpus(path: Path, *, lines: int = 300, words_per_line: int = 10, seed: int = 0) -> Path:
    """Write ``lines`` lines of ``words_per_line`` random words of :data:`WORDS` to ``path``; returns it."""
    rng = random.Random(seed)
    path.write_text(
        "\n".join(" ".join(rng.choice(WORDS) for _ in range(words_per_line)) for _ in range(lines))
    )
    return path
