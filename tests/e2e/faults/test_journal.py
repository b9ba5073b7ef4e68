"""The journal (broker/journal.py): a torn or corrupt tail is dropped and everything
before it survives; and a broker SIGKILLed, its journal damaged, starts anyway with every
task whose ACCEPTED the client had received."""

from __future__ import annotations

import random
import shutil
import struct
from pathlib import Path
from typing import Any

import msgpack
import pytest

from agent_sdk.errors import TaskNotFound
from broker.journal import Durability, Journal, NullJournal, open_journal
from wire.tasks import ResultItem, TaskSpec
from tests.conftest import Cluster
from tests.e2e.faults.checker import WireTap, check, read_log
from tests.e2e.faults.support import (
    WAIT_S, collect, learn_boot, restart_logged, wait_status,
)

AGENTS = "tests.e2e.faults.agents"
HEADER = struct.Struct("<II")

# ------------------------------------------------------------------ unit: broker/journal.py


def spec(task_id: str) -> TaskSpec:
    return TaskSpec(task_id, b"\x81\xa4data\xa2hi", ("echo",), None, 0, 10.0, 2, None)


def result(task_id: str) -> ResultItem:
    return ResultItem(task_id, "succeeded", b"\x81\xa4data\x01", None, None, "echo", 1, 0.5,
                      1.5)


def frames(path: Path) -> list[tuple[int, int]]:
    """(start, end) of each frame of a well-formed journal file."""
    data = path.read_bytes()
    spans, offset = [], 0
    while offset < len(data):
        length, _ = HEADER.unpack_from(data, offset)
        spans.append((offset, offset + HEADER.size + length))
        offset += HEADER.size + length
    assert offset == len(data), "the journal under test must be well formed"
    return spans


def frame_records(path: Path, span: tuple[int, int]) -> list[tuple[str, str]]:
    """(kind, task id) of each record in one frame, whichever way records are framed
    (one per frame, or one frame per commit)."""
    body = msgpack.unpackb(path.read_bytes()[span[0] + HEADER.size:span[1]], raw=False)
    records = [body] if body and isinstance(body[0], str) else body
    return [(r[0], r[1]) for r in records]


def replayed(replay: Any) -> set[tuple[str, str]]:
    return {("A", i) for i in replay.accepted} | {("R", i) for i in replay.results}


PASSES: dict[str, list[list[tuple[str, str]]]] = {
    # each inner list is one broker pass (one commit)
    "accepted": [[("A", "a0"), ("A", "a1")], [("R", "a0")], [("A", "a2"), ("A", "a3")]],
    "results": [[("A", "a0"), ("A", "a1")], [("A", "a2")], [("R", "a0"), ("R", "a1")]],
    "mixed": [[("A", "a0")], [("R", "a0"), ("A", "a1")], [("A", "a2"), ("R", "a1"),
                                                          ("A", "a3")]],
    "single": [[("A", "a0")], [("A", "a1")], [("A", "a2")]],
}


def write_journal(directory: Path, passes: list[list[tuple[str, str]]],
                  durability: Durability = Durability.BATCH) -> Path:
    journal = Journal(directory, durability)
    replay = journal.open()
    assert replay.records == 0
    for index, records in enumerate(passes):
        for kind, task_id in records:
            if kind == "A":
                journal.accepted(spec(task_id), b"client-1", 1_000.0 + index)
            else:
                journal.finished(result(task_id), 2_000.0 + index)
        journal.commit()
    journal.close()
    return journal.path


def reopen(directory: Path) -> tuple[Any, Journal]:
    journal = Journal(directory)
    return journal.open(), journal


@pytest.mark.parametrize("shape", sorted(PASSES))
def test_torn_last_frame_at_every_byte_offset_drops_only_the_torn_frame(
        tmp_path: Path, shape: str) -> None:
    # Given a journal of three passes
    original = write_journal(tmp_path / "original", PASSES[shape])
    spans = frames(original)
    last_start, last_end = spans[-1]
    torn = set(frame_records(original, spans[-1]))
    everything = {r for records in PASSES[shape] for r in records}
    survivors = everything - torn
    assert torn and survivors
    data = original.read_bytes()
    for cut in range(last_start, last_end):
        # When the file ends ``cut`` bytes in (a write torn at that byte)
        directory = tmp_path / f"cut-{cut}"
        directory.mkdir()
        (directory / Journal.FILE).write_bytes(data[:cut])
        replay, journal = reopen(directory)
        # Then every earlier record survives and the torn ones are gone
        assert replayed(replay) == survivors, cut
        assert replay.truncated_bytes == cut - last_start
        # And the file was cut back to the last good frame
        journal.close()
        assert (directory / Journal.FILE).stat().st_size == last_start
        shutil.rmtree(directory)


def test_repaired_journal_takes_new_records_after_the_good_prefix(tmp_path: Path) -> None:
    # Given a journal whose last frame was torn in the middle
    path = write_journal(tmp_path, PASSES["mixed"])
    start, end = frames(path)[-1]
    path.write_bytes(path.read_bytes()[:(start + end) // 2])
    replay, journal = reopen(tmp_path)
    assert replay.truncated_bytes > 0
    # When the broker goes on writing (the task of the torn pass is submitted again)
    journal.accepted(spec("a2"), b"client-1", 3_000.0)
    journal.commit()
    journal.accepted(spec("new"), b"client-1", 3_001.0)
    journal.finished(result("new"), 3_002.0)
    journal.commit()
    journal.close()
    # Then a later start reads everything, with nothing torn
    again, journal = reopen(tmp_path)
    journal.close()
    assert again.truncated_bytes == 0
    assert replayed(again) == {("A", "a0"), ("R", "a0"), ("A", "a1"), ("A", "a2"),
                               ("A", "new"), ("R", "new")}
    assert again.accepted["new"][1] == "new" and again.results["new"][2] == "succeeded"


@pytest.mark.parametrize("garbage", [
    b"\x00", b"\xff" * 7, b"\x00" * 8, b"\x00" * 9, HEADER.pack(1 << 30, 0) + b"xyz",
    HEADER.pack(3, 12345) + b"abc", bytes(random.Random(1).randrange(256) for _ in range(97)),
    bytes(random.Random(2).randrange(256) for _ in range(4096)),
], ids=["1-zero", "7-ff", "8-zero", "9-zero", "huge-length", "bad-crc", "97-random",
        "4096-random"])
def test_garbage_after_the_last_frame_is_dropped(tmp_path: Path, garbage: bytes) -> None:
    # Given a good journal with garbage appended (a crash mid-write of junk)
    path = write_journal(tmp_path, PASSES["mixed"])
    size = path.stat().st_size
    with open(path, "ab") as f:
        f.write(garbage)
    # When it is opened
    replay, journal = reopen(tmp_path)
    journal.close()
    # Then every record survives and the garbage is gone
    assert replayed(replay) == {r for p in PASSES["mixed"] for r in p}
    assert replay.truncated_bytes == len(garbage)
    assert path.stat().st_size == size


def test_flipped_byte_in_the_last_frame_drops_that_frame(tmp_path: Path) -> None:
    path = write_journal(tmp_path / "original", PASSES["accepted"])
    start, end = frames(path)[-1]
    torn = set(frame_records(path, (start, end)))
    for offset in range(start + HEADER.size, end):
        # Given a journal whose last frame has one corrupt byte
        data = bytearray(path.read_bytes())
        data[offset] ^= 0x5A
        directory = tmp_path / f"flip-{offset}"
        directory.mkdir()
        (directory / Journal.FILE).write_bytes(bytes(data))
        # When it is opened, then the checksum catches it and the frame is dropped
        replay, journal = reopen(directory)
        journal.close()
        assert replayed(replay) == {r for p in PASSES["accepted"] for r in p} - torn
        assert replay.truncated_bytes == end - start


def test_corrupt_frame_in_the_middle_ends_the_log(tmp_path: Path) -> None:
    # Given a journal whose second frame is corrupt (not a torn tail: the disk lied)
    path = write_journal(tmp_path, PASSES["single"])
    spans = frames(path)
    data = bytearray(path.read_bytes())
    data[spans[1][0] + HEADER.size] ^= 0xFF
    path.write_bytes(bytes(data))
    # When it is opened, then the log ends before it (documented: later frames go too)
    replay, journal = reopen(tmp_path)
    journal.close()
    assert replayed(replay) == {("A", "a0")}
    assert replay.truncated_bytes == len(data) - spans[1][0]


def test_fsync_durability_round_trips(tmp_path: Path) -> None:
    path = write_journal(tmp_path, PASSES["mixed"], Durability.FSYNC)
    replay, journal = reopen(tmp_path)
    journal.close()
    assert replay.truncated_bytes == 0 and path.stat().st_size > 0
    assert replayed(replay) == {r for p in PASSES["mixed"] for r in p}


def test_durability_none_keeps_nothing(tmp_path: Path) -> None:
    journal = open_journal(tmp_path, "none")
    assert isinstance(journal, NullJournal)
    assert journal.open().records == 0
    journal.accepted(spec("a0"), b"client-1", 1.0)
    journal.commit()
    journal.close()
    assert not (tmp_path / Journal.FILE).exists()
    assert open_journal(tmp_path, "none").open().accepted == {}


# ------------------------------------------------------------------ process: damaged journal


def damage_journal(path: Path, how: str) -> set[str]:
    """Damage the journal of a killed broker; returns the ids of accepted tasks whose
    record the damage removed."""
    if how in ("torn_append", "torn_append_and_garbage"):
        # The broker's last pass died mid-write: a frame for a task nobody heard of
        ghost = path.parent / "ghost"
        ghost.mkdir()
        frame = write_journal(ghost, [[("A", "ghost")]]).read_bytes()
        with open(path, "ab") as f:
            f.write(frame[:len(frame) // 2])
    if how in ("garbage", "torn_append_and_garbage"):
        with open(path, "ab") as f:
            f.write(bytes(random.Random(7).randrange(256) for _ in range(333)))
    if how == "truncate_last":
        # The last real frame loses its last 5 bytes (as if a completed write had not
        # reached the file: more than a broker crash can do)
        start, end = frames(path)[-1]
        lost = {task_id for kind, task_id in frame_records(path, (start, end)) if kind == "A"}
        with open(path, "r+b") as f:
            f.truncate(end - 5)
        return lost
    return set()


@pytest.mark.parametrize("how", ["torn_append", "garbage", "torn_append_and_garbage",
                                 "truncate_last"])
def test_broker_restarts_over_damaged_journal_and_keeps_accepted_tasks(
        cluster: Cluster, tmp_path: Path, how: str) -> None:
    # Given a broker (durability batch) that finished 20 tasks
    broker = cluster.broker()
    echo_log, later_log = tmp_path / "echo.log", tmp_path / "later.log"
    cluster.agent(broker.url, f"{AGENTS}:CountingAgent", agent_name="echo",
                  exec_log=str(echo_log))
    client = cluster.client(broker.url)
    learn_boot(client)
    tap = WireTap(client.client)
    done = [client.submit(capabilities=["echo"], data=i, task_id=f"done-{i}", timeout=30)
            for i in range(20)]
    done_results = collect(done, broker)
    assert all(r.ok for r in done_results)
    # And 30 more whose ACCEPTED the client received, waiting for an agent not yet there
    waiting = [client.submit(capabilities=["later"], data=i, task_id=f"wait-{i}", timeout=60)
               for i in range(30)]
    for handle in waiting:
        handle.wait_accepted(timeout=WAIT_S)
    # When the broker is SIGKILLed and its journal damaged
    broker.sigkill()
    journal = broker.data_dir / Journal.FILE
    lost = damage_journal(journal, how)
    print(f"[journal {how}] accepted tasks whose record the damage removed: {len(lost)}")
    # Then it starts anyway on the same port and data dir, and logs the repair
    log = tmp_path / "restarted.log"
    restarted = restart_logged(cluster, broker, log)
    observer = cluster.client(restarted.url)
    status = observer.status()
    assert status["tasks"]["restored_open"] == 30 - len(lost)
    assert status["tasks"]["restored_results"] == 20 + 1  # and the cancelled boot probe
    assert "torn or corrupt tail dropped" in log.read_text()
    # And a new client (which never submitted anything) finds every task the journal kept:
    # the finished ones with their result, the waiting ones still open
    for i in range(20):
        fetched = observer.fetch(f"done-{i}")
        assert fetched.ok and fetched.data == i, fetched
    for handle in waiting:
        if handle.id in lost:
            continue
        assert not observer.fetch(handle.id).finished
    with pytest.raises(TaskNotFound):
        observer.fetch("ghost")
    # When an agent for the waiting tasks arrives
    cluster.agent(restarted.url, f"{AGENTS}:CountingAgent", agent_name="later",
                  agent_caps="later", exec_log=str(later_log))
    # Then every one completes, once, for the client that submitted it (which also sent
    # again what the restarted broker might have lost), and for the new client watching
    waited = collect(waiting, restarted)
    assert all(r.ok for r in waited) and [r.data for r in waited] == list(range(30))
    watched = collect([observer.watch(h.id) for h in waiting], restarted)
    assert [r.task_id for r in watched] == [h.id for h in waiting]
    assert all(r.ok for r in watched)
    handles = done + waiting
    report = check([h.id for h in handles], done_results + waited, [echo_log, later_log],
                   deliveries=tap.snapshot(), handle_ids=[h.id for h in handles])
    report.assert_valid(f"damaged journal ({how})")
    assert report.executions == 50 and not report.re_executed
    wait_status(observer, lambda s: s["tasks"]["succeeded"] == 30, what="30 succeeded")
    assert read_log(later_log) and restarted.proc.poll() is None
