"""What several commands share: the ``--debug`` option and YAML mappings given as options."""

from __future__ import annotations

from typing import Annotated

import typer
import yaml

from alambic.errors import AlambicError

Debug = Annotated[bool, typer.Option("--debug", help="Show the full traceback on errors.")]


def yaml_mapping(text: str, option: str) -> dict:
    """An option's YAML mapping (``'{hidden: [64]}'``), or a one-line error."""
    try:
        value = yaml.safe_load(text) or {}
    except yaml.YAMLError:
        value = None
    if not isinstance(value, dict):
        raise AlambicError(f"{option} must be a YAML mapping like '{{hidden: [64]}}', got {text!r}")
    return value
