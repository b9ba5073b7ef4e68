"""The agent table, the routing policies that pick an agent for a task, and the interned
requirements tasks ask for.

Eligibility is not a policy decision: whatever the policy, a task only ever goes to an
agent that has every capability it requires (and the agent name it asks for). A policy
only orders the eligible agents that still have credit.
"""

from __future__ import annotations

from typing import Iterator, Protocol

from broker.engine.model import AgentHealth, AgentRecord, AgentState, Requirement


class Requirements:
    """One :class:`Requirement` object per distinct value (requirements compare by
    identity), whatever the order the capabilities were listed in."""

    def __init__(self) -> None:
        self._interned: dict[tuple[tuple[str, ...], str | None], Requirement] = {}

    def get(self, capabilities: tuple[str, ...], agent: str | None) -> Requirement:
        key = (capabilities, agent)
        requirement = self._interned.get(key)
        if requirement is None:
            canonical = (tuple(sorted(set(capabilities))), agent)
            requirement = self._interned.get(canonical)
            if requirement is None:
                requirement = Requirement(frozenset(capabilities), agent)
                self._interned[canonical] = requirement
            self._interned[key] = requirement
        return requirement


class AgentTable:
    """Registered agents by identity, with eligible-agent lists cached per requirement."""

    def __init__(self) -> None:
        self.by_identity: dict[bytes, AgentRecord] = {}
        self._eligible: dict[Requirement, list[AgentRecord]] = {}
        #: bumped on every change, so that indexes built elsewhere know when to rebuild
        self.version = 0

    def __len__(self) -> int:
        return len(self.by_identity)

    def __iter__(self) -> Iterator[AgentRecord]:
        # a copy: callers remove agents while they walk the table
        return iter(list(self.by_identity.values()))

    def get(self, identity: bytes) -> AgentRecord | None:
        return self.by_identity.get(identity)

    def add(self, agent: AgentRecord) -> None:
        self.by_identity[agent.identity] = agent
        self._eligible.clear()
        self.version += 1

    def remove(self, identity: bytes) -> AgentRecord | None:
        agent = self.by_identity.pop(identity, None)
        if agent is not None:
            self._eligible.clear()
            self.version += 1
        return agent

    def mark(self, agent: AgentRecord, state: AgentState) -> None:
        """Move ``agent`` to ``state``: the one place an agent's state changes, so that
        the eligibility cache and the name index (``version``) follow."""
        agent.state = state
        self._eligible.clear()
        self.version += 1

    def set_health(self, agent: AgentRecord, health: AgentHealth, detail: str | None) -> None:
        """The one place an agent's health changes: only healthy agents are eligible."""
        agent.health = health
        agent.health_detail = detail
        self._eligible.clear()
        self.version += 1

    def eligible(self, requirement: Requirement) -> list[AgentRecord]:
        """READY, healthy agents that satisfy ``requirement`` (cached until the table
        changes)."""
        agents = self._eligible.get(requirement)
        if agents is None:
            agents = [a for a in self.by_identity.values()
                      if a.state is AgentState.READY and a.health is AgentHealth.HEALTHY
                      and requirement.admits(a)]
            self._eligible[requirement] = agents
        return agents

    def offering(self, requirement: Requirement) -> list[AgentRecord]:
        """READY agents that satisfy ``requirement``, healthy or not (not cached: for
        messages, not for dispatch)."""
        return [a for a in self.by_identity.values()
                if a.state is AgentState.READY and requirement.admits(a)]

    def find(self, name_or_id: str) -> list[AgentRecord]:
        return [a for a in self.by_identity.values() if name_or_id in (a.name, a.agent_id)]


class RoutingPolicy(Protocol):
    """Picks one agent from eligible agents that all have credit left (never empty)."""

    name: str

    def choose(self, candidates: list[AgentRecord]) -> AgentRecord: ...


class RoundRobin:
    """Each candidate in turn, regardless of load."""

    name = "round_robin"

    def __init__(self) -> None:
        self._turn = 0

    def choose(self, candidates: list[AgentRecord]) -> AgentRecord:
        self._turn += 1
        return candidates[self._turn % len(candidates)]


class LeastLoaded:
    """Lowest in-flight / max_concurrent, then lowest response-time average.

    Ties rotate, so equal agents share work evenly instead of the first one taking all.
    """

    name = "least_loaded"

    def __init__(self) -> None:
        self._turn = 0

    def _key(self, agent: AgentRecord) -> tuple[float, ...]:
        return (agent.load, agent.speed_bucket)

    def choose(self, candidates: list[AgentRecord]) -> AgentRecord:
        count = len(candidates)
        if count == 1:
            return candidates[0]
        self._turn += 1
        start = self._turn % count
        best = candidates[start]
        best_key = self._key(best)
        key = self._key
        for offset in range(1, count):
            agent = candidates[(start + offset) % count]
            agent_key = key(agent)
            if agent_key < best_key:
                best, best_key = agent, agent_key
        return best


class CapabilityFirst(LeastLoaded):
    """The default: least loaded, and between equally loaded agents the most specialised
    one (fewest capabilities), which keeps generalists free for tasks only they can do."""

    name = "capability"

    def _key(self, agent: AgentRecord) -> tuple[float, ...]:
        return (agent.load, len(agent.capabilities), agent.speed_bucket)


def make_policy(name: str) -> RoutingPolicy:
    """The policy called ``name`` (see ``broker.config.POLICIES``).

    Raises:
        ValueError: for an unknown name.
    """
    policies: dict[str, type[RoutingPolicy]] = {
        "capability": CapabilityFirst, "least_loaded": LeastLoaded, "round_robin": RoundRobin}
    try:
        return policies[name]()
    except KeyError:
        raise ValueError(f"unknown routing policy {name!r}") from None
