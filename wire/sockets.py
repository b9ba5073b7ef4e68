"""Socket helpers shared by the broker and the SDK: fast multipart send and receive,
common options.

pyzmq's ``send_multipart`` spends about 3 us per frame in Python-level checks; the
backend ``Socket.send`` with integer flags about 0.5 us. On the hot path that is most of
the cost of a message, so every hot send goes through :func:`send_frames`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import zmq

from wire.limits import MAX_FRAME_BYTES

_backend_send = zmq.backend.Socket.send
_backend_recv = zmq.backend.Socket.recv
_backend_get = zmq.backend.Socket.get
# Plain ints: zmq's Flag enums make every ``|`` an enum call (microseconds per send).
_SNDMORE = int(zmq.SNDMORE)
NOBLOCK = int(zmq.NOBLOCK)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)

#: Frames at least this large are sent and received without a copy: a send hands libzmq
#: the buffer itself (a result's payload, a mapped file's range), a receive keeps libzmq's
#: buffer and returns a memoryview of it. Smaller frames are copied, which is cheaper than
#: the bookkeeping of a zero-copy frame (pyzmq's own ``copy_threshold`` is the same).
#: Copying each 64 MB payload on its way in and out cost this 2-core machine a third of
#: its CPU while 12 of them moved (bench/large_results.py).
ZERO_COPY_BYTES = 64 * 1024


def send_frames(sock: zmq.Socket[Any], frames: Sequence[Any], flags: int = 0) -> None:
    """Send ``frames`` as one multipart message.

    With ``zmq.NOBLOCK`` a full pipe raises ``zmq.Again`` on the first frame, before
    anything is sent; libzmq then accepts the remaining frames of the message whole.
    """
    last = len(frames) - 1
    more = flags | _SNDMORE
    for index in range(last):
        frame = frames[index]
        _backend_send(sock, frame, more, len(frame) < ZERO_COPY_BYTES)
    frame = frames[last]
    _backend_send(sock, frame, flags, len(frame) < ZERO_COPY_BYTES)


def recv_frames(sock: zmq.Socket[Any], flags: int = 0) -> list[Any]:
    """Receive one multipart message as a list of bytes (``recv_multipart``, through the
    backend: the sugar version spends several us per frame in Python-level checks).

    Frames are received as ``zmq.Frame`` and asked ``.more``: pyzmq's ``get(RCVMORE)``
    converts the option to an enum on every call, and a 4-frame message cost 6-11 us
    that way against 4 us with frames. Frames of :data:`ZERO_COPY_BYTES` or more come as
    memoryviews of libzmq's buffers (bytes-like, read-only)."""
    frame = _backend_recv(sock, flags, False)
    frames: list[Any] = [frame.bytes]
    while frame.more:
        frame = _backend_recv(sock, flags, False)
        # A payload frame stays in libzmq's buffer (see ZERO_COPY_BYTES).
        frames.append(frame.bytes if len(frame) < ZERO_COPY_BYTES else frame.buffer)
    return frames


def has_input(sock: zmq.Socket[Any]) -> bool:
    """Is a message waiting? (ZMQ_EVENTS through the backend; it also resets the
    edge-triggered FD, so a reader may stop when this says no.)"""
    events: Any = _backend_get(sock, _EVENTS)
    return bool(events & _POLLIN)


def apply_common_options(sock: zmq.Socket[Any], hwm: int,
                         max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
    """Options every Orchestrator socket needs: a frame size limit (an oversized frame
    from a peer must not grow our memory), queue bounds, and no lingering on close.
    Set before bind or connect: libzmq reads them when a connection starts."""
    sock.setsockopt(zmq.MAXMSGSIZE, max_frame_bytes)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm)


#: Hosts a socket binds to mean "every interface"; as a place to connect to they name
#: nothing useful (0.0.0.0 is this machine on Linux, never the broker's).
UNSPECIFIED_HOSTS: Final = frozenset({"0.0.0.0", "::", "[::]", "*", ""})


def _split(endpoint: str) -> tuple[str, str, str] | None:
    """``tcp://HOST:PORT`` as (scheme, host, port); None for anything else."""
    scheme, sep, rest = endpoint.partition("://")
    host, colon, port = rest.rpartition(":")
    if not sep or not colon:
        return None
    return scheme, host, port


def reachable_endpoint(endpoint: str, via: str) -> str:
    """``endpoint`` as announced by a broker reached at ``via``: a host that means "every
    interface" (a broker bound to 0.0.0.0 without ``--advertise``) is replaced by the host
    this peer used to reach the broker, so that a peer on another machine connects to
    the broker's machine, never to itself."""
    parts, through = _split(endpoint), _split(via)
    if parts is None or through is None or parts[1] not in UNSPECIFIED_HOSTS:
        return endpoint
    return with_host(endpoint, through[1])


def with_host(endpoint: str, host: str) -> str:
    """``scheme://BOUND:PORT[/path]`` with ``host`` in place of ``BOUND`` (unchanged
    when it is not such an endpoint)."""
    parts = _split(endpoint)
    return endpoint if parts is None else f"{parts[0]}://{host}:{parts[2]}"


def reachable_endpoints(endpoints: dict[str, str], via: str) -> dict[str, str]:
    """Every endpoint of a broker's announcement (:func:`reachable_endpoint`)."""
    return {name: reachable_endpoint(url, via) if isinstance(url, str) else url
            for name, url in endpoints.items()}
