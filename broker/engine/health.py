"""Health checks of agents (the seed's ``HealthChecker``): PING with a deadline, the
agent's PONG, and the verdict.

Liveness (:mod:`broker.heartbeat`) answers "is the process there?"; a health check
answers "can it do work?". Every heartbeat interval the broker sends each agent a PING;
the agent answers from its event loop once its ``ping()`` hook has given a verdict, with
the age and the time limit of every task it runs. An agent is then

- HEALTHY: it answered, its hook found nothing wrong, no task overstayed;
- UNRESPONSIVE: the oldest unanswered PING is older than the ping deadline (shorter
  than the liveness window, so a stuck loop shows before the agent is declared dead);
- UNHEALTHY: its hook raised or reported a problem, or a task ran past its attempt
  limit and kept running after the broker cancelled it (a hung ``execute``).

Only healthy agents are eligible for new tasks (:meth:`AgentTable.eligible`); the tasks an
agent runs stay with it whatever its health, unless it is declared dead.
"""

from __future__ import annotations

import logging

from broker.engine.ledger import Ledger
from broker.engine.model import AgentHealth, AgentRecord, AgentState
from wire.tasks import Ping, Pong, encode

logger = logging.getLogger(__name__)

_HEALTHY = AgentHealth.HEALTHY
_UNRESPONSIVE = AgentHealth.UNRESPONSIVE
_UNHEALTHY = AgentHealth.UNHEALTHY


class HealthChecks:
    """Sends the PINGs, reads the PONGs, and moves agents between health states.

    Args:
        ledger: the engine's books (agents, outboxes, events, configuration).
    """

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        config = ledger.config
        self.interval_s = config.heartbeat_interval_s
        self.deadline_s = config.ping_deadline_s
        #: how far past its attempt limit a task may run before its agent counts as hung:
        #: the broker's CANCEL needs a moment to reach the agent and stop the task
        self.grace_s = config.heartbeat_interval_s

    def tick(self, now: float) -> None:
        """Declare unanswered agents unresponsive, and send the PINGs that are due."""
        outbox = self.ledger.outbox
        for agent in self.ledger.agents:
            if agent.state is AgentState.DEAD:
                continue
            waiting = agent.ping_waiting_since
            if waiting and now - waiting > self.deadline_s and agent.health is not _UNRESPONSIVE:
                self._change(agent, _UNRESPONSIVE,
                             f"no answer to a health check within {self.deadline_s:g} s")
            if now - agent.ping_sent_at >= self.interval_s:
                agent.ping_seq += 1
                agent.ping_sent_at = now
                if not waiting:
                    agent.ping_waiting_since = now
                outbox(agent.identity).control.append(
                    encode(Ping(agent.ping_seq, self.deadline_s)))

    def pong(self, agent: AgentRecord | None, msg: Pong) -> None:
        """An agent's answer: its health is what the answer says."""
        if agent is None or not agent.ping_answered < msg.seq <= agent.ping_seq:
            return  # from no registered agent, stale, or answering a PING never sent
        agent.ping_answered = msg.seq
        # Answering an older PING: the newest one still waits.
        agent.ping_waiting_since = 0.0 if msg.seq == agent.ping_seq else agent.ping_sent_at
        problem = self.problem(msg)
        if problem is None:
            if agent.health is not _HEALTHY:
                self._change(agent, _HEALTHY, None)
        elif agent.health is not _UNHEALTHY:
            self._change(agent, _UNHEALTHY, problem)
        else:
            agent.health_detail = problem  # still unhealthy, maybe for another reason

    def problem(self, msg: Pong) -> str | None:
        """What a PONG reports wrong (one line), or None."""
        if not msg.ok:
            return msg.detail or "its ping() hook reported a problem"
        for task_id, age_s, limit_s in msg.running:
            if age_s > limit_s + self.grace_s:
                return (f"task {task_id!r} ran past its {limit_s:.3g} s attempt limit and "
                        "did not stop when cancelled (a hung execute)")
        return None

    def _change(self, agent: AgentRecord, health: AgentHealth, detail: str | None) -> None:
        ledger = self.ledger
        ledger.agents.set_health(agent, health, detail)
        ledger.counters[f"agents_{health.value}"] += 1
        if health is _HEALTHY:
            logger.info("agent %r is healthy again: it gets new tasks", agent.agent_id)
        else:
            # %r: ids and details come from peers; repr escapes what could forge log lines
            logger.warning("agent %r is %s: %r; it gets no new tasks", agent.agent_id,
                           health.value, detail)
        ledger.events.agent_health(agent.agent_id, agent.name, sorted(agent.capabilities),
                                   health.value, detail)
