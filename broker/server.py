"""The broker process: the task engine behind one ROUTER service loop.

The loop is :class:`broker.service.RouterService` (shared with the state service); the
broker is its application. Each pass:

1. waits in poll(2) for input or the engine's next timer (heartbeat tick, task
   deadline, retry, a deferred ACCEPTED);
2. drains a batch of messages without blocking, decoding each and handing it to
   :meth:`Engine.handle <broker.engine.engine.Engine.handle>`;
3. runs the engine's timers and dispatch;
4. sends the assignments, commits the journal (group commit), then sends everything
   else this pass owes (results, ACCEPTED, errors), one batched message per command.

Batching in steps 2 and 4 is where the throughput comes from: a burst of 500 submits
costs one recv, one header decode and one send per agent, not 500 of each. Every
decision is the engine's (``broker/engine/``); this module only moves bytes.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
import uuid
from collections import deque
from typing import Any, Callable

from broker import __version__, compiled
from broker.bus import EventPublisher
from broker.config import BrokerConfig
from broker.engine.access import GrantSource
from broker.engine.engine import Engine, Sends
from broker.journal import Durability, open_journal
from broker.results import ResultStore
from broker.service import Delivery, Frames, RouterService, SocketSecurity
from wire.documents import StatusDocument
from wire.errors import DecodeError, HeaderTooLarge
from wire.limits import MAX_BATCH_ITEMS, PROTOCOL_VERSION
from wire.tasks import Message, decode

logger = logging.getLogger(__name__)

#: Most messages queued for one peer whose socket pipe is full, before the oldest go.
BACKLOG_LIMIT = 10_000
#: A drain stops after this many task items (submits, results, direct messages), so that
#: dispatch and flush run and agents start working while the rest of a burst waits.
DRAIN_ITEM_BUDGET = MAX_BATCH_ITEMS * 2
_SENT = Delivery.SENT
_UNREACHABLE = Delivery.UNREACHABLE


def decode_within(frames: list[Any], max_header_bytes: int) -> Message:
    """``wire.tasks.decode``, but a header (frame 2, after the signature and the command)
    over ``max_header_bytes`` is refused undecoded: one len() per message, not per task.

    Raises:
        DecodeError: ``too_large`` (:class:`HeaderTooLarge`), or what decode raises.
    """
    if len(frames) > 2 and len(frames[2]) > max_header_bytes:
        raise HeaderTooLarge(len(frames[2]), max_header_bytes)
    return decode(frames)


class Broker:
    """The broker. Build it, call :meth:`bind`, then :meth:`run` (blocking).

    Args:
        config: the broker's tunables.
        clock: a monotonic clock (injected so that tests can move time).
        security: CURVE and ZAP for its sockets (``broker/security.py``); None: plaintext.
    """

    def __init__(self, config: BrokerConfig, clock: Callable[[], float] = time.monotonic,
                 security: SocketSecurity | None = None,
                 grants: GrantSource | None = None) -> None:
        self.config = config
        self.security = security
        self.clock = clock
        self.journal = open_journal(config.data_dir, config.durability)
        now = clock()
        self.engine = Engine(config, self.journal, self, now, time.time() - now,
                             uuid.uuid4().hex[:12])
        self.engine.status.extras = self._status_extras
        self.service = RouterService(self, send_hwm=config.send_hwm,
                                     drain_batch=config.drain_batch,
                                     backlog_limit=BACKLOG_LIMIT, clock=clock, name="broker",
                                     security=security)
        self.service.max_message_bytes = config.max_message_bytes
        self.max_header_bytes = config.max_header_bytes
        self.engine.agents.peer_address = self.service.peer_address
        #: each key's grant on a secure broker (None: plaintext, no checks)
        self.grants = grants
        self._next_grant_refresh = 0.0
        if grants is not None:
            self.service.handler = self._handle_granted
            self.engine.lifecycle.bind_holders_to_keys()
        # PURGE (broker/engine/purge.py): the sender's role, and the journal's rewrite.
        self.engine.purge.attach(self.service.peer_role, self._compact_journal,
                                 lambda: self.journal.size)
        #: large payloads on disk (broker/results.py); None without a journal
        self.store: ResultStore | None = None
        if self.journal.durability is not Durability.NONE:
            self.store = ResultStore(config.data_dir, self.service.wake,
                                     fsync=self.journal.durability is Durability.FSYNC)
            self.journal.attach_store(self.store, config.result_store_threshold)
            finished = self.engine.ledger.finished
            finished.large_bytes = float(config.result_store_threshold)
            finished.max_stored_bytes = config.result_store_max_bytes
            finished.load = self.store.load
            finished.delete = self.store.delete
        #: the broker's own events on the bus (:meth:`attach_bus`); None without a bus
        self.events: EventPublisher | None = None
        #: the forwarder's frame counters, when it runs in this process
        self.bus_statistics: Callable[[], dict[str, int] | None] | None = None
        #: build task events with no subscriber too (DEBUG task lines in the JSON log)
        self.log_tasks = False
        #: the clock reading of the loop's last pass (``/healthz`` reads it from its thread)
        self.last_turn = 0.0
        #: called on every pass with ``now``; None unless a test hook is installed
        #: (``broker/metrics.py``: ``ORCH_TEST_HOOKS=1``)
        self.loop_hook: Callable[[float], None] | None = None

    @property
    def endpoint(self) -> str:
        """The ROUTER's endpoint (the real port when bound to port 0); "" before bind."""
        return self.service.endpoint

    @property
    def endpoints(self) -> dict[str, str]:
        """Other components' endpoints handed to agents at registration (bus, state)."""
        return self.engine.ledger.endpoints

    # ------------------------------------------------------------------ lifecycle

    def bind(self) -> str:
        """Replay the journal, create and bind the ROUTER socket; returns the endpoint."""
        self.engine.restore(self.journal.open(), self.clock())
        if self.store is not None:
            swept = self.store.sweep(self.engine.ledger.finished.stored_keys())
            if swept:
                logger.info("result store: %d file(s) no result names removed", swept)
        return self.service.bind(self.config.router_endpoint)

    def attach_bus(self, bus_out: str, bus_in: str, hwm: int,
                   statistics: Callable[[], dict[str, int] | None] | None = None,
                   events_bind: str = "127.0.0.1:0", any_port_if_taken: bool = False) -> None:
        """Announce the bus (forwarder endpoints) to agents and clients, and bind the
        broker's own events socket beside it. Call after :meth:`bind`.

        Args:
            bus_out: where subscribers connect (the forwarder's XPUB).
            bus_in: where publishers connect (the forwarder's XSUB).
            hwm: queue bound of the broker's events socket, per subscriber.
            statistics: returns the forwarder's counters, for the status document.
            events_bind: HOST:PORT of the events socket (broker topics, published by the
                broker alone, so that nobody else's message passes for the broker's).
            any_port_if_taken: bind a free port when ``events_bind``'s is in use.

        Raises:
            zmq.ZMQError: the events socket could not be bound.
        """
        events = self.events = EventPublisher(self.service.context, events_bind, hwm,
                                              self.security, any_port_if_taken)
        self.endpoints["bus_out"] = bus_out
        self.endpoints["bus_in"] = bus_in
        self.endpoints["events"] = events.endpoint
        self.engine.ledger.events = events
        self.bus_statistics = statistics
        # Subscriptions arrive on the events socket; the loop reads them when it says
        # so, and looks again after the broker published (a send can take the edge).
        self.service.add_socket(events.socket, self._read_bus, sends=events.published_count)

    def request_stop(self) -> None:
        """Ask for a graceful stop; safe from signal handlers and other threads."""
        self.service.request_stop()

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT ask for a graceful stop (main thread only)."""
        self.service.install_signal_handlers()

    def run(self) -> None:
        """Serve until a graceful stop completes."""
        if not self.service.endpoint:
            self.bind()
        logger.info("broker %s listening on %s (policy %s, durability %s)", __version__,
                    self.endpoint, self.engine.ledger.policy.name,
                    self.journal.durability.value)
        self.service.run()

    def _read_bus(self) -> None:
        assert self.events is not None
        self.events.read_subscriptions()
        self.engine.ledger.watch_tasks = self.events.watching_tasks or self.log_tasks

    def _compact_journal(self) -> bool:
        offset = self.engine.ledger.wall_offset
        retained = [t for t in self.engine.retained() if t.result is not None]
        holder_keys = self.engine.lifecycle.holder_keys
        done = self.journal.compact(
            ((t.spec, t.client, t.submitted_at + offset)
             for t in itertools.chain(self.engine.tasks.values(), retained)),
            ((t.result, t.finished_at + offset) for t in retained),
            holder_keys.of_open(self.engine.tasks.values()) if holder_keys else ())
        self.engine.ledger.counters["journal_compactions"] += 1
        return done

    # ------------------------------------------------------------------ RouterApp

    def timeout_ms(self, now: float) -> int:
        return max(0, int((self.engine.next_wakeup(now) - now) * 1000) + 1)

    def before_drain(self, now: float) -> None:
        self.engine.ledger.items_this_pass = 0
        self.last_turn = now
        if self.loop_hook is not None:
            self.loop_hook(now)

    def handle(self, identity: bytes, frames: list[bytes], now: float) -> bool:
        engine = self.engine
        try:
            msg = decode_within(frames, self.max_header_bytes)
        except DecodeError as e:
            engine.reject(identity, e.code, str(e))
        else:
            engine.handle(identity, msg, self.clock())
        return engine.ledger.items_this_pass >= DRAIN_ITEM_BUDGET

    def _handle_granted(self, identity: bytes, frames: list[bytes], now: float) -> bool:
        """:meth:`handle` on a secure broker: the sender's key (authenticated by CURVE)
        must be authorized still, and its routing id must lie in the key's scope, so no
        other key can pose as a peer; its role decides the rest
        (``broker/engine/access.py``)."""
        engine = self.engine
        assert self.grants is not None
        try:
            msg = decode_within(frames, self.max_header_bytes)
        except DecodeError as e:
            engine.reject(identity, e.code, str(e))
            return False
        key = self.service.peer_key()
        grant = self.grants.grant(key) if key else None
        if grant is None:
            engine.refuse(identity, msg, "this key is no longer authorized (revoked): the "
                          "broker takes no messages from it", now)
        elif not identity.startswith(grant.scope.encode()):
            engine.refuse(identity, msg, (
                f"on a secure broker a routing id must start with its key's scope "
                f"{grant.scope!r} (the SDK sets it)"), now)
        else:
            engine.handle_granted(identity, grant, msg, self.clock())
        return engine.ledger.items_this_pass >= DRAIN_ITEM_BUDGET

    def _refresh_grants(self, now: float) -> None:
        """Once per heartbeat interval: keys revoked since lose their agents' registrations
        (their tasks go elsewhere) and are refused from then on."""
        assert self.grants is not None
        self._next_grant_refresh = now + self.config.heartbeat_interval_s
        events = self.engine.ledger.events
        announce = self.engine.permissions.worth_announcing
        for key, address in self.grants.take_refusals():
            if announce(key.encode(), now):
                events.peer_refused(f"{key} at {address}", "its key is not authorized")
        revoked = self.grants.refresh()
        if revoked:
            logger.warning("%d key(s) revoked: their agents are removed and their "
                           "messages refused", len(revoked))
            self.engine.revoked(revoked, now)

    def on_stop(self, now: float) -> None:
        self.engine.begin_stop(now)

    def after_drain(self, now: float) -> bool:
        """Timers, dispatch and the flush; False once a graceful stop has completed."""
        engine = self.engine
        if self.store is not None and self.store.pending:
            self._release_stored()
        try:
            if self.grants is not None and now >= self._next_grant_refresh:
                self._refresh_grants(now)
            engine.tick(now)
            engine.dispatch(now)
            if self.journal.needs_compaction():
                self._compact_journal()
        except Exception:  # noqa: BLE001 - a bug in the broker, not bad input
            # Logged and counted, and the loop goes on rather than dropping every open
            # task with the process.
            engine.ledger.errors["internal_error"] += 1
            logger.exception("broker timers or dispatch failed; carrying on")
        self._flush(now)
        if engine.ledger.stopping_since is not None and engine.stop_complete(now):
            self._flush(now)
            return False
        return True

    def peer_unreachable(self, identity: bytes) -> None:
        self.engine.peer_unreachable(identity, self.clock())

    def backlog_overflow(self, identity: bytes, backlog: deque[Frames]) -> None:
        counters = self.engine.ledger.counters
        while len(backlog) > BACKLOG_LIMIT:
            backlog.popleft()
            # Results stay retrievable with FETCH; lost assignments come back when their
            # lease expires.
            counters["send_dropped"] += 1

    def _release_stored(self) -> None:
        """Hand the results whose payload the store wrote (or failed to) to the engine."""
        assert self.store is not None
        result_written = self.engine.lifecycle.result_written
        for result, wall, ref in self.store.completed():
            result_written(result, wall, ref)

    def on_close(self) -> None:
        if self.store is not None:
            self.store.close()
            self._release_stored()
        self.journal.close()
        if self.events is not None:
            self.events.close()

    # ------------------------------------------------------------------ sending

    def _flush(self, now: float) -> None:
        engine = self.engine
        # Work first: every send costs a syscall and maybe a wake-up, so what is on a
        # task's critical path (assignments, then results) leaves before bookkeeping.
        self._send_each(engine.work_messages(), now)
        # Group commit: what this pass accepted and finished is written before anyone
        # hears of it.
        self.journal.commit()
        self._send_each(engine.other_messages(now), now)

    def _send_each(self, sends: Sends, now: float) -> None:
        send = self.service.send
        for identity, messages in sends:
            if send(identity, messages) is _SENT and messages:
                self.engine.sent_to(identity, now)

    def forward(self, receiver: bytes, messages: list[list[Any]], backlog_limit: int
                ) -> str | None:
        """Send direct messages now, or queue them behind what already waits for the
        receiver (so that one sender's messages stay in order); the engine's
        :class:`~broker.engine.direct.Forwarder`."""
        waiting = self.service.backlog_size(receiver)
        if waiting and waiting + len(messages) > backlog_limit:
            return "mailbox_full"
        if self.service.send(receiver, messages) is _UNREACHABLE:
            return "no_agent"
        return None

    # ------------------------------------------------------------------ status

    def status(self) -> StatusDocument:
        """A snapshot of the broker for STATUS (the document ``orchestrator status`` prints)."""
        return self.engine.status.document(self.clock())

    def _status_extras(self) -> dict[str, Any]:
        """What only the process knows, for the status document."""
        service = self.service
        backlogged = len(service.backlogged_peers())
        messaging: dict[str, Any] = {"direct": self.engine.direct.status(backlogged)}
        if self.events is not None:
            messaging["bus"] = {
                "out": self.endpoints.get("bus_out"), "in": self.endpoints.get("bus_in"),
                "events": self.endpoints.get("events"),
                "events_published": self.events.published,
                "subscribed_prefixes": len(self.events.prefixes),
                "forwarder": self.bus_statistics() if self.bus_statistics is not None else None,
            }
        return {
            "broker": {
                "version": __version__, "protocol": PROTOCOL_VERSION, "pid": os.getpid(),
                "compiled": compiled, "endpoint": self.endpoint,
                "endpoints": dict(self.endpoints), "boot": self.engine.ledger.boot_id,
                "durability": self.journal.durability.value, "journal_bytes": self.journal.size,
                "secure": self.security is not None,
            },
            "messages": {"in": service.counters.messages_in,
                         "out": service.counters.messages_out},
            "messaging": messaging,
        }
