"""One DEALER connection to the broker, driven by the asyncio loop (uvloop when present).

The socket is a plain (synchronous) pyzmq socket whose file descriptor is watched with
``loop.add_reader``: no zmq.asyncio futures per message. libzmq signals its descriptor
edge-triggered, so a wake-up drains the socket until it is empty, and every send is
followed by one more look (a send can swallow the edge of a message that arrived).

Owners (the agent, the client) batch what they send: they collect items while a burst
of input is handled and in :meth:`Channel.request_flush` callbacks, then send one
message per command from their ``flush`` hook.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any, Callable, Protocol

import zmq

from wire.errors import DecodeError, TooLarge
from wire.limits import MAX_FRAME_BYTES
from wire.tasks import decode, encode, Message
from wire.sockets import apply_common_options, has_input, NOBLOCK, recv_frames, send_frames

logger = logging.getLogger(__name__)

#: Messages handled per wake-up before yielding to other callbacks.
DRAIN_BATCH = 1000
#: Outgoing queue of the DEALER; batching keeps messages few.
SEND_HWM = 100_000


class Transport(Protocol):
    """What agents and clients need from a broker connection (tests may swap it)."""

    def send(self, msg: Message) -> None: ...
    def request_flush(self) -> None: ...
    def reopen(self) -> None: ...
    def close(self) -> None: ...


class Channel:
    """A DEALER socket connected to ``url`` under a fixed routing id.

    A fixed routing id matters: after a reconnect the broker still knows where to send
    this peer's results, and messages queued while the broker was away arrive under the
    identity they were meant for.

    Args:
        url: broker endpoint, ``tcp://host:port``.
        identity: routing id (bytes, unique per peer).
        on_message: called with each decoded message.
        on_flush: called once after each burst of input and after :meth:`request_flush`;
            the owner sends its batched output there.
    """

    def __init__(self, url: str, identity: bytes, on_message: Callable[[Message], None],
                 on_flush: Callable[[], None]) -> None:
        self.url = url
        self.identity = identity
        self._on_message = on_message
        self._on_flush = on_flush
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sock: zmq.Socket[Any] | None = None
        self._fd: int | None = None
        self._flush_scheduled = False
        self._read_scheduled = False
        #: inside the read loop, which asks ZMQ_EVENTS after each message
        self._reading = False
        self._blocked: deque[list[Any]] = deque()
        self.closed = False

    def open(self) -> None:
        """Create the socket, connect and start watching it (call inside the loop)."""
        self._loop = asyncio.get_running_loop()
        sock: zmq.Socket[Any] = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.ROUTING_ID, self.identity)
        apply_common_options(sock, SEND_HWM)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        sock.connect(self.url)
        self._sock = sock
        fd: Any = sock.getsockopt(zmq.FD)
        self._fd = fd
        self._loop.add_reader(fd, self._on_readable)
        self.closed = False
        self._schedule_read()

    def reopen(self) -> None:
        """Drop the connection and make a new one under the same routing id."""
        self._close_socket()
        self.open()

    def close(self) -> None:
        self.closed = True
        self._close_socket()

    def _close_socket(self) -> None:
        if self._sock is None:
            return
        if self._loop is not None and self._fd is not None:
            self._loop.remove_reader(self._fd)
        self._sock.close(linger=0)
        self._sock = None
        self._fd = None
        self._blocked.clear()

    # ------------------------------------------------------------------ output

    def send(self, msg: Message) -> None:
        """Send now (never blocks; if the pipe is full, the message waits its turn)."""
        frames = encode(msg)
        for frame in frames:
            if len(frame) > MAX_FRAME_BYTES:
                raise TooLarge(len(frame), MAX_FRAME_BYTES)
        sock = self._sock
        if sock is None:
            return
        if self._blocked:
            self._blocked.append(frames)
            return
        try:
            send_frames(sock, frames, NOBLOCK)
        except zmq.Again:
            self._blocked.append(frames)
            self._schedule_read()
            return
        # A send can consume the edge of the FD for a message that arrived meanwhile:
        # asking ZMQ_EVENTS re-arms it, and a read is scheduled only if input waits
        # (a loop iteration and a callback per send cost more than the check). The read
        # loop asks after every message anyway: a send from its handlers needs no check.
        if not self._reading and has_input(sock):
            self._schedule_read()

    def request_flush(self) -> None:
        """Ask for the owner's ``on_flush`` on the next loop iteration (once)."""
        if not self._flush_scheduled and self._loop is not None:
            self._flush_scheduled = True
            self._loop.call_soon(self._run_flush)

    def _run_flush(self) -> None:
        self._flush_scheduled = False
        if not self.closed:
            self._on_flush()

    def _retry_blocked(self) -> None:
        sock = self._sock
        blocked = self._blocked
        while blocked and sock is not None:
            try:
                send_frames(sock, blocked[0], NOBLOCK)
            except zmq.Again:
                return
            blocked.popleft()

    # ------------------------------------------------------------------ input

    def read_now(self) -> None:
        """Handle whatever input is waiting, now (the reader callback may be behind)."""
        if self._sock is not None:
            self._on_readable()

    def _schedule_read(self) -> None:
        if not self._read_scheduled and self._loop is not None:
            self._read_scheduled = True
            self._loop.call_soon(self._on_readable)

    def _on_readable(self) -> None:
        self._read_scheduled = False
        sock = self._sock
        if sock is None:
            return
        if self._blocked:
            self._retry_blocked()
        handle = self._on_message
        received = 0
        self._reading = True
        try:
            # Ask whether input is queued rather than recv into a zmq.Again: the check
            # costs a fraction of the exception (see broker.server's _drain).
            while received < DRAIN_BATCH and has_input(sock):
                try:
                    frames = recv_frames(sock, NOBLOCK)
                except zmq.Again:
                    break
                received += 1
                try:
                    msg = decode(frames)
                except DecodeError as e:
                    logger.warning("dropped a bad message from the broker: %s", e)
                    continue
                handle(msg)
                if self._sock is not sock:
                    return  # the handler reopened or closed the channel
                # Answer each message's batch at once: the broker gets the first results
                # while later messages are still being worked on.
                self._on_flush()
        except BaseException:
            # A handler failed, maybe after a send took the FD's edge: read on soon
            # rather than wait for another message to arrive.
            self._schedule_read()
            raise
        finally:
            # Sends from here on check for input themselves: the loop above has ended.
            self._reading = False
            if received and not self.closed:
                self._on_flush()
        if received >= DRAIN_BATCH or self._blocked:
            self._schedule_read()
