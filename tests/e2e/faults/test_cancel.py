"""Cancellation: of a task no agent has taken yet, and of a task running on an agent
(which must really stop there)."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import Cluster
from tests.e2e.faults.checker import WireTap, check, read_log
from tests.e2e.faults.support import WAIT_S, agent_field, collect, wait_status

AGENTS = "tests.e2e.faults.agents"


def test_cancel_pending_task_without_agent(cluster: Cluster, tmp_path: Path) -> None:
    # Given a task for a capability no agent offers yet (it waits in the queue)
    broker = cluster.broker()
    log = tmp_path / "exec.log"
    client = cluster.client(broker.url)
    tap = WireTap(client.client)
    handle = client.submit(capabilities=["nobody"], data=1, task_id="orphan", timeout=30)
    handle.wait_accepted(timeout=WAIT_S)
    assert client.status()["tasks"]["pending"] == 1
    # When the client cancels it
    handle.cancel()
    [result] = collect([handle], broker)
    # Then its result says cancelled, and it left the queue
    assert result.status == "cancelled" and result.error is not None, result
    assert result.error.code == "cancelled" and result.attempts == 0, result
    status = wait_status(client, lambda s: s["tasks"]["cancelled"] == 1, what="1 cancelled")
    assert status["tasks"]["pending"] == 0
    # And an agent that arrives later never runs it; a new task runs there as usual
    cluster.agent(broker.url, f"{AGENTS}:CountingAgent", agent_name="late", agent_caps="nobody",
                  exec_log=str(log))
    after = client.submit(capabilities=["nobody"], data=2, task_id="after", timeout=30)
    [after_result] = collect([after], broker)
    assert after_result.ok
    assert read_log(log) == ["after"]
    # And the client got exactly one result per task
    report = check(["orphan", "after"], [result, after_result], [log],
                   deliveries=tap.snapshot())
    report.assert_valid("cancel pending")
    assert not report.redelivered
    # And cancelling again changes nothing: the retained result still says cancelled
    handle.cancel()
    assert client.fetch("orphan").status == "cancelled"
    assert client.status()["tasks"]["cancelled"] == 1


def test_cancel_running_task_stops_it_on_the_agent(cluster: Cluster, tmp_path: Path) -> None:
    # Given an agent running a 30 s task
    broker = cluster.broker()
    log, cancel_log, done_log = (tmp_path / n for n in ("exec.log", "cancel.log", "done.log"))
    cluster.agent(broker.url, f"{AGENTS}:CountingAgent", agent_name="worker", agent_max="1",
                  echo_delay_s="30", exec_log=str(log), cancel_log=str(cancel_log),
                  done_log=str(done_log))
    client = cluster.client(broker.url)
    tap = WireTap(client.client)
    handle = client.submit(capabilities=["echo"], data=1, task_id="long", timeout=60)
    wait_status(client, lambda s: s["tasks"]["running"] == 1, what="the task runs")
    assert read_log(log) == ["long"]
    # When the client cancels it
    handle.cancel()
    [result] = collect([handle], broker)
    # Then its result says cancelled (at once: the broker does not wait for the agent)
    assert result.status == "cancelled" and result.error is not None, result
    assert result.error.code == "cancelled" and result.agent == "worker", result
    # And the agent really stopped it: once it answered the cancel (its slot is free),
    # its log shows the cancellation and no completion
    wait_status(client, lambda s: agent_field(s, "worker", "in_flight") == 0,
                what="the agent freed its slot")
    assert read_log(cancel_log) == ["long"]
    assert read_log(done_log) == []
    # And the agent takes new work in the freed slot (max_concurrent is 1)
    quick = client.submit(capabilities=["echo"], data=2, task_id="quick", timeout=30,
                          delay_s=0)
    [quick_result] = collect([quick], broker)
    assert quick_result.ok and quick_result.agent == "worker"
    assert read_log(done_log) == ["quick"]
    # And the client got exactly one result per task, the cancelled one included
    status = wait_status(client, lambda s: s["tasks"]["succeeded"] == 1, what="1 succeeded")
    assert status["tasks"]["cancelled"] == 1
    report = check(["long", "quick"], [result, quick_result], [log],
                   deliveries=tap.snapshot())
    report.assert_valid("cancel running")
    assert not report.redelivered
