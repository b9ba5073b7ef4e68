"""``orchestrator purge``: remove finished tasks' payloads from the broker and its disk.

The journal, the result store and the broker's memory hold every retained task's
submitted payload and result in plaintext (README, "Data at rest"). ``purge`` asks the
running broker (command PURGE, ``docs/protocol.md``) to drop them for the tasks that
finished before ``--before`` and to rewrite its journal without them; the tasks' records
stay, so ``tasks`` and ``result`` still say how each one ended, and that its payloads
were purged.

It goes through the broker, never around it: the broker owns the journal while it runs
and would write it back from memory. With no broker running it exits 3, saying so.
"""

from __future__ import annotations

import math
import re
import sys
import time
from contextlib import AbstractContextManager, closing, nullcontext
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import click

from cli.common import (
    EXIT_FAILED,
    EXIT_UNAUTHORIZED,
    EXIT_UNREACHABLE,
    Context,
    DataDirCommand,
    answered_or_exit,
    emit_json,
    fail,
    json_option,
    one_line,
    open_client,
)

if TYPE_CHECKING:
    from wire.purge import PurgeReply

PURGE_HELP = """Remove the payloads of finished tasks: what was submitted, the result's
data and the error message, from the broker's memory, its journal (rewritten without
them) and its result store. Each task's record stays (id, status, agent, attempts,
times): `tasks` lists it, and `result ID` says it finished and that its payloads were
purged (exit 1, error code `purged`). Open tasks are never touched, nor results held
for a workflow run that has not checkpointed them yet (purge again later).

Without --before: every finished task. --before takes a date or a time (ISO 8601, local
time unless it names a zone) or an age (a number and s, m, h, d or w): tasks that
finished before then are purged.

\b
Examples:
  orchestrator purge                          # every finished task
  orchestrator purge --before 7d              # finished more than 7 days ago
  orchestrator purge --before 12h --json
  orchestrator purge --before 2026-11-30      # before midnight, local time
  orchestrator purge --before 2026-11-30T12:00:00Z

Needs the running broker (exit 3 otherwise); on a secure broker, a key with the admin
role (the CLI's local admin key has it; exit 5 otherwise). Exit codes: 0 purged, 1 the
journal could not be rewritten (a full disk: the payloads stay in its file; free space
and run purge again), 2 usage error, 3 broker unreachable, 5 unauthorized."""

#: Seconds per unit of a relative age (``7d``).
AGE_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 7 * 86400.0}
_AGE = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
#: The oldest age ``--before`` takes (about 1,000 years): beyond it the date is nonsense.
MAX_AGE_S = 1000 * 365.25 * 86400


class Before(click.ParamType):
    """``--before``: an ISO 8601 date or time, or an age (``7d``, ``12h``), as wall-clock
    seconds. Read when the command line is parsed, so an age counts from then."""

    name = "date|age"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> float:
        if isinstance(value, float):
            return value
        text = str(value).strip()
        age = _AGE.fullmatch(text)
        if age is not None:
            seconds = float(age.group(1)) * AGE_UNITS[age.group(2)]
            if not (math.isfinite(seconds) and seconds <= MAX_AGE_S):
                self.fail(f"{_show(value)} is an age of more than 1000 years", param, ctx)
            return time.time() - seconds
        try:
            when = datetime.fromisoformat(text)
            # A time without a zone is local time, as `date` prints it.
            stamp = when.timestamp() if when.tzinfo else when.astimezone().timestamp()
        except (ValueError, OverflowError, OSError):
            self.fail(f"{_show(value)} is neither a date or time (ISO 8601: 2026-11-30, "
                      "2026-11-30T12:00:00Z) nor an age (7d, 12h, 30m, 90s, 2w)", param, ctx)
        if not math.isfinite(stamp) or stamp <= 0:
            self.fail(f"{_show(value)} is before 1970", param, ctx)
        return stamp


BEFORE = Before()


def _show(value: Any) -> str:
    """A value quoted for an error message: one line, at most 60 characters."""
    text = repr(value)
    return one_line(text if len(text) <= 60 else text[:57] + "...")


def iso(wall: float) -> str:
    """``wall`` (seconds) as local ISO 8601, to the second."""
    return datetime.fromtimestamp(wall, UTC).astimezone().isoformat(timespec="seconds")


def size(count: int) -> str:
    """A byte count for people (``1.5 MiB``)."""
    amount = float(count)
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if amount < 1024 or unit == "GiB":
            return f"{count} bytes" if unit == "bytes" else f"{amount:.1f} {unit}"
        amount /= 1024
    return f"{count} bytes"  # not reached: GiB ends the loop


def document(reply: PurgeReply, before: float | None) -> dict[str, Any]:
    """What ``--json`` prints."""
    return {"purged": reply.purged, "bytes_freed": reply.bytes,
            "before": None if before is None else iso(before),
            "already_purged": reply.already, "held": reply.held, "open": reply.open,
            "store_files_removed": reply.store_files,
            "journal_bytes_before": reply.journal_before,
            "journal_bytes_after": reply.journal_after}


def summary(reply: PurgeReply, before: float | None) -> list[str]:
    """The lines printed without ``--json``."""
    which = "finished" if before is None else f"finished before {iso(before)}"
    lines = [f"purged {reply.purged} task(s) {which}: {size(reply.bytes)} of payloads "
             f"removed; journal {size(reply.journal_before)} -> {size(reply.journal_after)}"
             + (f"; {reply.store_files} result store file(s) removed"
                if reply.store_files else "")]
    if reply.already:
        lines.append(f"{reply.already} task(s) had been purged before")
    if reply.held:
        lines.append(f"{reply.held} result(s) kept: held for a workflow run that has not "
                     "checkpointed them yet; purge again later")
    if reply.open:
        lines.append(f"{reply.open} open task(s) untouched (they keep their payloads "
                     "until they finish)")
    return lines


def _waiting(as_json: bool) -> AbstractContextManager[Any]:
    """A spinner on stderr while the broker rewrites its journal (a terminal only)."""
    if as_json or not sys.stderr.isatty():
        return nullcontext()
    from rich.console import Console

    return Console(stderr=True).status("purging: the broker rewrites its journal")


@click.command(cls=DataDirCommand, help=PURGE_HELP, short_help="Remove finished tasks' payloads.")
@click.option("--before", type=BEFORE, default=None,
              help="Only tasks that finished before this date, time or age (7d, 12h, "
                   "2026-11-30, 2026-11-30T12:00:00Z). Default: every finished task.")
@json_option("Print the counts as JSON.")
@click.pass_obj
def purge(obj: Context, before: float | None, as_json: bool) -> None:
    """Ask the running broker to purge finished tasks' payloads; print what went."""
    from agent_sdk import BrokerUnavailable, RequestRefused, SyncClient

    url = obj.broker_url
    client = open_client(SyncClient, url)
    answered_or_exit(client, client.ping, BrokerUnavailable,
                     f"{obj.unreachable_message(url)}; purge works through the running "
                     "broker, which owns the journal (`orchestrator start --no-agents` is "
                     "enough)")
    with closing(client):
        try:
            with _waiting(as_json):
                reply = client.purge(before)
        except RequestRefused as e:
            code = EXIT_UNAUTHORIZED if e.code == "unauthorized" else EXIT_FAILED
            fail(str(e), code, {"code": e.code})
        except BrokerUnavailable:
            fail(f"the broker at {url} did not answer the purge; it may still run: see "
                 "`orchestrator status`, then run purge again", EXIT_UNREACHABLE)
    if as_json:
        emit_json(document(reply, before))
    else:
        for line in summary(reply, before):
            click.echo(line)
