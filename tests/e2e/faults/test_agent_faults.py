"""Agent faults: SIGKILL and SIGSTOP mid-task, ``execute`` raising, an agent slower than
the timeout. Each task must end with the right status, be retried where it should, and
reach the client exactly once (checked by tests/e2e/faults/checker.py)."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.conftest import Cluster
from tests.e2e.faults.checker import WireTap, check, read_log
from tests.e2e.faults.support import (
    Signals, agent_field, agents_by_name, collect, wait_status, wait_until,
)

AGENTS = "tests.e2e.faults.agents"


def test_agent_sigkilled_mid_task_tasks_succeed_on_another_agent(cluster: Cluster,
                                                                 tmp_path: Path) -> None:
    # Given a victim agent that holds 4 tasks it will never finish by itself
    broker = cluster.broker()
    victim_log, healthy_log = tmp_path / "victim.log", tmp_path / "healthy.log"
    victim = cluster.agent(broker.url, f"{AGENTS}:CountingAgent", agent_name="victim",
                           agent_max="4", echo_delay_s="60", exec_log=str(victim_log))
    client = cluster.client(broker.url)
    tap = WireTap(client.client)
    held = [client.submit(capabilities=["echo"], data=i, task_id=f"held-{i}", timeout=30)
            for i in range(4)]
    wait_status(client, lambda s: s["tasks"]["running"] == 4, what="the victim runs 4 tasks")
    assert sorted(read_log(victim_log)) == sorted(h.id for h in held)
    # And a healthy agent with the same capability, and 16 more tasks
    cluster.agent(broker.url, f"{AGENTS}:CountingAgent", agent_name="healthy",
                  echo_delay_s="0.01", exec_log=str(healthy_log))
    more = [client.submit(capabilities=["echo"], data=i, task_id=f"more-{i}", timeout=30)
            for i in range(16)]
    # When the victim is SIGKILLed mid-task
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=10)
    # Then every task succeeds, the held ones on the healthy agent at attempt 2
    handles = held + more
    results = collect(handles, broker)
    assert all(r.ok for r in results), results
    for r in results[:4]:
        assert r.agent == "healthy" and r.attempts == 2, r
    assert all(r.attempts == 1 and r.agent == "healthy" for r in results[4:]), results
    assert [r.data for r in results] == list(range(4)) + list(range(16))
    # And the client got exactly one result per task
    status = wait_status(client, lambda s: s["tasks"]["succeeded"] == 20, what="20 succeeded")
    assert status["tasks"]["redispatched"] == 4
    assert list(agents_by_name(status)) == ["healthy"]
    report = check([h.id for h in handles], results, [victim_log, healthy_log],
                   deliveries=tap.snapshot(), handle_ids=[h.id for h in handles])
    report.assert_valid("agent sigkill")
    assert report.re_executed == {h.id for h in held}


def test_agent_sigstopped_mid_task_is_declared_dead_and_its_tasks_run_elsewhere(
        cluster: Cluster, signals: Signals, tmp_path: Path) -> None:
    # Given a victim agent holding 4 long tasks, and a healthy agent
    broker = cluster.broker()
    victim_log, healthy_log = tmp_path / "victim.log", tmp_path / "healthy.log"
    cancel_log, done_log = tmp_path / "victim-cancel.log", tmp_path / "victim-done.log"
    victim = cluster.agent(broker.url, f"{AGENTS}:CountingAgent", agent_name="victim",
                           agent_max="4", echo_delay_s="60", exec_log=str(victim_log),
                           cancel_log=str(cancel_log), done_log=str(done_log))
    client = cluster.client(broker.url)
    tap = WireTap(client.client)
    held = [client.submit(capabilities=["echo"], data=i, task_id=f"held-{i}", timeout=30)
            for i in range(4)]
    wait_status(client, lambda s: s["tasks"]["running"] == 4, what="the victim runs 4 tasks")
    cluster.agent(broker.url, f"{AGENTS}:CountingAgent", agent_name="healthy",
                  echo_delay_s="0.01", exec_log=str(healthy_log))
    # When the victim is SIGSTOPped (hung: its heartbeats stop, its sockets stay open)
    signals.stop(victim)
    # Then the broker declares it dead (3 x 0.2 s of silence) and runs its tasks elsewhere
    wait_status(client, lambda s: list(agents_by_name(s)) == ["healthy"],
                what="the hung victim removed")
    results = collect(held, broker)
    assert all(r.ok and r.agent == "healthy" and r.attempts == 2 for r in results), results
    # When the victim wakes up again
    signals.cont(victim)
    # Then it registers again, and the broker stops its now unwanted copies of the tasks
    # (its slots are free again once it answered the cancels)
    wait_status(client, lambda s: agent_field(s, "victim", "in_flight") == 0,
                what="the victim re-registered with no task held")
    assert sorted(read_log(cancel_log)) == sorted(h.id for h in held)
    assert read_log(done_log) == []
    # And a new task may go to either agent and succeeds once
    late = client.submit(capabilities=["echo"], data="late", task_id="late", timeout=30,
                         delay_s=0)
    [late_result] = collect([late], broker)
    assert late_result.ok and late_result.data == "late"
    # And the client got exactly one result per task; nothing reached it twice
    status = wait_status(client, lambda s: s["tasks"]["succeeded"] == 5, what="5 succeeded")
    assert status["tasks"]["redispatched"] == 4
    report = check([h.id for h in held] + ["late"], results + [late_result],
                   [victim_log, healthy_log], deliveries=tap.snapshot())
    report.assert_valid("agent sigstop")
    assert not report.redelivered
    assert report.re_executed == {h.id for h in held}


def test_execute_raising_fails_with_agent_error_after_retries(cluster: Cluster,
                                                              tmp_path: Path) -> None:
    # Given an agent whose execute always raises (circuit breaking out of the way), the
    # only one of its capability (no other agent for a second opinion)
    broker = cluster.broker("--circuit-threshold", "1000")
    log = tmp_path / "raising.log"
    cluster.agent(broker.url, f"{AGENTS}:RaisingAgent", agent_name="raising",
                  agent_caps="doomed", exec_log=str(log))
    client = cluster.client(broker.url)
    tap = WireTap(client.client)
    # When tasks fail there with a plain exception (the task's own failure) with 2
    # retries asked for, and with none asked for
    two = [client.submit(capabilities=["doomed"], data=i, task_id=f"r2-{i}", timeout=30,
                         retries=2) for i in range(5)]
    plain = [client.submit(capabilities=["doomed"], data=i, task_id=f"rp-{i}", timeout=30)
             for i in range(3)]
    # And with a transient fault (RetryableError) with the broker's default (3), and
    # with 0 retries asked for
    transient = [client.submit(capabilities=["doomed"], data=i, task_id=f"rd-{i}",
                               timeout=30, transient=True) for i in range(3)]
    zero = client.submit(capabilities=["doomed"], data=0, task_id="r0", timeout=30, retries=0,
                         transient=True)
    handles = two + plain + transient + [zero]
    results = collect(handles, broker)
    # Then each fails with agent_error once its retries are exhausted
    for r in results:
        assert r.status == "failed" and r.error is not None, r
        assert r.error.code == "agent_error" and "boom on" in r.error.message, r
        assert r.agent == "raising"
    kinds = [r.error.message.split(":")[0] for r in results]  # type: ignore[union-attr]
    assert kinds == ["RuntimeError"] * 8 + ["RetryableError"] * 4, kinds
    # And a plain exception was retried only when the task asked for retries; a
    # transient fault by default
    assert [r.attempts for r in results] == [3] * 5 + [1] * 3 + [4] * 3 + [1]
    # And each attempt really ran on the agent
    runs = read_log(log)
    assert all(runs.count(h.id) == 3 for h in two)
    assert all(runs.count(h.id) == 1 for h in plain)
    assert all(runs.count(h.id) == 4 for h in transient)
    assert runs.count("r0") == 1
    # And the client got exactly one result per task
    report = check([h.id for h in handles], results, [log], deliveries=tap.snapshot(),
                   handle_ids=[h.id for h in handles])
    report.assert_valid("execute raises")
    assert not report.redelivered
    status = wait_status(client, lambda s: s["tasks"]["failed"] == 12, what="12 failed")
    assert status["tasks"]["retried"] == 5 * 2 + 3 * 3


def test_execute_raising_once_succeeds_on_retry(cluster: Cluster, tmp_path: Path) -> None:
    # Given an agent whose first two attempts of every task raise
    broker = cluster.broker("--circuit-threshold", "1000")
    log = tmp_path / "flaky.log"
    cluster.agent(broker.url, f"{AGENTS}:FlakyAgent", agent_name="flaky", fail_attempts="2",
                  exec_log=str(log))
    client = cluster.client(broker.url)
    tap = WireTap(client.client)
    # When 10 tasks fail with a transient fault, with the default 3 retries, and 3 fail
    # with a plain exception, with 2 retries asked for
    handles = [client.submit(capabilities=["echo"], data=i, task_id=f"f-{i}", timeout=30)
               for i in range(10)]
    handles += [client.submit(capabilities=["echo"], data=i, task_id=f"p-{i}", timeout=30,
                              retries=2, transient=False) for i in range(10, 13)]
    results = collect(handles, broker)
    # Then each succeeds on its third attempt
    assert all(r.ok and r.attempts == 3 and r.attempt == 3 for r in results), results
    assert [r.data for r in results] == list(range(13))
    report = check([h.id for h in handles], results, [log], deliveries=tap.snapshot(),
                   handle_ids=[h.id for h in handles])
    report.assert_valid("raises then succeeds")
    assert report.executions == 39 and report.max_executions == 3


def test_execute_raising_on_one_agent_succeeds_on_retry_on_another(cluster: Cluster,
                                                                   tmp_path: Path) -> None:
    # Given an agent that always fails with a transient fault and whose circuit opens at
    # its first failure (so that retries cannot go back to it), and then a healthy agent
    broker = cluster.broker("--circuit-threshold", "1", "--circuit-recovery", "60")
    bad_log, good_log = tmp_path / "bad.log", tmp_path / "good.log"
    cluster.agent(broker.url, f"{AGENTS}:RaisingAgent", agent_name="bad", agent_max="1",
                  exec_log=str(bad_log))
    client = cluster.client(broker.url)
    tap = WireTap(client.client)
    first = client.submit(capabilities=["echo"], data="x", task_id="moved", timeout=30,
                          transient=True)
    wait_status(client, lambda s: agent_field(s, "bad", "circuit") == "open",
                what="the bad agent's circuit open")
    cluster.agent(broker.url, f"{AGENTS}:CountingAgent", agent_name="good",
                  exec_log=str(good_log))
    # When its retry runs
    [result] = collect([first], broker)
    # Then the task succeeded on the other agent at attempt 2
    assert result.ok and result.agent == "good" and result.attempts == 2, result
    assert read_log(bad_log) == ["moved"] and read_log(good_log) == ["moved"]
    check(["moved"], [result], [bad_log, good_log],
          deliveries=tap.snapshot()).assert_valid("raise then other agent")


def test_agent_slower_than_timeout_times_out_and_is_stopped(cluster: Cluster,
                                                           tmp_path: Path) -> None:
    # Given an agent that takes 30 s per task
    broker = cluster.broker("--circuit-threshold", "1000")
    log, cancel_log, done_log = (tmp_path / n for n in ("slow.log", "cancel.log", "done.log"))
    cluster.agent(broker.url, f"{AGENTS}:CountingAgent", agent_name="slow", agent_max="4",
                  echo_delay_s="30", exec_log=str(log), cancel_log=str(cancel_log),
                  done_log=str(done_log))
    client = cluster.client(broker.url)
    tap = WireTap(client.client)
    # When tasks with a 0.5 s deadline (the whole task's timeout) and no retries run on it
    handles = [client.submit(capabilities=["echo"], data=i, task_id=f"t0-{i}", timeout=0.5,
                             retries=0) for i in range(3)]
    results = collect(handles, broker)
    # Then each ends timed_out at its deadline, during its one attempt
    for r in results:
        assert r.status == "timed_out" and r.error is not None and r.error.code == "timeout", r
        assert r.attempts == 1, r
        assert r.error.message == "its 0.5 s deadline passed during attempt 1", r
    # And each was stopped on the agent (cancelled), none ran to its end
    wait_status(client, lambda s: s["tasks"]["in_flight"] == 0
                and agent_field(s, "slow", "in_flight") == 0, what="the slow agent idle")
    assert sorted(read_log(log)) == sorted(h.id for h in handles)
    assert sorted(read_log(cancel_log)) == sorted(h.id for h in handles)
    assert read_log(done_log) == []
    report = check([h.id for h in handles], results, [log], deliveries=tap.snapshot(),
                   handle_ids=[h.id for h in handles])
    report.assert_valid("slower than timeout")
    assert not report.redelivered
    assert client.status()["tasks"]["timed_out"] == 3


# Regression tests for a product bug these tests found (fixed in broker/tasks.py
# Deadlines.pop_expired while they were written): a task requeued and dispatched in the
# same broker loop pass (a retry released by _release_retries(now) then _dispatch(now), or
# an orphan requeued by _tick(now) -> _orphan then _dispatch(now)) got two Deadlines
# entries with the same deadline; when that attempt timed out, pop_expired returned the
# task twice and the second _end_by_broker -> _finish raised KeyError in
# `del self.tasks[...]`, which killed the broker process.


def test_agent_slower_than_timeout_is_retried_then_times_out(cluster: Cluster,
                                                             tmp_path: Path) -> None:
    # Given an agent that takes 30 s per task
    broker = cluster.broker("--circuit-threshold", "1000")
    log, cancel_log = tmp_path / "slow.log", tmp_path / "cancel.log"
    cluster.agent(broker.url, f"{AGENTS}:CountingAgent", agent_name="slow", agent_max="4",
                  echo_delay_s="30", exec_log=str(log), cancel_log=str(cancel_log))
    client = cluster.client(broker.url)
    tap = WireTap(client.client)
    # When tasks with a 0.5 s limit per attempt, 1 retry and a whole-task deadline long
    # enough for both attempts run on it
    handles = [client.submit(capabilities=["echo"], data=i, task_id=f"t1-{i}", timeout=30,
                             attempt_timeout=0.5, retries=1) for i in range(2)]
    results = collect(handles, broker)
    # Then each ends timed_out after 2 attempts, each of which ran and was stopped
    for r in results:
        assert r.status == "timed_out" and r.error is not None and r.error.code == "timeout", r
        assert r.error.message == "attempt 2 ran past its 0.5 s attempt limit", r
    assert [r.attempts for r in results] == [2, 2]
    runs = read_log(log)
    assert [runs.count(h.id) for h in handles] == [2, 2]
    report = check([h.id for h in handles], results, [log], deliveries=tap.snapshot(),
                   handle_ids=[h.id for h in handles])
    report.assert_valid("retried then timed out")
    assert broker.proc.poll() is None


def test_task_of_hung_agent_that_times_out_on_its_new_agent(cluster: Cluster, signals: Signals,
                                                            tmp_path: Path) -> None:
    # Given a victim agent running a task, and a second agent as slow as the first
    broker = cluster.broker("--circuit-threshold", "1000")
    log = tmp_path / "exec.log"
    victim = cluster.agent(broker.url, f"{AGENTS}:CountingAgent", agent_name="victim",
                           agent_max="1", echo_delay_s="30", exec_log=str(log))
    client = cluster.client(broker.url)
    handle = client.submit(capabilities=["echo"], data=1, task_id="orphan", timeout=2.0,
                           retries=1)
    wait_status(client, lambda s: s["tasks"]["running"] == 1, what="the victim runs it")
    cluster.agent(broker.url, f"{AGENTS}:CountingAgent", agent_name="other", agent_max="1",
                  echo_delay_s="30", exec_log=str(log))
    # When the victim hangs (SIGSTOP: the broker's heartbeat check finds it dead and
    # requeues its task in the same pass that dispatches it to the other agent), and
    # the task times out there
    signals.stop(victim)
    [result] = collect([handle], broker)
    # Then it ends timed_out (attempt 2), and the broker is still alive
    assert result.status == "timed_out" and result.attempts == 2, result
    assert broker.proc.poll() is None
    check(["orphan"], [result], [log]).assert_valid("orphan timed out")


def test_retry_on_same_agent_is_not_ended_by_the_old_attempts_cancel(
        cluster: Cluster, signals: Signals, tmp_path: Path) -> None:
    # Given the only agent, slow on a task's first attempt only, and a broker that waits
    # 10 s of silence before it declares an agent dead
    broker = cluster.broker("--circuit-threshold", "1000", "--heartbeat-liveness", "50")
    log, cancel_log = tmp_path / "exec.log", tmp_path / "cancel.log"
    agent = cluster.agent(broker.url, f"{AGENTS}:CountingAgent", agent_name="solo",
                          echo_delay_s="30", slow_attempts="1", exec_log=str(log),
                          cancel_log=str(cancel_log))
    client = cluster.client(broker.url)
    # (1 s per attempt; a whole-task deadline long enough for the retry's wait and run)
    handle = client.submit(capabilities=["echo"], data="z", task_id="twice", timeout=30,
                           attempt_timeout=1.0, retries=1)
    wait_status(client, lambda s: s["tasks"]["running"] == 1, what="attempt 1 runs")
    # When the agent is stopped while attempt 1 times out (its CANCEL cannot be answered)
    signals.stop(agent)
    # Then the retry waits: the agent still runs attempt 1, and an answer from it could
    # not be told from attempt 2's
    wait_until(client, lambda: client.fetch("twice").status == "pending",
               what="attempt 1 timed out, retry waiting")
    assert client.fetch("twice").attempts == 1
    signals.cont(agent)
    # And once the agent answered the CANCEL, attempt 2 runs there and succeeds
    [result] = collect([handle], broker)
    assert result.ok and result.attempts == 2, result
    assert read_log(log) == ["twice", "twice"]
    assert read_log(cancel_log) == ["twice"]


def test_timed_out_attempt_succeeds_on_retry_on_a_faster_agent(cluster: Cluster,
                                                               tmp_path: Path) -> None:
    # Given a slow agent whose circuit opens at its first timeout, and a fast agent
    broker = cluster.broker("--circuit-threshold", "1", "--circuit-recovery", "60")
    slow_log, fast_log = tmp_path / "slow.log", tmp_path / "fast.log"
    cluster.agent(broker.url, f"{AGENTS}:CountingAgent", agent_name="slow", agent_max="1",
                  echo_delay_s="30", exec_log=str(slow_log))
    client = cluster.client(broker.url)
    tap = WireTap(client.client)
    # (3 s per attempt: time for the fast agent to start; a whole-task deadline long
    # enough for the retry)
    handle = client.submit(capabilities=["echo"], data="y", task_id="slowpoke", timeout=30,
                           attempt_timeout=3.0)
    wait_status(client, lambda s: s["tasks"]["running"] == 1, what="the slow agent runs it")
    cluster.agent(broker.url, f"{AGENTS}:CountingAgent", agent_name="fast",
                  exec_log=str(fast_log))
    # When its first attempt times out
    [result] = collect([handle], broker)
    # Then its retry succeeded on the fast agent
    assert result.ok and result.agent == "fast" and result.attempts == 2, result
    assert read_log(slow_log) == ["slowpoke"] and read_log(fast_log) == ["slowpoke"]
    check(["slowpoke"], [result], [slow_log, fast_log],
          deliveries=tap.snapshot()).assert_valid("timeout then faster agent")
    status = client.status()
    assert agent_field(status, "slow", "circuit") == "open"
    assert status["tasks"]["timed_out"] == 0 and status["tasks"]["succeeded"] == 1
