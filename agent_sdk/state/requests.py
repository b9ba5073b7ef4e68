"""The requests a state session has in flight, and the SDK exception for each refusal."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TYPE_CHECKING

from wire.state import StateErrorCode, StateErrorReply, StateMessage
from agent_sdk.errors import (
    LeaseLost, LockTimeout, StaleFencingToken, StateAccessDenied, StateError, StateUnavailable,
    VersionConflict,
)
from agent_sdk.state.values import decode_value

if TYPE_CHECKING:
    from agent_sdk.connection import Connection


class NoSession(Exception):
    """The service answered ``no_session``: say HELLO, then send the request again.

    Internal: the session catches it, so it never reaches a caller.
    """


@dataclass(slots=True)
class Pending:
    """One request waiting for its reply."""

    future: asyncio.Future[Any]
    #: the session epoch (count of WELCOMEs) when the request was sent
    epoch: int
    #: the request itself, to word its errors (which key, which lock)
    request: StateMessage | None = None
    #: loop time after which the heartbeat loop fails it with StateUnavailable
    deadline: float = float("inf")
    timeout_s: float = 0.0


class Requests:
    """The requests in flight on one session, by request id.

    No timer per request (on a busy client, timers were a large share of a request's
    cost): the session's heartbeat loop calls :meth:`expire` instead.

    Attributes:
        abandoned_acquires: lock acquires whose caller gave up; a grant that still comes
            for one is given straight back.
    """

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self._pending: dict[int, Pending] = {}
        self.abandoned_acquires: set[int] = set()

    def next_id(self) -> int:
        """A request id not used before on this session."""
        return next(self._ids)

    def add(self, req: int, pending: Pending) -> None:
        """Wait for the reply to ``req``."""
        self._pending[req] = pending

    def send(self, conn: Connection[StateMessage] | None, make: Callable[[int], StateMessage],
             epoch: int, deadline: float, timeout_s: float) -> tuple[int, asyncio.Future[Any]]:
        """Make a request under a new id, wait for its reply, and send it on ``conn`` (the
        open session's); returns its id and the future the reply resolves."""
        assert conn is not None, "a request sent before the session opened"
        req = self.next_id()
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        request = make(req)
        self.add(req, Pending(future, epoch, request, deadline, timeout_s))
        try:
            conn.send(request)
        except BaseException:
            self.pop(req)
            raise
        return req, future

    def get(self, req: int | None) -> Pending | None:
        """The request waiting under ``req``, if any."""
        return self._pending.get(req) if req is not None else None

    def pop(self, req: int) -> None:
        """Stop waiting for ``req`` (its caller returned or gave up)."""
        self._pending.pop(req, None)

    def __bool__(self) -> bool:
        return bool(self._pending)

    def resolve(self, req: int, result: Any) -> bool:
        """Hand ``result`` to the caller waiting for ``req``; False if none waits."""
        pending = self._pending.get(req)
        if pending is None or pending.future.done():
            return False
        pending.future.set_result(result)
        return True

    def expire(self, now: float, url: str) -> None:
        """Fail the requests whose deadline passed with :class:`StateUnavailable`."""
        for pending in [p for p in self._pending.values() if p.deadline <= now]:
            if not pending.future.done():
                pending.future.set_exception(StateUnavailable(url, pending.timeout_s))

    def fail_all(self, error: Exception) -> None:
        """Fail every request in flight with ``error`` and forget them."""
        pending, self._pending = self._pending, {}
        for item in pending.values():
            if not item.future.done():
                item.future.set_exception(error)

    def fail_sent_before(self, epoch: int, error: Exception) -> None:
        """Fail the requests sent in session ``epoch`` or earlier with ``error``."""
        for pending in [p for p in self._pending.values() if p.epoch <= epoch]:
            if not pending.future.done():
                pending.future.set_exception(error)


def error_for(error: StateErrorReply, request: StateMessage | None) -> Exception:
    """The SDK exception for an ERROR reply, with the request's key or lock filled in.

    Args:
        error: the service's refusal.
        request: the request it answers, when known.

    Returns:
        A :class:`StateError` subclass, or :class:`NoSession` for ``no_session``.
    """
    code = error.code
    if code == StateErrorCode.NO_SESSION.value:
        return NoSession()
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
    if code == StateErrorCode.UNAUTHORIZED.value:
        return StateAccessDenied(error.message)
    if code == StateErrorCode.NOT_HELD.value:
        return LeaseLost(getattr(request, "name", ""), getattr(request, "token", -1),
                         error.message)
    return StateError(code, error.message)


class Line:
    """Requests waiting for the session to open, served first come first sent.

    Without it a request made just as the session opened went out before those still
    waking from the wait, and a later write (an agent's newest LLM usage) was
    overwritten by an older one. While anyone waits (:meth:`__bool__`), a new request
    goes behind them.
    """

    def __init__(self) -> None:
        self._lock: asyncio.Lock | None = None  # made in the loop that first queues
        self._waiting = 0

    def __bool__(self) -> bool:
        return self._waiting > 0

    @contextlib.asynccontextmanager
    async def turn(self, timeout_s: float) -> AsyncIterator[None]:
        """Hold the front of the line for the ``async with`` block.

        Raises:
            TimeoutError: the front was not reached within ``timeout_s``.
        """
        if self._lock is None:
            self._lock = asyncio.Lock()
        lock = self._lock
        self._waiting += 1
        try:
            await asyncio.wait_for(lock.acquire(), timeout_s)
            try:
                yield
            finally:
                lock.release()
        finally:
            self._waiting -= 1


__all__ = ["Line", "NoSession", "Pending", "Requests", "error_for"]
