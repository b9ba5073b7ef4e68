"""``Client`` (asyncio): submit tasks and get results.

::

    async with Client("tcp://127.0.0.1:5555") as client:
        handle = client.submit(capabilities=["code_review"], data={"code": source})
        result = await handle.result(timeout=30)

``submit`` returns at once; submits made in the same loop iteration leave in one
message, and results come back in batches, so one client connection carries thousands
of tasks in flight. The blocking :class:`~agent_sdk.sync.SyncClient` runs one of these
on a loop thread. A large result's payload, which the broker withholds from RESULT, is
read in chunks (:mod:`agent_sdk.payloads`) before its handle resolves.

A client messages agents as agents do (:mod:`agent_sdk.messaging`): ``publish`` /
``subscribe`` on the bus, ``send`` / ``request`` / ``receive`` / ``on_message`` for direct
messages; agents reach it by its ``client_id``.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from functools import partial
from collections.abc import Callable, Iterable, Mapping
from typing import Any, cast, Final

from wire.codec import chunks
from wire.curve import in_scope, key_scope, scoped
from wire.limits import MIN_MESSAGE_BYTES
from wire.nodes import ScaleReply
from wire.purge import PurgeReply
from wire.sockets import reachable_endpoints
from wire.tasks import (
    Accepted, Cancel, Chunk, Direct, DirectVerdict, Disconnect, Error, ErrorCode, Fetch,
    Heartbeat, Message, Release, Results, StatusReply, StatusRequest, Submit, TaskList,
    TaskQuery, TaskSpec,
)
from agent_sdk.config import broker_url
from agent_sdk.connection import Connection, TASK_CODEC, Transport
from agent_sdk.errors import (
    BrokerUnavailable, RequestRefused, TaskNotFound, Unauthorized, VersionMismatch,
    WaitTimeout,
)
from agent_sdk.handles import (
    deliver_results, mark_accepted, open_work, overdue_work, PeekAnswer, Peeks, reject, TaskHandle,
)
from agent_sdk.limits import SubmitLimits, send_submits
from agent_sdk.messaging import MAILBOX_SIZE, MessagingMixin, Messenger
from agent_sdk.payloads import PayloadReader
from agent_sdk.state import endpoint_from, StateClient
from agent_sdk.reach import Reach
from agent_sdk.task import _MISSING, encode_payload, Result
from wire.tracing import (
    end_submit_span, init_tracing, submit_span, tracing_enabled,
)

_new_tuple = tuple.__new__

#: How long status() waits for the broker by default.
STATUS_TIMEOUT_S: Final = 5.0
#: While tasks are open the client pings this often (and notices a broker restart).
PING_INTERVAL_S: Final = 1.0
#: A task not yet accepted, or without a result, this long after it was last sent is
#: submitted (or asked for) again (see :func:`~agent_sdk.handles.overdue_work`).
RECOVER_AFTER_S: Final = 5.0


def _as_dict(document: Mapping[str, Any]) -> dict[str, Any]:
    """A document of a reply as the plain dict the client's API returns (it is one at
    run time: the wire package types its keys for readers that want them)."""
    return cast(dict[str, Any], document)


class _Requests:
    """The client's requests that wait for one answer: STATUS, TASKS, and FETCH peeks.

    Args:
        url: the broker's URL, for :class:`BrokerUnavailable`.

    Attributes:
        peeks: the FETCH futures waiting for a task's result (or state), by task id.
        refusal: the broker's ERROR ``bad_version``, once it refused this SDK's protocol
            version: every request fails then, at once.
    """

    def __init__(self, url: str, reach: Reach) -> None:
        self.url = url
        self.reach = reach
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self.peeks: Peeks = {}
        self.refusal: Error | None = None

    def check(self) -> None:
        """Raise :class:`VersionMismatch` if the broker refused this SDK's version,
        :class:`BrokerUnavailable` if no broker was reached and the address refuses."""
        if self.refusal is not None:
            raise VersionMismatch(self.url, self.refusal.message)
        self.reach.check()

    def fail_all(self, error: Exception) -> None:
        """Fail every request waiting with ``error``."""
        waiting = list(self._waiting.values())
        waiting.extend(future for futures in self.peeks.values() for future in futures)
        self._waiting.clear()
        self.peeks.clear()
        for future in waiting:
            if not future.done():
                future.set_exception(error)

    def next_id(self) -> int:
        """A request id for a message whose answer nobody awaits (a recovery FETCH)."""
        return next(self._ids)

    async def ask(self, send: Callable[[Message], None], make: Callable[[int], Message],
                  timeout: float) -> Any:
        """Send ``make(req)`` and return the answer to ``req``.

        Raises:
            BrokerUnavailable: no answer within ``timeout``.
            RequestRefused: the broker answered with ERROR (``TaskNotFound`` for
                ``not_found``; ``VersionMismatch`` for ``bad_version``, and then at
                once for every later request).
        """
        req = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        return await self._send_and_wait(send, make(req), req, future, timeout)

    async def peek(self, send: Callable[[Message], None], task_id: str,
                   timeout: float) -> Result:
        """FETCH ``task_id`` without waiting for it to finish; see :meth:`Client.fetch`."""
        future: asyncio.Future[PeekAnswer] = asyncio.get_running_loop().create_future()
        # The answer is a RESULT, which goes to the peeks, or an ERROR to the request.
        self.peeks.setdefault(task_id, []).append(future)
        req = next(self._ids)
        try:
            answer = await self._send_and_wait(send, Fetch(req, [task_id], wait=False), req,
                                               future, timeout)
        finally:
            peeks = self.peeks.get(task_id)
            if peeks is not None and future in peeks:
                peeks.remove(future)
                if not peeks:
                    del self.peeks[task_id]
        if isinstance(answer, Result):
            return answer
        # The result's payload was withheld: the broker did answer within ``timeout``,
        # and the chunked read of the payload has deadlines of its own.
        result: Result = await answer
        return result

    async def _send_and_wait(self, send: Callable[[Message], None], msg: Message, req: int,
                             future: asyncio.Future[Any], timeout: float) -> Any:
        self.check()
        self._waiting[req] = future
        try:
            send(msg)
            return await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            raise BrokerUnavailable(self.url, timeout) from None  # contact or not
        finally:
            self._waiting.pop(req, None)

    def answer(self, req: int, msg: Message) -> None:
        """The broker answered ``req`` with ``msg``."""
        future = self._waiting.pop(req, None)
        if future is not None and not future.done():
            future.set_result(msg)

    def refuse(self, error: Error) -> bool:
        """The broker answered a request with ERROR; False if nobody waits for it."""
        if error.req not in self._waiting:
            return False
        future = self._waiting.pop(error.req)
        if not future.done():
            if error.code == ErrorCode.NOT_FOUND.value:
                future.set_exception(TaskNotFound(
                    error.task_ids[0] if error.task_ids else "", error.message))
            elif error.code == ErrorCode.UNAUTHORIZED.value:
                # A secure broker refused what this key asked (its role does not allow
                # it, or the key was revoked).
                future.set_exception(Unauthorized(self.url, "forbidden", error.message))
            else:
                future.set_exception(RequestRefused(error.code, error.message))
        return True


class Recovery:
    """What keeps a client's open tasks alive across a restarted broker or a lossy link:
    while tasks are open it pings the broker, learns its boot id, and sends again what
    may have been dropped (submits and watches are idempotent by task id)."""

    def __init__(self, client: Client) -> None:
        self._client = client
        #: the broker's boot id as last heard
        self.boot: str | None = None

    async def ping_loop(self) -> None:
        client = self._client
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(PING_INTERVAL_S)
            channel = client._channel
            if channel is None:
                return
            client.messaging.expire(loop.time())
            if not client._handles:
                continue
            channel.send(Heartbeat(role="client"))
            self.send_again(*overdue_work(client._handles.values(), loop.time(),
                                          RECOVER_AFTER_S))

    def send_again(self, specs: list[TaskSpec], watched: list[str]) -> None:
        client = self._client
        if client._channel is not None:
            send_again(client._channel, client._requests.next_id, specs, watched)

    def on_boot(self, boot: str) -> None:
        if self.boot is not None and boot != self.boot and self._client._handles:
            # The broker restarted: it kept what it journaled; send everything open again.
            self.send_again(*open_work(self._client._handles.values()))
        self.boot = boot


class TaskIds:
    """A client's task ids: made from its client id and a count; on a secure broker in
    its key's scope (``wire/curve.py``), which the broker requires of a non-admin's new
    ids and reads any id it names in.

    Attributes:
        scope: this key's scope ("" in plaintext, and until connected).
    """

    def __init__(self, client_id: str) -> None:
        self.client_id = client_id
        self.scope = ""
        self._count = itertools.count(1)

    def use_key(self, public_key: str | None) -> None:
        """The connection's CURVE public key (None: plaintext)."""
        self.scope = key_scope(public_key) if public_key is not None else ""

    def new(self) -> str:
        """A fresh task id."""
        return f"{self.scope}{self.client_id}-{next(self._count)}"

    def own(self, task_id: str) -> str:
        """A caller's id for a new task: in this key's scope (another key's id becomes
        one of this key's own)."""
        return in_scope(self.scope, task_id)

    def named(self, task_id: str) -> str:
        """An id the caller names to look a task up: one with a scope as it is (an admin
        naming another key's task), a short one in this key's scope."""
        return scoped(self.scope, task_id)


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
        self._channel: Transport[Message] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handles: dict[str, TaskHandle] = {}
        self._outgoing: list[TaskSpec] = []
        #: large submits wait for the broker's size limits (agent_sdk/limits.py)
        self._limits = SubmitLimits()
        self._reach = Reach(self.url, self._fail_all)
        self._requests = _Requests(self.url, self._reach)
        self._payloads = PayloadReader(partial(self._requests.ask, self._send_message))
        self._ids = TaskIds(self.client_id)
        self._pinger: asyncio.Task[None] | None = None
        self._recovery = Recovery(self)
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

    def _ensure_open(self) -> Transport[Message]:
        if self._channel is None:
            init_tracing("orchestrator-client")  # a no-op unless tracing is on
            self._loop = asyncio.get_running_loop()
            self._channel = Connection(self.url, self.client_id.encode(), TASK_CODEC,
                                       self._on_message, self._flush, monitor=True,
                                       on_event=self._reach.event)
            self._reach.poll = self._channel.read_events
            self._channel.open()
            self._reach.public_key = self._channel.curve_public_key
            self._ids.use_key(self._channel.curve_public_key)
            self._pinger = self._loop.create_task(self._recovery.ping_loop(),
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
        return endpoint_from(await self._bus_endpoints(), f"the broker at {self.url}")

    def _send_message(self, msg: Message) -> None:
        self._ensure_open().send(msg)

    async def _bus_endpoints(self) -> dict[str, str]:
        status = await self.status()
        return reachable_endpoints(dict(status.get("broker", {}).get("endpoints") or {}),
                                   self.url)

    async def close(self) -> None:
        """Send what is queued and close; pending handles stay unresolved."""
        await self.messaging.close()
        await self._payloads.close()
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

    async def __aenter__(self) -> Client:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ recovery

    # ------------------------------------------------------------------ tasks

    def submit(self, text: str | None = None, *, capabilities: Iterable[str] = (),
               agent: str | None = None, data: Any = _MISSING, task_id: str | None = None,
               timeout: float | None = None, retries: int | None = None, priority: int = 0,
               parent_id: str | None = None, attempt_timeout: float | None = None,
               hold: bool = False, **fields: Any) -> TaskHandle:
        """Queue a task for the broker; returns its handle at once.

        Args:
            text: free text of the task (becomes the ``text`` field).
            capabilities: every capability the agent must have.
            agent: an agent name (or id) the task must go to.
            data: the payload (``task.data`` on the agent); other keywords become fields.
            task_id: the idempotency key; submitting the same id again gives the same task.
            timeout: the task's deadline, in seconds from its acceptance: queueing, every
                attempt and retry included; it ends ``timed_out`` then, whatever its retries.
            attempt_timeout: seconds each attempt may run (None: only ``timeout`` bounds it).
            retries: retries after failures (per the broker's retry policy).
            priority: higher runs first among waiting tasks.
            parent_id: the task this one is a subtask of.
            hold: keep the result in the broker, whatever its retention limits, until
                :meth:`release` names the task (a workflow step, until checkpointed);
                resubmits (recovery) keep it.

        Raises:
            TooLarge: the encoded payload exceeds the frame limit.
            VersionMismatch: the broker refused this SDK's protocol version.
            BrokerUnavailable: no broker was ever reached, and the address refuses.
        """
        self._requests.check()
        channel = self._channel or self._ensure_open()
        if task_id is None:
            task_id = self._ids.new()
        else:
            task_id = self._ids.own(task_id)
            handle = self._handles.get(task_id)
            if handle is not None:
                return handle
        if text is not None:
            fields["text"] = text
        caps = (capabilities,) if isinstance(capabilities, str) else tuple(capabilities)
        payload = encode_payload(data, fields)
        # Every broker takes MIN_MESSAGE_BYTES; a bigger payload is checked (or TooLarge).
        leaves_now = len(payload) <= MIN_MESSAGE_BYTES or self._limits.check(channel, payload)
        spec_fields = (task_id, payload, caps, agent, priority,
                       timeout if timeout is not None else self.default_timeout_s, retries,
                       parent_id, attempt_timeout, hold)
        loop = self._loop
        assert loop is not None  # set by _ensure_open
        if tracing_enabled():
            spec, handle = _traced_submit(self, spec_fields, loop.time())
        else:
            spec = _new_tuple(TaskSpec, spec_fields)
            handle = TaskHandle(task_id, self, spec, loop.time())
        handles = self._handles
        handles[task_id] = handle
        if not leaves_now:
            return self._limits.hold(spec, handle, channel)  # until the broker says its limits
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
        task_id = self._ids.named(task_id)
        handle = self._handles.get(task_id)
        if handle is None:
            handle = TaskHandle(task_id, self)
            handle._accepted = True
            self._handles[task_id] = handle
        channel.send(Fetch(self._requests.next_id(), [task_id], wait=True))
        return handle

    async def fetch(self, task_id: str, timeout: float = STATUS_TIMEOUT_S) -> Result:
        """The task's result if it finished, else its current state (``result.finished``
        is False then). A large payload is read in chunks after the broker's answer.

        Raises:
            TaskNotFound: the broker knows no such task.
            BrokerUnavailable: no answer within ``timeout``.
            ResultUnreadable: the large payload's read failed (it went past retention).
        """
        self._ensure_open()
        return await self._requests.peek(self._send_message, self._ids.named(task_id),
                                         timeout)

    async def release(self, task_ids: Iterable[str]) -> None:
        """Let the broker drop the results of these tasks, submitted with ``hold=True``,
        under its retention limits again (ids it holds no result of are ignored). The
        submits queued before leave first; no ids, no message; the broker never answers."""
        self._flush()
        channel = self._ensure_open()
        ids = [self._ids.named(task_id) for task_id in task_ids]
        for part in chunks(ids) if ids else ():
            channel.send(Release(part))

    async def cancel(self, task_id: str) -> None:
        """Ask the broker to cancel ``task_id`` (no-op if it already finished)."""
        self._flush()
        channel = self._ensure_open()
        channel.send(Cancel([self._ids.named(task_id)]))

    # ------------------------------------------------------------------ status

    async def status(self, timeout: float = STATUS_TIMEOUT_S) -> dict[str, Any]:
        """The broker's status document (agents, queue, task counts).

        Raises:
            BrokerUnavailable: no answer within ``timeout``.
        """
        reply: StatusReply = await self._requests.ask(self._send_message, StatusRequest,
                                                      timeout)
        return _as_dict(reply.status)

    async def tasks(self, statuses: Iterable[str] | None = None, limit: int = 100,
                    timeout: float = STATUS_TIMEOUT_S) -> list[dict[str, Any]]:
        """Open tasks (pending, dispatched, running, retrying) newest first, then the
        finished tasks the broker still retains, newest first; ``statuses`` filters by
        state (``["failed", "timed_out"]`` lists the dead letters with their last error)."""
        wanted = list(statuses) if statuses is not None else None
        reply: TaskList = await self._requests.ask(
            self._send_message, lambda req: TaskQuery(req, wanted, limit), timeout)
        return [_as_dict(task) for task in reply.tasks]

    async def trace(self, task_id: str, timeout: float = STATUS_TIMEOUT_S) -> dict[str, Any]:
        """A task's state, timeline and subtask tree (open or finished).

        Raises:
            TaskNotFound: the broker knows no such task (or it is past retention).
        """
        self._ensure_open()
        task_id = self._ids.named(task_id)
        reply: TaskList = await self._requests.ask(
            self._send_message, lambda req: TaskQuery(req, None, 1, [task_id]), timeout)
        document = _as_dict(reply.tasks[0]) if reply.tasks else {"status": "unknown"}
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
        reply: StatusReply = await self._requests.ask(
            self._send_message, lambda req: StatusRequest(req, until, timeout),
            timeout + STATUS_TIMEOUT_S)
        if not reply.status.get("met", True):
            raise WaitTimeout(f"fewer than {count} agent(s) matching {until} after {timeout:g} s")
        return _as_dict(reply.status)

    # ------------------------------------------------------------------ input

    def _flush(self) -> None:
        if self._outgoing and self._channel is not None:
            batch, self._outgoing = self._outgoing, []
            for part in chunks(batch):
                send_submits(self._channel, part, self._handles)

    def _on_message(self, msg: Message) -> None:
        self._reach.contacted = True  # a monitor event may come later than the message
        match msg:
            case Results(items):
                self._on_results(items)
            case Accepted(ids):
                mark_accepted(ids, self._handles)
            case StatusReply(req) | TaskList(req) | Chunk(req) | PurgeReply(req) | \
                    ScaleReply(req):
                self._requests.answer(req, msg)
            case Error():
                self._on_error(msg)
            case Heartbeat(boot=boot, limits=limits):
                if boot:
                    self._recovery.on_boot(boot)
                    self._limits.adopt(self._channel, limits, self._handles, self._outgoing,
                                       self.messaging.bus)
            case Direct():
                self.messaging.on_direct(msg)
            case DirectVerdict():
                self.messaging.on_verdict(msg)
            case Disconnect():
                pass  # only agents register; a client has nothing to do here

    def _on_results(self, items: list[Any]) -> None:
        deliver_results(items, self._handles, self._requests.peeks, self._payloads.take)

    def _on_error(self, error: Error) -> None:
        if error.code == ErrorCode.BAD_VERSION.value:
            self._version_refused(error)
            return
        if error.req is not None:
            if not self._requests.refuse(error) and error.code == ErrorCode.NOT_FOUND.value:
                # A recovery FETCH found nothing: the broker lost the task (no journal).
                lost = [self._handles[i]._spec for i in error.task_ids if i in self._handles]
                self._recovery.send_again([spec for spec in lost if spec is not None], [])
            return
        reject(error, self._handles)  # refused submits (queue_full, shutting_down)

    def _version_refused(self, error: Error) -> None:
        """The broker speaks another protocol version: fail whatever waits on it (requests,
        results, direct messages) with :class:`VersionMismatch`, and send nothing again."""
        self._requests.refusal = error
        self._fail_all(VersionMismatch(self.url, error.message))

    def _fail_all(self, error: Exception) -> None:
        """Fail every request, task handle and direct message waiting with ``error``."""
        self._requests.fail_all(error)
        self._payloads.fail_all(error)
        self._outgoing.clear()
        handles, self._handles = self._handles, {}
        for handle in handles.values():
            handle._fail(error)
        self.messaging.direct.cancel_waiting(error)


def send_again(channel: Transport[Message], next_id: Callable[[], int], specs: list[TaskSpec],
               watched: list[str]) -> None:
    """Submit again (idempotent by id) and ask again for results, if any (every ping
    calls this): what the broker still has is answered once, what it lost runs again."""
    for part in chunks(specs) if specs else ():
        channel.send(Submit(part))
    for part in chunks(watched) if watched else ():
        channel.send(Fetch(next_id(), part, wait=True))


def _traced_submit(client: Client, spec_fields: tuple[Any, ...], now: float
                   ) -> tuple[TaskSpec, TaskHandle]:
    """A submit while tracing is on: its ``invoke_agent`` client span, ended when the
    result is in, and for a sampled trace the traceparent after the spec's fields
    (:func:`wire.tasks.trace_of`), so that the broker and the agent continue the trace."""
    task_id, _, caps, agent = spec_fields[:4]
    span = submit_span(task_id, caps, agent)
    spec = _new_tuple(TaskSpec, spec_fields if span is None
                      else (*spec_fields, span.traceparent))
    handle = TaskHandle(task_id, client, spec, now)
    if span is not None:
        handle.add_done_callback(partial(end_submit_span, span))
    return spec, handle


__all__ = ["Client", "STATUS_TIMEOUT_S", "TaskHandle"]
