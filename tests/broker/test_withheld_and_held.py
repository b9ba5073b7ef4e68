"""Large results leave the broker by READ, in ranges; the agent's ACK waits for the store's
write; held results outlive retention until RELEASE, across a restart and a compaction.

The engine runs on a fake clock with a real journal and a real result store in a tmp dir
(the store's writer thread is joined, not slept on: ``ResultStore.close`` finishes the
queued writes)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from broker.config import BrokerConfig
from broker.engine.engine import Engine
from broker.engine.restore import restore
from broker.journal import Durability, Journal
from broker.results import ResultStore
from tests.broker.support import RecordingForwarder, register, run_pass
from wire.limits import READ_CHUNK_BYTES
from wire.tasks import (
    Ack, Chunk, Error, Fetch, Read, Release, ResultItem, Results, Submit, TaskSpec, Withheld,
)

CLIENT = b"client-1"
AGENT = b"agent-1"
THRESHOLD = 1024 * 1024
BIG = 9 * 1024 * 1024 + 17  # three READ ranges, the last one short


class Broker:
    """An engine wired to a journal and a result store, as broker/server.py wires them."""

    def __init__(self, data_dir: Path, now: float = 1000.0, **config: Any) -> None:
        config.setdefault("bind", "127.0.0.1:0")
        config.setdefault("data_dir", data_dir)
        config.setdefault("result_store_threshold", THRESHOLD)
        self.config = BrokerConfig(**config)
        self.journal = Journal(data_dir, Durability.BATCH)
        replay = self.journal.open()
        self.store = ResultStore(data_dir, lambda: None)
        self.journal.attach_store(self.store, THRESHOLD)
        self.engine = Engine(self.config, self.journal, RecordingForwarder(), now, 0.0, "boot")
        finished = self.engine.ledger.finished
        finished.large_bytes = float(THRESHOLD)
        finished.load = self.store.load
        finished.delete = self.store.delete
        restore(self.engine.ledger, self.engine.lifecycle, replay, now)

    def written(self) -> None:
        """Wait for the store's queued writes (by joining its thread) and hand them over."""
        self.store.close()
        for result, wall, ref in self.store.completed():
            self.engine.lifecycle.result_written(result, wall, ref)
        self.store = ResultStore(Path(self.config.data_dir), lambda: None)
        self.journal.attach_store(self.store, THRESHOLD)

    def step(self, now: float) -> dict[bytes, list[Any]]:
        sent = run_pass(self.engine, now)
        self.journal.commit()
        return sent

    def close(self) -> None:
        self.store.close()
        self.journal.close()


def _run_big_task(broker: Broker, task_id: str, payload: bytes, now: float,
                  hold: bool = False) -> dict[bytes, list[Any]]:
    engine = broker.engine
    engine.handle(CLIENT, Submit([TaskSpec(task_id, b"\x80", ("big",), None, 0, 60.0, None,
                                           None, None, hold)]), now)
    broker.step(now)
    engine.handle(AGENT, Results([ResultItem(task_id, "succeeded", memoryview(payload))]), now)
    return broker.step(now)


def _read_all(broker: Broker, task_id: str, now: float) -> bytes:
    out = bytearray()
    req = 100
    while True:
        broker.engine.handle(CLIENT, Read(req, task_id, len(out), READ_CHUNK_BYTES), now)
        (chunk,) = [m for m in broker.step(now)[CLIENT] if isinstance(m, Chunk)]
        assert chunk.req == req and chunk.offset == len(out)
        out += chunk.data
        if len(out) >= chunk.total:
            return bytes(out)
        req += 1


def test_a_large_result_is_withheld_read_in_ranges_and_acked_after_its_write(
        tmp_path: Path) -> None:
    # Given an agent and a client, and a result larger than the store's threshold
    broker = Broker(tmp_path)
    register(broker.engine, AGENT, ("big",), 1000.0)
    payload = bytes(range(256)) * (BIG // 256) + b"x" * (BIG % 256)
    try:
        # When the agent sends it
        sent = _run_big_task(broker, "t-big", payload, 1000.1)
        # Then nobody hears of it before the store wrote it: no RESULT, and no ACK (acks
        # leave with the pass after the one that queued them), so the agent keeps it and a
        # crash now loses nothing
        later = broker.step(1000.15)
        assert not any(isinstance(m, (Results, Ack))
                       for msgs in (*sent.values(), *later.values()) for m in msgs)
        broker.written()
        sent = broker.step(1000.2)
        # (at once: the agent's next large result waits for it)
        acks = [m for m in sent.get(AGENT, []) if isinstance(m, Ack)]
        # Then the client's RESULT withholds the payload, naming its size, and the agent
        # gets its ACK
        (results,) = [m for m in sent[CLIENT] if isinstance(m, Results)]
        assert results.results[0].payload == Withheld(BIG)
        assert acks and acks[0].task_ids == ["t-big"]
        # And the client reads it whole in ranges of at most READ_CHUNK_BYTES, also
        # through FETCH's answer (withheld the same way)
        assert hashlib.sha256(_read_all(broker, "t-big", 1000.3)).digest() == \
            hashlib.sha256(payload).digest()
        broker.engine.handle(CLIENT, Fetch(7, ["t-big"]), 1000.4)
        (fetched,) = [m for m in broker.step(1000.4)[CLIENT] if isinstance(m, Results)]
        assert fetched.results[0].payload == Withheld(BIG)
    finally:
        broker.close()


def test_a_small_result_still_acks_and_answers_in_the_same_pass(tmp_path: Path) -> None:
    broker = Broker(tmp_path)
    register(broker.engine, AGENT, ("big",), 1000.0)
    try:
        sent = _run_big_task(broker, "t-small", b"\x91\x01", 1000.1)
        (results,) = [m for m in sent[CLIENT] if isinstance(m, Results)]
        assert results.results[0].payload == b"\x91\x01"
        acks = [m for m in broker.step(1002.0).get(AGENT, []) if isinstance(m, Ack)]
        assert acks and acks[0].task_ids == ["t-small"]
    finally:
        broker.close()


def test_a_read_of_an_unknown_result_is_not_found_with_its_req(tmp_path: Path) -> None:
    broker = Broker(tmp_path)
    try:
        broker.engine.handle(CLIENT, Read(9, "nobody", 0, 10), 1000.0)
        (error,) = broker.step(1000.0)[CLIENT]
        assert isinstance(error, Error) and error.code == "not_found" and error.req == 9
    finally:
        broker.close()


def test_a_held_result_outlives_retention_until_released_and_a_restart(
        tmp_path: Path) -> None:
    # Given a broker that retains only 2 results, and a held one among many others
    broker = Broker(tmp_path, result_retention_max=2)
    register(broker.engine, AGENT, ("big",), 1000.0)
    _run_big_task(broker, "held", b"\x01", 1000.1, hold=True)
    for n in range(5):
        _run_big_task(broker, f"other-{n}", b"\x02", 1000.2)
    finished = broker.engine.ledger.finished
    # Then the held one is still there while the early others went
    assert "held" in finished and "other-0" not in finished
    broker.close()
    # When the broker restarts
    broker = Broker(tmp_path, now=2000.0, result_retention_max=2)
    finished = broker.engine.ledger.finished
    assert "held" in finished, "a held result survives a restart"
    try:
        # When it is released, then many more results come
        broker.engine.handle(CLIENT, Release(["held", "unknown"]), 2000.1)
        broker.step(2000.1)
        register(broker.engine, AGENT, ("big",), 2000.2)
        for n in range(3):
            _run_big_task(broker, f"later-{n}", b"\x03", 2000.3)
        # Then retention applies to it again
        assert "held" not in finished
    finally:
        broker.close()
    # And the release itself survives a restart
    broker = Broker(tmp_path, now=3000.0, result_retention_max=100)
    try:
        assert broker.engine.ledger.finished.held == {}
    finally:
        broker.close()


def test_retained_results_survive_a_compaction_and_a_restart(tmp_path: Path) -> None:
    # Given retained results, one of them held, and a compacted journal
    broker = Broker(tmp_path)
    register(broker.engine, AGENT, ("big",), 1000.0)
    _run_big_task(broker, "kept", b"\x04", 1000.1)
    _run_big_task(broker, "held", b"\x05", 1000.2, hold=True)
    engine = broker.engine
    offset = engine.ledger.wall_offset
    retained = [t for t in engine.retained() if t.result is not None]
    broker.journal.compact(
        ((t.spec, t.client, t.submitted_at + offset)
         for t in [*engine.tasks.values(), *retained]),
        ((t.result, t.finished_at + offset) for t in retained))
    broker.close()
    # When the broker restarts
    broker = Broker(tmp_path, now=1001.0)
    try:
        # Then both results are known again, and the held one is still held
        finished = broker.engine.ledger.finished
        assert "kept" in finished and "held" in finished.held
        assert finished.get("kept").result.payload == b"\x04"  # type: ignore[union-attr]
    finally:
        broker.close()
