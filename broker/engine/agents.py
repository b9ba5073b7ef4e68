"""Agent commands (READY, PROGRESS, HEARTBEAT, DISCONNECT, RESULT) and agent upkeep:
liveness, heartbeats, lost dispatches, circuit breakers, removal."""

from __future__ import annotations

import logging
from collections import Counter
from typing import Callable

from broker.engine.circuit import AgentCircuit, CircuitState
from broker.engine.direct import DirectRouting
from broker.engine.ledger import Ledger
from broker.engine.lifecycle import Lifecycle, new_result
from broker.engine.model import AgentRecord, AgentState, TaskRecord, TaskState
from broker.engine.quotas import size_limits
from broker.heartbeat import Liveness
from wire.documents import DisconnectReason
from wire.limits import MAX_NAME_CHARS
from wire.tasks import (
    Ack, Disconnect, ErrorCode, Heartbeat, Progress, Ready, ResultItem, Results, TaskStatus, Welcome,
    encode,
)

logger = logging.getLogger(__name__)

_PENDING = TaskState.PENDING
_DISPATCHED = TaskState.DISPATCHED
_DRAINING = AgentState.DRAINING
_CIRCUIT_CLOSED = CircuitState.CLOSED
_SUCCEEDED = TaskStatus.SUCCEEDED.value
_FAILED_STATUS = TaskStatus.FAILED.value
_TIMED_OUT_STATUS = TaskStatus.TIMED_OUT.value
_NOT_REGISTERED = DisconnectReason.NOT_REGISTERED.value


def _no_address() -> str:
    return ""


class AgentDesk:
    """Keeps the books of agents and of the tasks they hold.

    Args:
        ledger: the engine's books.
        lifecycle: moves tasks as agents start, finish or lose them.
        direct: told when agents leave and come back (messages to a departed agent are
            refused).
    """

    def __init__(self, ledger: Ledger, lifecycle: Lifecycle, direct: DirectRouting) -> None:
        self.ledger = ledger
        self.lifecycle = lifecycle
        self.direct = direct
        config = ledger.config
        self.liveness = Liveness(config.heartbeat_interval_s, config.heartbeat_liveness)
        #: acknowledgements of results, sent with the next tick (or once a batch is full)
        self.deferred_acks: dict[bytes, list[str]] = {}
        #: the remote address of the message being handled (the server's port; asked only
        #: for a READY, so that no other message pays for it)
        self.peer_address: Callable[[], str] = _no_address
        #: registered agents per remote address, and each agent's address
        self.per_address: Counter[str] = Counter()
        self.address_of: dict[bytes, str] = {}

    # ------------------------------------------------------------ registration

    def _cap_refusal(self, identity: bytes) -> str | None:
        """Why a READY from ``identity`` (not registered yet) would pass a cap, or None;
        remembers its address when it may register."""
        config = self.ledger.config
        if len(self.address_of) >= config.max_agents:
            return (f"the broker holds {len(self.address_of)} agents, its limit "
                    f"(--max-agents {config.max_agents})")
        address = self.peer_address()
        if self.per_address[address] >= config.max_agents_per_address:
            return (f"the broker holds {self.per_address[address]} agents from "
                    f"{address or 'this address'}, its limit per address "
                    f"(--max-agents-per-address {config.max_agents_per_address})")
        self.per_address[address] += 1
        self.address_of[identity] = address
        return None

    def _forget_address(self, identity: bytes) -> None:
        address = self.address_of.pop(identity, None)
        if address is not None:
            left = self.per_address[address] - 1
            if left > 0:
                self.per_address[address] = left
            else:
                del self.per_address[address]

    def ready(self, identity: bytes, msg: Ready, now: float) -> None:
        ledger = self.ledger
        refusal = registration_refusal(msg)
        if refusal is not None:
            ledger.reject(identity, ErrorCode.BAD_REQUEST, refusal)
            return
        if identity not in self.address_of:
            refusal = self._cap_refusal(identity)
            if refusal is not None:
                ledger.counters["agents_refused"] += 1
                ledger.reject(identity, ErrorCode.TOO_MANY_AGENTS, refusal)
                return
        config = ledger.config
        previous = ledger.agents.remove(identity)
        agent = AgentRecord(identity, msg.agent_id, msg.name, frozenset(msg.capabilities),
                            msg.max_concurrent, now, now, now,
                            breaker=AgentCircuit(config.circuit_failure_threshold,
                                                 config.circuit_recovery_s))
        ledger.agents.add(agent)
        self.direct.rejoined(identity)
        if previous is not None:
            self._take_over(previous, agent, set(msg.running), now)
        for task_id in msg.running:
            if task_id not in agent.in_flight:
                self.claim_running(agent, task_id, now)
        ledger.counters["agents_registered"] += 1
        # %r: names come from peers; repr escapes what could forge log lines
        logger.info("agent %r (%r) registered: capabilities %r, max_concurrent %d",
                    msg.agent_id, msg.name, sorted(msg.capabilities), msg.max_concurrent)
        ledger.events.agent_joined(msg.agent_id, msg.name, sorted(msg.capabilities))
        ledger.outbox(identity).first.append(encode(Welcome(
            config.heartbeat_interval_s, config.heartbeat_liveness, ledger.endpoints,
            ledger.boot_id, size_limits(config))))

    def _take_over(self, previous: AgentRecord, agent: AgentRecord, running: set[str],
                   now: float) -> None:
        """Registered again on the same connection (it thought we died): what it still
        runs stays with it, what it does not know about was lost on the way."""
        self.ledger.agents.mark(previous, AgentState.DEAD)
        for task_id, task in previous.in_flight.items():
            if task_id in running:
                task.agent = agent
                agent.in_flight[task_id] = task
            else:
                task.release_agent()
                self.lifecycle.requeue(
                    task, f"agent {agent.agent_id} registered again without it", now)
        agent.foreign_running.update(
            (task_id, now) for task_id in previous.foreign_running if task_id in running)

    def claim_running(self, agent: AgentRecord, task_id: str, now: float) -> None:
        """The agent says it runs ``task_id``: make our books agree, or stop it there."""
        foreign = agent.foreign_running
        if task_id in foreign:
            foreign[task_id] = now  # we told it to cancel that copy; it still runs it
            return
        task = self.ledger.tasks.get(task_id)
        if task is not None and task.state is _PENDING and task.held_by(agent.identity, True):
            self.lifecycle.reclaim(task, agent, now)
        elif task is not None and task.agent is agent:
            task.last_sign = now
            if task.state is _DISPATCHED:
                self.lifecycle.start(task, now)
        else:
            # Finished, or running elsewhere now: this copy is not wanted.
            foreign[task_id] = now
            self.ledger.outbox(agent.identity).cancels.append(task_id)

    # ------------------------------------------------------------ other commands

    def progress(self, identity: bytes, agent: AgentRecord | None, msg: Progress,
                 now: float) -> None:
        if agent is None:
            self._ask_to_register(identity)
            return
        for task_id in msg.started:
            self.claim_running(agent, task_id, now)
        for task_id in msg.running:
            self.claim_running(agent, task_id, now)

    def heartbeat(self, identity: bytes, agent: AgentRecord | None, msg: Heartbeat) -> None:
        if msg.role == "client":
            self.ledger.outbox(identity).control.append(encode(Heartbeat(
                boot=self.ledger.boot_id, limits=size_limits(self.ledger.config))))
        elif agent is None:
            # A heartbeat before READY: an agent that registered with a broker we do not
            # remember (we restarted). Ask it to register instead of inventing state for it.
            self._ask_to_register(identity)
        elif msg.stats is not None:
            agent.messaging.update(msg.stats)

    def disconnect(self, agent: AgentRecord | None, msg: Disconnect, now: float) -> None:
        if agent is None:
            return
        if msg.handed_back:
            self._handed_back(agent, msg.handed_back, now)
        if agent.busy:
            self.ledger.agents.mark(agent, AgentState.DRAINING)
        else:
            self.remove(agent, "disconnected", now)

    def _handed_back(self, agent: AgentRecord, task_ids: list[str], now: float) -> None:
        """A draining agent ran out of time and gives these tasks back unfinished: they
        run again elsewhere, and the attempt does not count (a resize must not use up a
        task's retries); the task's own deadline still applies."""
        for task_id in task_ids:
            task = agent.in_flight.pop(task_id, None)
            if task is None:
                continue
            task.release_agent()
            task.attempts -= 1
            self.ledger.counters["handed_back"] += 1
            self.lifecycle.requeue(task, f"handed back by {agent.agent_id} (drained)", now)

    def _ask_to_register(self, identity: bytes) -> None:
        self.ledger.outbox(identity).control.append(encode(Disconnect(_NOT_REGISTERED)))

    # ------------------------------------------------------------ results

    def results(self, identity: bytes, agent: AgentRecord | None, msg: Results,
                now: float) -> None:
        ledger = self.ledger
        results = msg.results
        ledger.items_this_pass += len(results)
        tasks = ledger.tasks
        foreign = agent.foreign_running if agent is not None else None
        elapsed_total = 0.0
        answered = 0
        for item in results:
            task_id = item.task_id
            if foreign:
                foreign.pop(task_id, None)
            task = tasks.get(task_id)
            if task is None:
                # Already finished (a duplicate after a re-dispatch or resend) or unknown.
                ledger.counters["duplicate_results"] += 1
                continue
            owner = task.agent
            if owner is None or owner.identity != identity:
                self._earlier_attempt(identity, agent, task, item, now)
                continue
            del owner.in_flight[task_id]
            elapsed_total += now - task.dispatched_at
            answered += 1
            self._account(owner, item, now)
            task.release_agent()
            if item.status != _SUCCEEDED and self._try_again(task, owner, item, now):
                continue
            if task.second_opinion_of is not None:
                self._second_opinion_given(task, item, now)
            dispatched_at = task.dispatched_at
            self.lifecycle.finish(task, new_result((
                task_id, item.status, item.payload, item.error_code, item.error_message,
                owner.name, task.attempts,
                (dispatched_at - task.submitted_at) * 1000.0 if dispatched_at else None,
                item.run_ms, None)), now)
        self._acknowledge(identity, results)
        if answered and agent is not None:
            # One response-time sample per message (its mean): cheaper than one per task,
            # and the routing policies only look at a coarse bucket of it anyway.
            agent.record_response(elapsed_total * 1000.0 / answered)
        if agent is None:
            # Results from an unregistered peer (e.g. after our restart): accepted above,
            # and the peer is asked to register so that it gets work again.
            self._ask_to_register(identity)

    def _acknowledge(self, identity: bytes, results: list[ResultItem]) -> None:
        """ACK the results the broker holds now. One whose large payload the result
        store is still writing is acknowledged once written (``Lifecycle.result_written``):
        until then the agent keeps it, and sends no more large ones than its window."""
        ids = [item.task_id for item in results]
        writing = self.ledger.finished.writing
        if writing:
            after_write = self.ledger.acks_after_write
            for task_id in ids:
                if task_id in writing:
                    after_write[task_id] = identity
            ids = [task_id for task_id in ids if task_id not in writing]
        self.ledger.outbox(identity).acks.extend(ids)

    def _try_again(self, task: TaskRecord, owner: AgentRecord, item: ResultItem,
                   now: float) -> bool:
        """After a failed attempt: a retry (a fault of the agent or the system, or the
        task asked for retries), or else, for a failure the agent did not mark, one
        second opinion on another live agent of the same capabilities, when there is
        one. True when the task runs again."""
        lifecycle = self.lifecycle
        if lifecycle.retry(task, item.error_code, item.error_message, item.retryable, now):
            return True
        if item.retryable is not None or item.status != _FAILED_STATUS or \
                task.second_opinion_of is not None or self.ledger.stopping_since is not None:
            return False
        if not any(a is not owner for a in self.ledger.agents.eligible(task.requirement)):
            return False
        lifecycle.second_opinion(task, owner, item.error_code, item.error_message, now)
        return True

    def _second_opinion_given(self, task: TaskRecord, item: ResultItem, now: float) -> None:
        """The second opinion on a failure is in: a success shows the first agent failed
        a task it should have run, which counts against its circuit."""
        if item.status != _SUCCEEDED:
            return
        suspect = self.ledger.agents.get(task.second_opinion_of or b"")
        if suspect is not None:
            suspect.failed_for_peers += 1
            self.breaker_failure(suspect, now)

    def _earlier_attempt(self, identity: bytes, agent: AgentRecord | None, task: TaskRecord,
                         item: ResultItem, now: float) -> None:
        """An earlier attempt answering (the task was requeued or dispatched again since).
        Its success is as good as any: take it, and stop the current holder. Its failure
        is old news: the current attempt decides. Only a peer that did hold the task may
        answer for it (after a restart a secure broker knows its key from the journal, a
        plaintext one does not: then any registered agent may)."""
        if item.status != _SUCCEEDED or not task.held_by(identity, agent is not None):
            self.ledger.counters["stale_results"] += 1
            return
        self.lifecycle.detach(task, now)
        dispatched_at = task.dispatched_at
        self.lifecycle.finish(task, new_result((
            task.spec.id, item.status, item.payload, item.error_code, item.error_message,
            agent.name if agent is not None else None, task.attempts,
            round((dispatched_at - task.submitted_at) * 1000.0, 3) if dispatched_at else None,
            item.run_ms, None)), now)

    def _account(self, owner: AgentRecord, item: ResultItem, now: float) -> None:
        """Count an answer against its agent: done or failed, and its circuit. Only the
        agent's own faults count against its circuit (an attempt that timed out, an error
        it marks transient): a task that fails because of its input says nothing about
        the agent, and one user's bad tasks must not lock good work out of it."""
        breaker = owner.breaker
        if item.status == _SUCCEEDED:
            owner.done += 1
            if breaker.state is not _CIRCUIT_CLOSED or breaker.consecutive_failures:
                self.breaker_success(owner)
        else:
            owner.failed += 1
            if item.status == _TIMED_OUT_STATUS or \
                    (item.status == _FAILED_STATUS and item.retryable is True):
                self.breaker_failure(owner, now)
        if owner.state is _DRAINING and not owner.busy:
            self.remove(owner, "drained", now)

    def breaker_success(self, agent: AgentRecord) -> None:
        was = agent.breaker.state
        agent.breaker.record_success()
        if was is not CircuitState.CLOSED:
            logger.info("agent %r: circuit closed after a successful probe", agent.agent_id)
            self.ledger.events.agent_circuit(agent.agent_id, agent.name,
                                             sorted(agent.capabilities), "closed")

    def breaker_failure(self, agent: AgentRecord, now: float) -> None:
        breaker = agent.breaker
        was = breaker.state_at(now)
        breaker.record_failure(now)
        if breaker.state is CircuitState.OPEN and was is not CircuitState.OPEN:
            self.ledger.counters["circuits_opened"] += 1
            logger.warning("agent %r: circuit open after %d failure(s) in a row; no tasks for "
                           "%g s", agent.agent_id, breaker.consecutive_failures,
                           breaker.recovery_s)
            self.ledger.events.agent_circuit(agent.agent_id, agent.name,
                                             sorted(agent.capabilities), "open")

    # ------------------------------------------------------------ upkeep

    def remove(self, agent: AgentRecord, reason: str, now: float) -> None:
        """Forget an agent; its in-flight tasks go back to the queue (or fail, if they
        have used up their retries)."""
        ledger = self.ledger
        ledger.agents.remove(agent.identity)
        self._forget_address(agent.identity)
        ledger.agents.mark(agent, AgentState.DEAD)
        self.direct.departed(agent.identity, reason)
        ledger.events.agent_left(agent.agent_id, agent.name, sorted(agent.capabilities), reason)
        orphans = list(agent.in_flight.values())
        agent.in_flight.clear()
        for task in orphans:
            task.release_agent()
            self.lifecycle.requeue(task, f"agent {agent.agent_id} {reason}", now)
        log = logger.warning if reason in ("dead", "unreachable") else logger.info
        log("agent %r (%r) removed: %s; %d in-flight task(s) orphaned", agent.agent_id,
            agent.name, reason, len(orphans))

    def tick(self, now: float) -> None:
        """Dead agents go, idle ones get a heartbeat, lost dispatches run again, and the
        acknowledgements of the last interval leave."""
        liveness = self.liveness
        outboxes = self.ledger.outboxes
        for agent in self.ledger.agents:
            if liveness.is_dead(agent, now):
                self.ledger.counters["agents_dead"] += 1
                self.remove(agent, "dead", now)
                continue
            if liveness.needs_heartbeat(agent, now) and agent.identity not in outboxes:
                self.ledger.outbox(agent.identity).control.append(encode(Heartbeat()))
            self._expire_leases(agent, now)
        if self.deferred_acks:
            acks, self.deferred_acks = self.deferred_acks, {}
            for identity, ids in acks.items():
                self.ledger.outbox(identity).control.append(encode(Ack(ids)))

    def _expire_leases(self, agent: AgentRecord, now: float) -> None:
        lease_s = self.liveness.expiry_s
        # A dispatch with no sign of life for a lease period was lost on the way (the
        # agent is alive: it heartbeats). Run the task again.
        lost = [t for t in agent.in_flight.values() if now - t.last_sign > lease_s]
        for task in lost:
            task_id = task.spec.id
            del agent.in_flight[task_id]
            agent.foreign_running[task_id] = now
            self.ledger.outbox(agent.identity).cancels.append(task_id)
            task.release_agent()
            self.ledger.counters["lease_expired"] += 1
            self.lifecycle.requeue(task, f"no sign of life from {agent.agent_id} for "
                                         f"{lease_s:g} s", now)
        foreign = agent.foreign_running
        if foreign:
            # A copy the agent has not listed as running for a lease period has ended
            # there and its answer was lost: free the slot rather than hold it forever.
            ended = [task_id for task_id, seen in foreign.items() if now - seen > lease_s]
            for task_id in ended:
                del foreign[task_id]
            if ended:
                self.ledger.counters["lost_answers"] += len(ended)


def registration_refusal(msg: Ready) -> str | None:
    """Why a READY is refused, or None: names and capabilities must be non-empty, at
    most :data:`MAX_NAME_CHARS` long and free of control characters (a newline in a
    name would forge lines in the broker's log and break every table that shows it)."""
    for what, value in (("agent id", msg.agent_id), ("name", msg.name),
                        *(("capability", c) for c in msg.capabilities)):
        if not value or len(value) > MAX_NAME_CHARS:
            return f"{what} {value[:40]!r} must have 1 to {MAX_NAME_CHARS} characters"
        if not value.isprintable():
            return f"{what} {value[:40]!r} contains control characters; use printable text"
    return None

