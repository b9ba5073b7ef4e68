"""One ROUTER service loop, shared by the broker and the state service.

A :class:`RouterService` owns a zmq context, one ROUTER socket, a wake-up pipe and a
poll(2) loop; the application (the broker, the state service) plugs in as a
:class:`RouterApp` and never touches the loop's mechanics. Each pass of
:meth:`RouterService.run`:

1. sleeps in poll(2) until input, a wake-up or the application's next timer
   (:meth:`RouterApp.timeout_ms`), unless input already waits; readable extra sockets
   (:meth:`RouterService.add_socket`) are handed to their callbacks;
2. calls :meth:`RouterApp.before_drain` (timers that must run before new requests);
3. drains a bounded batch of messages without blocking, each to :meth:`RouterApp.handle`;
4. on the first pass after :meth:`RouterService.request_stop`, calls
   :meth:`RouterApp.on_stop`;
5. calls :meth:`RouterApp.after_drain`: the application's timers, commit and sends
   (:meth:`RouterService.send`); it returns False to end the loop;
6. retries the backlog of every peer whose pipe was full.
"""

from __future__ import annotations

import logging
import select
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from types import FrameType
from typing import Any, Protocol

import zmq

from wire.limits import MAX_FRAME_BYTES
from wire.sockets import ZERO_COPY_BYTES, NOBLOCK, apply_common_options, has_input, send_frames

_backend_recv = zmq.backend.Socket.recv

logger = logging.getLogger(__name__)

#: How long a closing service waits for its last replies to leave (ms).
CLOSE_LINGER_MS = 1000
#: The longest sleep while a peer has a backlog (ms). libzmq tells when *some* peer can
#: take more (ZMQ_POLLOUT), never which one, so backlogs are retried on a timer.
BACKLOG_RETRY_MS = 20

#: One outgoing message: its frames after the routing id (bytes, zmq.Frame, buffers).
Frames = list[Any]


class RouterApp(Protocol):
    """What a :class:`RouterService` calls. Every call comes from the loop's thread.

    An exception from :meth:`handle` is logged and counted, and the drain goes on: one
    bad message never stops a service. An exception from any other method ends
    :meth:`RouterService.run` (after :meth:`on_close`) and propagates: replying after a
    failed commit would acknowledge what a restart loses.
    """

    def timeout_ms(self, now: float) -> int:
        """How long the loop may sleep (ms) when no input waits: until the next timer.
        Negative: until input or a wake-up."""

    def before_drain(self, now: float) -> None:
        """After every wake-up, before the drain: expiries that new requests must see."""

    def handle(self, identity: bytes, frames: list[bytes], now: float) -> bool:
        """One message from ``identity`` (``frames`` after the routing id), with the time
        taken after the wake-up. Returns True to end this pass's drain early (a batch's
        worth of work arrived), so that :meth:`after_drain` runs sooner."""

    def on_stop(self, now: float) -> None:
        """Once, on the first pass after :meth:`RouterService.request_stop`, between the
        drain and :meth:`after_drain`."""

    def after_drain(self, now: float) -> bool:
        """Every pass, after the drain, with a fresh time: timers, commit, sends. Returns
        False to end the loop after this pass (a stop that has completed)."""

    def peer_unreachable(self, identity: bytes) -> None:
        """A send found no connection for ``identity`` (gone, or never seen); whatever
        was queued for it has been dropped. Called from inside :meth:`RouterService.send`."""

    def backlog_overflow(self, identity: bytes, backlog: deque[Frames]) -> None:
        """``identity``'s backlog grew past ``backlog_limit``: shrink it (drop the oldest,
        or replace it with an error for the peer). The service keeps what is left."""

    def on_close(self) -> None:
        """The loop ended: close what the application opened on :attr:`RouterService.context`
        (the context cannot terminate while a socket of it is open)."""


class SocketSecurity(Protocol):
    """What secures a service's sockets (``broker/security.py``: CURVE and ZAP); a
    service without one speaks plaintext."""

    def secure_server(self, ctx: zmq.Context[Any], sock: zmq.Socket[Any], name: str) -> None:
        """Make ``sock`` (of ``ctx``, not bound yet) authenticate its peers."""

    def secure_client(self, sock: zmq.Socket[Any]) -> None:
        """Make ``sock`` (not connected yet) authenticate to the broker's own servers."""


class Delivery(Enum):
    """What :meth:`RouterService.send` did with a peer's messages."""

    #: all of them left
    SENT = "sent"
    #: the peer's pipe is full: the rest waits in its backlog, in order
    BACKLOGGED = "backlogged"
    #: no connection has the identity (gone, or never seen): the rest was dropped
    UNREACHABLE = "unreachable"


_SENT = Delivery.SENT
_BACKLOGGED = Delivery.BACKLOGGED


@dataclass(slots=True)
class ServiceCounters:
    """What the loop did, for status documents."""

    messages_in: int = 0
    messages_out: int = 0
    #: sends that met a full pipe and left messages in a backlog
    backpressure: int = 0
    #: sends to an identity with no connection
    unreachable: int = 0
    #: messages dropped because their peer was unreachable
    dropped: int = 0
    #: exceptions raised by :meth:`RouterApp.handle`
    handler_errors: int = 0


@dataclass(slots=True)
class _Extra:
    """A socket registered with :meth:`RouterService.add_socket`."""

    socket: zmq.Socket[Any]
    on_input: Callable[[], None]
    sends: Callable[[], int] | None
    last_sends: int = -1

    def read_if_waiting(self) -> None:
        """Before a sleep: read input whose edge a send may have taken."""
        if self.sends is not None:
            sends = self.sends()
            if sends == self.last_sends:
                return
            self.last_sends = sends
        if has_input(self.socket):
            self.on_input()


class WakePipe:
    """A socketpair whose byte wakes a poll(2): from other threads and signal handlers,
    where setting a flag alone would wait for the poll's timeout."""

    def __init__(self) -> None:
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)
        self._previous_signal_fd: int | None = None

    def fileno(self) -> int:
        """The descriptor to poll for reading."""
        return self._r.fileno()

    def wake(self) -> None:
        """Make the poll(2) return; safe from signal handlers and other threads."""
        try:
            self._w.send(b"x")
        except OSError:
            pass  # the pipe is full (the loop is being woken already) or closed

    def clear(self) -> None:
        """Read every pending wake-up."""
        try:
            while self._r.recv(4096):
                pass
        except BlockingIOError:
            pass

    def take_signals(self) -> None:
        """Wake for every signal (main thread only). Any thread may receive a signal, but
        Python runs its handler in the main thread once that thread's system call
        returns: without this, a SIGTERM taken by another thread (the state service's,
        the bus's) waits for the poll(2) timeout."""
        self._previous_signal_fd = signal.set_wakeup_fd(self._w.fileno(),
                                                        warn_on_full_buffer=False)

    def close(self) -> None:
        """Close both ends (and give signal wake-ups back to whoever had them)."""
        if (self._previous_signal_fd is not None
                and threading.current_thread() is threading.main_thread()):
            signal.set_wakeup_fd(self._previous_signal_fd)
        self._r.close()
        self._w.close()


def _frame_property(frame: Any, name: str) -> str:
    """A metadata property of ``frame``'s connection ("" when it has none)."""
    if frame is None:
        return ""
    try:
        return str(frame.get(name))
    except (zmq.ZMQError, UnicodeDecodeError):
        return ""


class RouterService:
    """A ROUTER socket served by one poll(2) loop on behalf of ``app``.

    Build it, :meth:`bind`, then :meth:`run` (as the main loop, after
    :meth:`install_signal_handlers`) or :meth:`start_thread`.

    Args:
        app: the application the loop calls (see :class:`RouterApp`).
        send_hwm: per-peer queue bound of the ROUTER, both ways (messages).
        drain_batch: most messages read in one pass before the application runs.
        backlog_limit: messages a peer's backlog may hold before
            :meth:`RouterApp.backlog_overflow` is called.
        clock: monotonic time handed to the application (injected for tests).
        name: the thread's name and the name in log lines.
        linger_ms: how long closing waits for queued messages to leave.
        security: secures the ROUTER (CURVE and ZAP); None: plaintext.
    """

    #: the ROUTER's ZMQ_MAXMSGSIZE (set before :meth:`bind`): a bigger frame drops its peer
    max_message_bytes: int = MAX_FRAME_BYTES

    def __init__(self, app: RouterApp, *, send_hwm: int, drain_batch: int, backlog_limit: int,
                 clock: Callable[[], float] = time.monotonic, name: str = "router-service",
                 linger_ms: int = CLOSE_LINGER_MS,
                 security: SocketSecurity | None = None) -> None:
        self.app = app
        #: what each message is handed to: ``app.handle``, or a hook in front of it (a
        #: secure broker checks the sender's key first)
        self.handler: Callable[[bytes, list[Any], float], bool] = app.handle
        self.security = security
        self.send_hwm = send_hwm
        self.drain_batch = drain_batch
        self.backlog_limit = backlog_limit
        self.clock = clock
        self.name = name
        self.linger_ms = linger_ms
        self.counters = ServiceCounters()
        #: the endpoint bound (the real port when asked for port 0); "" before bind
        self.endpoint = ""
        self._ctx: zmq.Context[Any] | None = None
        self._router: zmq.Socket[Any] | None = None
        self._router_fd = -1
        self._backlog: dict[bytes, deque[Frames]] = {}
        self._extras: list[_Extra] = []
        self._extra_by_fd: dict[int, _Extra] = {}
        self._loop_thread: threading.Thread | None = None
        self._stop_requested = False
        self._stop_notified = False
        self._closed = False
        # A plain poll(2) on the sockets' descriptors rather than zmq_poll: zmq_poll makes
        # a non-blocking pass first and asks ZMQ_EVENTS of every socket before and after
        # it sleeps, about a dozen system calls a pass against three here.
        self._poller = select.poll()
        self._wake = WakePipe()
        #: the first frame of the message being handled (:meth:`peer_address`)
        self._first_frame: zmq.Frame | None = None
        self._wake_fd = self._wake.fileno()
        self._poller.register(self._wake_fd, select.POLLIN)

    # ------------------------------------------------------------------ setup

    @property
    def context(self) -> zmq.Context[Any]:
        """The zmq context, for the application's other sockets (after :meth:`bind`)."""
        if self._ctx is None:
            raise RuntimeError(f"{self.name}: bind() first")
        return self._ctx

    @property
    def router(self) -> zmq.Socket[Any]:
        """The ROUTER socket (after :meth:`bind`)."""
        if self._router is None:
            raise RuntimeError(f"{self.name}: bind() first")
        return self._router

    def bind(self, endpoint: str, *, any_port_if_taken: bool = False) -> str:
        """Create the context and the ROUTER, bind it; returns the endpoint bound.

        Args:
            endpoint: ``tcp://HOST:PORT``; port 0 binds a free port.
            any_port_if_taken: when PORT is in use, bind a free one instead of failing
                (for a port derived from another, not one the user asked for).

        Raises:
            zmq.ZMQError: the endpoint cannot be bound.
        """
        if self._router is not None:
            raise RuntimeError(f"{self.name}: already bound to {self.endpoint}")
        self._ctx = ctx = zmq.Context()
        router = ctx.socket(zmq.ROUTER)
        # Without MANDATORY a send to a gone or full peer is silently dropped (19,369 of
        # 20,000 in one test); with it, EAGAIN (full) and EHOSTUNREACH (gone) are raised.
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # A peer reconnecting under its routing id takes the old connection over; not
        # on a secure socket, where a live connection's id stays its own (another key
        # presenting it is refused by libzmq; the same key, once the old one is gone).
        if self.security is None:
            router.setsockopt(zmq.ROUTER_HANDOVER, 1)
        apply_common_options(router, self.send_hwm, self.max_message_bytes)
        router.setsockopt(zmq.LINGER, self.linger_ms)
        try:
            if self.security is not None:
                self.security.secure_server(ctx, router, self.name)
            endpoint = self._bind_endpoint(router, endpoint, any_port_if_taken)
        except BaseException:
            router.close(linger=0)
            ctx.term()
            self._ctx = None
            raise
        self._router = router
        self._router_fd = int(router.getsockopt(zmq.FD))
        self._poller.register(self._router_fd, select.POLLIN)
        self.endpoint = endpoint
        return endpoint

    def _bind_endpoint(self, router: zmq.Socket[Any], endpoint: str,
                       any_port_if_taken: bool) -> str:
        host = endpoint.rsplit(":", 1)[0]
        if endpoint.endswith(":0"):
            return f"{host}:{router.bind_to_random_port(host)}"
        try:
            router.bind(endpoint)
        except zmq.ZMQError as e:
            if not (any_port_if_taken and e.errno == zmq.EADDRINUSE):
                raise
            logger.warning("%s: %s is in use; binding a free port", self.name, endpoint)
            return f"{host}:{router.bind_to_random_port(host)}"
        return endpoint

    def add_socket(self, sock: zmq.Socket[Any], on_input: Callable[[], None],
                   sends: Callable[[], int] | None = None) -> None:
        """Also wake for ``sock`` (the broker's bus XPUB). Call before :meth:`run` or from
        the loop's thread.

        Args:
            sock: a socket the loop's thread owns.
            on_input: reads ``sock`` until ``zmq.Again``: its descriptor is
                edge-triggered, so input left unread wakes nobody.
            sends: how many times the application has sent on ``sock``. Any operation on
                a socket can take the edge of input that arrived meanwhile, so before
                sleeping the loop asks ZMQ_EVENTS of ``sock`` whenever this changed (on
                every pass without it).
        """
        extra = _Extra(sock, on_input, sends)
        fd = int(sock.getsockopt(zmq.FD))
        self._extras.append(extra)
        self._extra_by_fd[fd] = extra
        self._poller.register(fd, select.POLLIN)

    # ------------------------------------------------------------------ stopping

    def wake(self) -> None:
        """Make the loop run a pass now; safe from signal handlers and other threads."""
        self._wake.wake()

    def request_stop(self) -> None:
        """Ask the loop to stop: :meth:`RouterApp.on_stop` runs on its next pass, and the
        loop ends when :meth:`RouterApp.after_drain` says so. Safe from signal handlers
        and other threads."""
        self._stop_requested = True
        self._wake.wake()

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT request a stop (main thread only; the loop then runs there)."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        self._wake.take_signals()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.request_stop()

    def start_thread(self) -> threading.Thread:
        """Run the loop in a daemon thread named :attr:`name` (call :meth:`bind` first)."""
        self._loop_thread = threading.Thread(target=self._run_logged, name=self.name, daemon=True)
        self._loop_thread.start()
        return self._loop_thread

    def stop_thread(self, timeout_s: float = 10.0) -> bool:
        """Stop the loop started by :meth:`start_thread` and wait for it; returns whether
        it ended within ``timeout_s``."""
        self.request_stop()
        thread = self._loop_thread
        if thread is None:
            return True
        thread.join(timeout_s)
        return not thread.is_alive()

    def _run_logged(self) -> None:
        try:
            self.run()
        except Exception:  # noqa: BLE001 - a thread's death must at least be logged
            logger.critical("%s stopped on an error", self.name, exc_info=True)

    # ------------------------------------------------------------------ the loop

    def run(self) -> None:
        """Serve until :meth:`RouterApp.after_drain` returns False, then :meth:`close`."""
        router = self.router
        try:
            while self._pass(router):
                pass
        finally:
            self.close()

    def _pass(self, router: zmq.Socket[Any]) -> bool:
        app = self.app
        # A ZMQ descriptor is edge-triggered and any operation on its socket (the last
        # pass's sends too) can take the edge of a message that arrived meanwhile: sleep
        # only once ZMQ_EVENTS says nothing waits.
        input_waits = has_input(router)
        for extra in self._extras:
            extra.read_if_waiting()
        timeout = 0 if input_waits else self._sleep_ms()
        for fd, _ in self._poller.poll(timeout):
            if fd == self._router_fd:
                input_waits = True
            elif fd == self._wake_fd:
                self._wake.clear()
            else:
                self._extra_by_fd[fd].on_input()
        now = self.clock()
        app.before_drain(now)
        if input_waits:
            # (a wake-up for something other than a message makes the first recv raise
            # zmq.Again, which _drain takes as "nothing to read")
            self._drain(router, now)
        now = self.clock()
        if self._stop_requested and not self._stop_notified:
            self._stop_notified = True
            app.on_stop(now)
        keep_serving = app.after_drain(now)
        if self._backlog:
            self._retry_backlogs()
        return keep_serving

    def _sleep_ms(self) -> int:
        timeout = self.app.timeout_ms(self.clock())
        if self._backlog and not 0 <= timeout <= BACKLOG_RETRY_MS:
            return BACKLOG_RETRY_MS
        return timeout

    def _drain(self, router: zmq.Socket[Any], now: float) -> None:
        handle = self.handler
        received = 0
        # Bounded, so that the application's timers, dispatch and sends run (and peers
        # start working) while the rest of a burst still waits in the socket.
        recv = _backend_recv
        while received < self.drain_batch:
            # recv_frames inlined, keeping the first frame: its connection's metadata
            # (Peer-Address) is read only by a handler that asks (:meth:`peer_address`).
            try:
                frame = recv(router, NOBLOCK, False)
            except zmq.Again:
                break
            self._first_frame = frame
            frames: list[Any] = [frame.bytes]
            while frame.more:
                frame = recv(router, NOBLOCK, False)
                # A large frame (a payload) stays in libzmq's buffer, seen through a
                # memoryview: copying a 64 MB result into bytes doubled the memory it held
                # and cost the loop tens of milliseconds.
                frames.append(frame.bytes if len(frame) < ZERO_COPY_BYTES else frame.buffer)
            received += 1
            try:
                enough = handle(frames[0], frames[1:], now)
            except Exception:  # noqa: BLE001 - one bad message never stops the service
                self.counters.handler_errors += 1
                logger.exception("%s: handler failed for a message from %r", self.name,
                                 frames[0])
                enough = False
            # Asking whether more is queued costs a fraction of the zmq.Again that an
            # empty recv raises (about 5 against 19 us when the cache is cold, as it is
            # on every pass of a lightly loaded service).
            if enough or not has_input(router):
                break
        self.counters.messages_in += received

    def peer_address(self) -> str:
        """The remote address of the message being handled ("" when the transport has
        none, as ipc and inproc): from its first frame, kept until the next message."""
        return _frame_property(self._first_frame, "Peer-Address")

    def peer_key(self) -> str:
        """The CURVE public key (Z85) of the message being handled: its ZAP user id,
        which libzmq sets on every frame of an authenticated connection ("" on a
        plaintext socket)."""
        return _frame_property(self._first_frame, "User-Id")

    def peer_role(self) -> str:
        """The role the allow-list gives the sender of the message being handled (the ZAP
        handler's ``Role`` metadata; "" on a plaintext socket)."""
        return _frame_property(self._first_frame, "Role")

    # ------------------------------------------------------------------ sending

    def send(self, identity: bytes, messages: list[Frames]) -> Delivery:
        """Send ``messages`` to ``identity`` in order, without blocking (loop thread only).

        A full pipe keeps the rest in ``identity``'s backlog, which goes before anything
        newer and is retried every pass; an unknown or gone identity drops them and calls
        :meth:`RouterApp.peer_unreachable`.
        """
        backlog = self._backlog.get(identity)
        if backlog is not None:
            backlog.extend(messages)
            delivery = self._send_backlog(identity, backlog)
            if delivery is _BACKLOGGED:
                self._backlogged(identity, backlog)
            return delivery
        router = self._router
        assert router is not None, "bind() first"
        for index, frames in enumerate(messages):
            try:
                # With NOBLOCK a full pipe raises on the first frame, before any is sent.
                send_frames(router, [identity, *frames], NOBLOCK)
            except zmq.Again:
                self.counters.messages_out += index
                backlog = self._backlog[identity] = deque(messages[index:])
                self._backlogged(identity, backlog)
                return _BACKLOGGED
            except zmq.ZMQError as e:
                self.counters.messages_out += index
                return self._unreachable(identity, len(messages) - index, e)
        self.counters.messages_out += len(messages)
        return _SENT

    def _send_backlog(self, identity: bytes, backlog: deque[Frames]) -> Delivery:
        router = self._router
        assert router is not None, "bind() first"
        sent = 0
        try:
            while backlog:
                send_frames(router, [identity, *backlog[0]], NOBLOCK)
                backlog.popleft()
                sent += 1
        except zmq.Again:
            return _BACKLOGGED
        except zmq.ZMQError as e:
            return self._unreachable(identity, len(backlog), e)
        finally:
            self.counters.messages_out += sent
        del self._backlog[identity]
        return _SENT

    def _backlogged(self, identity: bytes, backlog: deque[Frames]) -> None:
        self.counters.backpressure += 1
        if len(backlog) > self.backlog_limit:
            self.app.backlog_overflow(identity, backlog)

    def _unreachable(self, identity: bytes, lost: int, error: zmq.ZMQError) -> Delivery:
        if error.errno != zmq.EHOSTUNREACH:
            raise error
        self._backlog.pop(identity, None)
        self.counters.unreachable += 1
        self.counters.dropped += lost
        self.app.peer_unreachable(identity)
        return Delivery.UNREACHABLE

    def _retry_backlogs(self) -> None:
        for identity, backlog in list(self._backlog.items()):
            # (a peer_unreachable() call may have sent to, or dropped, another backlog)
            if self._backlog.get(identity) is backlog:
                self._send_backlog(identity, backlog)

    def backlogged_peers(self) -> list[bytes]:
        """The peers whose messages wait for room in their pipe."""
        return list(self._backlog)

    def backlog_size(self, identity: bytes) -> int:
        """Messages waiting for ``identity``'s pipe to have room."""
        backlog = self._backlog.get(identity)
        return 0 if backlog is None else len(backlog)

    # ------------------------------------------------------------------ closing

    def close(self) -> None:
        """Close the application's resources (:meth:`RouterApp.on_close`), the registered
        sockets, the ROUTER (waiting ``linger_ms`` for queued messages) and the context.
        Called by :meth:`run` when the loop ends; idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self.app.on_close()
        finally:
            for extra in self._extras:
                extra.socket.close(linger=0)  # a no-op for one the application closed
            if self._router is not None:
                self._router.close(linger=self.linger_ms)
                self._router = None
            if self._ctx is not None:
                self._ctx.term()
                self._ctx = None
            self._wake.close()
            logger.info("%s stopped", self.name)


__all__ = ["BACKLOG_RETRY_MS", "CLOSE_LINGER_MS", "Delivery", "Frames", "RouterApp",
           "RouterService", "ServiceCounters", "SocketSecurity", "WakePipe"]
