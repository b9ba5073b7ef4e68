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

Records (msgpack arrays):
    ``["A", id, payload, caps, agent, priority, timeout_s, max_retries, parent_id, client, wall]``
    ``["R", task_id, status, payload, error_code, error_message, agent, attempts, queued_ms, run_ms, wall]``

Compaction: once the log has grown by :data:`COMPACT_AFTER_BYTES` since the last one, the
broker rewrites it from memory (open tasks and retained results) into a new file that
replaces the old one atomically.
"""

from __future__ import annotations

import enum
import logging
import os
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import msgpack

logger = logging.getLogger(__name__)

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


@dataclass(slots=True)
class Replay:
    """What a journal held at start-up."""

    accepted: dict[str, list[Any]]
    results: dict[str, list[Any]]
    records: int
    truncated_bytes: int


def _frame(records: list[Any]) -> bytes:
    body = _packb(records)
    return _pack_header(len(body), _crc32(body)) + body


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

    # ---------------------------------------------------------------- start-up

    def open(self) -> Replay:
        """Read the log (repairing a torn tail) and open it for appending."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        replay = self._replay()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self.size = os.fstat(self._fd).st_size
        self._compacted_size = self.size
        return replay

    def _replay(self) -> Replay:
        accepted: dict[str, list[Any]] = {}
        results: dict[str, list[Any]] = {}
        records = 0
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return Replay(accepted, results, 0, 0)
        offset = 0
        end = len(data)
        header_size = _HEADER.size
        while offset + header_size <= end:
            length, crc = _HEADER.unpack_from(data, offset)
            body_start = offset + header_size
            body = data[body_start:body_start + length]
            if len(body) < length or _crc32(body) != crc:
                break
            try:
                batch = msgpack.unpackb(body, raw=False, strict_map_key=False)
            except Exception:  # noqa: BLE001 - a checksummed but undecodable frame ends the log too
                break
            if type(batch) is not list:
                break
            offset = body_start + length
            for record in batch:
                records += 1
                kind = record[0] if type(record) is list and record else None
                if kind == "A" and len(record) == 11:
                    accepted.setdefault(record[1], record)
                elif kind == "R" and len(record) == 11:
                    results[record[1]] = record
        truncated = end - offset
        if truncated:
            logger.warning("journal %s: %d byte(s) of torn or corrupt tail dropped after "
                           "%d good record(s)", self.path, truncated, records)
            with open(self.path, "r+b") as f:
                f.truncate(offset)
                f.flush()
                os.fsync(f.fileno())
        return Replay(accepted, results, records, truncated)

    # ---------------------------------------------------------------- writing

    def accepted(self, spec: Any, client: bytes, wall: float) -> None:
        """Record an accepted task (``spec`` is a protocol TaskSpec)."""
        payload = spec[1]
        if type(payload) is not bytes:
            payload = bytes(payload)
        self._buffer.append(("A", spec[0], payload, spec[2], spec[3], spec[4], spec[5],
                             spec[6], spec[7], client, wall))

    def finished(self, result: Any, wall: float) -> None:
        """Record a task's final result (``result`` is a protocol ResultItem)."""
        payload = result[2]
        if type(payload) is not bytes:
            payload = bytes(payload)
        self._buffer.append(("R", result[0], result[1], payload, result[3], result[4],
                             result[5], result[6], result[7], result[8], wall))

    @property
    def dirty(self) -> bool:
        return bool(self._buffer)

    def commit(self) -> None:
        """Write what this pass recorded (one write; fsync in FSYNC mode)."""
        if not self._buffer:
            return
        data = _frame(self._buffer)
        self._buffer = []
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        if self.durability is Durability.FSYNC:
            os.fsync(self._fd)
        self.size += len(data)

    def needs_compaction(self) -> bool:
        return self.size - self._compacted_size > COMPACT_AFTER_BYTES

    def compact(self, accepted: Iterable[tuple[Any, bytes, float]],
                results: Iterable[tuple[Any, float]]) -> None:
        """Replace the log with one holding only ``accepted`` (open tasks: spec, client,
        wall) and ``results`` (retained results: item, wall)."""
        self.commit()
        for spec, client, wall in accepted:
            self.accepted(spec, client, wall)
        for result, wall in results:
            self.finished(result, wall)
        data = b"".join(_frame(self._buffer[i:i + COMPACT_FRAME_RECORDS])
                        for i in range(0, len(self._buffer), COMPACT_FRAME_RECORDS))
        self._buffer = []
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        self.size = self._compacted_size = len(data)
        logger.info("journal compacted to %d bytes", self.size)

    def close(self) -> None:
        if self._fd >= 0:
            self.commit()
            if self.durability is not Durability.NONE:
                os.fsync(self._fd)
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

    def finished(self, result: Any, wall: float) -> None:
        pass

    def commit(self) -> None:
        pass

    def needs_compaction(self) -> bool:
        return False

    def close(self) -> None:
        pass


def open_journal(directory: Path, durability: Durability | str) -> Journal:
    """The journal for ``durability`` (a :class:`NullJournal` for ``none``)."""
    mode = Durability(durability)
    if mode is Durability.NONE:
        return NullJournal(directory)
    return Journal(directory, mode)
