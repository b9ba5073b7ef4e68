"""PURGE (command 0x26): forget the payloads of finished tasks (issue 15, data at rest).

The messages and their headers; :mod:`wire.tasks` frames them (``Command.PURGE``) and
dispatches to :func:`decode_purge`. Kept in a module of its own so that the task
protocol's hot module does not grow for an administrator's command.

Request, client -> broker, header map ``{"req", "before"}``:

- ``req``: int, echoed in the answer;
- ``before``: wall-clock seconds (float) or nil: purge the tasks that finished before
  then; nil purges every finished task.

Answer, broker -> client, the same command, header map ``{"req", "purged", ...}``
(:class:`PurgeReply`); a refusal is an ERROR carrying ``req`` (``unauthorized`` on a
secure broker for a key whose role is not ``admin``; ``storage_full`` when the journal
could not be rewritten, and then the payloads are gone from memory but still in the
journal file until a later PURGE rewrites it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from wire.codec import as_map, as_opt_num, as_req


@dataclass(frozen=True, slots=True)
class Purge:
    """Client -> broker: purge finished tasks' payloads. Header: map ``{"req", "before"}``
    (``before``: wall-clock seconds, or nil for every finished task)."""

    req: int
    before: float | None = None


@dataclass(frozen=True, slots=True)
class PurgeReply:
    """Broker -> client: what a PURGE did, once the journal was rewritten.

    Header: map ``{"req", "purged", "bytes", "held", "open", "already", "journal_before",
    "journal_after", "store_files"}``.
    """

    req: int
    #: finished tasks whose payloads were removed by this request
    purged: int = 0
    #: payload bytes removed: submitted payloads plus result payloads
    bytes: int = 0
    #: finished tasks kept whole because their result is held (a workflow step whose run
    #: has not checkpointed it yet): purge again once the run moved on
    held: int = 0
    #: tasks not finished yet: a purge never touches them
    open: int = 0
    #: matching tasks purged by an earlier request (nothing left to remove)
    already: int = 0
    #: the journal file's size before and after its rewrite (0 without a journal)
    journal_before: int = 0
    journal_after: int = 0
    #: result store files removed
    store_files: int = 0


_REPLY_FIELDS = ("purged", "bytes", "held", "open", "already", "journal_before",
                 "journal_after", "store_files")


def purge_header(msg: Purge | PurgeReply) -> dict[str, Any]:
    """The header map of a PURGE request or answer."""
    if isinstance(msg, Purge):
        return {"req": msg.req, "before": msg.before}
    header: dict[str, Any] = {"req": msg.req}
    for name in _REPLY_FIELDS:
        header[name] = getattr(msg, name)
    return header


def decode_purge(header: Any) -> Purge | PurgeReply:
    """A PURGE header: an answer when it has ``purged``, else a request.

    Raises:
        ValueError: a missing or mistyped field.
    """
    h = as_map(header)
    req = as_req(h)
    if "purged" not in h:
        before = as_opt_num(h.get("before"), "before")
        if before is not None and before in (float("inf"), float("-inf")):
            raise ValueError("before must be a finite number or nil")
        return Purge(req, None if before is None else float(before))
    counts = []
    for name in _REPLY_FIELDS:
        value = h.get(name, 0)
        if type(value) is not int or value < 0:
            raise ValueError(f"{name} must be a non-negative integer")
        counts.append(value)
    return PurgeReply(req, *counts)


__all__ = ["Purge", "PurgeReply", "decode_purge", "purge_header"]
