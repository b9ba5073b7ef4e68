"""Dispatch: pending tasks go to eligible agents with credit, in batches per agent."""

from __future__ import annotations

from broker.engine.circuit import CircuitState
from broker.engine.ledger import Ledger
from broker.engine.lifecycle import Lifecycle
from broker.engine.model import AgentRecord, Requirement, TaskRecord
from wire.tasks import Assignment

_CIRCUIT_CLOSED = CircuitState.CLOSED


class Dispatcher:
    """Hands waiting tasks to agents, as many as their credit allows, each pass.

    Args:
        ledger: the engine's books (the routing policy is ``ledger.policy``).
        lifecycle: moves each task to DISPATCHED.
    """

    def __init__(self, ledger: Ledger, lifecycle: Lifecycle) -> None:
        self.ledger = ledger
        self.lifecycle = lifecycle

    def dispatch(self, now: float) -> None:
        """Assign what can be assigned now; the assignments wait in the agents' outboxes."""
        pending = self.ledger.pending
        if not pending.count:
            return
        for requirement in pending.requirements():
            candidates = [a for a in self.ledger.agents.eligible(requirement)
                          if a.credit(now) > 0]
            if candidates:
                self._dispatch_requirement(requirement, candidates, now)

    def _dispatch_requirement(self, requirement: Requirement, candidates: list[AgentRecord],
                              now: float) -> None:
        ledger = self.ledger
        pending = ledger.pending
        choose = ledger.policy.choose
        dispatch = self.lifecycle.dispatch
        assignments: dict[AgentRecord, list[Assignment]] = {}
        deferred: list[TaskRecord] = []
        while candidates:
            # As many waiting tasks as the candidates have credit, in one call.
            batch_of_tasks = pending.take(requirement, sum(a.credit(now) for a in candidates))
            if not batch_of_tasks:
                break
            for task in batch_of_tasks:
                if not candidates:
                    deferred.append(task)
                    continue
                agent = choose(candidates) if len(candidates) > 1 else candidates[0]
                if (agent.foreign_running and task.spec.id in agent.foreign_running) or \
                        task.second_opinion_of is not None:
                    others = [a for a in candidates if may_take(a, task)]
                    if not others:
                        deferred.append(task)
                        continue
                    agent = choose(others) if len(others) > 1 else others[0]
                batch = assignments.get(agent)
                if batch is None:
                    batch = assignments[agent] = []
                batch.append(dispatch(task, agent, now))
                breaker = agent.breaker
                if breaker.state is not _CIRCUIT_CLOSED:
                    breaker.probe_in_flight = True  # half-open: this task is the probe
                    candidates.remove(agent)
                elif len(agent.in_flight) + len(agent.foreign_running) >= agent.max_concurrent:
                    candidates.remove(agent)
        for agent, batch in assignments.items():
            ledger.outbox(agent.identity).assignments.extend(batch)
        for task in reversed(deferred):
            pending.push_front(task)


def may_take(agent: AgentRecord, task: TaskRecord) -> bool:
    """Whether ``agent`` may run this attempt of ``task``: not while it still runs an
    earlier attempt (told to cancel it: its answer could not be told from this
    attempt's), and not the agent whose failure the attempt is a second opinion on."""
    if task.spec.id in agent.foreign_running:
        return False
    return task.second_opinion_of != agent.identity
