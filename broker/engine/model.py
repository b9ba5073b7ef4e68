"""The engine's records: tasks, agents, requirements, and the legal task transitions.

A task's life::

    PENDING --dispatch--> DISPATCHED --start--> RUNNING
       ^  ^                  |   |                 |
       |  +----requeue-------+   +----retry---+    +--retry--> RETRYING --release--> PENDING
       |                                      v
       +--reclaim (the agent still runs it)-- RETRYING
    any open state --succeed|fail|time_out|cancel|reject--> a final state

:data:`TRANSITIONS` is the whole table; :func:`broker.engine.lifecycle.transition` is
the only code that moves a task along it, and raises
:class:`~broker.errors.IllegalTransition` for any
(state, event) pair the table does not list.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Final

from broker.engine.circuit import AgentCircuit, CircuitState
from broker.engine.quotas import ClientQuotas
from wire.curve import scope_in
from wire.documents import AgentDocument, TimelineEvent
from wire.tasks import ResultItem, TaskSpec

#: Weight of the newest sample in an agent's response-time average.
EWMA_ALPHA: Final = 0.2


class TaskState(enum.Enum):
    """A task's lifecycle in the broker."""

    PENDING = "pending"
    DISPATCHED = "dispatched"
    RUNNING = "running"
    #: failed or timed out, waiting out its retry back-off before it is pending again
    RETRYING = "retrying"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"
    REJECTED = "rejected"

    # Members are singletons compared by identity: hash them by identity too (C speed)
    # instead of Enum's Python-level hash of the name; sets of states sit on hot paths.
    __hash__ = object.__hash__

    @property
    def finished(self) -> bool:
        return self not in OPEN_STATES


class TaskEvent(enum.Enum):
    """What can happen to a task; :data:`TRANSITIONS` says from which states."""

    __hash__ = object.__hash__

    DISPATCH = "dispatch"
    START = "start"
    #: the agent reports running a task we had put back in the queue: it keeps it
    RECLAIM = "reclaim"
    RETRY = "retry"
    #: a retry's back-off is over
    RELEASE = "release"
    #: its agent died, or its dispatch was lost: run it elsewhere at once
    REQUEUE = "requeue"
    SUCCEED = "succeed"
    FAIL = "fail"
    TIME_OUT = "time_out"
    CANCEL = "cancel"
    REJECT = "reject"


OPEN_STATES: Final = frozenset({TaskState.PENDING, TaskState.DISPATCHED, TaskState.RUNNING,
                                TaskState.RETRYING})
_ENDINGS: Final = {
    TaskEvent.SUCCEED: TaskState.SUCCEEDED, TaskEvent.FAIL: TaskState.FAILED,
    TaskEvent.TIME_OUT: TaskState.TIMED_OUT, TaskEvent.CANCEL: TaskState.CANCELLED,
    TaskEvent.REJECT: TaskState.REJECTED,
}

#: event -> {from state: to state}; a pair that is not listed is illegal.
TRANSITIONS: Final[dict[TaskEvent, dict[TaskState, TaskState]]] = {
    TaskEvent.DISPATCH: {TaskState.PENDING: TaskState.DISPATCHED},
    TaskEvent.START: {TaskState.DISPATCHED: TaskState.RUNNING},
    TaskEvent.RECLAIM: {TaskState.PENDING: TaskState.RUNNING},
    TaskEvent.RETRY: {TaskState.DISPATCHED: TaskState.RETRYING,
                      TaskState.RUNNING: TaskState.RETRYING},
    TaskEvent.RELEASE: {TaskState.RETRYING: TaskState.PENDING},
    TaskEvent.REQUEUE: {TaskState.DISPATCHED: TaskState.PENDING,
                        TaskState.RUNNING: TaskState.PENDING},
    **{event: {state: end for state in OPEN_STATES} for event, end in _ENDINGS.items()},
}

#: The ending event of each final result status (``wire.tasks.TaskStatus`` values).
ENDING_OF_STATUS: Final = {state.value: event for event, state in _ENDINGS.items()}


@dataclass(frozen=True, slots=True, eq=False)
class Requirement:
    """What a task asks of an agent: all of ``capabilities`` and, if set, this name or id.

    Compared and hashed by identity (at C speed: it keys the queue and the eligibility
    cache on every task's path), so build one per distinct value: the engine interns them
    (:class:`broker.engine.routing.Requirements`).
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


class TaskRecord:
    """Everything the broker knows about one accepted task.

    A plain slotted class rather than a dataclass: one is built per task on the hot path,
    and a positional ``__init__`` with no default factories is the cheapest there is.
    ``state`` changes only through :func:`broker.engine.lifecycle.transition`.
    """

    __slots__ = ("spec", "requirement", "client", "submitted_at", "deadline", "state", "agent",
                 "attempts", "dispatched_at", "started_at", "last_sign", "finished_at",
                 "result", "watchers", "history", "retry_at", "timeout_s", "children",
                 "holders", "restored", "second_opinion_of", "expires_at",
                 "attempt_timeout_s", "quota", "holder_scopes")

    def __init__(self, spec: TaskSpec, requirement: Requirement, client: bytes,
                 submitted_at: float, timeout_s: float) -> None:
        self.spec = spec
        self.requirement = requirement
        #: ROUTER identity of the client that submitted it (results are pushed there)
        self.client = client
        self.submitted_at = submitted_at
        #: the whole task (queueing, every attempt, back-offs) may take this long
        self.timeout_s = timeout_s
        #: the task's deadline: it ends ``timed_out`` then, whatever its retries
        self.expires_at = submitted_at + timeout_s
        #: each attempt may take this long (None: only the task's deadline bounds it)
        self.attempt_timeout_s: float | None = spec.attempt_timeout_s
        #: when the current wait or attempt must end: ``expires_at``, or an attempt's
        #: earlier limit (:meth:`broker.engine.lifecycle.Lifecycle.arm`)
        self.deadline = self.expires_at
        self.state = TaskState.PENDING
        self.agent: AgentRecord | None = None
        self.attempts = 0
        self.dispatched_at = 0.0
        self.started_at = 0.0
        #: last sign of life of the current attempt (dispatch, PROGRESS): its lease
        self.last_sign = 0.0
        self.finished_at = 0.0
        self.retry_at = 0.0
        self.result: ResultItem | None = None
        #: other clients waiting for this result (FETCH with wait), created on demand
        self.watchers: list[bytes] | None = None
        #: unusual transitions (retries, re-dispatches, timeouts): (clock, event, detail)
        self.history: list[tuple[float, str, str]] | None = None
        #: ids of subtasks submitted by this task's agent while it ran
        self.children: list[str] | None = None
        #: identities of agents that held an earlier attempt (may still answer for it)
        self.holders: list[bytes] | None = None
        #: rebuilt from the journal: who ran it before the restart is known only by key
        self.restored = False
        #: a restored task on a ``--secure`` broker: the key scopes of the agents that
        #: held an attempt before the restart (the journal's ``K`` records); None: any
        #: registered agent may answer for it (a plaintext broker cannot tell them apart)
        self.holder_scopes: frozenset[str] | None = None
        #: the agent whose deterministic failure of this task is being checked on
        #: another agent (which then must not be that one); None: no second opinion yet
        self.second_opinion_of: bytes | None = None
        #: the quotas counting this task against its client's in-flight limit while it
        #: holds an agent slot (:meth:`release_agent` gives the slot back); None: not
        #: counted (no limit, or not on an agent)
        self.quota: ClientQuotas | None = None

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def open(self) -> bool:
        return self.state in OPEN_STATES

    def release_agent(self) -> None:
        """The task leaves its agent (retry, requeue, cancel); remember who held it."""
        agent = self.agent
        if agent is not None:
            quota = self.quota
            if quota is not None:
                quota.off_agent(self.client)
                self.quota = None
            if self.holders is None:
                self.holders = [agent.identity]
            elif agent.identity not in self.holders:
                self.holders.append(agent.identity)
            self.agent = None

    def held_by(self, identity: bytes, registered: bool) -> bool:
        """May ``identity`` answer for an earlier attempt of this task?"""
        if self.holders is not None and identity in self.holders:
            return True
        if not (self.restored and registered):
            return False
        scopes = self.holder_scopes
        return scopes is None or scope_in(identity.decode("utf-8", "replace")) in scopes

    def note(self, at: float, event: str, detail: str = "") -> None:
        """Keep an unusual transition for the task's timeline."""
        if self.history is None:
            self.history = []
        self.history.append((at, event, detail))

    def timeline(self, wall_offset: float) -> list[TimelineEvent]:
        """Every transition with its wall-clock time, oldest first."""
        events: list[tuple[float, str, str]] = [(self.submitted_at, "submitted", "")]
        if self.history:
            events.extend(self.history)
        if self.dispatched_at:
            events.append((self.dispatched_at, "dispatched", self._last_attempt()))
        if self.started_at:
            events.append((self.started_at, "running", ""))
        if self.finished_at:
            events.append((self.finished_at, self.state.value, ""))
        events.sort(key=lambda e: e[0])
        return [{"at": round(at + wall_offset, 6), "event": event, "detail": detail}
                for at, event, detail in events]

    def _last_attempt(self) -> str:
        """``attempt N on AGENT_ID`` of the latest dispatch: the agent holding it, or
        the last that held it (its routing id, which the SDK makes its agent id)."""
        if self.agent is not None:
            return f"attempt {self.attempts} on {self.agent.agent_id}"
        if self.holders:
            return (f"attempt {self.attempts} on "
                    f"{self.holders[-1].decode('utf-8', 'backslashreplace')}")
        return f"attempt {self.attempts}"

    def add_watcher(self, identity: bytes) -> None:
        if self.watchers is None:
            self.watchers = [identity]
        elif identity not in self.watchers:
            self.watchers.append(identity)


class AgentState(enum.Enum):
    """Where an agent is in its life with this broker; changed only through
    :meth:`broker.engine.routing.AgentTable.mark` (which keeps its caches right)."""

    __hash__ = object.__hash__  # identity, as members compare: C speed, not Enum's

    READY = "ready"
    #: told to go (graceful stop or its own DISCONNECT): no new tasks
    DRAINING = "draining"
    DEAD = "dead"


class AgentHealth(enum.Enum):
    """What the broker's health checks (PING and the agent's PONG) last found; changed
    only through :meth:`broker.engine.routing.AgentTable.set_health`. Only a healthy
    agent gets new tasks; what it runs stays with it whatever its health."""

    __hash__ = object.__hash__  # identity, as members compare: C speed, not Enum's

    HEALTHY = "healthy"
    #: no answer to a PING within the ping deadline (a stuck event loop)
    UNRESPONSIVE = "unresponsive"
    #: its ``ping()`` hook raised or reported a problem, or a task ran past its attempt
    #: limit and did not stop when cancelled (a hung ``execute``)
    UNHEALTHY = "unhealthy"


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
    breaker: AgentCircuit = field(default_factory=AgentCircuit)
    done: int = 0
    failed: int = 0
    #: tasks it failed that then succeeded on another agent (second opinions)
    failed_for_peers: int = 0
    ewma_ms: float = 0.0
    #: messaging counters: what the agent reports (bus messages lost, mailbox overflows)
    #: and what the broker counts for it (direct messages refused while it lagged)
    messaging: dict[str, int] = field(default_factory=dict)
    #: ``ewma_ms`` coarsened to power-of-two buckets: policies compare these, so that
    #: agents whose response times differ by noise count as equal and share work
    speed_bucket: int = 0
    health: AgentHealth = AgentHealth.HEALTHY
    #: why it is not healthy (one line), None while healthy
    health_detail: str | None = None
    #: the last PING's sequence number, and the last one the agent answered
    ping_seq: int = 0
    ping_answered: int = 0
    #: when the oldest unanswered PING left (0.0: none waits), and when the last one did
    ping_waiting_since: float = 0.0
    ping_sent_at: float = 0.0

    @property
    def busy(self) -> int:
        return len(self.in_flight) + len(self.foreign_running)

    def credit(self, now: float) -> int:
        """How many more tasks the agent may be given at ``now``. An agent whose circuit
        is open gets none; half-open, one probe at a time."""
        breaker = self.breaker
        if breaker.state is _CLOSED:
            return self.max_concurrent - self.busy
        state = breaker.state_at(now)
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

    def describe(self, now: float) -> AgentDocument:
        return {
            "id": self.agent_id, "name": self.name, "capabilities": sorted(self.capabilities),
            "state": self.state.value, "circuit": self.breaker.state_at(now).value,
            "health": self.health.value, "health_detail": self.health_detail,
            "in_flight": self.busy, "max_concurrent": self.max_concurrent,
            "done": self.done, "failed": self.failed,
            "failed_for_peers": self.failed_for_peers, "latency_ms": round(self.ewma_ms, 3),
            "messaging": dict(self.messaging),
        }


_CLOSED = CircuitState.CLOSED
