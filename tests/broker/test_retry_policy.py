"""Retries and the circuit breaker on the engine: only faults of the agent or the system
are retried by default and count against an agent's circuit; a failure that is the
task's own gets one second opinion on another agent, when there is one."""

from __future__ import annotations

from broker.engine.circuit import CircuitState
from broker.engine.engine import Engine
from tests.broker.support import make_engine, register, run_pass, submit
from wire.tasks import Dispatch, ResultItem, Results

CLIENT = b"client"
BAD = b"agent-bad"
GOOD = b"agent-good"
START = 1000.0


def dispatched(sent: dict[bytes, list[object]], identity: bytes) -> list[str]:
    return [a.id for msg in sent.get(identity, []) if isinstance(msg, Dispatch)
            for a in msg.tasks]


def results(sent: dict[bytes, list[object]]) -> dict[str, ResultItem]:
    return {item.task_id: item for msg in sent.get(CLIENT, []) if isinstance(msg, Results)
            for item in msg.results}


def fail(engine: Engine, agent: bytes, task_id: str, now: float,
         retryable: bool | None = None) -> None:
    engine.handle(agent, Results([ResultItem(task_id, "failed", error_code="agent_error",
                                             error_message="ValueError: bad input",
                                             retryable=retryable)]), now)


def succeed(engine: Engine, agent: bytes, task_id: str, now: float) -> None:
    engine.handle(agent, Results([ResultItem(task_id, "succeeded", b"ok")]), now)


def test_bad_tasks_do_not_lock_good_work_out_of_the_only_agent() -> None:
    # Given one agent, and 5 tasks that fail because of their own input
    engine = make_engine(circuit_failure_threshold=5)
    register(engine, BAD, ("echo",), START, max_concurrent=1)
    now = START
    for i in range(5):
        submit(engine, CLIENT, now, f"bad-{i}")
        assert dispatched(run_pass(engine, now), BAD) == [f"bad-{i}"]
        fail(engine, BAD, f"bad-{i}", now)
        # Then each fails at once, with no retry (it would fail again)
        [result] = results(run_pass(engine, now)).values()
        assert (result.status, result.attempts) == ("failed", 1)
        now += 0.01
    # And a good task submitted next runs at once: the circuit stayed closed
    submit(engine, CLIENT, now, "good")
    assert dispatched(run_pass(engine, now), BAD) == ["good"]
    assert engine.ledger.agents.get(BAD).breaker.state is CircuitState.CLOSED  # type: ignore[union-attr]


def test_a_failure_the_agent_marks_transient_is_retried_and_counts_against_it() -> None:
    engine = make_engine(retry_base_delay_s=0.1, retry_max_delay_s=0.1,
                         circuit_failure_threshold=2)
    register(engine, BAD, ("echo",), START)
    submit(engine, CLIENT, START, "t")
    run_pass(engine, START)
    fail(engine, BAD, "t", START, retryable=True)
    run_pass(engine, START)
    assert engine.tasks["t"].attempts == 1 and engine.tasks["t"].state.value == "retrying"
    assert dispatched(run_pass(engine, START + 0.2), BAD) == ["t"]
    fail(engine, BAD, "t", START + 0.2, retryable=True)
    run_pass(engine, START + 0.2)
    # Two transient failures in a row: the circuit opened
    assert engine.ledger.agents.get(BAD).breaker.state is CircuitState.OPEN  # type: ignore[union-attr]


def test_retries_asked_for_by_the_task_apply_to_any_failure() -> None:
    engine = make_engine(retry_base_delay_s=0.1, retry_max_delay_s=0.1)
    register(engine, BAD, ("echo",), START)
    submit(engine, CLIENT, START, "t", max_retries=1)
    run_pass(engine, START)
    fail(engine, BAD, "t", START)
    run_pass(engine, START)
    assert dispatched(run_pass(engine, START + 0.2), BAD) == ["t"]
    fail(engine, BAD, "t", START + 0.2)
    [result] = results(run_pass(engine, START + 0.2)).values()
    assert (result.status, result.attempts) == ("failed", 2)


def test_a_broken_agent_beside_a_healthy_one_is_found_out() -> None:
    # Given an agent that fails every task, and a healthy one of the same capability
    engine = make_engine(circuit_failure_threshold=3)
    register(engine, BAD, ("echo",), START, max_concurrent=1)
    register(engine, GOOD, ("echo",), START, max_concurrent=1)
    now = START
    finished: dict[str, ResultItem] = {}
    for i in range(12):
        submit(engine, CLIENT, now, f"t{i}")
        for _ in range(3):  # the task's attempts: on either agent, then maybe the other
            sent = run_pass(engine, now)
            finished.update(results(sent))
            for identity, act in ((BAD, fail), (GOOD, succeed)):
                for task_id in dispatched(sent, identity):
                    act(engine, identity, task_id, now)
            now += 0.01
        finished.update(results(run_pass(engine, now)))
    # Then every task succeeded, those the broken agent failed on the healthy one
    assert sorted(finished) == sorted(f"t{i}" for i in range(12))
    assert all(r.status == "succeeded" and r.agent == GOOD.decode() for r in finished.values())
    bad = engine.ledger.agents.get(BAD)
    assert bad is not None and bad.breaker.state is CircuitState.OPEN
    assert bad.failed_for_peers == 3 and bad.done == 0
    # And the work flows to the healthy agent while the circuit is open
    submit(engine, CLIENT, now, "after")
    assert dispatched(run_pass(engine, now), GOOD) == ["after"]


def test_a_failure_confirmed_by_the_second_opinion_is_the_tasks_own() -> None:
    engine = make_engine(circuit_failure_threshold=1)
    register(engine, BAD, ("echo",), START, max_concurrent=1)
    register(engine, GOOD, ("echo",), START, max_concurrent=1)
    submit(engine, CLIENT, START, "t")
    sent = run_pass(engine, START)
    first = BAD if dispatched(sent, BAD) else GOOD
    other = GOOD if first is BAD else BAD
    fail(engine, first, "t", START)
    # The second opinion goes to the other agent, never back to the first
    assert dispatched(run_pass(engine, START), other) == ["t"]
    fail(engine, other, "t", START)
    [result] = results(run_pass(engine, START)).values()
    assert (result.status, result.attempts) == ("failed", 2)
    # Neither agent's circuit counted the task's own failure
    for identity in (BAD, GOOD):
        assert engine.ledger.agents.get(identity).breaker.state is CircuitState.CLOSED  # type: ignore[union-attr]
