"""``Client`` (asyncio) and ``SyncClient`` (blocking): submit tasks and get results.

::

    async with Client("tcp://127.0.0.1:5555") as client:
        handle = client.submit(capabilities=["code_review"], data={"code": source})
        result = await handle.result(timeout=30)

``submit`` returns at once; submits made in the same loop iteration leave in one
message, and results come back in batches, so one client connection carries thousands
of tasks in flight.

A client messages agents as agents do (:mod:`agent_sdk.messaging`): ``publish`` /
``subscribe`` on the bus, ``send`` / ``request`` / ``receive`` / ``on_message`` for direct
messages; agents reach it by its ``client_id``.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import uuid
from collections.abc import Iterable
from typing import Any, Callable

from broker.config import broker_url
from wire.errors import TooLarge
from wire.codec import chunks
from wire.limits import MAX_FRAME_BYTES
from wire.tasks import (
    Accepted, Cancel, Direct, DirectVerdict, Disconnect, Error, ErrorCode, Fetch, Heartbeat,
    Message, Results, StatusReply, StatusRequest, Submit, TaskList, TaskQuery, TaskSpec,
    TaskStatus,
)
from agent_sdk.errors import BrokerUnavailable, RequestRefused, TaskNotFound, WaitTimeout
from agent_sdk.messaging import (
    MAILBOX_SIZE, SUBSCRIBE_TIMEOUT_S, DirectMessage, MessagingMixin, Messenger, Subscription,
)
from agent_sdk.task import _MISSING, TERMINAL_STATUSES, Result, encode_payload
from agent_sdk.state import StateClient, endpoint_from
from agent_sdk.transport import Channel

_new_tuple = tuple.__new__

#: How long status() waits for the broker by default.
STATUS_TIMEOUT_S = 5.0
#: While tasks are open the client pings this often (and notices a broker restart).
PING_INTERVAL_S = 1.0
#: A task not yet accepted, or without a result, this long after it was last sent is
#: submitted (or asked for) again: messages sent into a partition are lost silently.
RECOVER_AFTER_S = 5.0


def _expire_waiter(waiter: asyncio.Future[Any]) -> None:
    if not waiter.done():
        waiter.set_exception(asyncio.TimeoutError())


class TaskHandle:
    """A submitted task: await its result, check it, cancel it.

    The result is kept on the handle; an asyncio future exists only once somebody awaits
    it, and :meth:`add_done_callback` callbacks run as soon as the result is in: a client
    with thousands of tasks in flight pays for neither when it does not use them.
    """

    __slots__ = ("id", "_client", "_result", "_waiters", "_callbacks", "_accepted",
                 "_accepted_waiter", "_spec", "_sent_at")

    def __init__(self, task_id: str, client: Client, spec: TaskSpec | None = None,
                 sent_at: float = 0.0) -> None:
        self.id = task_id
        self._client = client
        self._result: Result | None = None
        #: one future per pending awaiter, resolved with the result (a waiter that times
        #: out or is cancelled takes only its own future with it)
        self._waiters: list[asyncio.Future[Result]] | None = None
        self._callbacks: list[Callable[[TaskHandle], Any]] | None = None
        self._accepted = False
        self._accepted_waiter: asyncio.Future[None] | None = None
        #: what was submitted, kept until the result is in, to submit it again when the
        #: broker may have lost it (it restarted, or the SUBMIT was lost on the way)
        self._spec = spec
        #: loop time of the last SUBMIT or FETCH for it
        self._sent_at = sent_at

    def done(self) -> bool:
        return self._result is not None

    @property
    def accepted(self) -> bool:
        """True once the broker confirmed it holds the task."""
        return self._accepted

    def result_nowait(self) -> Result:
        """The result of a finished task (see :meth:`done`).

        Raises:
            asyncio.InvalidStateError: the task has not finished.
        """
        if self._result is None:
            raise asyncio.InvalidStateError(f"task {self.id} has not finished")
        return self._result

    def _new_waiter(self) -> asyncio.Future[Result]:
        waiter: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = [waiter]
        else:
            self._waiters.append(waiter)
        return waiter

    def _drop_waiter(self, waiter: asyncio.Future[Result]) -> None:
        if self._waiters is not None and waiter in self._waiters:
            self._waiters.remove(waiter)

    async def result(self, timeout: float | None = None) -> Result:
        """The task's final :class:`Result` (any terminal status: check ``result.ok``).

        Raises:
            WaitTimeout: when ``timeout`` seconds pass first; the task itself goes on.
        """
        if self._result is not None:
            return self._result
        # A future of its own and a plain timer, rather than wait_for(shield(...)): the
        # result then wakes the caller in one loop iteration instead of three.
        waiter = self._new_waiter()
        timer = None
        if timeout is not None:
            timer = asyncio.get_running_loop().call_later(timeout, _expire_waiter, waiter)
        try:
            return await waiter
        except asyncio.TimeoutError:
            raise WaitTimeout(f"task {self.id} has no result after {timeout:g} s") from None
        finally:
            if timer is not None:
                timer.cancel()
            self._drop_waiter(waiter)

    async def wait_accepted(self, timeout: float | None = None) -> None:
        """Return once the broker confirmed it holds the task (or it already ended)."""
        if self._accepted or self._result is not None:
            return
        if self._accepted_waiter is None:
            self._accepted_waiter = asyncio.get_running_loop().create_future()
        waiter = self._accepted_waiter
        finished = self._new_waiter()
        try:
            either: list[asyncio.Future[Any]] = [waiter, finished]
            done, _ = await asyncio.wait(either, timeout=timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._drop_waiter(finished)
        if not done:
            raise WaitTimeout(f"the broker did not confirm task {self.id} within {timeout:g} s")

    def add_done_callback(self, callback: Callable[[TaskHandle], Any]) -> None:
        """Call ``callback(handle)`` once the result is in, on the client's loop: right
        when it arrives (keep it short and non-blocking), or soon if it already has.
        An exception in it goes to the loop's exception handler."""
        if self._result is not None:
            asyncio.get_running_loop().call_soon(self._run_callback, callback)
        elif self._callbacks is None:
            self._callbacks = [callback]
        else:
            self._callbacks.append(callback)

    async def cancel(self) -> None:
        """Ask the broker to cancel the task; the result then says ``cancelled``."""
        await self._client.cancel(self.id)

    def __await__(self):  # type: ignore[no-untyped-def]
        return self.result().__await__()

    def _resolve(self, result: Result) -> None:
        """The result is in (the client calls this once per task)."""
        if self._result is not None:
            return
        self._result = result
        waiters = self._waiters
        if waiters is not None:
            self._waiters = None
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(result)
        callbacks = self._callbacks
        if callbacks is not None:
            self._callbacks = None
            for callback in callbacks:
                self._run_callback(callback)

    def _run_callback(self, callback: Callable[[TaskHandle], Any]) -> None:
        try:
            callback(self)
        except Exception as e:  # noqa: BLE001 - a user callback must not stop the client
            asyncio.get_running_loop().call_exception_handler({
                "message": f"exception in a done callback of task {self.id}",
                "exception": e, "handle": self})

    def _mark_accepted(self) -> None:
        self._accepted = True
        waiter = self._accepted_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def __repr__(self) -> str:
        state = "done" if self.done() else ("accepted" if self._accepted else "sent")
        return f"TaskHandle({self.id!r}, {state})"


class Client(MessagingMixin):
    """An asyncio client of the broker.

    Args:
        broker: broker URL (default ``$ORCH_BROKER`` or ``tcp://127.0.0.1:5555``).
        client_id: routing id; keep it to get results of earlier submits pushed to you.
        default_timeout_s: task timeout when ``submit`` names none (the broker's if None).
        state_url: the state service for :attr:`state` (default: the one the broker
            announces in its status).
        mailbox_size: direct messages kept for ``receive`` before more are dropped.
    """

    def __init__(self, broker: str | None = None, *, client_id: str | None = None,
                 default_timeout_s: float | None = None, state_url: str | None = None,
                 mailbox_size: int = MAILBOX_SIZE) -> None:
        self.url = broker or broker_url()
        self.client_id = client_id or f"client-{uuid.uuid4().hex[:12]}"
        self.default_timeout_s = default_timeout_s
        self._channel: Channel | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handles: dict[str, TaskHandle] = {}
        self._outgoing: list[TaskSpec] = []
        self._requests: dict[int, asyncio.Future[Any]] = {}
        self._peeks: dict[str, list[asyncio.Future[Result]]] = {}
        self._req_ids = itertools.count(1)
        self._task_ids = itertools.count(1)
        self._pinger: asyncio.Task[None] | None = None
        #: the broker's boot id as last heard
        self._boot: str | None = None
        self._state_url = state_url
        self._shared_state: StateClient | None = None
        #: pub/sub and direct messages (the methods of MessagingMixin use it)
        self.messaging = Messenger(lambda: self.client_id, self._send_message,
                                   self._bus_endpoints, mailbox_size=mailbox_size)

    # ------------------------------------------------------------------ lifecycle

    async def connect(self) -> Client:
        """Open the connection (submit and the requests do it on first use)."""
        self._ensure_open()
        return self

    def _ensure_open(self) -> Channel:
        if self._channel is None:
            self._loop = asyncio.get_running_loop()
            self._channel = Channel(self.url, self.client_id.encode(), self._on_message,
                                    self._flush)
            self._channel.open()
            self._pinger = self._loop.create_task(self._ping_loop(),
                                                  name=f"{self.client_id}-ping")
        return self._channel

    @property
    def state(self) -> StateClient:
        """Shared state (versioned keys, CAS, ``update``, locks, watches) on the state
        service; see :class:`agent_sdk.state.StateClient`."""
        if self._shared_state is None:
            self._shared_state = StateClient(self._state_url or self._state_endpoint,
                                             name=self.client_id)
        return self._shared_state

    async def _state_endpoint(self) -> str:
        status = await self.status()
        return endpoint_from(status.get("broker", {}).get("endpoints"),
                             f"the broker at {self.url}")

    def _send_message(self, msg: Message) -> None:
        self._ensure_open().send(msg)

    async def _bus_endpoints(self) -> dict[str, str]:
        status = await self.status()
        return dict(status.get("broker", {}).get("endpoints") or {})

    async def close(self) -> None:
        """Send what is queued and close; pending handles stay unresolved."""
        await self.messaging.close()
        if self._shared_state is not None:
            await self._shared_state.close()
            self._shared_state = None
        if self._pinger is not None:
            self._pinger.cancel()
            await asyncio.gather(self._pinger, return_exceptions=True)
            self._pinger = None
        if self._channel is not None:
            self._flush()
            self._channel.close()
            self._channel = None

    async def _ping_loop(self) -> None:
        """While tasks are open: ping the broker, learn its boot id, and recover what a
        restarted broker or a lossy link may have dropped."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(PING_INTERVAL_S)
            channel = self._channel
            if channel is None:
                return
            self.messaging.expire(loop.time())
            if not self._handles:
                continue
            channel.send(Heartbeat(role="client"))
            now = loop.time()
            resubmit: list[TaskSpec] = []
            refetch: list[str] = []
            for handle in self._handles.values():
                if now - handle._sent_at < RECOVER_AFTER_S:
                    continue
                handle._sent_at = now
                if handle._spec is not None and not handle._accepted:
                    resubmit.append(handle._spec)
                else:
                    refetch.append(handle.id)
            self._send_again(resubmit, refetch)

    def _send_again(self, specs: list[TaskSpec], watched: list[str]) -> None:
        """Submit again (idempotent by task id) and ask again for results: whatever the
        broker still has is answered once, whatever it lost is run again."""
        channel = self._channel
        if channel is None:
            return
        for part in chunks(specs):
            channel.send(Submit(part))
        for part in chunks(watched):
            channel.send(Fetch(next(self._req_ids), part, wait=True))

    def _on_boot(self, boot: str) -> None:
        if self._boot is not None and boot != self._boot and self._handles:
            # The broker restarted: it kept what it journaled; send everything open again.
            specs = [h._spec for h in self._handles.values() if h._spec is not None]
            watched = [h.id for h in self._handles.values() if h._spec is None]
            self._send_again(specs, watched)
        self._boot = boot

    async def __aenter__(self) -> Client:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ tasks

    def submit(self, text: str | None = None, *, capabilities: Iterable[str] = (),
               agent: str | None = None, data: Any = _MISSING, task_id: str | None = None,
               timeout: float | None = None, retries: int | None = None, priority: int = 0,
               parent_id: str | None = None, **fields: Any) -> TaskHandle:
        """Queue a task for the broker; returns its handle at once.

        Args:
            text: free text of the task (becomes the ``text`` field).
            capabilities: every capability the agent must have.
            agent: an agent name (or id) the task must go to.
            data: the payload (``task.data`` on the agent); other keywords become fields.
            task_id: the idempotency key; submitting the same id again gives the same task.
            timeout: seconds the task may wait and run before it ends ``timed_out``.
            retries: retries after failures (per the broker's retry policy).
            priority: higher runs first among waiting tasks.
            parent_id: the task this one is a subtask of.
        """
        channel = self._channel or self._ensure_open()
        if task_id is None:
            task_id = f"{self.client_id}-{next(self._task_ids)}"
        else:
            handle = self._handles.get(task_id)
            if handle is not None:
                return handle
        if text is not None:
            fields["text"] = text
        caps = (capabilities,) if isinstance(capabilities, str) else tuple(capabilities)
        payload = encode_payload(data, fields)
        if len(payload) > MAX_FRAME_BYTES:
            # Refused here, not on the way out: the caller hears it, and no handle waits
            # for a task that never left.
            raise TooLarge(len(payload), MAX_FRAME_BYTES)
        spec = _new_tuple(TaskSpec, (
            task_id, payload, caps, agent, priority,
            timeout if timeout is not None else self.default_timeout_s, retries, parent_id))
        loop = self._loop
        assert loop is not None  # set by _ensure_open
        handle = TaskHandle(task_id, self, spec, loop.time())
        handles = self._handles
        handles[task_id] = handle
        if not self._outgoing:
            if len(handles) == 1:
                # Nothing else in flight: no batch to wait for, and sending now saves
                # the loop iteration a flush would take (a latency-bound caller waits
                # on every one of them).
                channel.send(Submit([spec]))
                return handle
            channel.request_flush()
        self._outgoing.append(spec)
        return handle

    def watch(self, task_id: str) -> TaskHandle:
        """A handle for a task submitted earlier (by this or another client): its result
        is delivered here when it finishes, or now if it already has."""
        channel = self._ensure_open()
        handle = self._handles.get(task_id)
        if handle is None:
            handle = TaskHandle(task_id, self)
            handle._accepted = True
            self._handles[task_id] = handle
        channel.send(Fetch(next(self._req_ids), [task_id], wait=True))
        return handle

    async def fetch(self, task_id: str, timeout: float = STATUS_TIMEOUT_S) -> Result:
        """The task's result if it finished, else its current state (``result.finished``
        is False then).

        Raises:
            TaskNotFound: the broker knows no such task.
            BrokerUnavailable: no answer within ``timeout``.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Result] = loop.create_future()
        self._peeks.setdefault(task_id, []).append(future)
        req = next(self._req_ids)
        self._requests[req] = future
        self._ensure_open().send(Fetch(req, [task_id], wait=False))
        try:
            return await self._await_answer(future, timeout)
        finally:
            self._requests.pop(req, None)
            peeks = self._peeks.get(task_id)
            if peeks is not None and future in peeks:
                peeks.remove(future)
                if not peeks:
                    del self._peeks[task_id]

    async def cancel(self, task_id: str) -> None:
        """Ask the broker to cancel ``task_id`` (no-op if it already finished)."""
        self._flush()
        self._ensure_open().send(Cancel([task_id]))

    # ------------------------------------------------------------------ status

    async def status(self, timeout: float = STATUS_TIMEOUT_S) -> dict[str, Any]:
        """The broker's status document (agents, queue, task counts).

        Raises:
            BrokerUnavailable: no answer within ``timeout``.
        """
        reply: StatusReply = await self._request(lambda req: StatusRequest(req), timeout)
        return reply.status

    async def tasks(self, statuses: Iterable[str] | None = None, limit: int = 100,
                    timeout: float = STATUS_TIMEOUT_S) -> list[dict[str, Any]]:
        """Finished tasks the broker still retains, newest first; ``statuses`` filters
        (``["failed", "timed_out"]`` lists the dead letters with their last error)."""
        wanted = list(statuses) if statuses is not None else None
        reply: TaskList = await self._request(lambda req: TaskQuery(req, wanted, limit), timeout)
        return reply.tasks

    async def trace(self, task_id: str, timeout: float = STATUS_TIMEOUT_S) -> dict[str, Any]:
        """A task's state, timeline and subtask tree (open or finished).

        Raises:
            TaskNotFound: the broker knows no such task (or it is past retention).
        """
        reply: TaskList = await self._request(
            lambda req: TaskQuery(req, None, 1, [task_id]), timeout)
        document = reply.tasks[0] if reply.tasks else {"status": "unknown"}
        if document.get("status") == "unknown":
            raise TaskNotFound(task_id)
        return document

    async def ping(self, timeout: float = 2.0) -> None:
        """Return if the broker answers within ``timeout``, else raise BrokerUnavailable."""
        await self.status(timeout)

    async def wait_for_agents(self, count: int = 1, capability: str | Iterable[str] | None = None,
                              name: str | None = None, timeout: float = 10.0) -> dict[str, Any]:
        """Wait until ``count`` live agents match; returns the status at that moment.

        Raises:
            WaitTimeout: fewer agents matched when ``timeout`` passed.
            BrokerUnavailable: the broker did not answer.
        """
        caps = [capability] if isinstance(capability, str) else list(capability or [])
        until = {"agents": count, "capability": caps, "name": name}
        reply: StatusReply = await self._request(
            lambda req: StatusRequest(req, until, timeout), timeout + STATUS_TIMEOUT_S)
        if not reply.status.get("met", True):
            raise WaitTimeout(f"fewer than {count} agent(s) matching {until} after {timeout:g} s")
        return reply.status

    async def _request(self, make: Callable[[int], Message], timeout: float) -> Any:
        req = next(self._req_ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._requests[req] = future
        self._ensure_open().send(make(req))
        try:
            return await self._await_answer(future, timeout)
        finally:
            self._requests.pop(req, None)

    async def _await_answer(self, future: asyncio.Future[Any], timeout: float) -> Any:
        try:
            return await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            raise BrokerUnavailable(self.url, timeout) from None

    # ------------------------------------------------------------------ input

    def _flush(self) -> None:
        if self._outgoing and self._channel is not None:
            batch, self._outgoing = self._outgoing, []
            for part in chunks(batch):
                self._channel.send(Submit(part))

    def _on_message(self, msg: Message) -> None:
        match msg:
            case Results(items):
                self._on_results(items)
            case Accepted(ids):
                handles = self._handles
                for task_id in ids:
                    handle = handles.get(task_id)
                    if handle is not None:
                        handle._mark_accepted()
            case StatusReply(req) | TaskList(req):
                future = self._requests.pop(req, None)
                if future is not None and not future.done():
                    future.set_result(msg)
            case Error():
                self._on_error(msg)
            case Heartbeat(boot=boot):
                if boot:
                    self._on_boot(boot)
            case Direct():
                self.messaging.on_direct(msg)
            case DirectVerdict():
                self.messaging.on_verdict(msg)
            case Disconnect():
                pass  # only agents register; a client has nothing to do here

    def _on_results(self, items: list[Any]) -> None:
        handles = self._handles
        peeks = self._peeks
        for item in items:
            task_id = item.task_id
            terminal = item.status in TERMINAL_STATUSES
            handle = handles.pop(task_id, None) if terminal else None
            waiting = peeks.pop(task_id, None) if peeks else None
            if handle is None and waiting is None:
                continue
            result = Result.from_wire(task_id, item.status, item.payload, item.error_code,
                                      item.error_message, item.agent, item.attempts,
                                      item.queued_ms, item.run_ms)
            if handle is not None:
                handle._resolve(result)
            for future in waiting or ():
                if not future.done():
                    future.set_result(result)

    def _on_error(self, error: Error) -> None:
        if error.req is not None and error.req not in self._requests and \
                error.code == ErrorCode.NOT_FOUND.value:
            # A recovery FETCH found nothing: the broker lost the task (no journal).
            lost = [self._handles[i]._spec for i in error.task_ids
                    if i in self._handles and self._handles[i]._spec is not None]
            self._send_again([spec for spec in lost if spec is not None], [])
            return
        if error.req is not None:
            future = self._requests.pop(error.req, None)
            if future is not None and not future.done():
                if error.code == ErrorCode.NOT_FOUND.value:
                    future.set_exception(TaskNotFound(
                        error.task_ids[0] if error.task_ids else "", error.message))
                else:
                    future.set_exception(RequestRefused(error.code, error.message))
            return
        for task_id in error.task_ids:
            # Refused submits (queue_full, shutting_down) end as rejected results.
            handle = self._handles.pop(task_id, None)
            if handle is not None and not handle.done():
                result = Result.failure(error.code, error.message, TaskStatus.REJECTED.value)
                result.task_id = task_id
                handle._resolve(result)


class SyncTaskHandle:
    """Blocking view of a :class:`TaskHandle`."""

    def __init__(self, handle: TaskHandle, client: SyncClient) -> None:
        self._handle = handle
        self._client = client
        self.id = handle.id

    def result(self, timeout: float | None = None) -> Result:
        return self._client._call(self._handle.result(timeout))

    def done(self) -> bool:
        return self._handle.done()

    def result_nowait(self) -> Result:
        """The result of a finished task (see :meth:`done`)."""
        return self._handle.result_nowait()

    def add_done_callback(self, callback: Callable[[SyncTaskHandle], Any]) -> None:
        """Call ``callback(handle)`` once the result is in. It runs on the client's
        background thread: keep it short, and guard what it shares with yours."""
        self._client._loop.call_soon_threadsafe(
            self._handle.add_done_callback, lambda _: callback(self))

    def cancel(self) -> None:
        self._client._call(self._handle.cancel())

    def wait_accepted(self, timeout: float | None = None) -> None:
        self._client._call(self._handle.wait_accepted(timeout))


class SyncClient:
    """The :class:`Client` API as blocking calls, for scripts and the CLI.

    It runs a :class:`Client` on an event loop in a background thread; every method
    takes the same arguments as the async one.
    """

    def __init__(self, broker: str | None = None, **options: Any) -> None:
        from agent_sdk.loop import new_event_loop

        self._loop = new_event_loop()
        self._loop_thread = threading.Thread(target=self._loop.run_forever,
                                             name="orchestrator-client", daemon=True)
        self._loop_thread.start()
        self.client = Client(broker, **options)
        self._call(self.client.connect())

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def submit(self, text: str | None = None, **options: Any) -> SyncTaskHandle:
        async def submit() -> TaskHandle:
            return self.client.submit(text, **options)

        return SyncTaskHandle(self._call(submit()), self)

    def watch(self, task_id: str) -> SyncTaskHandle:
        async def watch() -> TaskHandle:
            return self.client.watch(task_id)

        return SyncTaskHandle(self._call(watch()), self)

    def fetch(self, task_id: str, timeout: float = STATUS_TIMEOUT_S) -> Result:
        return self._call(self.client.fetch(task_id, timeout))

    def cancel(self, task_id: str) -> None:
        self._call(self.client.cancel(task_id))

    def status(self, timeout: float = STATUS_TIMEOUT_S) -> dict[str, Any]:
        return self._call(self.client.status(timeout))

    def ping(self, timeout: float = 2.0) -> None:
        self._call(self.client.ping(timeout))

    def tasks(self, statuses: Iterable[str] | None = None, limit: int = 100,
              timeout: float = STATUS_TIMEOUT_S) -> list[dict[str, Any]]:
        return self._call(self.client.tasks(statuses, limit, timeout))

    def trace(self, task_id: str, timeout: float = STATUS_TIMEOUT_S) -> dict[str, Any]:
        return self._call(self.client.trace(task_id, timeout))

    def wait_for_agents(self, count: int = 1, capability: str | Iterable[str] | None = None,
                        name: str | None = None, timeout: float = 10.0) -> dict[str, Any]:
        return self._call(self.client.wait_for_agents(count, capability, name, timeout))

    def send(self, to: str, message: Any, **options: Any) -> None:
        self._call(self.client.send(to, message, **options))

    def request(self, to: str, message: Any, **options: Any) -> Any:
        return self._call(self.client.request(to, message, **options))

    def receive(self, timeout: float | None = None) -> DirectMessage:
        return self._call(self.client.receive(timeout))

    def publish(self, topic: str, message: Any) -> None:
        self._call(self.client.publish(topic, message))

    def wait_for_subscribers(self, topic: str, timeout: float = SUBSCRIBE_TIMEOUT_S) -> None:
        self._call(self.client.wait_for_subscribers(topic, timeout))

    def subscribe(self, topic: str, timeout: float = SUBSCRIBE_TIMEOUT_S) -> SyncSubscription:
        """Subscribe to a topic prefix; returns once the subscription is confirmed."""
        async def subscribe() -> Subscription:
            return await self.client.subscribe(topic).confirm(timeout)

        return SyncSubscription(self._call(subscribe()), self)

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            self._call(self.client.close())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._loop_thread.join(timeout=5)
            self._loop.close()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SyncSubscription:
    """Blocking view of a :class:`~agent_sdk.messaging.Subscription` (queue mode)."""

    def __init__(self, subscription: Subscription, client: SyncClient) -> None:
        self._subscription = subscription
        self._client = client
        self.topic = subscription.topic

    def next(self, timeout: float | None = None) -> Any:
        """The next :class:`~agent_sdk.messaging.BusMessage` (WaitTimeout after
        ``timeout`` seconds)."""
        return self._client._call(self._subscription.next(timeout))

    def unsubscribe(self) -> None:
        self._client._call(self._subscription.unsubscribe())


__all__ = ["Client", "SyncClient", "SyncSubscription", "SyncTaskHandle", "TaskHandle"]
