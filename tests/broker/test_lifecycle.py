"""The task engine on a fake clock: the transition table, and a task's paths through
the engine (dispatch, result, retry, lost agent, deadline, cancel) with no socket."""

from __future__ import annotations

import itertools

import pytest

from broker.engine.lifecycle import transition
from broker.errors import IllegalTransition
from broker.engine.model import (
    TRANSITIONS, Requirement, TaskEvent, TaskRecord, TaskState,
)
from tests.broker.support import make_engine, register, run_pass, submit
from wire.tasks import Cancel, Dispatch, Progress, ResultItem, Results, TaskSpec, TaskStatus

CLIENT = b"client"
AGENT = b"agent-1"
START = 1000.0


def new_task(state: TaskState) -> TaskRecord:
    task = TaskRecord(TaskSpec("t", b""), Requirement(frozenset()), CLIENT, 0.0, 1.0)
    task.state = state  # set directly: the test puts the task in each state in turn
    return task


@pytest.mark.parametrize("state,event", [
    (state, event) for state, event in itertools.product(TaskState, TaskEvent)
    if state not in TRANSITIONS[event]])
def test_every_pair_missing_from_the_table_is_refused(state: TaskState,
                                                      event: TaskEvent) -> None:
    task = new_task(state)
    with pytest.raises(IllegalTransition, match=event.value):
        transition(task, event)
    assert task.state is state


@pytest.mark.parametrize("state,event", [
    (state, event) for event, moves in TRANSITIONS.items() for state in moves])
def test_every_pair_in_the_table_moves_the_task(state: TaskState, event: TaskEvent) -> None:
    task = new_task(state)
    assert transition(task, event) is TRANSITIONS[event][state]
    assert task.state is TRANSITIONS[event][state]


def test_a_final_state_has_no_way_out() -> None:
    for state in TaskState:
        if state.finished:
            assert all(state not in moves for moves in TRANSITIONS.values())


def assignments(sent: dict[bytes, list[object]], identity: bytes = AGENT) -> list[str]:
    return [a.id for msg in sent.get(identity, []) if isinstance(msg, Dispatch)
            for a in msg.tasks]


def results(sent: dict[bytes, list[object]]) -> list[ResultItem]:
    return [item for msg in sent.get(CLIENT, []) if isinstance(msg, Results)
            for item in msg.results]


def test_a_task_goes_to_an_agent_and_its_result_to_the_client() -> None:
    engine = make_engine()
    register(engine, AGENT, ("echo",), START)
    submit(engine, CLIENT, START, "t1")
    assert assignments(run_pass(engine, START)) == ["t1"]
    assert engine.tasks["t1"].state is TaskState.DISPATCHED
    engine.handle(AGENT, Progress(started=["t1"]), START + 0.1)
    assert engine.tasks["t1"].state is TaskState.RUNNING
    engine.handle(AGENT, Results([ResultItem("t1", TaskStatus.SUCCEEDED.value, b"ok")]),
                  START + 0.2)
    [result] = results(run_pass(engine, START + 0.2))
    assert (result.task_id, result.status, result.payload, result.attempts) == \
        ("t1", "succeeded", b"ok", 1)
    assert "t1" not in engine.tasks
    assert engine.ledger.finished.get("t1").state is TaskState.SUCCEEDED  # type: ignore[union-attr]


def test_a_failed_attempt_is_retried_after_its_backoff() -> None:
    engine = make_engine(retry_base_delay_s=1.0, retry_max_delay_s=1.0)
    register(engine, AGENT, ("echo",), START)
    submit(engine, CLIENT, START, "t1", max_retries=1)
    run_pass(engine, START)
    engine.handle(AGENT, Results([ResultItem("t1", "failed", error_code="boom",
                                             error_message="x", retryable=True)]), START + 0.1)
    run_pass(engine, START + 0.1)
    assert engine.tasks["t1"].state is TaskState.RETRYING
    # the back-off is between half the delay and the delay
    assert assignments(run_pass(engine, START + 1.2)) == ["t1"]
    assert engine.tasks["t1"].attempts == 2


def test_the_tasks_of_a_dead_agent_go_to_another() -> None:
    engine = make_engine(heartbeat_interval_s=1.0, heartbeat_liveness=3)
    register(engine, AGENT, ("echo",), START)
    submit(engine, CLIENT, START, "t1")
    run_pass(engine, START)
    # A second agent keeps talking; the first falls silent past its expiry
    later = START + 3.5
    register(engine, b"agent-2", ("echo",), later)
    sent = run_pass(engine, later)
    assert assignments(sent, b"agent-2") == ["t1"]
    assert engine.tasks["t1"].attempts == 2
    assert engine.ledger.agents.get(AGENT) is None


def test_a_task_nobody_can_take_fails_at_its_deadline() -> None:
    engine = make_engine()
    submit(engine, CLIENT, START, "t1", capabilities=("nobody",), timeout_s=5.0)
    assert results(run_pass(engine, START + 4.9)) == []
    [result] = results(run_pass(engine, START + 5.1))
    assert (result.status, result.error_code) == ("failed", "no_agent")


def test_cancel_ends_a_dispatched_task_and_tells_its_agent() -> None:
    engine = make_engine()
    register(engine, AGENT, ("echo",), START)
    submit(engine, CLIENT, START, "t1")
    run_pass(engine, START)
    engine.handle(CLIENT, Cancel(["t1"]), START + 0.1)
    sent = run_pass(engine, START + 0.1)
    [result] = results(sent)
    assert result.status == "cancelled"
    assert any(isinstance(m, Cancel) and m.task_ids == ["t1"] for m in sent[AGENT])
