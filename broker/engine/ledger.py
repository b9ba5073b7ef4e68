"""What the engine's parts share: the task and agent books, the outboxes of this pass,
the counters, and the hooks to the outside (journal, events).

The parts (``lifecycle``, ``clients``, ``agents``, ``direct``, ``status``) each hold the
one :class:`Ledger` of their engine; none of them holds a socket, a file or a clock.
"""

from __future__ import annotations

import enum
from collections import Counter, deque
from collections.abc import Sequence
from typing import Any, Protocol

from broker.config import BrokerConfig
from broker.engine.circuit import RetryBackoff
from broker.engine.model import TaskRecord
from broker.engine.pending import PendingQueue
from broker.engine.queues import Deadlines, FinishedResults
from broker.engine.quotas import ClientQuotas
from broker.engine.routing import AgentTable, Requirements, make_policy
from broker.journal import JournalFailure
from wire.tasks import Error, ErrorCode, ResultItem, TaskSpec, encode


class JournalSink(Protocol):
    """Where the engine records what it accepted and finished (``broker.journal``); the
    broker's loop commits the records before anybody hears of them.

    A write that fails leaves ``failure`` set until one succeeds: the engine accepts no
    new task meanwhile (``storage_full``), and asks for ``retry`` before it refuses one.
    """

    #: why the last write failed; None while writes succeed
    failure: JournalFailure | None

    def accepted(self, spec: TaskSpec, client: bytes, wall: float) -> None: ...

    def finished_inline(self, result: ResultItem, wall: float) -> None:
        """Record a final result with its payload in the journal itself (the result
        store could not write it)."""

    def finished(self, result: ResultItem, wall: float) -> bool | None:
        """Record a final result. True: its payload went to the result store, and its
        RESULT waits until the store wrote it (``broker/results.py``)."""
        ...

    def released(self, task_ids: list[str]) -> None:
        """Record that the held results of ``task_ids`` may go."""

    def held_by_key(self, task_id: str, scope: str) -> None:
        """Record that an agent of the key with ``scope`` holds an attempt of the task
        (a ``--secure`` broker: after a restart, only that key may answer for it)."""

    def retry(self) -> JournalFailure | None:
        """Write again what a failed write left; the failure that remains, or None."""
        ...


class EventSink(Protocol):
    """Where the engine publishes task and agent events (the bus, when one runs)."""

    def task_changed(self, task_id: str, state: str, attempt: int, agent: str | None,
                     at: float, final: bool) -> None: ...

    def agent_joined(self, agent_id: str, name: str, capabilities: list[str]) -> None: ...

    def agent_left(self, agent_id: str, name: str, capabilities: list[str],
                   reason: str) -> None: ...

    def agent_health(self, agent_id: str, name: str, capabilities: list[str], health: str,
                     detail: str | None) -> None: ...

    def agent_circuit(self, agent_id: str, name: str, capabilities: list[str],
                      circuit: str) -> None: ...

    def peer_refused(self, peer: str, reason: str) -> None: ...

    def pool_changed(self, event: str, node: str, fields: dict[str, Any]) -> None:
        """A node joined, was lost or came back, an agent was scaled, or a node gave up
        on an agent (a crash loop)."""


class SpanSink(Protocol):
    """Where the broker's spans of traced tasks go (``broker/tracing.py``): called once
    a task that carried a traceparent ends, with its timeline."""

    def task_ended(self, traceparent: str, task_id: str, capabilities: Sequence[str],
                   timeline: Sequence[Any], status: str, error_code: str | None,
                   attempts: int) -> None: ...


class NoSpans:
    """The span sink of a broker that does not trace: traceparents only pass through
    (to the agents), and nothing is recorded here."""

    def task_ended(self, traceparent: str, task_id: str, capabilities: Sequence[str],
                   timeline: Sequence[Any], status: str, error_code: str | None,
                   attempts: int) -> None:
        return None


class NoEvents:
    """The event sink of a broker without a bus: every event goes nowhere."""

    def task_changed(self, task_id: str, state: str, attempt: int, agent: str | None,
                     at: float, final: bool) -> None:
        return None

    def agent_joined(self, agent_id: str, name: str, capabilities: list[str]) -> None:
        return None

    def agent_left(self, agent_id: str, name: str, capabilities: list[str],
                   reason: str) -> None:
        return None

    def agent_health(self, agent_id: str, name: str, capabilities: list[str], health: str,
                     detail: str | None) -> None:
        return None

    def agent_circuit(self, agent_id: str, name: str, capabilities: list[str],
                      circuit: str) -> None:
        return None

    def peer_refused(self, peer: str, reason: str) -> None:
        return None

    def pool_changed(self, event: str, node: str, fields: dict[str, Any]) -> None:
        return None


class NoJournal:
    """The journal sink of an engine that keeps nothing (tests)."""

    failure: JournalFailure | None = None

    def accepted(self, spec: TaskSpec, client: bytes, wall: float) -> None:
        return None

    def finished(self, result: ResultItem, wall: float) -> bool | None:
        return None

    def finished_inline(self, result: ResultItem, wall: float) -> None:
        return None

    def released(self, task_ids: list[str]) -> None:
        return None

    def held_by_key(self, task_id: str, scope: str) -> None:
        return None

    def retry(self) -> JournalFailure | None:
        return self.failure


class BrokerPhase(enum.Enum):
    """Where the broker is in its own life."""

    RUNNING = "running"
    #: a graceful stop began: no new tasks, no retries; in-flight work drains
    STOPPING = "stopping"
    #: the drain is over (or timed out); the loop ends after this pass
    STOPPED = "stopped"


class Outbox:
    """What one peer will be sent at the end of this pass, batched per command.

    A plain class, not a dataclass: one is made per peer per pass, and a dataclass's
    ``__init__`` stays interpreted (with a call per default factory) when compiled."""

    __slots__ = ("first", "assignments", "results", "accepted", "acks", "cancels", "control")

    def __init__(self) -> None:
        #: already-encoded messages that must precede this pass's work (WELCOME: an agent
        #: must know it is registered before it runs a task, or it resends its results)
        self.first: list[list[Any]] = []
        self.assignments: list[Any] = []
        self.results: list[ResultItem] = []
        self.accepted: list[str] = []
        self.acks: list[str] = []
        self.cancels: list[str] = []
        #: already-encoded control messages (errors, status replies, heartbeats), in order
        self.control: list[list[Any]] = []


class Ledger:
    """The engine's books, shared by its parts.

    Args:
        config: the broker's tunables.
        journal: records accepted and finished tasks.
        now: the clock reading the engine starts at.
        wall_offset: add to a clock reading to get wall-clock time (journal, timelines).
        boot_id: this start's id, told to agents and clients.
    """

    def __init__(self, config: BrokerConfig, journal: JournalSink, now: float,
                 wall_offset: float, boot_id: str) -> None:
        self.config = config
        #: a new id per start: clients that see it change send again what they had open
        self.boot_id = boot_id
        #: other components' endpoints handed to agents at registration (bus, state)
        self.endpoints: dict[str, str] = {}
        self.journal = journal
        self.events: EventSink = NoEvents()
        #: the broker's spans of traced tasks (tracing on: broker/tracing.py)
        self.spans: SpanSink = NoSpans()
        #: somebody subscribes to task events: state changes get published. Hot paths
        #: test this one attribute, so that task events cost nothing while nobody listens.
        self.watch_tasks = False
        self.wall_offset = wall_offset
        self.started_at = now
        self.policy = make_policy(config.policy)
        self.backoff = RetryBackoff(config.default_max_retries, config.retry_base_delay_s,
                                    config.retry_max_delay_s)
        self.agents = AgentTable()
        self.requirements = Requirements()
        self.tasks: dict[str, TaskRecord] = {}
        #: per-client limits: unfinished tasks, and tasks on agents at once
        self.quotas = ClientQuotas(config.max_pending_per_client,
                                   config.max_in_flight_per_client)
        self.pending = PendingQueue(self.quotas)
        self.finished = FinishedResults(config.result_retention_max, config.result_retention_s,
                                        config.result_retention_bytes)
        self.deadlines = Deadlines()
        #: tasks waiting out a retry back-off
        self.retrying: deque[TaskRecord] = deque()
        self.outboxes: dict[bytes, Outbox] = {}
        #: results whose large payload the store is writing: the agent to ACK once written
        self.acks_after_write: dict[str, bytes] = {}
        self.counters: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        #: open tasks survive a stop (the journal keeps them): durability is not "none"
        self.journal_kept = config.durability != "none"
        self.phase = BrokerPhase.RUNNING
        #: when the graceful stop began (phase STOPPING): no new tasks, no retries
        self.stopping_since: float | None = None
        #: messages in this pass's drain (a drain stops after a batch's worth)
        self.items_this_pass = 0

    def outbox(self, identity: bytes) -> Outbox:
        box = self.outboxes.get(identity)
        if box is None:
            box = self.outboxes[identity] = Outbox()
        return box

    def reject(self, identity: bytes, code: str | ErrorCode, message: str,
               req: int | None = None, task_ids: list[str] | None = None) -> None:
        """Answer ``identity`` with ERROR ``code``, counted by code."""
        code = code.value if isinstance(code, ErrorCode) else code
        self.errors[code] += 1
        self.outbox(identity).control.append(encode(Error(code, message, req, task_ids or [])))

    def max_retries(self, task: TaskRecord) -> int:
        retries = task.spec.max_retries
        return self.backoff.max_retries if retries is None else retries

    def task_or_result(self, task_id: str) -> TaskRecord | None:
        """An open task, or a finished one still retained."""
        return self.tasks.get(task_id) or self.finished.get(task_id)
