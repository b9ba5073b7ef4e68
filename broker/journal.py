"""The durable journal: accepted tasks and their results, so work survives a broker crash.

An append-only log of framed msgpack records in ``DATA_DIR/journal.log``, written with
group commit: records collect in memory during one pass of the broker loop and go to the
file in one ``write`` before any network output of that pass (ACCEPTED included), plus
an ``fsync`` in ``fsync`` mode.

Why a log and not SQLite: the broker already holds every open task and retained result
in memory, so the journal is only ever read at start-up. Appending a pre-framed record
costs about a microsecond a task; an SQLite insert plus an update about six, most of the
broker's per-task budget.

Frame: ``[length: u32 little-endian][crc32: u32][msgpack array of records]``, one frame
per commit (a loop pass): one checksum and one pack call for the whole pass instead of
one per record. On replay a frame whose length runs past the end of the file or whose
checksum does not match ends the log (a torn last write): the file is truncated there and
the broker starts with everything before it. Only the last, unfinished pass can be lost
that way, and its ACCEPTED and RESULT messages were never sent.

Records (msgpack arrays; :meth:`Journal.open` hands them back typed):
    ``["J", format, release]``: the header, first record of the file (:class:`HeaderRecord`)
    ``["A", id, payload, caps, agent, priority, timeout_s, max_retries, parent_id, client, wall]``
    (:class:`AcceptedRecord`)
    ``["T", id, attempt_timeout_s]``: the task's per-attempt limit, right after its
    accepted record, only for a task that has one. A broker that predates it skips the
    record (it reads only ``A`` and ``R``) and runs the task with no per-attempt limit,
    as it reads a task accepted before the limit existed: no new format.
    ``["H", id]``: the task's result is held (SUBMIT's ``hold``) until a ``["U", id]``
    record releases it; like ``T``, right after its accepted record, and skipped by a
    broker that predates it (which then retains the result as any other).
    ``["K", id, scope]``: an attempt of the task went to an agent of the key whose scope
    (``wire.curve.key_scope``) this is; written on a ``--secure`` broker only, so that
    after a restart only an agent of that key may answer for the attempt (or claim it).
    Skipped by a broker that predates it (which then takes a late result from any
    registered agent, as a plaintext broker does).
    ``["R", task_id, status, payload, error_code, error_message, agent, attempts, queued_ms,
    run_ms, wall]`` (:class:`FinishedRecord`)
    ``["S", ...]``: an ``R`` record whose payload is ``[key, size]``, a file of the result
    store (``broker/results.py``); large payloads never enter the journal, and replay
    reads only the reference. A broker older than the result store skips ``S`` records
    (it reads only ``A`` and ``R``): those results are then unknown to it, nothing else.

Compaction: once the log has grown by :data:`COMPACT_AFTER_BYTES` since the last one, the
broker rewrites it from memory (open tasks and retained results) into a new file that
replaces the old one atomically.

Formats (:data:`JOURNAL_FORMAT`); a change to the framing or to a record's layout makes
a new one, and every broker reads all the older ones:

1. one record per frame (the first journals);
2. one frame per commit, its body an array of records;
3. format 2 with a header: the first record of the file's first frame is
   ``["J", 3, release]``.

The first frame keeps this framing in every format, and its first record is the header,
so any broker can tell a file's format before it reads on. A file without a header is
format 1 or 2 (told apart frame by frame: a body whose first element is a string is one
record). Opening an older format migrates it: the records are read and the file is
rewritten in this broker's format, as compaction does, before anything is appended. A
newer format is refused (:class:`JournalFormatError`) before a byte of the file changes.
The header costs nothing per record: it is queued once, when the file is empty, and goes
out with the first commit (and leads every compacted file).

A write that fails (a full disk, a quota, an I/O error: any ``OSError`` of the write or
the fsync) raises nothing into the broker's loop. The file is cut back to its last whole
frame (a disk that fills mid-write leaves part of a frame, and replay would stop there
and drop every frame after it), the frames stay in memory, in order, and
:attr:`Journal.failure` says why. The engine refuses new tasks meanwhile
(``storage_full``) and keeps serving the ones it holds; every later commit, and every
SUBMIT, tries the held frames again first, one frame a write (no frame is copied or
joined again), and the first write that succeeds clears the failure. A healthy commit
pays one list test for this: no syscall, nothing per record.
"""

from __future__ import annotations

import enum
import logging
from bisect import bisect_left
import os
import struct
import time
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, NamedTuple

import msgpack

from broker import __version__
from broker.engine.queues import StoredPayload, is_stored
from broker.results import ResultStore
from wire.tasks import ResultItem, TaskSpec

logger = logging.getLogger(__name__)

#: The format this broker writes (module docstring, "Formats"); it reads every older one.
JOURNAL_FORMAT: Final = 3
#: The formats without a header: told apart by the shape of each frame.
_ONE_RECORD_PER_FRAME: Final = 1
_FRAME_PER_COMMIT: Final = 2

#: Grow by this much, then compact.
COMPACT_AFTER_BYTES: Final = 256 * 1024 * 1024
#: Records per frame in a compacted log (frames stay well below memory-hungry sizes).
COMPACT_FRAME_RECORDS: Final = 4096
_HEADER = struct.Struct("<II")
_packb = msgpack.Packer(use_bin_type=True).pack
_crc32 = zlib.crc32
_pack_header = _HEADER.pack


class Durability(str, enum.Enum):
    """How hard the broker tries to keep accepted work."""

    #: no journal: a broker crash loses open tasks (clients submit them again)
    NONE = "none"
    #: written to the OS each pass: survives a broker crash, not a power loss
    BATCH = "batch"
    #: fsync'd each pass: survives a power loss too
    FSYNC = "fsync"


class JournalFormatError(OSError):
    """Raised when ``journal.log`` is in a format this broker cannot read (a newer one,
    or a header it does not understand). The message says what to do.

    An ``OSError``, like any other journal file the broker cannot use: start-up reports
    it in one line and exits non-zero (``python -m broker``).
    """


class HeaderRecord(NamedTuple):
    """The first record of a journal file (format 3 on): the file's format and the
    release of the broker that started the file."""

    kind: Literal["J"]
    format: int
    release: str


class AcceptedRecord(NamedTuple):
    """An accepted task: its :class:`~wire.tasks.TaskSpec` fields, the routing id of the
    client that submitted it, and when (wall-clock seconds)."""

    kind: Literal["A"]
    task_id: str
    payload: bytes
    capabilities: tuple[str, ...]
    agent: str | None
    priority: int
    timeout_s: float | None
    max_retries: int | None
    parent_id: str | None
    client: bytes
    wall: float

    def spec(self, attempt_timeout_s: float | None = None, hold: bool = False) -> TaskSpec:
        """The task as its client submitted it (its per-attempt limit and hold are kept
        apart: :attr:`Replay.attempt_limits`, :attr:`Replay.held`)."""
        return _new_tuple(TaskSpec, (*self[1:9], attempt_timeout_s, hold))


class FinishedRecord(NamedTuple):
    """A task's final result: its :class:`~wire.tasks.ResultItem` fields (but
    ``retryable``, moot once a task has ended) and when it ended (wall-clock seconds)."""

    #: "S": the payload is in the result store, and the record holds its
    #: ``[key, size]`` (read back as a :class:`~broker.engine.StoredPayload`)
    kind: Literal["R", "S"]
    task_id: str
    status: str
    payload: bytes
    error_code: str | None
    error_message: str | None
    agent: str | None
    attempts: int
    queued_ms: float | None
    run_ms: float | None
    wall: float

    def item(self) -> ResultItem:
        """The result as the broker hands it to clients."""
        return _new_tuple(ResultItem, (*self[1:10], None))


_new_tuple = tuple.__new__
#: Fields of a record of each kind (the writers below build plain tuples in this order).
_ACCEPTED_FIELDS: Final = len(AcceptedRecord._fields)
_FINISHED_FIELDS: Final = len(FinishedRecord._fields)


class JournalFailure(NamedTuple):
    """Why the journal cannot write: the last failed write's error, since when."""

    #: for people: the file and the error (``[Errno 28] No space left on device``)
    message: str
    #: wall-clock seconds of the first failed write of this spell
    since: float
    #: the ``errno`` of the last failed write (``errno.ENOSPC`` for a full disk)
    errno: int | None


@dataclass(slots=True)
class Replay:
    """What a journal held at start-up: the first accepted record of each task and the
    last result record, by task id."""

    accepted: dict[str, AcceptedRecord]
    results: dict[str, FinishedRecord]
    records: int
    truncated_bytes: int
    #: the format the file was in (:data:`JOURNAL_FORMAT` for a new or empty file); an
    #: older one has been migrated by :meth:`Journal.open`
    format: int = JOURNAL_FORMAT
    #: per-attempt limits (``T`` records) by task id; a task without one has none
    attempt_limits: dict[str, float] = field(default_factory=dict)
    #: tasks whose result is held (``H`` records not followed by a ``U``)
    held: set[str] = field(default_factory=set)
    #: the key scopes of the agents that held an attempt of each task (``K`` records;
    #: written by a ``--secure`` broker only)
    holder_scopes: dict[str, set[str]] = field(default_factory=dict)


def _private_opener(path: str, flags: int) -> int:
    """``open``'s opener for a file only its owner reads (0600)."""
    return os.open(path, flags, 0o600)


def _frame(records: list[Any]) -> bytes:
    body = _packb(records)
    return _pack_header(len(body), _crc32(body)) + body


#: The first record of every file this broker starts (:class:`HeaderRecord`).
_FILE_HEADER: Final = HeaderRecord("J", JOURNAL_FORMAT, __version__)


def _bodies(data: bytes) -> Iterator[tuple[int, tuple[Any, ...]]]:
    """Each good frame's decoded body (arrays as tuples) with the offset where the frame
    ends, up to the first frame that is torn, fails its checksum or does not decode to an
    array: that one and everything after it are the tail the journal drops."""
    offset = 0
    end = len(data)
    header_size = _HEADER.size
    while offset + header_size <= end:
        length, crc = _HEADER.unpack_from(data, offset)
        body_start = offset + header_size
        body = data[body_start:body_start + length]
        if len(body) < length or _crc32(body) != crc:
            return
        try:
            batch = msgpack.unpackb(body, raw=False, strict_map_key=False, use_list=False)
        except Exception:  # noqa: BLE001 - a checksummed but undecodable frame ends the log too
            return
        if type(batch) is not tuple:
            return
        offset = body_start + length
        yield offset, batch


#: Upper bounds (seconds) of the journal commit latency histogram's buckets; a last,
#: unbounded bucket (+Inf) follows.
COMMIT_BUCKETS_S: Final = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                           0.1, 0.25, 1.0)


class CommitTimes:
    """How long the journal's writes took (one per loop pass that recorded something,
    with its fsync in fsync mode): plain counts, which the metrics endpoint reads when
    scraped (``broker/metrics.py``)."""

    __slots__ = ("buckets", "sum_s")

    def __init__(self) -> None:
        #: per-bucket (not cumulative) counts; the last is +Inf
        self.buckets = [0] * (len(COMMIT_BUCKETS_S) + 1)
        self.sum_s = 0.0

    def add(self, seconds: float) -> None:
        self.buckets[bisect_left(COMMIT_BUCKETS_S, seconds)] += 1
        self.sum_s += seconds


class Journal:
    """Append-only task journal in ``directory``.

    Args:
        directory: the broker's data dir.
        durability: BATCH writes each pass, FSYNC also fsyncs (NONE: use
            :class:`NullJournal`).
    """

    FILE = "journal.log"

    def __init__(self, directory: Path, durability: Durability = Durability.BATCH) -> None:
        self.path = Path(directory) / self.FILE
        self.durability = durability
        self._buffer: list[tuple[Any, ...]] = []
        self._fd = -1
        self.size = 0
        self._compacted_size = 0
        #: how long each write took (for /metrics)
        self.commit_times = CommitTimes()
        #: frames a failed write left, oldest first; written before anything newer
        self._unwritten: list[bytes] = []
        #: why the last write failed; None while writes succeed
        self.failure: JournalFailure | None = None
        #: where payloads of at least ``store_threshold`` bytes go (:meth:`attach_store`)
        self.store: ResultStore | None = None
        self.store_threshold: float = float("inf")

    def attach_store(self, store: ResultStore, threshold: int) -> None:
        """Send payloads of at least ``threshold`` bytes to ``store`` from now on."""
        self.store = store
        self.store_threshold = threshold

    # ---------------------------------------------------------------- start-up

    def open(self) -> Replay:
        """Read the log (repairing a torn tail, migrating an older format) and open it
        for appending.

        Raises:
            JournalFormatError: the file is in a newer format, or has a header this
                broker does not understand; the file is left as it was.
            OSError: the file cannot be read or written.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        replay = self._replay()
        if replay.format < JOURNAL_FORMAT:
            self._migrate(replay)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        # The journal holds task payloads in plaintext: a file an older broker left
        # readable by others (its compaction wrote 0644) is closed to them now.
        os.fchmod(self._fd, 0o600)
        self.size = os.fstat(self._fd).st_size
        self._compacted_size = self.size
        if self.size == 0:
            # The header leaves with the first commit, in the first frame (a frame of
            # its own would be one more write at start-up, and nothing per record).
            self._buffer.append(_FILE_HEADER)
        return replay

    def _replay(self) -> Replay:
        accepted: dict[str, AcceptedRecord] = {}
        results: dict[str, FinishedRecord] = {}
        limits: dict[str, float] = {}
        held: set[str] = set()
        holder_scopes: dict[str, set[str]] = {}
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return Replay(accepted, results, 0, 0)
        records = 0
        found = JOURNAL_FORMAT  # a file without a good frame holds nothing to migrate
        good_end = 0
        for index, (good_end, batch) in enumerate(_bodies(data)):
            single = bool(batch) and type(batch[0]) is str
            if single:
                batch = (batch,)  # format 1: the body is one record
            if index == 0:
                found = _ONE_RECORD_PER_FRAME if single else _FRAME_PER_COMMIT
                first = batch[0] if batch else None
                if type(first) is tuple and first[:1] == ("J",):
                    found = self._check_header(first)
                    batch = batch[1:]
            for record in batch:
                records += 1
                if type(record) is not tuple or not record:
                    continue
                kind = record[0]
                if kind == "A" and len(record) == _ACCEPTED_FIELDS:
                    accepted.setdefault(record[1], _new_tuple(AcceptedRecord, record))
                elif kind == "R" and len(record) == _FINISHED_FIELDS:
                    results[record[1]] = _new_tuple(FinishedRecord, record)
                elif kind == "T" and len(record) == 3:
                    limits[record[1]] = record[2]
                elif kind == "H" and len(record) == 2:
                    held.add(record[1])
                elif kind == "U" and len(record) == 2:
                    held.discard(record[1])
                elif kind == "K" and len(record) == 3 and type(record[2]) is str:
                    holder_scopes.setdefault(record[1], set()).add(record[2])
                elif kind == "S" and len(record) == _FINISHED_FIELDS:
                    ref = record[3]
                    results[record[1]] = _new_tuple(FinishedRecord, (
                        *record[:3], StoredPayload(str(ref[0]), int(ref[1])), *record[4:]))
        truncated = len(data) - good_end
        if truncated:
            logger.warning("journal %s: %d byte(s) of torn or corrupt tail dropped after "
                           "%d good record(s)", self.path, truncated, records)
            with open(self.path, "r+b") as f:
                f.truncate(good_end)
                f.flush()
                os.fsync(f.fileno())
        return Replay(accepted, results, records, truncated, found, attempt_limits=limits,
                      held=held, holder_scopes=holder_scopes)

    def _check_header(self, header: tuple[Any, ...]) -> int:
        """The format a header names, if this broker reads it.

        Raises:
            JournalFormatError: a newer format, or a header this broker does not know.
        """
        fmt = header[1] if len(header) > 1 else None
        if fmt == JOURNAL_FORMAT:
            return JOURNAL_FORMAT
        aside = f"mv {self.path} {self.path}.unread"
        if type(fmt) is int and fmt > JOURNAL_FORMAT:
            release = header[2] if len(header) > 2 else "?"
            raise JournalFormatError(
                f"{self.path} is journal format {fmt} (written by Orchestrator {release}), "
                f"newer than this broker (Orchestrator {__version__}) reads (formats 1 to "
                f"{JOURNAL_FORMAT}): run Orchestrator {release} or later, or move the file "
                f"aside to start without its tasks ({aside})")
        raise JournalFormatError(
            f"{self.path} starts with a journal header this broker (Orchestrator "
            f"{__version__}) does not understand ({header!r:.80}): move the file aside to "
            f"start without its tasks ({aside})")

    def _migrate(self, replay: Replay) -> None:
        """Rewrite a file of an older format in this one, before anything is appended."""
        records: list[tuple[Any, ...]] = [_FILE_HEADER, *replay.accepted.values(),
                                          *replay.results.values()]
        records.extend(("T", task_id, limit) for task_id, limit
                       in replay.attempt_limits.items())
        records.extend(("H", task_id) for task_id in replay.held)
        records.extend(("K", task_id, scope) for task_id, scopes
                       in replay.holder_scopes.items() for scope in sorted(scopes))
        size = self._replace_file(records)
        logger.warning("journal %s: migrated from format %d to format %d (%d record(s) "
                       "read, %d kept, %d bytes)", self.path, replay.format, JOURNAL_FORMAT,
                       replay.records, len(records) - 1, size)

    def _replace_file(self, records: list[tuple[Any, ...]]) -> int:
        """Write ``records`` to a new file that replaces the log atomically; returns its
        size. The caller puts the header first."""
        data = b"".join(_frame(records[i:i + COMPACT_FRAME_RECORDS])
                        for i in range(0, len(records), COMPACT_FRAME_RECORDS))
        tmp = self.path.with_suffix(".tmp")
        # 0600 like the journal it replaces (payloads in plaintext); a stale temporary
        # file would keep its old mode through O_TRUNC, so it goes first.
        tmp.unlink(missing_ok=True)
        with open(tmp, "wb", opener=_private_opener) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        return len(data)

    # ---------------------------------------------------------------- writing

    def accepted(self, spec: Any, client: bytes, wall: float) -> None:
        """Record an accepted task (``spec`` is a protocol TaskSpec), as the fields of an
        :class:`AcceptedRecord` in order: a plain tuple, the cheapest to build."""
        payload = spec[1]
        if type(payload) is not bytes:
            payload = bytes(payload)
        self._buffer.append(("A", spec[0], payload, spec[2], spec[3], spec[4], spec[5],
                             spec[6], spec[7], client, wall))
        if spec[8] is not None:
            self._buffer.append(("T", spec[0], spec[8]))
        if spec[9]:
            self._buffer.append(("H", spec[0]))

    def released(self, task_ids: list[str]) -> None:
        """Record that the held results of ``task_ids`` may go (RELEASE)."""
        self._buffer.extend(("U", task_id) for task_id in task_ids)

    def held_by_key(self, task_id: str, scope: str) -> None:
        """Record that an agent of the key with ``scope`` holds an attempt of the task."""
        self._buffer.append(("K", task_id, scope))

    def finished(self, result: Any, wall: float) -> bool | None:
        """Record a task's final result (``result`` is a protocol ResultItem), as the
        fields of a :class:`FinishedRecord` in order. A payload of at least
        :attr:`store_threshold` bytes goes to the result store instead (True: its RESULT
        waits for the write, see ``broker/results.py``); a stored one is recorded as an
        ``S`` record naming its file."""
        payload = result[2]
        if is_stored(payload):
            self._buffer.append(("S", result[0], result[1], list(payload), result[3],
                                 result[4], result[5], result[6], result[7], result[8],
                                 wall))
            return None
        # The size first: a large payload arrives as a view of libzmq's buffer, and goes
        # to the store from there without a copy.
        if len(payload) >= self.store_threshold and self.store is not None:
            self.store.put(result, wall)
            return True
        self._record_inline(result, payload if type(payload) is bytes else bytes(payload),
                            wall)
        return None

    def finished_inline(self, result: Any, wall: float) -> None:
        """Record a final result with its payload in the journal itself, never the store
        (the store could not write it)."""
        payload = result[2]
        self._record_inline(result, payload if type(payload) is bytes else bytes(payload),
                            wall)

    def _record_inline(self, result: Any, payload: bytes, wall: float) -> None:
        self._buffer.append(("R", result[0], result[1], payload, result[3], result[4],
                             result[5], result[6], result[7], result[8], wall))

    @property
    def dirty(self) -> bool:
        return bool(self._buffer) or bool(self._unwritten)

    def commit(self) -> None:
        """Write what this pass recorded (one write; fsync in FSYNC mode). A failed write
        raises nothing: the frame is held and :attr:`failure` set (module docstring)."""
        if self._buffer:
            data = _frame(self._buffer)
            self._buffer = []
            if not self._unwritten:
                try:
                    self._write(data)
                except OSError as e:
                    self._hold([data], e)
                return
            self._unwritten.append(data)
        if self._unwritten:
            self._write_unwritten()

    def retry(self) -> JournalFailure | None:
        """After a failed write, write what it left (and this pass's records) now.

        Returns:
            The failure that remains; None once everything held is written.
        """
        if self.failure is not None:
            self.commit()
        return self.failure

    def _write(self, data: bytes) -> None:
        """Append one frame (and fsync in FSYNC mode); ``size`` counts it once it is in.

        Raises:
            OSError: the write or the fsync failed, perhaps after part of the frame.
        """
        started = time.perf_counter()
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        if self.durability is Durability.FSYNC:
            os.fsync(self._fd)
        self.commit_times.add(time.perf_counter() - started)
        self.size += len(data)

    def _hold(self, frames: list[bytes], error: OSError) -> None:
        """Keep ``frames`` for a later write, cut the file back to its last whole frame."""
        self._unwritten = frames
        try:
            os.ftruncate(self._fd, self.size)
        except OSError as e:  # tried again before the next write
            logger.error("journal %s: cannot cut a failed write back: %s", self.path, e)
        message = f"cannot write the journal {self.path}: {error.strerror or error}"
        if self.failure is None:
            logger.error("%s; new tasks are refused (storage_full) until a write succeeds",
                         message)
            self.failure = JournalFailure(message, time.time(), error.errno)
        else:
            self.failure = self.failure._replace(message=message, errno=error.errno)

    def _write_unwritten(self) -> None:
        """Write the held frames in order, as far as the disk takes them."""
        unwritten = self._unwritten
        try:
            # A failed write whose cut failed too left part of a frame: cut it now.
            os.ftruncate(self._fd, self.size)
            while unwritten:
                self._write(unwritten[0])
                del unwritten[0]
        except OSError as e:
            self._hold(unwritten, e)
            return
        if self.failure is not None:
            logger.warning("journal %s: writes succeed again after %.1f s; new tasks are "
                           "accepted again", self.path, time.time() - self.failure.since)
            self.failure = None

    def needs_compaction(self) -> bool:
        return self.size - self._compacted_size > COMPACT_AFTER_BYTES

    def compact(self, accepted: Iterable[tuple[Any, bytes, float]],
                results: Iterable[tuple[Any, float]],
                holders: Iterable[tuple[str, str]] = ()) -> bool:
        """Replace the log with one holding only ``accepted`` (the tasks of both: spec,
        client, wall), ``results`` (retained results: item, wall) and ``holders`` (open
        tasks' holder key scopes: task id, scope). A retained result needs its task's
        accepted record too: replay restores only results whose task it knows.

        A compaction that cannot write its file (a full disk) leaves the log as it was,
        whole, and is tried again after another :data:`COMPACT_AFTER_BYTES`.

        Returns:
            Whether the new file replaced the old one (PURGE answers only then).
        """
        self.commit()
        if self.failure is not None:
            return False
        self._buffer.append(_FILE_HEADER)
        for spec, client, wall in accepted:
            self.accepted(spec, client, wall)
        store, self.store = self.store, None  # nothing is handed to the store twice
        try:
            for result, wall in results:
                self.finished(result, wall)
        finally:
            self.store = store
        for task_id, scope in holders:
            self.held_by_key(task_id, scope)
        records, self._buffer = self._buffer, []
        try:
            size = self._replace_file(records)
        except OSError as e:
            self.path.with_suffix(".tmp").unlink(missing_ok=True)
            self._compacted_size = self.size
            logger.error("journal %s: compaction failed, the log stays as it is: %s",
                         self.path, e)
            return False
        os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        self.size = self._compacted_size = size
        logger.info("journal compacted to %d bytes", self.size)
        return True

    def close(self) -> None:
        if self._fd < 0:
            return
        self.commit()
        if self._unwritten:
            assert self.failure is not None
            logger.error("journal %s: %d byte(s) of records could not be written (%s): "
                         "what was accepted or finished since then is not in the journal",
                         self.path, sum(map(len, self._unwritten)), self.failure.message)
        try:
            if self.durability is not Durability.NONE:
                os.fsync(self._fd)
        except OSError as e:
            logger.error("journal %s: fsync at close failed: %s", self.path, e)
        os.close(self._fd)
        self._fd = -1


class NullJournal(Journal):
    """Durability ``none``: records nothing, replays nothing."""

    def __init__(self, directory: Path, durability: Durability = Durability.NONE) -> None:
        super().__init__(directory, Durability.NONE)

    def open(self) -> Replay:
        return Replay({}, {}, 0, 0)

    def accepted(self, spec: Any, client: bytes, wall: float) -> None:
        pass

    def finished(self, result: Any, wall: float) -> bool | None:
        return None

    def finished_inline(self, result: Any, wall: float) -> None:
        return None

    def released(self, task_ids: list[str]) -> None:
        pass

    def held_by_key(self, task_id: str, scope: str) -> None:
        pass

    def commit(self) -> None:
        pass

    def retry(self) -> JournalFailure | None:
        return None

    def needs_compaction(self) -> bool:
        return False

    def compact(self, accepted: Iterable[tuple[Any, bytes, float]],
                results: Iterable[tuple[Any, float]],
                holders: Iterable[tuple[str, str]] = ()) -> bool:
        return True  # nothing on disk

    def close(self) -> None:
        pass


def open_journal(directory: Path, durability: Durability | str) -> Journal:
    """The journal for ``durability`` (a :class:`NullJournal` for ``none``)."""
    mode = Durability(durability)
    if mode is Durability.NONE:
        return NullJournal(directory)
    return Journal(directory, mode)
