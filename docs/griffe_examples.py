"""Griffe extension for the manual: read a Google-style ``Example:`` section as ``Examples:``.

alambic's docstrings name the section ``Example:`` (DESIGN.md); griffe's Google parser knows only
``Examples:`` as a section of ``>>>`` code and reads ``Example:`` as an admonition of Markdown text, where
``>>> x["a"]`` lines become block quotes and reference links. mkdocs.yml loads this file.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:[ \t]*$", re.MULTILINE)


class ExampleSections(griffe.Extension):
    """Rename each docstring's ``Example:`` heading to ``Examples:`` before griffe parses it."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _EXAMPLE.sub(r"\1Examples:", obj.docstring.value)
