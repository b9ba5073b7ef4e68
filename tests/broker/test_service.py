"""broker/service.py: a real RouterService on 127.0.0.1, port 0, with a small echo
application, and DEALER peers in the test's thread.

The service runs in its own thread (or, for the signal test, in the main thread). Every
wait is bounded: a peer's ``RCVTIMEO``, ``Queue.get(timeout=...)``, ``Thread.join(...)``.
Nothing sleeps.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import zmq

from broker.service import Delivery, Frames, RouterService

#: How long any one wait may take before the test fails.
WAIT_S = 5.0
#: A stop must end the loop well before this, far below the application's timeout.
STOP_DEADLINE_S = 2.0
#: The echo application's timer: never due during a test, so only input, wake-ups and
#: the backlog retry can end a sleep.
IDLE_TIMEOUT_MS = 60_000
#: Messages of one burst and their size: together far more than a peer's socket buffers
#: (4 MB at most here) and high-water marks hold, so the service must keep a backlog.
BURST_COUNT = 300
BURST_BYTES = 32 * 1024


class EchoApp:
    """A :class:`broker.service.RouterApp` driven by its peers' first frame:

    - ``echo, *frames``: the same frames back;
    - ``burst, first, count, size``: ``count`` messages ``seq, n, padding`` in one send;
    - ``to, identity``: one message to another identity;
    - ``boom``: the handler raises.
    """

    def __init__(self, *, send_hwm: int = 1000, drain_batch: int = 64,
                 one_message_per_pass: bool = False, backlog_limit: int | None = None) -> None:
        self.service = RouterService(self, send_hwm=send_hwm, drain_batch=drain_batch,
                                     backlog_limit=backlog_limit or 10 * BURST_COUNT,
                                     name="echo-service")
        self.one_message_per_pass = one_message_per_pass
        #: with a limit given, overflowing backlogs lose their oldest messages
        self.drops_oldest = backlog_limit is not None
        #: the sizes of backlogs that overflowed
        self.overflows: queue.Queue[int] = queue.Queue()
        #: what became of the sends a peer asked for (bursts, ``to``), in order
        self.deliveries: queue.Queue[Delivery] = queue.Queue()
        self.unreachable: queue.Queue[bytes] = queue.Queue()
        self.extra_input: queue.Queue[bytes] = queue.Queue()
        #: most messages one drain handled (set before the replies leave)
        self.most_per_drain = 0
        self._this_drain = 0
        self.stops = 0
        self.closed = threading.Event()
        #: (to whom, what, whether to report the delivery)
        self._outbox: list[tuple[bytes, list[Frames], bool]] = []
        self._stopping = False
        self._extra: zmq.Socket[Any] | None = None

    def timeout_ms(self, now: float) -> int:
        return IDLE_TIMEOUT_MS

    def before_drain(self, now: float) -> None:
        self._this_drain = 0

    def handle(self, identity: bytes, frames: list[bytes], now: float) -> bool:
        self._this_drain += 1
        self.most_per_drain = max(self.most_per_drain, self._this_drain)
        match frames:
            case [b"echo", *rest]:
                self._outbox.append((identity, [[b"echo", *rest]], False))
            case [b"burst", first, count, size]:
                start = int(first)
                padding = b"x" * int(size)
                messages: list[Frames] = [[b"seq", b"%d" % n, padding]
                                          for n in range(start, start + int(count))]
                self._outbox.append((identity, messages, True))
            case [b"to", target]:
                self._outbox.append((target, [[b"hello"]], True))
            case [b"boom"]:
                raise RuntimeError("a handler bug")
        return self.one_message_per_pass

    def on_stop(self, now: float) -> None:
        self.stops += 1
        self._stopping = True

    def after_drain(self, now: float) -> bool:
        outbox, self._outbox = self._outbox, []
        for identity, messages, report in outbox:
            delivery = self.service.send(identity, messages)
            if report:
                self.deliveries.put(delivery)
        return not self._stopping

    def peer_unreachable(self, identity: bytes) -> None:
        self.unreachable.put(identity)

    def backlog_overflow(self, identity: bytes, backlog: deque[Frames]) -> None:
        if not self.drops_oldest:
            raise AssertionError(f"the backlog of {identity!r} should not overflow")
        self.overflows.put(len(backlog))
        while len(backlog) > self.service.backlog_limit:
            backlog.popleft()

    def on_close(self) -> None:
        self.closed.set()

    def listen_extra(self, sock: zmq.Socket[Any]) -> None:
        """Read ``sock`` (a PULL) in the loop; what arrives goes to :attr:`extra_input`."""
        self._extra = sock

    def read_extra(self) -> None:
        assert self._extra is not None
        while True:
            try:
                self.extra_input.put(self._extra.recv(zmq.NOBLOCK))
            except zmq.Again:
                return


@pytest.fixture
def start_service() -> Iterator[Callable[..., EchoApp]]:
    """Start echo services on 127.0.0.1:0 in threads; each is stopped (within
    STOP_DEADLINE_S) and closed at teardown."""
    apps: list[EchoApp] = []

    def start(before_run: Callable[[EchoApp], None] | None = None, **kwargs: Any) -> EchoApp:
        app = EchoApp(**kwargs)
        apps.append(app)
        app.service.bind("tcp://127.0.0.1:0")
        if before_run is not None:
            before_run(app)
        app.service.start_thread()
        return app

    yield start
    for app in apps:
        assert app.service.stop_thread(STOP_DEADLINE_S), "the service loop did not stop"
        app.service.close()


class Peers:
    """The test's own sockets, each closed (linger 0) at teardown, before its context."""

    def __init__(self) -> None:
        self.context: zmq.Context[Any] = zmq.Context()
        self.sockets: list[zmq.Socket[Any]] = []

    def socket(self, kind: int) -> zmq.Socket[Any]:
        sock = self.context.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, int(WAIT_S * 1000))
        sock.setsockopt(zmq.SNDTIMEO, int(WAIT_S * 1000))
        self.sockets.append(sock)
        return sock

    def dealer(self, endpoint: str, identity: bytes | None = None,
               **options: int) -> zmq.Socket[Any]:
        """A DEALER connected to ``endpoint``; ``options`` by zmq name (``RCVHWM=2``)."""
        sock = self.socket(zmq.DEALER)
        if identity is not None:
            sock.setsockopt(zmq.ROUTING_ID, identity)
        for name, value in options.items():
            sock.setsockopt(getattr(zmq, name), value)
        sock.connect(endpoint)
        return sock

    def close(self) -> None:
        for sock in self.sockets:
            sock.close(linger=0)
        self.context.term()


@pytest.fixture
def peers() -> Iterator[Peers]:
    peers = Peers()
    yield peers
    peers.close()


def test_bind_to_port_0_reports_the_port_bound_and_echoes(
        start_service: Callable[..., EchoApp], peers: Peers) -> None:
    # Given a service bound to port 0
    app = start_service()
    endpoint = app.service.endpoint
    # Then it reports the real port
    match = re.fullmatch(r"tcp://127\.0\.0\.1:(\d+)", endpoint)
    assert match is not None and int(match.group(1)) > 0, endpoint
    # And a peer connecting there gets its frames back
    peer = peers.dealer(endpoint)
    peer.send_multipart([b"echo", b"hello", b"\x00binary"])
    assert peer.recv_multipart() == [b"echo", b"hello", b"\x00binary"]
    assert app.service.counters.messages_in >= 1


def test_a_taken_port_fails_unless_any_port_is_allowed(
        start_service: Callable[..., EchoApp]) -> None:
    # Given a service holding a port
    endpoint = start_service().service.endpoint
    # When another binds the same port, it fails, and cleans up after itself
    second = EchoApp()
    try:
        with pytest.raises(zmq.ZMQError) as failure:
            second.service.bind(endpoint)
        assert failure.value.errno == zmq.EADDRINUSE
        # Unless any free port will do
        other = second.service.bind(endpoint, any_port_if_taken=True)
        assert other != endpoint and other == second.service.endpoint
    finally:
        second.service.close()
    assert second.closed.is_set()


@pytest.mark.parametrize("one_message_per_pass, most_per_drain", [(True, 1), (False, 4)],
                         ids=["handler-ends-each-drain", "drain-batch-of-4"])
def test_many_messages_echo_in_order_across_bounded_drains(
        start_service: Callable[..., EchoApp], peers: Peers, one_message_per_pass: bool,
        most_per_drain: int) -> None:
    # Given a service whose drains are cut short: by its handler (as if each message
    # were a full batch of work), or by a drain batch of 4
    app = start_service(one_message_per_pass=one_message_per_pass, drain_batch=4)
    peer = peers.dealer(app.service.endpoint)
    # When a burst arrives at once
    for n in range(200):
        peer.send_multipart([b"echo", b"%d" % n])
    # Then every message is answered, in order, without waiting for the idle timeout:
    # input left in the socket after a pass is seen before the loop sleeps
    started = time.monotonic()
    for n in range(200):
        assert peer.recv_multipart() == [b"echo", b"%d" % n]
    assert time.monotonic() - started < WAIT_S
    assert 1 <= app.most_per_drain <= most_per_drain


def test_request_stop_from_another_thread_ends_run_promptly(
        peers: Peers) -> None:
    # Given a service asleep in poll(2) with a 60 s timer
    app = EchoApp()
    app.service.bind("tcp://127.0.0.1:0")
    thread = app.service.start_thread()
    try:
        peer = peers.dealer(app.service.endpoint)
        peer.send_multipart([b"echo", b"up"])
        assert peer.recv_multipart() == [b"echo", b"up"]
        # When another thread asks it to stop
        started = time.monotonic()
        threading.Thread(target=app.service.request_stop).start()
        thread.join(STOP_DEADLINE_S)
        # Then run() returns at once, after one on_stop and a close
        assert not thread.is_alive()
        assert time.monotonic() - started < STOP_DEADLINE_S
        assert app.stops == 1
        assert app.closed.is_set()
    finally:
        app.service.stop_thread(STOP_DEADLINE_S)
        app.service.close()


@pytest.mark.timeout(30)
def test_sigterm_in_the_main_loop_ends_run(peers: Peers) -> None:
    # Given a service run as the main loop with its signal handlers, and a peer in another
    # thread that sends SIGTERM once it got an answer (the loop is serving, then asleep)
    app = EchoApp()
    app.service.bind("tcp://127.0.0.1:0")
    peer = peers.dealer(app.service.endpoint)  # used by the killer thread only
    replies: list[list[bytes]] = []

    def echo_then_sigterm() -> None:
        try:
            peer.send_multipart([b"echo", b"wake"])
            replies.append(peer.recv_multipart())
        finally:
            # Whatever happened: the loop must end for the test to report it.
            os.kill(os.getpid(), signal.SIGTERM)

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    killer = threading.Thread(target=echo_then_sigterm)
    try:
        app.service.install_signal_handlers()
        killer.start()
        # When SIGTERM arrives (in whichever thread the kernel picks)
        app.service.run()
        killer.join(WAIT_S)
        # Then run() returned through on_stop, after answering the peer
        assert replies == [[b"echo", b"wake"]]
        assert app.stops == 1 and app.closed.is_set()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        app.service.close()


def test_a_full_peer_gets_its_backlog_later_and_in_order(
        start_service: Callable[..., EchoApp], peers: Peers) -> None:
    # Given a peer with tiny queues that reads nothing yet
    app = start_service(send_hwm=2)
    peer = peers.dealer(app.service.endpoint, b"slow-peer", RCVHWM=2, RCVBUF=4096)
    # When it asks for two bursts, far more than its pipe holds
    peer.send_multipart([b"burst", b"0", b"%d" % BURST_COUNT, b"%d" % BURST_BYTES])
    assert app.deliveries.get(timeout=WAIT_S) is Delivery.BACKLOGGED, "it should back up"
    peer.send_multipart([b"burst", b"%d" % BURST_COUNT, b"%d" % BURST_COUNT,
                         b"%d" % BURST_BYTES])
    assert app.deliveries.get(timeout=WAIT_S) is Delivery.BACKLOGGED, "it queues behind"
    assert app.service.counters.backpressure >= 2
    # Then once it reads, every message arrives, in order, with nothing else sent to it
    for n in range(2 * BURST_COUNT):
        tag, seq, padding = peer.recv_multipart()
        assert (tag, int(seq), len(padding)) == (b"seq", n, BURST_BYTES)
    # And the service still answers it
    peer.send_multipart([b"echo", b"after"])
    assert peer.recv_multipart() == [b"echo", b"after"]
    assert app.service.backlog_size(b"slow-peer") == 0


def test_an_overflowing_backlog_is_cut_by_the_application(
        start_service: Callable[..., EchoApp], peers: Peers) -> None:
    # Given a service whose application keeps only the newest 50 messages of a backlog
    app = start_service(send_hwm=2, backlog_limit=50)
    peer = peers.dealer(app.service.endpoint, b"slow-peer", RCVHWM=2, RCVBUF=4096)
    # When a peer that reads nothing asks for far more than its pipe and 50 more hold
    count = 2 * BURST_COUNT
    peer.send_multipart([b"burst", b"0", b"%d" % count, b"%d" % BURST_BYTES])
    assert app.deliveries.get(timeout=WAIT_S) is Delivery.BACKLOGGED
    # Then the application was asked to cut the backlog
    assert app.overflows.get(timeout=WAIT_S) > 50
    # And the peer gets what left before, then the newest 50: in order, with a gap
    received: list[int] = []
    while not received or received[-1] != count - 1:
        received.append(int(peer.recv_multipart()[1]))
    assert received == sorted(received) and len(received) < count
    assert received[-50:] == list(range(count - 50, count))


def test_a_send_to_an_unknown_identity_drops_it_and_the_service_goes_on(
        start_service: Callable[..., EchoApp], peers: Peers) -> None:
    # Given a running service
    app = start_service()
    peer = peers.dealer(app.service.endpoint)
    # When the application sends to an identity no peer has
    peer.send_multipart([b"to", b"nobody"])
    # Then the send says so, and the application hears it
    assert app.deliveries.get(timeout=WAIT_S) is Delivery.UNREACHABLE
    assert app.unreachable.get(timeout=WAIT_S) == b"nobody"
    assert app.service.counters.unreachable == 1
    assert app.service.counters.dropped == 1
    # And the service keeps serving
    peer.send_multipart([b"echo", b"still here"])
    assert peer.recv_multipart() == [b"echo", b"still here"]


def test_a_failing_handler_is_counted_and_the_drain_goes_on(
        start_service: Callable[..., EchoApp], peers: Peers) -> None:
    # Given a running service
    app = start_service()
    peer = peers.dealer(app.service.endpoint)
    # When a message makes the handler raise, followed by a good one
    peer.send_multipart([b"boom"])
    peer.send_multipart([b"echo", b"next"])
    # Then the good one is answered and the failure counted
    assert peer.recv_multipart() == [b"echo", b"next"]
    assert app.service.counters.handler_errors == 1


@pytest.mark.parametrize("counted_sends", [False, True], ids=["checked-every-pass",
                                                               "checked-after-sends"])
def test_input_on_an_extra_socket_reaches_its_callback(
        start_service: Callable[..., EchoApp], peers: Peers,
        counted_sends: bool) -> None:
    # Given a service that also listens on a PULL socket of its own context
    endpoint = ""

    def add_pull(app: EchoApp) -> None:
        nonlocal endpoint
        pull = app.service.context.socket(zmq.PULL)
        endpoint = f"tcp://127.0.0.1:{pull.bind_to_random_port('tcp://127.0.0.1')}"
        app.listen_extra(pull)
        app.service.add_socket(pull, app.read_extra,
                               sends=(lambda: 0) if counted_sends else None)

    app = start_service(before_run=add_pull)
    push = peers.socket(zmq.PUSH)
    push.connect(endpoint)
    # When messages arrive on it, while the ROUTER is busy too
    router_peer = peers.dealer(app.service.endpoint)
    for n in range(20):
        push.send(b"extra %d" % n)
        router_peer.send_multipart([b"echo", b"%d" % n])
    # Then each reaches the callback, in order (and the ROUTER's traffic its handler)
    for n in range(20):
        assert app.extra_input.get(timeout=WAIT_S) == b"extra %d" % n
        assert router_peer.recv_multipart() == [b"echo", b"%d" % n]
    # (the service closes the socket it was given when it stops: teardown would hang
    # in the context's term otherwise)
