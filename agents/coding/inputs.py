"""Reading a coder task's input: the payload map and the files it carries.

A task arrives as a map (``task.data``), possibly with extra fields (a map-reduce step's
``failed``); files travel as ``{"path": "src/app.py", "content": "..."}``. Bad input is
the caller's mistake, not a fault of the agent: it raises :class:`BadInput`, which the
agent reports as a failure that is never retried.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from agent_sdk.task import Task
from agents.sandbox import SandboxError, safe_relative

#: The name a bare ``{"code": ...}`` snippet is given, as the reviewer does.
SNIPPET_PATH: Final = "snippet.py"
#: Most files and bytes one task may carry: a task is a unit of work, not a repository dump.
MAX_FILES: Final = 2000
MAX_TOTAL_BYTES: Final = 32 * 1024 * 1024


class BadInput(ValueError):
    """Raised when a task's input is not what the capability takes; one line."""


@dataclass(frozen=True, slots=True)
class SourceFile:
    """One carried file.

    Attributes:
        path: relative posix path (checked: no absolute path, no ``..``).
        content: its text.
    """

    path: str
    content: str

    def to_dict(self) -> dict[str, str]:
        """The wire form, ``{"path", "content"}``."""
        return {"path": self.path, "content": self.content}


def payload(task: Task) -> dict[str, Any]:
    """The task's input as one map: its fields, overlaid by its data when that is a map."""
    merged = dict(task.fields)
    if isinstance(task.data, Mapping):
        merged.update(task.data)
    return merged


def source_files(data: Mapping[str, Any], *, required: bool = True) -> list[SourceFile]:
    """The files a task carries: ``files``, a single ``{"path", "content"}`` item, or a
    bare ``code`` snippet.

    Raises:
        BadInput: no files (when ``required``), a record that is not a file, a path that
            leaves the copy, a duplicate path, or more than the limits.
    """
    raw: Any
    if "files" in data:
        raw = data["files"]
    elif "path" in data and "content" in data:
        raw = [{"path": data["path"], "content": data["content"]}]
    elif isinstance(data.get("code"), str):
        raw = [{"path": SNIPPET_PATH, "content": data["code"]}]
    else:
        raw = []
    if not isinstance(raw, list):
        raise BadInput(f"'files' must be a list of {{path, content}} records, got "
                       f"{type(raw).__name__}")
    if not raw and required:
        raise BadInput("the task carries no files: give 'files': [{path, content}, ...]")
    if len(raw) > MAX_FILES:
        raise BadInput(f"the task carries {len(raw)} files; at most {MAX_FILES} are taken")
    files: list[SourceFile] = []
    seen: set[str] = set()
    total = 0
    for index, record in enumerate(raw):
        if not isinstance(record, Mapping) or not isinstance(record.get("path"), str) \
                or not isinstance(record.get("content"), str):
            raise BadInput(f"files[{index}] is not a {{path: str, content: str}} record")
        try:
            path = safe_relative(record["path"]).as_posix()
        except SandboxError as e:
            raise BadInput(str(e)) from e
        if path in seen:
            raise BadInput(f"the file {path!r} is carried twice")
        seen.add(path)
        total += len(record["content"])
        if total > MAX_TOTAL_BYTES:
            raise BadInput(f"the files exceed {MAX_TOTAL_BYTES // (1024 * 1024)} MiB in all")
        files.append(SourceFile(path, record["content"]))
    return files


def string_list(data: Mapping[str, Any], key: str) -> list[str] | None:
    """``data[key]`` as a non-empty list of strings (an argv), or None when absent.

    Raises:
        BadInput: present but not a non-empty list of strings.
    """
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not value or \
            not all(isinstance(item, str) and item for item in value):
        raise BadInput(f"{key!r} must be a non-empty list of strings (an argv; no shell)")
    return list(value)
