"""The engine's queues: tasks waiting for an agent, finished results kept for FETCH and
idempotent resubmits, and the deadlines of open tasks."""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict, deque
from typing import Any, Callable, ClassVar, NamedTuple

from broker.engine.model import OPEN_STATES, Requirement, TaskRecord, TaskState
from wire.tasks import ResultItem, Withheld


#: Clients whose last turn the queue remembers (each a few dozen bytes); past it, the
#: half served longest ago are forgotten (they count as never served: first in turn).
MAX_REMEMBERED_CLIENTS = 100_000
#: One client's waiting tasks of one requirement: priority -> FIFO, highest first.
Levels = dict[int, deque[TaskRecord]]


class PendingQueue:
    """Tasks waiting for an agent, grouped by requirement, then by client, then by
    priority (highest first), FIFO within a priority.

    Clients share agents: when several have tasks waiting for the same requirement, a
    dispatch pass takes from them in turn, one task each, the client served least
    recently first (priority orders a client's own tasks, not one client's against
    another's). So a client's single task waits behind another's backlog of thousands
    for at most one free slot, and the backlog still gets every other turn. A single
    client's tasks are taken as before, in one sweep.

    Removal is lazy: a cancelled or expired task keeps its slot until a pop skips it
    (its state is no longer PENDING), so cancel and timeout cost O(1).
    """

    def __init__(self) -> None:
        #: requirement -> client -> priority -> FIFO of tasks; insertion-ordered: the
        #: requirements and the clients of each take turns
        self._groups: dict[Requirement, dict[bytes, Levels]] = {}
        self.count = 0
        #: client -> when it was last given a task (a counter, not a clock): whose turn
        #: it is. Forgotten for the oldest half once it holds MAX_REMEMBERED clients.
        self._served: dict[bytes, int] = {}
        self._turns = 0

    def __len__(self) -> int:
        return self.count

    def push(self, task: TaskRecord) -> None:
        clients = self._groups.get(task.requirement)
        if clients is None:
            clients = self._groups[task.requirement] = {}
        levels = clients.get(task.client)
        if levels is None:
            levels = clients[task.client] = {}
        queue = levels.get(task.spec.priority)
        if queue is None:
            queue = levels[task.spec.priority] = deque()
            if len(levels) > 1:
                # keep levels sorted by priority, highest first
                clients[task.client] = dict(sorted(levels.items(), reverse=True))
        queue.append(task)
        self.count += 1

    def push_front(self, task: TaskRecord) -> None:
        """Requeue a task that was already dispatched once, ahead of newer work."""
        self.push(task)
        queue = self._groups[task.requirement][task.client][task.spec.priority]
        queue.rotate(1)

    def discard(self, task: TaskRecord) -> None:
        """Account for a task leaving PENDING by other means than :meth:`pop`."""
        self.count -= 1

    def requirements(self) -> list[Requirement]:
        """Requirements with waiting tasks, in the order they first had work."""
        return list(self._groups)

    def pop(self, requirement: Requirement) -> TaskRecord | None:
        """The next PENDING task for ``requirement``, or None."""
        taken = self.take(requirement, 1)
        return taken[0] if taken else None

    def take(self, requirement: Requirement, limit: int) -> list[TaskRecord]:
        """Up to ``limit`` PENDING tasks for ``requirement`` (the dispatch loop takes a
        batch per pass: one call, not one a task): with one client waiting, its tasks in
        order; with several, one from each in turn (see the class docstring)."""
        clients = self._groups.get(requirement)
        if clients is None or limit <= 0:
            return []
        if len(clients) == 1:
            client, levels = next(iter(clients.items()))
            taken = _take_levels(levels, limit)
            self._turns += 1
            self._served[client] = self._turns
            if not levels:
                del self._groups[requirement]
        else:
            taken = self._take_in_turn(clients, limit)
            if not clients:
                del self._groups[requirement]
        self.count -= len(taken)
        return taken

    def _take_in_turn(self, clients: dict[bytes, Levels], limit: int) -> list[TaskRecord]:
        """One task from each client in turn, least recently served first, until
        ``limit`` or until none has any left."""
        served = self._served
        taken: list[TaskRecord] = []
        while len(taken) < limit and clients:
            for client in sorted(clients, key=lambda c: served.get(c, -1)):
                if len(taken) >= limit:
                    break
                levels = clients[client]
                taken.extend(_take_levels(levels, 1))
                self._turns += 1
                served[client] = self._turns
                if not levels:
                    del clients[client]
        if len(served) > MAX_REMEMBERED_CLIENTS:
            for client in sorted(served, key=served.__getitem__)[:len(served) // 2]:
                del served[client]
        return taken

    def has_work(self, requirement: Requirement) -> bool:
        return requirement in self._groups


def _take_levels(levels: Levels, limit: int) -> list[TaskRecord]:
    """Up to ``limit`` PENDING tasks of one client: highest priority first, FIFO within
    a priority; emptied priorities are removed (so an empty ``levels`` is done)."""
    taken: list[TaskRecord] = []
    append = taken.append
    emptied = []
    for priority, queue in levels.items():
        popleft = queue.popleft
        while queue and len(taken) < limit:
            task = popleft()
            if task.state is _PENDING:
                append(task)
        if queue:
            break
        emptied.append(priority)
    for priority in emptied:
        del levels[priority]
    return taken


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
            if result is not None and type(result[2]) is not StoredPayload and \
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
            if type(payload) is StoredPayload:  # restored from the journal
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
        if type(payload) is not StoredPayload:
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
        if type(payload) is StoredPayload:
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

    def _drop(self, task: TaskRecord) -> None:
        """Account for ``task`` leaving the table."""
        result = task.result
        if result is None:
            return
        payload = result[2]
        if type(payload) is StoredPayload:
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
            if type(payload) is StoredPayload:
                keys.add(payload.key)
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
