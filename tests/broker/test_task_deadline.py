"""The task's deadline on the engine's fake clock: ``timeout_s`` bounds the whole task
(queue, every attempt, back-offs), ``attempt_timeout_s`` each attempt, and journals
written before the per-attempt limit existed are still read."""

from __future__ import annotations

import time
from pathlib import Path

from broker.engine.engine import Engine
from broker.journal import Journal, _frame
from tests.broker.support import make_engine, register, run_pass
from wire.tasks import Dispatch, ResultItem, Results, Submit, TaskSpec

CLIENT = b"client"
AGENT = b"agent"
#: a second agent: one that was told to cancel an attempt takes no other until it answers
OTHER = b"agent2"
START = 1000.0


def submit(engine: Engine, now: float, task_id: str, timeout_s: float,
           attempt_timeout_s: float | None = None, retries: int | None = 3) -> None:
    engine.handle(CLIENT, Submit([TaskSpec(task_id, b"\x80", ("echo",), None, 0, timeout_s,
                                           retries, None, attempt_timeout_s)]), now)


def dispatched(sent: dict[bytes, list[object]]) -> list[tuple[str, int, float]]:
    return [(a.id, a.attempt, a.timeout_s) for peer in (AGENT, OTHER)
            for msg in sent.get(peer, []) if isinstance(msg, Dispatch) for a in msg.tasks]


def results(sent: dict[bytes, list[object]]) -> list[ResultItem]:
    return [item for msg in sent.get(CLIENT, []) if isinstance(msg, Results)
            for item in msg.results]


def run_until_result(engine: Engine, start: float, step: float = 0.01
                     ) -> tuple[float, ResultItem, list[tuple[str, int, float]]]:
    """Pass the fake clock along until the client gets a result (never answering)."""
    now, sends = start, []
    while now < start + 60:
        sent = run_pass(engine, now)
        sends.extend(dispatched(sent))
        done = results(sent)
        if done:
            return now, done[0], sends
        now = round(now + step, 6)
    raise AssertionError("no result within 60 s")


def test_timeout_ends_the_task_at_its_deadline_whatever_its_retries() -> None:
    # Given an agent that never answers, and a task of 2 s with 3 retries
    engine = make_engine(retry_base_delay_s=0.1, retry_max_delay_s=0.1)
    register(engine, AGENT, ("echo",), START)
    submit(engine, START, "t", timeout_s=2.0)
    # Then it ends timed_out at 2 s, after its one attempt: no retry starts after the
    # deadline, and the attempt had the whole 2 s
    at, result, sends = run_until_result(engine, START)
    assert result.status == "timed_out" and abs(at - (START + 2.0)) < 0.02
    assert [(tid, attempt) for tid, attempt, _ in sends] == [("t", 1)]
    assert abs(sends[0][2] - 2.0) < 1e-9
    assert "deadline" in (result.error_message or "")


def test_an_attempt_limit_retries_within_the_task_deadline() -> None:
    # Given attempts of 0.5 s within a task of 2 s, back-off 0.1 s, two silent agents
    engine = make_engine(retry_base_delay_s=0.1, retry_max_delay_s=0.1,
                         circuit_failure_threshold=100)
    register(engine, AGENT, ("echo",), START)
    register(engine, OTHER, ("echo",), START)
    submit(engine, START, "t", timeout_s=2.0, attempt_timeout_s=0.5, retries=10)
    at, result, sends = run_until_result(engine, START)
    # Then attempts are cut at 0.5 s and retried (each on an agent not still told to cancel an earlier one),
    # and the task ends timed_out at 2 s, not after 11 attempts
    assert result.status == "timed_out" and abs(at - (START + 2.0)) < 0.02
    attempts = [attempt for _, attempt, _ in sends]
    assert attempts == list(range(1, len(attempts) + 1)) and 2 <= len(attempts) <= 4
    assert all(left <= 0.5 + 1e-9 for _, _, left in sends)
    assert result.attempts == len(attempts)


def test_a_retry_whose_back_off_passes_the_deadline_is_not_scheduled() -> None:
    # Given a back-off of 5 s and a task of 2 s whose first attempt fails transiently
    engine = make_engine(retry_base_delay_s=5.0, retry_max_delay_s=5.0)
    register(engine, AGENT, ("echo",), START)
    submit(engine, START, "t", timeout_s=2.0)
    assert dispatched(run_pass(engine, START))[0][:2] == ("t", 1)
    engine.handle(AGENT, Results([ResultItem("t", "failed", error_code="agent_error",
                                             error_message="flaky", retryable=True)]), START)
    # Then it ends at once with its failure: a retry could not start before its deadline
    [result] = results(run_pass(engine, START))
    assert (result.status, result.attempts) == ("failed", 1)


def test_journal_records_from_before_the_attempt_limit_are_read(tmp_path: Path) -> None:
    # Given a journal written before the limit existed (an accepted record, no T record)
    wall = time.time()
    old = ("A", "old", b"\x80", ("echo",), None, 0, 30.0, None, None, CLIENT, wall)
    (tmp_path / Journal.FILE).write_bytes(_frame([("J", 3, "0.old"), old]))
    journal = Journal(tmp_path)
    replay = journal.open()
    journal.close()
    # Then the task is read back with no per-attempt limit, and runs again with the
    # time its deadline has left
    assert replay.attempt_limits == {} and replay.accepted["old"].spec().attempt_timeout_s is None
    engine = make_engine(tmp_path)
    engine.ledger.wall_offset = wall - START
    engine.restore(replay, START)
    # (a restored task waits one heartbeat expiry for the agent that may still run it)
    later = START + engine.ledger.config.heartbeat_expiry_s + 1.0
    register(engine, AGENT, ("echo",), later)
    [(task_id, attempt, left)] = dispatched(run_pass(engine, later))
    expected = 30.0 - (later - START)
    assert (task_id, attempt) == ("old", 1) and expected - 0.5 < left <= expected + 1e-6


def test_new_journal_records_keep_the_attempt_limit(tmp_path: Path) -> None:
    # Given a task with a per-attempt limit, journaled
    wall = time.time()
    journal = Journal(tmp_path)
    journal.open()
    journal.accepted(TaskSpec("t", b"\x80", ("echo",), None, 0, 30.0, None, None, 4.0),
                     CLIENT, wall)
    journal.commit()
    journal.close()
    replay = Journal(tmp_path).open()
    # Then the accepted record keeps its old layout (older brokers read it), the limit
    # comes back beside it, and the restored task's attempts are cut at 4 s
    assert len(replay.accepted["t"]) == 11 and replay.attempt_limits == {"t": 4.0}
    engine = make_engine(tmp_path)
    engine.ledger.wall_offset = wall - START
    engine.restore(replay, START)
    later = START + engine.ledger.config.heartbeat_expiry_s  # the restored task's wait
    register(engine, AGENT, ("echo",), later)
    [(task_id, _, left)] = dispatched(run_pass(engine, later))
    assert task_id == "t" and abs(left - 4.0) < 1e-6
    assert engine.tasks["t"].spec.attempt_timeout_s == 4.0  # compaction writes it again
