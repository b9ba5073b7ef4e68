"""The broker's Prometheus ``/metrics`` and ``/healthz`` (``broker/metrics.py``), against a
real broker and real agent processes: the counts a scrape shows are exactly the tasks that
ran, and ``/healthz`` fails while only the broker's loop thread is blocked (through the
``ORCH_TEST_HOOKS=1`` hook), then recovers. The state service's requests and lock waits,
the agents' LLM token usage, the connected clients and each agent's health are exactly
what real agents, workers and clients did.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent_sdk import BaseAgent, Result, Task
from broker.config import METRICS_PORT_OFFSET
from broker.metrics import BLOCK_LOOP_FILE, HEALTH_INTERVALS, HEALTH_MIN_AGE_S
from cli.processes import wait_until as poll_until
from tests.conftest import (
    ROOT,
    TEST_HEARTBEAT_S,
    Cluster,
    python_process,
    read_json_line,
)
from tests.fakes.llm_server import FakeLLMServer, TextReply

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


def by_label(samples: Samples, name: str, label: str) -> dict[str, float]:
    """The samples of ``name`` by the value of one of their labels."""
    return {dict(lbl)[label]: value for (n, lbl), value in samples.items() if n == name}


class SickAgent(BaseAgent):
    """Its ``ping()`` hook reports a problem: the broker finds it unhealthy."""

    def __init__(self) -> None:
        super().__init__(name="sick", capabilities=["sick"])

    async def ping(self) -> dict[str, object]:
        return {"ok": False, "detail": "the test says so"}

    async def execute(self, task: Task) -> Result:
        return Result(data=None)


class HangingPingAgent(BaseAgent):
    """Its ``ping()`` hook never returns: the broker finds it unresponsive."""

    def __init__(self) -> None:
        super().__init__(name="hanging", capabilities=["hanging"])

    async def ping(self) -> dict[str, object]:
        await asyncio.Event().wait()
        return {"ok": True}

    async def execute(self, task: Task) -> Result:
        return Result(data=None)


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
    # The journal wrote at least the passes that accepted and finished the 105 tasks,
    # each counted once in its cumulative buckets.
    commits = samples[("orchestrator_journal_commit_seconds_count", ())]
    assert commits >= 2 and samples[("orchestrator_journal_commit_seconds_sum", ())] > 0
    assert samples[("orchestrator_journal_commit_seconds_bucket", labels(le="+Inf"))] == commits
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
    assert took < max(TEST_HEARTBEAT_S * HEALTH_INTERVALS, HEALTH_MIN_AGE_S) + 1.0
    # The HTTP thread still serves /metrics meanwhile (only the loop is blocked).
    assert ("orchestrator_pending_tasks", ()) in scrape(metrics_url(broker.data_dir))
    assert not (broker.data_dir / BLOCK_LOOP_FILE).exists()
    wait_until(lambda: health(url) == 200, "/healthz answers 200 again", timeout=block_s + 5)


def test_a_broker_without_a_journal_has_no_commit_series(cluster: Cluster) -> None:
    broker = cluster.broker("--durability", "none")
    cluster.client(broker.url).ping()
    assert not any(name.startswith("orchestrator_journal_")
                   for name, _ in scrape(metrics_url(broker.data_dir)))


def test_healthz_stays_up_when_idle_and_no_metrics_serves_nothing(cluster: Cluster) -> None:
    broker = cluster.broker()
    url = metrics_url(broker.data_dir).removesuffix("/metrics") + "/healthz"
    # Idle for twice the age /healthz allows: the loop still turns (it wakes for its
    # timers), and a late wake-up on a busy machine is no failure.
    assert not poll_until(lambda: health(url) != 200,
                          2 * max(TEST_HEARTBEAT_S * HEALTH_INTERVALS, HEALTH_MIN_AGE_S))
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
        samples = scrape(url)
        assert ("orchestrator_pending_tasks", ()) in samples
        # No state service in this broker: none of its series.
        assert not any(name.startswith(("orchestrator_state_", "orchestrator_llm_"))
                       for name, _ in samples)


#: A slower heartbeat for the state tests: a session of a process the machine's load held
#: up past the test's 0.6 s window would expire and say HELLO again (or give up a lock).
STATE_HEARTBEAT = ("--heartbeat-interval", "1.0")


def test_state_requests_by_command_are_exactly_what_an_agent_sent(cluster: Cluster) -> None:
    broker = cluster.broker(*STATE_HEARTBEAT)
    cluster.agent(broker.url, "tests.state_worker:CounterAgent")
    client = cluster.client(broker.url)
    client.wait_for_agents(1)
    # One task at a time: each is one GET and one compare-and-set PUT, with no conflict.
    for i in range(7):
        result = client.submit(capabilities=["count"], data={"key": "metrics/n"}).result(
            timeout=10)
        assert result.ok and result.data == i + 1
    samples = scrape(metrics_url(broker.data_dir))
    requests = by_label(samples, "orchestrator_state_requests_total", "command")
    # ... and the broker's own session, which reads the pools' desired counts once at
    # start (broker/pools.py): one HELLO and one GET, no PUT until a scale.
    assert requests["get"] == 7 + 1
    assert requests["put"] == 7
    assert requests["hello"] == 1 + 1  # the agent's one session, and the broker's
    assert requests.get("delete", 0) == 0 and requests.get("acquire", 0) == 0
    assert samples[("orchestrator_state_lock_waits_total", ())] == 0
    assert samples[("orchestrator_state_sessions_waiting_for_lock", ())] == 0


def test_state_lock_waits_count_the_session_that_waited(cluster: Cluster) -> None:
    broker = cluster.broker(*STATE_HEARTBEAT)
    state_url = json.loads((broker.data_dir / "broker.json").read_text())["state"]
    url = metrics_url(broker.data_dir)

    def holder() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([sys.executable, "-m", "tests.state_worker", "hold", state_url,
                                 "metrics-lock", "30"], cwd=ROOT, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
        cluster.procs.append(proc)
        return proc

    first = holder()
    assert read_json_line(first)["event"] == "held"
    second = holder()  # waits up to 10 s for the lock

    def waiting() -> float:
        return scrape(url)[("orchestrator_state_sessions_waiting_for_lock", ())]

    wait_until(lambda: waiting() == 1, "one session waits for the lock")
    samples = scrape(url)
    assert samples[("orchestrator_state_lock_waits_total", ())] == 1
    assert by_label(samples, "orchestrator_state_requests_total", "command")["acquire"] == 2
    # The holder dies: its session expires, the lease goes to the waiter.
    first.kill()
    first.wait(timeout=10)
    assert read_json_line(second)["event"] == "held"
    wait_until(lambda: waiting() == 0, "no session waits any more")
    assert scrape(url)[("orchestrator_state_lock_waits_total", ())] == 1


#: Tokens each fake LLM call costs.
PROMPT_TOKENS, COMPLETION_TOKENS = 20, 10


def test_llm_tokens_are_the_usage_the_agents_published(cluster: Cluster) -> None:
    with FakeLLMServer(default=TextReply("fine", PROMPT_TOKENS, COMPLETION_TOKENS)) as llm:
        broker = cluster.broker()
        # Two processes share the name llm-a (their usage adds up), one is llm-b.
        procs = [cluster.agent(broker.url, "tests.fakes.llm_agents:BudgetedLLMAgent",
                               wait=False, agent_name=name, orch_llm_base_url=llm.url,
                               orch_llm_model="fake")
                 for name in ("llm-a", "llm-a", "llm-b")]
        for proc in procs:
            read_json_line(proc)
        client = cluster.client(broker.url)
        client.wait_for_agents(3)
        calls = {"llm-a": 5, "llm-b": 2}
        handles = [client.submit(capabilities=[name], data={"prompt": "hi"})
                   for name, count in calls.items() for _ in range(count)]
        # Each task publishes its agent's usage before its result leaves.
        assert all(h.result(timeout=20).ok for h in handles)
        assert len(llm.chat_requests) == 7
        samples = scrape(metrics_url(broker.data_dir))
    for name, count in calls.items():
        assert samples[("orchestrator_llm_tokens_total",
                        labels(agent=name, kind="input"))] == count * PROMPT_TOKENS
        assert samples[("orchestrator_llm_tokens_total",
                        labels(agent=name, kind="output"))] == count * COMPLETION_TOKENS
        assert samples[("orchestrator_llm_calls_total", labels(agent=name))] == count
        assert samples[("orchestrator_llm_failed_calls_total", labels(agent=name))] == 0
    assert {dict(lbl)["agent"] for name, lbl in samples
            if name == "orchestrator_llm_calls_total"} == set(calls)


def test_connected_clients_are_those_heard_within_the_liveness_window(
        cluster: Cluster) -> None:
    # A window of 2 s: long enough to scrape in, short enough to wait out.
    broker = cluster.broker("--heartbeat-interval", "1.0", "--heartbeat-liveness", "2")
    cluster.agent(broker.url, agent_name="echo", agent_caps="echo")
    url = metrics_url(broker.data_dir)

    def connected() -> float:
        return scrape(url)[("orchestrator_connected_clients", ())]

    assert connected() == 0
    first = cluster.client(broker.url)
    first.wait_for_agents(1)  # a STATUS request: not a SUBMIT, not counted
    assert connected() == 0
    assert first.submit(capabilities=["echo"], data=1).result(timeout=10).ok
    assert connected() == 1
    second = cluster.client(broker.url)
    assert second.submit(capabilities=["echo"], data=2).result(timeout=10).ok
    assert connected() == 2
    # Nothing open, nothing sent: both leave the count once the window is over.
    wait_until(lambda: connected() == 0, "idle clients are no longer counted", timeout=5)
    assert scrape(url)[("orchestrator_clients_with_open_tasks", ())] == 0


def test_agent_health_is_one_series_per_live_agent(cluster: Cluster) -> None:
    broker = cluster.broker()
    cluster.agent(broker.url, agent_name="echo", agent_caps="echo")
    cluster.agent(broker.url, "tests.e2e.test_metrics:SickAgent")
    cluster.agent(broker.url, "tests.e2e.test_metrics:HangingPingAgent")
    url = metrics_url(broker.data_dir)

    def healths() -> dict[str, float]:
        return by_label(scrape(url), "orchestrator_agent_health", "agent")

    wait_until(lambda: healths() == {"echo": 0, "sick": 2, "hanging": 1},
               "healthy, unhealthy and unresponsive agents")
    ids = {dict(lbl)["agent_id"] for name, lbl in scrape(url)
           if name == "orchestrator_agent_health"}
    assert len(ids) == 3
