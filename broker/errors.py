"""Exceptions of the broker package; :class:`BrokerError` is the root of all of them."""

from __future__ import annotations


class BrokerError(Exception):
    """Raised for any failure the broker package reports on purpose."""


class ProtocolError(BrokerError):
    """Raised when a peer breaks the wire protocol."""

    def __init__(self, message: str, code: str = "bad_frame") -> None:
        super().__init__(message)
        #: the stable error code sent back to the peer (see ``protocol.ErrorCode``)
        self.code = str(getattr(code, "value", code))


class DecodeError(ProtocolError):
    """Raised when frames cannot be decoded into a protocol message."""


class TooLarge(ProtocolError):
    """Raised when a frame is bigger than the protocol's ``MAX_FRAME_BYTES``."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"frame of {size} bytes exceeds the limit of {limit} bytes", "too_large")
        self.size = size
        self.limit = limit


class ConfigError(BrokerError):
    """Raised when broker configuration values are invalid."""
