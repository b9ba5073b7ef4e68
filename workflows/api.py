"""Durable runs for the CLI and for programs: submit, watch, cancel, resume, approve.

Every function takes the broker connection as ``client=`` (an open
:class:`agent_sdk.Client`), or ``broker=`` (a URL; default ``$ORCH_BROKER``) to open and
close one for the call. Each returns a typed record, never a loose map::

    run_id = await submit_run({"workflow": "audit", "steps": [...]}, ["a.py", "b.py"],
                              broker=url)
    details = await wait_run(run_id, broker=url, timeout=600)
    await approve_run(run_id, approved=False, comment="not now", by="ana", broker=url)

A submitted run is driven by a standing runner (``python -m workflows.runner``, which
``orchestrator start`` runs); :func:`drive_run` drives one in the calling process, and
:func:`run_workflow` creates and drives one at once (what ``execute`` does).
"""

from __future__ import annotations

import asyncio
import dataclasses
import getpass
import logging
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Final

from agent_sdk import (
    Change, Client, Lease, LockTimeout, OrchestratorError, VersionConflict, WaitTimeout,
)
from workflows import ids
from workflows.checkpoints import load_log
from workflows.errors import (
    AlreadyAnswered, RunCancelled, RunFailed, RunNotFound, RunRejected, RunStateError,
    WorkflowError, WorkflowInputError,
)
from workflows.model import DefinitionError, Workflow
from workflows.outputs import entry_error, entry_ok, StepOutput
from workflows.runs import (
    Answer, HistoryEntry, MAX_COMMENT_CHARS, PendingApproval, RunError, RunRecord, RunStatus,
    RunStore,
)

logger = logging.getLogger(__name__)

#: The values of the statuses a run ends with.
TERMINAL_STATUSES: Final = frozenset(s.value for s in RunStatus if s.terminal)
#: How long :func:`cancel_run` waits by default for the run to end.
CANCEL_WAIT_S: Final = 10.0


@dataclass(frozen=True)
class RunProgress:
    """Steps done and planned (see :mod:`workflows.events`)."""

    done: int
    total: int


@dataclass(frozen=True)
class StepCheckpoint:
    """One checkpointed step of a run.

    Attributes:
        path: the step's path.
        status: its task's status (``succeeded`` for answers and decisions).
        task_id: its broker task, if it ran as one.
        agent: the agent that ran it.
        error: ``code: message`` of a failure.
        by_reference: its result is kept in the broker, not in the checkpoint.
    """

    path: str
    status: str
    task_id: str | None
    agent: str | None
    error: str | None
    by_reference: bool


@dataclass(frozen=True)
class RunSummary:
    """A run in a listing."""

    run_id: str
    workflow: str
    status: RunStatus
    created_at: float
    updated_at: float
    runner: str
    waiting_approvals: int


@dataclass(frozen=True)
class RunDetails:
    """Everything about a run (``workflow status``)."""

    run_id: str
    workflow: str
    status: RunStatus
    definition: dict[str, Any]
    input: Any
    created_at: float
    updated_at: float
    started_at: float | None
    finished_at: float | None
    deadline_at: float | None
    submitted_by: str
    runner: str
    takeovers: int
    progress: RunProgress
    pending: list[PendingApproval]
    history: list[HistoryEntry]
    output: StepOutput | None
    error: RunError | None
    steps: list[StepCheckpoint]


@dataclass(frozen=True)
class ApprovalRecord:
    """An answer given to an approval step."""

    run_id: str
    path: str
    approved: bool
    comment: str
    by: str
    at: float


@dataclass(frozen=True)
class CancelRecord:
    """What a cancel did.

    Attributes:
        status: the run's status when the call returned.
        ended: whether the run has ended (by this cancel or before it).
    """

    run_id: str
    status: RunStatus
    ended: bool
    by: str
    at: float


@dataclass(frozen=True)
class ResumeRecord:
    """What a resume asked for.

    Attributes:
        holder: who holds the run's lease now (None: no runner drives it; start one,
            or :func:`drive_run` it here).
        runners: the standing runners serving now (their presence locks).
        drive_here: no standing runner serves, so nobody will act on the request: the
            caller should drive the run itself (:func:`drive_run`), which takes the
            lease as soon as a dead holder's state session has expired.
    """

    run_id: str
    status: RunStatus
    holder: str | None
    at: float
    runners: tuple[str, ...] = ()
    drive_here: bool = False


def whoami() -> str:
    """``user@host``: who answers, cancels or submits, by default."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


@asynccontextmanager
async def connected(client: Client | None, broker: str | None) -> AsyncIterator[Client]:
    """``client``, or a client of ``broker`` opened for the block and closed after."""
    if client is not None:
        yield client
        return
    own = Client(broker)
    try:
        yield await own.connect()
    finally:
        await own.close()


def as_workflow(definition: Workflow | dict[str, Any], deadline_s: float | None = None
                ) -> Workflow:
    """A validated workflow from a definition or its dict form, with ``deadline_s``
    (when given) as its deadline.

    Raises:
        DefinitionError: naming the offending field.
    """
    workflow = definition if isinstance(definition, Workflow) else Workflow.from_dict(definition)
    # The dict form round trip validates a workflow built in Python too.
    workflow = Workflow.from_dict(workflow.to_dict())
    if deadline_s is not None:
        if not deadline_s > 0:
            raise DefinitionError(("deadline_s",), "must be a positive number of seconds")
        workflow = dataclasses.replace(workflow, deadline_s=float(deadline_s))
    return workflow


def new_record(workflow: Workflow, data: Any, run_id: str | None, submitted_by: str
               ) -> RunRecord:
    """The record of a new run (status ``submitted``)."""
    now = time.time()
    record = RunRecord(ids.check_run_id(run_id) if run_id else ids.new_run_id(),
                       workflow.name, workflow.to_dict(), RunStatus.SUBMITTED, now, data,
                       updated_at=now, submitted_by=submitted_by or whoami(),
                       deadline_at=None if workflow.deadline_s is None
                       else now + workflow.deadline_s)
    record.note("submitted", by=record.submitted_by)
    return record


async def live_runners(*, client: Client | None = None, broker: str | None = None
                       ) -> list[str]:
    """The ids of the standing runners serving now, on any machine (each holds its
    presence lock while it serves): none means a submitted run waits for one."""
    async with connected(client, broker) as c:
        locks = await c.state.locks(ids.RUNNERS_PREFIX)
    return sorted(lock.name[len(ids.RUNNERS_PREFIX):] for lock in locks)


async def submit_run(definition: Workflow | dict[str, Any], data: Any = None, *,
                     client: Client | None = None, broker: str | None = None,
                     run_id: str | None = None, deadline_s: float | None = None,
                     submitted_by: str = "") -> str:
    """Store a new run for a standing runner to drive; returns its run id.

    Raises:
        DefinitionError: the definition is invalid.
        WorkflowInputError: the input cannot be stored, or the run id is taken.
    """
    workflow = as_workflow(definition, deadline_s)
    record = new_record(workflow, data, run_id, submitted_by)
    async with connected(client, broker) as c:
        await RunStore(c.state).create(record)
    return record.run_id


async def run_workflow(workflow: Workflow, data: Any = None, *, client: Client,
                       run_id: str | None = None, submitted_by: str = "") -> RunRecord:
    """Create a run and drive it in this process until it ends; returns its final
    record (whatever its status). Cancelled, it leaves the run to the standing runner.

    Raises:
        WorkflowInputError: the input cannot be stored, or the run id is taken.
    """
    # Imported here, not at the top: `python -m workflows.runner` must not find its own
    # module imported already by the package it belongs to.
    from workflows.runner import Runner

    record = new_record(workflow, data, run_id, submitted_by)
    runner = Runner(client)
    try:
        # Taken before the record exists: no standing runner can start it meanwhile.
        lease = await runner.acquire(record.run_id, wait=0)
    except LockTimeout:
        raise WorkflowInputError(f"run {record.run_id} is driven already") from None
    try:
        await RunStore(client.state).create(record, fence=lease)
    except BaseException:
        await lease.release()
        raise
    return await runner.drive(record.run_id, lease)


async def drive_run(run_id: str, *, client: Client | None = None,
                    broker: str | None = None) -> RunDetails:
    """Drive ``run_id`` in this process (waiting for its lease while another runner
    has it) until it ends."""
    from workflows.runner import Runner  # see run_workflow

    async with connected(client, broker) as c:
        await Runner(c).drive(ids.check_run_id(run_id))
        return await run_status(run_id, client=c)


async def run_status(run_id: str, *, client: Client | None = None, broker: str | None = None
                     ) -> RunDetails:
    """Everything about a run: record, progress, checkpointed steps, output.

    Raises:
        RunNotFound: there is no such run.
    """
    async with connected(client, broker) as c:
        store = RunStore(c.state)
        record = await store.require(run_id)
        log = await load_log(c.state, run_id)
        data = await store.input_of(record)
        output = await store.output_of(record)
    steps = []
    for path, entry in sorted(log.entries.items()):
        error = None if entry_ok(entry) else ": ".join(entry_error(entry))
        steps.append(StepCheckpoint(path, str(entry.get("s", "succeeded")),
                                    entry.get("t"), entry.get("a"), error,
                                    bool(entry.get("ref"))))
    done, total = log.done, max(log.total, log.done)
    if record.status is RunStatus.SUCCEEDED:
        total = done
    return RunDetails(
        record.run_id, record.workflow, record.status, record.definition, data,
        record.created_at, record.updated_at, record.started_at, record.finished_at,
        record.deadline_at, record.submitted_by, record.runner, record.takeovers,
        RunProgress(done, total), list(record.pending), list(record.history), output,
        record.error, steps)


async def list_runs(*, client: Client | None = None, broker: str | None = None,
                    status: RunStatus | str | None = None, limit: int | None = None
                    ) -> list[RunSummary]:
    """The runs, newest first (only those of ``status`` when given)."""
    wanted = RunStatus(status) if status is not None else None
    async with connected(client, broker) as c:
        records = await RunStore(c.state).records()
    records.sort(key=lambda r: r.created_at, reverse=True)
    summaries = [RunSummary(r.run_id, r.workflow, r.status, r.created_at, r.updated_at,
                            r.runner, len(r.pending))
                 for r in records if wanted is None or r.status is wanted]
    return summaries if limit is None else summaries[:limit]


async def wait_run(run_id: str, *, client: Client | None = None, broker: str | None = None,
                   timeout: float | None = None) -> RunDetails:
    """Wait until the run has ended (a watch on its record, no polling).

    Raises:
        RunNotFound: there is no such run.
        WaitTimeout: ``timeout`` passed first.
    """
    async with connected(client, broker) as c:
        ended = asyncio.Event()

        def on_change(change: Change) -> None:
            value = change.value if isinstance(change.value, dict) else {}
            if change.key == ids.run_key(run_id) and \
                    value.get("status") in TERMINAL_STATUSES:
                ended.set()

        watch = await c.state.watch(ids.run_key(run_id), on_change)
        try:
            if not (await RunStore(c.state).require(run_id)).status.terminal:
                try:
                    await asyncio.wait_for(ended.wait(), timeout)
                except asyncio.TimeoutError:
                    raise WaitTimeout(f"run {run_id} has not ended after {timeout:g} s") from None
        finally:
            await watch.cancel()
        return await run_status(run_id, client=c)


async def approve_run(run_id: str, approved: bool = True, comment: str = "", by: str = "", *,
                      path: str | None = None, client: Client | None = None,
                      broker: str | None = None) -> ApprovalRecord:
    """Answer a run's waiting approval step (the only one, or the one at ``path``).

    Raises:
        RunNotFound: there is no such run.
        RunStateError: the run has ended, or waits for no approval (at ``path``), or
            for several and ``path`` does not say which.
        AlreadyAnswered: somebody answered it first.
    """
    answer = Answer(bool(approved), str(comment)[:MAX_COMMENT_CHARS], by or whoami(),
                    time.time())
    async with connected(client, broker) as c:
        record = await RunStore(c.state).require(run_id)
        chosen = _waiting_approval(record, path)
        key = ids.answer_key(run_id, chosen)
        try:
            await c.state.cas(key, 0, answer.to_doc())
        except VersionConflict as e:
            earlier = Answer.from_doc(e.current_value) or answer
            raise AlreadyAnswered(run_id, record.status.value, chosen, earlier.by, earlier.at,
                                  earlier.approved) from None
    return ApprovalRecord(run_id, chosen, answer.approved, answer.comment, answer.by, answer.at)


#: The SDK's name for :func:`approve_run`: ``await approve(run_id, True, "ok", "ana")``.
approve = approve_run


def _waiting_approval(record: RunRecord, path: str | None) -> str:
    if record.status.terminal:
        raise RunStateError(record.run_id, record.status.value, "there is nothing to approve")
    waiting = [p.path for p in record.pending]
    if path is not None:
        if path not in waiting:
            raise RunStateError(record.run_id, record.status.value,
                                f"no approval waits at {path}"
                                + (f" (waiting: {', '.join(waiting)})" if waiting else ""))
        return path
    if not waiting:
        raise RunStateError(record.run_id, record.status.value, "it waits for no approval")
    if len(waiting) > 1:
        raise RunStateError(record.run_id, record.status.value, "several approvals wait ("
                            f"{', '.join(waiting)}); say which with path=")
    return waiting[0]


async def cancel_run(run_id: str, *, reason: str = "", by: str = "",
                     client: Client | None = None, broker: str | None = None,
                     wait_s: float = CANCEL_WAIT_S) -> CancelRecord:
    """Cancel a run: every open task of it is cancelled and it ends ``cancelled``.

    The request is written for the runner driving the run; when none does, this call
    takes the run's lease and ends it itself. Waits up to ``wait_s`` for it to end.

    Raises:
        RunNotFound: there is no such run.
    """
    who = by or whoami()
    at = time.time()
    async with connected(client, broker) as c:
        store = RunStore(c.state)
        record = await store.require(run_id)
        if record.status.terminal:
            return CancelRecord(run_id, record.status, True, who, at)
        await c.state.set(ids.cancel_key(run_id), {"by": who, "at": at, "reason": reason})
        try:
            lease = await c.state.acquire(ids.lease_name(run_id), ttl=CANCEL_WAIT_S, wait=0)
        except LockTimeout:
            pass  # a runner drives it: it sees the request and ends the run
        else:
            try:
                await _cancel_undriven(c, store, run_id, who, reason, lease)
            finally:
                await lease.release()
        try:
            details = await wait_run(run_id, client=c, timeout=wait_s)
        except OrchestratorError:
            current = await store.require(run_id)
            return CancelRecord(run_id, current.status, current.status.terminal, who, at)
    return CancelRecord(run_id, details.status, details.status.terminal, who, at)


async def _cancel_undriven(client: Client, store: RunStore, run_id: str, who: str,
                           reason: str, lease: Lease) -> None:
    """End a run nobody drives: mark it cancelled, then cancel its open tasks and release
    its held results (a runner that died may have left both; see
    :func:`workflows.driver.release_ended`). A release the broker could not confirm stays
    due in the record, for the next runner that starts."""
    from workflows.driver import release_ended  # see run_workflow

    record = await store.require(run_id)
    if record.status.terminal:
        return
    record.status = RunStatus.CANCELLED
    record.error = RunError("cancelled", f"cancelled by {who}" + (f": {reason}" if reason else ""))
    record.pending = []
    record.release_due = True
    record.finished_at = time.time()
    record.note("cancel", by=who, comment=reason)
    record.note("finished", by=who, detail="cancelled")
    await store.save(record, lease)
    try:
        await release_ended(client, record, lease)
    except OrchestratorError as e:
        logger.warning("run %s: its held results are released later (%s)", run_id, e)


async def resume_run(run_id: str, *, by: str = "", client: Client | None = None,
                     broker: str | None = None) -> ResumeRecord:
    """Ask the runner driving a run to take it over again from its checkpoints (open
    tasks are attached to, not run again); returns who holds it now, and whether any
    standing runner serves (``drive_here``: none does, so drive it in this process).

    A lease whose holder died cannot be taken before the state service notices: it
    releases a silent session's leases after a few missed heartbeats (not after the
    lease's time to live), and every runner waiting for the lease gets it then.

    Raises:
        RunNotFound: there is no such run.
        RunStateError: it has ended (submit it again instead).
    """
    who = by or whoami()
    at = time.time()
    async with connected(client, broker) as c:
        record = await RunStore(c.state).require(run_id)
        if record.status.terminal:
            raise RunStateError(run_id, record.status.value, "it has ended; submit it again")

        def bump(current: Any) -> dict[str, Any]:
            count = current.get("n", 0) if isinstance(current, dict) else 0
            return {"by": who, "at": at, "n": int(count) + 1}

        await c.state.update(ids.resume_key(run_id), bump)
        locks = await c.state.locks(ids.lease_name(run_id))
        runners = tuple(await live_runners(client=c))
    holder = next((lock.holder for lock in locks if lock.name == ids.lease_name(run_id)), None)
    return ResumeRecord(run_id, record.status, holder or None, at, runners, not runners)


def raise_for(record: RunRecord) -> None:
    """Raise what a run that did not succeed ended with (nothing for a success).

    Raises:
        RunFailed, RunCancelled, RunRejected: by its status.
    """
    error = record.error or RunError(record.status.value, f"the run is {record.status.value}")
    if record.status is RunStatus.SUCCEEDED:
        return
    if record.status is RunStatus.CANCELLED:
        raise RunCancelled(record.run_id, "cancelled", error.code, error.message, error.path)
    if record.status is RunStatus.REJECTED:
        answer = next((h for h in reversed(record.history) if h.event == "approval"), None)
        raise RunRejected(record.run_id, error.message, error.path,
                          answer.comment if answer else "", answer.by if answer else "")
    if record.status in (RunStatus.FAILED, RunStatus.BUDGET_EXCEEDED):
        raise RunFailed(record.run_id, record.status.value, error.code, error.message,
                        error.path)
    raise WorkflowError(f"run {record.run_id} has not ended ({record.status.value})")


__all__ = [
    "ApprovalRecord", "CancelRecord", "ResumeRecord", "RunDetails", "RunNotFound",
    "RunProgress", "RunSummary", "StepCheckpoint", "approve", "approve_run", "as_workflow",
    "cancel_run", "connected", "drive_run", "list_runs", "new_record", "raise_for",
    "resume_run", "run_status", "run_workflow", "submit_run", "wait_run", "whoami",
]
