"""Docstrings name what exists: every ``:func:`` / ``:class:`` / ``:mod:`` / ``:meth:`` / ``:data:`` /
``:attr:`` / ``:exc:`` target, and every ``alambic.dotted.name`` they mention, resolves by import.

A name is looked up as written (``alambic.core.loop.fit``), then relative to the docstring's module
(``fit`` in ``alambic.core.loop``) and to its parent packages (``core.loop.fit`` from ``alambic``).
"""

import ast
import importlib
import re
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[1] / "src"
ROLE = re.compile(r":(?:func|class|mod|meth|data|attr|exc|obj):`~?([^`<>]+?)(?:\s*<([^>]+)>)?`")
DOTTED = re.compile(r"(?<![\w./-])(alambic(?:\.[A-Za-z_][A-Za-z0-9_]*)+)")
FILE_SUFFIXES = (".json", ".yaml", ".md", ".py", ".txt", ".toml", ".safetensors")


def _found(dotted: str) -> bool:
    """Whether ``dotted`` names a module, or an attribute chain of the longest importable module prefix."""
    pieces = dotted.split(".")
    for cut in range(len(pieces), 0, -1):
        try:
            found = importlib.import_module(".".join(pieces[:cut]))
        except ImportError:
            continue
        for attribute in pieces[cut:]:
            if not hasattr(found, attribute):
                return False
            found = getattr(found, attribute)
        return True
    return False


def _resolves(name: str, module: str) -> bool:
    name = name.strip().removesuffix("()")
    parents = module.split(".")
    candidates = [name] + [".".join(parents[:cut] + [name]) for cut in range(len(parents), 0, -1)]
    return any(_found(candidate) for candidate in candidates if candidate.split(".")[0] in ("alambic",))


def _references(path: Path):
    """``(line, name)`` of every docstring reference in a source file."""
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        text = ast.get_docstring(node, clean=False) or ""
        line = getattr(node, "lineno", 1)
        for match in ROLE.finditer(text):
            target = match.group(2) or match.group(1)
            if "." in target or not match.group(0).startswith(
                (":meth:", ":attr:")
            ):  # a bare method: its class's
                yield line, target
        for match in DOTTED.finditer(text):
            if not match.group(1).endswith(FILE_SUFFIXES):
                yield line, match.group(1).rstrip(".")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # alambic 0.1's module paths are imported too
def test_every_docstring_reference_resolves():
    dead: list[str] = []
    for path in sorted((SOURCE / "alambic").rglob("*.py")):
        module = ".".join(path.relative_to(SOURCE).with_suffix("").parts).removesuffix(".__init__")
        for line, target in _references(path):
            external = target.split(".")[0] in (
                "torch",
                "transformers",
                "accelerate",
                "numpy",
                "optuna",
                "typer",
            )
            where = f"{path.relative_to(SOURCE)}:{line}: {target}"
            if not external and where not in dead and not _resolves(target, module):
                dead.append(where)
    assert not dead, "docstrings name what does not exist:\n" + "\n".join(dead)
