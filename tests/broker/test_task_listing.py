"""Task listing (TASKS without ids) and the task documents, on the engine and a fake
clock: open tasks are listed too, restored results keep their attempts, and a task for
an agent nobody runs says so by the agent's name."""

from __future__ import annotations

from typing import Any

from broker.engine.engine import Engine
from broker.journal import AcceptedRecord, FinishedRecord, Replay
from tests.broker.support import make_engine, register, run_pass, submit
from wire.tasks import (
    ResultItem, Results, StatusReply, StatusRequest, Submit, TaskList, TaskQuery, TaskSpec,
)

CLIENT = b"client"
AGENT = b"agent"


def listed(engine: Engine, now: float, statuses: list[str] | None = None,
           limit: int = 100, ids: list[str] | None = None) -> list[dict[str, Any]]:
    engine.handle(CLIENT, TaskQuery(7, statuses, limit, ids), now)
    replies = [m for m in run_pass(engine, now).get(CLIENT, []) if isinstance(m, TaskList)]
    assert len(replies) == 1
    return [dict(task) for task in replies[0].tasks]


def three_tasks() -> tuple[Engine, float]:
    """t1 succeeded, t2 on the agent (it runs one task at a time), t3 pending."""
    engine = make_engine()
    register(engine, AGENT, ("echo",), 1000.0, max_concurrent=1)
    submit(engine, CLIENT, 1000.0, "t1")
    run_pass(engine, 1000.0)
    engine.handle(AGENT, Results([ResultItem("t1", "succeeded", b"\x80")]), 1001.0)
    run_pass(engine, 1001.0)
    submit(engine, CLIENT, 1002.0, "t2")
    submit(engine, CLIENT, 1003.0, "t3")
    run_pass(engine, 1003.0)
    return engine, 1003.0


def test_a_listing_shows_open_tasks_newest_first_then_finished_ones() -> None:
    engine, now = three_tasks()
    tasks = listed(engine, now)
    assert [(t["task_id"], t["status"]) for t in tasks] == [
        ("t3", "pending"), ("t2", "dispatched"), ("t1", "succeeded")]
    assert tasks[1]["agent"] == "agent" and tasks[1]["attempts"] == 1
    assert tasks[0]["error"] is None and tasks[0]["finished_at"] is None


def test_the_listing_filters_by_state_and_keeps_its_limit() -> None:
    engine, now = three_tasks()
    assert [t["task_id"] for t in listed(engine, now, ["pending"])] == ["t3"]
    assert [t["task_id"] for t in listed(engine, now, ["succeeded"])] == ["t1"]
    assert [t["task_id"] for t in listed(engine, now, ["pending", "succeeded"])] == ["t3", "t1"]
    assert [t["task_id"] for t in listed(engine, now, limit=2)] == ["t3", "t2"]
    # The dead letters (tasks --failed) are finished failures only.
    assert listed(engine, now, ["failed", "timed_out"]) == []


def test_dead_letters_list_failed_tasks_not_open_ones() -> None:
    engine, now = three_tasks()
    engine.handle(AGENT, Results([ResultItem("t2", "failed", error_code="boom",
                                             error_message="no", retryable=False)]), now)
    run_pass(engine, now)
    dead = listed(engine, now, ["failed", "timed_out"])
    assert [(t["task_id"], t["error"]) for t in dead] == [
        ("t2", {"code": "boom", "message": "no"})]


def test_results_restored_from_the_journal_keep_their_attempts() -> None:
    engine = make_engine(now=2000.0)
    spec = TaskSpec("old", b"\x80", ("echo",), None, 0, 60.0, None)
    accepted = AcceptedRecord("A", *spec[:8], CLIENT, 1990.0)
    finished = FinishedRecord("R", "old", "succeeded", b"\x80", None, None, "agent", 3,
                              1.0, 2.0, 1995.0)
    engine.restore(Replay({"old": accepted}, {"old": finished}, 2, 0), 2000.0)
    (document,) = listed(engine, 2000.0)
    assert (document["task_id"], document["status"], document["attempts"]) == (
        "old", "succeeded", 3)
    assert listed(engine, 2000.0, ids=["old"])[0]["attempts"] == 3


def test_the_status_document_says_the_default_task_timeout() -> None:
    engine = make_engine(default_timeout_s=42.0)
    engine.handle(CLIENT, StatusRequest(1), 1000.0)
    (reply,) = [m for m in run_pass(engine, 1000.0)[CLIENT] if isinstance(m, StatusReply)]
    assert reply.status["broker"]["default_timeout_s"] == 42.0


def test_a_task_for_an_agent_nobody_runs_fails_naming_the_agent() -> None:
    engine = make_engine()
    register(engine, AGENT, ("echo",), 1000.0)
    engine.handle(CLIENT, Submit([TaskSpec("t", b"\x80", (), "nobody", 0, 1.0, None)]), 1000.0)
    run_pass(engine, 1000.0)
    sent = run_pass(engine, 1002.0)[CLIENT]
    (item,) = [i for m in sent if isinstance(m, Results) for i in m.results]
    assert item.error_code == "no_agent"
    assert "'nobody'" in (item.error_message or "")
    assert "agent name" in (item.error_message or "")
    assert "capability" not in (item.error_message or "")
