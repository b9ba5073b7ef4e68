"""The agent table and the routing policies that pick an agent for a task.

Eligibility is not a policy decision: whatever the policy, a task only ever goes to an
agent that has every capability it requires (and the agent name it asks for). A policy
only orders the eligible agents that still have credit.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Protocol

from broker.resilience import CircuitBreaker, CircuitState

if TYPE_CHECKING:
    from broker.tasks import TaskRecord

_CLOSED = CircuitState.CLOSED

#: Weight of the newest sample in an agent's response-time average.
EWMA_ALPHA: Final = 0.2


class AgentState(enum.Enum):
    """Where an agent is in its life with this broker."""

    __hash__ = object.__hash__  # identity, as members compare: C speed, not Enum's

    READY = "ready"
    #: told to go (graceful stop or its own DISCONNECT): no new tasks
    DRAINING = "draining"
    DEAD = "dead"


@dataclass(frozen=True, slots=True, eq=False)
class Requirement:
    """What a task asks of an agent: all of ``capabilities`` and, if set, this name or id.

    Compared and hashed by identity (at C speed: it keys the queue and the eligibility
    cache on every task's path), so build one per distinct value: the broker interns them.
    """

    capabilities: frozenset[str]
    agent: str | None = None

    def admits(self, agent: AgentRecord) -> bool:
        if self.agent is not None and self.agent not in (agent.name, agent.agent_id):
            return False
        return self.capabilities <= agent.capabilities

    def describe(self) -> str:
        parts = [f"capability {c!r}" for c in sorted(self.capabilities)]
        if self.agent is not None:
            parts.insert(0, f"agent {self.agent!r}")
        return " and ".join(parts) or "any agent"


@dataclass(slots=True, eq=False)
class AgentRecord:
    """One registered agent connection."""

    identity: bytes
    agent_id: str
    name: str
    capabilities: frozenset[str]
    max_concurrent: int
    registered_at: float
    last_seen: float
    last_sent: float
    state: AgentState = AgentState.READY
    in_flight: dict[str, TaskRecord] = field(default_factory=dict)
    #: task copies the agent may still run that are not (or no longer) its to run: told
    #: to cancel, or reported running after a restart. They take credit until the agent
    #: answers for them, or until it has not mentioned them for a lease period (the
    #: answer was lost: a partition, a reopened socket). Task id -> when last heard of.
    foreign_running: dict[str, float] = field(default_factory=dict)
    breaker: CircuitBreaker = field(default_factory=CircuitBreaker)
    done: int = 0
    failed: int = 0
    ewma_ms: float = 0.0
    #: messaging counters: what the agent reports (bus messages lost, mailbox overflows)
    #: and what the broker counts for it (direct messages refused while it lagged)
    messaging: dict[str, int] = field(default_factory=dict)
    #: ``ewma_ms`` coarsened to power-of-two buckets: policies compare these, so that
    #: agents whose response times differ by noise count as equal and share work
    speed_bucket: int = 0

    @property
    def busy(self) -> int:
        return len(self.in_flight) + len(self.foreign_running)

    @property
    def free(self) -> int:
        """Credit left: how many more tasks the agent may be given now. An agent whose
        circuit is open gets none; half-open, one probe at a time."""
        breaker = self.breaker
        if breaker._state is _CLOSED:
            return self.max_concurrent - self.busy
        state = breaker.state
        if state is _CLOSED:
            return self.max_concurrent - self.busy
        if state is CircuitState.HALF_OPEN and not breaker.probe_in_flight:
            return min(1, self.max_concurrent - self.busy)
        return 0

    @property
    def load(self) -> float:
        return self.busy / self.max_concurrent

    def record_response(self, elapsed_ms: float) -> None:
        if self.ewma_ms == 0.0:
            self.ewma_ms = elapsed_ms
        else:
            self.ewma_ms += EWMA_ALPHA * (elapsed_ms - self.ewma_ms)
        # Power-of-two buckets of 0.25 ms units: int.bit_length is far cheaper than log2.
        self.speed_bucket = int(self.ewma_ms * 4.0).bit_length()

    def describe(self) -> dict[str, object]:
        return {
            "id": self.agent_id, "name": self.name, "capabilities": sorted(self.capabilities),
            "state": self.state.value, "circuit": self.breaker.state.value,
            "in_flight": self.busy, "max_concurrent": self.max_concurrent,
            "done": self.done, "failed": self.failed, "latency_ms": round(self.ewma_ms, 3),
            "messaging": dict(self.messaging),
        }


class AgentTable:
    """Registered agents by identity, with eligible-agent lists cached per requirement."""

    def __init__(self) -> None:
        self.by_identity: dict[bytes, AgentRecord] = {}
        self._eligible: dict[Requirement, list[AgentRecord]] = {}
        #: bumped on every change, so that indexes built elsewhere know when to rebuild
        self.version = 0

    def __len__(self) -> int:
        return len(self.by_identity)

    def __iter__(self):  # type: ignore[no-untyped-def]
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

    def changed(self) -> None:
        """Call when an agent's state changed in a way that affects eligibility."""
        self._eligible.clear()
        self.version += 1

    def eligible(self, requirement: Requirement) -> list[AgentRecord]:
        """READY agents that satisfy ``requirement`` (cached until the table changes)."""
        agents = self._eligible.get(requirement)
        if agents is None:
            agents = [a for a in self.by_identity.values()
                      if a.state is AgentState.READY and requirement.admits(a)]
            self._eligible[requirement] = agents
        return agents

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
