"""The result store: large result payloads as files in ``DATA_DIR/results``, written
by a thread of their own, so that they leave the broker's memory once finished, never
pass through the journal's group commit, and are served again by FETCH (``result ID``),
after a restart too.

How a large result goes (payload of at least ``result_store_threshold`` bytes):

1. ``Lifecycle.finish`` hands it to :meth:`broker.journal.Journal.finished`, which queues
   it here (:meth:`ResultStore.put`) and buffers nothing: the loop's commit of small
   records never waits for it, and neither do the RESULTs of other tasks.
2. The writer thread writes ``<key>.bin`` (a temporary name, then ``os.replace``; fsync in
   ``fsync`` durability), and wakes the loop.
3. The loop (``Broker._release_stored``) journals a small ``S`` record naming the file,
   swaps the retained result's payload for a :class:`~broker.engine.StoredPayload`, and only then sends
   the task's RESULT (after that pass's commit, as for any result).
4. FETCH maps the file (``mmap``): libzmq sends the pages straight from the page cache,
   and nothing is copied into the broker's heap.

At start-up the journal's ``S`` records come back as references (no payload is read),
and files no record names (a crash between the write and its record) are removed.
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import os
import queue
import threading
from collections import deque
from pathlib import Path
from typing import Any, Callable

from broker.engine.queues import StoredPayload
from wire.tasks import ResultItem

logger = logging.getLogger(__name__)

#: A finished write: the result as the agent sent it, its wall time, and its reference
#: (None when the write failed: the result is then journalled whole, as before).
Written = tuple[ResultItem, float, "StoredPayload | None"]


#: The writer thread's nice value: copying large payloads into the page cache is bulk
#: work (a 64 MB file costs this machine tens of milliseconds of CPU), and at the
#: default priority it took the CPU from the loop thread and the agents that small tasks
#: wait on (probe p99 166-382 ms while 12 x 64 MB results were written, see
#: docs/performance.md). Linux applies a nice value to one thread when given its id.
WRITER_NICE = 10


def _lower_priority() -> None:
    """Run the calling thread at :data:`WRITER_NICE` where the platform allows it."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WRITER_NICE)
    except (AttributeError, OSError) as e:  # not Linux, or not permitted: run as is
        logger.debug("result store: writer priority unchanged (%s)", e)


def key_of(task_id: str) -> str:
    """The file name stem for ``task_id`` (ids are peer-chosen: never a path)."""
    return hashlib.sha256(task_id.encode("utf-8", "surrogatepass")).hexdigest()[:40]


class ResultStore:
    """Large payloads on disk. ``wake`` is called (from the writer thread) after each write.

    Args:
        directory: the broker's data dir (files go to its ``results`` directory).
        wake: makes the broker's loop run a pass.
        fsync: fsync each file before it is announced.
    """

    DIRECTORY = "results"

    def __init__(self, directory: Path, wake: Callable[[], None], fsync: bool = False) -> None:
        self.path = Path(directory) / self.DIRECTORY
        # 0700: the files hold result payloads in plaintext (README, "Data at rest").
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._wake = wake
        self._fsync = fsync
        self._queue: queue.SimpleQueue[tuple[ResultItem, float] | None] = queue.SimpleQueue()
        #: finished writes, appended by the writer thread, taken by the loop
        self._done: deque[Written] = deque()
        #: writes queued and not yet taken by :meth:`completed`
        self.pending = 0
        self._thread = threading.Thread(target=self._run, name="result-store", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ loop side

    def put(self, result: ResultItem, wall: float) -> None:
        """Write ``result``'s payload; :meth:`completed` hands it back once written."""
        self.pending += 1
        self._queue.put((result, wall))

    def completed(self) -> list[Written]:
        done = self._done
        taken: list[Written] = []
        while done:
            taken.append(done.popleft())
        self.pending -= len(taken)
        return taken

    def load(self, ref: StoredPayload) -> Any:
        """The payload behind ``ref``, mapped read-only (a buffer zmq sends as it is)."""
        path = self.path / f"{ref.key}.bin"
        fd = os.open(path, os.O_RDONLY)
        try:
            if ref.size == 0:
                return b""
            return mmap.mmap(fd, ref.size, prot=mmap.PROT_READ)
        finally:
            os.close(fd)

    def delete(self, ref: StoredPayload) -> None:
        try:
            (self.path / f"{ref.key}.bin").unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            logger.warning("result store: cannot remove %s: %s", ref.key, e)

    def sweep(self, keep: set[str]) -> int:
        """Remove files no retained result names; returns how many went."""
        removed = 0
        for entry in self.path.iterdir():
            if entry.name.endswith(".bin") and entry.name[:-4] in keep:
                continue
            try:
                entry.unlink()
                removed += 1
            except OSError:
                pass
        return removed

    def close(self) -> None:
        """Finish the queued writes and stop the thread."""
        self._queue.put(None)
        self._thread.join()

    # ------------------------------------------------------------ writer thread

    def _run(self) -> None:
        _lower_priority()
        while True:
            job = self._queue.get()
            if job is None:
                return
            result, wall = job
            ref: StoredPayload | None
            try:
                ref = self._write(result.task_id, result.payload)
            except OSError as e:
                logger.error("result store: cannot write the result of %r (%s); it is "
                             "journalled whole instead", result.task_id, e)
                ref = None
            self._done.append((result, wall, ref))
            self._wake()

    def _write(self, task_id: str, payload: Any) -> StoredPayload:
        key = key_of(task_id)
        final = self.path / f"{key}.bin"
        tmp = self.path / f"{key}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(payload)
            size = view.nbytes
            while view:
                written = os.write(fd, view)
                view = view[written:]
            if self._fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
        return StoredPayload(key, size)
