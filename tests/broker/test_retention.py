"""Retained results bounded by bytes, and large payloads kept in the result store."""

from __future__ import annotations

from pathlib import Path

from broker.engine.model import Requirement, TaskRecord, TaskState
from broker.engine.queues import FinishedResults, StoredPayload
from broker.journal import Journal
from broker.results import ResultStore
from wire.tasks import ResultItem, TaskSpec


def _finished(task_id: str, payload: bytes, now: float = 0.0) -> TaskRecord:
    task = TaskRecord(TaskSpec(task_id, b"", ("echo",)), Requirement(frozenset(("echo",)), None),
                      b"client", now, 60.0)
    task.state = TaskState.SUCCEEDED
    task.result = ResultItem(task_id, "succeeded", payload)
    task.finished_at = now
    return task


def test_retained_results_are_bounded_by_bytes() -> None:
    # Given a retention of 1,000 bytes of payloads
    finished = FinishedResults(max_count=100, max_age_s=3600, max_bytes=1000)
    for n in range(10):
        finished.add(_finished(f"t{n}", b"x" * 300))
    # Then only the newest results that fit stay
    assert [t.spec.id for t in finished.newest_first()] == ["t9", "t8", "t7"]
    assert finished.bytes == 900


def test_a_large_payload_is_not_counted_and_its_file_goes_with_it(tmp_path: Path) -> None:
    finished = FinishedResults(max_count=2, max_age_s=3600, max_bytes=1000, large_bytes=500)
    deleted: list[StoredPayload] = []
    finished.delete = deleted.append
    big = _finished("big", b"y" * 5000)
    finished.add(big)
    assert finished.bytes == 0 and finished.writing == {"big": big}
    ref = StoredPayload("k", 5000)
    finished.stored(big, big.result._replace(payload=ref))  # type: ignore[union-attr]
    assert finished.stored_bytes == 5000
    finished.add(_finished("a", b"1"))
    finished.add(_finished("b", b"2"))  # count bound: "big" goes, and its file
    assert deleted == [ref] and finished.stored_bytes == 0


def test_a_large_result_goes_to_the_store_and_replays_as_a_reference(tmp_path: Path) -> None:
    woken: list[int] = []
    store = ResultStore(tmp_path, lambda: woken.append(1))
    journal = Journal(tmp_path)
    journal.open()
    journal.attach_store(store, 1000)
    payload = bytes(range(256)) * 40
    # When a large result is recorded, nothing goes to the journal's buffer
    assert journal.finished(ResultItem("t1", "succeeded", payload), 1.0) is True
    assert journal.finished(ResultItem("t2", "succeeded", b"small"), 1.0) is None
    store.close()  # finishes the queued write
    [(result, wall, ref)] = store.completed()
    assert ref is not None and ref.size == len(payload)
    journal.finished(result._replace(payload=ref), wall)
    journal.close()
    assert journal.size < 1000  # the payload never entered the journal
    # Then a restart reads the reference, and the store serves the bytes
    replay = Journal(tmp_path).open()
    assert replay.results["t1"].payload == ref
    assert replay.results["t2"].payload == b"small"
    store = ResultStore(tmp_path, lambda: None)
    assert bytes(store.load(ref)) == payload
    assert store.sweep({ref.key}) == 0
    store.close()
