"""Structured logs: one JSON object per line, in the data dir, shared by broker and agents.

It lives in ``wire`` because the broker and the agent SDK both install it and ``wire`` is
the one package both may import. Each record becomes ``{"ts", "level", "logger", "msg"}``
plus ``task_id``, ``agent_id``, ``trace_id`` and ``event`` when the record carries them
(``logger.info(..., extra={"task_id": ...})``) or the handler was given them as defaults
(an agent process's own id). ``ts`` is ISO-8601 UTC with microseconds, so that text order
is time order and ``orchestrator logs`` merges files by comparing strings.

Files: ``<data dir>/logs/broker.jsonl`` and ``<data dir>/logs/agent-<agent id>.jsonl``,
rotated by size (``.jsonl.1`` ... ``.jsonl.N``, the highest the oldest).
"""

from __future__ import annotations

import datetime
import logging
import logging.handlers
import os
from pathlib import Path
from typing import Any, Final

import orjson

from wire.tracing import current_trace_id

#: Directory of the JSON logs inside the data dir.
LOGS_DIR: Final = "logs"
#: Suffix of a JSON log file (rotated ones add ``.1``, ``.2`` ...).
LOG_SUFFIX: Final = ".jsonl"
#: Bytes a log file grows to before it is rotated, and rotated files kept.
MAX_LOG_BYTES: Final = 10 * 1024 * 1024
LOG_BACKUPS: Final = 5
#: The record attributes copied into the line when present.
CONTEXT_FIELDS: Final = ("task_id", "agent_id", "trace_id", "event")


def iso_ts(created: float) -> str:
    """``created`` (a record's epoch seconds) as ``2026-12-03T14:20:01.123456Z``."""
    moment = datetime.datetime.fromtimestamp(created, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class JsonLinesFormatter(logging.Formatter):
    """Formats a record as one orjson line (no newline; the handler adds it).

    Args:
        defaults: fields every line gets unless the record has its own (an agent's id).
    """

    def __init__(self, defaults: dict[str, str] | None = None) -> None:
        super().__init__()
        self.defaults = dict(defaults or {})

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {"ts": iso_ts(record.created), "level": record.levelname,
                                "logger": record.name, "msg": record.getMessage()}
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value is None:
                value = self.defaults.get(name)
            if value is not None:
                line[name] = value if isinstance(value, (str, int, float)) else str(value)
        if "trace_id" not in line:
            trace_id = current_trace_id()  # the task's trace, logged inside its span
            if trace_id is not None:
                line["trace_id"] = trace_id
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


class PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """A rotating log whose files only their owner reads (0600), the new ones after a
    rotation too: log lines quote task ids, agent errors and sometimes what a task
    carried (README, "Data at rest")."""

    def _open(self) -> Any:
        return open(self.baseFilename, self.mode, encoding=self.encoding,
                    errors=self.errors, opener=_private)


def _private(path: str, flags: int) -> int:
    fd = os.open(path, flags, 0o600)
    # A file an older release created keeps its mode through O_APPEND: closed now.
    os.fchmod(fd, 0o600)
    return fd


def log_path(data_dir: Path, process: str) -> Path:
    """The JSON log of ``process`` (``broker``, ``agent-<id>``) in ``data_dir``."""
    return data_dir / LOGS_DIR / f"{process}{LOG_SUFFIX}"


def install_json_log(data_dir: Path, process: str, level: int | str,
                     defaults: dict[str, str] | None = None,
                     max_bytes: int = MAX_LOG_BYTES, backups: int = LOG_BACKUPS
                     ) -> logging.Handler | None:
    """Add a rotating JSON-lines handler for ``process`` to the root logger.

    Stderr logging stays as it is; this is a second handler. A data dir that cannot be
    written (read-only, full) must not stop the process, so that case logs one warning
    and returns None.

    Args:
        data_dir: The process's data dir.
        process: The file's stem (``broker``, ``agent-<agent id>``).
        level: The handler's level (the ``--log-level`` of the process).
        defaults: Fields every line gets unless a record has its own.

    Returns:
        The handler, or None when the file cannot be opened.
    """
    path = log_path(data_dir, process)
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        handler = PrivateRotatingFileHandler(
            path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")
    except OSError as e:
        logging.getLogger(__name__).warning("cannot open the JSON log %s: %s", path, e)
        return None
    handler.setLevel(level.upper() if isinstance(level, str) else level)
    handler.setFormatter(JsonLinesFormatter(defaults))
    logging.getLogger().addHandler(handler)
    return handler


__all__ = ["CONTEXT_FIELDS", "LOGS_DIR", "LOG_BACKUPS", "LOG_SUFFIX", "MAX_LOG_BYTES",
           "JsonLinesFormatter", "install_json_log", "iso_ts", "log_path"]
