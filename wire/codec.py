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
from wire.limits import INLINE_PAYLOAD_MAX, MAX_BATCH_ITEMS, SIGNATURE


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
        if type(payload) is not bytes or len(payload) > INLINE_PAYLOAD_MAX:
            blobs.append(payload)
            item = item._replace(payload=len(blobs) - 1)
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
    if signature.startswith(b"ORCH"):
        theirs = signature[4:].decode("ascii", "replace") or "?"
        raise DecodeError(f"the peer speaks protocol version {theirs}, this side speaks "
                          f"version {SIGNATURE[4:].decode()}: run the same Orchestrator "
                          "release on both sides", code="bad_version")
    raise DecodeError(f"frame 0 is not the {SIGNATURE.decode()} signature")


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
