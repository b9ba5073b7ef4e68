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
    """Raised when a frame is bigger than the broker's frame limit (``MAX_FRAME_BYTES``
    or its ``--max-message-bytes``), or a header bigger than its header limit."""

    def __init__(self, size: int, limit: int, what: str = "frame",
                 setting: str = "max_message_bytes") -> None:
        super().__init__(f"{what} of {size} bytes exceeds the limit of {limit} bytes "
                         f"({setting})", "too_large")
        self.size = size
        self.limit = limit


class HeaderTooLarge(DecodeError):
    """Raised by a receiver when a message's header frame is bigger than its
    ``--max-header-bytes``: the message is refused with ``too_large`` undecoded."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"message header of {size} bytes exceeds the limit of {limit} bytes "
                         "(max_header_bytes)", "too_large")
        self.size = size
        self.limit = limit


class StateDecodeError(DecodeError):
    """Raised when frames cannot be decoded into a state service message; carries the
    request id when the header got that far, so that the refusal reaches its caller."""

    def __init__(self, message: str, code: str = "bad_frame", req: int | None = None) -> None:
        super().__init__(message, code)
        self.req = req
