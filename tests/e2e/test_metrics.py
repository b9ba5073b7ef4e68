"""The broker's Prometheus ``/metrics`` and ``/healthz`` (``broker/metrics.py``), against a
real broker and real agent processes: the counts a scrape shows are exactly the tasks that
ran, and ``/healthz`` fails while only the broker's loop thread is blocked (through the
``ORCH_TEST_HOOKS=1`` hook), then recovers.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from broker.config import METRICS_PORT_OFFSET
from broker.metrics import BLOCK_LOOP_FILE
from cli.processes import wait_until as poll_until
from tests.conftest import TEST_HEARTBEAT_S, Cluster, python_process

#: Longest a test waits for a condition it polls.
WAIT_S = 10.0
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def metrics_url(data_dir: Path) -> str:
    """The metrics endpoint the broker announced in its ``broker.json``."""
    return json.loads((data_dir / "broker.json").read_text())["metrics"]


def scrape(url: str) -> Samples:
    """Every sample of one scrape, by (name, sorted labels)."""
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.status == 200
        text = response.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def health(url: str) -> int:
    """The HTTP status of ``/healthz``."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as e:
        return e.code


def wait_until(check: Callable[[], bool], what: str, timeout: float = WAIT_S) -> float:
    """Look at ``check`` until it holds (the CLI's own poll, cli.processes.wait_until);
    returns the seconds it took."""
    start = time.monotonic()
    if not poll_until(check, timeout):
        raise AssertionError(f"{what}: not within {timeout} s")
    return time.monotonic() - start


def labels(**kv: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(kv.items()))


def test_metrics_count_exactly_the_tasks_that_ran(cluster: Cluster) -> None:
    broker = cluster.broker("--retries", "0")
    cluster.agent(broker.url, agent_name="echo", agent_caps="echo")
    cluster.agent(broker.url, "tests.sample_agents:FailingAgent")
    client = cluster.client(broker.url)
    client.wait_for_agents(2)
    handles = [client.submit(capabilities=["echo"], data=i, retries=0) for i in range(80)]
    handles += [client.submit(capabilities=["fail"], data={"n": i}, retries=0)
                for i in range(20)]
    handles += [client.submit(capabilities=["fail"], data={"explode": True}, retries=0)
                for _ in range(5)]
    results = [h.result(timeout=20) for h in handles]
    assert sum(r.ok for r in results) == 100
    failures = [r for r in results if not r.ok]
    assert len(failures) == 5
    codes = {r.error.code for r in failures if r.error is not None}
    assert len(codes) == 1
    (code,) = codes

    url = metrics_url(broker.data_dir)
    samples = scrape(url)
    echo = labels(agent="echo", capability="echo")
    failing = labels(agent="failing", capability="fail")
    assert samples[("orchestrator_tasks_started_total", echo)] == 80
    assert samples[("orchestrator_tasks_completed_total", echo)] == 80
    assert samples[("orchestrator_tasks_started_total", failing)] == 25
    assert samples[("orchestrator_tasks_completed_total", failing)] == 20
    assert samples[("orchestrator_tasks_failed_total",
                    labels(agent="failing", capability="fail", code=code))] == 5
    assert samples[("orchestrator_tasks_retried_total", echo)] == 0
    assert samples[("orchestrator_tasks_retried_total", failing)] == 0
    assert not any(name == "orchestrator_tasks_failed_total" and dict(lbl)["agent"] == "echo"
                   for name, lbl in samples)
    # The histogram counts every ended task that ran once, in cumulative buckets.
    assert samples[("orchestrator_task_duration_seconds_count", echo)] == 80
    assert samples[("orchestrator_task_duration_seconds_count", failing)] == 25
    assert samples[("orchestrator_task_duration_seconds_bucket",
                    labels(agent="echo", capability="echo", le="+Inf"))] == 80
    assert samples[("orchestrator_task_duration_seconds_sum", echo)] > 0
    # Nothing waits or runs any more; both agents are live with closed circuits.
    assert samples[("orchestrator_pending_tasks", ())] == 0
    assert not any(name in ("orchestrator_tasks_in_flight", "orchestrator_queue_depth")
                   and value for (name, _), value in samples.items())
    agent_circuits = {dict(lbl)["agent"]: value for (name, lbl), value in samples.items()
                      if name == "orchestrator_agent_circuit_state"}
    assert agent_circuits == {"echo": 0, "failing": 0}
    ages = [value for (name, _), value in samples.items()
            if name == "orchestrator_agent_heartbeat_age_seconds"]
    assert len(ages) == 2 and all(0 <= age < 10 for age in ages)
    assert samples[("orchestrator_messages_received_total", ())] >= 105
    assert samples[("orchestrator_messages_sent_total", ())] > 0
    # The endpoint is in the STATUS document too.
    assert client.status()["broker"]["endpoints"]["metrics"] == url


def test_agent_series_go_when_the_agent_leaves(cluster: Cluster) -> None:
    broker = cluster.broker()
    agent = cluster.agent(broker.url, agent_name="leaver", agent_caps="echo")
    client = cluster.client(broker.url)
    client.wait_for_agents(1)
    assert client.submit(capabilities=["echo"], data=1).result(timeout=10).ok
    url = metrics_url(broker.data_dir)

    def circuits() -> list[str]:
        return [dict(lbl)["agent"] for (name, lbl) in scrape(url)
                if name == "orchestrator_agent_circuit_state"]

    assert circuits() == ["leaver"]
    agent.terminate()
    agent.wait(timeout=10)
    wait_until(lambda: circuits() == [], "the agent's series disappear")
    # Its task counters stay: counters never go down.
    assert scrape(url)[("orchestrator_tasks_completed_total",
                        labels(agent="leaver", capability="echo"))] == 1


def test_healthz_fails_while_only_the_loop_is_blocked(cluster: Cluster,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORCH_TEST_HOOKS", "1")
    broker = cluster.broker()
    url = metrics_url(broker.data_dir).removesuffix("/metrics") + "/healthz"
    assert health(url) == 200
    block_s = 2.0
    (broker.data_dir / BLOCK_LOOP_FILE).write_text(str(block_s))
    # The hook looks every quarter interval; /healthz fails two intervals after.
    took = wait_until(lambda: health(url) == 503, "/healthz answers 503",
                      timeout=block_s)
    assert took < TEST_HEARTBEAT_S * 2 + 1.0
    # The HTTP thread still serves /metrics meanwhile (only the loop is blocked).
    assert ("orchestrator_pending_tasks", ()) in scrape(metrics_url(broker.data_dir))
    assert not (broker.data_dir / BLOCK_LOOP_FILE).exists()
    wait_until(lambda: health(url) == 200, "/healthz answers 200 again", timeout=block_s + 5)


def test_healthz_stays_up_when_idle_and_no_metrics_serves_nothing(cluster: Cluster) -> None:
    broker = cluster.broker()
    url = metrics_url(broker.data_dir).removesuffix("/metrics") + "/healthz"
    # Idle for several intervals: the loop still turns (it wakes for its timers).
    assert not poll_until(lambda: health(url) != 200, TEST_HEARTBEAT_S * 5)
    quiet = cluster.broker("--no-metrics")
    assert "metrics" not in json.loads((quiet.data_dir / "broker.json").read_text())
    client = cluster.client(quiet.url)
    assert "metrics" not in client.status()["broker"]["endpoints"]


def test_a_metrics_port_asked_for_and_taken_is_one_line_error(cluster: Cluster) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = python_process("-m", "broker", "--bind", "127.0.0.1:0",
                              "--data-dir", str(cluster.tmp_path / "taken"),
                              "--metrics-bind", f"127.0.0.1:{port}", "--no-bus", "--no-state",
                              stderr=subprocess.PIPE)
        cluster.procs.append(proc)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 3
    lines = err.decode().strip().splitlines()
    assert lines[-1].startswith("error: cannot serve the metrics:")
    assert "Traceback" not in err.decode()


def test_a_derived_metrics_port_that_is_taken_gives_a_free_one(cluster: Cluster) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        metrics_port = taken.getsockname()[1]
        broker_port = metrics_port - METRICS_PORT_OFFSET
        # The broker's own port must be free: the OS's ephemeral range leaves it so
        # nearly always; a test that found it taken says so rather than pass.
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", broker_port))
        broker = cluster.broker("--no-bus", "--no-state", port=broker_port)
        url = metrics_url(broker.data_dir)
        assert f":{metrics_port}/" not in url
        assert ("orchestrator_pending_tasks", ()) in scrape(url)
