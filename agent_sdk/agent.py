"""``BaseAgent``: subclass it, give it a name and capabilities, write ``execute``.

::

    class ReviewAgent(BaseAgent):
        def __init__(self) -> None:
            super().__init__(name="reviewer", capabilities=["code_review", "security_audit"])

        async def execute(self, task: Task) -> Result:
            issues = find_issues(task.code)
            return Result(data=issues, approved=not issues, confidence=0.9)

    ReviewAgent().run(broker="tcp://127.0.0.1:5555")

The agent registers with the broker, runs up to ``max_concurrent`` tasks at once on one
event loop, heartbeats, and reconnects and registers again when the broker goes away.
Results are kept until the broker acknowledges them and are sent again after a
reconnect, so a result is not lost with a connection.

Agents also talk to each other (:mod:`agent_sdk.messaging`): ``publish`` / ``subscribe``
on the bus, ``send`` / ``request`` / ``receive`` / ``on_message`` for direct messages, and
``await self.submit(...)`` inside ``execute`` to hand a subtask to another agent and get
its result.
"""

from __future__ import annotations

import abc
import asyncio
import contextvars
import enum
import logging
import signal
import time
import uuid
from collections import deque
from collections.abc import Coroutine, Generator, Iterable
from typing import Any, Final

from broker.config import broker_url
from wire.codec import chunks
from wire.limits import MAX_FRAME_BYTES
from wire.tasks import (
    Ack, Assignment, Cancel, Disconnect, Dispatch, Error, ErrorCode, Heartbeat, Message,
    Progress, Ready, ResultItem, Results, TaskStatus, Welcome,
)
from wire.tasks import Direct, DirectVerdict
from agent_sdk.client import Client
from agent_sdk.errors import OrchestratorError, PermanentFailure
from agent_sdk.messaging import MAILBOX_SIZE, MessagingMixin, Messenger
from agent_sdk.task import _MISSING, Result, Task
from agent_sdk.errors import StateUnavailable
from agent_sdk.state import StateClient, endpoint_from
from agent_sdk.transport import Channel

logger = logging.getLogger(__name__)

_new_tuple = tuple.__new__
_SUCCEEDED = TaskStatus.SUCCEEDED.value


def _new_result(fields: tuple[Any, ...]) -> ResultItem:
    return _new_tuple(ResultItem, fields)

#: Until the broker's WELCOME says otherwise.
DEFAULT_HEARTBEAT_INTERVAL_S: Final = 1.0
DEFAULT_HEARTBEAT_LIVENESS: Final = 3
#: Reconnect back-off: first wait, cap.
RECONNECT_MIN_S: Final = 0.1
RECONNECT_MAX_S: Final = 5.0
#: How long a graceful stop waits for running tasks.
STOP_DRAIN_S: Final = 30.0

#: The id of the task whose ``execute`` is running: subtasks submitted from it name it as
#: their parent. Set around the eager first step in ``_start``; the asyncio Task that
#: runs the rest copies the context at creation, so it stays set there too.
_current_task: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "orchestrator_current_task", default=None)


class AgentState(enum.Enum):
    """The agent's connection with the broker."""

    __hash__ = object.__hash__  # identity, as members compare: C speed, not Enum's

    STARTING = "starting"
    REGISTERING = "registering"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"


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


class BaseAgent(MessagingMixin, abc.ABC):
    """Base class of every agent.

    Args:
        name: the agent type; tasks may ask for it by name, and replicas share it.
        capabilities: what it can do; a task goes only to agents having all it requires.
        max_concurrent: most tasks running at once (the broker never sends more).
        agent_id: unique id of this instance (default: ``name-<random>``).
    """

    #: default for ``max_concurrent`` when the constructor is not given one
    max_concurrent: int = 16
    #: direct messages kept for ``receive`` (or in handlers) before more are dropped
    mailbox_size: int = MAILBOX_SIZE

    def __init__(self, name: str, capabilities: Iterable[str] = (), *,
                 max_concurrent: int | None = None, agent_id: str | None = None) -> None:
        if not name:
            raise ValueError("an agent needs a name")
        self.name = name
        self.capabilities = tuple(dict.fromkeys(capabilities))
        if max_concurrent is not None:
            self.max_concurrent = max_concurrent
        if self.max_concurrent < 1:
            raise ValueError("max_concurrent must be at least 1")
        self.agent_id = agent_id or f"{name}-{uuid.uuid4().hex[:10]}"
        #: where the agent stands with the broker (``self.state`` is the shared state)
        self.status = AgentState.STARTING
        self.broker_url = ""
        self.endpoints: dict[str, str] = {}
        self.tasks_done = 0
        self.tasks_failed = 0
        self._channel: Channel | None = None
        self._running: dict[str, asyncio.Task[Any] | None] = {}
        self._outgoing: list[ResultItem] = []
        self._unacked: dict[str, ResultItem] = {}
        #: (when, task ids) of result batches sent, oldest first, to resend unacked ones
        self._sent_log: deque[tuple[float, list[str]]] = deque()
        #: tasks that started running as asyncio tasks since the last flush
        self._started: list[str] = []
        self._heartbeat_interval_s = DEFAULT_HEARTBEAT_INTERVAL_S
        self._heartbeat_liveness = DEFAULT_HEARTBEAT_LIVENESS
        self._last_heard = 0.0
        self._last_sent = 0.0
        self._reconnect_delay_s = RECONNECT_MIN_S
        self._next_reconnect = 0.0
        self._stop_event = asyncio.Event()
        self._registered_event = asyncio.Event()
        #: set while no task runs as an asyncio Task (a graceful stop waits for it)
        self._idle_event = asyncio.Event()
        self._idle_event.set()
        self._shared_state: StateClient | None = None
        #: pub/sub and direct messages (the methods of MessagingMixin use it)
        self.messaging = Messenger(lambda: self.agent_id, self._send_message,
                                   self._bus_endpoints, mailbox_size=self.mailbox_size,
                                   started=lambda: self._channel is not None)
        #: the connection subtasks are submitted on, opened by the first ``submit``
        self._subtasks: Client | None = None
        #: subtasks submitted so far by each running task (their ids derive from it)
        self._subtask_counts: dict[str, int] = {}

    # ------------------------------------------------------------ to override

    @abc.abstractmethod
    async def execute(self, task: Task) -> Result:
        """Do the work of one task. Return a :class:`Result` (any other value becomes
        ``Result(data=value)``). An exception becomes a failed result carrying its type
        and message; the agent keeps serving."""

    async def on_start(self) -> None:
        """Called once before registering (open clients, load models)."""

    async def on_stop(self) -> None:
        """Called once after the agent stopped taking tasks."""

    async def ping(self) -> dict[str, Any]:
        """Health of this agent, for checks and tests."""
        return {"ok": self.status is AgentState.READY, "id": self.agent_id, "name": self.name,
                "state": self.status.value, "running": len(self._running),
                "done": self.tasks_done, "failed": self.tasks_failed}

    @property
    def state(self) -> StateClient:
        """Shared state: versioned keys, compare-and-set, ``update``, locks and watches on
        the state service, whose endpoint the broker sends at registration (the first
        call waits for that). See :class:`agent_sdk.state.StateClient`."""
        if self._shared_state is None:
            self._shared_state = StateClient(self._state_endpoint, name=self.agent_id)
        return self._shared_state

    async def _state_endpoint(self) -> str:
        if self._channel is None:
            # on_start runs before registration, which tells us where the service is:
            # waiting for it there would wait forever.
            raise StateUnavailable("", 0.0, "self.state is reachable once the agent "
                                   "registers: not inside on_start (start a task there)")
        await self._registered_event.wait()
        return endpoint_from(self.endpoints, f"the broker at {self.broker_url}")

    # ------------------------------------------------------------ messaging, subtasks

    def _send_message(self, msg: Message) -> None:
        channel = self._channel
        if channel is None or channel.closed:
            raise OrchestratorError(f"agent {self.agent_id} is not connected: messages can "
                                    "be sent once it runs (run, async_run)")
        channel.send(msg)

    async def _bus_endpoints(self) -> dict[str, str]:
        await self._registered_event.wait()
        return self.endpoints

    async def submit(self, text: str | None = None, *, capabilities: Iterable[str] = (),
                     agent: str | None = None, data: Any = _MISSING, task_id: str | None = None,
                     timeout: float | None = None, retries: int | None = None,
                     priority: int = 0, parent_id: str | None = None, **fields: Any) -> Result:
        """Hand a subtask to another agent through the broker and return its result (of
        any status: check ``result.ok``). Takes the keywords of :meth:`Client.submit`.

        Called from ``execute``, the subtask's parent is the running task: cancelling
        the parent cancels it (on its agent too). Its id is then ``<parent id>/<n>``, n
        counting this execution's submits, so a parent that runs again (a retry, a
        duplicate dispatch) gets the same subtasks back instead of running them again.
        """
        current = _current_task.get()
        parent = parent_id if parent_id is not None else current
        if task_id is None and parent is not None and parent == current:
            count = self._subtask_counts.get(parent, 0) + 1
            self._subtask_counts[parent] = count
            task_id = f"{parent}/{count}"
        client = self._subtasks
        if client is None:
            client = self._subtasks = Client(self.broker_url or None,
                                             client_id=f"{self.agent_id}-sub")
        handle = client.submit(text, capabilities=capabilities, agent=agent, data=data,
                               task_id=task_id, timeout=timeout, retries=retries,
                               priority=priority, parent_id=parent, **fields)
        return await handle.result()

    # ------------------------------------------------------------------ running

    def run(self, broker: str | None = None) -> None:
        """Serve tasks until stopped (SIGINT/SIGTERM or :meth:`stop`); uses uvloop."""
        from agent_sdk.loop import run as run_loop

        async def main() -> None:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self.stop)
            await self.async_run(broker)

        run_loop(main())

    async def async_run(self, broker: str | None = None) -> None:
        """Serve tasks on the running loop until :meth:`stop` is called."""
        loop = asyncio.get_running_loop()
        self.broker_url = broker or broker_url()
        await self.on_start()
        self._channel = Channel(self.broker_url, self.agent_id.encode(), self._on_message,
                                self._flush)
        self._channel.open()
        self._register(loop.time())
        heartbeats = asyncio.create_task(self._heartbeat_loop(), name=f"{self.agent_id}-heartbeat")
        try:
            await self._stop_event.wait()
            await self._drain_and_leave()
        finally:
            heartbeats.cancel()
            await asyncio.gather(heartbeats, return_exceptions=True)
            for pending in [t for t in self._running.values() if t is not None]:
                pending.cancel()
            self._channel.close()
            self.status = AgentState.STOPPED
            await self.on_stop()
            if self._shared_state is not None:
                await self._shared_state.close()
            await self.messaging.close()
            if self._subtasks is not None:
                await self._subtasks.close()

    def stop(self) -> None:
        """Stop taking tasks, finish running ones, say goodbye (call on the agent's loop)."""
        self._stop_event.set()

    async def wait_registered(self, timeout: float | None = None) -> None:
        """Return once the broker has accepted this agent's registration."""
        await asyncio.wait_for(self._registered_event.wait(), timeout)

    async def _drain_and_leave(self) -> None:
        self.status = AgentState.DRAINING
        channel = self._channel
        assert channel is not None
        channel.send(Disconnect("draining"))
        try:
            await asyncio.wait_for(self._idle_event.wait(), STOP_DRAIN_S)
        except asyncio.TimeoutError:
            logger.warning("agent %s stopped with %d task(s) still running", self.agent_id,
                           len(self._running))
        self._flush()
        channel.send(Disconnect("bye"))

    # ------------------------------------------------------------ registration

    def _register(self, now: float) -> None:
        assert self._channel is not None
        self.status = AgentState.REGISTERING
        self._last_heard = now
        self._channel.send(Ready(self.agent_id, self.name, self.capabilities,
                                 self.max_concurrent, running=tuple(self._running)))
        self._last_sent = now

    async def _heartbeat_loop(self) -> None:
        loop = asyncio.get_running_loop()
        next_lease = 0.0
        next_stats = 0.0
        while True:
            await asyncio.sleep(self._heartbeat_interval_s / 2)
            now = loop.time()
            channel = self._channel
            if channel is None or channel.closed:
                return
            if self.status is AgentState.READY or self.status is AgentState.DRAINING:
                if now >= next_lease and self._running:
                    # Renew the leases of running tasks (a dispatch the broker hears
                    # nothing about is presumed lost and runs elsewhere).
                    channel.send(Progress(running=list(self._running)))
                    self._last_sent = now
                    next_lease = now + self._heartbeat_interval_s
                self._resend_unacked(now)
                self.messaging.expire(now)
                if now >= next_stats:
                    # Messaging counters (losses) go to the broker for its status, at most
                    # once per interval and only when they changed.
                    stats = self.messaging.stats_if_changed()
                    if stats is not None:
                        channel.send(Heartbeat(stats=stats))
                        self._last_sent = now
                        next_stats = now + self._heartbeat_interval_s
            expiry_s = self._heartbeat_interval_s * self._heartbeat_liveness
            if now - self._last_heard > expiry_s:
                # Read what is waiting first: a stall of this process (not the broker's
                # silence) can leave the broker's messages unread past the expiry.
                channel.read_now()
                now = loop.time()
            if now - self._last_heard > expiry_s:
                if now >= self._next_reconnect and self.status is not AgentState.DRAINING:
                    logger.warning("agent %s: broker silent for %.1f s; reconnecting",
                                   self.agent_id, now - self._last_heard)
                    self._next_reconnect = now + self._reconnect_delay_s
                    self._reconnect_delay_s = min(self._reconnect_delay_s * 2, RECONNECT_MAX_S)
                    channel.reopen()
                    self._register(now - expiry_s)  # keep counting silence from here
                continue
            if now - self._last_sent >= self._heartbeat_interval_s:
                channel.send(Heartbeat())
                self._last_sent = now

    # ------------------------------------------------------------ messages

    def _on_message(self, msg: Message) -> None:
        self._last_heard = asyncio.get_running_loop().time()
        match msg:
            case Dispatch(tasks):
                start = self._start
                for assignment in tasks:
                    start(assignment)
            case Ack(ids):
                unacked = self._unacked
                for task_id in ids:
                    unacked.pop(task_id, None)
            case Direct():
                self.messaging.on_direct(msg)
            case DirectVerdict():
                self.messaging.on_verdict(msg)
            case Heartbeat():
                pass
            case Welcome():
                self._on_welcome(msg)
            case Cancel(ids):
                self._cancel(ids)
            case Disconnect(reason):
                self._on_disconnect(reason)
            case Error(code, message):
                logger.warning("agent %s: broker error %s: %s", self.agent_id, code, message)
            case _:
                logger.warning("agent %s: unexpected %s from broker", self.agent_id,
                               type(msg).__name__)

    def _on_welcome(self, msg: Welcome) -> None:
        first = not self._registered_event.is_set()
        self._heartbeat_interval_s = msg.heartbeat_interval_s
        self._heartbeat_liveness = msg.heartbeat_liveness
        self.endpoints = msg.endpoints
        self.messaging.set_endpoints(msg.endpoints)
        self.messaging.report_again()
        self._reconnect_delay_s = RECONNECT_MIN_S
        if self.status is not AgentState.DRAINING:
            self.status = AgentState.READY
        if self._unacked:
            # Results sent before a reconnect may have been lost on the way: send again;
            # the broker drops the ones it already has.
            self._send_again(list(self._unacked.values()))
            self._flush()
        if first:
            self._registered_event.set()
            logger.info("agent %s registered with %s", self.agent_id, self.broker_url)
        else:
            logger.info("agent %s registered again", self.agent_id)

    def _on_disconnect(self, reason: str) -> None:
        if reason == ErrorCode.NOT_REGISTERED.value and self.status is not AgentState.DRAINING:
            # The broker does not know us (it restarted): register again.
            self._register(asyncio.get_running_loop().time())
        elif reason == "broker_stopping":
            logger.info("agent %s: broker is stopping; will register when it is back",
                        self.agent_id)
            self.status = AgentState.REGISTERING

    # ------------------------------------------------------------ execution

    def _start(self, assignment: Assignment) -> None:
        """Run ``execute`` up to its first suspension, and the rest in an asyncio Task
        (created here, with the current task set, so that its context keeps it)."""
        task_id = assignment[0]
        if task_id in self._running:
            return  # a duplicate dispatch of a task already running here
        if self._unacked:
            done = self._unacked.get(task_id)
            if done is not None and done[1] == _SUCCEEDED:
                # Done here already and the broker did not hear it: the answer, not a rerun.
                self._send_again([done])
                return
        token = _current_task.set(task_id)
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
            _current_task.reset(token)
        self._running[task_id] = runner
        self._started.append(task_id)
        self._idle_event.clear()

    async def _finish_later(self, task_id: str, coro: Coroutine[Any, Any, Any], first: Any,
                            started: float) -> None:
        try:
            outcome = await _Resume(coro, first)
        except BaseException as e:  # noqa: BLE001 - including cancellation by the broker
            outcome = e
        self._running.pop(task_id, None)
        self._subtask_counts.pop(task_id, None)
        self._complete(task_id, outcome, started)
        if not self._running:
            self._idle_event.set()
        if self._channel is not None:
            self._channel.request_flush()

    def _complete(self, task_id: str, outcome: Any, started: float) -> None:
        run_ms = (time.perf_counter() - started) * 1000.0
        if type(outcome) is Result and not outcome.extras and outcome.status == _SUCCEEDED:
            # The common case, kept short: a plain successful result.
            item = _new_result((task_id, outcome.status, outcome.to_payload(), None, None, None,
                                0, None, run_ms, None))
            if len(item[2]) <= MAX_FRAME_BYTES:
                self.tasks_done += 1
                self._unacked[task_id] = item
                self._outgoing.append(item)
                return
        if isinstance(outcome, BaseException):
            if isinstance(outcome, asyncio.CancelledError):
                item = ResultItem(task_id, TaskStatus.CANCELLED.value, b"",
                                  ErrorCode.CANCELLED.value, "cancelled on the agent",
                                  run_ms=run_ms)
            else:
                kind = type(outcome).__name__
                item = ResultItem(task_id, TaskStatus.FAILED.value,
                                  Result(None, 0.0, error_type=kind).to_payload(),
                                  ErrorCode.AGENT_ERROR.value, f"{kind}: {outcome}", run_ms=run_ms,
                                  retryable=False if isinstance(outcome, PermanentFailure)
                                  else None)
                if not isinstance(outcome, Exception):
                    raise outcome  # KeyboardInterrupt, SystemExit: not the task's business
            self.tasks_failed += 1
        else:
            result = outcome if isinstance(outcome, Result) else Result(outcome)
            try:
                payload = result.to_payload()
            except Exception as e:  # noqa: BLE001 - an unencodable result fails its task
                result = Result.failure(ErrorCode.AGENT_ERROR.value,
                                        f"result is not msgpack-encodable: {e}")
                payload = result.to_payload()
            if len(payload) > MAX_FRAME_BYTES:
                result = Result.failure(ErrorCode.TOO_LARGE.value,
                                        f"result of {len(payload)} bytes exceeds "
                                        f"{MAX_FRAME_BYTES} bytes")
                payload = result.to_payload()
            error = result.error
            item = ResultItem(task_id, result.status, payload,
                              None if error is None else error.code,
                              None if error is None else error.message, run_ms=run_ms,
                              retryable=result.retryable)
            if result.ok:
                self.tasks_done += 1
            else:
                self.tasks_failed += 1
        self._unacked[task_id] = item
        self._outgoing.append(item)

    def _cancel(self, ids: list[str]) -> None:
        for task_id in ids:
            runner = self._running.get(task_id)
            if runner is not None:
                runner.cancel()
            elif task_id in self._unacked:
                # Finished here, and the broker asks again: the result was lost on the way.
                self._send_again([self._unacked[task_id]])
            else:
                # Never reached us (or long gone): answer so the broker frees the slot.
                self._outgoing.append(ResultItem(task_id, TaskStatus.CANCELLED.value, b"",
                                                 ErrorCode.CANCELLED.value,
                                                 "not running on the agent"))
        if self._channel is not None:
            self._channel.request_flush()

    def _flush(self) -> None:
        channel = self._channel
        if channel is None:
            return
        if self._started:
            started, self._started = self._started, []
            channel.send(Progress(started=started))
        if self._outgoing:
            batch, self._outgoing = self._outgoing, []
            now = asyncio.get_running_loop().time()
            for part in chunks(batch):
                channel.send(Results(part))
            self._sent_log.append((now, [item[0] for item in batch]))
            self._last_sent = now

    def _send_again(self, kept: list[ResultItem]) -> None:
        """Queue kept (unacknowledged) results for the next flush, unless already queued."""
        queued = {item[0] for item in self._outgoing}
        self._outgoing.extend(item for item in kept if item[0] not in queued)

    def _resend_unacked(self, now: float) -> None:
        """Send again results the broker has not acknowledged for a while: a message
        sent just before a partition is lost without an error (the broker drops the
        duplicates)."""
        resend_after_s = self._heartbeat_interval_s * self._heartbeat_liveness
        log = self._sent_log
        unacked = self._unacked
        again: list[ResultItem] = []
        while log and now - log[0][0] > resend_after_s:
            _, ids = log.popleft()
            again.extend(unacked[task_id] for task_id in ids if task_id in unacked)
        if again:
            logger.info("agent %s: sending %d unacknowledged result(s) again", self.agent_id,
                        len(again))
            self._send_again(again)
            self._flush()

