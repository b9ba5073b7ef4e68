"""Pure unit tests of the broker's parts: liveness with a fake clock, policies, queues."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import pytest

from agent_sdk import BaseAgent, Result, Task
from agent_sdk.__main__ import build_agent
from broker.config import BrokerConfig, parse_host_port
from broker.errors import ConfigError
from broker.heartbeat import Liveness
from wire.tasks import TaskSpec
from broker.engine.model import AgentRecord, Requirement, TaskRecord, TaskState
from broker.engine.routing import AgentTable, make_policy
from broker.engine.queues import FinishedResults, PendingQueue


@dataclass
class FakePeer:
    last_seen: float
    last_sent: float


def agent(name: str, caps: set[str], max_concurrent: int = 4, busy: int = 0) -> AgentRecord:
    record = AgentRecord(name.encode(), name, name, frozenset(caps), max_concurrent, 0.0, 0.0, 0.0)
    for i in range(busy):
        record.foreign_running[f"{name}-{i}"] = 0.0
    return record


def task(task_id: str, requirement: Requirement, priority: int = 0) -> TaskRecord:
    spec = TaskSpec(task_id, b"", tuple(requirement.capabilities), requirement.agent, priority)
    return TaskRecord(spec, requirement, b"client", 0.0, 10.0)


def test_liveness_follows_a_fake_clock() -> None:
    # Given an interval of 1 s and liveness 3, a peer last heard at t=10
    liveness = Liveness(1.0, 3)
    peer = FakePeer(last_seen=10.0, last_sent=10.0)
    # Then it is alive up to the expiry and dead after it
    assert not liveness.is_dead(peer, 13.0)
    assert liveness.is_dead(peer, 13.01)
    # And it needs a heartbeat only after an interval of our silence
    assert not liveness.needs_heartbeat(peer, 10.5)
    assert liveness.needs_heartbeat(peer, 11.0)


def test_requirement_admits_only_agents_with_every_capability() -> None:
    both = Requirement(frozenset({"a", "b"}))
    assert both.admits(agent("x", {"a", "b", "c"}))
    assert not both.admits(agent("y", {"a"}))
    named = Requirement(frozenset(), "x")
    assert named.admits(agent("x", set())) and not named.admits(agent("z", set()))


@pytest.mark.parametrize("policy", ["round_robin", "least_loaded", "capability"])
def test_equal_agents_share_work_under_every_policy(policy: str) -> None:
    chooser = make_policy(policy)
    agents = [agent("a", {"echo"}), agent("b", {"echo"})]
    picks = Counter(chooser.choose(agents).name for _ in range(1000))
    assert 350 <= picks["a"] <= 650


def test_least_loaded_prefers_the_idle_agent() -> None:
    chooser = make_policy("least_loaded")
    busy, idle = agent("busy", {"echo"}, busy=3), agent("idle", {"echo"})
    assert all(chooser.choose([busy, idle]) is idle for _ in range(20))


def test_capability_policy_keeps_generalists_free() -> None:
    chooser = make_policy("capability")
    specialist, generalist = agent("s", {"echo"}), agent("g", {"echo", "code", "review"})
    assert all(chooser.choose([generalist, specialist]) is specialist for _ in range(20))


def test_agent_table_caches_eligibility_until_it_changes() -> None:
    table = AgentTable()
    requirement = Requirement(frozenset({"echo"}))
    assert table.eligible(requirement) == []
    a = agent("a", {"echo"})
    table.add(a)
    assert table.eligible(requirement) == [a]
    table.remove(a.identity)
    assert table.eligible(requirement) == []


def test_pending_queue_orders_by_priority_then_fifo_and_skips_removed() -> None:
    queue = PendingQueue()
    requirement = Requirement(frozenset({"echo"}))
    low1, low2, high = task("low1", requirement), task("low2", requirement), task("high", requirement, 5)
    for t in (low1, low2, high):
        queue.push(t)
    # A cancelled task keeps its slot until a pop skips it.
    low1.state = TaskState.CANCELLED
    queue.discard(low1)
    assert len(queue) == 2
    assert queue.pop(requirement) is high
    assert queue.pop(requirement) is low2
    assert queue.pop(requirement) is None and len(queue) == 0
    assert not queue.has_work(requirement)


def test_pending_queue_takes_a_batch_in_pop_order_up_to_the_limit() -> None:
    queue = PendingQueue()
    requirement = Requirement(frozenset({"echo"}))
    lows = [task(f"low{i}", requirement) for i in range(4)]
    highs = [task(f"high{i}", requirement, 5) for i in range(2)]
    for t in lows + highs:
        queue.push(t)
    lows[1].state = TaskState.CANCELLED
    queue.discard(lows[1])
    # Then the higher priority first, FIFO within it, skipping the cancelled task
    assert queue.take(requirement, 3) == [highs[0], highs[1], lows[0]]
    assert len(queue) == 2
    assert queue.take(requirement, 0) == []
    assert queue.take(requirement, 10) == [lows[2], lows[3]]
    assert len(queue) == 0 and not queue.has_work(requirement)
    assert queue.take(requirement, 10) == []


def test_requeued_task_goes_first() -> None:
    queue = PendingQueue()
    requirement = Requirement(frozenset())
    first, again = task("first", requirement), task("again", requirement)
    queue.push(first)
    queue.push_front(again)
    assert queue.pop(requirement) is again


def test_finished_results_keep_the_newest_within_count_and_age() -> None:
    results = FinishedResults(max_count=2, max_age_s=60.0)
    requirement = Requirement(frozenset())
    records = [task(f"t{i}", requirement) for i in range(3)]
    for i, record in enumerate(records):
        record.finished_at = float(i)
        results.add(record)
    assert "t0" not in results and "t2" in results and len(results) == 2
    assert results.expire(61.5) == 1
    assert "t1" not in results and "t2" in results


def test_config_validates() -> None:
    assert parse_host_port("tcp://127.0.0.1:5555") == ("127.0.0.1", 5555)
    with pytest.raises(ConfigError):
        parse_host_port("nonsense")
    with pytest.raises(ConfigError):
        BrokerConfig(policy="fastest")
    assert BrokerConfig(heartbeat_interval_s=0.5, heartbeat_liveness=4).heartbeat_expiry_s == 2.0


def test_deadlines_expire_in_order_and_forget_finished_tasks() -> None:
    from broker.engine.queues import Deadlines

    deadlines = Deadlines()
    requirement = Requirement(frozenset())
    short = [task(f"s{i}", requirement) for i in range(3)]
    for i, record in enumerate(short):
        record.deadline = 10.0 + i
        deadlines.add(record, 10.0)
    odd = task("odd", requirement)
    odd.deadline = 10.5
    deadlines.add(odd, 7.25)
    # A finished task at the front of its lane is dropped, not reported.
    short[0].state = TaskState.SUCCEEDED
    assert deadlines.next_deadline() == 10.5
    assert deadlines.pop_expired(10.99) == [odd]
    assert deadlines.pop_expired(12.0) == [short[1], short[2]]
    assert deadlines.next_deadline() is None and len(deadlines) == 0


def test_deadlines_fall_back_to_a_heap_past_the_lane_limit() -> None:
    from broker.engine.queues import Deadlines

    deadlines = Deadlines()
    requirement = Requirement(frozenset())
    records = []
    for i in range(Deadlines.MAX_LANES + 5):
        record = task(f"t{i}", requirement)
        record.deadline = 100.0 - i
        deadlines.add(record, float(i + 1))
        records.append(record)
    assert deadlines.next_deadline() == 100.0 - (Deadlines.MAX_LANES + 4)
    assert sorted(t.id for t in deadlines.pop_expired(1000.0)) == sorted(r.id for r in records)


def test_deadlines_report_a_task_with_two_equal_entries_once() -> None:
    from broker.engine.queues import Deadlines

    # Given a task requeued and dispatched again in one loop pass (same deadline twice)
    deadlines = Deadlines()
    record = task("twice", Requirement(frozenset()))
    record.deadline = 5.0
    deadlines.add(record, 5.0)
    deadlines.add(record, 5.0)
    # Then its expiry is reported once
    assert deadlines.pop_expired(6.0) == [record]


class NeedsArguments(BaseAgent):
    """An agent `python -m agent_sdk run` cannot build: its constructor wants a value."""

    def __init__(self, model: str) -> None:
        super().__init__(name="needs-arguments")
        self.model = model

    async def execute(self, task: Task) -> Result:
        return Result(data=self.model)


def test_an_agent_class_that_needs_arguments_gets_a_clear_error() -> None:
    with pytest.raises(ValueError, match="constructible without arguments"):
        build_agent("tests.broker.test_units:NeedsArguments")
    with pytest.raises(ValueError, match="not a BaseAgent subclass"):
        build_agent("tests.broker.test_units:Counter")
