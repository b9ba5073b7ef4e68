"""The codec core shared by every command range: msgpack settings, blob placement and
the validators that turn a decoded header into typed fields.

Nothing here knows a command; :mod:`wire.tasks`, :mod:`wire.state` and :mod:`wire.bus`
build their messages from these pieces. The validators raise ``ValueError`` (or
:class:`~wire.errors.DecodeError`); the decoders turn any of them into the peer's
``bad_frame``.
"""

from __future__ import annotations

from typing import Any, Final

import msgpack

from wire.errors import DecodeError
from wire.limits import (
    INLINE_PAYLOAD_MAX, MAX_BATCH_ITEMS, PROTOCOL_VERSION, SIGNATURE, SIGNATURE_PREFIX,
)


def chunks(items: list[Any], size: int = MAX_BATCH_ITEMS) -> list[list[Any]]:
    """``items`` cut into lists of at most ``size`` (one message each)."""
    if len(items) <= size:
        return [items]
    return [items[i:i + size] for i in range(0, len(items), size)]

#: The payload type as the broker holds it: bytes, or a zmq.Frame for large blobs.
Payload = Any


# ------------------------------------------------------------------------- encoding

pack = msgpack.Packer(use_bin_type=True).pack
EMPTY_MAP: Final = pack({})


def packb(obj: Any) -> bytes:
    """msgpack-encode ``obj`` the way every frame of this protocol is encoded."""
    return pack(obj)


def unpackb(data: Any) -> Any:
    """Decode a msgpack value: strings as str, bin as bytes, arrays as lists."""
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def unpack_header(data: Any) -> Any:
    # Arrays as tuples: batch items then are the NamedTuples' contents already.
    return msgpack.unpackb(data, raw=False, strict_map_key=False, use_list=False)


def items_with_blobs(items: list[Any], payload_index: int, blobs: list[Any]) -> list[Any]:
    """Items as they go on the wire: small payloads inline, large ones (and zmq.Frames)
    replaced by the index of a frame of their own. Most batches have no large payload and
    go as they are, with no per-item copy."""
    for item in items:
        payload = item[payload_index]
        if type(payload) is not bytes or len(payload) > INLINE_PAYLOAD_MAX:
            break
    else:
        return items
    placed = []
    for item in items:
        payload = item[payload_index]
        if type(payload) is not bytes and isinstance(payload, tuple):
            pass  # a withheld payload's [size] (wire.tasks.Withheld) goes in the header
        elif type(payload) is not bytes or len(payload) > INLINE_PAYLOAD_MAX:
            blobs.append(payload)
            # Not ``_replace``: it would drop an item's elements after its declared
            # fields (a traceparent, wire.tasks.trace_of).
            item = new_tuple(type(item), (*item[:payload_index], len(blobs) - 1,
                                          *item[payload_index + 1:]))
        placed.append(item)
    return placed


def blob(ref: Any, blobs: list[Any]) -> Payload:
    if type(ref) is int and 0 <= ref < len(blobs):
        return blobs[ref]
    raise ValueError(f"payload must be bin or a frame index, got {type(ref).__name__}")


def as_str(value: Any, what: str) -> str:
    if type(value) is not str:
        raise ValueError(f"{what} must be a string")
    return value


def as_opt_str(value: Any, what: str) -> str | None:
    if value is not None and type(value) is not str:
        raise ValueError(f"{what} must be a string or nil")
    return value


def as_opt_num(value: Any, what: str) -> float | None:
    if value is not None and (type(value) not in (int, float) or value != value):
        raise ValueError(f"{what} must be a number or nil")
    return value


def as_str_list(value: Any, what: str) -> tuple[str, ...]:
    if type(value) not in (tuple, list) or any(type(v) is not str for v in value):
        raise ValueError(f"{what} must be an array of strings")
    return tuple(value)


def as_map(header: Any) -> dict[Any, Any]:
    if type(header) is not dict:
        raise ValueError("header must be a map")
    return header


def as_req(h: dict[Any, Any]) -> int:
    """A request header's ``req``: the integer its answer carries back."""
    req = h.get("req")
    if type(req) is not int:
        raise ValueError("req must be an integer")
    return req


def as_array(header: Any) -> tuple[Any, ...]:
    if type(header) is not tuple:
        raise ValueError("header must be an array")
    return header


new_tuple = tuple.__new__


def as_id_list(value: Any) -> list[str]:
    return list(as_str_list(value, "ids"))


def plain(value: Any) -> Any:
    """Header arrays arrive as tuples; documents handed to users get lists."""
    if type(value) is tuple:
        return [plain(v) for v in value]
    if type(value) is dict:
        return {k: plain(v) for k, v in value.items()}
    return value



def version_mismatch(theirs: object) -> str:
    """The message of a ``bad_version`` refusal: the version a message spoke, the one its
    receiver speaks, and what to do.

    Worded for both ends of the connection: the receiver logs it, and the sender reads it
    in the ERROR it gets back.
    """
    return (f"protocol version mismatch: the message is protocol version {theirs}, its "
            f"receiver speaks version {PROTOCOL_VERSION}: run the same Orchestrator release "
            "on both sides (upgrade the older one)")


#: Most bytes of a foreign frame 0 quoted in a refusal.
_QUOTED_SIGNATURE_BYTES: Final = 16


def check_signature(frames: list[Any]) -> None:
    """The envelope check every command range shares: at least three frames, and frame 0
    the signature of this protocol version.

    Raises:
        DecodeError: ``bad_frame`` for a short message or a foreign frame 0,
            ``bad_version`` (naming both versions) for another version of this protocol.
    """
    if len(frames) < 3:
        raise DecodeError(f"a message has at least 3 frames, got {len(frames)}")
    signature = bytes(frames[0])
    if signature == SIGNATURE:
        return
    if signature.startswith(SIGNATURE_PREFIX):
        quoted = signature[:_QUOTED_SIGNATURE_BYTES]
        theirs = quoted[len(SIGNATURE_PREFIX):].decode("ascii", "replace") or "unknown"
        raise DecodeError(version_mismatch(f"{theirs} (frame 0 {quoted!r})"),
                          code="bad_version")
    raise DecodeError(f"frame 0 is not the {SIGNATURE.decode()} signature")


def foreign_error_header(frames: list[Any], error_command: int) -> dict[Any, Any] | None:
    """The header of an ERROR from a peer of another protocol version, or None when
    ``frames`` are not one.

    ERROR is the one message every version keeps as it is: frame 0 the sender's
    signature, frame 1 its ERROR command byte (0x7F, 0x5F for the state service), frame 2
    a msgpack map with a string ``code`` and ``message``. So each end reads the other's
    refusal, ``bad_version`` above all, whichever of the two is newer.
    """
    if (len(frames) < 3 or not bytes(frames[0]).startswith(SIGNATURE_PREFIX)
            or bytes(frames[1]) != bytes((error_command,))):
        return None
    try:
        header = unpack_header(frames[2])
    except Exception:  # noqa: BLE001 - not a readable ERROR: the caller refuses the frames
        return None
    if type(header) is not dict or type(header.get("code")) is not str \
            or type(header.get("message")) is not str:
        return None
    return header


def command_byte(frames: list[Any]) -> int:
    """The command byte of a message whose envelope :func:`check_signature` accepts.

    Raises:
        DecodeError: the envelope check failed, or frame 1 is not a single byte.
    """
    check_signature(frames)
    command_frame = bytes(frames[1])
    if len(command_frame) != 1:
        raise DecodeError("frame 1 must be a single command byte")
    return command_frame[0]
