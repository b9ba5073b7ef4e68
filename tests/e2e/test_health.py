"""Health checks with real processes: the broker PINGs every agent; one whose ``ping()``
hangs is UNRESPONSIVE within the ping deadline and gets no work, one whose ``ping()``
raises, or whose task hangs past its attempt limit, is UNHEALTHY; each recovers when
fixed, and the events say so."""

from __future__ import annotations

import json
import select
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.conftest import TEST_HEARTBEAT_S, TEST_LIVENESS, Cluster
from tests.support import agents_by_name, wait_status

PROBE = "tests.sample_agents:HealthProbeAgent"
#: the broker's default ping deadline: half the liveness window
PING_DEADLINE_S = TEST_HEARTBEAT_S * TEST_LIVENESS / 2


def health_of(status: dict[str, Any], name: str) -> str | None:
    agent = agents_by_name(status).get(name)
    return None if agent is None else agent["health"]


def start_probe(cluster: Cluster, url: str, control: Path, name: str = "probe") -> None:
    control.mkdir(exist_ok=True)
    cluster.agent(url, PROBE, health_dir=str(control), agent_name=name)


def test_a_hanging_ping_makes_an_agent_unresponsive_and_it_gets_no_work(
        cluster: Cluster, tmp_path: Path) -> None:
    broker = cluster.broker()
    control = tmp_path / "probe"
    start_probe(cluster, broker.url, control)
    cluster.agent(broker.url, agent_name="echo")
    client = cluster.client(broker.url)
    wait_status(client, lambda s: health_of(s, "probe") == "healthy"
                and health_of(s, "echo") == "healthy", what="both agents healthy")

    (control / "ping_hang").touch()
    status = wait_status(client, lambda s: health_of(s, "probe") == "unresponsive",
                         timeout=PING_DEADLINE_S + 5 * TEST_HEARTBEAT_S + 5,
                         what="probe unresponsive")
    assert "no answer to a health check" in agents_by_name(status)["probe"]["health_detail"]
    # Still registered (only its ping hangs: it heartbeats), but no new work reaches it.
    handles = [client.submit(data=i, capabilities=["echo"]) for i in range(20)]
    assert all(h.result(timeout=20).ok for h in handles)
    agents = agents_by_name(client.status())
    assert agents["probe"]["state"] == "ready" and agents["probe"]["done"] == 0
    assert agents["echo"]["done"] == 20

    (control / "ping_hang").unlink()
    wait_status(client, lambda s: health_of(s, "probe") == "healthy", what="probe recovered")
    # Healthy again, it is eligible: a task only it can take by name runs.
    assert client.submit(data="back", agent="probe").result(timeout=20).ok


def test_a_raising_ping_makes_an_agent_unhealthy_until_fixed(cluster: Cluster,
                                                              tmp_path: Path) -> None:
    broker = cluster.broker()
    control = tmp_path / "probe"
    start_probe(cluster, broker.url, control)
    client = cluster.client(broker.url)
    (control / "ping_raise").touch()
    status = wait_status(client, lambda s: health_of(s, "probe") == "unhealthy",
                         what="probe unhealthy")
    detail = agents_by_name(status)["probe"]["health_detail"]
    assert "RuntimeError" in detail and "the model is not loaded" in detail
    # A task for it waits: the agent is there but not fit for work.
    waiting = client.submit(data="later", agent="probe", timeout=60)
    wait_status(client, lambda s: s["queue"]["pending"] == 1, what="the task queued")
    assert not waiting.done()

    (control / "ping_raise").unlink()
    assert waiting.result(timeout=20).data == "later"
    assert health_of(client.status(), "probe") == "healthy"


def test_a_task_hung_past_its_attempt_limit_makes_its_agent_unhealthy(
        cluster: Cluster, tmp_path: Path) -> None:
    broker = cluster.broker()
    control = tmp_path / "probe"
    start_probe(cluster, broker.url, control)
    client = cluster.client(broker.url)
    hung = client.submit(data="hang", agent="probe", attempt_timeout=0.5, retries=0)
    assert hung.result(timeout=20).status == "timed_out"
    # The broker cancelled it; the agent's execute ignores the cancel and runs on.
    status = wait_status(client, lambda s: health_of(s, "probe") == "unhealthy",
                         what="probe unhealthy")
    assert "ran past its" in agents_by_name(status)["probe"]["health_detail"]

    (control / "release").touch()
    wait_status(client, lambda s: health_of(s, "probe") == "healthy",
                what="probe healthy once the task ended")


def test_health_changes_are_events(cluster: Cluster, tmp_path: Path) -> None:
    broker = cluster.broker()
    control = tmp_path / "probe"
    start_probe(cluster, broker.url, control)
    client = cluster.client(broker.url)
    events = subprocess.Popen(
        [sys.executable, "-m", "cli", "--broker", broker.url, "events", "--json",
         "--type", "agent_health", "--count", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    cluster.procs.append(events)
    assert events.stderr is not None
    ready, _, _ = select.select([events.stderr], [], [], 20)
    assert ready and json.loads(events.stderr.readline())["event"] == "subscribed"
    (control / "ping_raise").touch()
    wait_status(client, lambda s: health_of(s, "probe") == "unhealthy", what="unhealthy")
    (control / "ping_raise").unlink()
    out, err = events.communicate(timeout=20)
    assert events.returncode == 0, err.decode()
    seen = [json.loads(line) for line in out.decode().splitlines()]
    assert [e["details"]["health"] for e in seen] == ["unhealthy", "healthy"]
    assert all(e["agent"] == "probe" for e in seen)
