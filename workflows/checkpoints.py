"""A run's checkpoints: what finished, written in batches and read back by a new runner.

The log is a series of keys ``wf/ckpt/<run>/<seq>``, each one batch::

    {"at": wall time, "done": steps done, "total": steps planned,
     "entries": {path: msgpack bytes of the entry, ...}}

An entry is a finished task (:mod:`workflows.outputs`) or a decision a node recorded
(a consensus's voters, an approval's answer). Steps record their entry and go on (a map
records each loop pass's items at once, :meth:`CheckpointLog.record_tasks`); one writer
task writes whatever finished meanwhile as the next batch once the previous write is done
and at least :data:`BATCH_INTERVAL_S` after it began, or at once when someone flushes. So a
map whose items finish by the thousand makes one state write per 50 ms, not one per
item (group commit, as the broker's journal does): 10,000 items made about 40 writes
without the interval, and the state service's thread spent 4 us an item on them; with it,
about 6 writes and 1 us an item.

Every write carries the runner's lease as its fencing guard: a runner that lost the run
to another cannot write into it. A batch's task results are released from the broker's
hold once the batch is written (not before: until then the broker's copy is the only
one).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final

from agent_sdk import Lease, StateClient, StateError
from wire.codec import packb, unpackb
from workflows import ids
from workflows.outputs import entry_ok, INLINE_ENTRY_MAX_BYTES, reference_entry, SUCCEEDED
from workflows.runs import retry_unavailable

logger = logging.getLogger(__name__)

#: Bytes of entries per batch: well under the state service's 1 MiB value limit, with
#: room for the keys (every inline entry is at most INLINE_ENTRY_MAX_BYTES).
MAX_BATCH_BYTES: Final = 512 * 1024
#: Least time between the starts of two batch writes: what finishes meanwhile goes into
#: the next batch. Nothing waits on it but a crash's replay (a result not checkpointed
#: yet is still held in the broker, and a new runner attaches to it by its task id);
#: :meth:`CheckpointLog.flush` writes at once.
BATCH_INTERVAL_S: Final = 0.05


@dataclass
class LoadedLog:
    """A run's checkpoints as read back.

    Attributes:
        entries: the entry of every checkpointed path (the last batch wins).
        next_seq: the sequence number of the next batch.
        done: steps done, as of the last batch.
        total: steps planned, as of the last batch.
    """

    entries: dict[str, dict[str, Any]] = field(default_factory=dict)
    next_seq: int = 0
    done: int = 0
    total: int = 0


async def load_log(state: StateClient, run_id: str) -> LoadedLog:
    """Read every checkpoint batch of ``run_id``."""
    log = LoadedLog()
    prefix = ids.checkpoint_prefix(run_id)
    for item in await state.list(prefix):
        batch = item.value
        if not isinstance(batch, dict):
            continue
        try:
            seq = int(item.key[len(prefix):])
        except ValueError:
            continue
        log.next_seq = max(log.next_seq, seq + 1)
        log.done = int(batch.get("done", log.done))
        log.total = int(batch.get("total", log.total))
        for path, packed in (batch.get("entries") or {}).items():
            entry = unpackb(packed) if isinstance(packed, (bytes, bytearray)) else packed
            if isinstance(entry, dict):
                log.entries[str(path)] = entry
    return log


class CheckpointLog:
    """Records entries and writes them in batches (see the module docstring).

    Args:
        state: the state service.
        run_id: the run.
        loaded: what earlier runners checkpointed.
        fence: the runner's lease on the run (every write is guarded by it).
        progress: returns ``(done, total)`` for each batch.
        on_written: called after each batch with the task ids whose results it holds
            inline (to release them from the broker's hold).
        on_lost: called once if a write is refused (the lease is gone: a
            :class:`~agent_sdk.StaleFencingToken`; or the service refuses the batch).
    """

    def __init__(self, state: StateClient, run_id: str, loaded: LoadedLog, fence: Lease,
                 progress: Callable[[], tuple[int, int]],
                 on_written: Callable[[list[str]], Awaitable[None]],
                 on_lost: Callable[[Exception], None]) -> None:
        self.state = state
        self.run_id = run_id
        self.entries = loaded.entries
        #: entries recorded by :meth:`record_tasks`, packed (inline ones; references
        #: are in ``entries``)
        self._packed: dict[str, bytes] = {}
        self.fence = fence
        self._seq = loaded.next_seq
        self._progress = progress
        self._on_written = on_written
        self._on_lost = on_lost
        #: packed entries waiting for the next batch, in record order
        self._pending: dict[str, bytes] = {}
        self._pending_bytes = 0
        self._pending_release: list[str] = []
        self._recorded = 0
        self._written = 0
        self._flushes: list[tuple[int, asyncio.Future[None]]] = []
        self._wake = asyncio.Event()
        #: set by flush: write now, do not wait for BATCH_INTERVAL_S
        self._urgent = asyncio.Event()
        self._failure: Exception | None = None
        self._writer = asyncio.get_running_loop().create_task(
            self._write_loop(), name=f"checkpoints-{run_id}")

    @property
    def references(self) -> list[str]:
        """Task ids whose results the log keeps by reference (held until the run ends)."""
        return [str(entry["t"]) for entry in self.entries.values()
                if entry.get("ref") and "t" in entry]

    def get(self, path: str) -> dict[str, Any] | None:
        """The entry checkpointed for ``path`` (by an earlier runner or this one)."""
        entry = self.entries.get(path)
        if entry is None:
            packed = self._packed.get(path)
            if packed is not None:
                entry = unpackb(packed)
        return entry

    def empty(self) -> bool:
        """Whether nothing is checkpointed (a fresh run: no step to look up)."""
        return not self.entries and not self._packed

    def record(self, path: str, entry: dict[str, Any], task_id: str | None = None) -> None:
        """Checkpoint ``entry`` for ``path`` in the next batch.

        Args:
            task_id: the held task whose result the entry holds: released once written
                (unless the entry is too large and kept by reference instead).
        """
        if self._failure is not None:
            return  # the lease is gone: the next runner records it
        packed = packb(entry)
        size = len(packed)
        if size > INLINE_ENTRY_MAX_BYTES and entry_ok(entry) and task_id is not None:
            entry = reference_entry(entry, size)
            packed = packb(entry)
            size = len(packed)
        elif task_id is not None:
            self._pending_release.append(task_id)
        self.entries[path] = entry
        if self._packed:
            self._packed.pop(path, None)
        self._pending[path] = packed
        self._pending_bytes += size + len(path)
        self._recorded += 1
        if not self._wake.is_set():
            self._wake.set()

    def record_tasks(self, finished: list[tuple[str, dict[str, Any], str]]) -> None:
        """:meth:`record` for many finished tasks at once: ``(path, entry, task_id)``
        each (a map's items: one call per loop pass, not one per item)."""
        if self._failure is not None or not finished:
            return
        entries = self.entries
        kept = self._packed
        pending = self._pending
        release = self._pending_release
        added = 0
        for path, entry, task_id in finished:
            packed = packb(entry)
            size = len(packed)
            if size > INLINE_ENTRY_MAX_BYTES and entry.get("s") == SUCCEEDED:
                entry = reference_entry(entry, size)
                packed = packb(entry)
                size = len(packed)
                entries[path] = entry
            else:
                release.append(task_id)
                # Kept packed: bytes are no work for the cyclic GC, and 10,000 entry
                # dicts kept alive made it collect dozens of times per map.
                kept[path] = packed
                if entries:
                    entries.pop(path, None)  # an earlier runner's entry for it
            pending[path] = packed
            added += size + len(path)
        self._pending_bytes += added
        self._recorded += len(finished)
        if not self._wake.is_set():
            self._wake.set()

    async def flush(self) -> None:
        """Return once every entry recorded so far is written.

        Raises:
            StateError: a write was refused (a :class:`~agent_sdk.StaleFencingToken`:
                the lease is gone); nothing more is written.
        """
        if self._failure is not None:
            raise self._failure
        if self._written >= self._recorded:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._flushes.append((self._recorded, future))
        self._urgent.set()
        await future

    async def close(self) -> None:
        """Stop the writer (what is not written yet is not: flush first to keep it)."""
        self._writer.cancel()
        await asyncio.gather(self._writer, return_exceptions=True)
        for _, future in self._flushes:
            if not future.done():
                future.cancel()
        self._flushes.clear()

    def _take_batch(self) -> tuple[dict[str, bytes], list[str], int]:
        """The entries of the next batch (at most MAX_BATCH_BYTES), the task ids to
        release after it, and how many records it covers."""
        if self._pending_bytes <= MAX_BATCH_BYTES:
            batch, self._pending, self._pending_bytes = self._pending, {}, 0
        else:
            batch = {}
            size = 0
            for path in list(self._pending):
                packed = self._pending[path]
                if batch and size + len(packed) + len(path) > MAX_BATCH_BYTES:
                    break
                batch[path] = self._pending.pop(path)
                size += len(packed) + len(path)
            self._pending_bytes -= size
        # Released only once every entry recorded with them is written: a batch cut
        # short releases nothing until the rest is written too.
        release: list[str] = []
        if not self._pending:
            release, self._pending_release = self._pending_release, []
        return batch, release, len(batch)

    async def _write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        last_write = -BATCH_INTERVAL_S
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                delay = last_write + BATCH_INTERVAL_S - loop.time()
                if delay > 0 and not self._flushes:
                    # Gather more into this batch, unless someone waits for it.
                    self._urgent.clear()
                    try:
                        await asyncio.wait_for(self._urgent.wait(), delay)
                    except asyncio.TimeoutError:
                        pass
                last_write = loop.time()
                batch, release, count = self._take_batch()
                done, total = self._progress()
                value = {"at": time.time(), "done": done, "total": total, "entries": batch}
                key = ids.checkpoint_key(self.run_id, self._seq)
                try:
                    # The same key and value again after a lost answer: idempotent.
                    await retry_unavailable(
                        lambda: self.state.set(key, value, fence=self.fence),
                        f"checkpoint {key}")
                except StateError as e:
                    # The lease is gone (stale token), or the service refuses the batch.
                    self._fail(e)
                    return
                self._seq += 1
                self._written += count
                self._settle_flushes()
                if release:
                    try:
                        await self._on_written(release)
                    except Exception:  # noqa: BLE001 - a release lost is retention, not data
                        logger.exception("releasing %d checkpointed results of run %s failed",
                                         len(release), self.run_id)

    def _settle_flushes(self) -> None:
        waiting = []
        for target, future in self._flushes:
            if target <= self._written:
                if not future.done():
                    future.set_result(None)
            else:
                waiting.append((target, future))
        self._flushes = waiting

    def _fail(self, error: Exception) -> None:
        self._failure = error
        for _, future in self._flushes:
            if not future.done():
                future.set_exception(error)
        self._flushes.clear()
        self._on_lost(error)


__all__ = ["BATCH_INTERVAL_S", "CheckpointLog", "LoadedLog", "MAX_BATCH_BYTES", "load_log"]
