"""``alambic losses`` and ``alambic inspect``: what the registry and a model offer to terms (``cli.py`` registers them)."""

from __future__ import annotations

import inspect as pyinspect
from types import SimpleNamespace
from typing import Annotated

import torch
import typer
from rich.markup import escape
from rich.table import Table

from alambic.commands.options import Debug, yaml_mapping
from alambic.config import ModelConfig
from alambic.console import console, print_table
from alambic.core.hooks import module_table
from alambic.errors import AlambicError
from alambic.losses import get_loss_spec, list_losses
from alambic.run.building import build_named_model


def losses(
    name: Annotated[
        str | None, typer.Argument(help="a loss: its parameters, formula, inputs and paper")
    ] = None,
    debug: Debug = False,
) -> None:
    """List every registered loss with a one-line description and its paper, or show one loss whole."""
    if name is not None:
        spec = get_loss_spec(name)  # an unknown name: one line with the close matches
        console.print(f"[bold]{escape(spec.name)}[/]: {escape(spec.description)}")
        console.print(f"compares: {spec.inputs}; paper: {escape(spec.paper)}")
        needs = [word for word, flag in (("a teacher", spec.needs_teacher), ("labels", spec.needs_labels),
                                          ("sample indices", spec.needs_index)) if flag]  # fmt: skip
        console.print(f"needs: {', '.join(needs) or 'nothing beyond the student'}")
        if spec.hyper_parameters:
            shown = ", ".join(f"{key} = {value!r}" for key, value in spec.hyper_parameters.items())
            console.print(f"parameters (defaults): {escape(shown)}")
        else:
            console.print("parameters: none")
        console.print(escape(pyinspect.getdoc(spec.fn) or ""), highlight=False)
        return
    table = Table(title="registered losses")
    for column in ("name", "compares", "description", "paper"):
        table.add_column(column, overflow="fold")
    for spec in list_losses():
        table.add_row(spec.name, spec.inputs, spec.description, spec.paper)
    print_table(table)


def inspect(
    arch: Annotated[str, typer.Argument(help="zoo name (resnet20, mlp, ...) or package.module:function")],
    input_shape: Annotated[str, typer.Option(help="one sample's shape, e.g. 3,32,32 or 784")] = "3,32,32",
    num_classes: Annotated[int, typer.Option(help="classes of a zoo model")] = 10,
    kwargs: Annotated[str, typer.Option(help="model arguments as YAML, e.g. '{hidden: [64]}'")] = "{}",
    depth: Annotated[int | None, typer.Option(help="show modules at most this deep")] = None,
    debug: Debug = False,
) -> None:
    """Print a model's modules with their output shapes: the names terms can compare."""
    try:
        shape = tuple(int(size) for size in input_shape.split(","))
    except ValueError:
        raise AlambicError(f"--input-shape takes sizes like 3,32,32, got {input_shape!r}") from None
    model_kwargs = yaml_mapping(kwargs, "--kwargs")
    model = build_named_model(
        ModelConfig(arch=arch, kwargs=model_kwargs),
        SimpleNamespace(num_classes=num_classes, input_shape=shape),
    )
    table = Table(title=f"{arch}: modules and output shapes for one input of shape {shape}")
    for column in ("module", "type", "output shape", "params"):
        table.add_column(column, justify="right" if column == "params" else "left")
    for row in module_table(model, torch.zeros(1, *shape), max_depth=depth):
        shown = "x".join(map(str, row.output_shape)) if row.output_shape else "-"
        table.add_row(row.path, row.kind, shown, f"{row.parameters:,}")
    print_table(table)
