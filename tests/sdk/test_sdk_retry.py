"""The SDK's side of the retry policy, end to end (a real broker, real agent processes).

A failure is reported with ``retryable``: True for a transient fault of the agent
(:class:`RetryableError`, or a class the agent declares in ``retry_on``), False for a
:class:`PermanentFailure`, None for any other exception (the task's own failure, most
often). The broker retries by default only the first, counts only the agent's faults
against its circuit breaker, and gives a task's own failure one second opinion on
another agent; see tests/broker/test_retry_policy.py for the same on a fake clock.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from pathlib import Path

from agent_sdk import BaseAgent, PermanentFailure, Result, RetryableError, Task
from agent_sdk.runner import TaskRunner
from agent_sdk.task import encode_payload
from tests.conftest import Cluster
from tests.e2e.faults.checker import WireTap, check, read_log
from tests.e2e.faults.support import agent_field, collect, wait_status
from wire.tasks import Assignment, ResultItem

AGENTS = "tests.e2e.faults.agents"
#: A circuit that opened would keep the agent's work out for this long: far longer than
#: any result may take in these tests.
LONG_RECOVERY_S = "60"
#: How long a task that must run at once may take here (a small, shared machine).
AT_ONCE_S = 15.0


# ------------------------------------------------------------------ what the runner sends


class _Failing(BaseAgent):
    """Raises what the task's data names."""

    def __init__(self, retry_on: Iterable[type[BaseException]] | None = None) -> None:
        super().__init__(name="failing", capabilities=["x"], retry_on=retry_on)

    async def execute(self, task: Task) -> Result:
        errors: dict[str, Exception] = {
            "retryable": RetryableError("the service timed out"),
            "permanent": PermanentFailure("no such file"), "value": ValueError("bad input"),
            "declared": TimeoutError("the service timed out"),
            "declared_subclass": ConnectionResetError("reset")}
        if task.data == "marked":
            return Result.failure("agent_error", "transient", retryable=True)
        raise errors[task.data]


def _items(agent: BaseAgent, kinds: list[str]) -> dict[str, ResultItem]:
    async def run() -> dict[str, ResultItem]:
        runner: TaskRunner = agent._task_runner
        for kind in kinds:
            runner.start(Assignment(kind, encode_payload(kind, {}), 1, 10.0, ("x",), None))
        return dict(runner.unacked)

    return asyncio.run(run())


def test_the_runner_marks_transient_permanent_and_own_failures() -> None:
    # Given an agent that declares TimeoutError and ConnectionError transient
    items = _items(_Failing(retry_on=(TimeoutError, ConnectionError)),
                   ["retryable", "permanent", "value", "declared", "declared_subclass",
                    "marked"])
    # Then each failure says what it is: transient, permanent, or the task's own
    assert {kind: item.retryable for kind, item in items.items()} == {
        "retryable": True, "permanent": False, "value": None, "declared": True,
        "declared_subclass": True, "marked": True}
    assert items["retryable"].error_message == "RetryableError: the service timed out"
    # And without retry_on the same exceptions are the task's own failures
    plain = _items(_Failing(), ["declared", "value", "retryable"])
    assert {kind: item.retryable for kind, item in plain.items()} == {
        "declared": None, "value": None, "retryable": True}


def test_retry_on_is_a_class_attribute_or_a_constructor_argument() -> None:
    class Declared(_Failing):
        retry_on = (KeyError,)

    assert Declared().retry_on == (KeyError,)
    assert Declared(retry_on=[OSError]).retry_on == (OSError,)
    assert _Failing().retry_on == ()


# ------------------------------------------------------------------ end to end


def test_bad_tasks_do_not_lock_good_work_out_of_the_only_agent(cluster: Cluster,
                                                               tmp_path: Path) -> None:
    # Given the only agent of its capability, one task at a time, and a circuit that
    # would open after 5 failures in a row for a minute
    broker = cluster.broker("--circuit-threshold", "5", "--circuit-recovery", LONG_RECOVERY_S)
    log = tmp_path / "picky.log"
    cluster.agent(broker.url, f"{AGENTS}:PickyAgent", agent_name="picky", agent_caps="check",
                  agent_max="1", exec_log=str(log))
    client = cluster.client(broker.url)
    tap = WireTap(client.client)
    # When 5 tasks fail there because of their own input (ValueError)
    bad = [client.submit(capabilities=["check"], data=i, task_id=f"bad-{i}", timeout=30,
                         bad=True) for i in range(5)]
    failed = collect(bad, broker)
    # Then each failed once, not retried (it would fail again)
    for r in failed:
        assert r.status == "failed" and r.attempts == 1, r
        assert r.error is not None and r.error.message.startswith("ValueError: bad input"), r
    # And a good task submitted next runs at once, on that agent
    good = client.submit(capabilities=["check"], data="good", task_id="good", timeout=30)
    result = good.result(timeout=AT_ONCE_S)
    assert result.ok and result.agent == "picky" and result.attempts == 1, result
    assert agent_field(client.status(), "picky", "circuit") == "closed"
    # And so do good tasks queued among more bad ones, some with retries asked for
    # (retried, yet still not the agent's fault)
    mixed = []
    for i in range(10):
        mixed.append(client.submit(capabilities=["check"], data=i, task_id=f"more-bad-{i}",
                                   timeout=30, bad=True, retries=1 if i % 2 else None))
        mixed.append(client.submit(capabilities=["check"], data=i, task_id=f"more-good-{i}",
                                   timeout=30))
    outcomes = collect(mixed, broker, timeout=AT_ONCE_S)
    assert [r.ok for r in outcomes] == [False, True] * 10, outcomes
    assert [r.attempts for r in outcomes[::2]] == [1, 2] * 5
    status = client.status()
    assert agent_field(status, "picky", "circuit") == "closed"
    assert status["tasks"]["retried"] == 5
    # And every task ran as often as its attempts say, its result delivered once
    runs = read_log(log)
    assert all(runs.count(r.task_id) == r.attempts for r in failed + [result] + outcomes)
    handles = bad + [good] + mixed
    check([h.id for h in handles], failed + [result] + outcomes, [log],
          deliveries=tap.snapshot(), handle_ids=[h.id for h in handles]
          ).assert_valid("bad tasks, good work")


def test_a_broken_agent_beside_a_healthy_one_is_found_out(cluster: Cluster,
                                                          tmp_path: Path) -> None:
    # Given an agent that fails every task (a plain exception: as if the task were at
    # fault) beside a healthy one of the same capability, one task at a time each
    broker = cluster.broker("--circuit-threshold", "3", "--circuit-recovery", LONG_RECOVERY_S)
    broken_log, healthy_log = tmp_path / "broken.log", tmp_path / "healthy.log"
    cluster.agent(broker.url, f"{AGENTS}:RaisingAgent", agent_name="broken", agent_caps="work",
                  agent_max="1", exec_log=str(broken_log))
    cluster.agent(broker.url, f"{AGENTS}:CountingAgent", agent_name="healthy",
                  agent_caps="work", agent_max="1", echo_delay_s="0.05",
                  exec_log=str(healthy_log))
    client = cluster.client(broker.url)
    tap = WireTap(client.client)
    # When 20 tasks run (no retries asked for)
    first = [client.submit(capabilities=["work"], data=i, task_id=f"t-{i}", timeout=30)
             for i in range(20)]
    results = collect(first, broker)
    # Then every task succeeded, those the broken agent failed on the healthy one (its
    # second opinion), at their second attempt
    failed_on_broken = read_log(broken_log)
    assert len(failed_on_broken) >= 3 and len(set(failed_on_broken)) == len(failed_on_broken)
    for r in results:
        assert r.ok and r.agent == "healthy" and r.data == int(r.task_id[2:]), r
        assert r.attempts == (2 if r.task_id in failed_on_broken else 1), r
    assert sorted(read_log(healthy_log)) == sorted(h.id for h in first)
    # And the broken agent's circuit is open: its failures turned out to be its own
    status = wait_status(client, lambda s: agent_field(s, "broken", "circuit") == "open",
                         what="the broken agent's circuit open")
    assert agent_field(status, "broken", "failed_for_peers") == len(failed_on_broken)
    assert agent_field(status, "healthy", "circuit") == "closed"
    # When more work comes
    more = [client.submit(capabilities=["work"], data=i, task_id=f"m-{i}", timeout=30)
            for i in range(10)]
    later = collect(more, broker)
    # Then it all flows to the healthy agent, at the first attempt
    assert all(r.ok and r.agent == "healthy" and r.attempts == 1 for r in later), later
    assert read_log(broken_log) == failed_on_broken
    handles = first + more
    report = check([h.id for h in handles], results + later, [broken_log, healthy_log],
                   deliveries=tap.snapshot(), handle_ids=[h.id for h in handles])
    report.assert_valid("broken agent found out")
    assert report.re_executed == set(failed_on_broken)


def test_an_exception_class_the_agent_declares_is_retried_by_default(cluster: Cluster,
                                                                     tmp_path: Path) -> None:
    # Given an agent whose first 2 attempts of every task raise ConnectionError, which
    # it declares transient (retry_on), the only agent of its capability
    broker = cluster.broker("--circuit-threshold", "1000")
    log = tmp_path / "declared.log"
    cluster.agent(broker.url, f"{AGENTS}:DeclaredFlakyAgent", agent_name="declared",
                  fail_attempts="2", exec_log=str(log))
    client = cluster.client(broker.url)
    # When tasks run with the broker's default retries, and one with none
    handles = [client.submit(capabilities=["echo"], data=i, task_id=f"d-{i}", timeout=30)
               for i in range(5)]
    none = client.submit(capabilities=["echo"], data=0, task_id="d-none", timeout=30,
                         retries=0)
    results = collect(handles + [none], broker)
    # Then each succeeds at its third attempt; the one without retries fails at once
    assert all(r.ok and r.attempts == 3 for r in results[:5]), results
    assert results[5].status == "failed" and results[5].attempts == 1, results[5]
    assert results[5].error is not None
    assert results[5].error.message.startswith("ConnectionError: flaky failure"), results[5]
    assert sorted(read_log(log)) == sorted([h.id for h in handles] * 3 + ["d-none"])
