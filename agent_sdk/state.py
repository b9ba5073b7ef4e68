"""Shared state for agents and clients: versioned keys, compare-and-set, locks, watches.

::

    # inside an agent (the broker told it where the state service is)
    await self.state.set("config/model", {"name": "small"})
    count = await self.state.update("stats/reviews", lambda n: (n or 0) + 1)
    async with self.state.lock("repo/main", ttl=10, wait=5) as lease:
        await self.state.set("repo/main/head", sha, fence=lease)   # refused once stale
    await self.state.watch("jobs/", on_change)

    # from a client: the endpoint comes from the broker's status (or pass it)
    async with Client(url) as client:
        await client.state.get("stats/reviews")

Values are anything msgpack encodes. Every key has a version (the service-wide number of
its last write); :meth:`StateClient.cas` writes only at an expected version and
:meth:`StateClient.update` retries a local function until its write lands, so no update
is lost between processes.

Each :class:`StateClient` has one DEALER connection and one session with the service.
The session stays alive while the client sends (an idle one pings every interval); if
the client goes silent (it died, or its loop is stuck) for ``interval x liveness``, the
service ends the session and releases its locks.
"""

from __future__ import annotations

import asyncio
import builtins
import enum
import inspect
import itertools
import logging
import os
import random
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Final, Union

import zmq
from zmq.utils.monitor import recv_monitor_message

from wire.codec import packb, unpackb
from wire.state import (
    decode_state, encode_state, Entry, Fence, LeaseGranted, LockAcquire, LockInfo, LockList,
    LockRelease, LockRenew, LockTable, MAX_LIST_ITEMS, MAX_VALUE_BYTES, StateDelete, StateDone,
    StateErrorCode, StateErrorReply, StateEvents, StateGet, StateHello, StateInfo,
    StateInfoRequest, StateItems, StateList, StateMessage, StatePing, StatePut, StateUnwatch,
    StateValue, StateWatch, StateWelcome,
)
from wire.errors import StateDecodeError
from wire.sockets import apply_common_options, send_frames
from agent_sdk.errors import (
    LeaseLost, LockTimeout, OrchestratorError, StaleFencingToken, StateError, StateUnavailable,
    VersionConflict,
)

logger = logging.getLogger(__name__)

#: Where the state service is when nothing else says so (``$ORCH_STATE`` overrides).
DEFAULT_STATE_URL: Final = "tcp://127.0.0.1:5558"
#: How long a request waits for its reply (a lock acquire: ``wait`` plus this).
REQUEST_TIMEOUT_S: Final = 10.0
#: Until the service's WELCOME says otherwise.
DEFAULT_HEARTBEAT_INTERVAL_S: Final = 1.0
DEFAULT_HEARTBEAT_LIVENESS: Final = 3
#: Reconnect back-off after the service went silent: first wait, cap.
RECONNECT_MIN_S: Final = 0.1
RECONNECT_MAX_S: Final = 5.0
#: ``update`` back-off after the second conflict in a row: uniform in [0, base x 2^n],
#: capped. The first retry goes at once: the conflict brought the current value along.
UPDATE_BACKOFF_BASE_S: Final = 0.0005
UPDATE_BACKOFF_MAX_S: Final = 0.05
#: How long ``update`` keeps retrying before it gives up with the last conflict.
UPDATE_TIMEOUT_S: Final = 30.0
#: A held lease is renewed when this share of its ttl has passed.
RENEW_AT: Final = 1 / 3
#: Outgoing queue of the DEALER.
SEND_HWM: Final = 100_000
#: Messages handled per wake-up before yielding to other callbacks.
DRAIN_BATCH: Final = 1000

#: A fencing guard: a :class:`Lease`, or ``(lock name, token)``.
FenceLike = Union["Lease", tuple[str, int]]
#: What a watch calls for each change: a plain function or a coroutine function.
Handler = Callable[["Change"], Union[None, Awaitable[None]]]


def encode_value(value: Any) -> bytes:
    """The bytes the service stores for ``value``.

    Raises:
        TypeError: msgpack cannot encode it.
        StateError: ``too_large``, it encodes to more than ``MAX_VALUE_BYTES``.
    """
    try:
        data = packb(value)
    except (TypeError, ValueError, OverflowError) as e:
        raise TypeError(f"state values must be msgpack-encodable: {e}") from e
    if len(data) > MAX_VALUE_BYTES:
        raise StateError(StateErrorCode.TOO_LARGE.value,
                         f"value of {len(data)} bytes exceeds {MAX_VALUE_BYTES} bytes")
    return data


def decode_value(data: bytes | None) -> Any:
    """A stored value back as Python (None for none); bytes that are not msgpack (written
    by another kind of client) come back as they are."""
    if data is None:
        return None
    try:
        return unpackb(data)
    except Exception:  # noqa: BLE001 - foreign bytes are still the value
        return data


def endpoint_from(endpoints: Any, source: str) -> str:
    """The state service's URL out of a broker's endpoints map (``WELCOME`` or status).

    Raises:
        StateUnavailable: the broker runs no state service.
    """
    url = endpoints.get("state") if isinstance(endpoints, dict) else None
    if not isinstance(url, str) or not url:
        raise StateUnavailable("", 0.0, f"{source} announces no state service (started with "
                               "--no-state?); pass the state service's URL explicitly")
    return url


@dataclass(frozen=True, slots=True)
class Versioned:
    """A key's value and version (version 0: the key does not exist)."""

    key: str
    value: Any
    version: int

    @property
    def exists(self) -> bool:
        return self.version > 0


@dataclass(frozen=True, slots=True)
class Change:
    """One change seen by a watch: a write (``value``) or a deletion (``deleted``).

    ``resync`` marks changes of a replay that could not be exact (the watch came back
    after the service's change log moved on): they are the current keys, and deletions
    in between were missed.
    """

    key: str
    version: int
    value: Any
    deleted: bool
    resync: bool = False


class ConnectionState(enum.Enum):
    """A state client's connection with the service."""

    CLOSED = "closed"
    CONNECTING = "connecting"
    READY = "ready"


class Lease:
    """A held lock. Renewed in the background while held; ``token`` is its fencing token.

    Pass the lease as ``fence=`` to a write and the service refuses the write once the
    lease is no longer the lock's current one.
    """

    def __init__(self, client: StateClient, name: str, token: int, ttl_s: float) -> None:
        self.name = name
        self.token = token
        self.ttl_s = ttl_s
        self._client = client
        self._lost = asyncio.Event()
        self._released = False
        self._renewer: asyncio.Task[None] | None = None
        #: loop time after which this side can no longer assume the lease is held
        self.valid_until = asyncio.get_running_loop().time() + ttl_s

    @property
    def fence(self) -> Fence:
        return (self.name, self.token)

    @property
    def lost(self) -> bool:
        """True once the lease is known (or must be assumed) to be gone."""
        if not self._lost.is_set() and asyncio.get_running_loop().time() >= self.valid_until:
            self._mark_lost("its ttl passed without a confirmed renewal")
        return self._lost.is_set()

    @property
    def held(self) -> bool:
        return not self._released and not self.lost

    async def wait_lost(self) -> None:
        """Return when the lease is lost (never, if it is released first)."""
        await self._lost.wait()

    async def renew(self, ttl: float | None = None) -> None:
        """Extend the lease to ``ttl`` (default: its own) from now.

        Raises:
            LeaseLost: the service no longer counts it as held.
        """
        sent_at = asyncio.get_running_loop().time()
        try:
            reply = await self._client._call(lambda req: LockRenew(req, self.name, self.token, ttl))
        except LeaseLost:
            self._mark_lost("the service says it is not held")
            raise
        self.ttl_s = reply.ttl_s
        self.valid_until = sent_at + reply.ttl_s

    async def release(self) -> None:
        """Give the lock back (the next waiter gets it at once). Releasing a lease that
        was lost, or twice, does nothing."""
        if self._released:
            return
        self._released = True
        self._stop_renewing()
        self._forget()
        if self._lost.is_set():
            return
        try:
            await self._client._call(lambda req: LockRelease(req, self.name, self.token))
        except LeaseLost:
            logger.warning("lease %d of lock %r had already expired when released", self.token,
                           self.name)
        except StateUnavailable as e:
            # The lease then ends at its ttl; nothing more can be done from here.
            logger.warning("could not release lock %r (%s); it expires in its ttl", self.name, e)

    def _forget(self) -> None:
        # Only this lease: the same client may hold a newer lease of the same lock.
        if self._client._leases.get(self.name) is self:
            del self._client._leases[self.name]

    def _start_renewing(self) -> None:
        self._renewer = asyncio.get_running_loop().create_task(
            self._renew_loop(), name=f"renew-{self.name}")

    def _stop_renewing(self) -> None:
        if self._renewer is not None and self._renewer is not asyncio.current_task():
            self._renewer.cancel()
        self._renewer = None

    async def _renew_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._released and not self._lost.is_set():
            await asyncio.sleep(self.ttl_s * RENEW_AT)
            if self._released or self.lost:
                return
            try:
                await self.renew()
            except LeaseLost:
                return
            except (StateUnavailable, StateError) as e:
                # Try again next period; the lease may still be valid on the service.
                logger.warning("renewing lock %r failed: %s (%.1f s of lease left)", self.name,
                               e, self.valid_until - loop.time())

    def _mark_lost(self, why: str) -> None:
        if not self._lost.is_set():
            self._lost.set()
            self._forget()
            if not self._released:
                logger.warning("lease %d of lock %r lost: %s", self.token, self.name, why)
        self._stop_renewing()

    async def __aenter__(self) -> Lease:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.release()

    def __repr__(self) -> str:
        state = "released" if self._released else ("lost" if self._lost.is_set() else "held")
        return f"Lease({self.name!r}, token={self.token}, {state})"


class Watch:
    """A live watch: the handler gets every change under ``prefix`` in version order."""

    def __init__(self, client: StateClient, prefix: str, handler: Handler,
                 since: int | None) -> None:
        self.prefix = prefix
        self.handler = handler
        #: version of the last change delivered, or the version the watch started at
        #: (None until the service confirmed the watch)
        self.last_version: int | None = since
        self.id = 0
        self.active = True
        self._client = client
        self._is_async = inspect.iscoroutinefunction(handler)
        self._queue: asyncio.Queue[Change] | None = None
        self._consumer: asyncio.Task[None] | None = None
        if self._is_async:
            self._queue = asyncio.Queue()
            self._consumer = asyncio.get_running_loop().create_task(
                self._consume(), name=f"watch-{prefix}")

    async def cancel(self) -> None:
        """Stop the watch (changes already received are still delivered)."""
        if not self.active:
            return
        self.active = False
        self._client._watches.pop(self.id, None)
        try:
            await self._client._call(lambda req: StateUnwatch(req, self.id))
        except StateUnavailable:
            pass  # the service forgets the watch with the session anyway
        if self._consumer is not None and self._queue is not None:
            await self._queue.join()
            self._consumer.cancel()

    def _deliver(self, events: list[Entry], resync: bool) -> None:
        for key, version, value in events:
            if self.last_version is not None and version <= self.last_version:
                continue  # already delivered before a re-watch replayed it
            self.last_version = version
            change = Change(key, version, decode_value(value), value is None, resync)
            if self._queue is not None:
                self._queue.put_nowait(change)
                continue
            try:
                self.handler(change)
            except Exception:  # noqa: BLE001 - one bad change must not end the watch
                logger.exception("watch handler for %r failed on %s", self.prefix, key)

    async def _consume(self) -> None:
        assert self._queue is not None
        while True:
            change = await self._queue.get()
            try:
                await self.handler(change)  # type: ignore[misc]
            except Exception:  # noqa: BLE001 - one bad change must not end the watch
                logger.exception("watch handler for %r failed on %s", self.prefix, change.key)
            finally:
                self._queue.task_done()

    def __repr__(self) -> str:
        return f"Watch({self.prefix!r}, id={self.id}, last_version={self.last_version})"


class _NoSession(Exception):
    """The service answered ``no_session``: say HELLO, then send the request again."""


@dataclass(slots=True)
class _Pending:
    future: asyncio.Future[Any]
    #: the session epoch (count of WELCOMEs) when the request was sent
    epoch: int
    #: the request itself, to word its errors (which key, which lock)
    request: StateMessage | None = None
    #: loop time after which the heartbeat loop fails it with StateUnavailable
    deadline: float = float("inf")
    timeout_s: float = 0.0


class _Connection:
    """One DEALER socket driven by the asyncio loop, as ``agent_sdk.transport.Channel``
    does for the broker, but with the state service's codec.

    A socket monitor reports when the TCP connection drops and when a handshake with
    the service succeeds again: libzmq reconnects by itself after a restart of the
    service, and the client must not tear that connection down (losing the requests on
    it) just because the restart took longer than the heartbeat expiry.
    """

    #: the monitor events that say whether a live service is at the other end
    _MONITOR_EVENTS: Final = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED

    def __init__(self, url: str, identity: bytes, on_message: Callable[[StateMessage], None],
                 on_transport: Callable[[bool], None]) -> None:
        self.url = url
        self.identity = identity
        self._on_message = on_message
        self._on_transport = on_transport
        self._loop = asyncio.get_running_loop()
        self._sock: zmq.Socket[Any] | None = None
        self._fd: int | None = None
        self._monitor: zmq.Socket[Any] | None = None
        self._monitor_fd: int | None = None
        self._read_scheduled = False

    def open(self) -> None:
        sock: zmq.Socket[Any] = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.ROUTING_ID, self.identity)
        apply_common_options(sock, SEND_HWM)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        self._monitor = sock.get_monitor_socket(self._MONITOR_EVENTS)
        monitor_fd: Any = self._monitor.getsockopt(zmq.FD)
        self._monitor_fd = monitor_fd
        self._loop.add_reader(monitor_fd, self._on_monitor)
        sock.connect(self.url)
        self._sock = sock
        fd: Any = sock.getsockopt(zmq.FD)
        self._fd = fd
        self._loop.add_reader(fd, self._on_readable)
        self._schedule_read()
        self._loop.call_soon(self._on_monitor)

    def close(self) -> None:
        if self._sock is None:
            return
        if self._fd is not None:
            self._loop.remove_reader(self._fd)
        if self._monitor is not None:
            if self._monitor_fd is not None:
                self._loop.remove_reader(self._monitor_fd)
            self._sock.disable_monitor()
            self._monitor.close(linger=0)
            self._monitor = None
            self._monitor_fd = None
        self._sock.close(linger=0)
        self._sock = None
        self._fd = None

    def _on_monitor(self) -> None:
        monitor = self._monitor
        while monitor is not None and monitor is self._monitor:
            try:
                event = recv_monitor_message(monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            self._on_transport(event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED)

    def send(self, msg: StateMessage) -> None:
        """Send now; blocks only when the service stopped reading ``SEND_HWM`` messages
        ago (the request then waits in the socket, as any request would)."""
        if self._sock is None:
            raise StateUnavailable(self.url, 0.0, "the state client is closed")
        send_frames(self._sock, encode_state(msg))
        # A send can swallow the edge of a message that arrived meanwhile.
        self._schedule_read()

    def _schedule_read(self) -> None:
        if not self._read_scheduled:
            self._read_scheduled = True
            self._loop.call_soon(self._on_readable)

    def _on_readable(self) -> None:
        self._read_scheduled = False
        sock = self._sock
        if sock is None:
            return
        recv = sock.recv_multipart
        for _ in range(DRAIN_BATCH):
            try:
                frames = recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                msg = decode_state(frames)
            except StateDecodeError as e:
                logger.warning("dropped a bad message from the state service: %s", e)
                continue
            self._on_message(msg)
            if self._sock is not sock:
                return  # the handler reopened or closed the connection
        self._schedule_read()


class StateClient:
    """A connection and session with the state service.

    Args:
        url: the service's endpoint, or an async function returning it (resolved on
            first use; agents and clients pass one that asks the broker). Default:
            ``$ORCH_STATE`` or ``tcp://127.0.0.1:5558``.
        name: shown as the holder in lock listings.
        request_timeout_s: how long a request waits for its reply.
    """

    def __init__(self, url: str | Callable[[], Awaitable[str]] | None = None, *,
                 name: str = "", request_timeout_s: float = REQUEST_TIMEOUT_S) -> None:
        self._url_source = url if url is not None else os.environ.get("ORCH_STATE",
                                                                        DEFAULT_STATE_URL)
        self.url = self._url_source if isinstance(self._url_source, str) else ""
        self.name = name
        self.session_id = f"state-{name or 'client'}-{uuid.uuid4().hex[:12]}"
        self.request_timeout_s = request_timeout_s
        self.state = ConnectionState.CLOSED
        #: id of the service run the session belongs to (changes when it restarts)
        self.instance: str | None = None
        self.heartbeat_interval_s = DEFAULT_HEARTBEAT_INTERVAL_S
        self.heartbeat_liveness = DEFAULT_HEARTBEAT_LIVENESS
        self._conn: _Connection | None = None
        self._requests: dict[int, _Pending] = {}
        self._req_ids = itertools.count(1)
        self._epoch = 0
        self._ready: asyncio.Event | None = None
        self._hello_task: asyncio.Task[None] | None = None
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._leases: dict[str, Lease] = {}
        self._watches: dict[int, Watch] = {}
        self._abandoned_acquires: set[int] = set()
        self._last_heard = 0.0
        self._last_sent = 0.0
        self._reconnect_delay_s = RECONNECT_MIN_S
        #: whether libzmq has a live connection (handshake done, not dropped since)
        self._transport_up = False
        self._moved_check: asyncio.Task[None] | None = None
        self._closed = False

    # ------------------------------------------------------------------ lifecycle

    async def connect(self, timeout: float | None = None) -> StateClient:
        """Open the connection and the session (every call does it on first use).

        Raises:
            StateUnavailable: the service did not answer within ``timeout``.
        """
        await self._ensure_session(self.request_timeout_s if timeout is None else timeout)
        return self

    async def close(self) -> None:
        """Release held locks, stop watches and heartbeats, close the connection."""
        if self._closed:
            return
        for lease in list(self._leases.values()):
            try:
                await asyncio.wait_for(lease.release(), self.heartbeat_interval_s)
            except asyncio.TimeoutError:
                logger.warning("releasing lock %r timed out at close", lease.name)
        self._closed = True
        for watch in list(self._watches.values()):
            watch.active = False
            if watch._consumer is not None:
                watch._consumer.cancel()
        self._watches.clear()
        tasks = [t for t in (self._heartbeat_task, self._hello_task, self._moved_check)
                 if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._fail_pending(StateUnavailable(self.url, 0.0, "the state client was closed"))
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self.state = ConnectionState.CLOSED

    async def __aenter__(self) -> StateClient:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ keys

    async def get(self, key: str, default: Any = None) -> Any:
        """The value of ``key``, or ``default`` when it does not exist."""
        entry = await self.get_entry(key)
        return entry.value if entry.exists else default

    async def get_entry(self, key: str) -> Versioned:
        """The value and version of ``key`` (version 0 when it does not exist)."""
        reply: StateValue = await self._call(lambda req: StateGet(req, key))
        return Versioned(key, decode_value(reply.value), reply.version)

    async def set(self, key: str, value: Any, *, ttl: float | None = None,
                  fence: FenceLike | None = None) -> int:
        """Write ``key``; returns its new version.

        Args:
            ttl: seconds after which the key is deleted (a write without one makes the
                key permanent again).
            fence: a :class:`Lease` (or ``(lock, token)``) that must still be the lock's
                current lease, else the write is refused with :class:`StaleFencingToken`.
        """
        data = encode_value(value)
        guard = _fence(fence)
        reply: StateDone = await self._call(lambda req: StatePut(req, key, data, None, ttl, guard))
        return reply.version

    async def cas(self, key: str, expected_version: int, value: Any, *,
                  ttl: float | None = None, fence: FenceLike | None = None) -> int:
        """Write ``key`` only if it is at ``expected_version`` (0: only if it does not
        exist); returns the new version.

        Raises:
            VersionConflict: it is at another version (``current_version`` says which).
        """
        data = encode_value(value)
        guard = _fence(fence)
        reply: StateDone = await self._call(
            lambda req: StatePut(req, key, data, expected_version, ttl, guard))
        return reply.version

    async def delete(self, key: str, *, expected_version: int | None = None,
                     fence: FenceLike | None = None) -> bool:
        """Delete ``key``; returns whether it existed.

        Raises:
            VersionConflict: ``expected_version`` was given and the key is at another.
        """
        guard = _fence(fence)
        reply: StateDone = await self._call(
            lambda req: StateDelete(req, key, expected_version, guard))
        return reply.existed

    async def update(self, key: str, updater: Callable[[Any], Any], *, default: Any = None,
                     ttl: float | None = None, fence: FenceLike | None = None,
                     timeout: float = UPDATE_TIMEOUT_S) -> Any:
        """Apply ``updater(current value)`` to ``key`` atomically; returns the new value.

        Optimistic concurrency: read, compute locally, compare-and-set at the version
        read; when another writer got there first, compute again from the value the
        conflict carries, with a jittered back-off from the second conflict on. So the
        updater may run more than once and should have no side effects.

        Args:
            updater: a function (or coroutine function) from the current value (or
                ``default`` when the key does not exist) to the new one.

        Raises:
            VersionConflict: still conflicting after ``timeout`` seconds.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        entry = await self.get_entry(key)
        value = entry.value if entry.exists else default
        version = entry.version
        conflicts = 0
        while True:
            new_value = updater(value)
            if inspect.isawaitable(new_value):
                new_value = await new_value
            try:
                await self.cas(key, version, new_value, ttl=ttl, fence=fence)
                return new_value
            except VersionConflict as conflict:
                conflicts += 1
                if loop.time() >= deadline:
                    raise
                version = conflict.current_version
                value = conflict.current_value if version else default
                if conflicts > 1:
                    # Several writers keep colliding: spread them out so one gets through.
                    ceiling = min(UPDATE_BACKOFF_MAX_S, UPDATE_BACKOFF_BASE_S * 2 ** min(conflicts, 16))
                    await asyncio.sleep(random.uniform(0, ceiling))

    async def list(self, prefix: str = "", *, values: bool = True) -> builtins.list[Versioned]:
        """Every key under ``prefix`` in key order (values None unless ``values``)."""
        found: builtins.list[Versioned] = []
        after: str | None = None
        while True:
            page: StateItems = await self._call(
                lambda req: StateList(req, prefix, after, MAX_LIST_ITEMS, values))
            found.extend(Versioned(key, decode_value(value), version)
                         for key, version, value in page.items)
            if not page.more or not page.items:
                return found
            after = page.items[-1].key

    # ------------------------------------------------------------------ locks

    async def acquire(self, name: str, *, ttl: float = 10.0, wait: float | None = 5.0) -> Lease:
        """Take the lock ``name`` for ``ttl`` seconds (renewed in the background until
        released), waiting up to ``wait`` seconds (None: no limit; 0: try once).

        Raises:
            LockTimeout: others held it for the whole ``wait``.
        """
        timeout = (wait if wait is not None else 365 * 86400.0) + self.request_timeout_s
        reply: LeaseGranted = await self._call(lambda req: LockAcquire(req, name, ttl, wait),
                                               timeout, acquire=True)
        lease = Lease(self, name, reply.token, reply.ttl_s)
        self._leases[name] = lease
        lease._start_renewing()
        return lease

    @asynccontextmanager
    async def lock(self, name: str, ttl: float = 10.0, wait: float | None = 5.0
                   ) -> AsyncIterator[Lease]:
        """``async with state.lock(name, ttl=10, wait=5) as lease:`` holds the lock for
        the block (renewing it) and releases it on exit, whatever happens inside.

        Raises:
            LockTimeout: others held it for the whole ``wait``.
        """
        lease = await self.acquire(name, ttl=ttl, wait=wait)
        try:
            yield lease
        finally:
            await lease.release()

    async def locks(self, prefix: str = "") -> builtins.list[LockInfo]:
        """The held locks under ``prefix``: name, token, holder, session, seconds left,
        waiters."""
        reply: LockTable = await self._call(lambda req: LockList(req, prefix))
        return reply.locks

    # ------------------------------------------------------------------ watches

    async def watch(self, prefix: str, handler: Handler, *, since: int | None = None) -> Watch:
        """Call ``handler(change)`` for every change of keys under ``prefix``, in version
        order, from now on (or from after version ``since``). Returns once the watch is
        in place: every later write is seen. A coroutine handler is awaited change by
        change. The watch is set up again after reconnects, without gaps or repeats
        while the service's change log reaches back far enough.
        """
        watch = Watch(self, prefix, handler, since)
        try:
            await self._call(lambda req: self._watch_request(watch, req))
        except BaseException:
            watch.active = False
            self._watches.pop(watch.id, None)
            if watch._consumer is not None:
                watch._consumer.cancel()
            raise
        return watch

    def _watch_request(self, watch: Watch, req: int) -> StateWatch:
        # Registered under its req before sending: the events may arrive right after the
        # reply, in the same read, before the awaiting coroutine runs again.
        self._watches.pop(watch.id, None)
        watch.id = req
        self._watches[req] = watch
        return StateWatch(req, watch.prefix, watch.last_version)

    # ------------------------------------------------------------------ info

    async def info(self) -> dict[str, Any]:
        """The service's counters (keys, version, sessions, locks, requests, errors)."""
        reply: StateInfo = await self._call(lambda req: StateInfoRequest(req))
        return reply.info

    async def ping(self, timeout: float = 2.0) -> None:
        """Return if the service answers within ``timeout``, else raise StateUnavailable."""
        await self._call(lambda req: StateInfoRequest(req), timeout)

    # ------------------------------------------------------------------ requests

    async def _call(self, make: Callable[[int], StateMessage], timeout: float | None = None,
                    acquire: bool = False) -> Any:
        loop = asyncio.get_running_loop()
        timeout = self.request_timeout_s if timeout is None else timeout
        deadline = loop.time() + timeout
        while True:
            ready = self._ready
            if ready is None or not ready.is_set():
                await self._ensure_session(max(0.0, deadline - loop.time()))
            conn = self._conn
            assert conn is not None
            req = next(self._req_ids)
            future: asyncio.Future[Any] = loop.create_future()
            request = make(req)
            # No timer per request (on a busy client, timers were a large share of a
            # request's cost): the heartbeat loop fails requests past their deadline.
            self._requests[req] = _Pending(future, self._epoch, request, deadline, timeout)
            epoch = self._epoch
            try:
                conn.send(request)
                self._last_sent = loop.time()
                return await future
            except _NoSession:
                # Refused unapplied: open the session again (unless a newer one already
                # exists), then send it again.
                self._session_lost(epoch)
                continue
            except (asyncio.CancelledError, StateUnavailable):
                if acquire:
                    # Given up on, but the grant may still come: give the lock straight
                    # back then rather than hold it, unrenewed, for a whole ttl.
                    self._abandoned_acquires.add(req)
                raise
            finally:
                self._requests.pop(req, None)

    async def _ensure_session(self, timeout: float | None = None) -> None:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        if self._ready is None:
            self._ready = asyncio.Event()
        while not self._ready.is_set():
            if self._closed:
                raise StateUnavailable(self.url, 0.0, "the state client is closed")
            if self._hello_task is None or self._hello_task.done():
                self._hello_task = loop.create_task(self._establish())
            task = self._hello_task
            remaining = None if deadline is None else max(0.0, deadline - loop.time())
            # asyncio.wait, not wait_for: a caller giving up must not cancel the HELLO
            # other callers wait for too.
            done, _ = await asyncio.wait((task,), timeout=remaining)
            if not done:
                raise StateUnavailable(self.url, timeout or 0.0)
            if task.cancelled():
                continue  # a reconnect replaced this HELLO with a new one
            task.result()

    async def _establish(self) -> None:
        """Connect if needed, say HELLO, adopt the WELCOME's settings, check leases, and
        set the watches up again."""
        loop = asyncio.get_running_loop()
        self.state = ConnectionState.CONNECTING
        if self._conn is None:
            if not isinstance(self._url_source, str):
                self.url = await self._url_source()
            self._conn = _Connection(self.url, self.session_id.encode(), self._on_message,
                                     self._on_transport)
            self._conn.open()
            self._last_heard = loop.time()
            if self._heartbeat_task is None:
                self._heartbeat_task = loop.create_task(self._heartbeat_loop(),
                                                        name=f"{self.session_id}-heartbeat")
        req = next(self._req_ids)
        future: asyncio.Future[StateWelcome] = loop.create_future()
        # No deadline: a silent service makes the heartbeat loop reconnect, which
        # cancels this task, and whoever waits for the session starts a new one.
        self._requests[req] = _Pending(future, self._epoch)
        try:
            self._conn.send(StateHello(req, self.name))
            self._last_sent = loop.time()
            welcome = await future
        finally:
            self._requests.pop(req, None)
        self._on_welcome(welcome)

    def _on_welcome(self, welcome: StateWelcome) -> None:
        restarted = self.instance is not None and welcome.instance != self.instance
        self.instance = welcome.instance
        self.heartbeat_interval_s = welcome.heartbeat_interval_s
        self.heartbeat_liveness = welcome.heartbeat_liveness
        self._reconnect_delay_s = RECONNECT_MIN_S
        previous_epoch = self._epoch
        self._epoch += 1
        if restarted:
            # Requests sent before this HELLO reached the old run of the service or were
            # refused with no_session (and resent); one still waiting went down with it.
            lost = [p for p in self._requests.values() if p.epoch <= previous_epoch]
            for pending in lost:
                if not pending.future.done():
                    pending.future.set_exception(StateUnavailable(
                        self.url, 0.0, "the state service restarted before answering; the "
                        "request may or may not have been applied"))
        held = {(name, token) for name, token, _ in welcome.leases}
        for lease in list(self._leases.values()):
            if (lease.name, lease.token) not in held:
                lease._mark_lost("the session ended on the service (expired or restarted)")
        for watch in list(self._watches.values()):
            if watch.active:
                req = next(self._req_ids)
                msg = self._watch_request(watch, req)
                assert self._conn is not None
                self._conn.send(msg)
        self.state = ConnectionState.READY
        assert self._ready is not None
        self._ready.set()

    def _session_lost(self, epoch: int) -> None:
        if epoch == self._epoch and self._ready is not None and self._ready.is_set():
            self._ready.clear()
            self.state = ConnectionState.CONNECTING

    # ------------------------------------------------------------------ heartbeats

    async def _heartbeat_loop(self) -> None:
        loop = asyncio.get_running_loop()
        next_reconnect = 0.0
        while not self._closed:
            await asyncio.sleep(self.heartbeat_interval_s / 2)
            now = loop.time()
            self._expire_requests(now)
            conn = self._conn
            if conn is None:
                # Reconnecting failed so far (the service, or the broker that says where
                # it is, was unreachable): try again if a watch or a lease needs it.
                if ((self._watches or self._leases) and now >= next_reconnect
                        and (self._hello_task is None or self._hello_task.done())):
                    next_reconnect = now + self._reconnect_delay_s
                    self._reconnect_delay_s = min(self._reconnect_delay_s * 2, RECONNECT_MAX_S)
                    self._hello_task = loop.create_task(self._establish_logged())
                continue
            silence = now - self._last_heard
            if silence > self.heartbeat_interval_s * self.heartbeat_liveness:
                if now >= next_reconnect:
                    next_reconnect = now + self._reconnect_delay_s
                    self._reconnect_delay_s = min(self._reconnect_delay_s * 2, RECONNECT_MAX_S)
                    if self._transport_up:
                        # Connected as far as TCP knows, yet silent: a half-open connection
                        # (a partition) that libzmq does not notice. Start over.
                        logger.warning("state service at %s silent for %.1f s; reconnecting",
                                       self.url, silence)
                        self._reconnect()
                    elif not isinstance(self._url_source, str) and (
                            self._moved_check is None or self._moved_check.done()):
                        # Disconnected: libzmq keeps reconnecting on its own, and requests
                        # queued meanwhile go out then. Only if the service moved (a new
                        # port after a restart) must the connection change.
                        self._moved_check = loop.create_task(self._follow_if_moved())
                continue
            if self.state is ConnectionState.READY and \
                    now - self._last_sent >= self.heartbeat_interval_s:
                conn.send(StatePing())
                self._last_sent = now

    def _on_transport(self, up: bool) -> None:
        self._transport_up = up
        if up:
            # A handshake with the service: it is alive, whatever it said last.
            self._last_heard = asyncio.get_running_loop().time()

    async def _follow_if_moved(self) -> None:
        assert not isinstance(self._url_source, str)
        try:
            url = await self._url_source()
        except OrchestratorError as e:
            logger.info("cannot ask where the state service is now: %s", e)
            return
        if url != self.url and not self._closed:
            logger.warning("the state service moved from %s to %s; reconnecting", self.url, url)
            self._reconnect()

    def _reconnect(self) -> None:
        """Drop the connection; the next HELLO makes a new one under the same routing id
        (asking where the service is again, in case it moved). What was in flight is
        lost."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self._transport_up = False
        self._fail_pending(StateUnavailable(self.url, 0.0, "the connection to the state "
                                            "service was lost; the outcome is unknown"))
        if self._hello_task is not None:
            self._hello_task.cancel()
            self._hello_task = None
        if self._ready is not None:
            self._ready.clear()
        self.state = ConnectionState.CONNECTING
        if self._watches or self._leases:
            # Something to restore: do not wait for the next request to say HELLO.
            self._hello_task = asyncio.get_running_loop().create_task(self._establish_logged())

    async def _establish_logged(self) -> None:
        try:
            await self._establish()
        except OrchestratorError as e:
            # StateUnavailable, or BrokerUnavailable from asking the broker where the
            # service is; the heartbeat loop tries again.
            logger.warning("state session not restored yet: %s", e)

    def _expire_requests(self, now: float) -> None:
        for pending in [p for p in self._requests.values() if p.deadline <= now]:
            if not pending.future.done():
                pending.future.set_exception(StateUnavailable(self.url, pending.timeout_s))

    def _fail_pending(self, error: Exception) -> None:
        pending, self._requests = self._requests, {}
        for item in pending.values():
            if not item.future.done():
                item.future.set_exception(error)

    # ------------------------------------------------------------------ input

    def _on_message(self, msg: StateMessage) -> None:
        self._last_heard = asyncio.get_running_loop().time()
        match msg:
            case StateEvents(watch_id, events, resync):
                watch = self._watches.get(watch_id)
                if watch is not None and watch.active:
                    watch._deliver(events, resync)
            case StatePing():
                pass
            case StateErrorReply():
                self._on_error(msg)
            case StateDone(req, version) if req in self._watches:
                watch = self._watches[req]
                # From here on the watch has seen everything up to this version.
                if watch.last_version is None:
                    watch.last_version = version
                self._resolve(req, msg)
            case LeaseGranted(req) if req in self._abandoned_acquires:
                self._abandoned_acquires.discard(req)
                if self._conn is not None:
                    self._conn.send(LockRelease(next(self._req_ids), msg.name, msg.token))
            case _:
                reply_to: int | None = getattr(msg, "req", None)
                if reply_to is None or not self._resolve(reply_to, msg):
                    if logger.isEnabledFor(logging.DEBUG):
                        logger.debug("unexpected %s from the state service", type(msg).__name__)

    def _resolve(self, req: int, result: Any) -> bool:
        pending = self._requests.get(req)
        if pending is None or pending.future.done():
            return False
        pending.future.set_result(result)
        return True

    def _on_error(self, error: StateErrorReply) -> None:
        req = error.req
        if error.code == StateErrorCode.WATCH_OVERFLOW.value and req in self._watches:
            watch = self._watches[req]
            logger.warning("watch %r fell behind and is set up again from version %d",
                           watch.prefix, watch.last_version)
            if self._conn is not None:
                self._conn.send(self._watch_request(watch, next(self._req_ids)))
            return
        if req in self._abandoned_acquires:
            self._abandoned_acquires.discard(req)
            return
        pending = self._requests.get(req) if req is not None else None
        if pending is None and error.code == StateErrorCode.NO_SESSION.value:
            # A PING found the session gone (the service restarted, or we were silent too
            # long): open it again now if watches, leases or requests depend on it (the
            # new WELCOME tells whether requests in flight were lost with a restart).
            self._session_lost(self._epoch)
            if (self._watches or self._leases or self._requests) and (
                    self._hello_task is None or self._hello_task.done()):
                self._hello_task = asyncio.get_running_loop().create_task(
                    self._establish_logged())
            return
        if pending is None or pending.future.done():
            logger.warning("state service error %s: %s", error.code, error.message)
            return
        pending.future.set_exception(_error_for(error, pending.request))


def _error_for(error: StateErrorReply, request: StateMessage | None) -> Exception:
    """The SDK exception for an ERROR reply, with the request's key or lock filled in."""
    code = error.code
    if code == StateErrorCode.NO_SESSION.value:
        return _NoSession()
    if code == StateErrorCode.CONFLICT.value:
        key = getattr(request, "key", "")
        expected = getattr(request, "expected", None)
        return VersionConflict(key, -1 if expected is None else expected, error.current or 0,
                               decode_value(error.value), error.message)
    if code == StateErrorCode.LOCK_TIMEOUT.value:
        return LockTimeout(getattr(request, "name", ""), getattr(request, "wait_s", None),
                           error.message)
    if code == StateErrorCode.STALE_TOKEN.value:
        fence = getattr(request, "fence", None) or ("", -1)
        return StaleFencingToken(fence[0], fence[1], error.message)
    if code == StateErrorCode.NOT_HELD.value:
        return LeaseLost(getattr(request, "name", ""), getattr(request, "token", -1),
                         error.message)
    return StateError(code, error.message)


def _fence(fence: FenceLike | None) -> Fence | None:
    if fence is None:
        return None
    if isinstance(fence, Lease):
        return fence.fence
    name, token = fence
    return (str(name), int(token))


class SyncStateClient:
    """The :class:`StateClient` API as blocking calls (scripts, the CLI), run on an event
    loop in a background thread. Locks and watches need the async client."""

    def __init__(self, url: str | None = None, **options: Any) -> None:
        from agent_sdk.loop import new_event_loop

        self._loop = new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="orchestrator-state",
                                        daemon=True)
        self._thread.start()
        self.client: StateClient = self._call(self._make(url, options))

    @staticmethod
    async def _make(url: str | None, options: dict[str, Any]) -> StateClient:
        return StateClient(url, **options)

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def connect(self, timeout: float | None = None) -> None:
        self._call(self.client.connect(timeout))

    def get(self, key: str, default: Any = None) -> Any:
        return self._call(self.client.get(key, default))

    def get_entry(self, key: str) -> Versioned:
        return self._call(self.client.get_entry(key))

    def set(self, key: str, value: Any, **options: Any) -> int:
        return self._call(self.client.set(key, value, **options))

    def cas(self, key: str, expected_version: int, value: Any, **options: Any) -> int:
        return self._call(self.client.cas(key, expected_version, value, **options))

    def delete(self, key: str, **options: Any) -> bool:
        return self._call(self.client.delete(key, **options))

    def update(self, key: str, updater: Callable[[Any], Any], **options: Any) -> Any:
        return self._call(self.client.update(key, updater, **options))

    def list(self, prefix: str = "", *, values: bool = True) -> builtins.list[Versioned]:
        return self._call(self.client.list(prefix, values=values))

    def locks(self, prefix: str = "") -> builtins.list[LockInfo]:
        return self._call(self.client.locks(prefix))

    def info(self) -> dict[str, Any]:
        return self._call(self.client.info())

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            self._call(self.client.close())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
            self._loop.close()

    def __enter__(self) -> SyncStateClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = [
    "Change", "ConnectionState", "Lease", "StateClient", "SyncStateClient", "Versioned", "Watch",
    "decode_value", "encode_value", "endpoint_from",
]
