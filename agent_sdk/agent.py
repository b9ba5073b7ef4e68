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

How ``execute`` fails decides what the broker does next:

- :class:`~agent_sdk.errors.RetryableError`, or an instance of a class in the agent's
  ``retry_on`` (a timeout of a service the agent calls, say), is a transient fault: the
  task is retried after a back-off while its retries last (the broker's default is 3),
  and the failure counts against this agent's circuit breaker.
  ``Result.failure(code, message, retryable=True)`` says the same without raising;
- :class:`~agent_sdk.errors.PermanentFailure` is never retried;
- any other exception (a ``ValueError`` on bad input) is taken for the task's own
  failure: retried only if the task asked for retries (``submit(retries=N)``),
  otherwise run once more on another agent of the same capabilities, when there is
  one; only if it succeeds there does the failure count against this agent.

The broker refuses a READY whose name, agent id or a capability is empty, over 256
characters or not printable; the SDK checks the same when the agent is built
(:class:`~agent_sdk.errors.InvalidName`). A refusal by the broker (of the READY, or of
the SDK's protocol version) ends ``run`` with :class:`~agent_sdk.errors.RegistrationRefused`
or :class:`~agent_sdk.errors.VersionMismatch` instead of registering again and again.

Agents also talk to each other (:mod:`agent_sdk.messaging`): ``publish`` / ``subscribe``
on the bus, ``send`` / ``request`` / ``receive`` / ``on_message`` for direct messages, and
``await self.submit(...)`` inside ``execute`` to hand a subtask to another agent and get
its result.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import signal
from collections.abc import Iterable
from typing import Any, Final

from wire.tasks import (
    Ack, Cancel, Direct, DirectVerdict, Disconnect, Dispatch, Error, ErrorCode, Heartbeat,
    Message, Ping, Ready, Welcome,
)
from agent_sdk.client import Client
from agent_sdk.config import broker_url
from agent_sdk.connection import (
    Connection, TASK_CODEC, Transport,
)
from agent_sdk.health import HealthResponder
from agent_sdk.upkeep import AgentState, BrokerLink
from agent_sdk.errors import (
    OrchestratorError, RegistrationRefused, StateUnavailable, VersionMismatch,
)
from agent_sdk.messaging import MAILBOX_SIZE, MessagingMixin, Messenger
from agent_sdk.names import check_names, new_agent_id
from agent_sdk.runner import TaskRunner
from agent_sdk.state import endpoint_from, StateClient
from agent_sdk.task import _MISSING, Result, Task
from wire.sockets import reachable_endpoints
from wire.tracing import init_tracing, shutdown_tracing

logger = logging.getLogger(__name__)

#: How long a graceful stop waits for running tasks.
STOP_DRAIN_S: Final = 30.0
#: ERROR codes that answer a READY the broker will not accept as it is: a name, id or
#: capability it refuses; over its cap of agents (per address, or in all).
REGISTRATION_REFUSALS: Final = frozenset({ErrorCode.BAD_REQUEST.value, "too_many_agents"})


def refusal(error: Error, url: str, registering: bool) -> OrchestratorError | None:
    """The error that ends an agent for the broker's ERROR ``error``, or None.

    The broker refuses for good a peer of another protocol version (``bad_version``, at
    any time), and, answering a READY (while ``registering``: an ERROR for no request
    and no task), a name it refuses or an agent over its cap. Registering again would
    only be refused again.
    """
    if error.code == ErrorCode.BAD_VERSION.value:
        return VersionMismatch(url, error.message)
    if registering and error.req is None and not error.task_ids and \
            error.code in REGISTRATION_REFUSALS:
        return RegistrationRefused(url, error.code, error.message)
    return None


class BaseAgent(MessagingMixin, abc.ABC):
    """Base class of every agent.

    The agent's connection with the broker (registration, heartbeats, reconnects) is
    here; running the tasks and keeping their results is its
    :class:`~agent_sdk.runner.TaskRunner`'s.

    Failures decide retries (more in the module's text): raise
    :class:`~agent_sdk.errors.RetryableError` (or a class in ``retry_on``) for a transient
    fault, retried and counted against this agent's circuit breaker;
    :class:`~agent_sdk.errors.PermanentFailure` for one never retried. Any other exception
    is the task's own failure: retried only if the task asked for retries, else tried
    once on another agent of the same capabilities.

    Args:
        name: the agent type; tasks may ask for it by name, and replicas share it.
        capabilities: what it can do; a task goes only to agents having all it requires.
        max_concurrent: most tasks running at once (the broker never sends more).
        agent_id: unique id of this instance (default: ``name-<random>``).
        retry_on: exception classes of ``execute`` that are transient faults.

    Names, ids and capabilities are 1 to 256 printable characters, else InvalidName.
    """

    #: default for ``max_concurrent`` when the constructor is not given one
    max_concurrent: int = 16
    #: direct messages kept for ``receive`` (or in handlers) before more are dropped
    mailbox_size: int = MAILBOX_SIZE
    #: exception classes of ``execute`` reported as transient faults (retried)
    retry_on: tuple[type[BaseException], ...] = ()
    #: on stop, how long running tasks may finish before the rest are handed back to the
    #: broker (which runs them elsewhere without using a retry)
    drain_timeout_s: float = STOP_DRAIN_S

    def __init__(self, name: str, capabilities: Iterable[str] = (), *,
                 max_concurrent: int | None = None, agent_id: str | None = None,
                 retry_on: Iterable[type[BaseException]] | None = None) -> None:
        self.name = name
        self.capabilities = tuple(dict.fromkeys(capabilities))
        if max_concurrent is not None:
            self.max_concurrent = max_concurrent
        if self.max_concurrent < 1:
            raise ValueError("max_concurrent must be at least 1")
        self.agent_id = agent_id if agent_id is not None else new_agent_id(name)
        check_names(name, self.agent_id, self.capabilities)
        if retry_on is not None:
            self.retry_on = tuple(retry_on)
        #: where the agent stands with the broker (``self.state`` is the shared state)
        self.status = AgentState.STARTING
        self.broker_url = ""
        self.endpoints: dict[str, str] = {}
        self._channel: Transport[Message] | None = None
        self._task_runner = TaskRunner(self.execute, self.retry_on)
        self._task_runner.identity = (name, self.agent_id)
        self._health = HealthResponder(self.ping, self._task_runner.running_ages,
                                       self._send_if_connected)
        self._link = BrokerLink(self)
        self._stop_event = asyncio.Event()
        #: set once the broker accepted the agent, or refused it for good (``_refusal``)
        self._registered_event = asyncio.Event()
        self._refusal: OrchestratorError | None = None
        self._shared_state: StateClient | None = None
        #: pub/sub and direct messages (the methods of MessagingMixin use it)
        self.messaging = Messenger(lambda: self.agent_id, self._send_message,
                                   self._bus_endpoints, mailbox_size=self.mailbox_size,
                                   started=lambda: self._channel is not None)
        #: the connection subtasks are submitted on, opened by the first ``submit``
        self._subtasks: Client | None = None

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
        """Health of this agent: the broker's health checks call it about once a
        heartbeat interval, and the agent gets new tasks only while it says ``"ok":
        True``. Override to check what the agent needs (a model loaded, a database
        reachable): return ``{"ok": False, "detail": "why"}`` or raise to report a
        problem; a call that hangs leaves the agent UNRESPONSIVE. Keep it fast."""
        return {"ok": self.status is not AgentState.STOPPED, "id": self.agent_id,
                "name": self.name,
                "state": self.status.value, "running": len(self._task_runner.running),
                "done": self.tasks_done, "failed": self.tasks_failed}

    @property
    def _running(self) -> dict[str, asyncio.Task[Any] | None]:
        """The tasks running as asyncio Tasks, by id (under the name agents written for
        earlier releases read)."""
        return self._task_runner.running

    @property
    def tasks_done(self) -> int:
        """Tasks that ended succeeded on this agent."""
        return self._task_runner.tasks_done

    @property
    def tasks_failed(self) -> int:
        """Tasks that ended otherwise on this agent."""
        return self._task_runner.tasks_failed

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
        await self.wait_registered()
        return endpoint_from(self.endpoints, f"the broker at {self.broker_url}")

    # ------------------------------------------------------------ messaging, subtasks

    def _send_message(self, msg: Message) -> None:
        channel = self._channel
        if channel is None or channel.closed:
            raise OrchestratorError(f"agent {self.agent_id} is not connected: messages can "
                                    "be sent once it runs (run, async_run)")
        channel.send(msg)

    def _send_if_connected(self, msg: Message) -> None:
        channel = self._channel
        if channel is not None and not channel.closed:
            channel.send(msg)

    async def _bus_endpoints(self) -> dict[str, str]:
        await self.wait_registered()
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
        parent, task_id = self._task_runner.subtask_ids(parent_id, task_id)
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
        """Serve tasks on the running loop until :meth:`stop` is called, or until the
        broker refuses the agent (:exc:`RegistrationRefused`, :exc:`VersionMismatch`)."""
        loop = asyncio.get_running_loop()
        check_names(self.name, self.agent_id, self.capabilities)
        self.broker_url = broker or broker_url()
        # Spans only for tasks that arrive with a traceparent; nothing when off.
        init_tracing(f"agent {self.name}")
        await self.on_start()
        channel = self._channel = Connection(self.broker_url, self.agent_id.encode(),
                                             TASK_CODEC, self._on_message, self._task_runner.flush,
                                             monitor=True, on_event=self._link.link_event)
        self._task_runner.channel = channel
        channel.open()
        self._link.register(loop.time())
        heartbeats = asyncio.create_task(self._link.heartbeat_loop(),
                                         name=f"{self.agent_id}-heartbeat")
        try:
            await self._stop_event.wait()
            if self._refusal is None:
                await self._drain_and_leave(channel)
        finally:
            heartbeats.cancel()
            self._health.close()
            await asyncio.gather(heartbeats, return_exceptions=True)
            self._task_runner.cancel_all()
            channel.close()
            self.status = AgentState.STOPPED
            await self._close_owned()
            shutdown_tracing()  # flush this agent's spans before the process ends
        if self._refusal is not None:
            raise self._refusal

    async def _close_owned(self) -> None:
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
        """Return once the broker has accepted this agent's registration; raise
        :exc:`RegistrationRefused` or :exc:`VersionMismatch` if it refused it."""
        await asyncio.wait_for(self._registered_event.wait(), timeout)
        if self._refusal is not None:
            raise self._refusal

    async def _drain_and_leave(self, channel: Transport[Message]) -> None:
        self.status = AgentState.DRAINING
        channel.send(Disconnect("draining"))
        handed_back: list[str] = []
        try:
            await asyncio.wait_for(self._task_runner.idle.wait(), self.drain_timeout_s)
        except asyncio.TimeoutError:
            handed_back = self._task_runner.hand_back()
            logger.warning("agent %s drained for %g s and hands %d unfinished task(s) back "
                           "to the broker (they run again elsewhere, without using a retry)",
                           self.agent_id, self.drain_timeout_s, len(handed_back))
        self._task_runner.flush()
        channel.send(Disconnect("bye", handed_back))

    # ------------------------------------------------------------ messages

    def _on_message(self, msg: Message) -> None:
        match msg:
            case Dispatch(tasks):
                start = self._task_runner.start
                for assignment in tasks:
                    start(assignment)
            case Ack(ids):
                self._task_runner.ack(ids)
            case Direct():
                self.messaging.on_direct(msg)
            case DirectVerdict():
                self.messaging.on_verdict(msg)
            case Heartbeat():
                pass
            case Ping():
                self._health.on_ping(msg)
            case Welcome():
                self._on_welcome(msg)
            case Cancel(ids):
                self._task_runner.cancel(ids)
            case Disconnect(reason):
                self._on_disconnect(reason)
            case Error():
                self._on_error(msg)
            case _:
                logger.warning("agent %s: unexpected %s from broker", self.agent_id,
                               type(msg).__name__)

    def _on_welcome(self, msg: Welcome) -> None:
        first = not self._registered_event.is_set()
        self._link.welcomed(msg.heartbeat_interval_s, msg.heartbeat_liveness)
        if msg.limits is not None:
            # The broker's size limits: results, direct and bus messages bigger than
            # them are refused here (too_large), never dropped by libzmq on the way.
            if self._channel is not None:
                self._channel.adopt_limits(msg.limits)
            frame_limit = msg.limits.get("max_message_bytes", self._task_runner.max_frame_bytes)
            self._task_runner.max_frame_bytes = self.messaging.bus.max_frame_bytes = frame_limit
        self.endpoints = reachable_endpoints(msg.endpoints, self.broker_url)
        self.messaging.set_endpoints(self.endpoints)
        self.messaging.report_again()
        if self.status is not AgentState.DRAINING:
            self.status = AgentState.READY
        self._task_runner.resend_unacked()
        if first:
            self._registered_event.set()
            logger.info("agent %s registered with %s", self.agent_id, self.broker_url,
                        extra={"agent_id": self.agent_id, "event": "registered"})
        else:
            logger.info("agent %s registered again", self.agent_id)

    def _on_error(self, error: Error) -> None:
        """A refusal of the agent (see :func:`refusal`) ends it; others are logged."""
        refused = refusal(error, self.broker_url, self.status is AgentState.REGISTERING)
        if refused is None:
            logger.warning("agent %s: broker error %s: %s", self.agent_id, error.code,
                           error.message)
        elif self._refusal is None:
            self._refusal = refused
            self._registered_event.set()
            self._stop_event.set()

    def _on_disconnect(self, reason: str) -> None:
        if reason == ErrorCode.NOT_REGISTERED.value and self.status is not AgentState.DRAINING:
            # The broker does not know us (it restarted): register again.
            self._link.register(asyncio.get_running_loop().time())
        elif reason == "broker_stopping":
            logger.info("agent %s: broker is stopping; will register when it is back",
                        self.agent_id)
            self.status = AgentState.REGISTERING


__all__ = ["AgentState", "BaseAgent"]
