"""Result payloads the broker withheld, read in chunks and delivered whole.

The broker keeps a large result's payload (at least its ``result_store_threshold``,
1 MiB by default) in its result store and sends :class:`~wire.tasks.Withheld` (the size)
in its place, in pushed RESULT items and in FETCH answers alike. :class:`PayloadReader`
reads such a payload with READ requests of at most :data:`~wire.limits.READ_CHUNK_BYTES`,
one after the other, into one buffer of the payload's size, then hands the item to its
handle and peeks as if the bytes had come inline: ``handle.result()``, ``fetch()`` and
``watch()`` see the whole result.

Why in chunks, and only a few payloads at once: the broker answers a client's requests
in order on one connection, so a small task's RESULT waits behind at most one chunk per
read in progress instead of behind whole payloads of up to 64 MiB, and a client that
gets a dozen large results holds the buffers of :data:`MAX_PARALLEL_READS` of them, not
of all.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Final

from wire.limits import MAX_FRAME_BYTES, READ_CHUNK_BYTES
from wire.tasks import Chunk, ErrorCode, Message, Read, ResultItem, Withheld
from agent_sdk.errors import (
    BrokerUnavailable, OrchestratorError, RequestRefused, TaskNotFound, VersionMismatch,
)
from agent_sdk.handles import PeekAnswer, TaskHandle
from agent_sdk.task import Result

logger = logging.getLogger(__name__)

#: Payloads one client reads at once; the others wait in the order their RESULTs came.
#: Two keep the connection busy while one chunk is copied, and bound both the client's
#: reassembly memory and what its other messages may wait behind (one chunk per read).
MAX_PARALLEL_READS: Final = 2
#: How long the broker may take to answer one READ before it is sent again: a request
#: sent into a partition or to a broker that restarted is lost without an error.
CHUNK_TIMEOUT_S: Final = 10.0
#: READs of one chunk sent before the read fails with ``timeout`` (so a read never hangs:
#: it gives up after ``CHUNK_TIMEOUT_S * CHUNK_TRIES`` without progress).
CHUNK_TRIES: Final = 3

#: Sends ``make(req)`` to the broker and returns its answer to ``req`` within ``timeout``
#: seconds (:meth:`agent_sdk.client._Requests.ask` on the client's connection).
Ask = Callable[[Callable[[int], Message], float], Awaitable[Any]]


class ResultUnreadable(OrchestratorError):
    """Raised by ``handle.result()``, ``result_nowait()`` and ``fetch()`` when a task's
    result payload, which the broker withheld to be read in chunks, could not be read.

    Attributes:
        task_id: the task.
        code: why: ``not_found`` (the broker no longer has the result: it went past its
            retention before it was read), ``timeout`` (the broker did not answer a read
            within ``CHUNK_TIMEOUT_S`` x ``CHUNK_TRIES``), ``bad_frame`` (it answered
            with bytes that do not fit the payload), or the code of its refusal.
        size: the payload's size in bytes, as the broker announced it.
    """

    def __init__(self, task_id: str, code: str, message: str, size: int) -> None:
        super().__init__(f"the result of task {task_id!r} ({size} bytes, withheld by the "
                         f"broker to be read in chunks) could not be read ({code}): {message}")
        self.task_id = task_id
        self.code = code
        self.size = size


class _Job:
    """One withheld payload to read, and who waits for its result."""

    __slots__ = ("item", "handles", "peeks")

    def __init__(self, item: ResultItem) -> None:
        self.item = item
        self.handles: list[TaskHandle] = []
        self.peeks: list[asyncio.Future[Result]] = []


class PayloadReader:
    """Reads withheld payloads for one client, :data:`MAX_PARALLEL_READS` at once.

    Args:
        ask: how a READ goes to the broker and its answer (CHUNK) comes back; an ERROR
            answer raises (``TaskNotFound`` for ``not_found``), silence raises
            ``BrokerUnavailable``.
        parallel: payloads read at once.

    Attributes:
        chunk_timeout_s: how long one READ may wait for its answer before it is sent
            again (:data:`CHUNK_TIMEOUT_S`).
        chunk_tries: READs of one chunk before the read fails (:data:`CHUNK_TRIES`).
        chunks_read: chunks received so far (for statistics and tests).
    """

    def __init__(self, ask: Ask, parallel: int = MAX_PARALLEL_READS) -> None:
        self._ask = ask
        self._parallel = parallel
        #: every job queued or being read, by task id: a second RESULT of the same task
        #: (a FETCH peek while its handle's read runs) joins it instead of reading again
        self._jobs: dict[str, _Job] = {}
        self._queue: deque[_Job] = deque()
        self._running: set[asyncio.Task[None]] = set()
        self.chunk_timeout_s = CHUNK_TIMEOUT_S
        self.chunk_tries = CHUNK_TRIES
        self.chunks_read = 0

    @property
    def reading(self) -> int:
        """Payloads being read now."""
        return len(self._running)

    @property
    def queued(self) -> int:
        """Payloads waiting for a read to end before theirs starts."""
        return len(self._queue)

    def take(self, item: ResultItem, handle: TaskHandle | None,
             waiting: list[asyncio.Future[PeekAnswer]] | None) -> None:
        """Read ``item``'s withheld payload, then resolve ``handle`` and the FETCH peeks
        ``waiting`` with the whole result (or fail them with :class:`ResultUnreadable`).

        A peek is answered at once with a future of the result: the broker has answered
        it (its deadline is met), and the read has deadlines of its own.
        """
        job = self._jobs.get(item.task_id)
        if job is None:
            job = self._jobs[item.task_id] = _Job(item)
            self._queue.append(job)
        if handle is not None:
            job.handles.append(handle)
        if waiting:
            loop = asyncio.get_running_loop()
            for peek in waiting:
                if not peek.done():
                    later: asyncio.Future[Result] = loop.create_future()
                    peek.set_result(later)
                    job.peeks.append(later)
        self._start()

    def fail_all(self, error: Exception) -> None:
        """Stop every read, and fail whoever waits for one with ``error``."""
        jobs = list(self._jobs.values())
        self._jobs.clear()
        self._queue.clear()
        for task in self._running:
            task.cancel()
        for job in jobs:
            self._settle(job, error)

    async def close(self) -> None:
        """Stop every read (the client closes: its handles stay unresolved)."""
        self._jobs.clear()
        self._queue.clear()
        tasks = list(self._running)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # ------------------------------------------------------------ reading

    def _start(self) -> None:
        """Start reads while fewer than ``parallel`` run, oldest job first."""
        queue = self._queue
        while queue and len(self._running) < self._parallel:
            job = queue.popleft()
            task = asyncio.get_running_loop().create_task(
                self._run(job), name=f"read-result-{job.item.task_id}")
            self._running.add(task)
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # _run settles every failure it can see; this is a bug, and must not hang
            # the job's waiters either.
            logger.error("reading a withheld result failed", exc_info=task.exception())
        self._start()

    async def _run(self, job: _Job) -> None:
        item = job.item
        withheld: Withheld = item.payload
        try:
            payload = await self._read(item.task_id, withheld.size)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - every failure ends the wait, never hangs it
            self._settle(job, _unreadable(item.task_id, withheld.size, e))
            return
        self._settle(job, Result.from_wire(
            item.task_id, item.status, payload, item.error_code, item.error_message,
            item.agent, item.attempts, item.queued_ms, item.run_ms))

    async def _read(self, task_id: str, size: int) -> bytearray:
        """The payload's bytes, chunk after chunk into one buffer (no joins)."""
        if size > MAX_FRAME_BYTES:
            # No agent can send more (a payload is one frame): a size past it is a fault,
            # and allocating it on the broker's word alone would be unwise.
            raise ResultUnreadable(task_id, ErrorCode.BAD_FRAME.value,
                                   f"no payload exceeds {MAX_FRAME_BYTES} bytes", size)
        buffer = bytearray(size)
        offset = 0
        while offset < size:
            length = min(READ_CHUNK_BYTES, size - offset)
            chunk = await self._chunk(task_id, offset, length)
            data = chunk.data
            got = len(data)
            if chunk.offset != offset or chunk.total != size or not 0 < got <= length:
                raise ResultUnreadable(
                    task_id, ErrorCode.BAD_FRAME.value,
                    f"a read of {length} bytes at {offset} was answered with {got} bytes "
                    f"at {chunk.offset} of {chunk.total}", size)
            buffer[offset:offset + got] = data
            offset += got
            self.chunks_read += 1
        return buffer

    async def _chunk(self, task_id: str, offset: int, length: int) -> Chunk:
        """One chunk, asked for again when an answer is overdue (READ is idempotent)."""
        tries = max(1, self.chunk_tries)
        for attempt in range(1, tries + 1):
            try:
                chunk: Chunk = await self._ask(
                    lambda req: Read(req, task_id, offset, length), self.chunk_timeout_s)
                return chunk
            except BrokerUnavailable:
                if attempt == tries:
                    raise
        raise AssertionError("unreachable: the last try raises")

    def _settle(self, job: _Job, outcome: Result | Exception) -> None:
        """Hand the job's waiters the whole result, or the reason there is none."""
        task_id = job.item.task_id
        if self._jobs.get(task_id) is job:
            del self._jobs[task_id]
        if isinstance(outcome, Result):
            for handle in job.handles:
                handle._resolve(outcome)
            for peek in job.peeks:
                if not peek.done():  # done: its caller stopped waiting
                    peek.set_result(outcome)
        else:
            for handle in job.handles:
                handle._fail(outcome)
            for peek in job.peeks:
                if not peek.done():
                    peek.set_exception(outcome)


def _unreadable(task_id: str, size: int, error: Exception) -> Exception:
    """What the waiters of a failed read get: :class:`ResultUnreadable` naming the task
    and the cause, or the client-wide refusal (:class:`VersionMismatch`) as it is."""
    if isinstance(error, (ResultUnreadable, VersionMismatch)):
        return error
    if isinstance(error, TaskNotFound):
        code = ErrorCode.NOT_FOUND.value
        message = ("the broker no longer has it: it went past the broker's retention "
                   f"before it was read ({error})")
    elif isinstance(error, BrokerUnavailable):
        code = ErrorCode.TIMEOUT.value
        message = str(error)
    elif isinstance(error, RequestRefused):
        code, message = error.code, str(error)
    else:
        code, message = ErrorCode.BAD_FRAME.value, f"{type(error).__name__}: {error}"
    unreadable = ResultUnreadable(task_id, code, message, size)
    unreadable.__cause__ = error
    return unreadable


__all__ = [
    "CHUNK_TIMEOUT_S", "CHUNK_TRIES", "MAX_PARALLEL_READS", "PayloadReader", "ResultUnreadable",
]
