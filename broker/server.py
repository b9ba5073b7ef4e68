"""The broker process: one ROUTER socket, one loop, one handler per message kind.

Each pass of the loop (:meth:`Broker.run`):

1. waits in poll(2) for input or the next timer (heartbeat tick, task deadline, retry);
2. drains a batch of messages without blocking, calling one handler each;
3. runs due timers: dead agents and expired leases, heartbeats, deadlines, retries;
4. dispatches pending tasks to agents with credit;
5. commits the journal (group commit), then flushes every peer's outbox as one batched
   message per command.

Batching in steps 2 and 5 is where the throughput comes from: a burst of 500 submits
costs one recv, one header decode and one send per agent, not 500 of each.

A task's life: PENDING (waiting for an agent) -> DISPATCHED (sent) -> RUNNING (the agent
said it started) -> SUCCEEDED | FAILED | TIMED_OUT | CANCELLED. A failure, a timeout or
the loss of its agent sends it to RETRYING (back-off) and PENDING again while its retries
last. Every path to an end goes through :meth:`Broker._finish`.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, Callable

import zmq

from broker import __version__, compiled
from broker.bus import EventPublisher
from broker.config import BrokerConfig
from broker.direct import DIRECT_BACKLOG_LIMIT, DirectRouting
from broker.errors import DecodeError
from broker.heartbeat import Liveness
from broker.journal import Replay, open_journal
from broker.protocol import (
    DIRECT_BROADCAST, DIRECT_NO_ACK, MAX_BATCH_ITEMS, PROTOCOL_VERSION, Accepted, Ack, Assignment,
    Cancel, Direct, DirectItem, Disconnect, Error, ErrorCode, Fetch, Heartbeat, Progress,
    Ready, ResultItem, Results, StatusReply, StatusRequest, Submit, TaskList, TaskQuery, TaskSpec,
    TaskStatus, Welcome, chunks, decode, encode, encode_dispatch, encode_results,
)
from broker.resilience import CircuitBreaker, CircuitState, RetryPolicy
from broker.routing import AgentRecord, AgentState, AgentTable, Requirement, make_policy
from broker.sockets import NOBLOCK, apply_common_options, has_input, recv_frames, send_frames
from broker.tasks import Deadlines, FinishedResults, PendingQueue, TaskRecord, TaskState

logger = logging.getLogger(__name__)

#: Most messages queued for one peer whose socket pipe is full, before the oldest go.
BACKLOG_LIMIT = 10_000
#: How often the loop looks for dead agents and due heartbeats, as a share of the interval.
TICKS_PER_INTERVAL = 4
#: How long ACCEPTED may wait to be batched (or made unnecessary by the result).
ACCEPT_DELAY_S = 0.002
#: Error codes a retry cannot help with.
NOT_RETRYABLE = frozenset({ErrorCode.CANCELLED.value, ErrorCode.TOO_LARGE.value,
                           ErrorCode.NO_AGENT.value, ErrorCode.SHUTTING_DOWN.value,
                           ErrorCode.BAD_FRAME.value})

# Hot paths compare against these module globals: attribute access on enum classes and
# their ``.value`` go through Python-level descriptors, several times slower.
_PENDING = TaskState.PENDING
_DISPATCHED = TaskState.DISPATCHED
_RUNNING = TaskState.RUNNING
_FAILED = TaskState.FAILED
_DRAINING = AgentState.DRAINING
_CIRCUIT_CLOSED = CircuitState.CLOSED
_SUCCEEDED = TaskStatus.SUCCEEDED.value
_FAILED_STATUS = TaskStatus.FAILED.value
_TIMED_OUT_STATUS = TaskStatus.TIMED_OUT.value
_NO_AGENT = ErrorCode.NO_AGENT.value
_MAILBOX_FULL = ErrorCode.MAILBOX_FULL.value
#: A direct message's outcome until one of its receivers took it.
_UNDELIVERED = ("", "")
_new_tuple = tuple.__new__


def _new_result(fields: tuple[Any, ...]) -> ResultItem:
    return _new_tuple(ResultItem, fields)


def _new_assignment(fields: tuple[Any, ...]) -> Assignment:
    return _new_tuple(Assignment, fields)


_STATE_OF_STATUS = {
    TaskStatus.SUCCEEDED.value: TaskState.SUCCEEDED,
    TaskStatus.FAILED.value: TaskState.FAILED,
    TaskStatus.TIMED_OUT.value: TaskState.TIMED_OUT,
    TaskStatus.CANCELLED.value: TaskState.CANCELLED,
    TaskStatus.REJECTED.value: TaskState.REJECTED,
}


class Outbox:
    """What one peer will be sent at the end of this pass, batched per command.

    A plain class, not a dataclass: one is made per peer per pass, and a dataclass's
    ``__init__`` stays interpreted (with a call per default factory) when compiled."""

    __slots__ = ("assignments", "results", "accepted", "acks", "cancels", "control")

    def __init__(self) -> None:
        self.assignments: list[Assignment] = []
        self.results: list[ResultItem] = []
        self.accepted: list[str] = []
        self.acks: list[str] = []
        self.cancels: list[str] = []
        #: already-encoded control messages (errors, status replies, heartbeats), in order
        self.control: list[list[Any]] = []


@dataclass(slots=True)
class StatusWaiter:
    """A STATUS request with ``until``: answered when enough agents match or at deadline."""

    identity: bytes
    req: int
    requirement: Requirement
    count: int
    deadline: float


class Broker:
    """The broker. Build it, call :meth:`bind`, then :meth:`run` (blocking)."""

    def __init__(self, config: BrokerConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self.liveness = Liveness(config.heartbeat_interval_s, config.heartbeat_liveness)
        self.policy = make_policy(config.policy)
        self.retry_policy = RetryPolicy(config.default_max_retries, config.retry_base_delay_s,
                                        config.retry_max_delay_s)
        self.agents = AgentTable()
        self.tasks: dict[str, TaskRecord] = {}
        self.pending = PendingQueue()
        self.finished = FinishedResults(config.result_retention_max, config.result_retention_s)
        self.deadlines = Deadlines()
        self.journal = open_journal(config.data_dir, config.durability)
        self.counters: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.endpoint = ""
        #: other components' endpoints handed to agents at registration (bus, state)
        self.endpoints: dict[str, str] = {}
        #: the broker's own events on the bus (:meth:`attach_bus`); None without a bus
        self.events: EventPublisher | None = None
        #: the forwarder's frame counters, when it runs in this process
        self.bus_statistics: Callable[[], dict[str, int] | None] | None = None
        #: somebody subscribes to task events: state changes get published. Hot paths
        #: test this one attribute, so that task events cost nothing while nobody listens.
        self._watch_tasks = False
        self.direct = DirectRouting(self.agents)
        #: a new id per start: clients that see it change send again what they had open
        self.boot_id = uuid.uuid4().hex[:12]
        self.started_at = clock()
        #: add to a clock reading to get wall-clock time (journal, timelines)
        self.wall_offset = time.time() - self.started_at
        self._retrying: deque[TaskRecord] = deque()
        self._requirements: dict[tuple[tuple[str, ...], str | None], Requirement] = {}
        self._outboxes: dict[bytes, Outbox] = {}
        self._backlog: dict[bytes, deque[list[Any]]] = {}
        self._status_waiters: list[StatusWaiter] = []
        self._deferred_acks: dict[bytes, list[str]] = {}
        #: ACCEPTED owed, per SUBMIT: (when it is due, client, task ids), oldest first
        self._accepted_due: deque[tuple[float, bytes, list[str]]] = deque()
        self._tick_s = config.heartbeat_interval_s / TICKS_PER_INTERVAL
        self._next_tick = 0.0
        self._stop_requested = False
        self._stopping_since: float | None = None
        self._running = False
        self._items_this_pass = 0
        self._ctx: zmq.Context[Any] | None = None
        self._router: zmq.Socket[Any] | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)

    # ------------------------------------------------------------------ lifecycle

    def bind(self) -> str:
        """Replay the journal, create and bind the ROUTER socket; returns the endpoint."""
        self._restore(self.journal.open())
        self._ctx = zmq.Context()
        router = self._ctx.socket(zmq.ROUTER)
        # Without MANDATORY a send to a gone or full peer is silently dropped.
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # A reconnecting agent keeps its routing id; let the new connection take it over.
        router.setsockopt(zmq.ROUTER_HANDOVER, 1)
        apply_common_options(router, self.config.send_hwm)
        router.setsockopt(zmq.LINGER, 1000)
        endpoint = self.config.router_endpoint
        if endpoint.endswith(":0"):
            port = router.bind_to_random_port(endpoint.rsplit(":", 1)[0])
            endpoint = f"{endpoint.rsplit(':', 1)[0]}:{port}"
        else:
            router.bind(endpoint)
        self._router = router
        self.endpoint = endpoint
        return endpoint

    def attach_bus(self, bus_out: str, bus_in: str, hwm: int,
                   statistics: Callable[[], dict[str, int] | None] | None = None) -> None:
        """Announce the bus (forwarder endpoints) to agents and clients, and publish the
        broker's events on it. Call after :meth:`bind`.

        Args:
            bus_out: where subscribers connect (the forwarder's XPUB).
            bus_in: where publishers connect (the forwarder's XSUB).
            hwm: queue bound of the broker's publisher socket.
            statistics: returns the forwarder's counters, for the status document.
        """
        assert self._ctx is not None, "bind() first"
        self.endpoints["bus_out"] = bus_out
        self.endpoints["bus_in"] = bus_in
        self.events = EventPublisher(self._ctx, bus_in, hwm)
        self.bus_statistics = statistics

    def _restore(self, replay: Replay) -> None:
        """Rebuild open tasks and retained results from the journal."""
        now = self.clock()
        wall_now = now + self.wall_offset
        restored_results = 0
        for task_id, record in replay.results.items():
            accepted = replay.accepted.get(task_id)
            if accepted is None or wall_now - record[10] > self.finished.max_age_s:
                continue
            task = self._record_from_journal(accepted, now)
            result = _new_result((task_id, record[2], record[3], record[4], record[5],
                                  record[6], record[7], record[8], record[9], None))
            task.state = _STATE_OF_STATUS.get(record[2], _FAILED)
            task.result = result
            task.finished_at = record[10] - self.wall_offset
            self.finished.add(task)
            restored_results += 1
        reopened = 0
        for task_id, accepted in replay.accepted.items():
            if task_id in replay.results:
                continue
            task = self._record_from_journal(accepted, now)
            task.note(now, "restored", "the broker restarted; dispatching again")
            task.restored = True
            self.tasks[task_id] = task
            self.pending.push(task)
            self.deadlines.add(task, task.timeout_s)
            reopened += 1
        if replay.records:
            logger.info("journal: %d open task(s) dispatched again, %d result(s) restored "
                        "(%d record(s), %d torn byte(s) dropped)", reopened, restored_results,
                        replay.records, replay.truncated_bytes)
        self.counters["restored_open"] = reopened
        self.counters["restored_results"] = restored_results

    def _record_from_journal(self, record: list[Any], now: float) -> TaskRecord:
        _, task_id, payload, caps, agent, priority, timeout_s, retries, parent, client, wall = record
        spec = _new_tuple(TaskSpec, (task_id, payload, tuple(caps), agent, priority, timeout_s,
                                     retries, parent))
        task = TaskRecord(spec, self._requirement(spec[2], agent), client,
                          now, timeout_s or self.config.default_timeout_s)
        task.submitted_at = wall - self.wall_offset
        return task

    def request_stop(self) -> None:
        """Ask for a graceful stop; safe from signal handlers and other threads."""
        self._stop_requested = True
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass  # the wake-up pipe is full: the loop is being woken already

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT ask for a graceful stop (main thread only)."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.request_stop()

    def run(self) -> None:
        """Serve until a graceful stop completes."""
        if self._router is None:
            self.bind()
        router = self._router
        assert router is not None
        wake_fd = self._wake_r.fileno()
        bus = self.events
        bus_socket = bus.socket if bus is not None else None
        # A plain poll(2) on the sockets' descriptors rather than zmq_poll: zmq_poll makes
        # a non-blocking pass first and asks ZMQ_EVENTS of every socket before and after
        # it sleeps, about a dozen system calls a pass against three here.
        router_fd = int(router.getsockopt(zmq.FD))
        poller = select.poll()
        poller.register(router_fd, select.POLLIN)
        poller.register(wake_fd, select.POLLIN)
        bus_fd: int = -1
        if bus_socket is not None:
            bus_fd = int(bus_socket.getsockopt(zmq.FD))
            poller.register(bus_fd, select.POLLIN)
        bus_published = 0
        self._running = True
        logger.info("broker %s listening on %s (policy %s, durability %s)", __version__,
                    self.endpoint, self.policy.name, self.journal.durability.value)
        try:
            while self._running:
                # A ZMQ descriptor is edge-triggered and any operation on its socket (this
                # pass's sends too) can take the edge of a message that arrived meanwhile:
                # sleep only once ZMQ_EVENTS says nothing waits.
                input_waits = has_input(router)
                if bus is not None and bus.published != bus_published:
                    bus_published = bus.published
                    if has_input(bus.socket):
                        self._read_bus(bus)
                timeout = 0 if input_waits else self._poll_timeout_ms()
                for fd, _ in poller.poll(timeout):
                    if fd == router_fd:
                        input_waits = True
                    elif fd == bus_fd:
                        assert bus is not None
                        self._read_bus(bus)
                    else:
                        self._clear_wakeups()
                if input_waits:
                    # (a wake-up for something other than a message makes the first recv
                    # raise zmq.Again, which _drain takes as "nothing to read")
                    self._drain(router)
                now = self.clock()
                if self._stop_requested and self._stopping_since is None:
                    self._begin_stop(now)
                self._timers_dispatch_flush(now)
                if self._stopping_since is not None:
                    self._check_stop_complete(now)
        finally:
            self._close()

    def _timers_dispatch_flush(self, now: float) -> None:
        """Steps 3 to 5 of a pass. An unexpected error here is a bug in the broker, not
        bad input; it is logged and counted, and the loop goes on rather than dropping
        every open task with the process."""
        try:
            if now >= self._next_tick:
                self._tick(now)
            self._expire_deadlines(now)
            if self._retrying:
                self._release_retries(now)
            self._dispatch(now)
        except Exception:  # noqa: BLE001 - see the docstring
            self.errors["internal_error"] += 1
            logger.exception("broker timers or dispatch failed; carrying on")
        self._flush()

    def _close(self) -> None:
        self.journal.close()
        if self.events is not None:
            self.events.close()
        if self._router is not None:
            self._router.close(linger=1000)
        if self._ctx is not None:
            self._ctx.term()
        self._wake_r.close()
        self._wake_w.close()
        logger.info("broker stopped")

    def _read_bus(self, bus: EventPublisher) -> None:
        bus.read_subscriptions()
        self._watch_tasks = bus.watching_tasks

    def _clear_wakeups(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _poll_timeout_ms(self) -> int:
        now = self.clock()
        until = self._next_tick
        deadline = self.deadlines.next_deadline()
        if deadline is not None and deadline < until:
            until = deadline
        accepted_at = self._next_accepted_due()
        if accepted_at is not None and accepted_at < until:
            until = accepted_at
        if self._retrying:
            until = min(until, min(t.retry_at for t in self._retrying))
        return max(0, int((until - now) * 1000) + 1)

    # ---------------------------------------------------------------- receiving

    def _drain(self, router: zmq.Socket[Any]) -> None:
        handle = self._handle_frames
        received = 0
        self._items_this_pass = 0
        # Stop after a batch worth of items, so that dispatch and flush run and the agents
        # start working while the rest of a burst is still waiting in the socket.
        item_budget = MAX_BATCH_ITEMS * 2
        try:
            while received < self.config.drain_batch and self._items_this_pass < item_budget:
                frames = recv_frames(router, NOBLOCK)
                received += 1
                handle(frames)
                # Asking whether more is queued costs a fraction of the zmq.Again that
                # an empty recv raises (about 5 against 19 us when the cache is cold,
                # as it is on every pass of a lightly loaded broker).
                if not has_input(router):
                    break
        except zmq.Again:
            pass
        self.counters["messages_in"] += received

    def _handle_frames(self, frames: list[bytes]) -> None:
        identity = frames[0]
        try:
            msg = decode(frames[1:])
        except DecodeError as e:
            self._reject(identity, e.code, str(e))
            return
        agent = self.agents.get(identity)
        if agent is not None:
            # any frame is a sign of life
            agent.last_seen = self.clock()
        try:
            match msg:
                case Submit():
                    self._handle_submit(identity, msg)
                case Results():
                    self._handle_results(identity, agent, msg)
                case Direct():
                    self._handle_direct(identity, msg)
                case Progress():
                    self._handle_progress(identity, agent, msg)
                case Heartbeat():
                    self._handle_heartbeat(identity, agent, msg)
                case Ready():
                    self._handle_ready(identity, msg)
                case Fetch():
                    self._handle_fetch(identity, msg)
                case StatusRequest():
                    self._handle_status(identity, msg)
                case TaskQuery():
                    self._handle_task_query(identity, msg)
                case Cancel():
                    self._handle_cancel(identity, msg)
                case Disconnect():
                    self._handle_disconnect(identity, agent)
                case _:
                    self._reject(identity, ErrorCode.UNKNOWN_COMMAND,
                                 f"{type(msg).__name__} is not a command the broker accepts")
        except Exception as e:  # noqa: BLE001 - the broker never dies on one message
            logger.exception("handler failed for %s from %r", type(msg).__name__, identity)
            self._reject(identity, ErrorCode.BAD_FRAME, f"could not process message: {e}")

    def _reject(self, identity: bytes, code: str | ErrorCode, message: str,
                req: int | None = None, task_ids: list[str] | None = None) -> None:
        code = code.value if isinstance(code, ErrorCode) else code
        self.errors[code] += 1
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("error %s to %r: %s", code, identity, message)
        self._outbox(identity).control.append(
            encode(Error(code, message, req, task_ids or [])))

    def _outbox(self, identity: bytes) -> Outbox:
        box = self._outboxes.get(identity)
        if box is None:
            box = self._outboxes[identity] = Outbox()
        return box

    # ----------------------------------------------------------- client commands

    def _requirement(self, capabilities: tuple[str, ...], agent: str | None) -> Requirement:
        key = (capabilities, agent)
        requirement = self._requirements.get(key)
        if requirement is None:
            # One object per distinct value (requirements compare by identity), whatever
            # the order the capabilities were listed in.
            canonical = (tuple(sorted(set(capabilities))), agent)
            requirement = self._requirements.get(canonical)
            if requirement is None:
                requirement = Requirement(frozenset(capabilities), agent)
                self._requirements[canonical] = requirement
            self._requirements[key] = requirement
        return requirement

    def _handle_submit(self, identity: bytes, msg: Submit) -> None:
        now = self.clock()
        wall = now + self.wall_offset
        self._items_this_pass += len(msg.tasks)
        accepted: list[str] = []
        full: list[str] = []
        stopping: list[str] = []
        tasks = self.tasks
        finished = self.finished
        default_timeout = self.config.default_timeout_s
        max_pending = self.config.max_pending
        resubmitted = 0
        pending = self.pending
        deadlines = self.deadlines
        journal_accepted = self.journal.accepted
        watch_tasks = self._watch_tasks
        last_caps: tuple[str, ...] | None = None
        last_agent: str | None = None
        requirement: Requirement  # bound on the first task: last_caps starts as None
        for spec in msg.tasks:
            task_id = spec[0]
            existing = tasks.get(task_id) or finished.get(task_id)
            if existing is not None:
                # Idempotent resubmit: same id, same task; never run it twice.
                self.counters["resubmitted"] += 1
                resubmitted += 1
                accepted.append(task_id)
                if existing.result is not None:
                    self._outbox(identity).results.append(existing.result)
                elif existing.client != identity:
                    existing.add_watcher(identity)
                continue
            if self._stopping_since is not None:
                stopping.append(task_id)
                continue
            if pending.count >= max_pending:
                full.append(task_id)
                continue
            # Consecutive tasks of a batch mostly ask for the same thing: comparing the
            # freshly decoded strings is cheaper than hashing them into a key.
            if spec[2] != last_caps or spec[3] != last_agent:
                last_caps, last_agent = spec[2], spec[3]
                requirement = self._requirement(last_caps, last_agent)
            timeout_s = spec[5] or default_timeout
            task = TaskRecord(spec, requirement, identity, now, timeout_s)
            tasks[task_id] = task
            pending.push(task)
            deadlines.add(task, timeout_s)
            journal_accepted(spec, identity, wall)
            if watch_tasks:
                self._task_event(task, now)
            if spec[7] is not None:
                parent = tasks.get(spec[7])
                if parent is not None:
                    if parent.children is None:
                        parent.children = []
                    parent.children.append(task_id)
                elif self._was_cancelled(spec[7]):
                    # Submitted by a parent that was cancelled meanwhile (its agent had not
                    # heard yet): the subtask is cancelled with it, as if it had been there.
                    self._cancel_task(task_id, f"parent {spec[7]} was cancelled", now)
            accepted.append(task_id)
        # Resubmits of known ids are counted apart (resubmitted), not as new work.
        self.counters["submitted"] += len(msg.tasks) - len(full) - len(stopping) - resubmitted
        if accepted:
            self._defer_accepted(identity, accepted, now)
        if full:
            self._reject(identity, ErrorCode.QUEUE_FULL,
                         f"the pending queue is full ({max_pending} tasks); retry later",
                         task_ids=full)
        if stopping:
            self._reject(identity, ErrorCode.SHUTTING_DOWN,
                         "the broker is shutting down and accepts no new tasks",
                         task_ids=stopping)

    def _handle_fetch(self, identity: bytes, msg: Fetch) -> None:
        missing = []
        box = self._outbox(identity)
        for task_id in msg.task_ids:
            task = self.tasks.get(task_id) or self.finished.get(task_id)
            if task is None:
                missing.append(task_id)
            elif task.result is not None:
                box.results.append(task.result)
            elif msg.wait:
                task.add_watcher(identity)
            else:
                # Not finished and the caller will not wait: tell it where the task is.
                box.results.append(ResultItem(task_id, task.state.value, agent=(
                    task.agent.name if task.agent else None), attempts=task.attempts))
        if missing:
            self._reject(identity, ErrorCode.NOT_FOUND,
                         f"no task with id {', '.join(missing[:5])}"
                         + (" ..." if len(missing) > 5 else "")
                         + " (unknown, or its result is past retention)",
                         req=msg.req, task_ids=missing)

    def _handle_cancel(self, identity: bytes, msg: Cancel) -> None:
        now = self.clock()
        for task_id in msg.task_ids:
            self._cancel_task(task_id, "cancelled by request", now)

    def _cancel_task(self, task_id: str, reason: str, now: float) -> None:
        """Cancel a task and, depth first, the subtasks it submitted."""
        task = self.tasks.get(task_id)
        if task is None:
            return
        children = task.children
        self._end_by_broker(task, TaskStatus.CANCELLED, ErrorCode.CANCELLED, reason, now)
        for child in children or ():
            self._cancel_task(child, f"parent {task_id} was cancelled", now)

    def _was_cancelled(self, task_id: str) -> bool:
        finished = self.finished.get(task_id)
        return finished is not None and finished.state is TaskState.CANCELLED

    def _handle_task_query(self, identity: bytes, msg: TaskQuery) -> None:
        if msg.task_ids is not None:
            listed = [self._describe_task(task_id, depth=0) for task_id in msg.task_ids]
            self._outbox(identity).control.append(encode(TaskList(msg.req, listed)))
            return
        wanted = set(msg.statuses) if msg.statuses else None
        listed = []
        for task in self.finished.newest_first():
            if len(listed) >= msg.limit:
                break
            result = task.result
            if result is None or (wanted is not None and result[1] not in wanted):
                continue
            listed.append(self._task_document(task))
        self._outbox(identity).control.append(encode(TaskList(msg.req, listed)))

    def _task_document(self, task: TaskRecord) -> dict[str, Any]:
        result = task.result
        return {
            "task_id": task.spec[0], "status": task.state.value,
            "error": None if result is None or result[3] is None
            else {"code": result[3], "message": result[4]},
            "agent": result[5] if result is not None
            else (task.agent.name if task.agent is not None else None),
            "attempts": task.attempts, "capabilities": list(task.spec[2]),
            "parent_id": task.spec[7],
            "finished_at": round(task.finished_at + self.wall_offset, 6)
            if task.finished_at else None,
            "timeline": task.timeline(self.wall_offset),
        }

    #: how deep `trace` follows subtasks
    TRACE_DEPTH = 8

    def _describe_task(self, task_id: str, depth: int) -> dict[str, Any]:
        """A task's document with its subtask tree (for ``orchestrator trace``)."""
        task = self.tasks.get(task_id) or self.finished.get(task_id)
        if task is None:
            return {"task_id": task_id, "status": "unknown", "children": []}
        document = self._task_document(task)
        children = task.children or []
        document["children"] = [self._describe_task(child, depth + 1) for child in children] \
            if depth < self.TRACE_DEPTH else [{"task_id": c, "status": "..."} for c in children]
        return document

    def _handle_status(self, identity: bytes, msg: StatusRequest) -> None:
        until = msg.until
        if until:
            count = until.get("agents", 1)
            caps = until.get("capability") or until.get("capabilities") or ()
            if isinstance(caps, str):
                caps = (caps,)
            if type(count) is not int or not all(isinstance(c, str) for c in caps):
                self._reject(identity, ErrorCode.BAD_FRAME,
                             "until needs an integer 'agents' and string capabilities",
                             req=msg.req)
                return
            name = until.get("name")
            waiter = StatusWaiter(identity, msg.req,
                                  self._requirement(tuple(sorted(caps)),
                                                    name if isinstance(name, str) else None),
                                  count, self.clock() + max(0.0, msg.timeout_s))
            if not self._answer_waiter(waiter, force=False):
                self._status_waiters.append(waiter)
            return
        self._outbox(identity).control.append(encode(StatusReply(msg.req, self.status())))

    def _answer_waiter(self, waiter: StatusWaiter, force: bool) -> bool:
        met = len(self.agents.eligible(waiter.requirement)) >= waiter.count
        if not (met or force):
            return False
        status = self.status()
        status["met"] = met
        self._outbox(waiter.identity).control.append(encode(StatusReply(waiter.req, status)))
        return True

    # ------------------------------------------------------------ direct messages

    def _handle_direct(self, identity: bytes, msg: Direct) -> None:
        """Forward a batch of direct messages, grouped per receiver and in order, payloads
        untouched and the sender's routing id added as ``from``; the sender hears what
        became of each in this pass's verdict. Rules in ``broker/direct.py``."""
        direct = self.direct
        items = msg.items
        self._items_this_pass += len(items)
        sender = direct.sender_ref(identity)
        #: per item: None once delivered to some receiver, else (code, message) to report
        #: (_UNDELIVERED: its receivers were not reachable; the message is built only then)
        outcomes: list[tuple[str, str] | None] = []
        groups: dict[bytes, tuple[list[DirectItem], list[int]]] = {}
        for index, item in enumerate(items):
            to = item[0]
            receivers, refusal = self._direct_receivers(to, bool(item[4] & DIRECT_BROADCAST))
            outcomes.append(refusal if refusal is not None else _UNDELIVERED)
            if not receivers:
                continue
            forwarded = _new_tuple(DirectItem, (to, item[1], item[2], item[3], item[4], item[5],
                                                sender))
            for receiver in receivers:
                group = groups.get(receiver)
                if group is None:
                    group = groups[receiver] = ([], [])
                group[0].append(forwarded)
                group[1].append(index)
        now = self.clock()
        for receiver, (forwarded_items, indexes) in groups.items():
            code = self._forward_direct(
                receiver, [encode(Direct(part)) for part in chunks(forwarded_items)], now)
            if code == _MAILBOX_FULL:
                agent = self.agents.get(receiver)
                if agent is not None:
                    agent.messaging["broker_refused"] = (agent.messaging.get("broker_refused", 0)
                                                         + len(indexes))
            for index in indexes:
                if code is None:
                    outcomes[index] = None
                elif code == _MAILBOX_FULL and outcomes[index] is not None:
                    outcomes[index] = (code, f"{items[index][0]!r} is not keeping up: "
                                             f"{DIRECT_BACKLOG_LIMIT} messages already wait "
                                             "for it in the broker")
        routed = 0
        for item, outcome in zip(items, outcomes):
            if outcome is None:
                routed += 1
                if not item[4] & DIRECT_NO_ACK:
                    direct.ack(identity, item[1])
            elif outcome == _UNDELIVERED:  # a value, not an identity: compiled code copies tuples
                direct.error(identity, item[1], _NO_AGENT,
                             f"no agent or client {item[0]!r} is connected")
            else:
                direct.error(identity, item[1], outcome[0], outcome[1])
        direct.counters["routed"] += routed

    def _direct_receivers(self, to: str | bytes | None, broadcast: bool
                          ) -> tuple[list[bytes], tuple[str, str] | None]:
        """The routing ids a direct message to ``to`` goes to, or why there are none."""
        if to is None:
            return [], (ErrorCode.BAD_FRAME.value,
                        "a direct message needs 'to': an agent id, an agent name or a client id")
        targets = self.direct.resolve(to, broadcast)
        if targets is None:
            raw = to.encode() if isinstance(to, str) else to
            refusal = self.direct.refusal(raw)
            if refusal is not None:
                return [], (_NO_AGENT, f"agent {to!r} left ({refusal})")
            return [raw], None
        if not targets:
            return [], (_NO_AGENT, f"no live agent named {to!r}")
        return [agent.identity for agent in targets], None

    def _forward_direct(self, receiver: bytes, messages: list[list[Any]], now: float
                        ) -> str | None:
        """Send forwarded DIRECT messages now, or queue them behind what already waits for
        the receiver (so that one sender's messages stay in order); returns an error code
        when they can be neither sent nor queued."""
        backlog = self._backlog.get(receiver)
        if backlog:
            if len(backlog) + len(messages) > DIRECT_BACKLOG_LIMIT:
                return _MAILBOX_FULL
            backlog.extend(messages)
            self.direct.backlogged.add(receiver)
            return None
        router = self._router
        assert router is not None
        for index, frames in enumerate(messages):
            try:
                send_frames(router, [receiver, *frames], NOBLOCK)
            except zmq.Again:
                self._keep_for_later(receiver, messages[index:])
                self.direct.backlogged.add(receiver)
                return None
            except zmq.ZMQError as e:
                if e.errno != zmq.EHOSTUNREACH:
                    raise
                self._peer_unreachable(receiver, now)
                return _NO_AGENT
        self.counters["messages_out"] += len(messages)
        return None

    def _release_direct(self, now: float) -> None:
        """Queue this pass's verdicts, and try again to send direct messages that wait in
        backlogs of receivers nothing else is sent to this pass."""
        for identity, verdict in self.direct.take_verdicts():
            self._outbox(identity).control.append(encode(verdict))
        backlogged = self.direct.backlogged
        for identity in list(backlogged):
            if identity not in self._backlog:
                backlogged.discard(identity)
            elif identity not in self._outboxes:
                self._send_all(identity, [], now)

    # ------------------------------------------------------------ agent commands

    def _handle_ready(self, identity: bytes, msg: Ready) -> None:
        now = self.clock()
        previous = self.agents.remove(identity)
        agent = AgentRecord(identity, msg.agent_id, msg.name, frozenset(msg.capabilities),
                            msg.max_concurrent, now, now, now,
                            breaker=CircuitBreaker(self.config.circuit_failure_threshold,
                                                   self.config.circuit_recovery_s, self.clock))
        self.agents.add(agent)
        self.direct.rejoined(identity)
        running = set(msg.running)
        if previous is not None:
            # Registered again on the same connection (it thought we died): what it still
            # runs stays with it, what it does not know about was lost on the way.
            previous.state = AgentState.DEAD
            for task_id, task in previous.in_flight.items():
                if task_id in running:
                    task.agent = agent
                    agent.in_flight[task_id] = task
                else:
                    task.release_agent()
                    self._orphan(task, f"agent {msg.agent_id} registered again without it",
                                 now)
            agent.foreign_running.update(
                (task_id, now) for task_id in previous.foreign_running if task_id in running)
        for task_id in msg.running:
            if task_id not in agent.in_flight:
                self._claim_running(agent, task_id, now)
        self.counters["agents_registered"] += 1
        logger.info("agent %s (%s) registered: capabilities %s, max_concurrent %d",
                    msg.agent_id, msg.name, sorted(msg.capabilities), msg.max_concurrent)
        if self.events is not None:
            self.events.agent_joined(msg.agent_id, msg.name, sorted(msg.capabilities))
        # WELCOME goes out now, ahead of any TASK this pass may give the agent: an agent
        # must know it is registered before it runs work (or it resends its results).
        self._send_all(identity, [encode(Welcome(
            self.config.heartbeat_interval_s, self.config.heartbeat_liveness, self.endpoints,
            self.boot_id))], now)
        if self._status_waiters:
            self._status_waiters = [w for w in self._status_waiters
                                    if not self._answer_waiter(w, force=False)]

    def _claim_running(self, agent: AgentRecord, task_id: str, now: float) -> None:
        """The agent says it runs ``task_id``: make our books agree, or stop it there."""
        foreign = agent.foreign_running
        if task_id in foreign:
            foreign[task_id] = now  # we told it to cancel that copy; it still runs it
            return
        task = self.tasks.get(task_id)
        if task is not None and task.state is _PENDING:
            # We had requeued it (the agent looked dead) but it is still running there:
            # take it back rather than run it twice.
            self.pending.discard(task)
            self._assign(task, agent, now, new_attempt=False)
            task.state = _RUNNING
            task.note(now, "reclaimed", agent.agent_id)
            if self._watch_tasks:
                self._task_event(task, now)
        elif task is not None and task.agent is agent:
            task.last_sign = now
            if task.state is _DISPATCHED:
                task.state = _RUNNING
                task.started_at = now
                if self._watch_tasks:
                    self._task_event(task, now)
        else:
            # Finished, or running elsewhere now: this copy is not wanted.
            foreign[task_id] = now
            self._outbox(agent.identity).cancels.append(task_id)

    def _handle_progress(self, identity: bytes, agent: AgentRecord | None, msg: Progress) -> None:
        if agent is None:
            self._outbox(identity).control.append(
                encode(Disconnect(ErrorCode.NOT_REGISTERED.value)))
            return
        now = self.clock()
        for task_id in msg.started:
            self._claim_running(agent, task_id, now)
        for task_id in msg.running:
            self._claim_running(agent, task_id, now)

    def _handle_heartbeat(self, identity: bytes, agent: AgentRecord | None,
                          msg: Heartbeat) -> None:
        if msg.role == "client":
            self._outbox(identity).control.append(encode(Heartbeat(boot=self.boot_id)))
        elif agent is None:
            # A heartbeat before READY: an agent that registered with a broker we do not
            # remember (we restarted). Ask it to register instead of inventing state for it.
            self._outbox(identity).control.append(
                encode(Disconnect(ErrorCode.NOT_REGISTERED.value)))
        elif msg.stats is not None:
            agent.messaging.update(msg.stats)

    def _handle_disconnect(self, identity: bytes, agent: AgentRecord | None) -> None:
        if agent is None:
            return
        if agent.busy:
            agent.state = AgentState.DRAINING
            self.agents.changed()
        else:
            self._remove_agent(agent, "disconnected", self.clock())

    def _handle_results(self, identity: bytes, agent: AgentRecord | None, msg: Results) -> None:
        now = self.clock()
        results = msg.results
        self._items_this_pass += len(results)
        self._outbox(identity).acks.extend([item[0] for item in results])
        tasks = self.tasks
        foreign = agent.foreign_running if agent is not None else None
        elapsed_total = 0.0
        answered = 0
        for item in results:
            task_id = item[0]
            if foreign:
                foreign.pop(task_id, None)
            task = tasks.get(task_id)
            if task is None:
                # Already finished (a duplicate after a re-dispatch or resend) or unknown.
                self.counters["duplicate_results"] += 1
                continue
            status = item[1]
            owner = task.agent
            if owner is None or owner.identity != identity:
                # An earlier attempt answering (the task was requeued or dispatched again
                # since). Its success is as good as any: take it, and stop the current
                # holder. Its failure is old news: the current attempt decides. Only a
                # peer that did hold the task may answer for it (after a restart we do not
                # know who did: then any registered agent may).
                if status != _SUCCEEDED or not task.held_by(identity, agent is not None):
                    self.counters["stale_results"] += 1
                    continue
                self._detach(task)
                dispatched_at = task.dispatched_at
                self._finish(task, TaskState.SUCCEEDED, _new_result((
                    task_id, status, item[2], item[3], item[4],
                    agent.name if agent is not None else None, task.attempts,
                    round((dispatched_at - task.submitted_at) * 1000.0, 3)
                    if dispatched_at else None, item[8], None)), now)
                continue
            else:
                del owner.in_flight[task_id]
                elapsed_total += now - task.dispatched_at
                answered += 1
                breaker = owner.breaker
                if status == _SUCCEEDED:
                    owner.done += 1
                    if breaker._state is not _CIRCUIT_CLOSED or breaker.consecutive_failures:
                        self._breaker_success(owner)
                else:
                    owner.failed += 1
                    if status == _FAILED_STATUS or status == _TIMED_OUT_STATUS:
                        self._breaker_failure(owner, now)
                if owner.state is _DRAINING and not owner.busy:
                    self._remove_agent(owner, "drained", now)
                agent_name = owner.name
            task.release_agent()
            if status != _SUCCEEDED and self._retry(task, item[3], item[4], item[9], now):
                continue
            dispatched_at = task.dispatched_at
            self._finish(task, _STATE_OF_STATUS.get(status, _FAILED), _new_result((
                task_id, status, item[2], item[3], item[4], agent_name, task.attempts,
                (dispatched_at - task.submitted_at) * 1000.0 if dispatched_at else None,
                item[8], None)), now)
        if answered and agent is not None:
            # One response-time sample per message (its mean): cheaper than one per task,
            # and the routing policies only look at a coarse bucket of it anyway.
            agent.record_response(elapsed_total * 1000.0 / answered)
        if agent is None:
            # Results from an unregistered peer (e.g. after our restart): accepted above,
            # and the peer is asked to register so that it gets work again.
            self._outbox(identity).control.append(
                encode(Disconnect(ErrorCode.NOT_REGISTERED.value)))

    def _breaker_success(self, agent: AgentRecord) -> None:
        was = agent.breaker.state
        agent.breaker.record_success()
        if was is not CircuitState.CLOSED:
            logger.info("agent %s: circuit closed after a successful probe", agent.agent_id)

    def _breaker_failure(self, agent: AgentRecord, now: float) -> None:
        was = agent.breaker.state
        agent.breaker.record_failure()
        if agent.breaker.state is CircuitState.OPEN and was is not CircuitState.OPEN:
            self.counters["circuits_opened"] += 1
            logger.warning("agent %s: circuit open after %d failure(s) in a row; no tasks for "
                           "%g s", agent.agent_id, agent.breaker.consecutive_failures,
                           agent.breaker.recovery_timeout)

    # ------------------------------------------------------------ task endings

    def _retry(self, task: TaskRecord, code: str | None, message: str | None,
               retryable: bool | None, now: float) -> bool:
        """Schedule another attempt if the failure allows it; True if scheduled."""
        if retryable is None:
            retryable = code not in NOT_RETRYABLE
        max_retries = task.spec[6]
        if max_retries is None:
            max_retries = self.retry_policy.max_retries
        if not retryable or task.attempts > max_retries or self._stopping_since is not None:
            return False
        delay = self.retry_policy.delay(task.attempts)
        if task.dispatched_at:
            # The next dispatch overwrites dispatched_at: keep this attempt's in history.
            task.note(task.dispatched_at, "dispatched", f"attempt {task.attempts}")
        task.state = TaskState.RETRYING
        task.retry_at = now + delay
        task.note(now, "retrying", f"attempt {task.attempts} failed ({code}: {message}); "
                                   f"retry in {delay:.2f} s")
        self._retrying.append(task)
        self.counters["retried"] += 1
        if self._watch_tasks:
            self._task_event(task, now)
        return True

    def _release_retries(self, now: float) -> None:
        """Tasks whose back-off is over wait for an agent again."""
        still: deque[TaskRecord] = deque()
        for task in self._retrying:
            if task.state is not TaskState.RETRYING:
                continue
            if task.retry_at > now:
                still.append(task)
                continue
            task.state = _PENDING
            task.deadline = now + task.timeout_s
            self.deadlines.add(task, task.timeout_s)
            self.pending.push(task)
            if self._watch_tasks:
                self._task_event(task, now)
        self._retrying = still

    def _finish(self, task: TaskRecord, state: TaskState, result: ResultItem, now: float) -> None:
        """The one way a task ends: record, journal, tell its client and watchers, retain."""
        task.state = state
        task.result = result
        task.finished_at = now
        del self.tasks[task.spec[0]]
        self.finished.add(task)
        self.journal.finished(result, now + self.wall_offset)
        self.counters[state._value_] += 1
        if self._watch_tasks:
            self._task_event(task, now)
        client = task.client
        box = self._outboxes.get(client)
        if box is None:
            box = self._outboxes[client] = Outbox()
        box.results.append(result)
        if task.watchers:
            for watcher in task.watchers:
                if watcher != client:
                    self._outbox(watcher).results.append(result)

    def _detach(self, task: TaskRecord) -> None:
        """Take a task off its agent (which may still run it: its slot stays taken until
        it answers the CANCEL) or out of the queue."""
        if task.state is _PENDING:
            self.pending.discard(task)
        agent = task.agent
        if agent is not None:
            agent.in_flight.pop(task.spec[0], None)
            agent.foreign_running[task.spec[0]] = self.clock()
            self._outbox(agent.identity).cancels.append(task.spec[0])
            task.release_agent()

    def _end_by_broker(self, task: TaskRecord, status: TaskStatus, code: ErrorCode,
                       message: str, now: float, retryable: bool = False) -> None:
        """End (or, if ``retryable`` and retries are left, retry) a task the broker decided
        about: timeout, no agent, lost agent, cancel, shutdown."""
        agent_name = task.agent.name if task.agent is not None else None
        was_pending = task.state is _PENDING
        self._detach(task)
        if retryable and self._retry(task, code.value, message, True, now):
            return
        result = _new_result((task.spec[0], status.value, b"", code.value, message, agent_name,
                              task.attempts,
                              round((now - task.submitted_at) * 1000.0, 3) if was_pending
                              else None, None, None))
        self._finish(task, _STATE_OF_STATUS[status.value], result, now)

    def _expire_deadlines(self, now: float) -> None:
        for task in self.deadlines.pop_expired(now):
            if task.state is TaskState.RETRYING or not task.open:
                continue
            if task.state is _PENDING:
                if not self.agents.eligible(task.requirement):
                    self._end_by_broker(
                        task, TaskStatus.FAILED, ErrorCode.NO_AGENT,
                        f"no live agent offers {task.requirement.describe()} (waited "
                        f"{task.timeout_s:g} s); start one or check the capability name", now)
                else:
                    self._end_by_broker(
                        task, TaskStatus.TIMED_OUT, ErrorCode.TIMEOUT,
                        f"waited {task.timeout_s:g} s in the queue: every agent offering "
                        f"{task.requirement.describe()} was busy or had its circuit open", now)
            else:
                agent = task.agent
                if agent is not None:
                    self._breaker_failure(agent, now)
                    agent.failed += 1
                self._end_by_broker(task, TaskStatus.TIMED_OUT, ErrorCode.TIMEOUT,
                                    f"attempt {task.attempts} ran past its {task.timeout_s:g} s "
                                    "timeout", now, retryable=True)

    # ------------------------------------------------------------------ agents

    def _remove_agent(self, agent: AgentRecord, reason: str, now: float) -> None:
        """Forget an agent; its in-flight tasks go back to the queue (or fail, if they
        have used up their retries)."""
        self.agents.remove(agent.identity)
        agent.state = AgentState.DEAD
        self.direct.departed(agent.identity, reason)
        if self.events is not None:
            self.events.agent_left(agent.agent_id, agent.name, sorted(agent.capabilities), reason)
        orphans = list(agent.in_flight.values())
        agent.in_flight.clear()
        for task in orphans:
            task.release_agent()
            self._orphan(task, f"agent {agent.agent_id} {reason}", now)
        log = logger.warning if reason in ("dead", "unreachable") else logger.info
        log("agent %s (%s) removed: %s; %d in-flight task(s) orphaned", agent.agent_id,
            agent.name, reason, len(orphans))

    def _orphan(self, task: TaskRecord, why: str, now: float) -> None:
        """A task lost its agent (or its dispatch was lost): run it elsewhere, at once."""
        max_retries = task.spec[6]
        if max_retries is None:
            max_retries = self.retry_policy.max_retries
        if task.attempts > max_retries:
            task.state = _DISPATCHED  # so that _end_by_broker does not touch the queue
            self._end_by_broker(task, TaskStatus.FAILED, ErrorCode.AGENT_LOST,
                                f"{why}; no retries left after {task.attempts} attempt(s)", now)
            return
        task.state = _PENDING
        task.deadline = now + task.timeout_s
        self.deadlines.add(task, task.timeout_s)
        self.pending.push_front(task)
        if task.dispatched_at:
            task.note(task.dispatched_at, "dispatched", f"attempt {task.attempts}")
        task.note(now, "requeued", why)
        self.counters["redispatched"] += 1
        if self._watch_tasks:
            self._task_event(task, now)

    def _tick(self, now: float) -> None:
        self._next_tick = now + self._tick_s
        liveness = self.liveness
        lease_s = liveness.expiry_s
        for agent in self.agents:
            if liveness.is_dead(agent, now):
                self.counters["agents_dead"] += 1
                self._remove_agent(agent, "dead", now)
                continue
            if liveness.needs_heartbeat(agent, now) and agent.identity not in self._outboxes:
                self._outbox(agent.identity).control.append(encode(Heartbeat()))
            # A dispatch with no sign of life for a lease period was lost on the way (the
            # agent is alive: it heartbeats). Run the task again.
            lost = [t for t in agent.in_flight.values() if now - t.last_sign > lease_s]
            for task in lost:
                del agent.in_flight[task.spec[0]]
                agent.foreign_running[task.spec[0]] = now
                self._outbox(agent.identity).cancels.append(task.spec[0])
                task.release_agent()
                self.counters["lease_expired"] += 1
                self._orphan(task, f"no sign of life from {agent.agent_id} for "
                                   f"{lease_s:g} s", now)
            foreign = agent.foreign_running
            if foreign:
                # A copy the agent has not listed as running for a lease period has ended
                # there and its answer was lost: free the slot rather than hold it forever.
                ended = [task_id for task_id, seen in foreign.items() if now - seen > lease_s]
                for task_id in ended:
                    del foreign[task_id]
                if ended:
                    self.counters["lost_answers"] += len(ended)
        if self._deferred_acks:
            acks, self._deferred_acks = self._deferred_acks, {}
            for identity, ids in acks.items():
                self._outbox(identity).control.append(encode(Ack(ids)))
        if self._status_waiters:
            self._status_waiters = [w for w in self._status_waiters
                                    if not self._answer_waiter(w, force=now >= w.deadline)]
        self.finished.expire(now)
        if self.journal.needs_compaction():
            self._compact_journal()

    def _compact_journal(self) -> None:
        offset = self.wall_offset
        self.journal.compact(
            ((t.spec, t.client, t.submitted_at + offset) for t in self.tasks.values()),
            ((t.result, t.finished_at + offset) for t in self.finished.newest_first()[::-1]
             if t.result is not None))
        self.counters["journal_compactions"] += 1

    # ------------------------------------------------------------------ dispatch

    def _assign(self, task: TaskRecord, agent: AgentRecord, now: float,
                new_attempt: bool = True) -> None:
        task.state = _DISPATCHED
        task.agent = agent
        if new_attempt:
            task.attempts += 1
        task.dispatched_at = task.last_sign = now
        task.deadline = now + task.timeout_s
        self.deadlines.add(task, task.timeout_s)
        agent.in_flight[task.spec[0]] = task
        if self._watch_tasks:
            self._task_event(task, now)

    def _task_event(self, task: TaskRecord, now: float) -> None:
        """Publish the task's new state on ``tasks.<id>``. Callers test
        ``self._watch_tasks`` first; ``agent`` is the agent's id while the task is
        dispatched or running, and the agent name (as in its result) once it ended."""
        events = self.events
        if events is None:
            return
        state = task.state
        final = state.finished
        if final:
            agent = task.result[5] if task.result is not None else None
        else:
            agent = task.agent.agent_id if task.agent is not None else None
        events.task_changed(task.spec[0], state.value, task.attempts, agent,
                            now + self.wall_offset, final)

    def _dispatch(self, now: float) -> None:
        pending = self.pending
        if not pending.count:
            return
        choose = self.policy.choose
        outboxes = self._outboxes
        deadlines_add = self.deadlines.add
        watch_tasks = self._watch_tasks
        for requirement in pending.requirements():
            candidates = [a for a in self.agents.eligible(requirement) if a.free > 0]
            if not candidates:
                continue
            assignments: dict[AgentRecord, list[Assignment]] = {}
            deferred: list[TaskRecord] = []
            while candidates:
                # As many waiting tasks as the candidates have credit, in one call.
                batch_of_tasks = pending.take(requirement, sum(a.free for a in candidates))
                if not batch_of_tasks:
                    break
                for task in batch_of_tasks:
                    if not candidates:
                        deferred.append(task)
                        continue
                    agent = choose(candidates) if len(candidates) > 1 else candidates[0]
                    if agent.foreign_running and task.spec[0] in agent.foreign_running:
                        # That agent still runs an earlier attempt of this task (told to
                        # cancel it): its answer could not be told from this attempt's.
                        # Another agent, or wait until it has answered.
                        others = [a for a in candidates if task.spec[0] not in a.foreign_running]
                        if not others:
                            deferred.append(task)
                            continue
                        agent = choose(others) if len(others) > 1 else others[0]
                    task.state = _DISPATCHED
                    task.agent = agent
                    attempts = task.attempts = task.attempts + 1
                    task.dispatched_at = task.last_sign = now
                    timeout_s = task.timeout_s
                    task.deadline = now + timeout_s
                    deadlines_add(task, timeout_s)
                    spec = task.spec
                    in_flight = agent.in_flight
                    in_flight[spec[0]] = task
                    if watch_tasks:
                        self._task_event(task, now)
                    batch = assignments.get(agent)
                    if batch is None:
                        batch = assignments[agent] = []
                    batch.append(_new_assignment((spec[0], spec[1], attempts, timeout_s,
                                                  spec[2], spec[7])))
                    breaker = agent.breaker
                    if breaker._state is not _CIRCUIT_CLOSED:
                        breaker.probe_in_flight = True  # half-open: this task is the probe
                        candidates.remove(agent)
                    elif len(in_flight) + len(agent.foreign_running) >= agent.max_concurrent:
                        candidates.remove(agent)
            for agent, batch in assignments.items():
                box = outboxes.get(agent.identity)
                if box is None:
                    box = outboxes[agent.identity] = Outbox()
                box.assignments.extend(batch)
            for task in reversed(deferred):
                pending.push_front(task)

    # ------------------------------------------------------------------ sending

    def _flush(self) -> None:
        now = self.clock()
        outboxes = self._outboxes
        # Work first: every send costs a syscall and maybe a wake-up, so what is on a
        # task's critical path (assignments, then results) leaves before bookkeeping.
        # Assignments may leave before the journal write: a task is promised to nobody
        # until its ACCEPTED (or RESULT) goes out, and those wait for the write below.
        for identity, box in list(outboxes.items()):  # a dead peer can add outboxes
            if box.assignments:
                self._send_all(identity, [encode_dispatch(part)
                                          for part in chunks(box.assignments)], now)
                box.assignments = []
        # Group commit: what this pass accepted and finished is written before anyone
        # hears of it.
        self.journal.commit()
        if self._accepted_due and now >= self._accepted_due[0][0]:
            self._release_accepted(outboxes, now)
        direct = self.direct
        if direct.backlogged or direct.has_verdicts:
            self._release_direct(now)
        if not outboxes:
            return
        self._outboxes = {}
        for identity, box in outboxes.items():
            if box.results:
                self._send_all(identity, [encode_results(part)
                                          for part in chunks(box.results)], now)
        for identity, box in outboxes.items():
            messages: list[list[Any]] = []
            if box.accepted:
                messages.extend(encode(Accepted(part)) for part in chunks(box.accepted))
            if box.cancels:
                messages.append(encode(Cancel(box.cancels)))
            if len(box.acks) >= MAX_BATCH_ITEMS:
                messages.extend(encode(Ack(part)) for part in chunks(box.acks))
                box.acks = []
            if box.acks:
                # Acks are not urgent: the agent only keeps results until acked. They go
                # with the next tick (or once a batch is full), not as a message per pass.
                self._deferred_acks.setdefault(identity, []).extend(box.acks)
            messages.extend(box.control)
            if messages:
                self._send_all(identity, messages, now)

    def _defer_accepted(self, identity: bytes, task_ids: list[str], now: float) -> None:
        """ACCEPTED waits ACCEPT_DELAY_S: a task that finishes by then needs none (its
        result says more), and the rest go in fewer, larger messages. On a 2-core machine
        an extra wake-up of the client costs the other processes' time. Each SUBMIT waits
        its own delay: a shared deadline would confirm the tasks of a later SUBMIT early,
        and a client sending one task at a time would get an ACCEPTED for every few."""
        self._accepted_due.append((now + ACCEPT_DELAY_S, identity, task_ids))

    def _next_accepted_due(self) -> float | None:
        """When the next ACCEPTED is due. SUBMITs whose tasks all finished meanwhile are
        dropped first: their RESULT said more, and a wake-up for them is a pass for nothing
        (a client submitting one quick task every few milliseconds would cost the broker
        one more pass per task)."""
        due = self._accepted_due
        tasks = self.tasks
        while due:
            when, _, ids = due[0]
            for task_id in ids:
                if task_id in tasks:
                    return when
            due.popleft()
        return None

    def _release_accepted(self, outboxes: dict[bytes, Outbox], now: float) -> None:
        due = self._accepted_due
        tasks = self.tasks
        while due and due[0][0] <= now:
            _, identity, ids = due.popleft()
            still_open = [task_id for task_id in ids if task_id in tasks]
            if still_open:
                box = outboxes.get(identity)
                if box is None:
                    box = outboxes[identity] = Outbox()
                box.accepted.extend(still_open)

    def _send_all(self, identity: bytes, messages: list[list[Any]], now: float) -> None:
        router = self._router
        assert router is not None
        backlog = self._backlog.get(identity)
        if backlog:
            backlog.extend(messages)
            messages = list(backlog)
            backlog.clear()
        for index, frames in enumerate(messages):
            try:
                send_frames(router, [identity, *frames], NOBLOCK)
            except zmq.Again:
                self._keep_for_later(identity, messages[index:])
                return
            except zmq.ZMQError as e:
                if e.errno == zmq.EHOSTUNREACH:
                    self._peer_unreachable(identity, now)
                    return
                raise
        self.counters["messages_out"] += len(messages)
        if backlog is not None:
            del self._backlog[identity]
        agent = self.agents.get(identity)
        if agent is not None:
            agent.last_sent = now

    def _keep_for_later(self, identity: bytes, messages: list[list[Any]]) -> None:
        backlog = self._backlog.setdefault(identity, deque())
        backlog.extend(messages)
        self.counters["send_backpressure"] += 1
        while len(backlog) > BACKLOG_LIMIT:
            backlog.popleft()
            # Results stay retrievable with FETCH; lost assignments come back when their
            # lease expires.
            self.counters["send_dropped"] += 1

    def _peer_unreachable(self, identity: bytes, now: float) -> None:
        self.counters["unreachable"] += 1
        agent = self.agents.get(identity)
        if agent is not None:
            self._remove_agent(agent, "unreachable", now)

    # ------------------------------------------------------------------ stopping

    def _begin_stop(self, now: float) -> None:
        self._stopping_since = now
        logger.info("graceful stop: draining %d task(s)", len(self.tasks))
        if self.journal.durability.value == "none":
            for task in list(self.tasks.values()):
                if task.state is _PENDING and not self.agents.eligible(task.requirement):
                    self._end_by_broker(task, TaskStatus.FAILED, ErrorCode.SHUTTING_DOWN,
                                        "the broker stopped before an agent could take it", now)

    def _check_stop_complete(self, now: float) -> None:
        assert self._stopping_since is not None
        timed_out = now - self._stopping_since >= self.config.drain_timeout_s
        running = any(t.agent is not None for t in self.tasks.values())
        dispatchable = any(t.state is _PENDING and self.agents.eligible(t.requirement)
                           for t in self.tasks.values())
        if (running or dispatchable) and not timed_out:
            return
        if self.journal.durability.value == "none":
            for task in list(self.tasks.values()):
                self._end_by_broker(task, TaskStatus.FAILED, ErrorCode.SHUTTING_DOWN,
                                    "the broker stopped before the task finished", now)
        elif self.tasks:
            # Journaled: they stay open and run again when the broker comes back.
            logger.info("graceful stop: %d open task(s) kept in the journal", len(self.tasks))
        for agent in self.agents:
            self._outbox(agent.identity).control.append(encode(Disconnect("broker_stopping")))
        self._flush()
        self._running = False

    # ------------------------------------------------------------------ status

    def status(self) -> dict[str, Any]:
        """A snapshot of the broker for STATUS (the document ``orchestrator status`` prints)."""
        now = self.clock()
        states = Counter(t.state.value for t in self.tasks.values())
        return {
            "broker": {
                "version": __version__, "protocol": PROTOCOL_VERSION, "pid": os.getpid(),
                "compiled": compiled,
                "endpoint": self.endpoint, "endpoints": dict(self.endpoints),
                "policy": self.policy.name, "boot": self.boot_id,
                "durability": self.journal.durability.value, "journal_bytes": self.journal.size,
                "uptime_s": round(now - self.started_at, 3),
                "state": "stopping" if self._stopping_since is not None else "running",
            },
            "agents": [a.describe() for a in self.agents],
            "queue": {"pending": self.pending.count, "max_pending": self.config.max_pending},
            "tasks": {
                "submitted": self.counters["submitted"], "pending": self.pending.count,
                "in_flight": states["dispatched"] + states["running"],
                "running": states["running"], "retrying": states["retrying"],
                **{s.value: self.counters[s.value] for s in
                   (TaskState.SUCCEEDED, TaskState.FAILED, TaskState.TIMED_OUT,
                    TaskState.CANCELLED)},
                "retried": self.counters["retried"],
                "redispatched": self.counters["redispatched"],
                "lease_expired": self.counters["lease_expired"],
                "lost_answers": self.counters["lost_answers"],
                "duplicate_results": self.counters["duplicate_results"],
                "retained_results": len(self.finished),
                "restored_open": self.counters["restored_open"],
                "restored_results": self.counters["restored_results"],
            },
            "messages": {"in": self.counters["messages_in"], "out": self.counters["messages_out"]},
            "errors": dict(self.errors),
            "messaging": self._messaging_status(),
        }

    def _messaging_status(self) -> dict[str, Any]:
        counters = self.direct.counters
        report: dict[str, Any] = {"direct": {
            "routed": counters["routed"], "no_agent": counters[_NO_AGENT],
            "mailbox_full": counters[_MAILBOX_FULL],
            "backlogged_receivers": len(self.direct.backlogged)}}
        if self.events is not None:
            report["bus"] = {
                "out": self.endpoints.get("bus_out"), "in": self.endpoints.get("bus_in"),
                "events_published": self.events.published,
                "subscribed_prefixes": len(self.events.prefixes),
                "forwarder": self.bus_statistics() if self.bus_statistics is not None else None,
            }
        return report
