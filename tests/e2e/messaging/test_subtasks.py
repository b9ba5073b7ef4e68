"""Subtasks: an agent hands work to other agents with ``await self.submit(...)``."""

from __future__ import annotations

from tests.e2e.messaging.conftest import Messaging, wait_status

#: Subtasks the fan-out agent submits.
FAN_OUT = 20
#: Deadline for a parent task and for the cancellations to land.
TASK_S = 30.0


def test_agent_fans_out_twenty_subtasks_and_aggregates(messaging: Messaging) -> None:
    # Given a fan-out agent and two workers that each take at most 10 tasks at once
    messaging.agent("FanOut")
    workers = [messaging.agent("Squarer", agent_max="10") for _ in range(2)]
    client = messaging.client()
    # When a task asks it to fan out 20 subtasks
    result = client.submit(capabilities=["fanout"], data={"n": FAN_OUT, "capability": "square"},
                           task_id="parent-1").result(TASK_S)
    # Then it aggregated all 20 results, computed by both workers, and every subtask
    # named the parent and got an id derived from it
    assert result.ok, result
    assert result.data["sum"] == sum(i * i for i in range(FAN_OUT))
    assert result.data["parents"] == ["parent-1"]
    assert result.data["child_ids"] == [f"parent-1/{n}" for n in range(1, FAN_OUT + 1)]
    assert result.data["agents"] == sorted(w.agent_id for w in workers)
    # And the broker's trace of the parent lists the subtasks
    trace = client.trace("parent-1")
    assert sorted(child["task_id"] for child in trace["children"]) == \
        sorted(result.data["child_ids"])


def test_cancelling_the_parent_cancels_its_running_children(messaging: Messaging) -> None:
    # Given a fan-out agent whose 20 subtasks run on two workers until cancelled
    messaging.agent("FanOut")
    workers = [messaging.agent("Blocker", agent_max="10") for _ in range(2)]
    client = messaging.client()
    parent = client.submit(capabilities=["fanout"], data={"n": FAN_OUT, "capability": "block"},
                           task_id="parent-2")
    wait_status(client, lambda s: s["tasks"]["running"] == FAN_OUT + 1, timeout=TASK_S,
                what="the parent and its 20 subtasks run")
    # When the parent is cancelled
    client.cancel("parent-2")
    # Then the parent ends cancelled, and so does every subtask, on its worker too
    assert parent.result(TASK_S).status == "cancelled"
    cancelled = 0
    for worker in workers:
        stats = client.request(worker.agent_id, {"until": 10, "timeout_s": TASK_S},
                               timeout=TASK_S + 5)
        assert stats["started"] == 10 and stats["running"] == 0, stats
        cancelled += stats["cancelled"]
    assert cancelled == FAN_OUT
    status = wait_status(client, lambda s: s["tasks"]["cancelled"] == FAN_OUT + 1,
                         timeout=TASK_S, what="all 21 tasks ended cancelled")
    assert status["tasks"]["in_flight"] == 0 and status["tasks"]["pending"] == 0
    for child in range(1, FAN_OUT + 1):
        assert client.fetch(f"parent-2/{child}").status == "cancelled"
