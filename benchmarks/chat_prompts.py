"""Chat prompt files from the shared data (issue 26, "Chat data for real"), for the chat benchmark:
sequence-level KD on a prompt file and ROUGE-L of greedy answers on held-out prompts.

Each row is one conversation, ``{"messages": [{"role": "user", "content": INSTRUCTION}, {"role":
"assistant", "content": ANSWER}]}``: the instruction wraps an AG News article or an SST-2 sentence, the
answer is its label's name. The same file serves as

- ``data.train_file`` (``dataset: jsonl``): the baseline learns the answers (the loss on the assistant turn);
- ``distill.sequence_kd.prompts_file``: the teacher answers the prompts (the final assistant message is
  dropped, it is only the reference);
- ``evaluate.rouge.file`` (the held-out file): ROUGE-L of each model's greedy answers against the labels.

Deterministic: rows are shuffled with ``--seed`` and cut into ``--held-out`` held-out rows then ``--train``
training rows, disjoint. AG News has only its test split here (7,600 rows), so both files come from it;
SST-2 takes its held-out rows from ``dev.tsv`` and its training rows from ``train.tsv``.

    python benchmarks/chat_prompts.py --data-dir ../shared/data --out runs/chat-data --source ag-news
    python benchmarks/chat_prompts.py --data-dir ../shared/data --out runs/chat-data --source sst2 --train 2000

writes ``OUT/SOURCE-train.jsonl`` and ``OUT/SOURCE-held-out.jsonl`` and prints their sizes and one row.
"""

from __future__ import annotations

import argparse
import csv
import html
import json
import random
import re
from pathlib import Path

AG_NEWS_LABELS = {1: "World", 2: "Sports", 3: "Business", 4: "Sci/Tech"}
AG_NEWS_INSTRUCTION = "Classify this news article: {text}\nAnswer with World, Sports, Business or Sci/Tech."
SST2_LABELS = {0: "negative", 1: "positive"}
SST2_INSTRUCTION = (
    "Is this movie review positive or negative? Review: {text}\nAnswer with positive or negative."
)


def clean(text: str) -> str:
    """AG News's escapes made plain: ``#39;`` and ``quot;`` (entities without their ``&``), ``\\`` breaks,
    HTML tags (``<b>...</b>``)."""
    text = text.replace("#39;", "'").replace("quot;", '"').replace("#36;", "$").replace("\\", " ")
    return " ".join(re.sub(r"<[^>]+>", "", html.unescape(text)).split())


def conversation(instruction: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": instruction}, {"role": "assistant", "content": answer}]}


def ag_news_rows(data_dir: Path) -> list[dict]:
    with open(data_dir / "ag-news" / "test.csv", encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    return [
        conversation(
            AG_NEWS_INSTRUCTION.format(text=clean(f"{row['title']}. {row['description']}")),
            AG_NEWS_LABELS[int(row["label"])],
        )
        for row in rows
    ]


def sst2_rows(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [
        conversation(SST2_INSTRUCTION.format(text=row["sentence"].strip()), SST2_LABELS[int(row["label"])])
        for row in rows
    ]


def split(source: str, data_dir: Path, train: int, held_out: int, seed: int) -> tuple[list[dict], list[dict]]:
    """``(training rows, held-out rows)``, disjoint, from a seeded shuffle."""
    rng = random.Random(seed)
    if source == "ag-news":
        rows = ag_news_rows(data_dir)
        rng.shuffle(rows)
        if train + held_out > len(rows):
            raise SystemExit(f"AG News has {len(rows)} rows here: ask for at most that many in all")
        return rows[held_out : held_out + train], rows[:held_out]
    training, evaluation = (
        sst2_rows(data_dir / "sst2" / "train.tsv"),
        sst2_rows(data_dir / "sst2" / "dev.tsv"),
    )
    rng.shuffle(training)
    rng.shuffle(evaluation)
    return training[:train], evaluation[:held_out]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--source", choices=["ag-news", "sst2"], default="ag-news")
    parser.add_argument("--train", type=int, default=1000, help="training prompts")
    parser.add_argument("--held-out", type=int, default=200, help="held-out prompts (ROUGE-L)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    train, held_out = split(args.source, args.data_dir, args.train, args.held_out, args.seed)
    for part, rows in (("train", train), ("held-out", held_out)):
        path = args.out / f"{args.source}-{part}.jsonl"
        write_jsonl(path, rows)
        print(f"{path}: {len(rows)} rows, {path.stat().st_size:,} bytes")
    print(json.dumps(held_out[0], ensure_ascii=False))


if __name__ == "__main__":
    main()
