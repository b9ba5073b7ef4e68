"""The engine's queues: finished results kept for FETCH and idempotent resubmits, and
the deadlines of open tasks (tasks waiting for an agent: ``pending.py``)."""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict, deque
from typing import Any, Callable, ClassVar, NamedTuple

from broker.engine.model import OPEN_STATES, TaskRecord, TaskState
# The queue of waiting tasks lives in pending.py; kept importable from here.
from broker.engine.pending import PendingQueue as PendingQueue  # noqa: F401
from wire.tasks import ResultItem, Withheld


def is_stored(payload: object) -> bool:
    """Whether a result's payload is a :class:`StoredPayload` (the only two-element tuple
    a payload can be). By shape, not class: with the compiled build, a module that
    imported the class while the engine's modules loaded may hold another copy of it."""
    return type(payload) is not bytes and isinstance(payload, tuple) and len(payload) == 2


class StoredPayload(NamedTuple):
    """A retained result's payload kept in the result store (``broker/results.py``), not
    in memory: the file's key and size. FETCH loads it through
    :attr:`FinishedResults.load`."""

    key: str
    size: int


class FinishedResults:
    """Finished tasks kept for FETCH and idempotent resubmits: newest ``max_count``,
    none older than ``max_age_s``, at most ``max_bytes`` of payloads in memory and
    ``max_stored_bytes`` in the result store.

    A payload of at least ``large_bytes`` is on its way to the result store (the journal
    hands it over): it is not counted in memory, and :meth:`stored` swaps it for its
    :class:`StoredPayload` once written. Without a store, ``large_bytes`` is infinite and
    every payload counts.

    A held result (SUBMIT's ``hold``: a workflow step's, until its run checkpointed it)
    is kept apart, outside every limit, until :meth:`release` names it; then it is
    retained as any other, as the newest.
    """

    def __init__(self, max_count: int, max_age_s: float, max_bytes: int = 1 << 62,
                 max_stored_bytes: int = 1 << 62, large_bytes: float = float("inf")) -> None:
        self.max_count = max_count
        self.max_age_s = max_age_s
        self.max_bytes = max_bytes
        self.max_stored_bytes = max_stored_bytes
        self.large_bytes = large_bytes
        self._tasks: OrderedDict[str, TaskRecord] = OrderedDict()
        #: bytes of retained payloads in memory, and in the store
        self.bytes = 0
        self.stored_bytes = 0
        #: retained results whose payload is in the store, oldest first
        self._stored: OrderedDict[str, StoredPayload] = OrderedDict()
        #: tasks whose large payload the store is writing (their RESULT waits for it)
        self.writing: dict[str, TaskRecord] = {}
        #: held results, outside the limits until released
        self.held: dict[str, TaskRecord] = {}
        #: the result store's ports (set by the server): a payload's bytes, and removal
        self.load: Callable[[StoredPayload], Any] | None = None
        self.delete: Callable[[StoredPayload], None] | None = None

    def __len__(self) -> int:
        return len(self._tasks) + len(self.held)

    def __contains__(self, task_id: str) -> bool:
        return task_id in self._tasks or task_id in self.held

    def get(self, task_id: str) -> TaskRecord | None:
        task = self._tasks.get(task_id)
        if task is None and self.held:
            return self.held.get(task_id)
        return task

    def add(self, task: TaskRecord) -> None:
        if task.spec[9]:  # hold
            self.held[task.spec.id] = task
            result = task.result
            if result is not None and not is_stored(result[2]) and \
                    len(result[2]) >= self.large_bytes:
                self.writing[task.spec.id] = task
            return
        self._retain(task)

    def release(self, task_ids: list[str]) -> list[str]:
        """The held results of ``task_ids`` fall under the limits again; returns the ids
        that were held (the others are ignored: unknown, or released already)."""
        released = []
        for task_id in task_ids:
            task = self.held.pop(task_id, None)
            if task is not None:
                task.spec = task.spec._replace(hold=False)
                released.append(task_id)
                self._retain(task)
        return released

    def _retain(self, task: TaskRecord) -> None:
        tasks = self._tasks
        tasks[task.spec.id] = task
        result = task.result
        if result is not None:
            payload = result[2]
            if is_stored(payload):  # restored from the journal
                self._stored[task.spec.id] = payload
                self.stored_bytes += payload.size
                self._trim_stored()
            else:
                size = len(payload)
                if size < self.large_bytes:
                    self.bytes += size
                    if self.bytes > self.max_bytes:
                        self._trim_bytes()
                else:
                    self.writing[task.spec.id] = task
        if len(tasks) > self.max_count:
            self._drop(tasks.popitem(last=False)[1])

    def stored(self, task: TaskRecord, result: ResultItem) -> None:
        """``task``'s payload is in the store now: keep ``result`` (its reference)."""
        task.result = result
        if task.spec[9]:  # held: outside the limits
            return
        ref: StoredPayload = result[2]
        self._stored[task.spec.id] = ref
        self.stored_bytes += ref.size
        self._trim_stored()

    def outgoing(self, result: ResultItem) -> ResultItem:
        """``result`` as a client gets it: a stored payload stays in the store, and the
        client reads it in ranges (:meth:`read`)."""
        payload = result[2]
        if not is_stored(payload):
            return result
        return result._replace(payload=Withheld(payload.size))

    def read(self, task_id: str, offset: int, length: int) -> tuple[int, Any] | None:
        """``length`` bytes from ``offset`` of a retained result's payload, and its whole
        size; None when no such result is retained. A stored payload is mapped, not read:
        the range goes out from the page cache."""
        task = self.get(task_id)
        if task is None or task.result is None:
            return None
        payload = task.result[2]
        if is_stored(payload):
            if self.load is None:
                return None
            total = payload.size
            try:
                payload = self.load(payload)
            except OSError:
                return None  # the file went (removed by hand, a full disk's cleanup)
        else:
            total = len(payload)
        if offset >= total:
            return total, b""
        return total, memoryview(payload)[offset:offset + length]

    def forget_payload(self, task: TaskRecord, result: ResultItem) -> None:
        """Retain ``result`` (``task``'s own, without its payload: a PURGE) in place of
        ``task``'s result: the old payload leaves the counts, and its file the store."""
        self._drop(task)
        task.result = result

    def _drop(self, task: TaskRecord) -> None:
        """Account for ``task`` leaving the table."""
        result = task.result
        if result is None:
            return
        payload = result[2]
        if is_stored(payload):
            if self._stored.pop(task.spec.id, None) is not None:
                self.stored_bytes -= payload.size
                if self.delete is not None:
                    self.delete(payload)
        else:
            size = len(payload)
            if size < self.large_bytes:
                self.bytes -= size

    def _trim_bytes(self) -> None:
        tasks = self._tasks
        while self.bytes > self.max_bytes and len(tasks) > 1:
            self._drop(tasks.popitem(last=False)[1])

    def _trim_stored(self) -> None:
        while self.stored_bytes > self.max_stored_bytes and len(self._stored) > 1:
            task_id = next(iter(self._stored))
            task = self._tasks.pop(task_id, None)
            if task is None:  # cannot happen: _drop keeps both in step
                self._stored.pop(task_id)
                continue
            self._drop(task)

    def stored_keys(self) -> set[str]:
        """The store files some retained result names (held ones included)."""
        keys = {ref.key for ref in self._stored.values()}
        for task in self.held.values():
            payload = task.result[2] if task.result is not None else None
            if is_stored(payload):
                keys.add(str(payload[0]))  # type: ignore[index]
        return keys

    def newest_first(self) -> list[TaskRecord]:
        """Every retained result, the held ones first."""
        return [*self.held.values(), *reversed(self._tasks.values())]

    def expire(self, now: float) -> int:
        """Drop results older than the retention age; returns how many went."""
        dropped = 0
        tasks = self._tasks
        while tasks:
            oldest = next(iter(tasks.values()))
            if now - oldest.finished_at <= self.max_age_s:
                break
            self._drop(tasks.popitem(last=False)[1])
            dropped += 1
        return dropped


class Deadlines:
    """When each open task's current wait or attempt must end.

    Entries with the same timeout are added in time order, so each distinct timeout gets
    a FIFO "lane": adding is an append, and entries of finished tasks fall off the front
    as soon as they get there. A lane thus holds tasks from its oldest unfinished one on,
    instead of every task until its deadline (a heap with lazy deletion keeps every record
    of the last ``timeout`` seconds alive). A task whose deadline moved (a new attempt)
    is added again; its old entry is recognised as stale by its deadline. Past
    :data:`MAX_LANES` distinct timeouts the rest go to a heap.
    """

    #: distinct timeouts that get a lane of their own
    MAX_LANES: ClassVar[int] = 64

    def __init__(self) -> None:
        self._lanes: dict[float, deque[tuple[float, TaskRecord]]] = {}
        self._heap: list[tuple[float, int, TaskRecord]] = []
        self._sequence = itertools.count()

    def add(self, task: TaskRecord, timeout_s: float) -> None:
        """Track ``task.deadline`` (set it first)."""
        lane = self._lanes.get(timeout_s)
        if lane is None:
            if len(self._lanes) >= self.MAX_LANES:
                heapq.heappush(self._heap, (task.deadline, next(self._sequence), task))
                return
            lane = self._lanes[timeout_s] = deque()
        lane.append((task.deadline, task))

    def add_unordered(self, task: TaskRecord) -> None:
        """Track ``task.deadline`` where it may come before deadlines added earlier (a
        task with a per-attempt limit: each attempt's deadline is the earlier of its limit
        and the task's deadline), in the heap."""
        heapq.heappush(self._heap, (task.deadline, next(self._sequence), task))

    @staticmethod
    def _live(deadline: float, task: TaskRecord) -> bool:
        return task.deadline == deadline and task.state in OPEN_STATES

    def _trim(self) -> None:
        """Drop entries of finished tasks and stale deadlines from the fronts."""
        live = self._live
        empty = []
        for timeout_s, lane in self._lanes.items():
            while lane and not live(*lane[0]):
                lane.popleft()
            if not lane:
                empty.append(timeout_s)
        for timeout_s in empty:
            del self._lanes[timeout_s]
        heap = self._heap
        while heap and not live(heap[0][0], heap[0][2]):
            heapq.heappop(heap)

    def next_deadline(self) -> float | None:
        """The earliest deadline of an open task, or None."""
        self._trim()
        earliest = self._heap[0][0] if self._heap else None
        for lane in self._lanes.values():
            deadline = lane[0][0]
            if earliest is None or deadline < earliest:
                earliest = deadline
        return earliest

    def pop_expired(self, now: float) -> list[TaskRecord]:
        """Open tasks whose current deadline is at or before ``now``."""
        live = self._live
        expired: dict[int, TaskRecord] = {}
        # A task requeued and dispatched again in one pass has two entries with the same
        # deadline: report it once.
        for lane in self._lanes.values():
            popleft = lane.popleft
            while lane:
                deadline, task = lane[0]
                if live(deadline, task):
                    if deadline > now:
                        break
                    expired[id(task)] = task
                popleft()
        heap = self._heap
        while heap and (heap[0][0] <= now or not live(heap[0][0], heap[0][2])):
            deadline, _, task = heapq.heappop(heap)
            if live(deadline, task):
                expired[id(task)] = task
        return list(expired.values())

    def __len__(self) -> int:
        return sum(len(lane) for lane in self._lanes.values()) + len(self._heap)


_PENDING = TaskState.PENDING
