"""Exceptions of the wire package; :class:`WireError` is the root of all of them.

They carry the stable error code a refusal sends back to the peer (``bad_frame``,
``bad_version``, ``unknown_command``, ``too_large``, ``bad_request``...). The broker
re-exports them from ``broker.errors``; the SDK raises its own subclasses of them that
are also ``agent_sdk.OrchestratorError``s.
"""

from __future__ import annotations


class WireError(Exception):
    """Raised when frames break the wire protocol, on either side of a connection."""

    def __init__(self, message: str, code: str = "bad_frame") -> None:
        super().__init__(message)
        #: the stable error code sent back to the peer (see ``wire.tasks.ErrorCode``)
        self.code = str(getattr(code, "value", code))


class DecodeError(WireError):
    """Raised when frames cannot be decoded into a protocol message."""


class TooLarge(WireError):
    """Raised when a frame is bigger than the protocol's ``MAX_FRAME_BYTES``."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"frame of {size} bytes exceeds the limit of {limit} bytes", "too_large")
        self.size = size
        self.limit = limit


class StateDecodeError(DecodeError):
    """Raised when frames cannot be decoded into a state service message; carries the
    request id when the header got that far, so that the refusal reaches its caller."""

    def __init__(self, message: str, code: str = "bad_frame", req: int | None = None) -> None:
        super().__init__(message, code)
        self.req = req
