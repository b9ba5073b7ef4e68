"""PURGE: finished tasks forget their payloads (issue 15, data at rest).

A purged task keeps its record (id, status, attempts, agent, times), so that ``tasks``,
``trace`` and ``result`` still say it finished and how; what goes is what it carried: the
submitted payload, the result payload (its file too, when the result store held it) and
the error message (an agent's message often quotes its input). Its result then has the
error code ``purged`` and a message saying when, and what the status was.

How the disk forgets: the purged records are changed in memory, then the journal is
rewritten from memory (:meth:`broker.journal.Journal.compact`, through the
:attr:`PurgeDesk.rewrite` port), so the new file holds the purged records and nothing of
the old one: not the purged payloads, nor the payloads of results already past
retention. The answer leaves only after the rewrite, so a PURGE that was answered is on
disk; a broker killed before it answers still has the old journal, and the client,
without an answer, runs the purge again. No record kind is added: a purged task is an
ordinary accepted record with an empty payload and an ordinary result record whose error
code is ``purged``, which every broker replays.

No I/O here: the rewrite and the sender's role are ports set by the server
(:meth:`PurgeDesk.attach`); tests drive the desk on a fake clock.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from broker.engine.ledger import Ledger
from broker.engine.model import TaskRecord
from broker.engine.queues import is_stored
from wire.codec import new_tuple
from wire.purge import Purge, PurgeReply
from wire.tasks import ErrorCode, ResultItem, TaskSpec, encode

logger = logging.getLogger(__name__)

#: The role a key needs for PURGE on a secure broker (``keys authorize --role admin``).
ADMIN_ROLE = "admin"
_PURGED = ErrorCode.PURGED.value


@dataclass(slots=True)
class PurgeCounts:
    """What one PURGE found and did (the fields of its :class:`PurgeReply`)."""

    purged: int = 0
    bytes: int = 0
    held: int = 0
    open: int = 0
    already: int = 0
    store_files: int = 0


def _no_role() -> str:
    return ""


def _size(payload: Any) -> int:
    """Bytes of a payload as the engine holds it: bytes, a zmq frame, or a reference to a
    file of the result store."""
    if is_stored(payload):
        return int(payload.size)
    return memoryview(payload).nbytes


def purged_message(status: str, error_code: str | None, at_wall: float) -> str:
    """The error message of a purged task's result: when, and what it had been."""
    at = datetime.fromtimestamp(at_wall, UTC).isoformat(timespec="seconds")
    was = f"the task {status}" + (f" ({error_code})" if error_code else "")
    return f"{was}; its payloads were purged at {at}"


class PurgeDesk:
    """Handles PURGE.

    Args:
        ledger: the engine's books.
    """

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        #: the role of the sender of the message being handled ("" in plaintext)
        self.peer_role: Callable[[], str] = _no_role
        #: rewrites the journal from memory; True once the new file replaced the old
        #: one. None: no journal (nothing on disk to forget)
        self.rewrite: Callable[[], bool] | None = None
        #: the journal file's size now (0 without a journal)
        self.journal_size: Callable[[], int] = lambda: 0

    def attach(self, peer_role: Callable[[], str], rewrite: Callable[[], bool] | None,
               journal_size: Callable[[], int]) -> None:
        """Connect the ports (the server's service, its journal)."""
        self.peer_role = peer_role
        self.rewrite = rewrite
        self.journal_size = journal_size

    def handle(self, identity: bytes, msg: Purge, now: float) -> None:
        """Purge the finished tasks that ended before ``msg.before`` (all of them when
        None), rewrite the journal, answer with the counts."""
        ledger = self.ledger
        if ledger.config.secure and self.peer_role() != ADMIN_ROLE:
            ledger.reject(identity, ErrorCode.UNAUTHORIZED,
                          "purge needs a key with the admin role (`orchestrator keys "
                          "authorize KEY --role admin`); this key's role is "
                          f"{self.peer_role() or 'none'}", req=msg.req)
            return
        counts = self._purge_matching(msg.before, now + ledger.wall_offset)
        before = self.journal_size()
        # Every PURGE rewrites, even when it purged nothing new: the old file may still
        # hold payloads of results past retention, or of an earlier purge whose rewrite
        # failed.
        if self.rewrite is not None and not self.rewrite():
            ledger.reject(identity, ErrorCode.STORAGE_FULL,
                          f"purged {counts.purged} task(s) in memory, but the journal "
                          "could not be rewritten (see the broker's log): their payloads "
                          "stay in the journal file until a purge succeeds; free space "
                          "and run purge again", req=msg.req)
            return
        logger.info("purge: %d task(s), %d payload byte(s), journal %d -> %d bytes",
                    counts.purged, counts.bytes, before, self.journal_size())
        ledger.outbox(identity).control.append(encode(PurgeReply(
            msg.req, counts.purged, counts.bytes, counts.held, counts.open, counts.already,
            before, self.journal_size(), counts.store_files)))

    def _purge_matching(self, before: float | None, wall_now: float) -> PurgeCounts:
        ledger = self.ledger
        finished = ledger.finished
        offset = ledger.wall_offset
        # Open tasks keep their payloads (an agent may still need them); so do results
        # the store is still writing, whose RESULT has not gone out yet.
        counts = PurgeCounts(open=len(ledger.tasks) + len(finished.writing))
        for task in finished.newest_first():
            result = task.result
            if result is None or task.spec.id in finished.writing:
                continue
            if before is not None and task.finished_at + offset >= before:
                continue
            if result[3] == _PURGED:
                counts.already += 1
            elif task.spec[9]:
                # Held for a workflow run that has not checkpointed it: purging it would
                # take a step's output from under the run.
                counts.held += 1
            else:
                counts.store_files += is_stored(result[2])
                counts.bytes += self._purge(task, result, wall_now)
                counts.purged += 1
        return counts

    def _purge(self, task: TaskRecord, result: ResultItem, wall_now: float) -> int:
        """Empty ``task``'s payloads; returns the bytes they held."""
        spec = task.spec
        freed = _size(spec[1]) + _size(result[2])
        # new_tuple keeps a traced spec's traceparent (an element after the fields,
        # which _replace would drop).
        task.spec = new_tuple(TaskSpec, (spec[0], b"", *spec[2:]))
        self.ledger.finished.forget_payload(task, new_tuple(ResultItem, (
            result[0], result[1], b"", _PURGED,
            purged_message(result[1], result[3], wall_now), *result[5:9], None)))
        return freed
