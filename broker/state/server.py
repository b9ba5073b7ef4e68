"""The state service: its logic (:class:`StateStore`) on a :class:`RouterService`, one
thread, one SQLite connection.

Each pass of the service loop (see ``broker/service.py``):

1. waits for input, the next lease/wait/key deadline, or the session tick;
2. expires what is due (leases, waits, keys; sessions on the tick) -- before the drain,
   so that no request sees a key or lease past its expiry;
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
import threading
import time
from collections import deque
from typing import Any, Callable

from broker import __version__
from broker.config import StateConfig
from broker.heartbeat import Liveness
from broker.service import Frames, RouterService, SocketSecurity
from broker.state.access import ANONYMOUS, AccessRules, Peer
from broker.state.persistence import StatePersistence
from broker.state.store import StateStore
from wire.errors import StateDecodeError
from wire.state import StateErrorCode, decode_state, encode_state

logger = logging.getLogger(__name__)

#: How often the loop looks for expired sessions, as a share of the heartbeat interval.
TICKS_PER_INTERVAL = 4


class StateServer:
    """The state service. Build it, call :meth:`bind`, then :meth:`run` (blocking) or
    :meth:`start_thread`. It is the :class:`broker.service.RouterApp` of its
    :attr:`service`.

    Args:
        config: where to bind, where the data lives, heartbeat settings.
        clock: monotonic time for every expiry (injected so tests can drive it).
        wall_clock: wall-clock time, only to carry key expiry across restarts.
        security: CURVE and ZAP for its ROUTER (``broker/security.py``); None: plaintext.
            With it, requests are checked against the key prefix rules
            (``broker/state/access.py``, adjusted by ``<data dir>/keys/state_rules.json``).

    Raises:
        ConfigError: the rules file of a secure service cannot be read.
    """

    def __init__(self, config: StateConfig, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time,
                 security: SocketSecurity | None = None) -> None:
        self.config = config
        self.clock = clock
        self.store = StateStore(Liveness(config.heartbeat_interval_s, config.heartbeat_liveness),
                                config.changelog_size)
        self.store.extra_info = self._extra_info
        if security is not None:
            self.store.access = AccessRules.load(config.data_dir)
        self.persistence = (StatePersistence(config.db_path, wall_clock) if config.persist
                            else None)
        self.service = RouterService(self, send_hwm=config.send_hwm,
                                     drain_batch=config.drain_batch,
                                     backlog_limit=config.watcher_backlog, clock=clock,
                                     name="state-service", security=security)
        self.service.max_message_bytes = config.max_message_bytes
        #: the public key clients must expect (``curve_public_key`` in its info), None
        #: when plaintext: a client can tell from the info which service it reached
        self.curve_public_key: str | None = getattr(security, "public_key", None)
        self.started_at = clock()
        #: messages dropped for watchers that stopped reading (their watches cancelled)
        self.overflow_dropped = 0
        self._tick_s = config.heartbeat_interval_s / TICKS_PER_INTERVAL
        self._next_tick = 0.0
        self._outboxes: dict[bytes, list[Frames]] = {}
        self._stopping = False

    @property
    def endpoint(self) -> str:
        """The endpoint bound ("" before :meth:`bind`)."""
        return self.service.endpoint

    # ------------------------------------------------------------------ lifecycle

    def bind(self, any_port_if_taken: bool = False) -> str:
        """Load the stored state and bind the ROUTER; returns the endpoint bound.

        Args:
            any_port_if_taken: when the configured port is in use, bind a free one
                instead of failing (for a port derived from the broker's, not one the
                user asked for).
        """
        if self.persistence is not None:
            self.persistence.open()
            self.persistence.load(self.store, self.clock())
        return self.service.bind(self.config.router_endpoint,
                                 any_port_if_taken=any_port_if_taken)

    def request_stop(self) -> None:
        """Ask the loop to stop after its current pass; safe from signal handlers and
        other threads."""
        self.service.request_stop()

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT stop the service (main thread only)."""
        self.service.install_signal_handlers()

    def start_thread(self) -> threading.Thread:
        """Run the loop in a daemon thread (call :meth:`bind` first)."""
        self._log_start()
        return self.service.start_thread()

    def stop_thread(self, timeout_s: float = 10.0) -> None:
        """Stop the loop started by :meth:`start_thread` and wait for it."""
        self.service.stop_thread(timeout_s)

    def run(self) -> None:
        """Serve until :meth:`request_stop`. A failing disk write ends the loop with its
        exception: replying without the commit would acknowledge writes a restart loses."""
        if not self.service.endpoint:
            self.bind()
        self._log_start()
        self.service.run()

    def _log_start(self) -> None:
        self.started_at = self.clock()
        logger.info("state service %s listening on %s (%s)", __version__, self.endpoint,
                    self.persistence.path if self.persistence else "in memory")

    # ------------------------------------------------------------------ the service's pass

    def timeout_ms(self, now: float) -> int:
        """Until the session tick or the store's next deadline."""
        until = self._next_tick
        deadline = self.store.next_deadline()
        if deadline is not None and deadline < until:
            until = deadline
        return max(0, int((until - now) * 1000) + 1)

    def before_drain(self, now: float) -> None:
        """Expire what is due, so that this pass's requests see none of it."""
        self.store.tick(now)
        if now >= self._next_tick:
            self._next_tick = now + self._tick_s
            self.store.expire_sessions(now)

    def handle(self, identity: bytes, frames: list[bytes], now: float) -> bool:
        """Decode one request and queue the store's reply; never ends the drain early."""
        try:
            if len(frames) > 2 and len(frames[2]) > self.config.max_header_bytes:
                # Refused undecoded (its request id is in the header it would take to
                # decode); a value is at most 1 MiB, so no valid request gets here.
                raise StateDecodeError(
                    f"message header of {len(frames[2])} bytes exceeds the limit of "
                    f"{self.config.max_header_bytes} bytes (max_header_bytes)", "too_large")
            msg = decode_state(frames)
        except StateDecodeError as e:
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug("bad message from %r: %s", identity, e)
            self._queue(identity, encode_state(self.store.error(e.code, str(e), e.req)))
            return False
        try:
            # The key and role are read only on a secure service: two metadata lookups
            # per message that a plaintext one has no use for.
            peer = (ANONYMOUS if self.store.access is None
                    else Peer(self.service.peer_key(), self.service.peer_role()))
            reply = self.store.handle(identity, msg, now, peer)
        except Exception as e:  # noqa: BLE001 - the service never dies on one message
            logger.exception("state handler failed for %s from %r", type(msg).__name__, identity)
            reply = self.store.error(StateErrorCode.BAD_REQUEST, f"could not process: {e}",
                                     getattr(msg, "req", None))
        if reply is not None:
            self._queue(identity, encode_state(reply))
        return False

    def on_stop(self, now: float) -> None:
        """Stop at the end of this pass (its replies still go out)."""
        self._stopping = True

    def after_drain(self, now: float) -> bool:
        """Collect what the pass caused, commit it, then send; False once stopping."""
        for identity, msg in self.store.take_outgoing():
            self._queue(identity, encode_state(msg))
        if self.persistence is not None:
            self.persistence.commit(self.store, now)
        if self._outboxes:
            outboxes, self._outboxes = self._outboxes, {}
            send = self.service.send
            for identity, messages in outboxes.items():
                send(identity, messages)
        return not self._stopping

    def peer_unreachable(self, identity: bytes) -> None:
        """Nothing to do: the gone client's session expires on its own, releasing what
        it held."""

    def backlog_overflow(self, identity: bytes, backlog: deque[Frames]) -> None:
        """A peer that stopped reading: rather than grow without bound or silently lose
        changes, cancel its watches and tell it so; it sets them up again with `since`."""
        self.overflow_dropped += len(backlog)
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

    def on_close(self) -> None:
        """The last commit, then the database closes."""
        if self.persistence is not None:
            try:
                self.persistence.commit(self.store, self.clock())
            finally:
                self.persistence.close()

    def _queue(self, identity: bytes, frames: Frames) -> None:
        box = self._outboxes.get(identity)
        if box is None:
            self._outboxes[identity] = [frames]
        else:
            box.append(frames)

    # ------------------------------------------------------------------ info

    def _extra_info(self) -> dict[str, Any]:
        persistence = self.persistence
        counters = self.service.counters
        return {
            "endpoint": self.endpoint, "uptime_s": round(self.clock() - self.started_at, 3),
            "persist": persistence is not None,
            "secure": self.store.access is not None,
            "curve_public_key": self.curve_public_key,
            "db": str(persistence.path) if persistence else None,
            "commits": persistence.commits if persistence else 0,
            "rows_written": persistence.rows_written if persistence else 0,
            "messages": {"in": counters.messages_in, "out": counters.messages_out,
                         "dropped": counters.dropped + self.overflow_dropped},
        }


__all__ = ["StateServer"]
