"""The driver: one runner's turn at one run, from taking it to ending it or letting go.

The runner (:mod:`workflows.runner`) holds the run's lease; the driver does the rest:

1. reads the checkpoints and the control keys, and watches the control keys from then
   on (approval answers, cancel and resume requests);
2. marks the run running (noting a takeover when another runner drove it before);
3. runs the :class:`~workflows.executor.Executor` over the definition and the input,
   with a timer for the run's deadline and a watch on the lease;
4. ends the run: output or error, final status, checkpoints flushed; then what the
   broker still runs of it is cancelled and every held result of its tasks released
   (:func:`release_ended`).

An ended run's record says ``release_due`` until the broker confirmed that release, so
a release lost to a broker restart (or to the runner dying right after the end) is done
again by whoever takes the run's lease next (:meth:`workflows.runner.Runner.drive`;
standing runners look for such runs when they start and on every record change).
An error the driver does not expect (a bug, an output it cannot handle) ends the run
``failed`` with code ``internal`` and the error's one line, rather than leaving it
``running`` with nobody driving it.

Or it stops early and leaves the run as it is: the lease was lost (another runner took
over: every write is fenced, so this one cannot interfere), a resume was asked for (the
runner drives it again from the checkpoints), or the runner itself is stopping. In
those cases no task is cancelled: the next runner attaches to them.

A cancel request cancels every open task of the run and ends it ``cancelled``; the
deadline does the same and ends it ``failed`` (code ``deadline``).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Iterable
from typing import Any

from agent_sdk import (
    BrokerUnavailable, Change, Client, Lease, OrchestratorError, StaleFencingToken, StateError,
    StateUnavailable,
)
from wire.tracing import (
    GEN_AI_OPERATION_NAME, OP_INVOKE_WORKFLOW, ORCH_RUN_ID, ORCH_WORKFLOW_NAME, start_root_span,
)
from workflows import ids
from workflows.approval import ApprovalDesk
from workflows.checkpoints import CheckpointLog, load_log
from workflows.errors import RunRejected, StepFailed, WorkflowError
from workflows.events import planned_steps, Progress, RunEvents
from workflows.executor import Executor
from workflows.model import DefinitionError, Workflow
from workflows.outputs import StepOutput
from workflows.runs import (
    Answer, PendingApproval, retry_unavailable, RunError, RunRecord, RunStatus, RunStore,
)
from workflows.tasks import cancel_run_tasks, Deadline, release_run_tasks, StepTasks

logger = logging.getLogger(__name__)


class Outcome(enum.Enum):
    """How a driver's turn ended."""

    #: the run ended (its record is terminal)
    FINISHED = "finished"
    #: another runner has the run now
    LEASE_LOST = "lease_lost"
    #: a resume request: drive it again from the checkpoints
    RESTART = "restart"


class Stop(enum.Enum):
    """Why a running executor is stopped from outside."""

    CANCEL = "cancel"
    DEADLINE = "deadline"
    LEASE_LOST = "lease_lost"
    RESUME = "resume"
    BROKEN = "broken"


def budget_fields(workflow: Workflow, run_id: str) -> dict[str, Any]:
    """The task fields that give every step of a run its share of the run's LLM token
    budget (none without ``max_tokens``): one scope per run, in the state service."""
    if workflow.max_tokens is None:
        return {}
    return {"llm_budget": {"scope": f"run:{run_id}", "max_tokens": workflow.max_tokens}}


def internal_error(error: BaseException) -> RunError:
    """The run error of an unexpected exception: code ``internal``, one line."""
    text = " ".join(str(error).split())
    return RunError("internal", f"{type(error).__name__}: {text}" if text
                    else type(error).__name__)


async def release_ended(client: Client, record: RunRecord, lease: Lease,
                        known: Iterable[str] = (), complete: bool = False) -> None:
    """For an ended run whose record says ``release_due``: cancel what the broker still
    runs of it, release every held result of its tasks, and clear the flag in the record
    (fenced by ``lease``). Idempotent: a second call releases nothing new.

    Args:
        known: task ids of the run the caller knows of.
        complete: ``known`` are all of them and none is open (one turn drove the run
            from its start to its success); otherwise the checkpoints' ids and the
            broker's listing are added.

    Raises:
        BrokerUnavailable: the broker did not answer or restarted meanwhile (the flag
            stays set: call again later).
        StaleFencingToken: the lease is gone (the next holder does it).
    """
    chosen = set(known)
    if not complete:
        loaded = await load_log(client.state, record.run_id)
        chosen.update(str(entry["t"]) for entry in loaded.entries.values() if "t" in entry)
    cancelled, released = await release_run_tasks(client, record.run_id, chosen,
                                                   listed=not complete)
    record.release_due = False
    store = RunStore(client.state)
    await retry_unavailable(lambda: store.save(record, lease),
                            f"the record of run {record.run_id}")
    logger.info("run %s: %d open task(s) cancelled, %d held result(s) released",
                record.run_id, cancelled, released)


class RunDriver:
    """Drives one run while its runner holds the lease (see the module docstring).

    Args:
        client: the broker connection (and, through it, the state service).
        record: the run's record as read after taking the lease.
        lease: the run's lease.
        runner_id: who drives it (kept in the record and its history).
    """

    def __init__(self, client: Client, record: RunRecord, lease: Lease, runner_id: str) -> None:
        self.client = client
        self.store = RunStore(client.state)
        self.record = record
        self.lease = lease
        self.runner_id = runner_id
        self.run_id = record.run_id
        #: this turn starts the run: no earlier turn submitted any of its tasks
        self._fresh = record.status is RunStatus.SUBMITTED and not record.runner
        self._stop: Stop | None = None
        self._stop_detail = ""
        self._root: asyncio.Task[StepOutput] | None = None
        self._saving = asyncio.Lock()
        self._resumes_seen = -1
        self._desk = ApprovalDesk({}, self._approval_waiting, self._approval_answered)

    # ------------------------------------------------------------------ the turn

    async def drive(self) -> Outcome:
        """Drive the run until it ends or this turn stops (see :class:`Outcome`).

        Raises:
            asyncio.CancelledError: the caller was cancelled (the runner is stopping):
                the run is left for the next runner, its tasks untouched.
        """
        loop = asyncio.get_running_loop()
        state = self.client.state
        watch = await state.watch(ids.control_prefix(self.run_id), self._on_control)
        lease_watch = loop.create_task(self.lease.wait_lost())
        lease_watch.add_done_callback(self._lease_gone)
        log: CheckpointLog | None = None
        events: RunEvents | None = None
        timer: asyncio.TimerHandle | None = None
        try:
            for change in await state.list(ids.control_prefix(self.run_id)):
                self._on_control(Change(change.key, change.version, change.value, False))
            if self._resumes_seen < 0:
                self._resumes_seen = 0
            try:
                workflow = Workflow.from_dict(self.record.definition)
            except DefinitionError as e:
                return await self._end_early(RunError("bad_definition", str(e)))
            data = await self.store.input_of(self.record)
            loaded = await load_log(state, self.run_id)
            progress = Progress(0, planned_steps(workflow.root))
            tasks = StepTasks(self.client, self.run_id, Deadline(self.record.deadline_at),
                              budget_fields(workflow, self.run_id))
            events = RunEvents(self.client, self.run_id, progress)
            log = CheckpointLog(state, self.run_id, loaded, self.lease, progress.snapshot,
                                tasks.release, self._checkpoint_failed)
            if not await self._mark_running():
                return Outcome.LEASE_LOST
            events.emit("run_started", runner=self.runner_id)
            remaining = tasks.deadline.remaining_s()
            if remaining is not None:
                timer = loop.call_later(max(0.0, remaining), self._interrupt, Stop.DEADLINE)
            executor = Executor(self.run_id, tasks, log, events, progress, self._desk)
            # One trace per turn of the run: the steps' tasks, submitted inside, are its
            # children (the root Task copies this context when created).
            with start_root_span(f"{OP_INVOKE_WORKFLOW} {workflow.name}", {
                    GEN_AI_OPERATION_NAME: OP_INVOKE_WORKFLOW,
                    ORCH_WORKFLOW_NAME: workflow.name, ORCH_RUN_ID: self.run_id}):
                self._root = loop.create_task(executor.run(workflow.root, data))
                if self._stop is not None:
                    self._root.cancel()
                return await self._await_root(self._root, tasks, log, events)
        finally:
            if timer is not None:
                timer.cancel()
            lease_watch.cancel()
            if self._root is not None and not self._root.done():
                self._root.cancel()
                await asyncio.gather(self._root, return_exceptions=True)
            await watch.cancel()
            if log is not None:
                await log.close()
            if events is not None:
                await events.close()

    async def _await_root(self, root: asyncio.Task[StepOutput], tasks: StepTasks,
                          log: CheckpointLog, events: RunEvents) -> Outcome:
        """Wait for the executor and end the run by how it ended."""
        try:
            output = await root
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if self._stop is None or (current is not None and current.cancelling()):
                raise  # the runner is stopping: leave the run to the next one
            return await self._stopped(tasks, log, events)
        except StepFailed as e:
            status = RunStatus.BUDGET_EXCEEDED if await self._budget_spent(tasks) \
                else RunStatus.FAILED
            return await self._end(status, tasks, log, events,
                                   error=RunError(e.code, e.reason, e.path))
        except RunRejected as e:
            return await self._end(RunStatus.REJECTED, tasks, log, events,
                                   error=RunError("rejected", e.reason, e.path))
        except WorkflowError as e:
            return await self._end(RunStatus.FAILED, tasks, log, events,
                                   error=RunError("bad_input", str(e)))
        except (BrokerUnavailable, StateUnavailable):
            raise  # transient: the runner drives the run again once they answer
        except OrchestratorError as e:
            # Refused for good (another protocol version, say): no retry can help.
            return await self._end(RunStatus.FAILED, tasks, log, events,
                                   error=RunError(type(e).__name__, str(e)))
        except Exception as e:  # noqa: BLE001 - a bug must end the run, not strand it
            logger.exception("run %s: the executor failed", self.run_id)
            return await self._end(RunStatus.FAILED, tasks, log, events,
                                   error=internal_error(e))
        if self._stop is Stop.LEASE_LOST:
            return Outcome.LEASE_LOST
        return await self._end(RunStatus.SUCCEEDED, tasks, log, events, output=output)

    async def _budget_spent(self, tasks: StepTasks) -> bool:
        """Whether the run has a token budget and it is spent (a step that failed then
        failed for want of it, or its agents could not go on)."""
        spec = tasks.run_fields.get("llm_budget")
        if not spec:
            return False
        from agent_sdk.llm import TokenBudget  # only runs with a budget need it

        budget = TokenBudget(spec["scope"], spec["max_tokens"], self.client.state)
        return await budget.spent() >= budget.max_tokens

    async def _stopped(self, tasks: StepTasks, log: CheckpointLog,
                       events: RunEvents) -> Outcome:
        stop = self._stop
        if stop is Stop.LEASE_LOST:
            return Outcome.LEASE_LOST
        if stop is Stop.RESUME:
            self.record.note("resume", by=self._stop_detail)
            return Outcome.RESTART if await self._save() else Outcome.LEASE_LOST
        cancelled = 0
        if stop in (Stop.CANCEL, Stop.DEADLINE):
            # This runner's open tasks at once, then any an earlier runner left.
            cancelled = await tasks.cancel_under("")
            cancelled += await cancel_run_tasks(self.client, self.run_id)
        logger.info("run %s: %s; %d open task(s) cancelled", self.run_id,
                    stop.value if stop else "stopped", cancelled)
        if stop is Stop.CANCEL:
            return await self._end(RunStatus.CANCELLED, tasks, log, events, error=RunError(
                "cancelled", self._stop_detail or "cancelled by request"))
        if stop is Stop.DEADLINE:
            return await self._end(RunStatus.FAILED, tasks, log, events, error=RunError(
                "deadline", "the run's deadline passed"))
        return await self._end(RunStatus.FAILED, tasks, log, events, error=RunError(
            "checkpoint_failed", self._stop_detail))

    async def _end(self, status: RunStatus, tasks: StepTasks, log: CheckpointLog,
                   events: RunEvents, *, output: StepOutput | None = None,
                   error: RunError | None = None) -> Outcome:
        """Write the run's end; the lease is the guard of every write."""
        record = self.record
        try:
            if status is RunStatus.SUCCEEDED:
                await log.flush()
            else:
                await self._flush_quietly(log)
            if output is not None:
                final = output
                await retry_unavailable(
                    lambda: self.store.save_output(record, final, self.lease),
                    f"the output of run {self.run_id}")
        except StaleFencingToken:
            return Outcome.LEASE_LOST
        except StateError as e:
            status, output = RunStatus.FAILED, None
            error = RunError("checkpoint_failed", str(e))
        record.status = status
        record.error = error
        record.pending = []
        record.release_due = True
        record.finished_at = record.updated_at = time.time()
        record.note("finished", by=self.runner_id, detail=status.value +
                    (f" ({error.code}: {error.message})" if error else ""))
        if not await self._save():
            return Outcome.LEASE_LOST
        events.emit("run_finished", status=status.value,
                    error=None if error is None else error.to_doc())
        try:
            # A run this turn drove from its start and that succeeded left nothing open,
            # and every id it submitted is in tasks.held; any other end lists the rest.
            await release_ended(self.client, record, self.lease,
                                tasks.held | set(log.references),
                                complete=self._fresh and status is RunStatus.SUCCEEDED)
        except (BrokerUnavailable, StateUnavailable):
            raise  # the runner drives the ended run again: that redoes the release
        except StateError as e:
            logger.warning("run %s: release left to the next lease holder (%s)",
                           self.run_id, e)
        except OrchestratorError:
            logger.exception("run %s: releasing its held results failed; the next runner "
                             "to start tries again", self.run_id)
        return Outcome.FINISHED

    async def _flush_quietly(self, log: CheckpointLog) -> None:
        """Write the last checkpoints of a run that ends otherwise (they show in its
        status); a failure to is logged, since the run's end does not depend on them."""
        try:
            await log.flush()
        except StaleFencingToken:
            raise
        except StateError as e:
            logger.warning("run %s: last checkpoints not written: %s", self.run_id, e)

    async def _end_early(self, error: RunError) -> Outcome:
        """End a run that cannot start (its definition is bad)."""
        record = self.record
        record.status = RunStatus.FAILED
        record.error = error
        record.finished_at = time.time()
        record.note("finished", by=self.runner_id, detail=f"failed ({error.code})")
        return Outcome.FINISHED if await self._save() else Outcome.LEASE_LOST

    # ------------------------------------------------------------------ the record

    async def _mark_running(self) -> bool:
        record = self.record
        previous = record.runner
        if record.status is RunStatus.SUBMITTED or not previous:
            record.note("started", by=self.runner_id)
        elif previous != self.runner_id:
            record.takeovers += 1
            record.note("takeover", by=self.runner_id, detail=f"from {previous}")
        if record.status is RunStatus.SUBMITTED:
            record.status = RunStatus.RUNNING
        record.runner = self.runner_id
        record.started_at = record.started_at or time.time()
        return await self._save()

    async def _save(self) -> bool:
        """Write the record (fenced); False when the lease is gone (this turn stops)."""
        async with self._saving:
            try:
                await retry_unavailable(lambda: self.store.save(self.record, self.lease),
                                        f"the record of run {self.run_id}")
            except StateError as e:
                logger.warning("run %s: record not written (%s); another runner has it",
                               self.run_id, e)
                self._interrupt(Stop.LEASE_LOST)
                return False
        return True

    async def _approval_waiting(self, pending: PendingApproval) -> None:
        record = self.record
        record.pending = [p for p in record.pending if p.path != pending.path] + [pending]
        record.status = RunStatus.WAITING_APPROVAL
        await self._save()

    async def _approval_answered(self, path: str, answer: Answer) -> None:
        record = self.record
        changed = False
        if any(p.path == path for p in record.pending):
            record.pending = [p for p in record.pending if p.path != path]
            changed = True
        if not any(h.event == "approval" and h.path == path for h in record.history):
            record.note("approval", by=answer.by, path=path, approved=answer.approved,
                        comment=answer.comment)
            changed = True
        if not record.pending and record.status is RunStatus.WAITING_APPROVAL:
            record.status = RunStatus.RUNNING
            changed = True
        if changed:
            await self._save()

    # ------------------------------------------------------------------ from outside

    def _on_control(self, change: Change) -> None:
        """A control key changed (or was there when the turn began)."""
        if change.deleted:
            return
        name = change.key[len(ids.control_prefix(self.run_id)):]
        if name == "cancel":
            value = change.value if isinstance(change.value, dict) else {}
            by = value.get("by") or "someone"
            reason = value.get("reason") or ""
            self._stop_detail = f"cancelled by {by}" + (f": {reason}" if reason else "")
            self.record.note("cancel", by=str(by), comment=str(reason))
            self._interrupt(Stop.CANCEL)
        elif name == "resume":
            value = change.value if isinstance(change.value, dict) else {}
            count = int(value.get("n", 0))
            if self._resumes_seen < 0:
                self._resumes_seen = count  # asked before this turn: this turn is it
            elif count > self._resumes_seen:
                self._resumes_seen = count
                if self._stop is None:
                    self._stop_detail = str(value.get("by") or "")
                self._interrupt(Stop.RESUME)
        elif name.startswith("answer/"):
            answer = Answer.from_doc(change.value)
            if answer is not None:
                self._desk.deliver(name[len("answer/"):], answer)

    def _interrupt(self, stop: Stop) -> None:
        """Stop the executor for ``stop`` (the first reason counts, except that a lost
        lease overrides everything: nothing may be written any more)."""
        if self._stop is not None and stop is not Stop.LEASE_LOST:
            return
        if self._stop is Stop.LEASE_LOST:
            return
        self._stop = stop
        if self._root is not None and not self._root.done():
            self._root.cancel()

    def _lease_gone(self, watcher: asyncio.Task[None]) -> None:
        if not watcher.cancelled():
            self._interrupt(Stop.LEASE_LOST)

    def _checkpoint_failed(self, error: Exception) -> None:
        if isinstance(error, StaleFencingToken):
            self._interrupt(Stop.LEASE_LOST)
            return
        self._stop_detail = f"checkpoints cannot be written: {error}"
        self._interrupt(Stop.BROKEN)


__all__ = ["Outcome", "RunDriver", "Stop", "internal_error", "release_ended"]
