"""Tasks waiting for an agent: the queue dispatch takes from, shared fairly between
clients, each client within its in-flight limit (``quotas.py``)."""

from __future__ import annotations

from collections import deque

from broker.engine.model import Requirement, TaskRecord, TaskState
from broker.engine.quotas import ClientQuotas


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

    A client at its in-flight limit (``quotas.max_in_flight``: that many of its tasks
    on agents) is skipped: its tasks stay queued, in order, until one of its tasks
    leaves its agent, and the others' tasks take the free slots meanwhile.

    Removal is lazy: a cancelled or expired task keeps its slot until a pop skips it
    (its state is no longer PENDING), so cancel and timeout cost O(1).

    Args:
        quotas: the per-client limits; None (or no in-flight limit in it): none apply.
    """

    def __init__(self, quotas: ClientQuotas | None = None) -> None:
        #: the per-client in-flight counts, or None when no in-flight limit applies (the
        #: take paths then test one attribute)
        self._quotas = quotas if quotas is not None and quotas.max_in_flight else None
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
            if self._quotas is not None:
                limit = min(limit, self._quotas.room(client))
                if limit <= 0:
                    return []  # at its in-flight limit: its tasks wait, in order
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
        ``limit`` or until none has any left (or room under its in-flight limit)."""
        served = self._served
        taken: list[TaskRecord] = []
        quotas = self._quotas
        # Room under each client's in-flight limit, counted down as this call takes
        # (the tasks taken reach their agents only after it returns).
        room = {c: quotas.room(c) for c in clients} if quotas is not None else None
        while len(taken) < limit and clients:
            before = len(taken)
            for client in sorted(clients, key=lambda c: served.get(c, -1)):
                if len(taken) >= limit:
                    break
                if room is not None:
                    if room[client] <= 0:
                        continue
                    room[client] -= 1
                levels = clients[client]
                taken.extend(_take_levels(levels, 1))
                self._turns += 1
                served[client] = self._turns
                if not levels:
                    del clients[client]
            if room is not None and len(taken) == before:
                break  # the clients left are at their limits: their tasks wait
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


_PENDING = TaskState.PENDING
