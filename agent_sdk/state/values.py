"""What state calls take and return: values, versioned entries, changes, fences."""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TYPE_CHECKING, Union

from wire.codec import packb, unpackb
from wire.state import MAX_VALUE_BYTES, StateErrorCode
from agent_sdk.errors import StateError, StateUnavailable

if TYPE_CHECKING:
    from agent_sdk.state.leases import Lease

#: A fencing guard: a :class:`~agent_sdk.state.Lease`, or ``(lock name, token)``.
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

    Args:
        endpoints: the map (anything else counts as no map).
        source: who announced it, for the error message.

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
        """Whether the key exists (it has a version)."""
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


__all__ = [
    "Change", "ConnectionState", "FenceLike", "Handler", "Versioned", "decode_value",
    "encode_value", "endpoint_from",
]
