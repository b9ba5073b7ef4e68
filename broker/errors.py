"""Exceptions of the broker package; :class:`BrokerError` is the root of its own.

The wire errors (:class:`~wire.errors.DecodeError`, :class:`~wire.errors.TooLarge`,
:class:`~wire.errors.StateDecodeError`, all :class:`~wire.errors.WireError`) live in
``wire.errors`` and are re-exported here for one release.
"""

from __future__ import annotations

from typing import Any

from wire.errors import DecodeError, StateDecodeError, TooLarge, WireError

#: The old name of the wire errors' root.
ProtocolError = WireError

__all__ = [
    "BrokerError", "ConfigError", "DecodeError", "IllegalTransition", "NotHeld", "ProtocolError", "StaleToken",
    "StateDecodeError", "StateRequestError", "TooLarge", "VersionConflict", "WireError",
]


class BrokerError(Exception):
    """Raised for any failure the broker package reports on purpose."""


class IllegalTransition(BrokerError):
    """Raised when an event does not apply to a task's current state: a broker bug,
    caught by the engine's table (``broker/engine/model.py``) before it corrupts books.

    Plain Python (this module is not compiled), so that callers of compiled code can
    catch it like any exception."""

    def __init__(self, task_id: str, state: Any, event: Any) -> None:
        super().__init__(f"task {task_id!r}: {event.value} is not allowed in state "
                         f"{state.value}")
        self.task_id = task_id
        #: the task's state, in which the event does not apply
        self.current_state = state
        self.event = event


class ConfigError(BrokerError):
    """Raised when broker configuration values are invalid."""


class StateRequestError(BrokerError):
    """Raised when the state service refuses a well-formed request (a conflict, a lock
    that is not held, a stale fencing token); ``code`` is the stable error code."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = str(getattr(code, "value", code))


class VersionConflict(StateRequestError):
    """Raised when a compare-and-set finds another version than the expected one."""

    def __init__(self, key: str, expected: int, current: int, value: bytes | None) -> None:
        super().__init__(f"key {key!r} is at version {current}, not the expected {expected}",
                         "conflict")
        self.key = key
        self.expected = expected
        #: the key's version now (0: it does not exist) and its encoded value
        self.current = current
        self.value = value


class NotHeld(StateRequestError):
    """Raised when a session renews or releases a lease it does not hold (any more)."""

    def __init__(self, name: str, token: int) -> None:
        super().__init__(f"lock {name!r} is not held under token {token} by this session "
                         "(it expired or was released)", "not_held")
        self.name = name
        self.token = token


class StaleToken(StateRequestError):
    """Raised when a write is guarded by a fencing token that is not the lock's current
    lease (its holder lost the lock, or the token was never issued)."""

    def __init__(self, name: str, token: int, current: int | None) -> None:
        held = f"the current lease is token {current}" if current else "nobody holds it now"
        super().__init__(f"fencing token {token} of lock {name!r} is stale: {held}",
                         "stale_token")
        self.name = name
        self.token = token
        self.current = current
