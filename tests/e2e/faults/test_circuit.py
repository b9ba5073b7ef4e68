"""Circuit breakers per agent: open after N of the agent's own faults in a row (here
transient failures it reports with ``RetryableError``), no work while open (when a healthy
agent can take it), one probe after the recovery time, closed after its success.
(Failures that are the task's own do not count: tests/sdk/test_sdk_retry.py.)"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from tests.conftest import Cluster
from tests.e2e.faults.checker import WireTap, check, read_log
from tests.e2e.faults.support import agent_field, collect, wait_status

AGENTS = "tests.e2e.faults.agents"


def start_pair(cluster: Cluster, url: str, tmp_path: Path) -> tuple[Path, Path]:
    """A ``flaky`` agent (fails tasks with ``fail=True`` with a transient fault, which
    counts against its circuit) and a ``healthy`` one, both offering ``work``; returns
    their execution logs."""
    flaky_log, healthy_log = tmp_path / "flaky.log", tmp_path / "healthy.log"
    cluster.agent(url, f"{AGENTS}:SelectiveAgent", agent_name="flaky", agent_caps="work",
                  exec_log=str(flaky_log))
    cluster.agent(url, f"{AGENTS}:CountingAgent", agent_name="healthy", agent_caps="work",
                  exec_log=str(healthy_log))
    return flaky_log, healthy_log


def run_on_flaky(client: Any, broker: Any, task_id: str, fail: bool) -> Any:
    """Run one task pinned to the flaky agent (no retries); return its result."""
    handle = client.submit(capabilities=["work"], agent="flaky", data=task_id,
                           task_id=task_id, timeout=30, retries=0, fail=fail)
    [result] = collect([handle], broker)
    assert result.agent == "flaky" and result.ok is not fail, result
    return result


def test_circuit_opens_after_3_failures_in_a_row_and_gets_no_tasks(cluster: Cluster,
                                                                   tmp_path: Path) -> None:
    # Given threshold 3 (and a recovery long enough that no probe happens in this test)
    broker = cluster.broker("--circuit-threshold", "3", "--circuit-recovery", "30")
    flaky_log, healthy_log = start_pair(cluster, broker.url, tmp_path)
    client = cluster.client(broker.url)
    tap = WireTap(client.client)
    results = []
    # When the flaky agent fails twice, succeeds once, fails twice: never 3 in a row
    for i, fail in enumerate([True, True, False, True, True]):
        results.append(run_on_flaky(client, broker, f"warm-{i}", fail))
    # Then its circuit is still closed
    assert agent_field(client.status(), "flaky", "circuit") == "closed"
    # When it fails a third time in a row
    results.append(run_on_flaky(client, broker, "third", True))
    # Then its circuit is open
    status = client.status()
    assert agent_field(status, "flaky", "circuit") == "open", status["agents"]
    assert agent_field(status, "healthy", "circuit") == "closed"
    # And while it is open, 30 tasks it could run all go to the healthy agent
    handles = [client.submit(capabilities=["work"], data=i, task_id=f"w-{i}", timeout=30)
               for i in range(30)]
    work = collect(handles, broker)
    assert all(r.ok and r.agent == "healthy" for r in work), [(r.task_id, r.agent) for r in work]
    assert not set(read_log(flaky_log)) & {h.id for h in handles}
    assert agent_field(client.status(), "flaky", "circuit") == "open"
    submitted = [f"warm-{i}" for i in range(5)] + ["third"] + [h.id for h in handles]
    report = check(submitted, results + work, [flaky_log, healthy_log],
                   deliveries=tap.snapshot())
    report.assert_valid("circuit open")
    assert not report.redelivered


def test_circuit_half_opens_after_recovery_and_closes_after_successful_probe(
        cluster: Cluster, tmp_path: Path) -> None:
    # Given threshold 3 and a 1 s recovery
    broker = cluster.broker("--circuit-threshold", "3", "--circuit-recovery", "1")
    flaky_log, healthy_log = start_pair(cluster, broker.url, tmp_path)
    client = cluster.client(broker.url)
    tap = WireTap(client.client)
    # When the flaky agent fails 3 tasks in a row
    first = [run_on_flaky(client, broker, "fail-0", True),
             run_on_flaky(client, broker, "fail-1", True)]
    opened_after = time.monotonic()  # the circuit opens after this instant
    first.append(run_on_flaky(client, broker, "fail-2", True))
    # Then its circuit is open
    assert agent_field(client.status(), "flaky", "circuit") == "open"
    # And tasks that ran while it was surely still open (their result came within the
    # recovery time of its opening) went to the healthy agent
    arrived: dict[str, float] = {}
    lock = threading.Lock()

    def note(handle: Any) -> None:
        with lock:
            arrived[handle.id] = time.monotonic()

    handles = [client.submit(capabilities=["work"], data=i, task_id=f"w-{i}", timeout=30)
               for i in range(20)]
    for handle in handles:
        handle.add_done_callback(note)
    work = collect(handles, broker)
    surely_open = [r for r in work if arrived[r.task_id] < opened_after + 1.0]
    print(f"[circuit] {len(surely_open)} of {len(work)} tasks finished while surely open")
    assert all(r.agent == "healthy" for r in surely_open), [(r.task_id, r.agent) for r in work]
    assert all(r.ok for r in work)
    # When the recovery time has passed
    wait_status(client, lambda s: agent_field(s, "flaky", "circuit") in ("half_open", "closed"),
                timeout=10, what="the circuit half-open")
    # And a task that succeeds goes to it (the probe)
    probe = run_on_flaky(client, broker, "probe", False)
    # Then its circuit is closed again
    assert probe.ok
    assert agent_field(client.status(), "flaky", "circuit") == "closed"
    # And it takes work again (a pinned task needs no probe slot now: 5 at once)
    again = [client.submit(capabilities=["work"], agent="flaky", data=i, task_id=f"again-{i}",
                           timeout=30) for i in range(5)]
    again_results = collect(again, broker)
    assert all(r.ok and r.agent == "flaky" for r in again_results)
    submitted = ["fail-0", "fail-1", "fail-2", "probe"] + [h.id for h in handles + again]
    report = check(submitted, first + work + [probe] + again_results,
                   [flaky_log, healthy_log], deliveries=tap.snapshot())
    report.assert_valid("circuit recovery")
    assert not report.redelivered


def test_failed_probe_opens_the_circuit_again(cluster: Cluster, tmp_path: Path) -> None:
    # Given a flaky agent whose circuit opened (threshold 3, recovery 1 s)
    broker = cluster.broker("--circuit-threshold", "3", "--circuit-recovery", "1")
    flaky_log, _ = start_pair(cluster, broker.url, tmp_path)
    client = cluster.client(broker.url)
    results = [run_on_flaky(client, broker, f"fail-{i}", True) for i in range(3)]
    assert agent_field(client.status(), "flaky", "circuit") == "open"
    wait_status(client, lambda s: agent_field(s, "flaky", "circuit") == "half_open",
                timeout=10, what="the circuit half-open")
    # When the probe fails too
    results.append(run_on_flaky(client, broker, "bad-probe", True))
    # Then the circuit is open again at once (one failure suffices when half-open)
    assert agent_field(client.status(), "flaky", "circuit") == "open"
    # And after another recovery period a good probe closes it
    wait_status(client, lambda s: agent_field(s, "flaky", "circuit") == "half_open",
                timeout=10, what="the circuit half-open again")
    results.append(run_on_flaky(client, broker, "good-probe", False))
    assert agent_field(client.status(), "flaky", "circuit") == "closed"
    ids = [f"fail-{i}" for i in range(3)] + ["bad-probe", "good-probe"]
    check(ids, results, [flaky_log]).assert_valid("failed probe")
    assert read_log(flaky_log) == ids
