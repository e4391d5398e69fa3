"""``alambic augment``: a thin wrapper over :func:`alambic.run.augment.augment_file`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from alambic.config.augment import augment_settings
from alambic.console import console
from alambic.run.augment import augment_file


def augment(
    source: Annotated[
        Path, typer.Argument(help="sentences: a .txt file (one a line) or an SST-2 style .tsv")
    ],
    teacher: Annotated[
        str, typer.Option(help="hf:FOLDER_OR_HUB_ID or a run directory: its tokenizer and embedding table")
    ],
    out: Annotated[Path, typer.Option(help="the .txt file to write (a transfer set: data.transfer.path)")],
    copies: Annotated[
        int, typer.Option(help="draws per sentence, duplicates dropped (Tang et al.: 20)")
    ] = 20,
    mask: Annotated[float, typer.Option(help="per word: probability of the mask token")] = 0.1,
    neighbours: Annotated[
        float, typer.Option(help="per word: probability of a nearest token in the teacher's embeddings")
    ] = 0.1,
    ngram: Annotated[float, typer.Option(help="per draw: probability of keeping only an n-gram")] = 0.25,
    k: Annotated[int, typer.Option(help="nearest tokens to choose from (TinyBERT: 15)")] = 15,
    max_ngram: Annotated[int, typer.Option(help="longest n-gram kept")] = 5,
    seed: Annotated[int, typer.Option(help="seed of every draw")] = 0,
    debug: Annotated[bool, typer.Option("--debug", help="Show the full traceback on errors.")] = False,
) -> None:
    """Augment sentences for distillation (masking, embedding neighbours, n-grams) into a transfer set."""
    started = time.perf_counter()
    settings = augment_settings(
        copies=copies, mask=mask, neighbours=neighbours, ngram=ngram, k=k, max_ngram=max_ngram, seed=seed
    )
    record = augment_file(source, out, teacher=teacher, settings=settings)
    counts = record["counts"]
    if record["reused"]:
        console.print(
            f"{out} is up to date ({counts['written']:,} sentences; same settings, inputs and teacher)"
        )
        return
    console.print(
        f"wrote {counts['written']:,} sentences from {counts['inputs']:,} inputs to {out} "
        f"({counts['dropped']:,} of {counts['drawn']:,} draws dropped as duplicates or unchanged) "
        f"in {time.perf_counter() - started:.1f} s; train with --set data.transfer.path={out}"
    )
