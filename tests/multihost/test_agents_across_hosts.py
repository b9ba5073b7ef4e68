"""Agents on other machines (the "agent pools across machines" issue), with real network
namespaces standing for the machines (tests/multihost/netns.py): a broker host bound to
0.0.0.0, two node hosts running agents, a client host, each with its own address, host
name and ORCH_HOME, joined by veth pairs to a bridge on the broker host. Plain and with
``--secure`` (CURVE keys generated, authorised and copied to each host's ORCH_HOME, 0600).

The client is a process in the ``client`` host driven over stdin/stdout
(tests/multihost/driver.py): the test process stays in the root namespace, which gets no
device and no route. Every wait has a deadline and is paced by a broker round trip or a
process's output; nothing sleeps.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from broker.security import authorize, authorized_path
from tests.conftest import (
    TEST_HEARTBEAT_S,
    TEST_LIVENESS,
    TEST_RETRY_DELAY_S,
    read_json_line,
)
from tests.e2e.faults.checker import check, read_log
from tests.e2e.test_secure import key_env, new_key
from tests.multihost.netns import Host, Hosts

#: The broker's port: each namespace is fresh, so any port is free.
PORT = 5555
AGENT = "tests.multihost.agents:HostAgent"
#: Deadline of one wait on the broker's status.
WAIT_S = 20.0
#: Deadline of a batch of results.
RESULTS_S = 30.0


class RemoteClient:
    """The driver process in a host (tests/multihost/driver.py), called like a client."""

    def __init__(self, host: Host, url: str) -> None:
        self.host = host
        self.proc = host.python("-m", "tests.multihost.driver", url, log="client", stdin=True)
        ready = self._read(30.0)
        assert ready.get("event") == "ready", ready

    def _read(self, timeout: float) -> dict[str, Any]:
        try:
            return read_json_line(self.proc, timeout)
        except (TimeoutError, RuntimeError) as e:
            raise AssertionError(f"{e}; client stderr:\n"
                                 f"{self.host.stderr_of('client')[-4000:]}") from None

    def call(self, op: str, wait_s: float = 30.0, **args: Any) -> Any:
        """Send one request; its answer within ``wait_s`` seconds."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **args}).encode() + b"\n")
        self.proc.stdin.flush()
        reply = self._read(wait_s)
        if "error" in reply:
            raise AssertionError(f"client {op}: {reply['error']}; client stderr:\n"
                                 f"{self.host.stderr_of('client')[-4000:]}")
        return reply["ok"]

    def status(self) -> dict[str, Any]:
        return self.call("status")

    def wait_status(self, predicate: Callable[[dict[str, Any]], bool], what: str,
                    timeout: float = WAIT_S) -> dict[str, Any]:
        """Ask for the status (one broker round trip each) until ``predicate`` holds."""
        deadline = time.monotonic() + timeout
        status = self.status()
        while not predicate(status):
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not within {timeout:g} s; last status: "
                                     f"agents {status['agents']}, tasks {status['tasks']}")
            status = self.status()
        return status

    def submit(self, ids: list[str], **options: Any) -> None:
        self.call("submit", ids=ids, **options)

    def results(self, ids: list[str], timeout: float = RESULTS_S) -> list[dict[str, Any]]:
        return self.call("results", wait_s=timeout + 10.0, timeout=timeout, ids=ids)


def unscoped(task_id: str) -> str:
    """The id the client named: with ``--secure`` the broker's id of a task is the client
    key's scope, ``~``, then that id (wire/curve.py; ``~`` is not in Z85)."""
    return task_id.rsplit("~", 1)[-1]


def executions(log: Path) -> list[str]:
    """The task ids an agent's execution log holds, as the client named them."""
    return [unscoped(task_id) for task_id in read_log(log)]


def each_once(client: RemoteClient, ids: list[str], results: list[dict[str, Any]],
              logs: dict[str, tuple[Path, Any]], tmp_path: Path, label: str) -> Any:
    """Assert that the client saw each of ``ids`` complete exactly once (every handle
    resolved once; the fault checker finds nothing lost, duplicated or unexpected in the
    results, the agents' execution logs and the wire deliveries); the checker's report."""
    views = client.call("views")
    assert views["resolved"] == {task_id: 1 for task_id in ids}, views["resolved"]
    exec_logs = []
    for name, (exec_log, _) in logs.items():
        exec_logs.append(tmp_path / f"exec-{name}.unscoped")
        exec_logs[-1].write_text("".join(f"{task_id}\n" for task_id in executions(exec_log)))
    report = check(ids, [(r["task_id"], r["status"]) for r in results], exec_logs,
                   deliveries=[(task_id, "succeeded") for task_id, n in
                               views["deliveries"].items() for _ in range(n)],
                   handle_ids=ids)
    report.assert_valid(label)
    return report


def agent_names(status: dict[str, Any]) -> set[str]:
    return {agent["name"] for agent in status["agents"]}


def in_flight(status: dict[str, Any], name: str) -> int:
    return sum(int(a["in_flight"]) for a in status["agents"] if a["name"] == name)


@dataclass
class Site:
    """A broker host, agents on the nodes, a client in the client host."""

    hosts: Hosts
    secure: bool
    tmp_path: Path
    url: str = ""
    #: per node host: the secret key file its CLI uses (secure only)
    cli_keys: dict[str, dict[str, str]] = field(default_factory=dict)
    client: RemoteClient | None = None

    def start_broker(self) -> None:
        broker = self.hosts.broker
        args = ["-m", "broker", "--bind", f"0.0.0.0:{PORT}", "--data-dir", str(broker.home),
                "--heartbeat-interval", str(TEST_HEARTBEAT_S),
                "--heartbeat-liveness", str(TEST_LIVENESS), "--log-level", "WARNING",
                "--retry-base-delay", str(TEST_RETRY_DELAY_S),
                "--retry-max-delay", str(TEST_RETRY_DELAY_S * 4)]
        proc = broker.python(*args, *(["--secure"] if self.secure else []), log="broker")
        try:
            ready = read_json_line(proc)
        except (TimeoutError, RuntimeError) as e:
            raise AssertionError(f"{e}; broker stderr:\n{broker.stderr_of('broker')}") from None
        assert ready["endpoint"].endswith(f":{PORT}"), ready
        self.url = f"tcp://{broker.ip}:{PORT}"
        if self.secure:
            self._hand_out_keys()

    def _hand_out_keys(self) -> None:
        """Keys made on the broker's side (as an operator would), authorised there, and
        copied to each host's ORCH_HOME/keys with the broker's public key, all 0600."""
        broker = self.hosts.broker
        server_key = broker.home / "keys" / "broker.key"
        assert server_key.exists(), "the secure broker made no keys"
        keygen = self.tmp_path / "keygen"
        for host in self.hosts.all[1:]:
            roles = {"client": "client"} if host.name == "client" else \
                {"agent": "agent", "cli": "client"}
            envs = {}
            for label, role in roles.items():
                public, secret = new_key(keygen / host.name, label)
                authorize(authorized_path(broker.home), public, role)
                keys = host.home / "keys"
                keys.mkdir(mode=0o700, exist_ok=True)
                for source in (server_key, secret):
                    target = keys / source.name
                    shutil.copyfile(source, target)
                    target.chmod(0o600)
                envs[label] = key_env(keys / server_key.name, keys / secret.name)
            host.env.update(envs["client" if host.name == "client" else "agent"])
            if "cli" in envs:
                self.cli_keys[host.name] = envs["cli"]

    def agent(self, host: Host, name: str, **env: Any) -> subprocess.Popen[bytes]:
        proc = host.python("-m", "agent_sdk", "run", AGENT, "--broker", self.url,
                           env={"AGENT_NAME": name, **{k.upper(): str(v)
                                                       for k, v in env.items()}},
                           log=f"agent-{name}")
        try:
            registered = read_json_line(proc)
        except (TimeoutError, RuntimeError) as e:
            raise AssertionError(f"{e}; agent stderr:\n{host.stderr_of(f'agent-{name}')}"
                                 ) from None
        assert registered["name"] == name, registered
        return proc

    def start_client(self) -> RemoteClient:
        self.client = RemoteClient(self.hosts["client"], self.url)
        return self.client

    def cli(self, host: Host, *args: str) -> subprocess.CompletedProcess[str]:
        """``python -m cli`` in ``host``, against the broker, from the host's ORCH_HOME
        (in which no broker runs)."""
        return host.run("-m", "cli", "--home", str(host.home), "--broker", self.url, *args,
                        env=self.cli_keys.get(host.name))


@pytest.fixture(params=[False, True], ids=["plain", "secure"])
def site(request: pytest.FixtureRequest, hosts: Hosts, tmp_path: Path) -> Site:
    made = Site(hosts, request.param, tmp_path)
    made.start_broker()
    return made


def tcp_host(url: str) -> str:
    return url.split("://", 1)[1].rsplit(":", 1)[0]


def test_tasks_state_and_endpoints_across_hosts(site: Site) -> None:
    hosts = site.hosts
    broker, node1, node2 = hosts.broker, hosts["node1"], hosts["node2"]
    # Given an echo agent on each node and a client on a third host
    site.agent(node1, "n1")
    site.agent(node2, "n2")
    client = site.start_client()
    client.wait_status(lambda s: agent_names(s) == {"n1", "n2"}, "both agents registered")
    # When the client submits 50 tasks
    ids = [f"t-{i}" for i in range(50)]
    client.submit(ids, capabilities=["echo"], fields={"delay_s": 0.02})
    results = client.results(ids)
    # Then all succeed, once each, and both nodes did work, each under its own host name
    assert [r["task_id"] for r in results] == ids
    assert all(r["ok"] for r in results), [r for r in results if not r["ok"]][:3]
    assert [r["data"] for r in results] == list(range(50))
    by_agent = Counter(r["agent"] for r in results)
    assert set(by_agent) == {"n1", "n2"}, by_agent
    assert {(r["agent"], r["extras"]["host"]) for r in results} == {("n1", "node1"),
                                                                    ("n2", "node2")}
    # And the broker announces its endpoints as bound (0.0.0.0: no --advertise); the SDK
    # maps them to the host it used to reach the broker
    endpoints = client.call("endpoints")
    assert tcp_host(endpoints["announced"]["state"]) == "0.0.0.0", endpoints
    for name in ("state", "bus_out", "bus_in"):
        assert tcp_host(endpoints["reachable"][name]) == broker.ip, endpoints
    # And an agent on each node reaches the state service at the mapped address
    counted = []
    for agent in ("n1", "n2"):
        task_id = f"count-{agent}"
        client.submit([task_id], agent=agent, data={"count": "multihost/hits"})
        (result,) = client.results([task_id])
        assert result["ok"], result
        agent_endpoints = result["extras"]["endpoints"]
        for name in ("state", "bus_out", "bus_in"):
            assert tcp_host(agent_endpoints[name]) == broker.ip, agent_endpoints
        counted.append(result["extras"]["counted"])
    assert counted == [1, 2]
    # And the CLI on one node writes shared state that the CLI on the other reads
    written = site.cli(node1, "state", "set", "multihost/k", "1", "--json")
    assert written.returncode == 0, written.stderr
    for key, value in (("multihost/k", 1), ("multihost/hits", 2)):
        read = site.cli(node2, "state", "get", key, "--json")
        assert read.returncode == 0, read.stderr
        assert json.loads(read.stdout)["value"] == value
    # And each agent keeps its log in its own host's ORCH_HOME
    assert list(node1.home.glob("logs/agent-n1*")) and not list(node1.home.glob("**/agent-n2*"))
    assert list(node2.home.glob("logs/agent-n2*")) and not list(node2.home.glob("**/agent-n1*"))
    if site.secure:
        for host in hosts.all[1:]:
            for key_file in (host.home / "keys").iterdir():
                assert key_file.stat().st_mode & 0o777 == 0o600, key_file
    views = client.call("views")
    assert set(views["resolved"].values()) == {1}, views["resolved"]
    print(f"[multihost {'secure' if site.secure else 'plain'}] tasks per agent: "
          f"{dict(by_agent)}; endpoints as announced {endpoints['announced']['state']}, "
          f"as reached {endpoints['reachable']['state']}")


def test_a_partitioned_node_tasks_run_again_elsewhere_and_it_comes_back(
        site: Site, tmp_path: Path) -> None:
    hosts = site.hosts
    node1, node2 = hosts["node1"], hosts["node2"]
    logs = {name: (host.home / "exec.log", host.home / "done.log")
            for name, host in (("n1", node1), ("n2", node2))}
    # Given a slow agent on each node (4 at once; 1.5 s per task, first attempts only)
    for name, host in (("n1", node1), ("n2", node2)):
        site.agent(host, name, agent_max=4, echo_delay_s=1.5, slow_attempts=1,
                   exec_log=logs[name][0], done_log=logs[name][1])
    client = site.start_client()
    client.wait_status(lambda s: agent_names(s) == {"n1", "n2"}, "both agents registered")
    # And 8 tasks running, 4 on each node
    held = [f"held-{i}" for i in range(8)]
    client.submit(held, capabilities=["echo"])
    client.wait_status(lambda s: in_flight(s, "n1") == 4 and in_flight(s, "n2") == 4
                       and len(read_log(logs["n1"][0])) == 4,
                       "4 tasks running on each node, node1's started")
    on_node1 = set(executions(logs["n1"][0]))
    # When node1's link to the broker goes down mid-run
    node1.link_down()
    # And the client goes on submitting meanwhile
    during = [f"during-{i}" for i in range(20)]
    client.submit(during, capabilities=["echo"], fields={"delay_s": 0.02})
    # Then the broker declares node1's agent dead, and node1's tasks run again on node2
    client.wait_status(lambda s: agent_names(s) == {"n2"}, "node1's agent declared dead")
    results = client.results(held + during)
    assert all(r["ok"] for r in results), [r for r in results if not r["ok"]][:3]
    again = [r for r in results if r["attempts"] > 1]
    assert {r["task_id"] for r in again} == on_node1, again
    assert all(r["agent"] == "n2" and r["extras"]["host"] == "node2" for r in again), again
    assert all(r["agent"] == "n2" for r in results[8:])
    # And node1's agent, cut off, finished its 4 tasks anyway (results nobody can hear)
    deadline = time.monotonic() + WAIT_S
    while set(executions(logs["n1"][1])) != on_node1:
        assert time.monotonic() < deadline, executions(logs["n1"][1])
        client.status()  # paced by a broker round trip
    # When the link returns
    node1.link_up()
    # Then node1's agent registers again by itself and reconciles: it sends the results
    # the broker never acknowledged, which the broker drops (those tasks are done), and
    # it holds no task at the broker
    status = client.wait_status(lambda s: agent_names(s) == {"n1", "n2"}
                                and s["tasks"]["duplicate_results"] >= len(on_node1),
                                "node1's agent registered again, its late results dropped")
    assert in_flight(status, "n1") == 0, status["agents"]
    # And it takes work again
    late = [f"late-{i}" for i in range(5)]
    client.submit(late, agent="n1", fields={"delay_s": 0.02})
    late_results = client.results(late)
    assert all(r["ok"] and r["agent"] == "n1" and r["extras"]["host"] == "node1"
               for r in late_results), late_results
    status = client.wait_status(lambda s: s["tasks"]["succeeded"] == len(held + during + late),
                                "every task succeeded at the broker")
    # And the client saw every task complete exactly once
    ids = held + during + late
    report = each_once(client, ids, results + late_results, logs, tmp_path,
                       f"multihost partition {'secure' if site.secure else 'plain'}")
    assert report.re_executed == on_node1
    print(f"[multihost partition {'secure' if site.secure else 'plain'}] re-dispatched "
          f"{len(again)}; broker: redispatched {status['tasks'].get('redispatched')}, "
          f"duplicate results {status['tasks'].get('duplicate_results')}; wire deliveries "
          f"more than once: {len(report.redelivered)}")
