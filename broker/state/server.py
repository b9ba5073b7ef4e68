"""The state service's socket loop: one ROUTER socket, one thread, one SQLite connection.

Each pass of :meth:`StateServer.run`:

1. waits for input, the next lease/wait/key deadline, or the session tick;
2. expires what is due (leases, waits, keys; sessions on the tick);
3. drains up to ``drain_batch`` messages, each decoded and handed to the store, whose
   replies go to per-peer outboxes;
4. collects what the pass caused for others (granted locks, watch events);
5. commits everything the pass changed in **one** SQLite transaction (group commit);
6. only then sends: a write is acknowledged once it is on disk.

The same class runs alone (``orchestrator state serve``, ``python -m broker.state``) or
in a thread of the broker process (``python -m broker`` starts it unless ``--no-state``).
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time
from collections import deque
from typing import Any, Callable

import zmq

from broker import __version__
from broker.config import StateConfig
from wire.errors import StateDecodeError
from broker.heartbeat import Liveness
from wire.state import decode_state, encode_state, StateErrorCode
from wire.sockets import apply_common_options, NOBLOCK, send_frames
from broker.state.persistence import StatePersistence
from broker.state.store import StateStore

logger = logging.getLogger(__name__)

#: How often the loop looks for expired sessions, as a share of the heartbeat interval.
TICKS_PER_INTERVAL = 4
#: How long a stopping service waits for its last replies to leave (ms).
CLOSE_LINGER_MS = 1000


class StateServer:
    """The state service. Build it, call :meth:`bind`, then :meth:`run` (blocking) or
    :meth:`start_thread`.

    Args:
        config: where to bind, where the data lives, heartbeat settings.
        clock: monotonic time for every expiry (injected so tests can drive it).
        wall_clock: wall-clock time, only to carry key expiry across restarts.
    """

    def __init__(self, config: StateConfig, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock = clock
        self.store = StateStore(Liveness(config.heartbeat_interval_s, config.heartbeat_liveness),
                                config.changelog_size)
        self.store.extra_info = self._extra_info
        self.persistence = (StatePersistence(config.db_path, wall_clock) if config.persist
                            else None)
        self.endpoint = ""
        self.started_at = clock()
        self.messages_in = 0
        self.messages_out = 0
        self.dropped = 0
        self._tick_s = config.heartbeat_interval_s / TICKS_PER_INTERVAL
        self._next_tick = 0.0
        self._outboxes: dict[bytes, list[list[Any]]] = {}
        self._backlog: dict[bytes, deque[list[Any]]] = {}
        self._ctx: zmq.Context[Any] | None = None
        self._router: zmq.Socket[Any] | None = None
        self._thread: threading.Thread | None = None
        self._stop_requested = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)

    # ------------------------------------------------------------------ lifecycle

    def bind(self, any_port_if_taken: bool = False) -> str:
        """Load the stored state and bind the ROUTER; returns the endpoint bound.

        Args:
            any_port_if_taken: when the configured port is in use, bind a free one
                instead of failing (for a port derived from the broker's, not one the
                user asked for).
        """
        now = self.clock()
        if self.persistence is not None:
            self.persistence.open()
            self.persistence.load(self.store, now)
        self._ctx = zmq.Context()
        router = self._ctx.socket(zmq.ROUTER)
        # Without MANDATORY a send to a gone or full peer is silently dropped.
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # A client reconnecting under its routing id takes its session back.
        router.setsockopt(zmq.ROUTER_HANDOVER, 1)
        apply_common_options(router, self.config.send_hwm)
        router.setsockopt(zmq.LINGER, CLOSE_LINGER_MS)
        endpoint = self.config.router_endpoint
        host = endpoint.rsplit(":", 1)[0]
        if endpoint.endswith(":0"):
            endpoint = f"{host}:{router.bind_to_random_port(host)}"
        else:
            try:
                router.bind(endpoint)
            except zmq.ZMQError as e:
                if not (any_port_if_taken and e.errno == zmq.EADDRINUSE):
                    router.close(linger=0)
                    raise
                logger.warning("state service: %s is in use; binding a free port", endpoint)
                endpoint = f"{host}:{router.bind_to_random_port(host)}"
        self._router = router
        self.endpoint = endpoint
        return endpoint

    def request_stop(self) -> None:
        """Ask the loop to stop after its current pass; safe from signal handlers and
        other threads."""
        self._stop_requested = True
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass  # the wake-up pipe is full: the loop is being woken already

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT stop the service (main thread only)."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.request_stop())

    def start_thread(self) -> threading.Thread:
        """Run the loop in a daemon thread (call :meth:`bind` first)."""
        self._thread = threading.Thread(target=self._run_logged, name="state-service",
                                        daemon=True)
        self._thread.start()
        return self._thread

    def stop_thread(self, timeout_s: float = 10.0) -> None:
        """Stop the loop started by :meth:`start_thread` and wait for it."""
        self.request_stop()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _run_logged(self) -> None:
        try:
            self.run()
        except Exception:  # noqa: BLE001 - a thread's death must at least be logged
            logger.critical("the state service stopped on an error", exc_info=True)

    def run(self) -> None:
        """Serve until :meth:`request_stop`. A failing disk write ends the loop with its
        exception: replying without the commit would acknowledge writes a restart loses."""
        if self._router is None:
            self.bind()
        router = self._router
        assert router is not None
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        store = self.store
        self.started_at = self.clock()
        logger.info("state service %s listening on %s (%s)", __version__, self.endpoint,
                    self.persistence.path if self.persistence else "in memory")
        try:
            while not self._stop_requested:
                events = dict(poller.poll(self._poll_timeout_ms()))
                now = self.clock()
                store.tick(now)
                if now >= self._next_tick:
                    self._next_tick = now + self._tick_s
                    store.expire_sessions(now)
                if router in events:
                    self._drain(router, now)
                if self._wake_r.fileno() in events:
                    self._clear_wakeups()
                for identity, msg in store.take_outgoing():
                    self._queue(identity, encode_state(msg))
                if self.persistence is not None:
                    self.persistence.commit(store, now)
                self._flush(now)
        finally:
            self._close()

    def _close(self) -> None:
        if self.persistence is not None:
            try:
                self.persistence.commit(self.store, self.clock())
            finally:
                self.persistence.close()
        if self._router is not None:
            self._router.close(linger=CLOSE_LINGER_MS)
            self._router = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None
        self._wake_r.close()
        self._wake_w.close()
        logger.info("state service stopped")

    def _clear_wakeups(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _poll_timeout_ms(self) -> int:
        until = self._next_tick
        deadline = self.store.next_deadline()
        if deadline is not None and deadline < until:
            until = deadline
        return max(0, int((until - self.clock()) * 1000) + 1)

    # ------------------------------------------------------------------ input

    def _drain(self, router: zmq.Socket[Any], now: float) -> None:
        recv = router.recv_multipart
        handle = self._handle_frames
        received = 0
        try:
            while received < self.config.drain_batch:
                frames = recv(zmq.NOBLOCK)
                received += 1
                handle(frames, now)
        except zmq.Again:
            pass
        self.messages_in += received

    def _handle_frames(self, frames: list[bytes], now: float) -> None:
        identity = frames[0]
        try:
            msg = decode_state(frames[1:])
        except StateDecodeError as e:
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug("bad message from %r: %s", identity, e)
            self._queue(identity, encode_state(self.store.error(e.code, str(e), e.req)))
            return
        try:
            reply = self.store.handle(identity, msg, now)
        except Exception as e:  # noqa: BLE001 - the service never dies on one message
            logger.exception("state handler failed for %s from %r", type(msg).__name__, identity)
            reply = self.store.error(StateErrorCode.BAD_REQUEST, f"could not process: {e}",
                                     getattr(msg, "req", None))
        if reply is not None:
            self._queue(identity, encode_state(reply))

    # ------------------------------------------------------------------ output

    def _queue(self, identity: bytes, frames: list[Any]) -> None:
        box = self._outboxes.get(identity)
        if box is None:
            self._outboxes[identity] = [frames]
        else:
            box.append(frames)

    def _flush(self, now: float) -> None:
        if not self._outboxes:
            return
        outboxes, self._outboxes = self._outboxes, {}
        router = self._router
        assert router is not None  # bound before the loop runs
        for identity, messages in outboxes.items():
            backlog = self._backlog.get(identity)
            if backlog:
                backlog.extend(messages)
                messages = list(backlog)
                backlog.clear()
            for index, frames in enumerate(messages):
                try:
                    send_frames(router, [identity, *frames], NOBLOCK)
                except zmq.Again:
                    self._keep_for_later(identity, messages[index:])
                    break
                except zmq.ZMQError as e:
                    if e.errno != zmq.EHOSTUNREACH:
                        raise
                    # Gone: its session expires on its own, releasing what it held.
                    self.dropped += len(messages) - index
                    self._backlog.pop(identity, None)
                    break
                self.messages_out += 1
            else:
                if backlog is not None:
                    del self._backlog[identity]

    def _keep_for_later(self, identity: bytes, messages: list[list[Any]]) -> None:
        backlog = self._backlog.setdefault(identity, deque())
        backlog.extend(messages)
        if len(backlog) <= self.config.watcher_backlog:
            return
        # A peer that stopped reading: rather than grow without bound or silently lose
        # changes, cancel its watches and tell it so; it sets them up again with `since`.
        self.dropped += len(backlog)
        backlog.clear()
        session = self.store.sessions.get(identity)
        if session is None:
            return
        for watch in list(session.watches):
            self.store.sessions.remove_watch(session, watch)
            backlog.append(encode_state(self.store.error(
                StateErrorCode.WATCH_OVERFLOW,
                f"watch {watch} fell more than {self.config.watcher_backlog} messages "
                "behind and was cancelled; watch again with `since`", watch)))
        logger.warning("state client %s stopped reading; its watches were cancelled",
                       session.label)

    # ------------------------------------------------------------------ info

    def _extra_info(self) -> dict[str, Any]:
        persistence = self.persistence
        return {
            "endpoint": self.endpoint, "uptime_s": round(self.clock() - self.started_at, 3),
            "persist": persistence is not None,
            "db": str(persistence.path) if persistence else None,
            "commits": persistence.commits if persistence else 0,
            "rows_written": persistence.rows_written if persistence else 0,
            "messages": {"in": self.messages_in, "out": self.messages_out,
                         "dropped": self.dropped},
        }


__all__ = ["StateServer"]
