"""ACCEPTED timing, driven step by step on the engine with a fake clock (a 2 ms delay
cannot be tested reliably against the wall clock on a loaded machine)."""

from __future__ import annotations

from broker.engine.clients import ACCEPT_DELAY_S
from broker.engine.engine import Engine
from tests.broker.support import make_engine, run_pass, submit
from wire.tasks import Accepted, Cancel

CLIENT = b"client-1"
START = 1000.0


def accepted_ids(sent: dict[bytes, list[object]]) -> list[str]:
    return [task_id for msg in sent.get(CLIENT, []) if isinstance(msg, Accepted)
            for task_id in msg.task_ids]


def submit_open(engine: Engine, now: float, *task_ids: str) -> None:
    """SUBMIT for a capability no agent has, so the tasks stay open."""
    submit(engine, CLIENT, now, *task_ids, capabilities=("nobody-has-this",))


def test_each_submit_waits_its_own_accept_delay() -> None:
    engine = make_engine()
    submit_open(engine, START, "a")
    assert accepted_ids(run_pass(engine, START)) == []
    later = START + ACCEPT_DELAY_S * 0.75
    submit_open(engine, later, "b")
    assert accepted_ids(run_pass(engine, later)) == []

    # a's delay is over, b's is not
    assert accepted_ids(run_pass(engine, START + ACCEPT_DELAY_S * 1.25)) == ["a"]
    # now b's is
    assert accepted_ids(run_pass(engine, START + ACCEPT_DELAY_S * 1.75)) == ["b"]


def test_submits_due_together_are_confirmed_in_one_message() -> None:
    engine = make_engine()
    submit_open(engine, START, "a", "b")
    submit_open(engine, START, "c")
    run_pass(engine, START)
    sent = run_pass(engine, START + ACCEPT_DELAY_S * 1.01)
    accepted = [m for m in sent[CLIENT] if isinstance(m, Accepted)]
    assert len(accepted) == 1 and accepted[0].task_ids == ["a", "b", "c"]


def test_the_next_wakeup_is_the_oldest_owed_accepted() -> None:
    engine = make_engine()
    submit_open(engine, START, "a")
    submit_open(engine, START + ACCEPT_DELAY_S / 2, "b")
    # a is due first: the loop must not sleep past it
    assert engine.next_wakeup(START + ACCEPT_DELAY_S / 2) <= START + ACCEPT_DELAY_S


def test_a_submit_whose_tasks_all_ended_no_longer_wakes_the_broker() -> None:
    engine = make_engine()
    run_pass(engine, START)  # the first tick is behind us
    submit_open(engine, START, "a")
    assert engine.next_wakeup(START) <= START + ACCEPT_DELAY_S
    # The task ends (cancelled) before its ACCEPTED is due: its RESULT said more, and
    # waking up for it would cost a pass in the middle of the next round trip.
    engine.handle(CLIENT, Cancel(["a"]), START)
    run_pass(engine, START)
    assert "a" not in engine.tasks
    assert engine.next_wakeup(START) > START + ACCEPT_DELAY_S
    assert not engine.clients.accepted_due
