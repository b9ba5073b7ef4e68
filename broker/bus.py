"""The pub/sub bus: an XSUB/XPUB forwarder, and the publisher the broker's events go out on.

::

    publishers (PUB or XPUB) --connect--> XSUB  in  :5557 \\
                                                          zmq.proxy_steerable (C, own thread)
    subscribers (SUB)        --connect--> XPUB  out :5556 /

The forwarder is libzmq's proxy running without the GIL in a thread of its own, so a
message crosses it at C speed and never waits for the broker's Python loop. Messages go
from the XSUB to the XPUB; subscriptions go the other way, and the XSUB passes them on to
every publisher, which then sends only what somebody subscribed to (a publisher with no
matching subscriber sends nothing). ZeroMQ matches a subscription as a byte prefix of the
topic frame: a subscription to ``tasks.`` receives ``tasks.t-1`` and ``tasks.t-2``.

Slow subscribers: the XPUB keeps at most ``hwm`` messages per subscriber and drops beyond
that, for that subscriber only (it never blocks, so neither the forwarder nor the other
subscribers wait for a slow one). Subscribers see the loss as a jump in the per-topic
sequence numbers (``broker/protocol.py``, bus section) and count it.

The broker publishes its own events (agents joining and leaving, task state changes) on
an XPUB of its own, the ``events`` endpoint (broker port + 4), not through the
forwarder: anyone who reaches the forwarder's XSUB can publish any topic there, so an
event that came through it could be forged. Only the broker sends on the events socket;
subscribers take the reserved topics (``wire.bus.RESERVED_PREFIXES``: ``agents.``,
``tasks.``) from it alone and drop them when they arrive through the forwarder. Being an
XPUB, it hears which prefixes are subscribed (the broker builds task events only while
somebody listens) and answers each subscription with a probe on its prefix, which is
how a subscriber knows its subscription has arrived.

Run alone: ``python -m broker.bus --out 127.0.0.1:5556 --in 127.0.0.1:5557`` (one JSON
line ``{"event": "ready", "bus_out", "bus_in", "pid"}`` on stdout when bound); a broker
started with ``--bus-connect OUT,IN`` then uses it instead of running its own. With
``--secure`` (or ``ORCH_SECURE=1``) and ``--data-dir`` both sockets are CURVE servers
with ZAP, keyed from the data dir as the broker's ``--secure`` is (the broker's key pair,
the same allow-list: ``broker/security.py``), and the ready line carries
``curve_public_key``.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import orjson
import zmq

from broker.config import BusConfig, parse_host_port
from broker.errors import ConfigError
from wire.bus import (
    BUS_AGENT_CIRCUIT, BUS_AGENT_HEALTH, BUS_AGENT_JOINED, BUS_AGENT_LEFT, BUS_BROKER_SENDER,
    BUS_PEER_REFUSED, BUS_POOL, BUS_TASKS_PREFIX, PrefixSet, encode_broker_probe, encode_bus,
)
from wire.home import home_dir
from wire.sockets import NOBLOCK, apply_common_options, send_frames

if TYPE_CHECKING:
    from broker.service import SocketSecurity

logger = logging.getLogger(__name__)

#: How long a statistics request to the forwarder thread may take (the broker's status
#: waits for it).
STATISTICS_TIMEOUT_MS: Final = 200
_TASKS_PREFIX_BYTES: Final = BUS_TASKS_PREFIX.encode()


class BusForwarder:
    """The XSUB/XPUB forwarder. :meth:`bind`, then :meth:`start_thread` (or :meth:`run`).

    Args:
        config: its addresses and queue bound.
        security: CURVE and ZAP for both sockets (``broker/security.py``); None: plaintext.
    """

    def __init__(self, config: BusConfig, security: SocketSecurity | None = None) -> None:
        self.config = config
        self.security = security
        self.out_endpoint = ""
        self.in_endpoint = ""
        self._ctx = zmq.Context()
        self._xsub: zmq.Socket[Any] | None = None
        self._xpub: zmq.Socket[Any] | None = None
        self._control: zmq.Socket[Any] | None = None
        #: our end of the control pipe; every use happens under the lock, so that status
        #: (broker thread) and stop (main thread) never share the socket at once
        self._steer: zmq.Socket[Any] | None = None
        self._steer_lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def bind(self, any_port_if_taken: bool = False) -> tuple[str, str]:
        """Create and bind both sockets; returns the (out, in) endpoints.

        Args:
            any_port_if_taken: when a configured port is in use, bind a free one instead
                of failing (for ports derived from the broker's, not ones asked for).

        Raises:
            zmq.ZMQError: a socket could not be bound.
        """
        hwm = self.config.hwm
        xpub = self._ctx.socket(zmq.XPUB)
        xsub = self._ctx.socket(zmq.XSUB)
        for sock in (xpub, xsub):
            apply_common_options(sock, hwm, self.config.max_message_bytes)
            sock.setsockopt(zmq.LINGER, 0)
        try:
            if self.security is not None:
                self.security.secure_server(self._ctx, xpub, "bus")
                self.security.secure_server(self._ctx, xsub, "bus")
            self.out_endpoint = _bind(xpub, self.config.out_bind, any_port_if_taken)
            self.in_endpoint = _bind(xsub, self.config.in_bind, any_port_if_taken)
        except zmq.ZMQError:
            xpub.close(linger=0)
            xsub.close(linger=0)
            raise
        self._xpub, self._xsub = xpub, xsub
        address = f"inproc://bus-control-{id(self)}"
        self._control = self._ctx.socket(zmq.PAIR)
        self._control.bind(address)
        self._steer = self._ctx.socket(zmq.PAIR)
        self._steer.connect(address)
        return self.out_endpoint, self.in_endpoint

    def run(self) -> None:
        """Forward until :meth:`stop_thread` (blocks; the GIL is released meanwhile)."""
        assert self._xsub is not None and self._xpub is not None
        try:
            zmq.proxy_steerable(self._xsub, self._xpub, None, self._control)
        except zmq.ContextTerminated:
            pass  # the context went away under us: that is a stop too
        logger.info("bus forwarder stopped")

    def start_thread(self) -> threading.Thread:
        """Run the forwarder in a daemon thread (call :meth:`bind` first)."""
        self._thread = threading.Thread(target=self._run_logged, name="bus-forwarder",
                                        daemon=True)
        self._thread.start()
        logger.info("bus forwarder: subscribers connect to %s, publishers to %s",
                    self.out_endpoint, self.in_endpoint)
        return self._thread

    def _run_logged(self) -> None:
        try:
            self.run()
        except Exception:  # noqa: BLE001 - a thread's death must at least be logged
            logger.critical("the bus forwarder stopped on an error", exc_info=True)

    def stop_thread(self, timeout_s: float = 5.0) -> None:
        """Stop the forwarder, wait for its thread and close every socket."""
        with self._steer_lock:
            if self._steer is not None and self._thread is not None and self._thread.is_alive():
                self._steer.send(b"TERMINATE")
        if self._thread is not None:
            self._thread.join(timeout_s)
        # The thread has ended (join is the memory barrier that lets us close its sockets).
        for sock in (self._xsub, self._xpub, self._control, self._steer):
            if sock is not None:
                sock.close(linger=0)
        self._xsub = self._xpub = self._control = self._steer = None
        self._ctx.term()

    def statistics(self) -> dict[str, int] | None:
        """Frame and byte counts since the start, from libzmq's proxy (None when the
        forwarder does not answer in time). Frames, not messages: a bus message is two."""
        with self._steer_lock:
            steer = self._steer
            if steer is None or self._thread is None or not self._thread.is_alive():
                return None
            steer.send(b"STATISTICS")
            if not steer.poll(STATISTICS_TIMEOUT_MS):
                # Never answered: this socket may get the reply later, out of step. Close
                # it; statistics stay unavailable rather than wrong.
                steer.close(linger=0)
                self._steer = None
                return None
            values = [int.from_bytes(frame, sys.byteorder) for frame in steer.recv_multipart()]
        if len(values) != 8:
            return None
        return {"frames_in": values[0], "bytes_in": values[1], "frames_out": values[6],
                "bytes_out": values[7], "subscription_frames": values[4]}


def _bind(sock: zmq.Socket[Any], bind: str, any_port_if_taken: bool) -> str:
    host, port = parse_host_port(bind)
    if port == 0:
        return f"tcp://{host}:{sock.bind_to_random_port(f'tcp://{host}')}"
    endpoint = f"tcp://{host}:{port}"
    try:
        sock.bind(endpoint)
    except zmq.ZMQError as e:
        if not (any_port_if_taken and e.errno == zmq.EADDRINUSE):
            raise
        logger.warning("bus: %s is in use; binding a free port", endpoint)
        endpoint = f"tcp://{host}:{sock.bind_to_random_port(f'tcp://{host}')}"
    return endpoint


class EventPublisher:
    """The broker's events: an XPUB the broker binds and alone publishes on.

    The broker reads :attr:`socket` in its poll loop and calls :meth:`read_subscriptions`
    when it is readable. :attr:`watching_tasks` says whether any subscription could match
    a ``tasks.`` topic; the broker tests it before building a task event, so that task
    state changes cost one attribute test while nobody listens.

    Args:
        ctx: the broker's context (its ZAP handler serves this socket too).
        bind: HOST:PORT to bind (port 0: any free port).
        hwm: messages queued per subscriber before it loses some.
        security: CURVE and ZAP (``broker/security.py``); None: plaintext.
        any_port_if_taken: bind a free port when ``bind``'s is in use (for a port
            derived from the broker's, not one asked for).

    Raises:
        zmq.ZMQError: the socket could not be bound.
    """

    def __init__(self, ctx: zmq.Context[Any], bind: str, hwm: int,
                 security: SocketSecurity | None = None,
                 any_port_if_taken: bool = False) -> None:
        sock = ctx.socket(zmq.XPUB)
        apply_common_options(sock, hwm)
        sock.setsockopt(zmq.LINGER, 0)
        # Every subscribe and unsubscribe of every subscriber comes up, not only the
        # first and last of a prefix: each new subscriber gets its own probe, and the
        # prefix counts stay balanced (a subscriber that goes away unsubscribes its
        # prefixes one by one).
        sock.setsockopt(zmq.XPUB_VERBOSER, 1)
        try:
            if security is not None:
                security.secure_server(ctx, sock, "events")
            self.endpoint = _bind(sock, bind, any_port_if_taken)
        except zmq.ZMQError:
            sock.close(linger=0)
            raise
        self.socket = sock
        self.prefixes = PrefixSet()
        self.watching_tasks = False
        #: a subscribed prefix covers every task topic (``""``, ``"tasks."``, ...)
        self._all_tasks = False
        #: subscribed prefixes longer than ``tasks.`` that start with it
        self._task_prefixes: tuple[bytes, ...] = ()
        #: per-topic sequence numbers; a task's entry goes when the task ends
        self._seq: dict[str, int] = {}
        self.published = 0
        #: probes sent in answer to subscriptions
        self.probes = 0

    def read_subscriptions(self) -> None:
        """Take every (un)subscription since the last call; answer each subscription
        with a probe on its prefix (the subscriber waits for one to know it is heard)."""
        changed = False
        recv = self.socket.recv
        while True:
            try:
                message = recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            changed |= self.prefixes.apply(message)
            if message[:1] == b"\x01":
                # The XPUB registered the prefix before handing us the message, so the
                # probe reaches the new subscriber. NOBLOCK: a full queue drops it, and
                # the subscriber waits out its timeout rather than the broker waiting.
                send_frames(self.socket, encode_broker_probe(message[1:]), NOBLOCK)
                self.probes += 1
        if changed:
            relevant = self.prefixes.overlapping(_TASKS_PREFIX_BYTES)
            self._all_tasks = any(_TASKS_PREFIX_BYTES.startswith(p) for p in relevant)
            self._task_prefixes = tuple(p for p in relevant if p.startswith(_TASKS_PREFIX_BYTES))
            self.watching_tasks = bool(relevant)
            logger.debug("event subscriptions now %d prefix(es); task events %s",
                         len(self.prefixes), "on" if self.watching_tasks else "off")

    def published_count(self) -> int:
        """Messages published so far (the service loop looks for subscriptions again
        after a publish: a send can take the socket's edge)."""
        return self.published

    def publish(self, topic: str, data: Any, final: bool = False) -> None:
        """Publish ``data`` on ``topic`` with the next sequence number of that topic;
        ``final`` forgets the topic's counter afterwards (a task that ended)."""
        seq = self._seq.get(topic, 0) + 1
        if final:
            self._seq.pop(topic, None)
        else:
            self._seq[topic] = seq
        # An XPUB drops rather than block when the forwarder does not keep up, so the
        # broker never waits on the bus.
        send_frames(self.socket, encode_bus(topic, BUS_BROKER_SENDER, seq, data), NOBLOCK)
        self.published += 1

    def task_changed(self, task_id: str, state: str, attempt: int, agent: str | None,
                     at: float, final: bool) -> None:
        """A task changed state: publish on ``tasks.<id>`` if some subscription matches."""
        topic = BUS_TASKS_PREFIX + task_id
        if not self._all_tasks:
            encoded = topic.encode()
            if not any(encoded.startswith(p) for p in self._task_prefixes):
                if final:
                    self._seq.pop(topic, None)
                return
        self.publish(topic, {"task_id": task_id, "state": state, "attempt": attempt,
                             "agent": agent, "at": round(at, 6)}, final)

    def agent_joined(self, agent_id: str, name: str, capabilities: list[str]) -> None:
        self.publish(BUS_AGENT_JOINED, {"id": agent_id, "name": name,
                                        "capabilities": capabilities})

    def agent_left(self, agent_id: str, name: str, capabilities: list[str], reason: str) -> None:
        self.publish(BUS_AGENT_LEFT, {"id": agent_id, "name": name,
                                      "capabilities": capabilities, "reason": reason})

    def agent_health(self, agent_id: str, name: str, capabilities: list[str], health: str,
                     detail: str | None) -> None:
        self.publish(BUS_AGENT_HEALTH, {"id": agent_id, "name": name,
                                        "capabilities": capabilities, "health": health,
                                        "detail": detail})

    def agent_circuit(self, agent_id: str, name: str, capabilities: list[str],
                      circuit: str) -> None:
        self.publish(BUS_AGENT_CIRCUIT, {"id": agent_id, "name": name,
                                         "capabilities": capabilities, "circuit": circuit})

    def peer_refused(self, peer: str, reason: str) -> None:
        self.publish(BUS_PEER_REFUSED, {"peer": peer, "reason": reason})

    def pool_changed(self, event: str, node: str, fields: dict[str, Any]) -> None:
        self.publish(BUS_POOL, {"event": event, "node": node, **fields})

    def close(self) -> None:
        self.socket.close(linger=0)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m broker.bus",
                                     description="Run the Orchestrator pub/sub forwarder.")
    defaults = BusConfig()
    parser.add_argument("--out", default=defaults.out_bind, metavar="HOST:PORT",
                        help="where subscribers connect (port 0: any free)")
    parser.add_argument("--in", dest="in_bind", default=defaults.in_bind, metavar="HOST:PORT",
                        help="where publishers connect (port 0: any free)")
    parser.add_argument("--hwm", type=int, default=defaults.hwm,
                        help="messages queued per subscriber before it loses some")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="data dir whose keys/ --secure uses (default: $ORCH_HOME, "
                             "else the broker's default data dir)")
    # default None, not False: unset, ORCH_SECURE decides (as the broker's option does).
    parser.add_argument("--secure", action="store_true", default=None,
                        help="CURVE encryption and key authentication on both sockets "
                             "(also ORCH_SECURE=1), with the keys and allow-list of "
                             "DATA_DIR/keys, as the broker's --secure: publishers and "
                             "subscribers need an authorized key (docs/security.md)")
    parser.add_argument("--log-level", default=os.environ.get("ORCH_LOG_LEVEL", "INFO"))
    return parser


def _bound_forwarder(args: argparse.Namespace) -> tuple[BusForwarder, Any, tuple[str, str]]:
    """The forwarder of ``args``, bound: (forwarder, its security or None, endpoints).

    Raises:
        SystemExit: with the exit code, after one line on stderr.
    """
    # Imported here, not at the top: the broker imports this module, and needs no more.
    from broker.security import curve_server_for, secure_requested
    from wire.curve import KeyFileError

    security: Any = None
    if secure_requested(args.secure):
        data_dir = (args.data_dir or home_dir()).absolute()
        try:
            security = curve_server_for(data_dir)
        except KeyFileError as e:
            print(f"error: --secure: {e}", file=sys.stderr)
            raise SystemExit(2) from None
    try:
        forwarder = BusForwarder(BusConfig(args.out, args.in_bind, args.hwm), security)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        return forwarder, security, forwarder.bind()
    except (zmq.ZMQError, TimeoutError) as e:
        # TimeoutError: the ZAP handler thread did not start (secure only).
        print(f"error: cannot bind the bus: {e}", file=sys.stderr)
        raise SystemExit(3) from None


def main(argv: list[str] | None = None) -> int:
    """Run the forwarder alone until SIGTERM or SIGINT."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        forwarder, security, (out_endpoint, in_endpoint) = _bound_forwarder(args)
    except SystemExit as e:
        return int(e.code or 0)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    forwarder.start_thread()
    info: dict[str, Any] = {"event": "ready", "bus_out": out_endpoint, "bus_in": in_endpoint,
                            "pid": os.getpid()}
    if security is not None:
        # As the broker's ready line: the key publishers and subscribers must expect.
        info["curve_public_key"] = security.public_key
    sys.stdout.write(orjson.dumps(info).decode() + "\n")
    sys.stdout.flush()
    # The main thread waits here, not in the proxy: only it runs Python signal handlers.
    stop.wait()
    forwarder.stop_thread()
    return 0


if __name__ == "__main__":
    sys.exit(main())
