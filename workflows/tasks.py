"""Step tasks: the one place a run submits, cancels and releases broker tasks.

Every step task is submitted with ``hold=True``: the broker keeps its result, whatever
its retention limits, until the run says (:meth:`StepTasks.release`) that a checkpoint
holds it. A runner that takes over a run therefore always finds the results of the
steps its predecessor started, under the same derived task ids (:mod:`workflows.ids`);
that is also how a result checkpointed by reference is read back: submitting its id
again hands back the held result.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final

from agent_sdk import (
    BrokerUnavailable, Client, OrchestratorError, Result, ResultUnreadable, TaskHandle, TooLarge,
)
from workflows import ids
from workflows.errors import StepFailed, WorkflowInputError
from workflows.model import TaskStep

#: The broker's states of a task that has not ended.
OPEN_TASK_STATES: Final = ("pending", "dispatched", "running", "retrying")
#: Most open tasks a cancel lists from the broker.
MAX_LISTED_TASKS: Final = 100_000
#: Tasks a run's end lists from the broker to find its held results: open tasks and held
#: results come first, so this bounds the cost (a listing of the 100,000 results a broker
#: may retain took it a noticeable pause) without missing any but in a huge backlog.
RELEASE_LISTED_TASKS: Final = 10_000
#: Reads of a result whose withheld payload could not be read (ResultUnreadable): the
#: first try plus these, with a doubling back-off from REREAD_DELAY_S between them.
REREAD_TRIES: Final = 3
REREAD_DELAY_S: Final = 0.5
#: The error code of a step whose result stayed unreadable: the step's failure, not the
#: run's (a map item's counts against ``min_success``).
UNREADABLE: Final = "result_unreadable"
#: Keywords of ``Client.submit``: a step's ``params`` may not use them as task fields.
RESERVED_FIELDS: Final = frozenset({
    "text", "capabilities", "agent", "data", "task_id", "timeout", "retries", "priority",
    "parent_id", "attempt_timeout", "hold"})


class ReleaseUnconfirmed(BrokerUnavailable):
    """Raised when the broker restarted while a run's held results were released: the
    RELEASE may not have reached the journal, so it is sent again later (a
    :class:`~agent_sdk.BrokerUnavailable`: whoever retries those retries this too)."""

    def __init__(self, url: str, run_id: str) -> None:
        OrchestratorError.__init__(self, f"the broker at {url} restarted while the held "
                                         f"results of run {run_id} were released")
        self.refused = False
        self.url = url
        self.waited_s = 0.0


class Deadline:
    """A run's deadline, as wall-clock time: it must mean the same in every process that
    drives the run in turn (a monotonic clock is per machine and per boot).

    Args:
        at: the wall-clock time (``time.time()``) the run must end by; None: no limit.
        clock: the wall clock (injected for tests).
    """

    def __init__(self, at: float | None, clock: Callable[[], float] = time.time) -> None:
        self.at = at
        self._clock = clock

    def remaining_s(self) -> float | None:
        """Seconds left (negative once passed); None without a deadline."""
        return None if self.at is None else self.at - self._clock()

    def passed(self) -> bool:
        """Whether the deadline has passed."""
        remaining = self.remaining_s()
        return remaining is not None and remaining <= 0

    def task_timeout(self, step_timeout_s: float | None) -> float | None:
        """A task's whole deadline: the step's own, capped by the run's time left, so no
        step outlives the run (None: neither is set; the broker's default applies).

        Raises:
            StepFailed: the run's deadline has passed (code ``deadline``), raised by the
                caller with the step's path; here as the bare exception without one.
        """
        remaining = self.remaining_s()
        if remaining is None:
            return step_timeout_s
        if remaining <= 0:
            raise StepFailed("", "deadline", "the run's deadline has passed")
        return remaining if step_timeout_s is None else min(step_timeout_s, remaining)


def check_params(step: TaskStep, path: str) -> None:
    """Refuse ``params`` that would collide with ``Client.submit``'s own keywords.

    Raises:
        WorkflowInputError: naming the step and the field.
    """
    clash = sorted(RESERVED_FIELDS.intersection(step.params))
    if clash:
        raise WorkflowInputError(f"step {path}: params may not use the task keyword(s) "
                                 f"{', '.join(clash)}")


class PreparedStep:
    """A step's routing, limits and task fields, for submitting its tasks.

    Args:
        tasks: the run's step tasks.
        step: the step.
        fields: extra task fields from the workflow.
        pin: an agent id (or name) instead of the step's agent.
    """

    __slots__ = ("tasks", "capabilities", "agent", "timeout_s", "retries", "fields")

    def __init__(self, tasks: StepTasks, step: TaskStep, fields: dict[str, Any] | None,
                 pin: str | None) -> None:
        self.tasks = tasks
        self.capabilities = (step.capability,) if step.capability is not None else ()
        self.agent = pin or step.agent
        self.timeout_s = step.timeout_s
        self.retries = step.retries
        self.fields = {**step.params, **(fields or {})}

    def submit(self, path: str, data: Any) -> TaskHandle:
        """Submit (or, under the same id, attach to) the task of the step at ``path``
        with ``data`` as its input.

        Raises:
            StepFailed: the run's deadline passed (``deadline``), or the task cannot be
                sent (``too_large``, ``bad_input``).
        """
        tasks = self.tasks
        if tasks.deadline.at is None:
            timeout = self.timeout_s
        else:
            try:
                timeout = tasks.deadline.task_timeout(self.timeout_s)
            except StepFailed as e:
                raise StepFailed(path, e.code, e.reason) from None
        task_id = tasks.task_id_prefix + path  # ids.task_id, inlined
        try:
            handle = tasks.client.submit(capabilities=self.capabilities, agent=self.agent,
                                         data=data, task_id=task_id, timeout=timeout,
                                         retries=self.retries, hold=True, **self.fields)
        except TooLarge as e:
            raise StepFailed(path, "too_large", str(e)) from None
        except TypeError as e:
            # The data or a field is not msgpack-encodable: no retry can fix that.
            raise StepFailed(path, "bad_input", f"the step's input cannot be sent: {e}") from None
        tasks.open[task_id] = handle
        tasks.held.add(task_id)
        return handle

    def item_submitter(self) -> Callable[[str, Any], TaskHandle]:
        """:meth:`submit` for a map's items, which keeps its open tasks itself (see
        :meth:`StepTasks.track`): the task is held, not listed in ``StepTasks.open``.
        Without a run deadline it calls ``Client.submit`` with everything else bound
        (10,000 items: one call level and a dict write less each)."""
        tasks = self.tasks
        if tasks.deadline.at is not None:
            def submit_capped(path: str, data: Any) -> TaskHandle:
                handle = self.submit(path, data)
                tasks.open.pop(handle.id, None)
                return handle
            return submit_capped
        client_submit = tasks.client.submit
        prefix = tasks.task_id_prefix
        held = tasks.held
        capabilities, agent, timeout, retries = (self.capabilities, self.agent, self.timeout_s,
                                                 self.retries)
        fields = self.fields

        def submit(path: str, data: Any) -> TaskHandle:
            task_id = prefix + path
            try:
                handle = client_submit(capabilities=capabilities, agent=agent, data=data,
                                       task_id=task_id, timeout=timeout, retries=retries,
                                       hold=True, **fields)
            except TooLarge as e:
                raise StepFailed(path, "too_large", str(e)) from None
            except TypeError as e:
                raise StepFailed(path, "bad_input",
                                 f"the step's input cannot be sent: {e}") from None
            held.add(task_id)
            return handle

        return submit


class StepTasks:
    """Submits a run's step tasks and remembers the open ones (to cancel the run whole).

    Args:
        client: the broker connection.
        run_id: the run the tasks belong to (their ids derive from it).
        deadline: the run's deadline (each task's timeout is capped by it).
        run_fields: task fields of every step (``llm_budget``).
    """

    def __init__(self, client: Client, run_id: str, deadline: Deadline,
                 run_fields: Mapping[str, Any] | None = None) -> None:
        self.client = client
        self.run_id = run_id
        self.deadline = deadline
        #: fields every task of the run carries (its LLM token budget)
        self.run_fields: dict[str, Any] = dict(run_fields or {})
        #: what every step task id of the run starts with (``wf:<run>:``)
        self.task_id_prefix = ids.task_id(run_id, "")
        #: submitted and not settled (see :meth:`settled`), by task id
        self.open: dict[str, TaskHandle] = {}
        #: open tasks kept by others (a map's items), by task id (see :meth:`track`)
        self._tracked: list[Mapping[str, Any]] = []
        #: every task submitted here with ``hold``: released once checkpointed, and all
        #: again when the run ends (a RELEASE is not acknowledged, so one sent while
        #: the broker restarted is lost unnoticed; a second release of an id is a no-op)
        self.held: set[str] = set()

    def prepare(self, step: TaskStep, fields: dict[str, Any] | None = None,
                pin: str | None = None) -> PreparedStep:
        """What every task of ``step`` shares, computed once (for a map's items).

        Args:
            step: what to route to, with the step's timeout, retries and params.
            fields: extra task fields from the workflow (``failed``, ``feedback``...).
            pin: an agent id (or name) the tasks must run on, instead of ``step.agent``.
        """
        return PreparedStep(self, step, self._with_run_fields(fields), pin)

    def _with_run_fields(self, fields: dict[str, Any] | None) -> dict[str, Any] | None:
        if not self.run_fields:
            return fields
        return {**self.run_fields, **(fields or {})}

    def submit(self, path: str, step: TaskStep, data: Any, fields: dict[str, Any] | None = None,
               pin: str | None = None) -> TaskHandle:
        """Submit (or, under the same id, attach to) the task of the step at ``path``;
        see :meth:`prepare` and :meth:`PreparedStep.submit`."""
        return PreparedStep(self, step, self._with_run_fields(fields), pin).submit(path, data)

    def track(self, open_tasks: Mapping[str, Any]) -> Callable[[], None]:
        """Count the keys of ``open_tasks`` (task ids, kept current by the caller) among
        this run's open tasks (for :meth:`cancel_under`); returns the call that stops it."""
        self._tracked.append(open_tasks)

        def untrack() -> None:
            if any(tracked is open_tasks for tracked in self._tracked):
                self._tracked = [t for t in self._tracked if t is not open_tasks]
        return untrack

    def settled(self, task_id: str) -> None:
        """The task's result is in: it is no longer open (nothing to cancel)."""
        self.open.pop(task_id, None)

    async def run(self, path: str, step: TaskStep, data: Any,
                  fields: dict[str, Any] | None = None, pin: str | None = None) -> Result:
        """Submit the step's task and return its final result (any status)."""
        handle = self.submit(path, step, data, fields, pin)
        try:
            return await handle.result()
        except ResultUnreadable as e:
            return await reread(self.client, handle.id, e)
        finally:
            self.settled(handle.id)

    async def cancel_under(self, path_prefix: str) -> int:
        """Cancel the open tasks whose path starts with ``path_prefix`` (``audit/map[``:
        every item of a map); returns how many."""
        prefix = ids.task_id(self.run_id, path_prefix)
        chosen = [task_id for task_id in self.open if task_id.startswith(prefix)]
        for tracked in self._tracked:
            chosen.extend(task_id for task_id in tracked if task_id.startswith(prefix))
        for task_id in chosen:
            await self.client.cancel(task_id)
        return len(chosen)

    async def release(self, task_ids: Iterable[str]) -> None:
        """Let the broker forget the held results of ``task_ids`` (their checkpoint is
        written, or the run ended) under its normal retention."""
        await self.client.release(task_ids)


async def reread(client: Client, task_id: str, error: ResultUnreadable,
                 tries: int = REREAD_TRIES, delay_s: float = REREAD_DELAY_S) -> Result:
    """The result of ``task_id``, read again after ``error`` (its large payload could
    not be read in time: the broker was slow or restarting); up to ``tries`` more reads,
    with a doubling back-off. The result is held until the run releases it, so a later
    read can succeed. When none does, a failed result with code :data:`UNREADABLE`: the
    step fails (a map item counts as failed), the run does not end for it.

    Raises:
        BrokerUnavailable: the broker did not answer the read (the run is driven again).
    """
    last: ResultUnreadable = error
    for attempt in range(tries):
        await asyncio.sleep(delay_s * (2 ** attempt))  # a back-off, not a wait for an event
        try:
            result = await client.fetch(task_id)
        except ResultUnreadable as e:
            last = e
            continue
        if result.finished:
            result.task_id = result.task_id or task_id
            return result
    failed = Result.failure(UNREADABLE, str(last))
    failed.task_id = task_id
    return failed


async def release_run_tasks(client: Client, run_id: str, known: Iterable[str] = (),
                            listed: bool = True) -> tuple[int, int]:
    """Cancel every open task of the ended run ``run_id`` and release every held result
    of its tasks, whoever submitted them; returns ``(cancelled, released)`` (ids named).

    The ids are ``known`` (this runner's, the checkpoints') and, with ``listed``, the
    run's tasks among the first :data:`RELEASE_LISTED_TASKS` the broker lists: its open
    tasks, then its held results (listed before the other finished ones, whatever their
    age). A runner that died may have submitted steps nobody checkpointed; only a run
    driven start to end by one turn that knows every id it submitted can skip the
    listing. A cancelled task ends at once in the broker, and a connection's messages
    are applied in order, so the tasks cancelled here are finished, and held, when the
    RELEASE after them arrives.

    Raises:
        ReleaseUnconfirmed: the broker restarted meanwhile (the RELEASE may be lost).
        BrokerUnavailable: the broker did not answer; the caller tries again later.
    """
    prefix = ids.task_id(run_id, "")
    before = await _boot_of(client)
    chosen = set(known)
    cancelled = 0
    for task in await client.tasks(None, limit=RELEASE_LISTED_TASKS) if listed else ():
        task_id = str(task.get("task_id", ""))
        if task_id.startswith(prefix):
            chosen.add(task_id)
            if task.get("status") in OPEN_TASK_STATES:
                await client.cancel(task_id)
                cancelled += 1
    await client.release(sorted(chosen))
    # The broker answers a connection's requests in order: this answer comes after the
    # RELEASE was applied (and journaled), unless a restart came between them.
    if await _boot_of(client) != before:
        raise ReleaseUnconfirmed(client.url, run_id)
    return cancelled, len(chosen)


async def _boot_of(client: Client) -> str:
    """The broker's boot id (a new one after every restart)."""
    status = await client.status()
    broker = status.get("broker") if isinstance(status, dict) else None
    return str(broker.get("boot", "")) if isinstance(broker, dict) else ""


async def cancel_run_tasks(client: Client, run_id: str) -> int:
    """Cancel every open broker task of ``run_id``, whoever submitted it (a runner that
    died may have left some); returns how many."""
    prefix = ids.task_id(run_id, "")
    cancelled = 0
    for task in await client.tasks(OPEN_TASK_STATES, limit=MAX_LISTED_TASKS):
        task_id = str(task.get("task_id", ""))
        if task_id.startswith(prefix):
            await client.cancel(task_id)
            cancelled += 1
    return cancelled


__all__ = [
    "Deadline", "MAX_LISTED_TASKS", "OPEN_TASK_STATES", "PreparedStep", "RESERVED_FIELDS",
    "RELEASE_LISTED_TASKS", "REREAD_DELAY_S", "REREAD_TRIES", "ReleaseUnconfirmed", "StepTasks", "UNREADABLE",
    "cancel_run_tasks", "check_params", "release_run_tasks", "reread",
]
