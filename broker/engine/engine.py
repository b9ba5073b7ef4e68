"""The task engine: every decision of the broker, with no socket, file or clock.

The broker's loop (``broker/server.py``) decodes each message and calls
:meth:`Engine.handle` with the time; once per pass it calls :meth:`Engine.tick` (timers),
:meth:`Engine.dispatch`, then :meth:`Engine.work_messages` (assignments: they may leave
before the journal is committed) and, after the commit, :meth:`Engine.other_messages`
(results, ACCEPTED, acknowledgements, errors). Tests drive the same calls with a fake
clock and read what would be sent.
"""

from __future__ import annotations

import logging
from typing import Any

from broker.config import BrokerConfig
from broker.engine.access import ADMIN, Grant, Permissions
from broker.engine.agents import AgentDesk
from broker.engine.clients import ClientDesk
from broker.engine.direct import DirectDesk, DirectRouting, Forwarder
from broker.engine.dispatch import Dispatcher
from broker.engine.health import HealthChecks
from broker.engine.ledger import BrokerPhase, JournalSink, Ledger, Outbox
from broker.engine.lifecycle import Lifecycle
from broker.engine.model import TaskRecord, TaskState
from broker.engine.nodes import NodeDesk
from broker.engine.purge import PurgeDesk
from broker.engine.restore import restore
from broker.engine.status import StatusDesk
from broker.journal import Replay
from wire.codec import chunks
from wire.curve import scope_in
from wire.documents import DisconnectReason
from wire.limits import MAX_BATCH_ITEMS
from wire.nodes import NodeReport, Scale
from wire.purge import Purge
from wire.tasks import (
    Accepted, Ack, Cancel, Direct, Disconnect, ErrorCode, Fetch, Heartbeat, Message, Pong,
    Progress, Read, Release,
    Ready, Results, StatusRequest, Submit, TaskQuery, TaskStatus, encode, encode_dispatch,
    encode_results,
)

logger = logging.getLogger(__name__)

#: How often the engine looks for dead agents and due heartbeats, as a share of the
#: heartbeat interval.
TICKS_PER_INTERVAL = 4

_PENDING = TaskState.PENDING

#: What to send: (peer identity, encoded messages in order).
Sends = list[tuple[bytes, list[list[Any]]]]


class Engine:
    """The broker's logic. Build it, :meth:`restore` the journal, then feed it messages
    and the time.

    Args:
        config: the broker's tunables.
        journal: where accepted and finished tasks are recorded.
        forwarder: sends direct messages at once (their verdict depends on it).
        now: the clock reading the engine starts at.
        wall_offset: add to a clock reading to get wall-clock time.
        boot_id: this start's id.
    """

    def __init__(self, config: BrokerConfig, journal: JournalSink, forwarder: Forwarder,
                 now: float, wall_offset: float, boot_id: str) -> None:
        self.ledger = ledger = Ledger(config, journal, now, wall_offset, boot_id)
        self.lifecycle = Lifecycle(ledger)
        self.direct_routing = DirectRouting(ledger.agents)
        self.direct = DirectDesk(ledger, self.direct_routing, forwarder)
        self.agents = AgentDesk(ledger, self.lifecycle, self.direct_routing)
        self.clients = ClientDesk(ledger, self.lifecycle)
        self.status = StatusDesk(ledger, self.lifecycle.metrics)
        self.dispatcher = Dispatcher(ledger, self.lifecycle)
        self.health = HealthChecks(ledger)
        self.purge = PurgeDesk(ledger)
        self.nodes = NodeDesk(ledger, config.drain_timeout_s)
        self.status.pools = self.nodes.document
        self.permissions = Permissions(self.direct_routing)
        self._tick_s = config.heartbeat_interval_s / TICKS_PER_INTERVAL
        self._next_tick = 0.0

    def restore(self, replay: Replay, now: float) -> None:
        """Rebuild open tasks and retained results from the journal."""
        restore(self.ledger, self.lifecycle, replay, now)

    # ------------------------------------------------------------ input

    def handle(self, identity: bytes, msg: Message, now: float) -> None:
        """One decoded message from ``identity``. Never raises: a message the engine
        cannot process is answered with ERROR and logged."""
        agent = self.ledger.agents.get(identity)
        if agent is not None:
            agent.last_seen = now  # any frame is a sign of life
        try:
            match msg:
                case Submit():
                    self.clients.submit(identity, msg, now)
                case Results():
                    self.agents.results(identity, agent, msg, now)
                case Direct():
                    self.direct.handle(identity, msg)
                case Progress():
                    self.agents.progress(identity, agent, msg, now)
                case Heartbeat():
                    if msg.role == "client":
                        self.clients.client_seen(identity, now)
                    self.agents.heartbeat(identity, agent, msg)
                case Ready():
                    self.agents.ready(identity, msg, now)
                    self.status.agents_changed(now)
                case Fetch():
                    self.clients.fetch(identity, msg)
                case Read():
                    self.clients.read(identity, msg)
                case Release():
                    self.clients.release(msg)
                case StatusRequest():
                    self.status.request(identity, msg, now)
                case TaskQuery():
                    self.status.query(identity, msg)
                case Cancel():
                    self.clients.cancel(msg, now)
                case Disconnect():
                    self.agents.disconnect(agent, msg, now)
                case Pong():
                    self.health.pong(agent, msg)
                case Purge():
                    self.purge.handle(identity, msg, now)
                case NodeReport():
                    self.nodes.report(identity, msg, now)
                case Scale():
                    self.nodes.scale(identity, msg, now)
                case _:
                    self.reject(identity, ErrorCode.UNKNOWN_COMMAND,
                                f"{type(msg).__name__} is not a command the broker accepts")
        except Exception as e:  # noqa: BLE001 - the broker never dies on one message
            logger.exception("handler failed for %s from %r", type(msg).__name__, identity)
            self.reject(identity, ErrorCode.BAD_FRAME, f"could not process message: {e}")

    def handle_granted(self, identity: bytes, grant: Grant, msg: Message, now: float) -> None:
        """:meth:`handle` on a secure broker: ``msg`` from a peer whose key has
        ``grant``, handled as its role permits (``broker/engine/access.py``)."""
        admitted = self.permissions.admit(grant, msg)
        if type(admitted) is str:
            self.refuse(identity, msg, admitted, now)
        elif type(admitted) is TaskQuery and admitted.task_ids is None and \
                grant.role != ADMIN:
            self.status.query(identity, admitted, grant.scope)
        else:
            self.handle(identity, admitted, now)  # type: ignore[arg-type]

    def refuse(self, identity: bytes, msg: Message | None, reason: str, now: float) -> None:
        """Answer ``msg`` with ERROR ``unauthorized``, naming its request or its tasks so
        that whoever waits on them hears it; say so on the bus (``agents.refused``)."""
        if self.permissions.worth_announcing(identity, now):
            self.ledger.events.peer_refused(identity.decode("utf-8", "backslashreplace"),
                                            reason)
        req: int | None = getattr(msg, "req", None)
        task_ids = [spec.id for spec in msg.tasks] if type(msg) is Submit else None
        self.ledger.reject(identity, ErrorCode.UNAUTHORIZED, reason, req=req,
                           task_ids=task_ids)

    def revoked(self, scopes: set[str], now: float) -> None:
        """Keys with these scopes lost their authorisation: their agents' registrations
        go (their tasks are dispatched again elsewhere), and they hear why."""
        for agent in list(self.ledger.agents):
            if scope_in(agent.identity.decode("utf-8", "replace")) in scopes:
                self.agents.remove(agent, "its key was revoked", now)
                self.reject(agent.identity, ErrorCode.UNAUTHORIZED,
                            "this key was revoked: the broker takes no more messages from it")

    def reject(self, identity: bytes, code: str | ErrorCode, message: str) -> None:
        """Answer ``identity`` with ERROR (frames that did not decode, say)."""
        self.ledger.reject(identity, code, message)

    def peer_unreachable(self, identity: bytes, now: float) -> None:
        """A send to ``identity`` found no connection: an agent there is gone."""
        self.ledger.counters["unreachable"] += 1
        agent = self.ledger.agents.get(identity)
        if agent is not None:
            self.agents.remove(agent, "unreachable", now)

    def sent_to(self, identity: bytes, now: float) -> None:
        """Something reached ``identity``: an agent there needs no heartbeat for a while."""
        agent = self.ledger.agents.get(identity)
        if agent is not None:
            agent.last_sent = now

    # ------------------------------------------------------------ timers

    def tick(self, now: float) -> None:
        """Run what is due at ``now``: liveness and heartbeats, deadlines, retries."""
        if now >= self._next_tick:
            self._next_tick = now + self._tick_s
            self.agents.tick(now)
            self.health.tick(now)
            self.status.tick(now)
            self.nodes.tick(now)
            self.ledger.finished.expire(now)
        self._expire_deadlines(now)
        if self.ledger.retrying:
            self.lifecycle.release_retries(now)

    def next_wakeup(self, now: float) -> float:
        """The clock reading by which :meth:`tick` must run again."""
        until = self._next_tick
        deadline = self.ledger.deadlines.next_deadline()
        if deadline is not None and deadline < until:
            until = deadline
        accepted_at = self.clients.next_accepted_due()
        if accepted_at is not None and accepted_at < until:
            until = accepted_at
        if self.ledger.retrying:
            until = min(until, min(t.retry_at for t in self.ledger.retrying))
        return until

    def _expire_deadlines(self, now: float) -> None:
        lifecycle = self.lifecycle
        for task in self.ledger.deadlines.pop_expired(now):
            if not task.open:
                continue
            if task.state is TaskState.RETRYING:
                # A late tick: the task's deadline came before its retry was released.
                if now >= task.expires_at:
                    lifecycle.end_by_broker(
                        task, TaskStatus.TIMED_OUT, ErrorCode.TIMEOUT,
                        f"its {task.timeout_s:g} s deadline passed after {task.attempts} "
                        "attempt(s)", now)
                continue
            if task.state is _PENDING:
                describe = task.requirement.describe()
                if not self.ledger.agents.offering(task.requirement):
                    lifecycle.end_by_broker(
                        task, TaskStatus.FAILED, ErrorCode.NO_AGENT,
                        f"no live agent offers {describe} (waited {task.timeout_s:g} s); "
                        "start one or check the "
                        + ("agent name" if task.requirement.agent else "capability name"), now)
                else:
                    lifecycle.end_by_broker(
                        task, TaskStatus.TIMED_OUT, ErrorCode.TIMEOUT,
                        f"waited {task.timeout_s:g} s in the queue: every agent offering "
                        f"{describe} was busy, not healthy or had its circuit open", now)
                continue
            agent = task.agent
            if agent is not None:
                self.agents.breaker_failure(agent, now)
                agent.failed += 1
            if now >= task.expires_at:
                lifecycle.end_by_broker(task, TaskStatus.TIMED_OUT, ErrorCode.TIMEOUT,
                                        f"its {task.timeout_s:g} s deadline passed during "
                                        f"attempt {task.attempts}", now)
            else:
                lifecycle.end_by_broker(task, TaskStatus.TIMED_OUT, ErrorCode.TIMEOUT,
                                        f"attempt {task.attempts} ran past its "
                                        f"{task.attempt_timeout_s:g} s attempt limit", now,
                                        retryable=True)

    def dispatch(self, now: float) -> None:
        """Give waiting tasks to agents with credit."""
        self.dispatcher.dispatch(now)

    # ------------------------------------------------------------ output

    def work_messages(self) -> Sends:
        """WELCOMEs and assignments, per peer: what is on a task's critical path leaves
        first, before the journal is committed. A task is promised to nobody until its
        ACCEPTED (or RESULT) goes out, and those wait for the commit."""
        sends: Sends = []
        for identity, box in self.ledger.outboxes.items():
            if box.first or box.assignments:
                messages = box.first
                if box.assignments:
                    messages.extend(encode_dispatch(part) for part in chunks(box.assignments))
                    box.assignments = []
                box.first = []
                sends.append((identity, messages))
        return sends

    def other_messages(self, now: float) -> Sends:
        """Everything else this pass owes, results first; empties the outboxes."""
        self.clients.release_accepted(now)
        self.direct.release_verdicts()
        outboxes = self.ledger.outboxes
        if not outboxes:
            return []
        self.ledger.outboxes = {}
        sends: Sends = [(identity, [encode_results(part) for part in chunks(box.results)])
                        for identity, box in outboxes.items() if box.results]
        for identity, box in outboxes.items():
            messages = self._bookkeeping(identity, box)
            if messages:
                sends.append((identity, messages))
        return sends

    def _bookkeeping(self, identity: bytes, box: Outbox) -> list[list[Any]]:
        messages: list[list[Any]] = []
        if box.first:
            messages.extend(box.first)
        if box.accepted:
            messages.extend(encode(Accepted(part)) for part in chunks(box.accepted))
        if box.cancels:
            messages.append(encode(Cancel(box.cancels)))
        if len(box.acks) >= MAX_BATCH_ITEMS:
            messages.extend(encode(Ack(part)) for part in chunks(box.acks))
            box.acks = []
        if box.acks:
            # Acks are not urgent: the agent only keeps results until acked. They go
            # with the next tick (or once a batch is full), not as a message per pass.
            self.agents.deferred_acks.setdefault(identity, []).extend(box.acks)
        messages.extend(box.control)
        return messages

    # ------------------------------------------------------------ stopping

    def begin_stop(self, now: float) -> None:
        """A graceful stop: no new tasks; without a journal, tasks no agent can take now
        fail rather than wait for one."""
        ledger = self.ledger
        ledger.stopping_since = now
        ledger.phase = BrokerPhase.STOPPING
        logger.info("graceful stop: draining %d task(s)", len(ledger.tasks))
        if ledger.journal_kept:
            return
        for task in list(ledger.tasks.values()):
            if task.state is _PENDING and not ledger.agents.eligible(task.requirement):
                self.lifecycle.end_by_broker(
                    task, TaskStatus.FAILED, ErrorCode.SHUTTING_DOWN,
                    "the broker stopped before an agent could take it", now)

    def stop_complete(self, now: float) -> bool:
        """Whether the graceful stop is over (in-flight work drained, or the drain timed
        out); when it is, the open tasks are settled and agents are told to go."""
        ledger = self.ledger
        assert ledger.stopping_since is not None, "begin_stop() first"
        timed_out = now - ledger.stopping_since >= ledger.config.drain_timeout_s
        tasks = list(ledger.tasks.values())
        running = any(t.agent is not None for t in tasks)
        dispatchable = any(t.state is _PENDING and ledger.agents.eligible(t.requirement)
                           for t in tasks)
        if (running or dispatchable) and not timed_out:
            return False
        if not ledger.journal_kept:
            for task in tasks:
                self.lifecycle.end_by_broker(task, TaskStatus.FAILED, ErrorCode.SHUTTING_DOWN,
                                             "the broker stopped before the task finished", now)
        elif tasks:
            # Journaled: they stay open and run again when the broker comes back.
            logger.info("graceful stop: %d open task(s) kept in the journal", len(tasks))
        for agent in ledger.agents:
            ledger.outbox(agent.identity).control.append(
                encode(Disconnect(DisconnectReason.BROKER_STOPPING.value)))
        ledger.phase = BrokerPhase.STOPPED
        return True

    # ------------------------------------------------------------ queries

    @property
    def tasks(self) -> dict[str, TaskRecord]:
        """The open tasks, by id."""
        return self.ledger.tasks

    def retained(self) -> list[TaskRecord]:
        """The finished tasks still retained, oldest first."""
        return self.ledger.finished.newest_first()[::-1]
