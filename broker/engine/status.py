"""STATUS and task queries: the documents ``orchestrator status``, ``tasks`` and
``trace`` print, and STATUS requests that wait ``until`` enough agents are there."""

from __future__ import annotations

import heapq
from bisect import bisect_left
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Final

from broker.engine.ledger import Ledger
from broker.engine.model import Requirement, TaskRecord, TaskState
from broker.engine.quotas import limits_document
from wire.documents import AgentDocument, BrokerDocument, StatusDocument, StatusUntil, TaskDocument
from wire.tasks import ErrorCode, StatusReply, StatusRequest, TaskList, TaskQuery, encode

#: How deep ``trace`` follows subtasks.
TRACE_DEPTH: Final = 8
_ENDED_STATES: Final = (TaskState.SUCCEEDED, TaskState.FAILED, TaskState.TIMED_OUT,
                        TaskState.CANCELLED)
#: the statuses a finished task can have (``rejected`` too: a refused resubmit)
_ENDED_VALUES: Final = frozenset(s.value for s in _ENDED_STATES) | {"rejected"}


#: Upper bounds (seconds) of the task duration histogram's buckets, dispatch to end of the
#: last attempt; a last, unbounded bucket (+Inf) follows. Fixed, so that the engine keeps
#: plain counts and the metrics endpoint builds the histogram when scraped.
DURATION_BUCKETS_S: Final = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                             5.0, 10.0, 30.0, 60.0, 300.0)


def capability_label(capabilities: tuple[str, ...] | list[str]) -> str:
    """A task's capability set as one label value (metrics, the status queue): sorted,
    comma-joined ("" for none)."""
    return ",".join(sorted(capabilities))


class TaskStats:
    """Plain counters of the tasks one agent name ran for one capability set.

    A slotted class with integers only: it is updated on the per-task path, and read
    (copied) by the metrics endpoint's thread when scraped (``broker/metrics.py``).
    """

    __slots__ = ("buckets", "completed", "duration_sum_s", "failed", "retried", "started")

    def __init__(self) -> None:
        self.started = 0
        self.completed = 0
        self.retried = 0
        #: error code -> tasks that ended with it (failed, timed out, cancelled)
        self.failed: dict[str, int] = {}
        #: per-bucket (not cumulative) counts; index len(DURATION_BUCKETS_S) is +Inf
        self.buckets: list[int] = [0] * (len(DURATION_BUCKETS_S) + 1)
        self.duration_sum_s = 0.0


class TaskMetrics:
    """The engine's task counters by (agent name, capabilities), kept for the broker's
    life (they outlive the agents: Prometheus counters never go down)."""

    def __init__(self) -> None:
        self.by_key: dict[tuple[str, tuple[str, ...]], TaskStats] = {}

    def stats(self, name: str, capabilities: tuple[str, ...]) -> TaskStats:
        key = (name, capabilities)
        stats = self.by_key.get(key)
        if stats is None:
            stats = self.by_key[key] = TaskStats()
        return stats

    def ended(self, name: str, capabilities: tuple[str, ...], code: str | None,
              duration_s: float) -> None:
        """A task ended: ``code`` None for success; ``duration_s`` < 0 if it never ran."""
        stats = self.stats(name, capabilities)
        if code is None:
            stats.completed += 1
        else:
            stats.failed[code] = stats.failed.get(code, 0) + 1
        if duration_s >= 0.0:
            stats.buckets[bisect_left(DURATION_BUCKETS_S, duration_s)] += 1
            stats.duration_sum_s += duration_s

    def median_s(self, name: str) -> float | None:
        """The median task duration of the agents called ``name``, read off the
        histogram as Prometheus' ``histogram_quantile`` does (linear within the bucket
        it falls in); None before any of their tasks ran."""
        counts = [0] * (len(DURATION_BUCKETS_S) + 1)
        for (agent_name, _), stats in self.by_key.items():
            if agent_name == name:
                counts = [a + b for a, b in zip(counts, stats.buckets)]
        total = sum(counts)
        if not total:
            return None
        rank = total / 2
        seen = 0
        for index, count in enumerate(counts):
            if count and seen + count >= rank:
                if index == len(DURATION_BUCKETS_S):
                    return DURATION_BUCKETS_S[-1]  # beyond the last bound: its lower edge
                lower = DURATION_BUCKETS_S[index - 1] if index else 0.0
                return lower + (DURATION_BUCKETS_S[index] - lower) * (rank - seen) / count
            seen += count
        return None


@dataclass(slots=True)
class StatusWaiter:
    """A STATUS request with ``until``: answered when enough agents match or at deadline."""

    identity: bytes
    req: int
    requirement: Requirement
    count: int
    deadline: float


def _submitted_at(task: TaskRecord) -> float:
    return task.submitted_at


def no_extras() -> dict[str, Any]:
    return {}


class StatusDesk:
    """Answers STATUS and task queries.

    Args:
        ledger: the engine's books.
        metrics: the task counters (for each agent's median duration).
    """

    def __init__(self, ledger: Ledger, metrics: TaskMetrics) -> None:
        self.ledger = ledger
        self.metrics = metrics
        self.waiters: list[StatusWaiter] = []
        #: the parts of the status document the engine cannot know (endpoint, process,
        #: journal, socket counters, bus), merged in by the broker that runs it
        self.extras: Callable[[], dict[str, Any]] = no_extras
        #: the ``nodes`` and ``pools`` sections (``NodeDesk.document``), set by the engine
        self.pools: Callable[[float], dict[str, Any]] = lambda now: {}

    # ------------------------------------------------------------ STATUS

    def request(self, identity: bytes, msg: StatusRequest, now: float) -> None:
        until = msg.until
        if not until:
            self.ledger.outbox(identity).control.append(
                encode(StatusReply(msg.req, self.document(now))))
            return
        try:
            wanted = StatusUntil.from_map(until)
        except ValueError as e:
            self.ledger.reject(identity, ErrorCode.BAD_FRAME, str(e), req=msg.req)
            return
        requirement = self.ledger.requirements.get(wanted.capabilities, wanted.name)
        waiter = StatusWaiter(identity, msg.req, requirement, wanted.agents,
                              now + max(0.0, msg.timeout_s))
        if not self._answer(waiter, False, now):
            self.waiters.append(waiter)

    def agents_changed(self, now: float) -> None:
        """Agents came: answer the waiters they satisfy."""
        if self.waiters:
            self.waiters = [w for w in self.waiters if not self._answer(w, False, now)]

    def tick(self, now: float) -> None:
        """Answer the waiters whose deadline passed, met or not."""
        if self.waiters:
            self.waiters = [w for w in self.waiters
                            if not self._answer(w, now >= w.deadline, now)]

    def _answer(self, waiter: StatusWaiter, force: bool, now: float) -> bool:
        met = len(self.ledger.agents.eligible(waiter.requirement)) >= waiter.count
        if not (met or force):
            return False
        status = self.document(now)
        status["met"] = met
        self.ledger.outbox(waiter.identity).control.append(
            encode(StatusReply(waiter.req, status)))
        return True

    def document(self, now: float) -> StatusDocument:
        """A snapshot of the broker (the document ``orchestrator status`` prints)."""
        ledger = self.ledger
        counters = ledger.counters
        states = Counter(t.state.value for t in ledger.tasks.values())
        extras = self.extras()
        broker: BrokerDocument = {
            "policy": ledger.policy.name,
            "uptime_s": round(now - ledger.started_at, 3),
            "state": ledger.phase.value,
            "default_timeout_s": ledger.config.default_timeout_s,
        }
        broker.update(extras.pop("broker", {}))  # type: ignore[typeddict-item]
        document: StatusDocument = {
            "broker": broker,
            "agents": self.agents(now),
            "queue": {"pending": ledger.pending.count, "max_pending": ledger.config.max_pending,
                      "by_capability": self.queue_by_capability()},
            "limits": limits_document(ledger.config),
            "tasks": {
                "submitted": counters["submitted"], "pending": ledger.pending.count,
                "in_flight": states["dispatched"] + states["running"],
                "running": states["running"], "retrying": states["retrying"],
                **{s.value: counters[s.value] for s in _ENDED_STATES},
                **{name: counters[name] for name in (
                    "retried", "redispatched", "lease_expired", "lost_answers",
                    "duplicate_results", "handed_back")},
                "retained_results": len(ledger.finished),
                "restored_open": counters["restored_open"],
                "restored_results": counters["restored_results"],
            },
            "errors": dict(ledger.errors),
        }
        # The storage section is the engine's (the journal port); the broker's own
        # sections come from the process.
        document.update({"storage": self.storage(), **self.pools(now),  # type: ignore[typeddict-item]
                         **extras})
        return document

    def agents(self, now: float) -> list[AgentDocument]:
        """Each agent's document, with the median duration of its name's tasks."""
        medians: dict[str, float | None] = {}
        documents = []
        for agent in self.ledger.agents:
            document = agent.describe(now)
            if agent.name not in medians:
                median = self.metrics.median_s(agent.name)
                medians[agent.name] = None if median is None else round(median * 1000.0, 3)
            document["p50_ms"] = medians[agent.name]
            documents.append(document)
        return documents

    def queue_by_capability(self) -> dict[str, int]:
        """Waiting tasks by capability set (sorted, comma-joined; "" for none)."""
        depth: Counter[str] = Counter()
        for task in self.ledger.tasks.values():
            if task.state is TaskState.PENDING:
                depth[capability_label(task.spec.capabilities)] += 1
        return dict(depth)

    def storage(self) -> dict[str, Any]:
        """Whether the journal writes: ``state`` ``ok``, or ``full`` with the error's
        ``message``, ``since`` (wall clock) and the tasks refused meanwhile. A failed
        journal is asked to write again first, so that freed space shows at once."""
        ledger = self.ledger
        journal = ledger.journal
        failure = journal.retry() if journal.failure is not None else None
        return {
            "state": "ok" if failure is None else "full",
            "data_dir": str(ledger.config.data_dir),
            "message": None if failure is None else failure.message,
            "since": None if failure is None else round(failure.since, 3),
            "refused_tasks": ledger.counters["storage_refused"],
        }

    # ------------------------------------------------------------ task queries

    def query(self, identity: bytes, msg: TaskQuery, scope: str = "") -> None:
        """TASKS: given ids with their subtask trees, or a listing: the open tasks
        (pending, dispatched, running, retrying; newest submitted first), then the
        finished ones the broker retains (newest finished first), up to ``limit``.
        ``statuses`` filters by state (``failed``, ``timed_out``: the dead letters);
        ``scope`` (a secure broker's non-admin asking) to the ids that start with it."""
        listed: list[TaskDocument]
        if msg.task_ids is not None:
            listed = [self._describe(task_id, depth=0) for task_id in msg.task_ids]
        else:
            listed = [self.task_document(task)
                      for task in self.listing(set(msg.statuses or ()), msg.limit, scope)]
        self.ledger.outbox(identity).control.append(encode(TaskList(msg.req, listed)))

    def listing(self, wanted: set[str], limit: int, scope: str = "") -> list[TaskRecord]:
        """Up to ``limit`` tasks whose state is in ``wanted`` (any, if empty) and whose id
        starts with ``scope``: the open ones newest submitted first, then the retained
        finished ones newest first."""
        open_tasks = (t for t in self.ledger.tasks.values()
                      if t.open and (not wanted or t.state.value in wanted)
                      and t.spec.id.startswith(scope))
        listed = heapq.nlargest(limit, open_tasks, key=_submitted_at)
        if not wanted or not wanted.isdisjoint(_ENDED_VALUES):
            for task in self.ledger.finished.newest_first():
                if len(listed) >= limit:
                    break
                result = task.result
                if result is None or (wanted and result.status not in wanted) or \
                        not task.spec.id.startswith(scope):
                    continue
                listed.append(task)
        return listed

    def task_document(self, task: TaskRecord) -> TaskDocument:
        result = task.result
        wall_offset = self.ledger.wall_offset
        return {
            "task_id": task.spec.id, "status": task.state.value,
            "error": None if result is None or result.error_code is None
            else {"code": result.error_code, "message": result.error_message or ""},
            "agent": result.agent if result is not None
            else (task.agent.name if task.agent is not None else None),
            "attempts": task.attempts, "capabilities": list(task.spec.capabilities),
            "parent_id": task.spec.parent_id,
            "finished_at": round(task.finished_at + wall_offset, 6)
            if task.finished_at else None,
            "timeline": task.timeline(wall_offset),
        }

    def _describe(self, task_id: str, depth: int) -> TaskDocument:
        """A task's document with its subtask tree (for ``orchestrator trace``)."""
        task = self.ledger.task_or_result(task_id)
        if task is None:
            return {"task_id": task_id, "status": "unknown", "children": []}
        document = self.task_document(task)
        children = task.children or []
        document["children"] = [self._describe(child, depth + 1) for child in children] \
            if depth < TRACE_DEPTH else [{"task_id": c, "status": "..."} for c in children]
        return document
