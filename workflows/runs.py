"""Runs as data in the state service: the run record, its control keys, its large values.

The run record (key ``wf/runs/<run>``) is written by whoever creates the run, then only
by the runner holding the run's lease (fenced by it)::

    {"run_id", "workflow": name, "definition": Workflow.to_dict(), "input": value,
     "status": RunStatus, "created_at", "updated_at", "started_at", "finished_at",
     "deadline_at": wall time or None, "submitted_by", "runner": who drives it,
     "takeovers": how many times a runner took it over,
     "pending": [{"path", "prompt", "since", "subject"}]   approvals waiting,
     "history": [{"event", "at", "by", "path", "approved", "comment", "detail"}],
     "output": {"data", "confidence", "extras"} or None,
     "error": {"code", "message", "path"} or None,
     "input_chunks" / "output_chunks": n when the value lives in wf/blob/<run>/...,
     "release_due": true from the run's end until the broker confirmed it let go of
                    every held result of the run's tasks (a runner redoes it)}

Everybody else writes control keys, each once or by compare-and-set, never the record:
an approval's answer (``wf/ctl/<run>/answer/<path>``: ``{"approved", "comment", "by",
"at"}``), a cancel request (``.../cancel``: ``{"by", "at", "reason"}``) and a resume
request (``.../resume``: ``{"by", "at", "n"}``). The runner driving the run watches them.
So no write of the runner can overwrite an answer, and an answer cannot be given twice.

Times are wall-clock seconds (``time.time()``): they are shown to people and compared
across processes and machines.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

from agent_sdk import Lease, StateClient, StateUnavailable, VersionConflict
from wire.codec import packb, unpackb
from workflows import ids
from workflows.errors import RunNotFound, WorkflowInputError
from workflows.outputs import StepOutput

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Inputs and outputs up to this size live in the run record; larger ones in chunks.
INLINE_VALUE_MAX_BYTES: Final = 256 * 1024
#: Bytes per chunk of a large value (the state service takes values up to 1 MiB).
CHUNK_BYTES: Final = 768 * 1024
#: Chunks of one value at most (about 750 MiB).
MAX_CHUNKS: Final = 1000
#: History entries a record keeps (the oldest go first).
MAX_HISTORY: Final = 200
#: Longest approval comment kept.
MAX_COMMENT_CHARS: Final = 4000
#: Back-off between tries of a write the state service did not answer (it restarts).
RETRY_MIN_S: Final = 0.05
RETRY_MAX_S: Final = 2.0


async def retry_unavailable(call: Callable[[], Awaitable[T]], what: str) -> T:
    """``await call()``, again after a back-off for as long as the state service does not
    answer (it restarts with the broker). Only for idempotent writes: one that did land
    before the answer was lost is written again, to the same effect.

    Args:
        call: makes the request.
        what: what is written, for the log.
    """
    delay = RETRY_MIN_S
    while True:
        try:
            return await call()
        except StateUnavailable as e:
            logger.warning("%s not written (%s); trying again in %.2f s", what, e, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_S)


class RunStatus(str, enum.Enum):
    """Where a run stands."""

    SUBMITTED = "submitted"
    RUNNING = "running"
    WAITING_APPROVAL = "waiting_approval"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    REJECTED = "rejected"
    #: a step failed once the run's LLM token budget (``max_tokens``) was spent
    BUDGET_EXCEEDED = "budget_exceeded"

    @property
    def terminal(self) -> bool:
        """Whether the run has ended for good."""
        return self in _TERMINAL


_TERMINAL: Final = frozenset({RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED,
                              RunStatus.BUDGET_EXCEEDED,
                              RunStatus.REJECTED})


@dataclass
class PendingApproval:
    """An approval step waiting for its answer.

    Attributes:
        path: the step's path (answer it by this).
        prompt: the question.
        since: when it started waiting.
        subject: the step's input, what is to be approved (None when too large to show).
    """

    path: str
    prompt: str
    since: float
    subject: Any = None

    def to_doc(self) -> dict[str, Any]:
        return {"path": self.path, "prompt": self.prompt, "since": self.since,
                "subject": self.subject}

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> PendingApproval:
        return cls(str(doc.get("path", "")), str(doc.get("prompt", "")),
                   float(doc.get("since", 0.0)), doc.get("subject"))


@dataclass
class HistoryEntry:
    """One thing that happened to a run: submitted, started, taken over, an approval
    answered, a cancel or resume asked for, ended.

    Attributes:
        event: what happened.
        at: when.
        by: who (a user for answers and requests, a runner id for runs).
        path: the step concerned, if any.
        approved: an approval's answer.
        comment: an approval's comment, a cancel's reason.
        detail: anything else, one line.
    """

    event: str
    at: float
    by: str = ""
    path: str = ""
    approved: bool | None = None
    comment: str = ""
    detail: str = ""

    def to_doc(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"event": self.event, "at": self.at}
        for key in ("by", "path", "comment", "detail"):
            if getattr(self, key):
                doc[key] = getattr(self, key)
        if self.approved is not None:
            doc["approved"] = self.approved
        return doc

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> HistoryEntry:
        approved = doc.get("approved")
        return cls(str(doc.get("event", "")), float(doc.get("at", 0.0)), str(doc.get("by", "")),
                   str(doc.get("path", "")), approved if isinstance(approved, bool) else None,
                   str(doc.get("comment", "")), str(doc.get("detail", "")))


@dataclass
class RunError:
    """Why a run did not succeed: a stable code, a message, the step where it ended."""

    code: str
    message: str
    path: str | None = None

    def to_doc(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "path": self.path}

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> RunError:
        path = doc.get("path")
        return cls(str(doc.get("code", "")), str(doc.get("message", "")),
                   str(path) if path is not None else None)


@dataclass
class Answer:
    """The answer to an approval step (see :func:`workflows.api.approve_run`)."""

    approved: bool
    comment: str
    by: str
    at: float

    def to_doc(self) -> dict[str, Any]:
        return {"approved": self.approved, "comment": self.comment, "by": self.by, "at": self.at}

    @classmethod
    def from_doc(cls, doc: Any) -> Answer | None:
        """The answer in ``doc``, or None if it is not one."""
        if not isinstance(doc, dict) or not isinstance(doc.get("approved"), bool):
            return None
        return cls(doc["approved"], str(doc.get("comment", "")), str(doc.get("by", "")),
                   float(doc.get("at", 0.0)))


@dataclass
class RunRecord:
    """A run as the state service keeps it (see the module docstring)."""

    run_id: str
    workflow: str
    definition: dict[str, Any]
    status: RunStatus
    created_at: float
    input: Any = None
    updated_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    deadline_at: float | None = None
    submitted_by: str = ""
    runner: str = ""
    takeovers: int = 0
    pending: list[PendingApproval] = field(default_factory=list)
    history: list[HistoryEntry] = field(default_factory=list)
    output: StepOutput | None = None
    error: RunError | None = None
    input_chunks: int = 0
    output_chunks: int = 0
    #: the run has ended, and the broker may still hold results of its tasks: whoever
    #: gets the lease next releases them (see ``workflows.driver.release_ended``)
    release_due: bool = False

    def note(self, event: str, **fields: Any) -> None:
        """Append a history entry (now), keeping the newest MAX_HISTORY."""
        self.history.append(HistoryEntry(event, time.time(), **fields))
        if len(self.history) > MAX_HISTORY:
            del self.history[:-MAX_HISTORY]

    def to_doc(self) -> dict[str, Any]:
        """The record as stored (the output stored separately when in chunks)."""
        return {
            "run_id": self.run_id, "workflow": self.workflow, "definition": self.definition,
            "input": self.input, "status": self.status.value, "created_at": self.created_at,
            "updated_at": self.updated_at, "started_at": self.started_at,
            "finished_at": self.finished_at, "deadline_at": self.deadline_at,
            "submitted_by": self.submitted_by, "runner": self.runner,
            "takeovers": self.takeovers, "pending": [p.to_doc() for p in self.pending],
            "history": [h.to_doc() for h in self.history],
            "output": None if self.output is None or self.output_chunks
            else self.output.to_doc(),
            "error": None if self.error is None else self.error.to_doc(),
            "input_chunks": self.input_chunks, "output_chunks": self.output_chunks,
            "release_due": self.release_due,
        }

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> RunRecord:
        """The record stored as ``doc``.

        Raises:
            ValueError: ``doc`` is not a run record.
        """
        try:
            status = RunStatus(doc["status"])
            record = cls(str(doc["run_id"]), str(doc.get("workflow", "")),
                         dict(doc.get("definition") or {}), status,
                         float(doc.get("created_at", 0.0)))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"not a run record: {e}") from e
        record.input = doc.get("input")
        record.updated_at = float(doc.get("updated_at") or 0.0)
        record.started_at = _float_or_none(doc.get("started_at"))
        record.finished_at = _float_or_none(doc.get("finished_at"))
        record.deadline_at = _float_or_none(doc.get("deadline_at"))
        record.submitted_by = str(doc.get("submitted_by", ""))
        record.runner = str(doc.get("runner", ""))
        record.takeovers = int(doc.get("takeovers", 0))
        record.pending = [PendingApproval.from_doc(p) for p in doc.get("pending") or []
                          if isinstance(p, dict)]
        record.history = [HistoryEntry.from_doc(h) for h in doc.get("history") or []
                          if isinstance(h, dict)]
        output = doc.get("output")
        record.output = StepOutput.from_doc(output) if output is not None else None
        error = doc.get("error")
        record.error = RunError.from_doc(error) if isinstance(error, dict) else None
        record.input_chunks = int(doc.get("input_chunks", 0))
        record.output_chunks = int(doc.get("output_chunks", 0))
        record.release_due = bool(doc.get("release_due", False))
        return record


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)


class RunStore:
    """Reads and writes runs in the state service.

    Args:
        state: the state service.
    """

    def __init__(self, state: StateClient) -> None:
        self.state = state

    async def create(self, record: RunRecord, fence: Lease | None = None) -> None:
        """Store a new run (its input in chunks when large).

        Raises:
            WorkflowInputError: a run with this id exists already, or the input is too
                large to keep.
        """
        packed = _pack(record.input, "the input")
        if len(packed) > INLINE_VALUE_MAX_BYTES:
            record.input_chunks = await self._write_chunks(record.run_id, "input", packed, fence)
            value = record.input
            record.input = None
        else:
            value = record.input
        try:
            await self.state.cas(ids.run_key(record.run_id), 0, record.to_doc(), fence=fence)
        except VersionConflict:
            raise WorkflowInputError(f"a run with id {record.run_id!r} exists already") from None
        finally:
            record.input = value

    async def load(self, run_id: str) -> RunRecord | None:
        """The run's record (its input and output not read from chunks), or None."""
        doc = await self.state.get(ids.run_key(run_id))
        if not isinstance(doc, dict):
            return None
        try:
            return RunRecord.from_doc(doc)
        except ValueError:
            return None

    async def require(self, run_id: str) -> RunRecord:
        """The run's record.

        Raises:
            RunNotFound: there is none.
        """
        record = await self.load(ids.check_run_id(run_id))
        if record is None:
            raise RunNotFound(run_id)
        return record

    async def save(self, record: RunRecord, fence: Lease) -> None:
        """Write the record (by the runner holding the run's lease)."""
        record.updated_at = time.time()
        await self.state.set(ids.run_key(record.run_id), record.to_doc(), fence=fence)

    async def save_output(self, record: RunRecord, output: StepOutput, fence: Lease) -> None:
        """Set the run's output, in chunks when large (the record is saved after)."""
        record.output = output
        packed = _pack(output.to_doc(), "the output")
        record.output_chunks = 0
        if len(packed) > INLINE_VALUE_MAX_BYTES:
            record.output_chunks = await self._write_chunks(record.run_id, "output", packed,
                                                            fence)

    async def records(self) -> list[RunRecord]:
        """Every run record, in run id order."""
        found = []
        for item in await self.state.list(ids.RUNS_PREFIX):
            if ids.run_id_of_key(item.key) is None or not isinstance(item.value, dict):
                continue
            try:
                found.append(RunRecord.from_doc(item.value))
            except ValueError:
                continue
        return found

    async def input_of(self, record: RunRecord) -> Any:
        """The run's input (read from its chunks when large)."""
        if not record.input_chunks:
            return record.input
        return unpackb(await self._read_chunks(record.run_id, "input", record.input_chunks))

    async def output_of(self, record: RunRecord) -> StepOutput | None:
        """The run's output (read from its chunks when large), None before it ends."""
        if not record.output_chunks:
            return record.output
        packed = await self._read_chunks(record.run_id, "output", record.output_chunks)
        return StepOutput.from_doc(unpackb(packed))

    async def answers(self, run_id: str) -> dict[str, Answer]:
        """The approval answers given for the run, by step path."""
        prefix = ids.answer_key(run_id, "")
        found: dict[str, Answer] = {}
        for item in await self.state.list(prefix):
            answer = Answer.from_doc(item.value)
            if answer is not None:
                found[item.key[len(prefix):]] = answer
        return found

    async def _write_chunks(self, run_id: str, what: str, packed: bytes,
                            fence: Lease | None) -> int:
        chunks = [packed[i:i + CHUNK_BYTES] for i in range(0, len(packed), CHUNK_BYTES)]
        if len(chunks) > MAX_CHUNKS:
            raise WorkflowInputError(f"{what} of run {run_id} is {len(packed)} bytes; a run "
                                     f"keeps at most {MAX_CHUNKS * CHUNK_BYTES}")
        prefix = ids.blob_prefix(run_id, what)
        for index, chunk in enumerate(chunks):
            await self.state.set(f"{prefix}{index:06d}", chunk, fence=fence)
        return len(chunks)

    async def _read_chunks(self, run_id: str, what: str, count: int) -> bytes:
        items = await self.state.list(ids.blob_prefix(run_id, what))
        parts = [bytes(item.value) for item in items[:count]
                 if isinstance(item.value, (bytes, bytearray))]
        if len(parts) != count:
            raise WorkflowInputError(f"the {what} of run {run_id} is incomplete in the state "
                                     f"service ({len(parts)} of {count} chunks)")
        return b"".join(parts)


def _pack(value: Any, what: str) -> bytes:
    try:
        return packb(value)
    except (TypeError, ValueError, OverflowError) as e:
        raise WorkflowInputError(f"{what} must be msgpack-encodable data: {e}") from e


__all__ = [
    "Answer", "CHUNK_BYTES", "HistoryEntry", "INLINE_VALUE_MAX_BYTES", "MAX_COMMENT_CHARS",
    "PendingApproval", "RunError", "RunRecord", "RunStatus", "RunStore", "retry_unavailable",
]
