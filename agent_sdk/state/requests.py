"""The requests a state session has in flight, and the SDK exception for each refusal."""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass
from typing import Any

from wire.state import StateErrorCode, StateErrorReply, StateMessage
from agent_sdk.errors import (
    LeaseLost, LockTimeout, StaleFencingToken, StateAccessDenied, StateError, StateUnavailable,
    VersionConflict,
)
from agent_sdk.state.values import decode_value


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


__all__ = ["NoSession", "Pending", "Requests", "error_for"]
