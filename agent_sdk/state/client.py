"""``StateClient``: the calls on shared state (keys, compare-and-set, locks, watches)."""

from __future__ import annotations

import asyncio
import builtins
import inspect
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Final

from wire.state import (
    LeaseGranted, LockAcquire, LockInfo, LockList, LockTable, MAX_LIST_ITEMS, StateDelete,
    StateDone, StateGet, StateInfo, StateInfoRequest, StateItems, StateList, StatePut,
    StateValue,
)
from agent_sdk.config import state_url
from agent_sdk.errors import VersionConflict
from agent_sdk.state.leases import fence_of, Lease
from agent_sdk.state.session import REQUEST_TIMEOUT_S, Session
from agent_sdk.state.values import (
    ConnectionState, decode_value, encode_value, FenceLike, Handler, Versioned,
)
from agent_sdk.state.watches import Watch

logger = logging.getLogger(__name__)

#: ``update`` back-off after the second conflict in a row: uniform in [0, base x 2^n],
#: capped. The first retry goes at once: the conflict brought the current value along.
UPDATE_BACKOFF_BASE_S: Final = 0.0005
UPDATE_BACKOFF_MAX_S: Final = 0.05
#: How long ``update`` keeps retrying before it gives up with the last conflict.
UPDATE_TIMEOUT_S: Final = 30.0
#: ``acquire(wait=None)`` waits without limit: a year stands for that.
_FOREVER_S: Final = 365 * 86400.0


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
        self.name = name
        self._session = Session(url if url is not None else state_url(), name,
                                request_timeout_s)
        self.session_id = self._session.session_id

    @property
    def url(self) -> str:
        """The service's endpoint ("" until an async ``url`` was resolved)."""
        return self._session.url

    @property
    def state(self) -> ConnectionState:
        """The connection's state."""
        return self._session.state

    @property
    def instance(self) -> str | None:
        """Id of the service run the session belongs to (changes when it restarts)."""
        return self._session.instance

    @property
    def heartbeat_interval_s(self) -> float:
        """Seconds between pings of an idle session, as the service asks."""
        return self._session.heartbeat_interval_s

    @property
    def heartbeat_liveness(self) -> int:
        """Intervals of silence after which the service ends the session."""
        return self._session.heartbeat_liveness

    @property
    def request_timeout_s(self) -> float:
        """How long a request waits for its reply."""
        return self._session.request_timeout_s

    @request_timeout_s.setter
    def request_timeout_s(self, value: float) -> None:
        self._session.request_timeout_s = value

    # ------------------------------------------------------------------ lifecycle

    async def connect(self, timeout: float | None = None) -> StateClient:
        """Open the connection and the session (every call does it on first use).

        Raises:
            StateUnavailable: the service did not answer within ``timeout``.
        """
        await self._session.ensure(self.request_timeout_s if timeout is None else timeout)
        return self

    async def close(self) -> None:
        """Release held locks, stop watches and heartbeats, close the connection."""
        session = self._session
        if session.closed:
            return
        for lease in list(session.leases.values()):
            try:
                await asyncio.wait_for(lease.release(), session.heartbeat_interval_s)
            except asyncio.TimeoutError:
                logger.warning("releasing lock %r timed out at close", lease.name)
        await session.close()

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
        reply: StateValue = await self._session.call(lambda req: StateGet(req, key))
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
        guard = fence_of(fence)
        reply: StateDone = await self._session.call(
            lambda req: StatePut(req, key, data, None, ttl, guard))
        return reply.version

    async def cas(self, key: str, expected_version: int, value: Any, *,
                  ttl: float | None = None, fence: FenceLike | None = None) -> int:
        """Write ``key`` only if it is at ``expected_version`` (0: only if it does not
        exist); returns the new version.

        Raises:
            VersionConflict: it is at another version (``current_version`` says which).
        """
        data = encode_value(value)
        guard = fence_of(fence)
        reply: StateDone = await self._session.call(
            lambda req: StatePut(req, key, data, expected_version, ttl, guard))
        return reply.version

    async def delete(self, key: str, *, expected_version: int | None = None,
                     fence: FenceLike | None = None) -> bool:
        """Delete ``key``; returns whether it existed.

        Raises:
            VersionConflict: ``expected_version`` was given and the key is at another.
        """
        guard = fence_of(fence)
        reply: StateDone = await self._session.call(
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
                    ceiling = min(UPDATE_BACKOFF_MAX_S,
                                  UPDATE_BACKOFF_BASE_S * 2 ** min(conflicts, 16))
                    await asyncio.sleep(random.uniform(0, ceiling))

    async def list(self, prefix: str = "", *, values: bool = True) -> builtins.list[Versioned]:
        """Every key under ``prefix`` in key order (values None unless ``values``)."""
        found: builtins.list[Versioned] = []
        after: str | None = None
        while True:
            page: StateItems = await self._session.call(
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
        timeout = (wait if wait is not None else _FOREVER_S) + self.request_timeout_s
        reply: LeaseGranted = await self._session.call(
            lambda req: LockAcquire(req, name, ttl, wait), timeout, acquire=True)
        lease = Lease(self._session, name, reply.token, reply.ttl_s)
        self._session.leases[name] = lease
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
        reply: LockTable = await self._session.call(lambda req: LockList(req, prefix))
        return reply.locks

    # ------------------------------------------------------------------ watches

    async def watch(self, prefix: str, handler: Handler, *, since: int | None = None) -> Watch:
        """Call ``handler(change)`` for every change of keys under ``prefix``, in version
        order, from now on (or from after version ``since``). Returns once the watch is
        in place: every later write is seen. A coroutine handler is awaited change by
        change. The watch is set up again after reconnects, without gaps or repeats
        while the service's change log reaches back far enough.
        """
        session = self._session
        watch = Watch(session, prefix, handler, since)
        try:
            await session.call(lambda req: session.watch_request(watch, req))
        except BaseException:
            watch._stop()
            session.watches.pop(watch.id, None)
            raise
        return watch

    # ------------------------------------------------------------------ info

    async def info(self) -> dict[str, Any]:
        """The service's counters (keys, version, sessions, locks, requests, errors)."""
        reply: StateInfo = await self._session.call(lambda req: StateInfoRequest(req))
        return reply.info

    async def ping(self, timeout: float = 2.0) -> None:
        """Return if the service answers within ``timeout``, else raise StateUnavailable."""
        await self._session.call(lambda req: StateInfoRequest(req), timeout)


__all__ = ["StateClient", "UPDATE_TIMEOUT_S"]
