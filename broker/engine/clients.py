"""Client commands: SUBMIT, FETCH and CANCEL, and the deferred ACCEPTED."""

from __future__ import annotations

from collections import deque
from typing import Final

from broker.engine.ledger import Ledger
from broker.engine.lifecycle import Lifecycle
from broker.engine.model import Requirement, TaskRecord, TaskState
from wire.limits import READ_CHUNK_BYTES
from wire.tasks import Cancel, Chunk, ErrorCode, Fetch, Read, Release, ResultItem, Submit, encode

#: How long ACCEPTED may wait to be batched (or made unnecessary by the result).
ACCEPT_DELAY_S: Final = 0.002


class ClientDesk:
    """Takes in tasks and answers for them.

    Args:
        ledger: the engine's books.
        lifecycle: ends cancelled tasks.
    """

    def __init__(self, ledger: Ledger, lifecycle: Lifecycle) -> None:
        self.ledger = ledger
        self.lifecycle = lifecycle
        #: ACCEPTED owed, per SUBMIT: (when it is due, client, task ids), oldest first
        self.accepted_due: deque[tuple[float, bytes, list[str]]] = deque()
        #: client -> when it last sent a SUBMIT or a client heartbeat (for /metrics, which
        #: counts the ones within the liveness window); pruned every window
        self.last_seen: dict[bytes, float] = {}
        self.window_s = ledger.config.heartbeat_expiry_s
        self._next_prune = 0.0

    def client_seen(self, identity: bytes, now: float) -> None:
        """A client sent a SUBMIT or a heartbeat: it counts as connected for a liveness
        window. Once per message, never per task (:meth:`submit` does the same inline)."""
        self.last_seen[identity] = now
        if now >= self._next_prune:
            self._prune(now)

    def _prune(self, now: float) -> None:
        """Forget the clients silent for a whole window (once a window)."""
        self._next_prune = now + self.window_s
        cutoff = now - self.window_s
        self.last_seen = {peer: seen for peer, seen in self.last_seen.items()
                          if seen >= cutoff}

    def submit(self, identity: bytes, msg: Submit, now: float) -> None:
        self.last_seen[identity] = now  # client_seen, inline: once per SUBMIT
        if now >= self._next_prune:
            self._prune(now)
        ledger = self.ledger
        wall = now + ledger.wall_offset
        ledger.items_this_pass += len(msg.tasks)
        accepted: list[str] = []
        full: list[str] = []
        # New tasks refused whole (a stop, a journal that cannot write); resubmits of
        # known tasks are still answered.
        refusal = self._refusal()
        refused: list[str] = []
        tasks = ledger.tasks
        default_timeout = ledger.config.default_timeout_s
        max_pending = ledger.config.max_pending
        # The client's unfinished tasks, counted here and stored once per SUBMIT.
        open_by_client = ledger.quotas.open
        client_open = open_by_client.get(identity, 0)
        max_open = ledger.quotas.max_open
        client_full: list[str] = []
        resubmitted = 0
        pending = ledger.pending
        deadlines = ledger.deadlines
        journal_accepted = ledger.journal.accepted
        watch_tasks = ledger.watch_tasks
        last_caps: tuple[str, ...] | None = None
        last_agent: str | None = None
        requirement: Requirement  # bound on the first task: last_caps starts as None
        for spec in msg.tasks:
            task_id = spec.id
            existing = ledger.task_or_result(task_id)
            if existing is not None:
                # Idempotent resubmit: same id, same task; never run it twice.
                resubmitted += 1
                accepted.append(task_id)
                # (a result the store still writes leaves once written: result_written)
                if existing.result is not None and task_id not in ledger.finished.writing:
                    ledger.outbox(identity).results.append(
                        ledger.finished.outgoing(existing.result))
                elif existing.client != identity:
                    existing.add_watcher(identity)
                continue
            if refusal is not None:
                refused.append(task_id)
                continue
            if pending.count >= max_pending:
                full.append(task_id)
                continue
            if client_open >= max_open:
                client_full.append(task_id)
                continue
            client_open += 1
            # Consecutive tasks of a batch mostly ask for the same thing: comparing the
            # freshly decoded strings is cheaper than hashing them into a key.
            if spec.capabilities != last_caps or spec.agent != last_agent:
                last_caps, last_agent = spec.capabilities, spec.agent
                requirement = ledger.requirements.get(last_caps, last_agent)
            timeout_s = spec.timeout_s or default_timeout
            task = TaskRecord(spec, requirement, identity, now, timeout_s)
            tasks[task_id] = task
            pending.push(task)
            deadlines.add(task, timeout_s)
            journal_accepted(spec, identity, wall)
            if watch_tasks:
                self.lifecycle.publish(task, now)
            if spec.parent_id is not None:
                # Linking may cancel the task (its parent was cancelled), which counts
                # it finished: store the count first, read it back after.
                open_by_client[identity] = client_open
                self._link_to_parent(task_id, spec.parent_id, now)
                client_open = open_by_client.get(identity, 0)
            accepted.append(task_id)
        if client_open:
            open_by_client[identity] = client_open
        ledger.counters["resubmitted"] += resubmitted
        # Resubmits of known ids are counted apart (resubmitted), not as new work.
        ledger.counters["submitted"] += (len(msg.tasks) - len(full) - len(client_full)
                                         - len(refused) - resubmitted)
        if accepted:
            self.defer_accepted(identity, accepted, now)
        if full:
            ledger.reject(identity, ErrorCode.QUEUE_FULL,
                          f"the pending queue is full ({max_pending} tasks, max_pending); "
                          "retry later", task_ids=full)
        if client_full:
            ledger.reject(identity, ErrorCode.QUEUE_FULL,
                          f"this client has {max_open} unfinished tasks, its limit "
                          "(max_pending_per_client); retry once some finish",
                          task_ids=client_full)
        if refused:
            assert refusal is not None
            if refusal[0] is ErrorCode.STORAGE_FULL:
                ledger.counters["storage_refused"] += len(refused)
            ledger.reject(identity, refusal[0], refusal[1], task_ids=refused)

    def _refusal(self) -> tuple[ErrorCode, str] | None:
        """Why no new task is accepted now (the ERROR code and message), or None.

        A journal whose last write failed is asked to write again first: the first SUBMIT
        after space was freed is accepted, not refused for a write nobody retried.
        """
        ledger = self.ledger
        if ledger.stopping_since is not None:
            return (ErrorCode.SHUTTING_DOWN,
                    "the broker is shutting down and accepts no new tasks")
        if ledger.journal.failure is None:
            return None
        failure = ledger.journal.retry()
        if failure is None:
            return None
        return (ErrorCode.STORAGE_FULL,
                f"the broker accepts no new tasks: {failure.message}; it still serves the "
                "tasks it holds, and accepts new ones once a write succeeds (free space in "
                "the data dir)")

    def _link_to_parent(self, task_id: str, parent_id: str, now: float) -> None:
        parent = self.ledger.tasks.get(parent_id)
        if parent is not None:
            if parent.children is None:
                parent.children = []
            parent.children.append(task_id)
            return
        finished = self.ledger.finished.get(parent_id)
        if finished is not None and finished.state is TaskState.CANCELLED:
            # Submitted by a parent that was cancelled meanwhile (its agent had not
            # heard yet): the subtask is cancelled with it, as if it had been there.
            self.lifecycle.cancel(task_id, f"parent {parent_id} was cancelled", now)

    def fetch(self, identity: bytes, msg: Fetch) -> None:
        ledger = self.ledger
        missing = []
        box = ledger.outbox(identity)
        writing = ledger.finished.writing
        for task_id in msg.task_ids:
            task = ledger.task_or_result(task_id)
            if task is None:
                missing.append(task_id)
            elif task.result is not None and not (msg.wait and task_id in writing):
                box.results.append(ledger.finished.outgoing(task.result))
            elif msg.wait:
                # An open task, or one whose result the store still writes: its RESULT
                # comes with the others' (Lifecycle.finish / result_written), once.
                task.add_watcher(identity)
            else:
                # Not finished and the caller will not wait: tell it where the task is.
                box.results.append(ResultItem(task_id, task.state.value, agent=(
                    task.agent.name if task.agent else None), attempts=task.attempts))
        if missing:
            ledger.reject(identity, ErrorCode.NOT_FOUND,
                          f"no task with id {', '.join(missing[:5])}"
                          + (" ..." if len(missing) > 5 else "")
                          + " (unknown, or its result is past retention)",
                          req=msg.req, task_ids=missing)

    def read(self, identity: bytes, msg: Read) -> None:
        """A range of a retained result's payload (one its RESULT withheld)."""
        ledger = self.ledger
        found = ledger.finished.read(msg.task_id, msg.offset,
                                     min(msg.length, READ_CHUNK_BYTES))
        if found is None:
            ledger.reject(identity, ErrorCode.NOT_FOUND,
                          f"no result for task {msg.task_id!r} (unknown, or past retention)",
                          req=msg.req, task_ids=[msg.task_id])
            return
        total, data = found
        ledger.outbox(identity).control.append(
            encode(Chunk(msg.req, msg.task_id, msg.offset, total, data)))

    def release(self, msg: Release) -> None:
        """Held results may go: retention applies to them again."""
        released = self.ledger.finished.release(msg.task_ids)
        if released:
            self.ledger.journal.released(released)

    def cancel(self, msg: Cancel, now: float) -> None:
        for task_id in msg.task_ids:
            self.lifecycle.cancel(task_id, "cancelled by request", now)

    # ------------------------------------------------------------ ACCEPTED

    def defer_accepted(self, identity: bytes, task_ids: list[str], now: float) -> None:
        """ACCEPTED waits ACCEPT_DELAY_S: a task that finishes by then needs none (its
        result says more), and the rest go in fewer, larger messages. On a 2-core machine
        an extra wake-up of the client costs the other processes' time. Each SUBMIT waits
        its own delay: a shared deadline would confirm the tasks of a later SUBMIT early,
        and a client sending one task at a time would get an ACCEPTED for every few."""
        self.accepted_due.append((now + ACCEPT_DELAY_S, identity, task_ids))

    def next_accepted_due(self) -> float | None:
        """When the next ACCEPTED is due. SUBMITs whose tasks all finished meanwhile are
        dropped first: their RESULT said more, and a wake-up for them is a pass for nothing
        (a client submitting one quick task every few milliseconds would cost the broker
        one more pass per task)."""
        due = self.accepted_due
        tasks = self.ledger.tasks
        while due:
            when, _, ids = due[0]
            for task_id in ids:
                if task_id in tasks:
                    return when
            due.popleft()
        return None

    def release_accepted(self, now: float) -> None:
        """ACCEPTED for the SUBMITs whose delay is over, for the tasks still open."""
        due = self.accepted_due
        if not due or now < due[0][0]:
            return
        tasks = self.ledger.tasks
        while due and due[0][0] <= now:
            _, identity, ids = due.popleft()
            still_open = [task_id for task_id in ids if task_id in tasks]
            if still_open:
                self.ledger.outbox(identity).accepted.extend(still_open)
