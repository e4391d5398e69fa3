"""The manual builds without a warning, and the commands README.md and docs/ show are real.

- ``mkdocs build --strict`` passes: every page in the nav, every internal link and anchor resolves, every
  ``::: alambic...`` block renders from the docstrings.
- README.md's shell commands run as written (the ``alambic ...`` lines of its bash blocks, in order, in
  one scratch folder): a newcomer's first commands work.
- Every ``alambic SUBCOMMAND`` in README.md and docs/ names a real subcommand, and every ``recipes/...``
  file they mention exists.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from alambic.cli import app

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
FENCE = re.compile(r"^([ \t]*)```(\w*)[^\n]*\n(.*?)^\1```", re.MULTILINE | re.DOTALL)
SHELL = {"bash", "sh", "shell", "console"}
NOT_RUN = {"pip", "pytest", "mkdocs"}  # installs, the suite itself, and the build test_mkdocs_build runs
COMMAND_TIMEOUT_S = 600


def shared_data_dir() -> Path:
    """``$ALAMBIC_SHARED_DATA``, else ``../shared/data`` beside the checkout (as tests/test_data.py)."""
    if os.environ.get("ALAMBIC_SHARED_DATA"):
        return Path(os.environ["ALAMBIC_SHARED_DATA"])
    return ROOT.parent / "shared" / "data"


def manual_files() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


def code_blocks(text: str, languages: set[str]) -> list[str]:
    """The bodies of the fenced code blocks in ``languages``, indentation (a block in a list) removed."""
    blocks = []
    for indent, language, body in FENCE.findall(text):
        if language in languages:
            blocks.append("\n".join(line[len(indent) :] for line in body.splitlines()))
    return blocks


def command_lines(block: str) -> list[str]:
    """A shell block's commands: ``\\``-continued lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    commands = []
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        if words:
            commands.append(shlex.join(words))
    return commands


def subcommands() -> set[str]:
    """What ``alambic --help`` lists."""
    return set(typer.main.get_command(app).commands)


def test_readme_is_short_and_starts_with_the_lean_install():
    lines = README.read_text().splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines; the manual (docs/) is the place for more"
    first = command_lines(code_blocks(README.read_text(), SHELL)[0])
    assert first[:3] == ["pip install torch==2.13.0", "pip install -e .", "alambic demo"], first


@pytest.mark.skipif(
    not all(importlib.util.find_spec(name) for name in ("mkdocs", "material", "mkdocstrings_handlers")),
    reason='mkdocs, mkdocs-material or mkdocstrings[python] is not installed (pip install -e ".[docs]")',
)
def test_mkdocs_build_is_strict_clean(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "methods" / "logit" / "index.html").exists()


def alambic_words(text: str) -> list[str]:
    """The word after each ``alambic`` command: in inline code (`` `alambic run ...` ``) and on the lines of
    code blocks other than Python (shell, YAML comments, ``python -m alambic.cli run``)."""
    words = re.findall(r"`alambic(?:\.cli)? +([-\w]+)", text)
    for _, language, body in FENCE.findall(text):
        if language in SHELL:
            body = "\n".join(command_lines(body))  # commands only: no "# alambic needs ..." comment
        if language not in {"python", "py", "pycon"}:
            words += re.findall(r"(?:^|\s)alambic(?:\.cli)? +([-\w]+)", body, re.MULTILINE)
    return words


def test_commands_in_the_manual_name_real_subcommands():
    known = subcommands() | {"--version", "--help"}
    wrong = [
        f"{path.relative_to(ROOT)}: alambic {word}"
        for path in manual_files()
        for word in alambic_words(path.read_text())
        if word not in known
    ]
    assert not wrong, f"not an alambic subcommand (alambic --help lists {sorted(known)}): {wrong}"


def test_files_the_manual_names_exist():
    """``recipes/...`` files (a glob such as ``recipes/lm/*.yaml`` must match one), and the modules, tests
    and benchmark scripts the manual points at (``alambic/run/preflight.py`` lives under ``src/``)."""
    names = re.compile(
        r"(?<![\w/.-])(?:recipes/[\w./*-]*\w\.(?:yaml|jsonl|txt\.gz)|alambic/[\w/]+\.py|(?:tests|benchmarks)/\w+\.py)"
    )
    missing = []
    for path in manual_files():
        for name in names.findall(path.read_text()):
            root = ROOT / "src" if name.startswith("alambic/") else ROOT
            if not glob.glob(str(root / name)):
                missing.append(f"{path.relative_to(ROOT)}: {name}")
    assert not missing, f"files named in the manual that do not exist: {missing}"


def test_readme_links_resolve():
    """README.md is read on GitHub and PyPI, outside the manual's build: its relative links must name files."""
    missing = [
        target
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README.read_text())
        if not re.match(r"[a-z]+:", target) and not (ROOT / target).exists()
    ]
    assert not missing, f"README.md links to files that do not exist: {missing}"


def alambic_executable() -> list[str]:
    """The ``alambic`` of the Python running the tests (not whichever comes first on PATH)."""
    script = Path(sys.executable).parent / "alambic"
    return [str(script)] if script.exists() else [sys.executable, "-m", "alambic.cli"]


def readme_commands() -> list[str]:
    commands = [line for block in code_blocks(README.read_text(), SHELL) for line in command_lines(block)]
    unknown = [line for line in commands if line.split()[0] not in NOT_RUN | {"alambic"}]
    assert not unknown, f"README.md shows commands this test neither runs nor knows to skip: {unknown}"
    return [line for line in commands if line.split()[0] == "alambic"]


def test_readme_commands_run_as_written(tmp_path):
    """Each ``alambic`` line of README.md's bash blocks, in order, from one scratch folder that holds
    ``recipes/`` and sees ``../shared/data`` as a checkout does. One torch thread unless the caller set
    ``OMP_NUM_THREADS``: with more threads than free cores the tiny models wait on each other (on a shared
    2-core machine `alambic demo` took 114 s of CPU with two threads, 13 s with one)."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "recipes").symlink_to(ROOT / "recipes")
    shared = shared_data_dir()
    if shared.exists():
        (tmp_path / "shared").mkdir()
        (tmp_path / "shared" / "data").symlink_to(shared)
    commands = readme_commands()
    assert commands, "README.md shows no alambic command"
    skipped = []
    for command in commands:
        if "../shared/data" in command and not shared.exists():
            skipped.append(command)
            continue
        result = subprocess.run(
            [*alambic_executable(), *shlex.split(command)[1:]],
            cwd=work,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT_S,
            env={"OMP_NUM_THREADS": "1", **os.environ},
        )
        output = (result.stdout + result.stderr)[-3000:]
        assert result.returncode == 0, f"`{command}` exited {result.returncode}:\n{output}"
    if skipped:
        pytest.skip(f"real data {shared} is absent; not run: {skipped}")
