"""The task runner of an agent: runs what the broker dispatches, and keeps the results.

:class:`TaskRunner` calls the agent's ``execute`` eagerly, up to its first suspension,
and the rest in an asyncio Task; it turns each outcome into a result item, sends the
items in batches on the agent's connection, and keeps them until the broker
acknowledges them, sending them again after a reconnect or when an acknowledgement is
overdue. :class:`~agent_sdk.agent.BaseAgent` owns one and feeds it the broker's
DISPATCH, ACK and CANCEL messages.

Large results (:data:`LARGE_RESULT_BYTES` and more) go out through a window: while
those sent and not yet acknowledged add up to :data:`LARGE_WINDOW_BYTES`, the next ones
wait in line, and each acknowledgement lets the next go. Small results never wait for
them.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine, Generator
from typing import Any, Final

from wire.codec import chunks
from wire.limits import MAX_FRAME_BYTES
from wire.tasks import (
    ASSIGNMENT_FIELDS, Assignment, ErrorCode, Message, Progress, ResultItem, Results, TaskStatus,
    trace_of,
)
from agent_sdk.connection import Transport
from agent_sdk.errors import PermanentFailure, RetryableError
from agent_sdk.task import Result, Task
from wire.tracing import (
    GEN_AI_AGENT_ID, GEN_AI_AGENT_NAME, GEN_AI_OPERATION_NAME, OP_INVOKE_AGENT, ORCH_ATTEMPT,
    ORCH_CAPABILITIES, ORCH_TASK_ID, ORCH_TASK_STATUS, child_span,
)

logger = logging.getLogger(__name__)
_DEBUG: Final = logging.DEBUG

_new_tuple = tuple.__new__
_SUCCEEDED: Final = TaskStatus.SUCCEEDED.value

#: A result whose payload has at least this many bytes is large: it goes out only within
#: the window below. The broker's default ``result_store_threshold``: it holds a payload
#: this big in memory until its result store has written it, and acknowledges it only then.
LARGE_RESULT_BYTES: Final = 1024 * 1024
#: Most bytes of large results sent and not yet acknowledged (one result always goes,
#: however big). Without a window an agent with many finished large results pushes them
#: all into the broker at once, which holds each until written: 12 results of 64 MB took
#: the broker to 3 GB. 64 MiB keeps a few results of some MB in flight, enough to keep
#: the broker's store writing, and it is the largest result there can be
#: (``MAX_FRAME_BYTES``): a result never waits for more room than the window has.
LARGE_WINDOW_BYTES: Final = 64 * 1024 * 1024

#: The id of the task whose ``execute`` is running: subtasks submitted from it name it as
#: their parent. Set around the eager first step in :meth:`TaskRunner.start`; the asyncio
#: Task that runs the rest copies the context at creation, so it stays set there too.
_ASSIGNMENT_FIELDS: Final = ASSIGNMENT_FIELDS

current_task: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "orchestrator_current_task", default=None)

Execute = Callable[[Task], Coroutine[Any, Any, Any]]


def retryable(error: Exception, retry_on: tuple[type[BaseException], ...]) -> bool | None:
    """What a failed result says about ``error`` (the RESULT item's ``retryable``):
    False for :class:`PermanentFailure` (no retry can help), True for a transient fault
    (:class:`RetryableError`, or a class of ``retry_on``), None for the broker to judge
    (the task's own failure, most often: retried only if the task asked for retries)."""
    if isinstance(error, PermanentFailure):
        return False
    if isinstance(error, RetryableError) or isinstance(error, retry_on):
        return True
    return None


def _new_result(fields: tuple[Any, ...]) -> ResultItem:
    # tuple.__new__ skips the NamedTuple's Python-level __new__: this is per task.
    return _new_tuple(ResultItem, fields)


class _Resume:
    """Hands a coroutine that already ran up to its first suspension to an asyncio Task.

    Agents run ``execute`` eagerly: most calls of a fast agent finish without ever
    suspending, and then no Task is created at all. When one does suspend, this awaitable
    re-yields the future it is waiting on, so the Task takes over exactly where it was.
    """

    __slots__ = ("_coro", "_first")

    def __init__(self, coro: Coroutine[Any, Any, Any], first: Any) -> None:
        self._coro = coro
        self._first = first

    def __await__(self) -> Generator[Any, Any, Any]:
        coro = self._coro
        to_yield = self._first
        while True:
            try:
                sent = yield to_yield
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as e:  # cancellation and friends go into the coroutine
                try:
                    to_yield = coro.throw(e)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    to_yield = coro.send(sent)
                except StopIteration as stop:
                    return stop.value


class TaskRunner:
    """Runs one agent's tasks and keeps their results until acknowledged.

    Args:
        execute: the agent's ``execute``.
        retry_on: exception classes of ``execute`` to report as transient failures
            (besides :class:`RetryableError`): the broker retries them.

    Attributes:
        channel: the agent's broker connection while it runs (results wait until then).
        running: the tasks running as asyncio Tasks, by task id.
        unacked: results sent (or about to be) that the broker has not acknowledged.
        idle: set while no task runs as an asyncio Task (a graceful stop waits for it).
        subtask_counts: subtasks submitted so far by each running task (their ids
            derive from it).
        tasks_done: tasks that ended succeeded here.
        tasks_failed: tasks that ended otherwise here.
        large_in_flight_bytes: payload bytes of large results sent and not yet
            acknowledged (at most ``window_bytes``, or one result's).
        window_bytes: the window of large results (:data:`LARGE_WINDOW_BYTES`).
    """

    def __init__(self, execute: Execute,
                 retry_on: tuple[type[BaseException], ...] = ()) -> None:
        self.execute = execute
        self.retry_on = retry_on
        #: the agent's name and id, for the spans of traced tasks
        self.identity = ("", "")
        self.channel: Transport[Message] | None = None
        #: the largest result payload the broker takes (its announced frame limit)
        self.max_frame_bytes = MAX_FRAME_BYTES
        self.running: dict[str, asyncio.Task[Any] | None] = {}
        #: when each running task started (``time.perf_counter``) and the time its
        #: attempt was given: health checks report tasks that overstay
        self.clock: dict[str, tuple[float, float]] = {}
        self.unacked: dict[str, ResultItem] = {}
        self.idle = asyncio.Event()
        self.idle.set()
        self.subtask_counts: dict[str, int] = {}
        self.tasks_done = 0
        self.tasks_failed = 0
        self._outgoing: list[ResultItem] = []
        #: tasks given back to the broker unfinished (:meth:`hand_back`): no result
        self._handed_back: set[str] = set()
        #: large results not sent yet, in the order they finished, waiting for the window
        self._large_waiting: deque[ResultItem] = deque()
        #: large results sent and not acknowledged: payload bytes by task id (a result
        #: sent again stays one entry: it does not count twice)
        self._large_in_flight: dict[str, int] = {}
        self.large_in_flight_bytes = 0
        self.window_bytes = LARGE_WINDOW_BYTES
        #: (when, task ids) of result batches sent, oldest first, to resend unacked ones
        self._sent_log: deque[tuple[float, list[str]]] = deque()
        #: tasks that started running as asyncio tasks since the last flush
        self._started: list[str] = []
        #: loop time after which running tasks' leases are renewed again
        self._next_lease = 0.0

    # ------------------------------------------------------------ the broker's word

    def start(self, assignment: Assignment) -> None:
        """Run ``execute`` up to its first suspension, and the rest in an asyncio Task
        (created here, with the current task set, so that its context keeps it)."""
        task_id = assignment[0]
        if task_id in self.running:
            return  # a duplicate dispatch of a task already running here
        if self.unacked:
            done = self.unacked.get(task_id)
            if done is not None and done[1] == _SUCCEEDED:
                # Done here already and the broker did not hear it: the answer, not a rerun.
                self.send_again([done])
                return
        if logger.isEnabledFor(_DEBUG):
            logger.debug("task %s started (attempt %s)", task_id, assignment[2],
                         extra={"task_id": task_id, "event": "task_started"})
        if len(assignment) != _ASSIGNMENT_FIELDS:
            self._start_traced(assignment)
            return
        token = current_task.set(task_id)
        started = time.perf_counter()
        try:
            try:
                coro = self.execute(Task.from_wire(*assignment))
                first = coro.send(None)
            except StopIteration as done_now:
                self._complete(task_id, done_now.value, started)
                return
            except BaseException as e:  # noqa: BLE001 - execute's errors belong to the task
                # (a payload that cannot be decoded fails its task the same way)
                self._complete(task_id, e, started)
                return
            runner = asyncio.get_running_loop().create_task(
                self._finish_later(task_id, coro, first, started))
        finally:
            current_task.reset(token)
        self.running[task_id] = runner
        self.clock[task_id] = (started, assignment[3])
        self._started.append(task_id)
        self.idle.clear()

    def _start_traced(self, assignment: Assignment) -> None:
        """Start a task that carries a traceparent: ``execute`` runs inside an
        ``invoke_agent`` span, in an asyncio Task from its first step (not eagerly), so
        that the span's context is the Task's own and never leaks into the caller's."""
        task_id = assignment[0]
        started = time.perf_counter()
        try:
            task = Task.from_wire(*assignment[:_ASSIGNMENT_FIELDS])
        except BaseException as e:  # noqa: BLE001 - an undecodable payload fails its task
            self._complete(task_id, e, started)
            return
        coro = self._traced(task, trace_of(assignment))
        # None as the first "yield": the Task starts the coroutine on its first step.
        self.running[task_id] = asyncio.get_running_loop().create_task(
            self._finish_later(task_id, coro, None, started))
        self.clock[task_id] = (started, assignment[3])
        self._started.append(task_id)
        self.idle.clear()

    async def _traced(self, task: Task, traceparent: str | None) -> Any:
        current_task.set(task.id)  # in the Task's own context
        name, agent_id = self.identity
        attributes = {GEN_AI_OPERATION_NAME: OP_INVOKE_AGENT, GEN_AI_AGENT_NAME: name,
                      GEN_AI_AGENT_ID: agent_id, ORCH_TASK_ID: task.id,
                      ORCH_ATTEMPT: task.attempt,
                      ORCH_CAPABILITIES: list(task.capabilities)}
        with child_span(f"{OP_INVOKE_AGENT} {name}", traceparent, attributes,
                        kind="server") as span:
            outcome = await self.execute(task)
            if isinstance(outcome, Result):
                span.set_attribute(ORCH_TASK_STATUS, outcome.status)
            return outcome

    def subtask_ids(self, parent_id: str | None,
                    task_id: str | None) -> tuple[str | None, str | None]:
        """The parent and the id of a subtask submitted with these (None: not given).

        The parent is by default the task whose ``execute`` submits; a subtask of it with
        no id of its own is then ``<parent id>/<n>``, n counting this execution's
        submits, so a parent that runs again gets the same subtasks back.
        """
        current = current_task.get()
        parent = parent_id if parent_id is not None else current
        if task_id is None and parent is not None and parent == current:
            count = self.subtask_counts[parent] = self.subtask_counts.get(parent, 0) + 1
            task_id = f"{parent}/{count}"
        return parent, task_id

    def ack(self, ids: list[str]) -> None:
        """The broker holds these results: forget them (and let large ones waiting for
        the window go)."""
        unacked = self.unacked
        for task_id in ids:
            unacked.pop(task_id, None)
        in_flight = self._large_in_flight
        if in_flight:
            for task_id in ids:
                size = in_flight.pop(task_id, None)
                if size is not None:
                    self.large_in_flight_bytes -= size
            if self._large_waiting and self.channel is not None:
                self.channel.request_flush()

    def cancel(self, ids: list[str]) -> None:
        """The broker cancels these tasks: stop them, or answer for them."""
        for task_id in ids:
            runner = self.running.get(task_id)
            if runner is not None:
                runner.cancel()
            elif task_id in self.unacked:
                # Finished here, and the broker asks again: the result was lost on the way
                # (or, a large one, it still waits for the window).
                self.send_again([self.unacked[task_id]])
            else:
                # Never reached us (or long gone): answer so the broker frees the slot.
                self._outgoing.append(ResultItem(task_id, TaskStatus.CANCELLED.value, b"",
                                                 ErrorCode.CANCELLED.value,
                                                 "not running on the agent"))
        if self.channel is not None:
            self.channel.request_flush()

    def cancel_all(self) -> None:
        """Cancel every task still running (the agent stops)."""
        for pending in [t for t in self.running.values() if t is not None]:
            pending.cancel()

    def hand_back(self) -> list[str]:
        """Stop every running task without answering for it (a drain ran out of time):
        the broker runs them elsewhere, and the attempt does not count against their
        retries. Returns their ids, for the goodbye (DISCONNECT ``back``)."""
        ids = list(self.running)
        self._handed_back.update(ids)
        self.cancel_all()
        return ids

    # ------------------------------------------------------------ outcomes

    async def _finish_later(self, task_id: str, coro: Coroutine[Any, Any, Any], first: Any,
                            started: float) -> None:
        try:
            outcome = await _Resume(coro, first)
        except BaseException as e:  # noqa: BLE001 - including cancellation by the broker
            outcome = e
        self.running.pop(task_id, None)
        self.clock.pop(task_id, None)
        self.subtask_counts.pop(task_id, None)
        self._complete(task_id, outcome, started)
        if not self.running:
            self.idle.set()
        if self.channel is not None:
            self.channel.request_flush()

    def _complete(self, task_id: str, outcome: Any, started: float) -> None:
        if self._handed_back and task_id in self._handed_back:
            self._handed_back.discard(task_id)
            return
        run_ms = (time.perf_counter() - started) * 1000.0
        if logger.isEnabledFor(_DEBUG):
            _log_outcome(task_id, outcome, run_ms)
        if type(outcome) is Result and not outcome.extras and outcome.status == _SUCCEEDED:
            # The common case, kept short: a plain successful result.
            item = _new_result((task_id, outcome.status, outcome.to_payload(), None, None, None,
                                0, None, run_ms, None))
            size = len(item[2])
            if size <= self.max_frame_bytes:
                self.tasks_done += 1
                self.unacked[task_id] = item
                if size < LARGE_RESULT_BYTES:
                    self._outgoing.append(item)
                else:
                    self._large_waiting.append(item)
                return
        if isinstance(outcome, BaseException):
            item = self._failed(task_id, outcome, run_ms)
            self.tasks_failed += 1
        else:
            result = outcome if isinstance(outcome, Result) else Result(outcome)
            item = self._returned(task_id, result, run_ms, self.max_frame_bytes)
            if item[1] == _SUCCEEDED:
                self.tasks_done += 1
            else:
                self.tasks_failed += 1
        self.unacked[task_id] = item
        if len(item[2]) < LARGE_RESULT_BYTES:
            self._outgoing.append(item)
        else:
            self._large_waiting.append(item)

    def _failed(self, task_id: str, error: BaseException, run_ms: float) -> ResultItem:
        """The item of a task whose ``execute`` raised (or was cancelled)."""
        if isinstance(error, asyncio.CancelledError):
            return ResultItem(task_id, TaskStatus.CANCELLED.value, b"",
                              ErrorCode.CANCELLED.value, "cancelled on the agent", run_ms=run_ms)
        if not isinstance(error, Exception):
            raise error  # KeyboardInterrupt, SystemExit: not the task's business
        kind = type(error).__name__
        # A PermanentFailure or RetryableError may carry a stable code of its own
        # (``budget_exceeded``, ``llm_unavailable``): the client sees it as the task's.
        code = getattr(error, "code", None) if isinstance(
            error, (PermanentFailure, RetryableError)) else None
        return ResultItem(task_id, TaskStatus.FAILED.value,
                          Result(None, 0.0, error_type=kind).to_payload(),
                          code if isinstance(code, str) and code else ErrorCode.AGENT_ERROR.value,
                          f"{kind}: {error}", run_ms=run_ms,
                          retryable=retryable(error, self.retry_on))

    @staticmethod
    def _returned(task_id: str, result: Result, run_ms: float,
                  max_frame_bytes: int = MAX_FRAME_BYTES) -> ResultItem:
        """The item of a task whose ``execute`` returned ``result``: a failure
        ``too_large`` when its payload is over the broker's frame limit."""
        try:
            payload = result.to_payload()
        except Exception as e:  # noqa: BLE001 - an unencodable result fails its task
            result = Result.failure(ErrorCode.AGENT_ERROR.value,
                                    f"result is not msgpack-encodable: {e}")
            payload = result.to_payload()
        if len(payload) > max_frame_bytes:
            result = Result.failure(ErrorCode.TOO_LARGE.value,
                                    f"result of {len(payload)} bytes exceeds the broker's "
                                    f"limit of {max_frame_bytes} bytes (max_message_bytes)")
            payload = result.to_payload()
        error = result.error
        return ResultItem(task_id, result.status, payload,
                          None if error is None else error.code,
                          None if error is None else error.message, run_ms=run_ms,
                          retryable=result.retryable)

    # ------------------------------------------------------------ sending

    def flush(self) -> None:
        """Send what started and what finished since the last flush, in batches."""
        channel = self.channel
        if channel is None:
            return
        if self._started:
            started, self._started = self._started, []
            channel.send(Progress(started=started))
        if self._large_waiting:
            self._admit_large()
        if self._outgoing:
            batch, self._outgoing = self._outgoing, []
            now = asyncio.get_running_loop().time()
            for part in chunks(batch):
                channel.send(Results(part))
            self._sent_log.append((now, [item[0] for item in batch]))

    def _admit_large(self) -> None:
        """Move large results from their line into the next batch while the window has
        room for them, oldest first; one goes whenever none is in flight."""
        waiting = self._large_waiting
        in_flight = self._large_in_flight
        unacked = self.unacked
        while waiting:
            item = waiting[0]
            task_id = item[0]
            if unacked.get(task_id) is not item:
                waiting.popleft()  # acknowledged meanwhile, or a rerun replaced it
                continue
            size = len(item[2])
            counted = in_flight.get(task_id, 0)  # a rerun of a task whose result is out
            if in_flight and self.large_in_flight_bytes - counted + size > self.window_bytes:
                return
            waiting.popleft()
            in_flight[task_id] = size
            self.large_in_flight_bytes += size - counted
            self._outgoing.append(item)

    def send_again(self, kept: list[ResultItem]) -> None:
        """Queue kept (unacknowledged) results for the next flush, unless already queued.

        A large result in flight goes again (it counts in the window once, however often
        it is sent); one not sent yet keeps its place in the window's line.
        """
        outgoing = self._outgoing
        queued = {item[0] for item in outgoing}
        in_flight = self._large_in_flight
        for item in kept:
            task_id = item[0]
            if task_id not in queued and (len(item[2]) < LARGE_RESULT_BYTES
                                          or task_id in in_flight):
                outgoing.append(item)
                queued.add(task_id)

    def running_ages(self) -> tuple[tuple[str, float, float], ...]:
        """``(task id, seconds it has run, seconds its attempt was given)`` of each
        running task, for the health check's answer."""
        now = time.perf_counter()
        return tuple((task_id, round(now - started, 3), limit_s)
                     for task_id, (started, limit_s) in self.clock.items())

    def renew_leases(self, now: float, interval_s: float) -> None:
        """Renew the leases of running tasks, at most once per ``interval_s`` (a dispatch
        the broker hears nothing about is presumed lost and runs elsewhere)."""
        if now >= self._next_lease and self.running and self.channel is not None:
            self.channel.send(Progress(running=list(self.running)))
            self._next_lease = now + interval_s

    def resend_unacked(self) -> None:
        """Send every unacknowledged result again now (after registering again: results
        sent before a reconnect may have been lost; the broker drops the ones it has)."""
        if self.unacked:
            self.send_again(list(self.unacked.values()))
            self.flush()

    def resend_overdue(self, now: float, after_s: float) -> int:
        """Send again results the broker has not acknowledged for ``after_s`` seconds: a
        message sent just before a partition is lost without an error (the broker drops
        the duplicates).

        Args:
            now: the loop's time.
            after_s: how long an acknowledgement may take.

        Returns:
            How many results are sent again.
        """
        log = self._sent_log
        unacked = self.unacked
        again: list[ResultItem] = []
        while log and now - log[0][0] > after_s:
            _, ids = log.popleft()
            again.extend(unacked[task_id] for task_id in ids if task_id in unacked)
        if again:
            self.send_again(again)
            self.flush()
        return len(again)


__all__ = [
    "LARGE_RESULT_BYTES", "LARGE_WINDOW_BYTES", "TaskRunner", "current_task", "retryable",
]


def _log_outcome(task_id: str, outcome: Any, run_ms: float) -> None:
    """One DEBUG line for a task that ended here (per task, so DEBUG only: at INFO it
    would cost every task a formatted record)."""
    if isinstance(outcome, BaseException):
        logger.debug("task %s failed after %.1f ms: %s: %s", task_id, run_ms,
                     type(outcome).__name__, outcome,
                     extra={"task_id": task_id, "event": "task_failed"})
        return
    status = outcome.status if isinstance(outcome, Result) else _SUCCEEDED
    event = "task_finished" if status == _SUCCEEDED else "task_failed"
    logger.debug("task %s %s after %.1f ms", task_id, status, run_ms,
                 extra={"task_id": task_id, "event": event})
