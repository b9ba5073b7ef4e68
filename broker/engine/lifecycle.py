"""The only place a task's state changes.

Every change goes through :func:`transition`, which looks the (state, event) pair up in
:data:`broker.engine.model.TRANSITIONS` and raises
:class:`~broker.errors.IllegalTransition` for a pair the table does not list.
:class:`Lifecycle` wraps each transition with the bookkeeping that belongs to it (the
queue, deadlines, the journal, the result sent to the client, the task event).
"""

from __future__ import annotations

import logging
from collections import deque

from broker.engine.holders import HolderKeys
from broker.engine.ledger import Ledger
from broker.engine.model import (
    ENDING_OF_STATUS, TRANSITIONS, AgentRecord, TaskEvent, TaskRecord, TaskState,
)
from broker.engine.queues import StoredPayload
from broker.engine.status import TaskMetrics
from broker.errors import IllegalTransition
from wire.tasks import (
    SPEC_FIELDS, Ack, Assignment, ErrorCode, ResultItem, TaskStatus, encode, trace_of,
)

logger = logging.getLogger(__name__)

#: Error codes a retry cannot help with.
NOT_RETRYABLE = frozenset({ErrorCode.CANCELLED.value, ErrorCode.TOO_LARGE.value,
                           ErrorCode.NO_AGENT.value, ErrorCode.SHUTTING_DOWN.value,
                           ErrorCode.BAD_FRAME.value})

# Hot paths compare against module globals: attribute access on enum classes goes
# through Python-level descriptors, several times slower.
_PENDING = TaskState.PENDING
_DISPATCH_NEXT = TRANSITIONS[TaskEvent.DISPATCH]
_new_tuple = tuple.__new__
_SUCCEEDED_VALUE = TaskStatus.SUCCEEDED.value
_SPEC_FIELDS = SPEC_FIELDS


def transition(task: TaskRecord, event: TaskEvent) -> TaskState:
    """Move ``task`` along ``event``; returns the new state.

    Raises:
        IllegalTransition: the table has no such move from the task's state.
    """
    target = TRANSITIONS[event].get(task.state)
    if target is None:
        raise IllegalTransition(task.spec.id, task.state, event)
    task.state = target
    return target


def new_result(fields: tuple[object, ...]) -> ResultItem:
    """A :class:`ResultItem` from all its fields, without NamedTuple's Python ``__new__``."""
    return _new_tuple(ResultItem, fields)


class Lifecycle:
    """The bookkeeping around each transition of a task.

    Args:
        ledger: the engine's books.
    """

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        #: the per-client in-flight limit's counter, None without the limit (then
        #: dispatch tests one attribute and counts nothing)
        self.in_flight_quota = ledger.quotas if ledger.quotas.max_in_flight else None
        #: plain task counters by agent name and capabilities (the metrics endpoint's)
        self.metrics = TaskMetrics()
        #: journals each attempt's holder by key (:meth:`bind_holders_to_keys`); None on
        #: a plaintext broker, where dispatch tests one attribute and records nothing
        self.holder_keys: HolderKeys | None = None

    def bind_holders_to_keys(self) -> None:
        """A ``--secure`` broker: journal the key of each attempt's agent, so that after
        a restart only that key may answer for the attempt or claim it."""
        self.holder_keys = HolderKeys(self.ledger.journal)

    def publish(self, task: TaskRecord, now: float) -> None:
        """Publish the task's new state on ``tasks.<id>``. Callers test
        ``ledger.watch_tasks`` first; ``agent`` is the agent's id while the task is
        dispatched or running, and the agent name (as in its result) once it ended."""
        state = task.state
        final = state.finished
        if final:
            agent = task.result.agent if task.result is not None else None
        else:
            agent = task.agent.agent_id if task.agent is not None else None
        self.ledger.events.task_changed(task.spec.id, state.value, task.attempts, agent,
                                        now + self.ledger.wall_offset, final)

    # ------------------------------------------------------------ on an agent

    def dispatch(self, task: TaskRecord, agent: AgentRecord, now: float) -> Assignment:
        """A new attempt of a PENDING task goes to ``agent``; returns what to send it."""
        target = _DISPATCH_NEXT.get(task.state)
        if target is None:
            raise IllegalTransition(task.spec.id, task.state, TaskEvent.DISPATCH)
        task.state = target
        task.agent = agent
        attempts = task.attempts = task.attempts + 1
        task.dispatched_at = task.last_sign = now
        if task.attempt_timeout_s is not None:
            self.arm(task, now, True)
        spec = task.spec
        agent.in_flight[spec.id] = task
        if self.in_flight_quota is not None:
            self.in_flight_quota.on_agent(task)
        if self.holder_keys is not None:
            self.holder_keys.held(task, agent)
        self.metrics.stats(agent.name, spec.capabilities).started += 1
        if self.ledger.watch_tasks:
            self.publish(task, now)
        # The attempt's time left: the agent's own deadline for it.
        if len(spec) == _SPEC_FIELDS:
            return _new_tuple(Assignment, (spec.id, spec.payload, attempts,
                                           task.deadline - now, spec.capabilities,
                                           spec.parent_id))
        # A traced task: its traceparent goes on to the agent.
        return _new_tuple(Assignment, (spec.id, spec.payload, attempts, task.deadline - now,
                                       spec.capabilities, spec.parent_id, trace_of(spec)))

    def arm(self, task: TaskRecord, now: float, attempt: bool) -> None:
        """Set the deadline of what the task does from ``now``: an attempt (``attempt``)
        ends at the earlier of its limit and the task's deadline; a wait for an agent at
        the task's deadline. A task with no per-attempt limit keeps the deadline it was
        accepted with (tracked since): nothing to do."""
        attempt_s = task.attempt_timeout_s
        if attempt_s is None:
            return
        deadline = task.expires_at
        if attempt and now + attempt_s < deadline:
            deadline = now + attempt_s
        if deadline != task.deadline:
            task.deadline = deadline
            self.ledger.deadlines.add_unordered(task)

    def start(self, task: TaskRecord, now: float) -> None:
        """The agent said it started the task."""
        transition(task, TaskEvent.START)
        task.started_at = now
        if self.ledger.watch_tasks:
            self.publish(task, now)

    def reclaim(self, task: TaskRecord, agent: AgentRecord, now: float) -> None:
        """We had requeued the task (its agent looked dead), or held it back after a
        restart (:meth:`hold_back`), but the agent still runs it: it keeps it, rather
        than the task running twice."""
        transition(task, TaskEvent.RECLAIM)
        self.ledger.pending.discard(task)
        task.retry_at = 0.0  # not held back any more (release_retries skips it)
        task.agent = agent
        task.dispatched_at = task.last_sign = now
        self.arm(task, now, True)
        agent.in_flight[task.spec.id] = task
        if self.in_flight_quota is not None:
            self.in_flight_quota.on_agent(task)
        if self.holder_keys is not None:
            self.holder_keys.held(task, agent)
        task.note(now, "reclaimed", agent.agent_id)
        if self.ledger.watch_tasks:
            self.publish(task, now)

    def detach(self, task: TaskRecord, now: float) -> None:
        """Take a task off its agent (which may still run it: its slot stays taken until
        it answers the CANCEL) or out of the queue."""
        if task.state is _PENDING:
            self.ledger.pending.discard(task)
        agent = task.agent
        if agent is not None:
            task_id = task.spec.id
            agent.in_flight.pop(task_id, None)
            agent.foreign_running[task_id] = now
            self.ledger.outbox(agent.identity).cancels.append(task_id)
            task.release_agent()

    # ------------------------------------------------------------ back to the queue

    def retry(self, task: TaskRecord, code: str | None, message: str | None,
              retryable: bool | None, now: float) -> bool:
        """Schedule another attempt if the failure allows it; True if scheduled.

        A fault of the agent or the system (``retryable`` True: an attempt timed out, an
        error the agent marks transient) is retried while retries last. A failure the
        agent does not mark (``retryable`` None: an exception of ``execute``, most often
        the task's own input) is retried only when the task asked for retries itself;
        ``retryable`` False, or a code no retry can help, never. Nor a retry whose
        back-off would reach the task's deadline."""
        ledger = self.ledger
        if retryable is None:
            retryable = task.spec.max_retries is not None
        if not retryable or code in NOT_RETRYABLE or \
                task.attempts > ledger.max_retries(task) or ledger.stopping_since is not None:
            return False
        delay = ledger.backoff.delay(task.attempts)
        if now + delay >= task.expires_at:
            return False
        transition(task, TaskEvent.RETRY)
        if task.dispatched_at:
            # The next dispatch overwrites dispatched_at: keep this attempt's in history.
            task.note(task.dispatched_at, "dispatched", self._attempt_detail(task))
        task.retry_at = now + delay
        task.note(now, "retrying", f"attempt {task.attempts} failed ({code}: {message}); "
                                   f"retry in {delay:.2f} s")
        ledger.retrying.append(task)
        ledger.counters["retried"] += 1
        self.metrics.stats(self._last_agent_name(task), task.spec.capabilities).retried += 1
        if ledger.watch_tasks:
            self.publish(task, now)
        return True

    def _attempt_detail(self, task: TaskRecord) -> str:
        """``attempt N on AGENT_ID`` of the attempt that just ended, for the timeline.
        Callers release the agent first; one removed (dead) is no longer in the table,
        and then its routing id names it (the SDK's routing id is the agent id)."""
        holders = task.holders
        if not holders:
            return f"attempt {task.attempts}"
        agent = self.ledger.agents.get(holders[-1])
        agent_id = agent.agent_id if agent is not None else \
            holders[-1].decode("utf-8", "backslashreplace")
        return f"attempt {task.attempts} on {agent_id}"

    def _last_agent_name(self, task: TaskRecord) -> str:
        """The name of the agent that ran the task's last attempt ("" if unknown or
        gone): callers release the agent before a retry, so it is looked up."""
        if task.agent is not None:
            return task.agent.name
        holders = task.holders
        if holders:
            agent = self.ledger.agents.get(holders[-1])
            if agent is not None:
                return agent.name
        return ""

    def second_opinion(self, task: TaskRecord, failed_on: AgentRecord, code: str | None,
                       message: str | None, now: float) -> None:
        """Run a task that failed on ``failed_on`` once more, at once, on another agent:
        its failure was the task's own (it fails again) or that agent's (it succeeds, and
        the agent's circuit counts a fault). Call after ``task.release_agent()``."""
        ledger = self.ledger
        transition(task, TaskEvent.REQUEUE)
        task.second_opinion_of = failed_on.identity
        self.arm(task, now, False)
        ledger.pending.push_front(task)
        if task.dispatched_at:
            task.note(task.dispatched_at, "dispatched",
                      f"attempt {task.attempts} on {failed_on.agent_id}")
        task.note(now, "second_opinion", f"failed on {failed_on.agent_id} ({code}: {message}); "
                                         "trying another agent once")
        ledger.counters["second_opinions"] += 1
        if ledger.watch_tasks:
            self.publish(task, now)

    def hold_back(self, task: TaskRecord, now: float) -> None:
        """A task restored from the journal after a restart, which a crash may have left
        running on an agent: it stays PENDING (counted as waiting) but out of the queue
        for one heartbeat expiry, the time that agent takes to register again and claim
        it (READY lists what it runs: :meth:`reclaim`); :meth:`release_retries` queues
        it then. Without this, the first agent to register could run it a second time."""
        ledger = self.ledger
        task.retry_at = now + ledger.config.heartbeat_expiry_s
        # Counted as pending from now on, as a queued task is: a reclaim or a cancel
        # meanwhile discards it as it would a queued one.
        ledger.pending.count += 1
        ledger.retrying.append(task)

    def release_retries(self, now: float) -> None:
        """Tasks whose back-off is over wait for an agent again."""
        ledger = self.ledger
        still: deque[TaskRecord] = deque()
        for task in ledger.retrying:
            if task.state is _PENDING:
                # Held back after a restart (hold_back); retry_at 0: claimed or queued.
                if not task.retry_at:
                    continue
                if task.retry_at > now:
                    still.append(task)
                    continue
                task.retry_at = 0.0
                ledger.pending.count -= 1  # push counts it again
                ledger.pending.push(task)
                continue
            if task.state is not TaskState.RETRYING:
                continue
            if task.retry_at > now:
                still.append(task)
                continue
            transition(task, TaskEvent.RELEASE)
            task.retry_at = 0.0  # a stale entry of it in the list is skipped
            self.arm(task, now, False)
            ledger.pending.push(task)
            if ledger.watch_tasks:
                self.publish(task, now)
        ledger.retrying = still

    def requeue(self, task: TaskRecord, why: str, now: float) -> None:
        """A task lost its agent (or its dispatch was lost): run it elsewhere, at once, or
        fail it when its retries are used up. Call after ``task.release_agent()``."""
        ledger = self.ledger
        if task.attempts > ledger.max_retries(task):
            self.end_by_broker(task, TaskStatus.FAILED, ErrorCode.AGENT_LOST,
                               f"{why}; no retries left after {task.attempts} attempt(s)", now)
            return
        transition(task, TaskEvent.REQUEUE)
        self.arm(task, now, False)
        ledger.pending.push_front(task)
        if task.dispatched_at:
            task.note(task.dispatched_at, "dispatched", self._attempt_detail(task))
        task.note(now, "requeued", why)
        ledger.counters["redispatched"] += 1
        if ledger.watch_tasks:
            self.publish(task, now)

    # ------------------------------------------------------------ endings

    def finish(self, task: TaskRecord, result: ResultItem, now: float) -> None:
        """The one way a task ends: record, journal, tell its client and watchers, retain.
        The result's status names the ending."""
        ledger = self.ledger
        state = transition(task, ENDING_OF_STATUS.get(result.status, TaskEvent.FAIL))
        task.result = result
        task.finished_at = now
        del ledger.tasks[task.spec.id]
        # ClientQuotas.finished, inline (once per task): the client has one fewer open
        open_by_client = ledger.quotas.open
        still_open = open_by_client.get(task.client, 0) - 1
        if still_open > 0:
            open_by_client[task.client] = still_open
        else:
            open_by_client.pop(task.client, None)
        ledger.finished.add(task)
        held = ledger.journal.finished(result, now + ledger.wall_offset)
        ledger.counters[state._value_] += 1
        status = result.status
        self.metrics.ended(result.agent or "", task.spec.capabilities,
                           None if status == _SUCCEEDED_VALUE else (result.error_code or status),
                           now - task.dispatched_at if task.dispatched_at else -1.0)
        if ledger.watch_tasks:
            self.publish(task, now)
        if len(task.spec) != _SPEC_FIELDS:
            # Traced by its submitter: the broker's spans of it, from its timeline.
            ledger.spans.task_ended(
                trace_of(task.spec) or "", task.spec.id, task.spec.capabilities,
                task.timeline(ledger.wall_offset), state._value_, result.error_code,
                task.attempts)
        if held:
            # A large payload: the result store writes it, and its RESULT leaves once
            # written (broker/results.py), without holding up anything else.
            return
        client = task.client
        ledger.outbox(client).results.append(result)
        if task.watchers:
            for watcher in task.watchers:
                if watcher != client:
                    ledger.outbox(watcher).results.append(result)

    def result_written(self, result: ResultItem, wall: float,
                       ref: StoredPayload | None) -> None:
        """The result store is done with a large payload :meth:`finish` handed it: its
        ``S`` record joins this pass's commit (or, when the store could not write it, the
        whole result does), the retained copy keeps only the reference, the agent gets
        its ACK, and the RESULT (its payload withheld) is released to the client and
        watchers after the commit."""
        ledger = self.ledger
        finished = ledger.finished
        task_id = result.task_id
        task = finished.writing.pop(task_id, None)
        agent = ledger.acks_after_write.pop(task_id, None)
        if agent is not None:
            # At once (after this pass's commit), not with the next tick as other acks:
            # the agent sends its next large result only when this one is acknowledged.
            ledger.outbox(agent).control.append(encode(Ack([task_id])))
        if ref is None:
            ledger.journal.finished_inline(result, wall)
        else:
            stored = result._replace(payload=ref)
            ledger.journal.finished(stored, wall)
            if task is not None and finished.get(task_id) is task:
                finished.stored(task, stored)
            elif (task is None or finished.get(task_id) is None) and \
                    finished.delete is not None:
                finished.delete(ref)  # gone from retention meanwhile
            # The client reads the payload from the store, in ranges (READ): it never
            # waits in the broker's memory for a slow reader.
            result = finished.outgoing(stored)
        if task is None:
            return
        client = task.client
        ledger.outbox(client).results.append(result)
        for watcher in task.watchers or ():
            if watcher != client:
                ledger.outbox(watcher).results.append(result)

    def end_by_broker(self, task: TaskRecord, status: TaskStatus, code: ErrorCode,
                      message: str, now: float, retryable: bool = False) -> None:
        """End (or, if ``retryable`` and retries are left, retry) a task the broker decided
        about: timeout, no agent, lost agent, cancel, shutdown."""
        agent_name = task.agent.name if task.agent is not None else None
        was_pending = task.state is _PENDING
        self.detach(task, now)
        if retryable and self.retry(task, code.value, message, True, now):
            return
        queued_ms = round((now - task.submitted_at) * 1000.0, 3) if was_pending else None
        self.finish(task, new_result((task.spec.id, status.value, b"", code.value, message,
                                      agent_name, task.attempts, queued_ms, None, None)), now)

    def cancel(self, task_id: str, reason: str, now: float) -> None:
        """Cancel a task and, depth first, the subtasks it submitted."""
        task = self.ledger.tasks.get(task_id)
        if task is None:
            return
        children = task.children
        self.end_by_broker(task, TaskStatus.CANCELLED, ErrorCode.CANCELLED, reason, now)
        for child in children or ():
            self.cancel(child, f"parent {task_id} was cancelled", now)

    def restore_finished(self, task: TaskRecord, result: ResultItem, finished_at: float) -> None:
        """A result read back from the journal: the task is retained, already ended."""
        transition(task, ENDING_OF_STATUS.get(result.status, TaskEvent.FAIL))
        task.result = result
        task.finished_at = finished_at
        self.ledger.finished.add(task)
