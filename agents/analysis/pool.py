"""The agent's side of the analysis workers: start them, feed them batches, enforce limits.

:class:`WorkerPool` keeps ``size`` long-lived workers (:mod:`agents.analysis.worker`),
each started with :func:`agents.sandbox.child_setup` (its own session, a memory limit,
no network, ``nobody`` when root) and talking msgpack frames over its pipes.
:meth:`WorkerPool.analyze` splits a task's files into batches, one worker per batch at a
time, and reads one frame per file:

- no frame within ``file_timeout_s``: the file in progress (the first of the batch without
  a frame) is reported ``time_limit``, the worker's process group is killed, a fresh
  worker takes the batch's remaining files;
- the worker dies (its ``MemoryError`` report, or killed by the kernel): that file is
  reported ``memory_limit`` and likewise;
- the awaiting task is cancelled: the worker's process group is killed at once (before
  the cancellation goes on) and a fresh worker replaces it in the background.

Because each file's frame is written before the next file starts, the culprit of a dead
batch is known without rerunning its files one by one.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import math
import os
import signal
import sys
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import agents
from agents.analysis import FileStatus
from agents.analysis.protocol import (
    EXIT_MEMORY,
    HEADER,
    FrameError,
    body_size,
    decode,
    encode,
)
from agents.sandbox import Limits, child_setup, kill_group, tool_env

logger = logging.getLogger(__name__)

#: How long a fresh worker may take to load bandit and say ready.
READY_TIMEOUT_S: Final = 60.0
#: Files per batch at most: a dead batch costs at most this many files' resend.
DEFAULT_BATCH_FILES: Final = 64
#: Where the ``agents`` package is, for the worker's ``PYTHONPATH``.
_PACKAGE_ROOT: Final = str(Path(agents.__file__).resolve().parent.parent)

#: Called with ``(worker pid, files)`` as a batch is sent to a worker.
OnBatch = Callable[[int, Sequence[str]], None]


_PR_SET_PDEATHSIG: Final = 1


def _worker_setup(limits: Limits) -> Callable[[], None]:
    """:func:`child_setup`, and then: die with the agent.

    A worker leads its own session, so a signal to the agent's group does not reach it;
    the parent-death signal (set after child_setup, since dropping root clears it) kills
    a worker whose agent was killed outright, even in the middle of a file.
    """
    sandbox = child_setup(limits)
    libc_name = ctypes.util.find_library("c")

    def setup() -> None:
        sandbox()
        if libc_name is not None:
            ctypes.CDLL(libc_name).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)

    return setup


class WorkerError(RuntimeError):
    """A worker could not be started or broke the protocol; one line."""


@dataclass(slots=True)
class FileOutcome:
    """How one file's analysis ended.

    Attributes:
        path: the carried relative path.
        status: analyzed, unparseable, time_limit or memory_limit.
        detail: why, when not simply analysed (the syntax error, the limit).
        findings: its findings, as ``Finding.to_dict()`` maps.
    """

    path: str
    status: FileStatus
    detail: str = ""
    findings: list[dict[str, Any]] = field(default_factory=list)


class _Worker:
    """One worker process and its pipes."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.pid = proc.pid

    async def read(self) -> dict[str, Any]:
        """The next frame. Raises ``asyncio.IncompleteReadError`` when the worker died."""
        assert self.proc.stdout is not None
        header = await self.proc.stdout.readexactly(HEADER.size)
        return decode(await self.proc.stdout.readexactly(body_size(header)))

    def send(self, message: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(encode(message))

    def kill(self) -> None:
        """Kill the worker's whole process group (it leads its own session)."""
        kill_group(self.pid)

    async def exit_status(self) -> int:
        return await self.proc.wait()


class WorkerPool:
    """``size`` analysis workers and the limits they run under.

    Args:
        size: number of workers (files of one task are spread over them).
        memory_mb: each worker's address-space limit, in MiB.
        file_timeout_s: most time one file may take.
        batch_files: most files sent to a worker at once.
    """

    def __init__(self, size: int = 1, *, memory_mb: int = 1024, file_timeout_s: float = 30.0,
                 batch_files: int = DEFAULT_BATCH_FILES) -> None:
        if size < 1:
            raise ValueError("a worker pool needs at least one worker")
        self.size = size
        # Only the address space is limited: the CPU limit of Limits would add up over
        # every file a long-lived worker analyses; the per-file wall time is ours.
        self.limits = Limits(memory_mb=memory_mb, timeout_s=0)
        self.file_timeout_s = file_timeout_s
        self.batch_files = max(1, batch_files)
        #: ready workers, or the error of a respawn that failed (the next batch retries it)
        self._idle: asyncio.Queue[_Worker | WorkerError] = asyncio.Queue()
        self._workers: set[_Worker] = set()
        self._respawns: set[asyncio.Task[None]] = set()
        self._batches = 0
        self._closed = False

    @property
    def pids(self) -> list[int]:
        """The pids of the workers alive now (busy or idle)."""
        return sorted(w.pid for w in self._workers)

    async def start(self) -> None:
        """Start every worker and wait until each is ready."""
        workers = await asyncio.gather(*(self._spawn() for _ in range(self.size)))
        for worker in workers:
            self._idle.put_nowait(worker)

    async def close(self) -> None:
        """Kill every worker and wait for them."""
        self._closed = True
        for task in list(self._respawns):
            task.cancel()
        await asyncio.gather(*self._respawns, return_exceptions=True)
        for worker in list(self._workers):
            worker.kill()
        for worker in list(self._workers):
            await worker.exit_status()
        self._workers.clear()

    async def _spawn(self) -> _Worker:
        env = tool_env({"PYTHONPATH": os.pathsep.join(
            p for p in (_PACKAGE_ROOT, os.environ.get("PYTHONPATH", "")) if p)})
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agents.analysis.worker", cwd="/", env=env,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            preexec_fn=_worker_setup(self.limits))
        worker = _Worker(proc)
        self._workers.add(worker)
        try:
            hello = await asyncio.wait_for(worker.read(), READY_TIMEOUT_S)
        except BaseException as error:
            await self._discard(worker)
            if isinstance(error, (asyncio.IncompleteReadError, asyncio.TimeoutError,
                                  FrameError)):
                raise WorkerError(f"an analysis worker did not start (memory limit "
                                  f"{self.limits.memory_mb} MiB too small?): "
                                  f"{type(error).__name__}") from None
            raise
        if hello.get("op") != "ready":
            await self._discard(worker)
            raise WorkerError(f"an analysis worker said {hello.get('op')!r} instead of ready")
        return worker

    async def _discard(self, worker: _Worker) -> None:
        worker.kill()
        self._workers.discard(worker)
        await worker.exit_status()

    def _replace(self, worker: _Worker) -> None:
        """Kill ``worker`` now; a fresh one joins the idle workers in the background."""
        worker.kill()
        self._workers.discard(worker)
        if self._closed:
            return
        task = asyncio.get_running_loop().create_task(self._respawn(worker))
        self._respawns.add(task)
        task.add_done_callback(self._respawns.discard)

    async def _respawn(self, dead: _Worker) -> None:
        await dead.exit_status()
        try:
            self._idle.put_nowait(await self._spawn())
        except WorkerError as error:
            logger.error("analysis pool: %s", error)
            self._idle.put_nowait(error)

    async def analyze(self, root: Path, files: Sequence[str], analyses: Sequence[str],
                      on_batch: OnBatch | None = None) -> list[FileOutcome]:
        """Analyse ``files`` (relative to ``root``); one outcome per file, in order.

        ``on_batch(worker pid, files)`` is called as each batch goes to a worker.
        """
        if not files:
            return []
        count = max(math.ceil(len(files) / self.batch_files), min(self.size, len(files)))
        per = math.ceil(len(files) / count)
        chunks = [list(files[i:i + per]) for i in range(0, len(files), per)]
        results = await asyncio.gather(*(self._run_batch(root, c, analyses, on_batch)
                                         for c in chunks))
        by_path = {o.path: o for part in results for o in part}
        return [by_path[f] for f in files]

    async def _run_batch(self, root: Path, files: list[str], analyses: Sequence[str],
                         on_batch: OnBatch | None) -> list[FileOutcome]:
        outcomes: list[FileOutcome] = []
        remaining = files
        while remaining:
            worker = await self._idle.get()
            if isinstance(worker, WorkerError):
                try:
                    worker = await self._spawn()
                except BaseException:
                    # The slot stays, as a failure the next batch tries again.
                    self._idle.put_nowait(worker)
                    raise
            try:
                done, remaining, alive = await self._drive(worker, root, remaining, analyses,
                                                           on_batch)
            except BaseException:
                # Cancelled (or broken): the worker may be mid-file; it dies now.
                self._replace(worker)
                raise
            outcomes.extend(done)
            if alive:
                self._idle.put_nowait(worker)
            else:
                self._replace(worker)
        return outcomes

    async def _drive(self, worker: _Worker, root: Path, files: list[str],
                     analyses: Sequence[str], on_batch: OnBatch | None
                     ) -> tuple[list[FileOutcome], list[str], bool]:
        """Run one batch on ``worker``: ``(outcomes, files left, worker still usable)``."""
        self._batches += 1
        batch = self._batches
        worker.send({"op": "analyze", "batch": batch, "root": str(root), "files": files,
                     "analyses": list(analyses)})
        if on_batch is not None:
            on_batch(worker.pid, files)
        done: list[FileOutcome] = []
        pending = deque(files)
        while True:
            try:
                frame = await asyncio.wait_for(worker.read(), self.file_timeout_s)
            except TimeoutError:
                culprit = pending.popleft()
                logger.warning("analysis pool: %s took over %g s; killing worker %d",
                               culprit, self.file_timeout_s, worker.pid)
                done.append(FileOutcome(culprit, FileStatus.TIME_LIMIT,
                                        f"the analysis took over {self.file_timeout_s:g} s"))
                return done, list(pending), False
            except (asyncio.IncompleteReadError, FrameError, ConnectionError):
                worker.kill()
                status = await worker.exit_status()
                if pending:
                    culprit = pending.popleft()
                    done.append(FileOutcome(culprit, FileStatus.MEMORY_LIMIT,
                                            self._death(status)))
                return done, list(pending), False
            if frame.get("batch") != batch:
                raise WorkerError(f"worker {worker.pid} answered batch {frame.get('batch')} "
                                  f"during batch {batch}")
            if frame.get("op") == "done":
                return done, list(pending), True
            path = str(frame.get("path"))
            if not pending or pending[0] != path:
                raise WorkerError(f"worker {worker.pid} reported {path!r} out of order")
            pending.popleft()
            done.append(FileOutcome(path, FileStatus(str(frame.get("status"))),
                                    str(frame.get("detail", "")),
                                    list(frame.get("findings") or [])))
            if done[-1].status is FileStatus.MEMORY_LIMIT:
                return done, list(pending), False

    def _death(self, status: int) -> str:
        how = "reported MemoryError" if status == EXIT_MEMORY else \
            f"was killed by signal {-status}" if status < 0 else f"exited with status {status}"
        return (f"the worker {how} while analysing this file "
                f"(memory limit {self.limits.memory_mb} MiB)")
