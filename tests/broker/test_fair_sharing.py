"""Clients share agents (on the engine, with a fake clock): a client's backlog never
starves another client's work, and priority orders only a client's own tasks."""

from __future__ import annotations

from broker.engine.engine import Engine
from broker.engine.queues import PendingQueue
from broker.engine.routing import Requirements
from broker.engine.model import TaskRecord
from tests.broker.support import make_engine, register, run_pass, submit
from wire.tasks import Dispatch, ResultItem, Results, Submit, TaskSpec

AGENT = b"agent"
BULK = b"bulk-client"
INTERACTIVE = b"interactive-client"


def dispatched(sent: dict[bytes, list[object]]) -> list[str]:
    return [a.id for m in sent.get(AGENT, []) if isinstance(m, Dispatch) for a in m.tasks]


def finish(engine: Engine, task_ids: list[str], now: float) -> list[str]:
    """The agent answers ``task_ids``; returns what the broker dispatches next."""
    engine.handle(AGENT, Results([ResultItem(t, "succeeded", b"\x80") for t in task_ids]), now)
    return dispatched(run_pass(engine, now))


def test_one_task_of_another_client_waits_for_one_free_slot_not_the_backlog() -> None:
    engine = make_engine()
    register(engine, AGENT, ("echo",), 1000.0, max_concurrent=2)
    submit(engine, BULK, 1000.0, *[f"bulk-{i}" for i in range(1000)])
    running = dispatched(run_pass(engine, 1000.0))
    assert running == ["bulk-0", "bulk-1"]
    now = 1001.0
    for n in range(5):
        # One interactive task arrives while the bulk client's backlog waits ...
        submit(engine, INTERACTIVE, now, f"mine-{n}")
        assert dispatched(run_pass(engine, now)) == []  # both slots busy
        # ... and takes the first slot that frees, ahead of the 900-odd bulk tasks.
        nxt = finish(engine, [running.pop(0)], now + 0.1)
        assert nxt == [f"mine-{n}"]
        running.append(nxt[0])
        # The bulk client gets the next slot (it is not starved either).
        nxt = finish(engine, [running.pop(0)], now + 0.2)
        assert nxt[0].startswith("bulk-")
        running.append(nxt[0])
        now += 1.0


def test_clients_with_backlogs_take_turns() -> None:
    engine = make_engine()
    register(engine, AGENT, ("echo",), 1000.0, max_concurrent=6)
    submit(engine, BULK, 1000.0, *[f"a{i}" for i in range(10)])
    submit(engine, INTERACTIVE, 1000.0, *[f"b{i}" for i in range(10)])
    taken = dispatched(run_pass(engine, 1000.0))
    assert sorted(taken) == ["a0", "a1", "a2", "b0", "b1", "b2"]


def test_priority_orders_a_clients_own_tasks_only() -> None:
    requirements = Requirements()
    requirement = requirements.get(("echo",), None)
    queue = PendingQueue()

    def task(task_id: str, client: bytes, priority: int) -> TaskRecord:
        spec = TaskSpec(task_id, b"", ("echo",), None, priority)
        record = TaskRecord(spec, requirement, client, 0.0, 60.0)
        queue.push(record)
        return record

    task("a-low", BULK, 0)
    task("a-high", BULK, 9)
    task("b-low", INTERACTIVE, 0)
    # Each client's highest priority first, the clients in turn: one client's priority
    # does not put all its tasks ahead of another client's.
    assert [t.spec.id for t in queue.take(requirement, 3)] == ["a-high", "b-low", "a-low"]
    assert len(queue) == 0


def test_a_single_clients_order_is_unchanged() -> None:
    engine = make_engine()
    register(engine, AGENT, ("echo",), 1000.0, max_concurrent=3)
    engine.handle(BULK, Submit([TaskSpec("low", b"\x80", ("echo",), None, 0, 60.0),
                                TaskSpec("high", b"\x80", ("echo",), None, 5, 60.0),
                                TaskSpec("low2", b"\x80", ("echo",), None, 0, 60.0)]), 1000.0)
    assert dispatched(run_pass(engine, 1000.0)) == ["high", "low", "low2"]
