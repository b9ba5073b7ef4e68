"""The journal's typed replay (broker/journal.py): what the broker wrote comes back as
:class:`AcceptedRecord` and :class:`FinishedRecord` with named fields, the header leads
the file without a frame of its own, and compaction keeps both."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq

from broker import __version__
from broker.journal import (
    JOURNAL_FORMAT, AcceptedRecord, FinishedRecord, HeaderRecord, Journal,
)
from wire.tasks import ResultItem, TaskSpec

_FRAME_HEADER = struct.Struct("<II")

SPEC = TaskSpec("t-1", b"\x81\xa4data\x01", ("echo", "gpu"), "agent-a", 4, 12.5, 3, "parent-1")
RESULT = ResultItem("t-1", "failed", b"\x81\xa4data\x02", "agent_error", "ValueError: no",
                    "echo", 2, 0.25, 7.5, False)


def frame_bodies(path: Path) -> list[Any]:
    data, bodies, offset = path.read_bytes(), [], 0
    while offset < len(data):
        length, _ = _FRAME_HEADER.unpack_from(data, offset)
        start = offset + _FRAME_HEADER.size
        bodies.append(msgpack.unpackb(data[start:start + length], raw=False))
        offset = start + length
    return bodies


def reopen(directory: Path) -> Any:
    journal = Journal(directory)
    replay = journal.open()
    journal.close()
    return replay


def write(directory: Path, *passes: list[tuple[Any, ...]]) -> None:
    """A journal of ``passes`` (one commit each) of ``("A", spec, client, wall)`` and
    ``("R", result, wall)`` entries, written the way the broker writes."""
    journal = Journal(directory)
    journal.open()
    for entries in passes:
        for kind, *fields in entries:
            (journal.accepted if kind == "A" else journal.finished)(*fields)
        journal.commit()
    journal.close()


def test_records_replay_with_named_fields(tmp_path: Path) -> None:
    # Given a task accepted and finished, journaled the way the broker does
    write(tmp_path, [("A", SPEC, b"client-1", 1_000.5), ("R", RESULT, 1_001.5)])
    # When the journal is replayed
    replay = reopen(tmp_path)
    # Then the records come back typed, every field under its name
    accepted = replay.accepted["t-1"]
    assert isinstance(accepted, AcceptedRecord)
    assert accepted == AcceptedRecord("A", "t-1", SPEC.payload, ("echo", "gpu"), "agent-a", 4,
                                      12.5, 3, "parent-1", b"client-1", 1_000.5)
    assert accepted.spec() == SPEC and type(accepted.spec()) is TaskSpec
    finished = replay.results["t-1"]
    assert isinstance(finished, FinishedRecord)
    assert (finished.status, finished.error_code, finished.error_message, finished.attempts,
            finished.queued_ms, finished.run_ms, finished.wall) == (
        "failed", "agent_error", "ValueError: no", 2, 0.25, 7.5, 1_001.5)
    # And the result is the one clients get (retryable is moot once a task ended)
    assert finished.item() == RESULT._replace(retryable=None)
    assert type(finished.item()) is ResultItem
    assert replay.records == 2 and replay.format == JOURNAL_FORMAT


def test_writers_and_records_agree_on_every_field(tmp_path: Path) -> None:
    # Given a record of each kind with a distinct value in every field
    write(tmp_path, [("A", SPEC, b"c", 1.0), ("R", RESULT, 2.0)])
    # Then the tuples on disk have exactly the typed records' fields, in their order
    records = [r for body in frame_bodies(tmp_path / Journal.FILE) for r in body]
    assert [len(r) for r in records] == [len(HeaderRecord._fields), len(AcceptedRecord._fields),
                                         len(FinishedRecord._fields)]
    # And each reads back under its name (arrays come back as tuples)
    replay = reopen(tmp_path)
    assert replay.accepted["t-1"]._asdict() == dict(zip(
        AcceptedRecord._fields, [*records[1][:3], tuple(records[1][3]), *records[1][4:]]))
    assert replay.results["t-1"]._asdict() == dict(zip(FinishedRecord._fields, records[2]))


def test_first_acceptance_and_last_result_win(tmp_path: Path) -> None:
    # Given a task accepted twice (a client sent it again) and two results recorded
    write(tmp_path, [("A", SPEC, b"first", 1.0)],
          [("A", SPEC, b"second", 2.0), ("R", RESULT._replace(status="timed_out"), 3.0),
           ("R", RESULT._replace(status="succeeded"), 4.0)])
    replay = reopen(tmp_path)
    assert replay.accepted["t-1"].client == b"first"
    assert replay.results["t-1"].status == "succeeded" and replay.results["t-1"].wall == 4.0


def test_the_header_rides_in_the_first_frame_and_is_no_task_record(tmp_path: Path) -> None:
    # Given a new journal whose first pass records two tasks
    write(tmp_path, [("A", SPEC, b"c", 1.0), ("A", SPEC._replace(id="t-2"), b"c", 1.0)],
          [("A", SPEC._replace(id="t-3"), b"c", 2.0)])
    # Then the file is two frames (one per commit): the header costs no write of its own
    bodies = frame_bodies(tmp_path / Journal.FILE)
    assert len(bodies) == 2
    assert bodies[0][0] == ["J", JOURNAL_FORMAT, __version__]
    assert [r[1] for r in bodies[0][1:]] == ["t-1", "t-2"]
    # And the replay counts only task records
    replay = reopen(tmp_path)
    assert replay.records == 3 and set(replay.accepted) == {"t-1", "t-2", "t-3"}


def test_a_journal_that_was_opened_and_closed_holds_just_its_header(tmp_path: Path) -> None:
    write(tmp_path)
    assert frame_bodies(tmp_path / Journal.FILE) == [[["J", JOURNAL_FORMAT, __version__]]]
    replay = reopen(tmp_path)
    assert (replay.records, replay.accepted, replay.format) == (0, {}, JOURNAL_FORMAT)
    # Reopening a file that has its header does not write another one
    assert len(frame_bodies(tmp_path / Journal.FILE)) == 1


def test_compaction_writes_the_header_first_and_replays_typed(tmp_path: Path) -> None:
    # Given a journal with an open task and a finished one
    journal = Journal(tmp_path)
    journal.open()
    journal.accepted(SPEC, b"c", 1.0)
    journal.accepted(SPEC._replace(id="open"), b"c", 1.0)
    journal.finished(RESULT, 2.0)
    journal.commit()
    # When it is compacted from the broker's memory
    journal.compact([(SPEC._replace(id="open"), b"c", 1.0), (SPEC, b"c", 1.0)],
                    [(RESULT, 2.0)])
    journal.accepted(SPEC._replace(id="after"), b"c", 3.0)
    journal.commit()
    journal.close()
    # Then the new file starts with the header, and replays the same typed records
    bodies = frame_bodies(tmp_path / Journal.FILE)
    assert bodies[0][0] == ["J", JOURNAL_FORMAT, __version__]
    replay = reopen(tmp_path)
    assert set(replay.accepted) == {"t-1", "open", "after"}
    assert replay.accepted["open"].spec() == SPEC._replace(id="open")
    assert replay.results["t-1"].item() == RESULT._replace(retryable=None)


@pytest.mark.parametrize("wrap", [bytearray, memoryview, zmq.Frame], ids=lambda w: w.__name__)
def test_payloads_of_any_buffer_type_replay_as_bytes(tmp_path: Path, wrap: Any) -> None:
    write(tmp_path, [("A", SPEC._replace(payload=wrap(b"big payload")), b"c", 1.0),
                     ("R", RESULT._replace(payload=wrap(b"big result")), 2.0)])
    replay = reopen(tmp_path)
    assert replay.accepted["t-1"].payload == b"big payload"
    assert type(replay.accepted["t-1"].payload) is bytes
    assert replay.results["t-1"].payload == b"big result"


def test_records_of_unknown_kind_or_length_are_skipped(tmp_path: Path) -> None:
    # Given a journal holding, besides good records, records no format writes
    journal = Journal(tmp_path)
    journal.open()
    journal.accepted(SPEC, b"c", 1.0)
    journal._buffer.extend([("A", "short"), ("X", 1, 2), (), ("R", *range(20))])
    journal.commit()
    journal.close()
    # Then they count as records read, and only the good one is replayed
    replay = reopen(tmp_path)
    assert replay.records == 5 and set(replay.accepted) == {"t-1"} and replay.results == {}
