"""The documents carried inside messages, typed: what a STATUS reply, a task listing, a
WELCOME's endpoints, a STATUS ``until`` and a DISCONNECT's reason hold.

On the wire they stay msgpack maps and strings (the header layouts in ``wire.tasks``);
these types say which keys there are, so that the broker builds them and the SDK and the
CLI read them against one definition instead of by ad-hoc keys.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, NotRequired, TypedDict


class DisconnectReason(str, enum.Enum):
    """Why a DISCONNECT was sent (its ``reason``)."""

    #: broker -> peer: register first (a heartbeat or result from an unknown agent,
    #: typically after the broker restarted)
    NOT_REGISTERED = "not_registered"
    #: broker -> agent: the broker stops; reconnect when it is back
    BROKER_STOPPING = "broker_stopping"
    #: agent -> broker: no new tasks; the running ones still report
    DRAINING = "draining"
    #: agent -> broker: leaving now
    BYE = "bye"


class Endpoints(TypedDict, total=False):
    """Where the other components listen (WELCOME's ``endpoints``, STATUS ``endpoints``)."""

    #: the bus forwarder's XPUB: subscribers connect here
    bus_out: str
    #: the bus forwarder's XSUB: publishers connect here
    bus_in: str
    #: the broker's own XPUB: its events (``agents.*``, ``tasks.*``), published by it alone
    events: str
    #: the state service's ROUTER
    state: str


@dataclass(frozen=True, slots=True)
class StatusUntil:
    """A STATUS request's ``until``: answer once ``agents`` live agents offer every one of
    ``capabilities`` (and are called ``name``, when set), or at the request's timeout."""

    agents: int = 1
    capabilities: tuple[str, ...] = ()
    name: str | None = None

    def to_map(self) -> dict[str, Any]:
        return {"agents": self.agents, "capability": list(self.capabilities), "name": self.name}

    @classmethod
    def from_map(cls, document: dict[str, Any]) -> StatusUntil:
        """Read an ``until`` map (``capability`` may be one string or a list).

        Raises:
            ValueError: a value of the wrong type.
        """
        count = document.get("agents", 1)
        caps = document.get("capability") or document.get("capabilities") or ()
        if isinstance(caps, str):
            caps = (caps,)
        name = document.get("name")
        if type(count) is not int or not isinstance(caps, (list, tuple)) or \
                not all(isinstance(c, str) for c in caps) or \
                not (name is None or isinstance(name, str)):
            raise ValueError("until needs an integer 'agents', string capabilities and a "
                             "string 'name'")
        return cls(count, tuple(sorted(caps)), name)


class ErrorDocument(TypedDict):
    code: str
    message: str


class TimelineEvent(TypedDict):
    #: wall-clock time (seconds since the epoch)
    at: float
    event: str
    detail: str


class TaskDocument(TypedDict, total=False):
    """One task as TASKS and ``trace`` list it (``children`` only in a trace)."""

    task_id: str
    status: str
    error: ErrorDocument | None
    agent: str | None
    attempts: int
    capabilities: list[str]
    parent_id: str | None
    finished_at: float | None
    timeline: list[TimelineEvent]
    children: list[TaskDocument]


class AgentDocument(TypedDict):
    """One registered agent in the status document."""

    id: str
    name: str
    capabilities: list[str]
    #: ``ready``, ``draining`` or ``dead``
    state: str
    #: ``closed``, ``open`` or ``half_open``
    circuit: str
    #: ``healthy``, ``unresponsive`` or ``unhealthy`` (the broker's health checks)
    health: str
    #: why it is not healthy, one line (None while healthy)
    health_detail: str | None
    in_flight: int
    max_concurrent: int
    done: int
    failed: int
    #: tasks it failed that then succeeded on another agent
    failed_for_peers: int
    latency_ms: float
    #: median task duration (dispatch to result) of the agents of this name, in ms,
    #: from the duration histogram (None before any task ended)
    p50_ms: NotRequired[float | None]
    messaging: dict[str, int]


class BrokerDocument(TypedDict, total=False):
    version: str
    protocol: int
    pid: int
    compiled: bool
    endpoint: str
    endpoints: Endpoints
    policy: str
    boot: str
    durability: str
    journal_bytes: int
    uptime_s: float
    #: ``running`` or ``stopping``
    state: str
    #: the timeout of a task that names none (seconds)
    default_timeout_s: float


class LimitsDocument(TypedDict, total=False):
    """The broker's limits (STATUS ``limits``, docs/limits.md). WELCOME and the answer to
    a client's HEARTBEAT carry the two size limits, the ones the SDK checks sends
    against."""

    #: largest frame any of its sockets accepts
    max_message_bytes: int
    #: largest message header it decodes
    max_header_bytes: int
    max_pending: int
    max_pending_per_client: int
    #: 0: no limit
    max_in_flight_per_client: int


class QueueDocument(TypedDict):
    pending: int
    max_pending: int
    #: pending tasks by capability set (sorted, comma-joined; "" for tasks that ask for
    #: none)
    by_capability: dict[str, int]


class StatusDocument(TypedDict, total=False):
    """What STATUS answers (``orchestrator status --json`` prints it)."""

    broker: BrokerDocument
    agents: list[AgentDocument]
    queue: QueueDocument
    #: task counts: submitted, pending, in_flight, running, retrying, one per final
    #: state, retried, redispatched, lease_expired, lost_answers, duplicate_results,
    #: retained_results, restored_open, restored_results
    tasks: dict[str, int]
    messages: dict[str, int]
    errors: dict[str, int]
    messaging: dict[str, Any]
    limits: LimitsDocument
    #: node supervisors: id, host, cpus, memory_bytes, load, state (live, lost),
    #: last_seen_s, catalogue, running, planned, failing (``broker/engine/nodes.py``)
    nodes: list[dict[str, Any]]
    #: agent pools by name: desired (None: not scaled), running, nodes, failing
    pools: dict[str, dict[str, Any]]
    #: in a reply to a request with ``until``: whether enough agents matched
    met: bool
