"""Per-client limits on the engine, with a fake clock: a client's unfinished tasks
(``max_pending_per_client``, refused ``queue_full``) and its tasks on agents at once
(``max_in_flight_per_client``, kept queued), and the size limits the broker announces."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from broker.config import BrokerConfig
from broker.engine.engine import Engine
from broker.engine.model import TaskRecord
from broker.engine.pending import PendingQueue
from broker.engine.quotas import ClientQuotas
from broker.engine.routing import Requirements
from broker.errors import ConfigError
from broker.journal import Journal
from tests.broker.support import make_engine, register, run_pass, submit
from wire.limits import MAX_FRAME_BYTES, MAX_HEADER_BYTES, MIN_MESSAGE_BYTES
from wire.tasks import (
    Cancel, Dispatch, Error, Heartbeat, ResultItem, Results, TaskSpec, Welcome,
)

AGENT = b"agent"
GREEDY = b"greedy-client"
OTHER = b"other-client"


def dispatched(sent: dict[bytes, list[object]], agent: bytes = AGENT) -> list[str]:
    return [a.id for m in sent.get(agent, []) if isinstance(m, Dispatch) for a in m.tasks]


def errors(sent: dict[bytes, list[object]], client: bytes) -> list[Error]:
    return [m for m in sent.get(client, []) if isinstance(m, Error)]


def answer(engine: Engine, task_ids: list[str], now: float, agent: bytes = AGENT) -> None:
    engine.handle(agent, Results([ResultItem(t, "succeeded", b"\x80") for t in task_ids]), now)


# ---------------------------------------------------------------- unfinished per client


def test_a_client_over_its_pending_limit_gets_queue_full_and_another_still_submits() -> None:
    # Given a broker that lets one client have 3 unfinished tasks
    engine = make_engine(max_pending_per_client=3)
    # When the greedy client submits 5 and another client 2
    submit(engine, GREEDY, 1000.0, *[f"g{i}" for i in range(5)])
    submit(engine, OTHER, 1000.0, "o0", "o1")
    sent = run_pass(engine, 1000.0)
    # Then the greedy client's last 2 are refused queue_full, naming the limit ...
    refusals = errors(sent, GREEDY)
    assert [e.code for e in refusals] == ["queue_full"]
    assert refusals[0].task_ids == ["g3", "g4"]
    assert "max_pending_per_client" in refusals[0].message and "3" in refusals[0].message
    # ... and the other client's tasks are all accepted
    assert errors(sent, OTHER) == []
    assert sorted(engine.ledger.tasks) == ["g0", "g1", "g2", "o0", "o1"]


def test_finished_and_cancelled_tasks_make_room_again() -> None:
    engine = make_engine(max_pending_per_client=2)
    register(engine, AGENT, ("echo",), 1000.0, max_concurrent=4)
    submit(engine, GREEDY, 1000.0, "a", "b")
    assert dispatched(run_pass(engine, 1000.0)) == ["a", "b"]
    # Given the client at its limit, when one task finishes and one is cancelled
    answer(engine, ["a"], 1001.0)
    engine.handle(GREEDY, Cancel(["b"]), 1001.0)
    run_pass(engine, 1001.0)
    # Then it may have two unfinished tasks again, and no count is left behind
    assert engine.ledger.quotas.open == {}
    submit(engine, GREEDY, 1002.0, "c", "d", "e")
    sent = run_pass(engine, 1002.0)
    assert [e.task_ids for e in errors(sent, GREEDY)] == [["e"]]
    assert engine.ledger.quotas.open == {GREEDY: 2}


def test_resubmits_of_known_tasks_do_not_count_twice() -> None:
    engine = make_engine(max_pending_per_client=2)
    submit(engine, GREEDY, 1000.0, "a", "b")
    submit(engine, GREEDY, 1000.5, "a", "b")  # idempotent resubmit (a recovery)
    assert errors(run_pass(engine, 1000.5), GREEDY) == []
    assert engine.ledger.quotas.open == {GREEDY: 2}


def test_tasks_restored_after_a_restart_count_against_their_client(tmp_path: Path) -> None:
    # Given two tasks of a client in the journal of a broker that stopped
    wall = time.time()
    journal = Journal(tmp_path)
    journal.open()
    for task_id in ("r1", "r2"):
        journal.accepted(TaskSpec(task_id, b"\x80", ("echo",), None, 0, 60.0), GREEDY, wall)
    journal.commit()
    journal.close()
    # When a broker with a limit of 3 unfinished tasks per client restores them
    engine = make_engine(tmp_path, max_pending_per_client=3)
    engine.ledger.wall_offset = wall - 1000.0
    engine.restore(Journal(tmp_path).open(), 1000.0)
    # Then they count: the client may submit one more, not three
    submit(engine, GREEDY, 1000.0, "n1", "n2")
    assert [e.task_ids for e in errors(run_pass(engine, 1000.0), GREEDY)] == [["n2"]]
    assert engine.ledger.quotas.open == {GREEDY: 3}


# ---------------------------------------------------------------- in flight per client


def test_a_client_at_its_in_flight_limit_waits_queued_while_another_uses_the_slots() -> None:
    # Given 4 agent slots and an in-flight limit of 2 per client
    engine = make_engine(max_in_flight_per_client=2)
    register(engine, AGENT, ("echo",), 1000.0, max_concurrent=4)
    # When the greedy client submits 10 tasks
    submit(engine, GREEDY, 1000.0, *[f"g{i}" for i in range(10)])
    sent = run_pass(engine, 1000.0)
    # Then only 2 go to the agent; the rest wait (none refused)
    assert dispatched(sent) == ["g0", "g1"]
    assert errors(sent, GREEDY) == []
    assert engine.ledger.pending.count == 8
    # When another client submits, it takes the free slots at once
    submit(engine, OTHER, 1000.1, "o0", "o1", "o2")
    assert dispatched(run_pass(engine, 1000.1)) == ["o0", "o1"]
    # When one greedy task finishes, exactly one more of its tasks goes, in order
    answer(engine, ["g0"], 1000.2)
    assert dispatched(run_pass(engine, 1000.2)) == ["g2"]
    # When an other-client task finishes, the other client's last task takes its slot
    answer(engine, ["o0"], 1000.3)
    assert dispatched(run_pass(engine, 1000.3)) == ["o2"]


def test_the_limit_holds_through_retries_requeues_and_cancels() -> None:
    engine = make_engine(max_in_flight_per_client=1, retry_base_delay_s=0.0)
    register(engine, AGENT, ("echo",), 1000.0, max_concurrent=4)
    submit(engine, GREEDY, 1000.0, "a", "b", "c", max_retries=1)
    assert dispatched(run_pass(engine, 1000.0)) == ["a"]
    # A failed attempt frees the slot while it waits to retry: the next task goes
    engine.handle(AGENT, Results([ResultItem("a", "failed", b"\x80", "boom", "x",
                                             retryable=True)]), 1000.1)
    assert dispatched(run_pass(engine, 1000.1)) == ["b"]
    # A cancel frees the slot too (and the retried task waits its turn)
    engine.handle(GREEDY, Cancel(["b"]), 1000.2)
    assert len(dispatched(run_pass(engine, 1000.2))) == 1
    assert engine.ledger.quotas.running == {GREEDY: 1}


def test_a_dead_agents_tasks_give_their_slots_back() -> None:
    engine = make_engine(max_in_flight_per_client=2)
    register(engine, AGENT, ("echo",), 1000.0, max_concurrent=2)
    submit(engine, GREEDY, 1000.0, "a", "b", "c")
    assert dispatched(run_pass(engine, 1000.0)) == ["a", "b"]
    # When the agent dies, its two tasks go back to the queue and stop counting
    engine.agents.remove(engine.ledger.agents.get(AGENT), "dead", 1001.0)
    assert engine.ledger.quotas.running == {}
    # A new agent gets two of the client's three tasks, not more
    register(engine, b"agent-2", ("echo",), 1001.0, max_concurrent=4)
    assert len(dispatched(run_pass(engine, 1001.0), b"agent-2")) == 2


def test_pending_queue_skips_clients_at_their_limit_and_keeps_their_order() -> None:
    requirement = Requirements().get(("echo",), None)
    quotas = ClientQuotas(max_open=100, max_in_flight=2)
    queue = PendingQueue(quotas)
    for n in range(4):
        for client in (GREEDY, OTHER):
            queue.push(TaskRecord(TaskSpec(f"{client.decode()}-{n}", b"", ("echo",)),
                                  requirement, client, 0.0, 60.0))
    quotas.running[GREEDY] = 2  # the greedy client runs two tasks already
    taken = [t.spec.id for t in queue.take(requirement, 10)]
    assert taken == ["other-client-0", "other-client-1"]
    # (the dispatcher counts what it hands out; here by hand) When both are at the
    # limit nothing is taken; when one greedy task ends, exactly one of its tasks is
    quotas.running[OTHER] = 2
    assert queue.take(requirement, 10) == []
    quotas.running[GREEDY] = 1
    assert [t.spec.id for t in queue.take(requirement, 10)] == ["greedy-client-0"]
    assert len(queue) == 5


def test_no_in_flight_limit_counts_nothing() -> None:
    engine = make_engine()
    register(engine, AGENT, ("echo",), 1000.0, max_concurrent=8)
    submit(engine, GREEDY, 1000.0, *[f"g{i}" for i in range(8)])
    assert len(dispatched(run_pass(engine, 1000.0))) == 8
    assert engine.ledger.quotas.running == {}
    assert all(t.quota is None for t in engine.ledger.tasks.values())


# ---------------------------------------------------------------- announced and configured


def test_welcome_and_a_client_heartbeat_answer_carry_the_size_limits() -> None:
    engine = make_engine(max_message_bytes=8 * 1024 * 1024)
    register(engine, AGENT, ("echo",), 1000.0)
    engine.handle(OTHER, Heartbeat(role="client"), 1000.0)
    sent = run_pass(engine, 1000.0)
    expected = {"max_message_bytes": 8 * 1024 * 1024, "max_header_bytes": MAX_HEADER_BYTES}
    assert [m.limits for m in sent[AGENT] if isinstance(m, Welcome)] == [expected]
    assert [m.limits for m in sent[OTHER] if isinstance(m, Heartbeat)] == [expected]
    limits = engine.status.document(1000.0)["limits"]
    assert limits["max_message_bytes"] == 8 * 1024 * 1024
    assert limits["max_in_flight_per_client"] == 0


@pytest.mark.parametrize("changes", [
    {"max_message_bytes": MIN_MESSAGE_BYTES - 1},
    {"max_header_bytes": 1024},
    {"max_header_bytes": MAX_FRAME_BYTES + 1},
    {"max_pending_per_client": 0},
    {"max_in_flight_per_client": -1},
])
def test_limits_out_of_range_are_config_errors(changes: dict[str, int]) -> None:
    with pytest.raises(ConfigError):
        BrokerConfig(bind="127.0.0.1:0", **changes)
