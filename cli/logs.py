"""``orchestrator logs``: this machine's structured logs, merged by time and filtered.

The broker and the agents started here write JSON lines to ``<data dir>/logs/``
(:mod:`wire.logs`): ``broker.jsonl`` and ``agent-<agent id>.jsonl``, rotated to
``.jsonl.1`` ... by size. This command reads them all (oldest rotation first), merges
them by their ``ts`` (ISO-8601 UTC, so text order is time order) and prints the lines
that match. ``--follow`` then keeps reading what the files gain, and new files, until
Ctrl-C. Agents on other hosts keep their logs in their own data dirs.
"""

from __future__ import annotations

import heapq
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import click
import orjson

from cli.common import EXIT_FAILED, NAME, TASK_ID, Context, DataDirCommand, fail, one_line
from wire.logs import LOG_SUFFIX, LOGS_DIR

#: How often ``--follow`` looks for new lines and new files.
FOLLOW_POLL_S: Final = 0.2
EXIT_INTERRUPTED: Final = 130


@dataclass(slots=True)
class LogLine:
    """One parsed line, with the file it came from (``broker``, ``agent-<id>``)."""

    ts: str
    source: str
    record: dict[str, Any]


@dataclass(slots=True)
class LogFilter:
    """``--task`` and ``--agent`` (an agent id, or a name: ids are ``<name>-<hex>``)."""

    task: str | None
    agent: str | None

    def keep(self, line: LogLine) -> bool:
        """Whether ``line`` matches every filter given."""
        record = line.record
        if self.task is not None and record.get("task_id") != self.task:
            return False
        if self.agent is None:
            return True
        agent_id = str(record.get("agent_id") or "")
        return agent_id == self.agent or agent_id.rpartition("-")[0] == self.agent


def source_of(path: Path) -> str:
    """The process a log file belongs to: its name without ``.jsonl`` and rotation."""
    name = path.name
    return name[:name.index(LOG_SUFFIX)]


def log_files(logs_dir: Path) -> list[Path]:
    """Every JSON log file, each process's oldest rotation first."""
    def order(path: Path) -> tuple[str, int]:
        rotation = path.name.rpartition(LOG_SUFFIX)[2].lstrip(".")
        return source_of(path), -(int(rotation) if rotation.isdigit() else 0)

    if not logs_dir.is_dir():
        return []
    return sorted((p for p in logs_dir.iterdir() if LOG_SUFFIX in p.name), key=order)


def parse(raw: bytes, source: str) -> LogLine | None:
    """A line of a log file, or None when it is not a JSON object (a torn last line)."""
    try:
        record = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(record, dict):
        return None
    return LogLine(str(record.get("ts", "")), source, record)


def read_lines(path: Path, offset: int = 0) -> tuple[list[LogLine], int]:
    """The complete lines of ``path`` from byte ``offset``; returns them and the offset
    after the last complete line (a line still being written is read next time)."""
    try:
        with path.open("rb") as f:
            f.seek(offset)
            data = f.read()
    except OSError:
        return [], offset
    end = data.rfind(b"\n") + 1
    source = source_of(path)
    lines = [line for raw in data[:end].splitlines()
             if raw.strip() and (line := parse(raw, source)) is not None]
    return lines, offset + end


def merged(logs_dir: Path) -> tuple[Iterator[LogLine], dict[Path, int]]:
    """Every line of every file merged by time, and each file's end offset (for
    ``--follow``)."""
    offsets: dict[Path, int] = {}
    streams: list[list[LogLine]] = []
    for path in log_files(logs_dir):
        lines, offsets[path] = read_lines(path)
        streams.append(lines)
    return heapq.merge(*streams, key=lambda line: line.ts), offsets


def show(line: LogLine, as_json: bool) -> None:
    """Print one line: the record as JSON with its ``source``, or readable."""
    record = line.record
    if as_json:
        text = orjson.dumps({**record, "source": line.source}).decode()
    else:
        extras = " ".join(f"{k}={record[k]}" for k in ("event", "task_id", "agent_id",
                                                       "trace_id") if record.get(k))
        text = one_line(f"{line.ts} {record.get('level', '-'):<7} {line.source} "
                        f"{record.get('logger', '-')}: {record.get('msg', '')}"
                        + (f" [{extras}]" if extras else ""))
    sys.stdout.write(text + "\n")


def follow_files(logs_dir: Path, offsets: dict[Path, int], keep: LogFilter, as_json: bool) -> None:
    """Print what the files gain, and new files, until interrupted. A file that shrank
    was rotated: its new content is read from the start."""
    while True:
        fresh: list[LogLine] = []
        for path in log_files(logs_dir):
            offset = offsets.get(path, 0)
            try:
                if path.stat().st_size < offset:
                    offset = 0
            except OSError:
                continue
            lines, offsets[path] = read_lines(path, offset)
            fresh.extend(lines)
        for line in sorted(fresh, key=lambda item: item.ts):
            if keep.keep(line):
                show(line, as_json)
        sys.stdout.flush()
        time.sleep(FOLLOW_POLL_S)  # polling a file for growth: no event to wait on


@click.command("logs", cls=DataDirCommand)
@click.option("--follow", "-f", is_flag=True, help="Keep printing new lines until Ctrl-C.")
@click.option("--task", type=TASK_ID, default=None, help="Only lines about this task id.")
@click.option("--agent", type=NAME, default=None,
              help="Only lines of this agent (its id, or its name for every instance).")
@click.option("--json", "as_json", is_flag=True,
              help="One JSON object per line: the record (ts, level, logger, msg, task_id, "
                   "agent_id, trace_id, event) and its source file.")
@click.pass_obj
def logs(obj: Context, follow: bool, task: str | None, agent: str | None,
         as_json: bool) -> None:
    """Print this machine's broker and agent logs (the data dir's logs/*.jsonl), merged by
    time. Agents on other hosts keep theirs in their own data dirs.
    """
    logs_dir = obj.home / LOGS_DIR
    keep = LogFilter(task, agent)
    if not follow and not any(logs_dir.glob(f"*{LOG_SUFFIX}*")):
        # Nothing to show at all: say why, rather than print nothing.
        fail(f"no logs in {logs_dir}: the broker and the agents of this data dir write "
             "them there once started (see --help for the data dir)", EXIT_FAILED)
    lines, offsets = merged(logs_dir)
    try:
        shown = 0
        agents: set[str] = set()
        for line in lines:
            if keep.keep(line):
                show(line, as_json)
                shown += 1
            elif line.record.get("agent_id"):
                agents.add(str(line.record["agent_id"]).rpartition("-")[0])
        sys.stdout.flush()
        if not shown and not follow:
            # Filters that match nothing: say so (and which agents there are), rather
            # than print nothing with success.
            what = " and ".join(f"{name} {value!r}" for name, value
                                in (("task", task), ("agent", agent)) if value is not None)
            known = f"; agents with lines here: {', '.join(sorted(agents))}" if agents else ""
            fail(f"no log line of {what} in {logs_dir}{known}", EXIT_FAILED)
        if follow:
            follow_files(logs_dir, offsets, keep, as_json)
    except KeyboardInterrupt:
        sys.stdout.flush()
        sys.exit(EXIT_INTERRUPTED)
    except BrokenPipeError:
        sys.stderr.close()  # `logs | head`: the reader left; nothing more to say
