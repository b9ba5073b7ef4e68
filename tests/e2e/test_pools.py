"""Agent pools (issue 16): `agents start|scale|stop|status` through a real broker and a real
node supervisor (``python -m nodes``) started by the CLI; replicas are real agent
processes.

- a SIGKILLed replica is replaced; a replica that crashes at start-up is reported as a
  crash loop after the default count and not restarted forever;
- scaling 2 -> 5 -> 1 under a steady load loses and fails nothing; drained replicas
  finish or hand back their tasks without using a retry (every task has max_retries 0);
  after a broker restart the desired count is still 1;
- `start` runs its pool through the same supervisor, and `stop` drains it.

Every wait has a deadline; the supervisor and its replicas are killed at teardown.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent_sdk import SyncClient
from cli.processes import ProcessRef, children_of, kill_supervisor, wait_until
from tests.conftest import Cluster
from tests.e2e.test_secure import cli

ECHO = "tests.sample_agents:EchoAgent"
CRASHING = "tests.nodes.crashing_agents:CrashingAgent"
WAIT_S = 30.0
#: The supervisor the CLI starts restarts crashed replicas after 0.1 s, 0.2 s...: a crash
#: loop shows in about a second instead of the default back-off's eight.
FAST_RESTARTS = {"ORCH_NODE_RESTART_DELAY_S": "0.1"}


@pytest.fixture
def node_home(tmp_path: Path) -> Iterator[Path]:
    """A data dir for this test's node supervisor; at teardown the supervisor the CLI
    started there and its replicas are SIGKILLed."""
    home = tmp_path / "node-home"
    home.mkdir(mode=0o700)
    yield home
    kill_supervisor(home)


def agents_cli(url: str, home: Path, *args: str, env: dict[str, str] | None = None,
               timeout: float = 90.0) -> subprocess.CompletedProcess[str]:
    return cli("--home", str(home), "--broker", url, "agents", *args, env=env,
               timeout=timeout)


def pool(client: SyncClient, name: str) -> dict[str, Any]:
    return dict(client.status().get("pools", {}).get(name) or {})


def registered(client: SyncClient, name: str = "echo") -> list[dict[str, Any]]:
    return [a for a in client.status()["agents"] if a["name"] == name and
            a["state"] == "ready"]


def test_a_killed_replica_is_replaced_and_a_crash_loop_is_reported(
        cluster: Cluster, node_home: Path) -> None:
    broker = cluster.broker()
    client = cluster.client(broker.url)
    started = agents_cli(broker.url, node_home, "start", ECHO, "--replicas", "3", "--json",
                         env=FAST_RESTARTS)
    assert started.returncode == 0, started.stderr
    assert json.loads(started.stdout)["running"] == 3
    assert wait_until(lambda: len(registered(client)) == 3, WAIT_S)
    supervisor = ProcessRef.parse((node_home / "node.pid").read_text())
    assert supervisor is not None
    victim = children_of(supervisor.pid)[0]
    os.kill(victim, signal.SIGKILL)
    assert wait_until(lambda: victim not in children_of(supervisor.pid)
                      and len(children_of(supervisor.pid)) == 3, WAIT_S)
    assert wait_until(lambda: len(registered(client)) == 3, WAIT_S)
    # A replica that crashes at start-up: a crash loop after 5 crashes, reported.
    began = time.monotonic()
    crashing = agents_cli(broker.url, node_home, "start", CRASHING, "--json",
                          env=FAST_RESTARTS)
    assert crashing.returncode == 1, crashing.stdout + crashing.stderr
    failing = json.loads(crashing.stdout)["failing"]
    (why,) = failing.values()
    assert "crash loop: 5 crashes" in why
    assert time.monotonic() - began < 60
    # Not restarted forever: its replica count stays 0 while the report says why.
    status = agents_cli(broker.url, node_home, "status", "--json")
    assert status.returncode == 0
    document = json.loads(status.stdout)
    assert document["pools"][CRASHING]["running"] == 0
    assert document["pools"][CRASHING]["failing"]
    assert document["pools"][ECHO]["running"] == 3


class SteadyLoad:
    """Submits echo tasks (max_retries 0) one by one from a thread until stopped."""

    def __init__(self, url: str) -> None:
        self.client = SyncClient(url)
        self.handles: list[Any] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            handle = self.client.submit(capabilities=["echo"], data={"i": i},
                                        max_retries=0, timeout=120)
            handle.wait_accepted(30)
            self.handles.append(handle)
            i += 1
            self._stop.wait(0.05)  # the load's pace (20 tasks a second), not a sync

    def __enter__(self) -> SteadyLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def results(self) -> list[Any]:
        return [handle.result(120) for handle in self.handles]


def test_scaling_under_load_loses_nothing_and_survives_a_broker_restart(
        cluster: Cluster, node_home: Path) -> None:
    # Tasks outlast the drain, so scaled-down replicas hand some back.
    broker = cluster.broker("--drain-timeout", "0.5")
    env = {"ECHO_DELAY_S": "1.0", "AGENT_MAX": "4"}
    started = agents_cli(broker.url, node_home, "start", ECHO, "--replicas", "2", env=env)
    assert started.returncode == 0, started.stderr
    client = cluster.client(broker.url)
    with SteadyLoad(broker.url) as load:
        assert wait_until(lambda: len(load.handles) >= 20, WAIT_S)
        up = agents_cli(broker.url, node_home, "scale", ECHO, "--replicas", "5", "--json")
        assert up.returncode == 0, up.stderr
        assert json.loads(up.stdout)["running"] == 5
        assert wait_until(lambda: len(registered(client)) == 5, WAIT_S)
        count = len(load.handles)
        assert wait_until(lambda: len(load.handles) >= count + 20, WAIT_S)
        down = agents_cli(broker.url, node_home, "scale", ECHO, "--replicas", "1", "--json")
        assert down.returncode == 0, down.stderr
        assert wait_until(lambda: len(registered(client)) == 1, WAIT_S)
        count = len(load.handles)
        assert wait_until(lambda: len(load.handles) >= count + 10, WAIT_S)
    results = load.results()
    load.client.close()
    assert [r.status for r in results if r.status != "succeeded"] == []
    assert len(results) >= 50
    tasks = client.status()["tasks"]
    assert tasks["failed"] == 0 and tasks["timed_out"] == 0
    assert tasks["handed_back"] > 0  # the drains ran out of time: hand-backs, no retries
    assert pool(client, ECHO)["running"] == 1
    # After a broker restart the desired count is still 1 (the state service keeps it).
    broker.proc.send_signal(signal.SIGTERM)
    broker.proc.wait(timeout=30)
    broker = cluster.restart(broker)
    client = cluster.client(broker.url)
    assert pool(client, ECHO).get("desired") == 1
    assert wait_until(lambda: pool(client, ECHO).get("running") == 1, WAIT_S)
    assert wait_until(lambda: len(registered(client)) == 1, WAIT_S)


def test_stop_scales_an_agent_to_zero_and_status_shows_nodes(
        cluster: Cluster, node_home: Path) -> None:
    broker = cluster.broker()
    assert agents_cli(broker.url, node_home, "start", ECHO, "--replicas", "2").returncode == 0
    status = agents_cli(broker.url, node_home, "status")
    assert status.returncode == 0
    assert f"{ECHO}: 2 running of 2 desired" in status.stdout
    assert "node " in status.stdout and "live" in status.stdout
    stopped = agents_cli(broker.url, node_home, "stop", ECHO, "--json")
    assert stopped.returncode == 0, stopped.stderr
    assert json.loads(stopped.stdout)["running"] == 0
    client = cluster.client(broker.url)
    assert wait_until(lambda: not registered(client), WAIT_S)


def test_scaling_an_unknown_agent_says_which_nodes_exist(cluster: Cluster,
                                                         node_home: Path) -> None:
    broker = cluster.broker()
    scaled = agents_cli(broker.url, node_home, "scale", "translator", "--replicas", "2",
                        "--json")
    assert scaled.returncode == 1
    error = json.loads(scaled.stdout)
    assert error["code"] == "no_node" and "no live node" in error["error"]
    bad = agents_cli(broker.url, node_home, "start", "no.such.module:Agent")
    assert bad.returncode == 2 and "cannot import" in bad.stderr


def test_on_a_secure_broker_nodes_need_node_keys_and_scaling_an_admin_key(
        cluster: Cluster, node_home: Path, tmp_path: Path) -> None:
    from broker.security import authorize, authorized_path
    from tests.conftest import kill, python_process
    from tests.e2e.test_secure import key_env, new_key

    broker = cluster.broker("--secure")
    keys = broker.data_dir / "keys"
    # The broker's data dir: the CLI signs in with its local admin key, and the
    # supervisor it starts there gets the local node key and gives its replicas the
    # local agents' key.
    started = cli("--home", str(broker.data_dir), "--broker", broker.url, "agents", "start",
                  ECHO, "--replicas", "2", "--json", timeout=90)
    try:
        assert started.returncode == 0, started.stderr
        assert json.loads(started.stdout)["running"] == 2
        # A client key may not scale (exit 5, unauthorized)
        client_public, client_secret = new_key(tmp_path / "client-keys", "client")
        authorize(authorized_path(broker.data_dir), client_public, "client")
        refused = agents_cli(broker.url, node_home, "scale", ECHO, "--replicas", "1",
                             env=key_env(keys / "broker.key", client_secret))
        assert refused.returncode == 5, refused.stderr
        assert "needs an admin key" in refused.stderr
        # A supervisor with an agent key is refused as a node, and says so in its log
        agent_public, agent_secret = new_key(tmp_path / "agent-keys", "agent")
        authorize(authorized_path(broker.data_dir), agent_public, "agent")
        impostor = python_process(
            "-m", "nodes", "--broker", broker.url, "--home", str(node_home), "--node-id",
            "impostor", env=key_env(keys / "broker.key", agent_secret),
            stderr=subprocess.PIPE)
        try:
            assert impostor.stderr is not None
            line = ""
            deadline = time.monotonic() + WAIT_S
            while "refuses this node" not in line and time.monotonic() < deadline:
                line = impostor.stderr.readline().decode(errors="replace")
            assert "refuses this node" in line and "node key" in line
            status = json.loads(cli("--home", str(broker.data_dir), "--broker", broker.url,
                                    "agents", "status", "--json").stdout)
            assert [n["id"] for n in status["nodes"]] != [] and \
                "impostor" not in [n["id"] for n in status["nodes"]]
        finally:
            kill(impostor)
            impostor.stderr.close()
    finally:
        kill_supervisor(broker.data_dir)


def test_agents_submit_is_the_seeds_alias_of_submit(cluster: Cluster,
                                                    node_home: Path) -> None:
    broker = cluster.broker()
    cluster.agent(broker.url)
    done = agents_cli(broker.url, node_home, "submit", "hello", "--capability", "echo",
                      "--payload", '{"n": 1}', "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["status"] == "succeeded"
    helped = agents_cli(broker.url, node_home, "submit", "--help")
    assert helped.returncode == 0 and "--capability" in helped.stdout


def test_start_runs_its_pool_through_the_supervisor_and_stop_drains_it(
        tmp_path: Path) -> None:
    from tests.e2e.test_restart import LEAN, document, run

    home = tmp_path / "home"
    try:
        started = document(run(home, "start", *LEAN, "--no-runner", "--agents",
                               f"{ECHO}=2", "--json"))
        assert started["status"] == "started" and len(started["agents"]) == 2
        supervisor = ProcessRef.parse((home / "node.pid").read_text())
        assert supervisor is not None and supervisor.alive()
        replicas = [ProcessRef.of(pid) for pid in children_of(supervisor.pid)]
        assert len(replicas) == 2
        stopped = document(run(home, "stop", "--json"))
        assert stopped["node_stopped"] == supervisor.pid
        assert not supervisor.alive() and not any(r.alive() for r in replicas)
        assert not (home / "node.pid").exists()
    finally:
        kill_supervisor(home)
        run(home, "stop")
