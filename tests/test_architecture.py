"""The package's floor plan holds (docs/architecture.md): imports run downward, checked by import-linter's
contracts in pyproject.toml; internal imports sit at the top of modules (never inside a function to dodge
a cycle); no ``_private`` name crosses a module boundary; modules stay small."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "alambic"
MAX_LINES = 500
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, ast.Module]:
    trees = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        trees[name] = ast.parse(path.read_text(), filename=str(path))
    return trees


def _internal_imports(tree: ast.Module):
    """``(node, inside_a_function)`` for every ``alambic`` import of a module."""
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            if (
                isinstance(child, ast.ImportFrom)
                and (child.module or "").split(".")[0] == "alambic"
                or isinstance(child, ast.Import)
                and any(a.name.split(".")[0] == "alambic" for a in child.names)
            ):
                found.append((child, in_function))
            visit(child, nested)

    visit(tree, False)
    return found


def test_import_linter_contracts_hold():
    """The layers of pyproject.toml's [tool.importlinter]: cli > run > strategies | compress > core > ..."""
    pytest.importorskip("importlinter", reason="import-linter is a dev dependency: pip install -e '.[dev]'")
    command = shutil.which("lint-imports") or "lint-imports"
    result = subprocess.run(
        [command, "--config", str(ROOT / "pyproject.toml")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT / "src"), "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout, result.stdout[-2000:]


def test_internal_imports_are_at_module_level():
    """Imports inside functions are for optional third-party packages only, never for alambic's own."""
    inside = [
        f"{name}:{node.lineno}"
        for name, tree in _modules().items()
        for node, in_function in _internal_imports(tree)
        if in_function
    ]
    assert not inside, f"alambic imports inside functions (move them to the top): {inside}"


def _import_graph(trees: dict[str, ast.Module]) -> dict[str, set[str]]:
    """Module -> the alambic modules it imports (``from package import module`` counts as the module)."""
    graph: dict[str, set[str]] = {name: set() for name in trees}
    for name, tree in trees.items():
        for node, _ in _internal_imports(tree):
            if isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    graph[name].add(full if full in trees else node.module)
            else:
                graph[name].update(alias.name for alias in node.names if alias.name in trees)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (a depth-first search for a back edge), or None."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return path[path.index(target) :] + [target]
            if target not in state and (found := visit(target)):
                return found
        path.pop()
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_the_import_graph_has_no_cycle():
    """Imports inside functions included: a cycle hidden in a function body would show here."""
    assert _cycle(_import_graph(_modules())) is None, _cycle(_import_graph(_modules()))


def test_no_private_name_crosses_a_module_boundary():
    """What two modules share is public and documented: no ``from alambic.x import _name``."""
    private = [
        f"{name}:{node.lineno} imports {alias.name} from {node.module}"
        for name, tree in _modules().items()
        for node, _ in _internal_imports(tree)
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
        if alias.name.startswith("_") and not (alias.name.startswith("__") and alias.name.endswith("__"))
    ]
    assert not private, private


def test_modules_stay_small():
    sizes = {
        str(path.relative_to(PACKAGE)): len(path.read_text().splitlines()) for path in PACKAGE.rglob("*.py")
    }
    large = {path: lines for path, lines in sizes.items() if lines > MAX_LINES}
    assert not large, f"modules over {MAX_LINES} lines (split them by job): {large}"


def _long_functions(trees: dict[str, ast.Module]) -> dict[str, int]:
    """``module:function -> lines`` (from ``def`` to its last line) for functions over the limit."""
    return {
        f"{name}:{node.name}": node.end_lineno - node.lineno + 1
        for name, tree in trees.items()
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    }


def test_functions_stay_short():
    long = _long_functions(_modules())
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines (split them into named steps): {long}"


def test_every_module_is_in_the_architecture_table():
    """docs/architecture.md names every module of the package (``run/plan.py``, ``cli.py``...)."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    missing = [
        str(path.relative_to(PACKAGE))
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name != "__init__.py" and f"`{path.relative_to(PACKAGE)}`" not in text
    ]
    planners = [path for path in missing if path.startswith("run/planners/")]
    if planners and "`run/planners/`" in text:  # the planners are listed by file name in one row
        missing = [path for path in missing if path not in planners or f"`{Path(path).name}`" not in text]
    assert not missing, f"modules missing from docs/architecture.md's table: {missing}"


def test_the_checks_can_fail(tmp_path):
    """The AST checks above see an import inside a function, a private name and a cycle (so they can fail)."""
    assert _long_functions({"m": ast.parse("def f():\n" + "    x = 1\n" * MAX_FUNCTION_LINES)}) == {"m:f": 81}
    tree = ast.parse("def f():\n    from alambic.core.loop import _x\n")
    ((node, in_function),) = _internal_imports(tree)
    assert in_function and node.names[0].name.startswith("_")
    a = ast.parse("from alambic.b import thing\n")
    b = ast.parse("def late():\n    from alambic.a import other\n")
    assert _cycle(_import_graph({"alambic.a": a, "alambic.b": b})) == ["alambic.a", "alambic.b", "alambic.a"]


def test_the_code_is_ruff_clean_and_ruff_formatted():
    """``ruff check`` and ``ruff format --check`` (pyproject.toml's settings) pass on the package, the tests and
    the benchmarks, so style stays a CI check and not a reviewer's chore."""
    command = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    if not Path(command).is_file():
        pytest.skip("ruff is a dev dependency: pip install -e '.[dev]'")
    folders = ["src", "tests", "benchmarks"]
    for arguments in (["check", *folders], ["format", "--check", *folders]):
        result = subprocess.run([command, *arguments], cwd=ROOT, capture_output=True, text=True)
        assert result.returncode == 0, (
            f"ruff {' '.join(arguments)}:\n{result.stdout[-3000:]}{result.stderr[-1000:]}"
        )
