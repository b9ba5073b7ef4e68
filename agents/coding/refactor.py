"""Refactoring: a formatter's and linter's fixes on a throwaway copy, as a unified diff.

The tool is ``ruff`` (``ruff check --fix`` then ``ruff format``) when it is installed,
else the standard-library fixer of :mod:`agents.coding.fixer`. Either runs as a tool
process (:func:`agents.sandbox.run_command`) on a :class:`~agents.sandbox.Workspace`:
the user's own files are never touched (they are not even on this machine). The diff has
``a/<path>`` and ``b/<path>`` names and applies with ``git apply`` and ``patch -p1``.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from agents.coding import fixer
from agents.coding.inputs import SourceFile
from agents.sandbox import Limits, Workspace, run_command

RUFF: Final = "ruff"
BUILTIN: Final = "builtin"
#: Files the tools fix; the others come back unchanged.
PYTHON_SUFFIXES: Final = (".py", ".pyi")
#: Files whose presence means the project configures ruff itself (then it is honoured).
RUFF_CONFIGS: Final = ("ruff.toml", ".ruff.toml")
_NO_NEWLINE: Final = "\\ No newline at end of file\n"


class ToolUnavailable(RuntimeError):
    """Raised when the refactoring tool asked for is not installed; one line."""


@dataclass(frozen=True, slots=True)
class FileChange:
    """What refactoring did to one carried file.

    Attributes:
        path: the carried path.
        changed: whether the diff changes it.
        detail: why a file the tool should fix was left as it was ("" otherwise).
    """

    path: str
    changed: bool
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The record in the result's ``files``."""
        return {"path": self.path, "changed": self.changed, "detail": self.detail}


@dataclass(frozen=True, slots=True)
class Patch:
    """A refactoring's outcome.

    Attributes:
        diff: unified diff of every changed file ("" when nothing changed).
        files: one record per carried file, in the order carried.
        tool: which tool made the fixes (``ruff`` or ``builtin``).
    """

    diff: str
    files: list[FileChange]
    tool: str

    def to_data(self) -> dict[str, Any]:
        """The result's ``data`` (``kind: patch``)."""
        return {"kind": "patch", "diff": self.diff, "files": [f.to_dict() for f in self.files],
                "tool": self.tool, "changed": sum(f.changed for f in self.files)}


def ruff_argv() -> list[str] | None:
    """How to start ruff here, or None when it is not installed."""
    if importlib.util.find_spec("ruff") is not None:
        return [sys.executable, "-m", "ruff"]
    found = shutil.which("ruff")
    return [found] if found else None


def pick_tool(preference: str | None) -> str:
    """The tool to use: ``preference`` (``ruff`` or ``builtin``), or the best installed.

    Raises:
        ToolUnavailable: ruff was asked for and is not installed.
        ValueError: an unknown tool name.
    """
    if preference in (None, "", "auto"):
        return RUFF if ruff_argv() is not None else BUILTIN
    if preference == RUFF:
        if ruff_argv() is None:
            raise ToolUnavailable("ruff is not installed here (pip install ruff)")
        return RUFF
    if preference == BUILTIN:
        return BUILTIN
    raise ValueError(f"unknown refactoring tool {preference!r}: use ruff, builtin or auto")


async def refactor(files: list[SourceFile], *, tool: str, limits: Limits) -> Patch:
    """Fix ``files`` on a throwaway copy with ``tool``; return the diff of the changes."""
    python = [f.path for f in files if f.path.endswith(PYTHON_SUFFIXES)]
    details: dict[str, str] = {}
    with Workspace([f.to_dict() for f in files], prefix="orch-coder-") as ws:
        if python:
            if tool == RUFF:
                details = await _run_ruff(ws.root, python, files, limits)
            else:
                details = await _run_builtin(ws.root, python, limits)
        fixed = {f.path: _read(ws.root / f.path, f.content) for f in files}
    chunks = []
    changes = []
    for original in files:
        new = fixed[original.path]
        changed = new != original.content
        if changed:
            chunks.append(unified_diff(original.path, original.content, new))
        changes.append(FileChange(original.path, changed, details.get(original.path, "")))
    return Patch("".join(chunks), changes, tool)


def _read(path: Path, fallback: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        # A tool that removed or mangled a file leaves the original: the diff never
        # carries something that is not text.
        return fallback


async def _run_ruff(root: Path, python: list[str], files: list[SourceFile],
                    limits: Limits) -> dict[str, str]:
    base = ruff_argv()
    if base is None:
        raise ToolUnavailable("ruff is not installed here (pip install ruff)")
    own_config = any(f.path.split("/")[-1] in RUFF_CONFIGS or
                     (f.path.endswith("pyproject.toml") and "[tool.ruff" in f.content)
                     for f in files)
    # Without a configuration of the project's own, --isolated keeps one lying around
    # the temporary directory (or the agent's HOME) out of it.
    options = ["--no-cache"] + ([] if own_config else ["--isolated"])
    check = await run_command([*base, "check", "--fix", "--exit-zero", "--quiet",
                               "--output-format", "concise", *options, "--", *python],
                              cwd=root, limits=limits)
    fmt = await run_command([*base, "format", *options, "--", *python], cwd=root, limits=limits)
    details: dict[str, str] = {}
    for run, step in ((check, "ruff check"), (fmt, "ruff format")):
        if run.timed_out:
            for path in python:
                details.setdefault(path, f"{step} ran past {limits.timeout_s:g} s")
    left: dict[str, list[str]] = {}
    for line in check.stdout.splitlines():
        path, sep, rest = line.partition(":")
        if sep and path in python:
            left.setdefault(path, []).append(rest.split(": ", 1)[-1].strip())
    for path, issues in left.items():
        syntax = [issue for issue in issues if issue.startswith("invalid-syntax")]
        if syntax:
            details.setdefault(path, "unparseable: " + syntax[0].split(": ", 1)[-1][:300])
        else:
            details.setdefault(path, f"{len(issues)} issue(s) ruff cannot fix, first: "
                                     f"{issues[0][:300]}")
    return details


async def _run_builtin(root: Path, python: list[str], limits: Limits) -> dict[str, str]:
    script = Path(fixer.__file__).resolve()
    run = await run_command([sys.executable, "-I", str(script), *python], cwd=root,
                            limits=limits)
    details: dict[str, str] = {}
    if run.timed_out:
        return {path: f"the fixer ran past {limits.timeout_s:g} s" for path in python}
    for line in run.stdout.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("detail"):
            details[str(record.get("path"))] = str(record["detail"])
    return details


def unified_diff(path: str, old: str, new: str) -> str:
    """A git-style unified diff of one file (``a/`` and ``b/`` names, missing final
    newlines marked as ``git`` and ``patch`` expect)."""
    lines = difflib.unified_diff(_lines(old), _lines(new), fromfile=f"a/{path}",
                                 tofile=f"b/{path}", n=3)
    out = [f"diff --git a/{path} b/{path}\n"]
    for line in lines:
        if line.endswith("\n"):
            out.append(line)
        else:
            out.append(line + "\n" + _NO_NEWLINE)
    return "".join(out)


def _lines(text: str) -> list[str]:
    """Lines as git counts them: split at ``\\n`` only (``str.splitlines`` also splits at
    form feeds and other separators, which would make hunks git cannot apply)."""
    parts = text.split("\n")
    return [part + "\n" for part in parts[:-1]] + ([parts[-1]] if parts[-1] else [])
