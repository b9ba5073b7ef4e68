"""A loopback TCP forwarder with a blackhole switch, to partition an agent from the broker.

::

    with BlackholeProxy("127.0.0.1", broker.port) as proxy:
        agent = cluster.agent(proxy.url, ...)     # the agent connects through the proxy
        proxy.blackhole()                         # partition: bytes vanish both ways
        ...
        proxy.heal()                              # the link is back

While blackholed, connections stay open (no FIN, no RST: neither end hears of the
failure from TCP) and every byte read in either direction is discarded; new connections
are accepted and connected upstream, and their bytes discarded too. That is what a
partition looks like to ZeroMQ without ZMTP heartbeats: silence.

A TCP stream that lost bytes cannot go on (a real one retransmits or dies), so
:meth:`heal` closes the connections that lost bytes (both ends see a reset, as after a
long partition) and forwards on every other and every new connection. The peers'
reconnect logic then has to bring the link back, which is the point of the test.

One thread runs a ``selectors`` loop; the switch methods are thread-safe.
"""

from __future__ import annotations

import selectors
import socket
import struct
import threading
from dataclasses import dataclass, field

#: Bytes read per recv.
CHUNK = 65536


@dataclass(eq=False)
class _Link:
    """One proxied connection: the downstream (agent) side and the upstream (broker) side."""

    down: socket.socket
    up: socket.socket
    #: bytes waiting to be written to each side (when its send buffer is full)
    to_down: bytearray = field(default_factory=bytearray)
    to_up: bytearray = field(default_factory=bytearray)
    #: bytes were discarded: the stream is broken and must be reset on heal
    tainted: bool = False
    closed: bool = False


class BlackholeProxy:
    """Forward ``127.0.0.1:<port>`` to ``upstream_host:upstream_port``.

    Args:
        upstream_host, upstream_port: where to forward (the broker's ROUTER).
        listen_host: where to listen (a free port is chosen).
    """

    def __init__(self, upstream_host: str, upstream_port: int,
                 listen_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self._listener = socket.create_server((listen_host, 0))
        self._listener.setblocking(False)
        self.host, self.port = self._listener.getsockname()[:2]
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ, None)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._lock = threading.Lock()
        self._links: list[_Link] = []
        self._blackholed = False
        self._heal_requested = False
        self._stopping = False
        #: counters, for the test's report
        self.discarded_bytes = 0
        self.forwarded_bytes = 0
        self.connections = 0
        self.resets = 0
        self._thread = threading.Thread(target=self._run, name="blackhole-proxy", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"tcp://{self.host}:{self.port}"

    @property
    def blackholed(self) -> bool:
        return self._blackholed

    # ------------------------------------------------------------------ switch

    def blackhole(self) -> None:
        """From now on, discard every byte in both directions (connections stay open)."""
        with self._lock:
            self._blackholed = True
        self._wake()

    def heal(self) -> None:
        """Forward again; connections that lost bytes are reset."""
        with self._lock:
            self._blackholed = False
            self._heal_requested = True
        self._wake()

    def close(self) -> None:
        with self._lock:
            self._stopping = True
        self._wake()
        self._thread.join(timeout=10)

    def __enter__(self) -> BlackholeProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    # ------------------------------------------------------------------ loop

    def _run(self) -> None:
        try:
            while True:
                with self._lock:
                    if self._stopping:
                        break
                    heal, self._heal_requested = self._heal_requested, False
                if heal:
                    for link in [lk for lk in self._links if lk.tainted]:
                        self._close_link(link, reset=True)
                        self.resets += 1
                for key, events in self._selector.select(timeout=None):
                    if key.data == "wake":
                        try:
                            while self._wake_r.recv(4096):
                                pass
                        except BlockingIOError:
                            pass
                    elif key.data is None:
                        self._accept()
                    else:
                        link, side = key.data
                        if not link.closed:
                            self._service(link, side, events)
        finally:
            for link in list(self._links):
                self._close_link(link, reset=False)
            self._selector.close()
            self._listener.close()
            self._wake_r.close()
            self._wake_w.close()

    def _accept(self) -> None:
        try:
            down, _ = self._listener.accept()
        except BlockingIOError:
            return
        try:
            up = socket.create_connection(self.upstream, timeout=5)
        except OSError:
            down.close()
            return
        for sock in (down, up):
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        link = _Link(down, up)
        self._links.append(link)
        self.connections += 1
        self._selector.register(down, selectors.EVENT_READ, (link, "down"))
        self._selector.register(up, selectors.EVENT_READ, (link, "up"))

    def _service(self, link: _Link, side: str, events: int) -> None:
        src = link.down if side == "down" else link.up
        dst = link.up if side == "down" else link.down
        pending = link.to_up if side == "down" else link.to_down
        if events & selectors.EVENT_WRITE:
            # ``src`` is writable: flush what waits for it
            waiting = link.to_down if side == "down" else link.to_up
            self._write(link, src, waiting)
            if link.closed:
                return
        if not events & selectors.EVENT_READ:
            return
        try:
            data = src.recv(CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._close_link(link, reset=False)
            return
        if self._blackholed:
            self.discarded_bytes += len(data)
            link.tainted = True
            return
        self.forwarded_bytes += len(data)
        pending.extend(data)
        self._write(link, dst, pending)

    def _write(self, link: _Link, sock: socket.socket, buffer: bytearray) -> None:
        if buffer:
            try:
                sent = sock.send(buffer)
            except BlockingIOError:
                sent = 0
            except OSError:
                self._close_link(link, reset=False)
                return
            del buffer[:sent]
        side = "down" if sock is link.down else "up"
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if buffer else 0)
        self._selector.modify(sock, events, (link, side))

    def _close_link(self, link: _Link, reset: bool) -> None:
        if link.closed:
            return
        link.closed = True
        for sock in (link.down, link.up):
            try:
                self._selector.unregister(sock)
            except (KeyError, ValueError):
                pass
            if reset:
                # SO_LINGER 0: close sends RST, as a connection that timed out would
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
        self._links.remove(link)
