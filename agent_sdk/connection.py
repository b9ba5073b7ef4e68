"""The SDK's sockets, driven by the asyncio loop (uvloop when present).

- :class:`Connection`: one DEALER connection over a :class:`Codec`, the one driver behind
  the broker connection of agents and clients (:data:`TASK_CODEC`) and the state
  service connection (:data:`STATE_CODEC`).
- :class:`BusSockets`: a peer's SUB and XPUB sockets on the broker's pub/sub bus.

Every socket is a plain (synchronous) pyzmq socket whose file descriptor is watched with
``loop.add_reader``: no zmq.asyncio futures per message. libzmq signals its descriptor
edge-triggered, so a wake-up drains the socket until it is empty, and every send is
followed by one more look (a send can swallow the edge of a message that arrived).

Owners batch what they send: they collect items while a burst of input is handled and
in :meth:`Connection.request_flush` callbacks, then send one message per command from
their ``on_flush`` hook.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final, Generic, Protocol, TypeVar

import zmq
from zmq.utils.monitor import recv_monitor_message

import wire.errors as wire_errors
from wire.curve import ClientKeys, KeyFileError, apply_client, client_keys, key_scope, scoped
from wire.home import home_dir, local_homes
from wire.limits import MAX_FRAME_BYTES, MAX_HEADER_BYTES, MAX_MESSAGE_BYTES_ENV
from wire.sockets import apply_common_options, has_input, NOBLOCK, recv_frames, send_frames
from wire.state import decode_state, encode_state, StateMessage
from wire.tasks import decode, encode, Message
from agent_sdk.errors import as_sdk_error, KeyConfigError, TooLarge

logger = logging.getLogger(__name__)

M = TypeVar("M")
M_contra = TypeVar("M_contra", contravariant=True)

#: Messages handled per wake-up before yielding to other callbacks.
DRAIN_BATCH: Final = 1000
#: Outgoing queue of a DEALER; batching keeps messages few.
SEND_HWM: Final = 100_000
#: libzmq's reconnect back-off after a peer went away: first wait, cap.
RECONNECT_IVL_MS: Final = 100
RECONNECT_IVL_MAX_MS: Final = 2000
#: The owner's heartbeat settings until the peer's WELCOME says otherwise: a peer silent
#: for ``interval x liveness`` is presumed gone.
DEFAULT_HEARTBEAT_INTERVAL_S: Final = 1.0
DEFAULT_HEARTBEAT_LIVENESS: Final = 3
#: The owner's back-off between new connections to a silent peer: first wait, cap.
RECONNECT_MIN_S: Final = 0.1
RECONNECT_MAX_S: Final = 5.0
#: Queue bound of the bus sockets, in messages.
BUS_HWM: Final = 100_000
#: Bus messages handled per wake-up before the loop gets a turn.
BUS_DRAIN_BATCH: Final = 1000
#: How long messages still queued in the publisher socket at ``close`` may take to leave
#: (libzmq sends them in the background while the process runs; 0 would discard them).
PUBLISH_LINGER_MS: Final = 2000
#: The monitor events that say whether a live peer is at the other end.
_MONITOR_EVENTS: Final = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
#: The monitor events of a refused or failed handshake (CURVE keys, mechanism mismatch).
HANDSHAKE_FAILURES: Final = (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                             | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


@dataclass(frozen=True, slots=True)
class Codec(Generic[M]):
    """How one protocol turns messages into frames and back.

    Attributes:
        peer: who speaks it at the other end, for log lines.
        encode: message to frames.
        decode: frames to message; raises :class:`wire.errors.DecodeError`.
    """

    peer: str
    encode: Callable[[M], list[Any]]
    decode: Callable[[list[Any]], M]


#: The task protocol, spoken with the broker.
TASK_CODEC: Final[Codec[Message]] = Codec("the broker", encode, decode)
#: The state protocol, spoken with the state service.
STATE_CODEC: Final[Codec[StateMessage]] = Codec("the state service", encode_state, decode_state)


class Transport(Protocol[M_contra]):
    """What agents and clients need from a connection (tests may swap in another)."""

    closed: bool
    last_heard: float
    last_sent: float
    #: the peer's size limits (the defaults until it announced them)
    max_frame_bytes: int
    max_header_bytes: int
    limits_known: bool

    def open(self) -> None: ...
    def adopt_limits(self, limits: dict[str, int] | None) -> None: ...
    def reopen(self) -> None: ...
    def close(self) -> None: ...
    def send(self, msg: M_contra) -> None: ...
    def request_flush(self) -> None: ...
    def read_now(self) -> None: ...


def curve_keys(url: str) -> ClientKeys | None:
    """This process's CURVE settings for a socket connecting to ``url``
    (:func:`wire.curve.client_keys`: the ORCH_CURVE_* variables, else the local admin
    key when ``url`` is an endpoint of a local data dir's secure broker); None:
    plaintext.

    Raises:
        KeyConfigError: the settings are wrong (one line saying how).
    """
    try:
        keys = client_keys(home_dir(), url)
        for home in local_homes:
            if keys is not None:
                break
            keys = client_keys(home, url)
        return keys
    except KeyFileError as e:
        raise KeyConfigError(str(e)) from None


def receive_limit() -> int:
    """The largest frame an SDK socket takes from its peer: the protocol's default, or
    ``$ORCH_MAX_MESSAGE_BYTES`` when that is bigger (a broker started with a bigger
    ``--max-message-bytes``). Fixed when the socket connects, before the broker could
    announce its own limit, so the environment says it."""
    text = os.environ.get(MAX_MESSAGE_BYTES_ENV, "").strip()
    return max(MAX_FRAME_BYTES, int(text)) if text.isdigit() else MAX_FRAME_BYTES


def _socket(kind: int, hwm: int, keys: ClientKeys | None) -> zmq.Socket[Any]:
    """A socket with the options every SDK socket shares, and CURVE with ``keys`` (from
    :func:`curve_keys`; None: plaintext)."""
    sock: zmq.Socket[Any] = zmq.Context.instance().socket(kind)
    if keys is not None:
        apply_client(sock, keys)
    apply_common_options(sock, hwm, receive_limit())
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS)
    return sock


class _Watched:
    """A socket whose descriptor the loop watches, and the callback that drains it.

    The descriptor is edge-triggered: ``drain`` must read until the socket is empty, or
    :meth:`schedule` itself again to go on after other callbacks had their turn.

    Args:
        loop: the running loop.
        sock: the socket (closed by :meth:`close`).
        drain: called on each wake-up and after each :meth:`schedule`.
    """

    __slots__ = ("sock", "closed", "scheduled", "_loop", "_fd", "_drain")

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: zmq.Socket[Any],
                 drain: Callable[[], None]) -> None:
        self.sock = sock
        self.closed = False
        self._loop = loop
        self._drain = drain
        #: a drain is queued with call_soon
        self.scheduled = False
        fd: Any = sock.getsockopt(zmq.FD)
        self._fd: int = fd
        loop.add_reader(fd, self._run)

    def schedule(self) -> None:
        """Drain on the next loop iteration (once, however often asked)."""
        if not self.scheduled:
            self.scheduled = True
            self._loop.call_soon(self._run)

    def _run(self) -> None:
        self.scheduled = False
        if not self.closed:
            self._drain()

    def close(self, linger_ms: int = 0) -> None:
        """Stop watching and close the socket (a drain scheduled already does nothing)."""
        self.closed = True
        if not self._loop.is_closed():
            self._loop.remove_reader(self._fd)
        self.sock.close(linger=linger_ms)


class Connection(Generic[M]):
    """A DEALER socket connected to ``url`` under a fixed routing id, over a codec.

    A fixed routing id matters: after a reconnect the peer still knows where to send
    this side's answers, and messages queued while it was away arrive under the
    identity they were meant for.

    Args:
        url: the peer's endpoint, ``tcp://host:port``.
        identity: routing id (bytes, unique per peer).
        codec: the protocol spoken on it.
        on_message: called with each decoded message.
        on_flush: called once after each message and each burst of input, and after
            :meth:`request_flush`; the owner sends its batched output there.
        monitor: watch the TCP connection (:attr:`transport_up`).
        on_event: with ``monitor``: called with each monitor event (its number and
            value: a handshake failure's value is libzmq's reason).

    Attributes:
        closed: :meth:`close` was called (and :meth:`open` not since).
        last_heard: loop time of the last input (or of the last :meth:`open`, or of a
            handshake with the peer when monitored); owners may move it back.
        last_sent: loop time of the last :meth:`send`.
        transport_up: with ``monitor``: libzmq has a live connection (a handshake
            succeeded and it has not dropped since).
    """

    def __init__(self, url: str, identity: bytes, codec: Codec[M],
                 on_message: Callable[[M], None], on_flush: Callable[[], None] | None = None,
                 *, monitor: bool = False,
                 on_event: Callable[[int, int], None] | None = None) -> None:
        self.url = url
        self.identity = identity
        self._encode = codec.encode
        self._decode = codec.decode
        self._peer = codec.peer
        self._on_message = on_message
        self._on_flush = on_flush
        self._monitored = monitor
        self._on_event = on_event
        self._loop: asyncio.AbstractEventLoop | None = None
        self._time: Callable[[], float] = time.monotonic
        self._sock: zmq.Socket[Any] | None = None
        self._reader: _Watched | None = None
        self._monitor: _Watched | None = None
        self._flush_scheduled = False
        #: inside the read loop, which asks ZMQ_EVENTS after each message
        self._reading = False
        self._blocked: deque[list[Any]] = deque()
        self.closed = False
        self.last_heard = 0.0
        self.last_sent = 0.0
        self.transport_up = False
        #: the peer's size limits as it announced them (:meth:`adopt_limits`); the
        #: protocol's defaults until then, and ``limits_known`` False
        self.max_frame_bytes: int = MAX_FRAME_BYTES
        self.max_header_bytes: int = MAX_HEADER_BYTES
        self.limits_known = False
        #: this side's CURVE public key (Z85) on the current socket; None: plaintext
        self.curve_public_key: str | None = None

    def adopt_limits(self, limits: dict[str, int] | None) -> None:
        """The peer announced its size limits (WELCOME, a HEARTBEAT's answer): check
        sends against them from now on. None (a peer that announces none): keep the
        defaults, which every peer of this protocol accepts."""
        self.limits_known = True
        if limits is None:
            return
        frame = limits.get("max_message_bytes")
        header = limits.get("max_header_bytes")
        if type(frame) is int and frame > 0:
            self.max_frame_bytes = frame
        if type(header) is int and header > 0:
            self.max_header_bytes = header

    def open(self) -> None:
        """Create the socket, connect and start watching it (call inside the loop)."""
        loop = self._loop = asyncio.get_running_loop()
        self._time = loop.time
        keys = curve_keys(self.url)
        sock = _socket(zmq.DEALER, SEND_HWM, keys)
        if keys is None:
            sock.setsockopt(zmq.ROUTING_ID, self.identity)
        else:
            # A secure broker takes a routing id only in the scope of the key that
            # presents it: no other key can pose as this peer.
            sock.setsockopt(zmq.ROUTING_ID, scoped(key_scope(keys.public_key),
                                                   self.identity.decode()).encode())
        self.curve_public_key = None if keys is None else keys.public_key
        if self._monitored:
            # Before connecting, so that the first handshake is reported too.
            events = _MONITOR_EVENTS | zmq.EVENT_CONNECT_RETRIED | HANDSHAKE_FAILURES
            self._monitor = _Watched(loop, sock.get_monitor_socket(events),
                                     self._read_monitor)
        sock.connect(self.url)
        self._sock = sock
        self._reader = _Watched(loop, sock, self._read)
        self.closed = False
        self.last_heard = loop.time()
        self._reader.schedule()
        if self._monitor is not None:
            self._monitor.schedule()

    def reopen(self) -> None:
        """Drop the connection and make a new one under the same routing id."""
        self._close_socket()
        self.open()

    def close(self) -> None:
        """Close the socket; what was not sent yet is dropped."""
        self.closed = True
        self._close_socket()

    def _close_socket(self) -> None:
        sock, reader, monitor = self._sock, self._reader, self._monitor
        if sock is None or reader is None:
            return
        self._sock = self._reader = self._monitor = None
        if monitor is not None:
            sock.disable_monitor()
            monitor.close()
        reader.close()
        self._blocked.clear()
        self.transport_up = False

    # ------------------------------------------------------------------ output

    def send(self, msg: M) -> None:
        """Send now (never blocks; if the pipe is full, the message waits its turn).

        Raises:
            TooLarge: a frame of the encoded message exceeds the peer's frame limit
                (``MAX_FRAME_BYTES`` until it announced its own), or its header the
                header limit.
        """
        try:
            frames = self._encode(msg)
        except wire_errors.WireError as e:
            raise as_sdk_error(e) from e
        limit = self.max_frame_bytes
        for frame in frames:
            if len(frame) > limit:
                raise TooLarge(len(frame), limit)
        if len(frames) > 2 and len(frames[2]) > self.max_header_bytes:
            raise TooLarge(len(frames[2]), self.max_header_bytes, "message header",
                           "max_header_bytes")
        sock = self._sock
        if sock is None:
            return
        self.last_sent = self._time()
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
        if not self._flush_scheduled and self._loop is not None and self._on_flush is not None:
            self._flush_scheduled = True
            self._loop.call_soon(self._run_flush)

    def _run_flush(self) -> None:
        self._flush_scheduled = False
        if not self.closed and self._on_flush is not None:
            self._on_flush()

    def _retry_blocked(self, sock: zmq.Socket[Any]) -> None:
        blocked = self._blocked
        while blocked:
            try:
                send_frames(sock, blocked[0], NOBLOCK)
            except zmq.Again:
                return
            blocked.popleft()

    # ------------------------------------------------------------------ input

    def read_now(self) -> None:
        """Handle whatever input is waiting, now (the reader callback may be behind)."""
        if self._sock is not None:
            self._read()

    def _schedule_read(self) -> None:
        if self._reader is not None:
            self._reader.schedule()

    def _read(self) -> None:
        sock = self._sock
        if sock is None:
            return
        if self._blocked:
            self._retry_blocked(sock)
        handle = self._on_message
        flush = self._on_flush
        decode_frames = self._decode
        received = 0
        self._reading = True
        try:
            # Ask whether input is queued rather than recv into a zmq.Again: the check
            # costs a fraction of the exception (see the broker's drain loop).
            while received < DRAIN_BATCH and has_input(sock):
                try:
                    frames = recv_frames(sock, NOBLOCK)
                except zmq.Again:
                    break
                received += 1
                try:
                    msg = decode_frames(frames)
                except wire_errors.DecodeError as e:
                    logger.warning("dropped a bad message from %s: %s", self._peer, e)
                    continue
                handle(msg)
                if self._sock is not sock:
                    return  # the handler reopened or closed the connection
                if flush is not None:
                    # Answer each message's batch at once: the peer gets the first
                    # results while later messages are still being worked on.
                    flush()
        except BaseException:
            # A handler failed, maybe after a send took the FD's edge: read on soon
            # rather than wait for another message to arrive.
            self._schedule_read()
            raise
        finally:
            # Sends from here on check for input themselves: the loop above has ended.
            self._reading = False
            if received:
                self.last_heard = self._time()
                if flush is not None and not self.closed:
                    flush()
        if received >= DRAIN_BATCH or self._blocked:
            self._schedule_read()

    def read_events(self) -> None:
        """Handle the monitor events already queued, now (with ``monitor``)."""
        self._read_monitor()

    def _read_monitor(self) -> None:
        monitor = self._monitor
        if monitor is None:
            return
        while True:
            try:
                event = recv_monitor_message(monitor.sock, NOBLOCK)
            except zmq.Again:
                return
            self.transport_up = event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED
            if self._on_event is not None:
                self._on_event(event["event"], event["value"])
            if self.transport_up:
                # A handshake with the peer: it is alive, whatever it said last.
                self.last_heard = self._time()


class Backoff:
    """Doubling waits between reconnects to a silent peer, from :data:`RECONNECT_MIN_S`
    up to :data:`RECONNECT_MAX_S`; a WELCOME from the peer starts over.

    Attributes:
        delay_s: the wait after the next reconnect.
        next_at: loop time before which no reconnect is due.
    """

    __slots__ = ("delay_s", "next_at")

    def __init__(self) -> None:
        self.delay_s = RECONNECT_MIN_S
        self.next_at = 0.0

    def due(self, now: float) -> bool:
        """Whether a reconnect may go at ``now``."""
        return now >= self.next_at

    def step(self, now: float) -> None:
        """A reconnect goes at ``now``: the next waits twice as long (up to the cap)."""
        self.next_at = now + self.delay_s
        self.delay_s = min(self.delay_s * 2, RECONNECT_MAX_S)

    def reset(self) -> None:
        """The peer answered: the next reconnect waits the shortest time again."""
        self.delay_s = RECONNECT_MIN_S


class BusSockets:
    """A peer's sockets on the broker's bus: the shared forwarder and the broker's own
    events socket.

    The SUB socket receives what is published on the subscribed topic prefixes; the XPUB
    socket publishes, and hears from the forwarder which prefixes subscribers want. The
    events SUB (when the broker announces an events endpoint) receives the broker's own
    events, which only the broker can publish there. Open on construction (call inside
    the loop).

    Args:
        urls: the forwarder's ``(bus_out, bus_in)`` endpoints: where to subscribe and
            where to publish.
        topics: the prefixes to subscribe to on the forwarder from the start.
        on_message: called with the frames of each message from the forwarder.
        on_subscriptions: called with the (un)subscription messages the forwarder passed
            to the publisher socket, a batch at a time.
        events_url: the broker's events endpoint; None: no events socket.
        event_topics: the prefixes to subscribe to on the events socket from the start.
        on_event: called with the frames of each message from the events socket.

    Attributes:
        paused: no bus message is read while set (see :meth:`pause`).
    """

    def __init__(self, urls: tuple[str, str], topics: Iterable[str],
                 on_message: Callable[[list[bytes]], None],
                 on_subscriptions: Callable[[list[bytes]], None],
                 events_url: str | None = None, event_topics: Iterable[str] = (),
                 on_event: Callable[[list[bytes]], None] | None = None) -> None:
        loop = asyncio.get_running_loop()
        sub = _socket(zmq.SUB, BUS_HWM, curve_keys(urls[0]))
        pub = _socket(zmq.XPUB, BUS_HWM, curve_keys(urls[1]))
        for topic in topics:
            sub.setsockopt(zmq.SUBSCRIBE, topic.encode())
        sub.connect(urls[0])
        pub.connect(urls[1])
        self.urls = urls
        self.paused = False
        self._on_message = on_message
        self._on_subscriptions = on_subscriptions
        self._on_event = on_event
        self._sub = _Watched(loop, sub, self._read_messages)
        self._pub = _Watched(loop, pub, self.read_subscriptions)
        self._events: _Watched | None = None
        if events_url is not None and on_event is not None:
            events = _socket(zmq.SUB, BUS_HWM, curve_keys(events_url))
            for topic in event_topics:
                events.setsockopt(zmq.SUBSCRIBE, topic.encode())
            events.connect(events_url)
            self._events = _Watched(loop, events, self._read_events)
            self._events.schedule()
        self._sub.schedule()
        self._pub.schedule()

    def subscribe(self, topic: str) -> None:
        """Start receiving ``topic`` (a prefix) from the forwarder."""
        self._sub.sock.setsockopt(zmq.SUBSCRIBE, topic.encode())
        self._sub.schedule()

    def unsubscribe(self, topic: str) -> None:
        """Stop receiving ``topic`` from the forwarder (one earlier :meth:`subscribe`)."""
        self._sub.sock.setsockopt(zmq.UNSUBSCRIBE, topic.encode())

    def subscribe_events(self, topic: str) -> bool:
        """Start receiving the broker's events under ``topic``; False without an events
        socket."""
        if self._events is None:
            return False
        self._events.sock.setsockopt(zmq.SUBSCRIBE, topic.encode())
        self._events.schedule()
        return True

    def unsubscribe_events(self, topic: str) -> None:
        """Stop receiving the broker's events under ``topic``."""
        if self._events is not None:
            self._events.sock.setsockopt(zmq.UNSUBSCRIBE, topic.encode())

    @property
    def has_events(self) -> bool:
        """Whether the broker's events socket is open."""
        return self._events is not None

    def publish(self, frames: list[bytes]) -> None:
        """Send a bus message; never blocks (the forwarder drops for a slow subscriber)."""
        pub = self._pub
        send_frames(pub.sock, frames, NOBLOCK)
        # A send can swallow the edge that announces subscription changes: look again
        # (the flag is checked here first: this runs per message).
        if not pub.scheduled:
            pub.schedule()

    def pause(self) -> None:
        """Stop reading bus messages: they wait in ZeroMQ's bounded queues."""
        self.paused = True

    def resume(self) -> None:
        """Read bus messages again."""
        self.paused = False
        self._sub.schedule()
        if self._events is not None:
            self._events.schedule()

    def read_subscriptions(self) -> None:
        """Take the (un)subscriptions the forwarder passed to the publisher socket."""
        pub = self._pub
        if pub.closed:
            return
        messages: list[bytes] = []
        while True:
            try:
                messages.append(pub.sock.recv(NOBLOCK))
            except zmq.Again:
                break
        if messages:
            self._on_subscriptions(messages)

    def _read_messages(self) -> None:
        self._drain(self._sub, self._on_message)

    def _read_events(self) -> None:
        if self._events is not None and self._on_event is not None:
            self._drain(self._events, self._on_event)

    def _drain(self, watched: _Watched, handle: Callable[[list[bytes]], None]) -> None:
        if self.paused:
            return
        recv = watched.sock.recv_multipart
        received = 0
        while received < BUS_DRAIN_BATCH:
            try:
                frames = recv(NOBLOCK)
            except zmq.Again:
                return
            received += 1
            handle(frames)
            if self.paused or watched.closed:
                return
        watched.schedule()

    def close(self) -> None:
        """Close the sockets; what is still queued to publish gets a moment to leave."""
        self._sub.close()
        if self._events is not None:
            self._events.close()
        self._pub.close(PUBLISH_LINGER_MS)


__all__ = [
    "Backoff", "BusSockets", "Codec", "Connection", "HANDSHAKE_FAILURES", "STATE_CODEC",
    "TASK_CODEC", "Transport", "curve_keys",
]
