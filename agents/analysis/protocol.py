"""The frames between the reviewer agent and its analysis workers.

Each frame on the worker's stdin and stdout is a 4-byte big-endian length followed by
that many bytes of one msgpack map (never pickle: a worker reads untrusted code, and
what it sends back must not be able to run anything in the agent).

Agent -> worker::

    {"op": "analyze", "batch": int, "root": str, "files": [relative path, ...],
     "analyses": ["security" | "review" | "performance", ...]}

Worker -> agent::

    {"op": "ready", "pid": int}                 once bandit is loaded
    {"op": "file", "batch": int, "path": str, "status": str, "detail": str,
     "findings": [Finding.to_dict(), ...]}      one per file, as soon as it is done
    {"op": "done", "batch": int}                the batch is over

A file's frame is written before the next file starts, so when a worker dies or stalls
the file it was on is the first of its batch without a frame.
"""

from __future__ import annotations

import struct
from typing import IO, Any, Final

import msgpack

#: Exit status of a worker that ran out of memory (after reporting the file).
EXIT_MEMORY: Final = 3
#: Size of the length prefix.
HEADER: Final = struct.Struct(">I")
#: Largest frame either side accepts (a batch's findings can be long, not this long).
MAX_FRAME_BYTES: Final = 256 * 1024 * 1024


class FrameError(ValueError):
    """A frame that is too big or not a msgpack map; one line."""


def encode(message: dict[str, Any]) -> bytes:
    """One frame: the length prefix and the msgpack body."""
    body: bytes = msgpack.packb(message, use_bin_type=True)
    return HEADER.pack(len(body)) + body


def decode(body: bytes) -> dict[str, Any]:
    """The map in a frame's body.

    Raises:
        FrameError: the body is not a msgpack map.
    """
    try:
        message = msgpack.unpackb(body, raw=False, strict_map_key=False)
    except (ValueError, msgpack.UnpackException) as error:
        raise FrameError(f"a worker frame is not msgpack: {error}") from None
    if not isinstance(message, dict):
        raise FrameError(f"a worker frame is a {type(message).__name__}, not a map")
    return message


def body_size(header: bytes) -> int:
    """The body length a header announces.

    Raises:
        FrameError: over :data:`MAX_FRAME_BYTES`.
    """
    (size,) = HEADER.unpack(header)
    if size > MAX_FRAME_BYTES:
        raise FrameError(f"a worker frame of {size} bytes is over the "
                         f"{MAX_FRAME_BYTES}-byte limit")
    return int(size)


def read_blocking(stream: IO[bytes]) -> dict[str, Any] | None:
    """The next frame from a blocking stream (the worker's stdin); None at its end."""
    header = stream.read(HEADER.size)
    if len(header) < HEADER.size:
        return None
    size = body_size(header)
    body = stream.read(size)
    if len(body) < size:
        return None
    return decode(body)
