"""``TaskHandle``: a submitted task, whose result is kept on it and awaited from it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Generator, Iterable
from typing import Any, TYPE_CHECKING, Union

from wire.tasks import Error, ResultItem, TaskSpec, TaskStatus, Withheld
from agent_sdk.errors import WaitTimeout
from agent_sdk.task import Result, TERMINAL_STATUSES

if TYPE_CHECKING:
    from agent_sdk.client import Client

#: What a FETCH peek gets: the result, or (its payload withheld by the broker) a future
#: of it that resolves once :class:`~agent_sdk.payloads.PayloadReader` has read it.
PeekAnswer = Union[Result, "asyncio.Future[Result]"]
#: The FETCH peeks waiting for an answer, by task id.
Peeks = dict[str, list["asyncio.Future[PeekAnswer]"]]
#: Takes a RESULT item whose payload the broker withheld, with the handle and the peeks
#: that wait for it (:meth:`~agent_sdk.payloads.PayloadReader.take`).
TakeWithheld = Callable[
    [ResultItem, "TaskHandle | None", "list[asyncio.Future[PeekAnswer]] | None"], None]


def _expire_waiter(waiter: asyncio.Future[Any]) -> None:
    """Timer callback: the caller's wait for a result timed out."""
    if not waiter.done():
        waiter.set_exception(asyncio.TimeoutError())


class TaskHandle:
    """A submitted task: await its result, check it, cancel it.

    The result is kept on the handle; an asyncio future exists only once somebody awaits
    it, and :meth:`add_done_callback` callbacks run as soon as the result is in: a client
    with thousands of tasks in flight pays for neither when it does not use them.
    """

    __slots__ = ("id", "_client", "_result", "_error", "_waiters", "_callbacks", "_accepted",
                 "_accepted_waiter", "_spec", "_sent_at")

    def __init__(self, task_id: str, client: Client, spec: TaskSpec | None = None,
                 sent_at: float = 0.0) -> None:
        self.id = task_id
        self._client = client
        self._result: Result | None = None
        #: why the result can never come (the broker refused the SDK's protocol version)
        self._error: Exception | None = None
        #: one future per pending awaiter, resolved with the result (a waiter that times
        #: out or is cancelled takes only its own future with it)
        self._waiters: list[asyncio.Future[Result]] | None = None
        self._callbacks: list[Callable[[TaskHandle], Any]] | None = None
        self._accepted = False
        self._accepted_waiter: asyncio.Future[None] | None = None
        #: what was submitted, kept until the result is in, to submit it again when the
        #: broker may have lost it (it restarted, or the SUBMIT was lost on the way)
        self._spec = spec
        #: loop time of the last SUBMIT or FETCH for it
        self._sent_at = sent_at

    def done(self) -> bool:
        """Whether the result is in (or known never to come: :meth:`result` raises)."""
        return self._result is not None or self._error is not None

    @property
    def accepted(self) -> bool:
        """True once the broker confirmed it holds the task."""
        return self._accepted

    def result_nowait(self) -> Result:
        """The result of a finished task (see :meth:`done`).

        Raises:
            asyncio.InvalidStateError: the task has not finished.
            VersionMismatch: the result cannot come (see :meth:`result`).
        """
        if self._error is not None:
            raise self._error
        if self._result is None:
            raise asyncio.InvalidStateError(f"task {self.id} has not finished")
        return self._result

    def _new_waiter(self) -> asyncio.Future[Result]:
        waiter: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = [waiter]
        else:
            self._waiters.append(waiter)
        return waiter

    def _drop_waiter(self, waiter: asyncio.Future[Result]) -> None:
        if self._waiters is not None and waiter in self._waiters:
            self._waiters.remove(waiter)

    async def result(self, timeout: float | None = None) -> Result:
        """The task's final :class:`Result` (any terminal status: check ``result.ok``).

        Raises:
            WaitTimeout: when ``timeout`` seconds pass first; the task itself goes on.
            BrokerUnavailable: no broker was ever reached at the client's address (at
                once where nothing accepts connections there, else when ``timeout``
                passes).
            VersionMismatch: the broker refused the client's protocol version, so the
                result cannot come.
            ResultUnreadable: the result's large payload, which the client reads in
                chunks, could not be read (gone past the broker's retention, or no
                answer); see :mod:`agent_sdk.payloads`.
        """
        if self._result is not None:
            return self._result
        if self._error is not None:
            raise self._error
        # A future of its own and a plain timer, rather than wait_for(shield(...)): the
        # result then wakes the caller in one loop iteration instead of three.
        waiter = self._new_waiter()
        timer = None
        if timeout is not None:
            timer = asyncio.get_running_loop().call_later(timeout, _expire_waiter, waiter)
        try:
            return await waiter
        except asyncio.TimeoutError:
            unreached = self._client._reach.timed_out(timeout or 0.0)
            if unreached is not None:
                raise unreached from None
            raise WaitTimeout(f"task {self.id} has no result after {timeout:g} s") from None
        finally:
            if timer is not None:
                timer.cancel()
            self._drop_waiter(waiter)

    async def wait_accepted(self, timeout: float | None = None) -> None:
        """Return once the broker confirmed it holds the task (or it already ended)."""
        if self._error is not None:
            raise self._error
        if self._accepted or self._result is not None:
            return
        if self._accepted_waiter is None:
            self._accepted_waiter = asyncio.get_running_loop().create_future()
        waiter = self._accepted_waiter
        finished = self._new_waiter()
        try:
            either: list[asyncio.Future[Any]] = [waiter, finished]
            done, _ = await asyncio.wait(either, timeout=timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._drop_waiter(finished)
        if self._error is not None:
            if finished.done():
                finished.exception()  # retrieved: it is raised here
            raise self._error
        if not done:
            raise WaitTimeout(f"the broker did not confirm task {self.id} within {timeout:g} s")

    def add_done_callback(self, callback: Callable[[TaskHandle], Any]) -> None:
        """Call ``callback(handle)`` once the result is in, on the client's loop: right
        when it arrives (keep it short and non-blocking), or soon if it already has.
        An exception in it goes to the loop's exception handler. A handle whose result
        cannot come (:meth:`result` raises) calls it too."""
        if self.done():
            asyncio.get_running_loop().call_soon(self._run_callback, callback)
        elif self._callbacks is None:
            self._callbacks = [callback]
        else:
            self._callbacks.append(callback)

    async def cancel(self) -> None:
        """Ask the broker to cancel the task; the result then says ``cancelled``."""
        await self._client.cancel(self.id)

    def __await__(self) -> Generator[Any, None, Result]:
        return self.result().__await__()

    def _resolve(self, result: Result) -> None:
        """The result is in (the client calls this once per task)."""
        if self._result is None:
            self._result = result
            self._settled()

    def _fail(self, error: Exception) -> None:
        """The result can never come: waiters (and later calls) get ``error``."""
        if not self.done():
            self._error = error
            self._settled()

    def _settled(self) -> None:
        """Wake the waiters with the result (or the error) and run the callbacks."""
        waiters = self._waiters
        if waiters is not None:
            self._waiters = None
            result, error = self._result, self._error
            for waiter in waiters:
                if waiter.done():
                    continue
                if result is not None:
                    waiter.set_result(result)
                elif error is not None:
                    waiter.set_exception(error)
        callbacks = self._callbacks
        if callbacks is not None:
            self._callbacks = None
            for callback in callbacks:
                self._run_callback(callback)

    def _run_callback(self, callback: Callable[[TaskHandle], Any]) -> None:
        try:
            callback(self)
        except Exception as e:  # noqa: BLE001 - a user callback must not stop the client
            asyncio.get_running_loop().call_exception_handler({
                "message": f"exception in a done callback of task {self.id}",
                "exception": e, "handle": self})

    def _mark_accepted(self) -> None:
        self._accepted = True
        waiter = self._accepted_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def __repr__(self) -> str:
        state = "done" if self.done() else ("accepted" if self._accepted else "sent")
        return f"TaskHandle({self.id!r}, {state})"



def overdue_work(handles: Iterable[TaskHandle], now: float,
                 after_s: float) -> tuple[list[TaskSpec], list[str]]:
    """What to send again for open tasks last sent ``after_s`` seconds ago or more
    (they then count as sent at ``now``): messages sent into a partition are lost
    silently.

    Returns:
        The specs of those the broker has not accepted yet (to submit again, idempotent
        by task id) and the ids of the others (to ask for their results again).
    """
    resubmit: list[TaskSpec] = []
    refetch: list[str] = []
    for handle in handles:
        if now - handle._sent_at < after_s:
            continue
        handle._sent_at = now
        if handle._spec is not None and not handle._accepted:
            resubmit.append(handle._spec)
        else:
            refetch.append(handle.id)
    return resubmit, refetch


def deliver_results(items: Iterable[Any], handles: dict[str, TaskHandle], peeks: Peeks,
                    withheld: TakeWithheld) -> None:
    """Hand RESULT items to the handles of their tasks (final results only) and to the
    FETCH peeks waiting for them; items nobody waits for are dropped. An item whose
    payload the broker withheld goes to ``withheld`` with its handle and peeks instead:
    they get it once its payload is read."""
    for item in items:
        task_id = item.task_id
        terminal = item.status in TERMINAL_STATUSES
        handle = handles.pop(task_id, None) if terminal else None
        waiting = peeks.pop(task_id, None) if peeks else None
        if handle is None and waiting is None:
            continue
        payload = item.payload
        if type(payload) is Withheld:  # the one test the common path pays for
            withheld(item, handle, waiting)
            continue
        result = Result.from_wire(task_id, item.status, payload, item.error_code,
                                  item.error_message, item.agent, item.attempts,
                                  item.queued_ms, item.run_ms)
        if handle is not None:
            handle._resolve(result)
        for future in waiting or ():
            if not future.done():
                future.set_result(result)


def mark_accepted(ids: Iterable[str], handles: dict[str, TaskHandle]) -> None:
    """The broker confirmed it holds these tasks (ACCEPTED)."""
    for task_id in ids:
        handle = handles.get(task_id)
        if handle is not None:
            handle._mark_accepted()


def reject(error: Error, handles: dict[str, TaskHandle]) -> None:
    """The broker refused the submits ``error`` names (``queue_full``,
    ``shutting_down``, ...): their handles end with a ``rejected`` result."""
    for task_id in error.task_ids:
        handle = handles.pop(task_id, None)
        if handle is not None and not handle.done():
            result = Result.failure(error.code, error.message, TaskStatus.REJECTED.value)
            result.task_id = task_id
            handle._resolve(result)


def open_work(handles: Iterable[TaskHandle]) -> tuple[list[TaskSpec], list[str]]:
    """What to send again for every open task after the broker restarted: it kept what
    it journaled, and a submit again is idempotent by task id.

    Returns:
        The specs of the tasks submitted here, and the ids of the ones only watched.
    """
    specs: list[TaskSpec] = []
    watched: list[str] = []
    for handle in handles:
        if handle._spec is not None:
            specs.append(handle._spec)
        else:
            watched.append(handle.id)
    return specs, watched


__all__ = [
    "PeekAnswer", "Peeks", "TakeWithheld", "TaskHandle", "deliver_results", "mark_accepted",
    "open_work", "overdue_work", "reject",
]
