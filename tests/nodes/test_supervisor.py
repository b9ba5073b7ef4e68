"""The node supervisor as a process (``python -m nodes``) against a scripted broker: a
ZeroMQ ROUTER in the test that answers every NODE with the PLAN the test sets, and the
agents' READY with a WELCOME, so that real replicas (``python -m agent_sdk run``)
register and print their ``registered`` line.

Every wait has a deadline and waits on a message (a report, a READY) or on a process's
exit (a pidfd): no sleeps.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from tests.conftest import kill, python_process, read_json_line
from tests.nodes.crashing_agents import MARKER
from wire.curve import key_scope, read_secret_file, scoped, write_key_pair
from wire.limits import SIGNATURE
from wire.nodes import NodePlan, NodeReport
from wire.tasks import Disconnect, Error, Heartbeat, Ready, Welcome, decode, encode

ECHO = "tests.sample_agents:EchoAgent"
GROUP = "tests.sample_agents:GroupCountingAgent"
CRASH = "tests.nodes.crashing_agents:CrashingAgent"
BUILT_INS = ("reviewer", "researcher", "coder", "synthesizer")
NODE_ID = "test-node"
#: The scripted broker's report interval: fast, so that waits on reports are short.
INTERVAL_S = 0.2
WAIT_S = 20.0


def plan(running: dict[str, int], epochs: dict[str, int] | None = None,
         drain_s: float = 5.0) -> NodePlan:
    return NodePlan(running, epochs or {}, INTERVAL_S, 5, drain_s)


class FakeBroker:
    """A ROUTER that speaks just enough of the protocol for a node and its agents."""

    def __init__(self, curve_secret: str | None = None) -> None:
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if curve_secret is not None:
            self.sock.setsockopt(zmq.CURVE_SERVER, 1)
            self.sock.setsockopt(zmq.CURVE_SECRETKEY, curve_secret.encode())
        self.sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.sock.bind("tcp://127.0.0.1:0")
        self.url = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        #: answered to every NODE; None: no answer
        self.plan: NodePlan | None = None
        self.reports: list[NodeReport] = []
        self.node_identities: set[bytes] = set()
        self.agents: dict[bytes, Ready] = {}
        self.goodbyes: list[tuple[bytes, str]] = []

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()

    def send(self, identity: bytes, frames: list[Any]) -> None:
        self.sock.send_multipart([identity, *frames])

    def step(self, timeout_s: float) -> NodeReport | None:
        """Handle the next message (within ``timeout_s``); the report if it was one."""
        if not self.sock.poll(max(int(timeout_s * 1000), 1)):
            return None
        identity, *frames = self.sock.recv_multipart()
        msg = decode(frames)
        match msg:
            case NodeReport():
                self.node_identities.add(identity)
                self.reports.append(msg)
                if self.plan is not None:
                    self.send(identity, encode(self.plan))
                return msg
            case Ready():
                self.agents[identity] = msg
                self.send(identity, encode(Welcome(INTERVAL_S * 5, 20, {}, "fake-boot")))
            case Heartbeat():
                self.send(identity, encode(Heartbeat()))
            case Disconnect(reason):
                self.goodbyes.append((identity, reason))
        return None

    def wait_for(self, done: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
        """Serve until ``done()``; fail after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while not done():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                last = self.reports[-1] if self.reports else None
                raise AssertionError(f"{what}: not within {timeout_s:g} s; last report {last}")
            self.step(remaining)

    def report(self, predicate: Callable[[NodeReport], bool], what: str,
               timeout_s: float = WAIT_S) -> NodeReport:
        """The next report (from now on) for which ``predicate`` holds."""
        seen = len(self.reports)

        def found() -> bool:
            return any(predicate(r) for r in self.reports[seen:])

        self.wait_for(found, what, timeout_s)
        return next(r for r in self.reports[seen:] if predicate(r))

    def reports_more(self, count: int) -> NodeReport:
        """Wait for ``count`` more reports (time passing, measured in heartbeats)."""
        target = len(self.reports) + count
        self.wait_for(lambda: len(self.reports) >= target, f"{count} more reports")
        return self.reports[-1]


@pytest.fixture
def broker() -> Iterator[FakeBroker]:
    fake = FakeBroker()
    try:
        yield fake
    finally:
        fake.close()


class Node:
    """A supervisor process and its data dir; every process it left is killed at the end."""

    def __init__(self, broker: FakeBroker, home: Path, *extra: str) -> None:
        self.home = home
        self.stderr_path = home / "node.stderr"
        home.mkdir(parents=True, exist_ok=True)
        with open(self.stderr_path, "wb") as stderr:
            self.proc = python_process(
                "-m", "nodes", "--broker", broker.url, "--home", str(home),
                "--node-id", NODE_ID, "--restart-delay", "0.1", "--restart-delay-max", "0.4",
                "--crash-window", "30", "--log-level", "INFO", *extra,
                env={"ORCH_PURE_PYTHON": "1", "ORCH_HOME": str(home)}, stderr=stderr)
        self.seen_pids: set[int] = set()

    def replicas(self) -> list[int]:
        """The supervisor's child processes now (remembered for the clean-up)."""
        pids = children(self.proc.pid)
        self.seen_pids.update(pids)
        return pids

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def starts_of_crashing_agent(self) -> int:
        log = self.home / "agents.log"
        return log.read_text(errors="replace").count(MARKER) if log.exists() else 0

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.replicas()
        kill(self.proc)
        for pid in self.seen_pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[Callable[..., Node]]:
    started: list[Node] = []

    def start(broker: FakeBroker, *extra: str) -> Node:
        node = Node(broker, tmp_path / f"home{len(started)}", *extra)
        started.append(node)
        return node

    try:
        yield start
    finally:
        for node in started:
            node.cleanup()


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc/*/stat)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()
        if len(fields) > 1 and fields[1] == str(pid) and fields[0] not in ("Z", "X"):
            found.append(int(entry.name))
    return sorted(found)


def wait_gone(pids: list[int], timeout_s: float) -> list[int]:
    """Wait (on pidfds) until every process of ``pids`` ended; those still running."""
    fds = {}
    for pid in pids:
        try:
            fds[pid] = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
    deadline = time.monotonic() + timeout_s
    try:
        while fds:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            ready, _, _ = select.select(list(fds.values()), [], [], remaining)
            for pid, fd in list(fds.items()):
                if fd in ready:
                    os.close(fds.pop(pid))
        return sorted(fds)
    finally:
        for fd in fds.values():
            os.close(fd)


def no_ready_line(proc: subprocess.Popen[bytes]) -> bool:
    assert proc.stdout is not None
    return not select.select([proc.stdout], [], [], 0)[0]


def test_the_node_keeps_its_replicas_at_the_plan(broker: FakeBroker,
                                                 nodes: Callable[..., Node]) -> None:
    # Given a node with one catalogue entry besides the built-ins
    node = nodes(broker, "--catalogue", ECHO)
    # Then its first report names it, with its catalogue and nothing running
    first = broker.report(lambda r: True, "a first report")
    assert first.node_id == NODE_ID and first.catalogue == (*BUILT_INS, ECHO)
    assert first.running == {} and first.failing == {} and first.cpus >= 1
    assert first.memory_bytes > 0
    assert broker.node_identities == {b"node-" + NODE_ID.encode()}

    # When the broker refuses it, and sends garbage
    identity = next(iter(broker.node_identities))
    broker.send(identity, encode(Error("bad_version", "this broker speaks ORCH9")))
    broker.send(identity, [b"junk"])
    broker.send(identity, [SIGNATURE, b"\x15", b"\xc1"])
    # Then it logs them and goes on reporting; no plan yet, so it is not ready
    broker.reports_more(1)
    assert node.proc.poll() is None and no_ready_line(node.proc)
    assert "this broker speaks ORCH9" in node.stderr()
    assert "malformed message" in node.stderr()

    # When the broker plans 3 replicas
    broker.plan = plan({ECHO: 3}, {ECHO: 1})
    broker.reports_more(1)  # answered with the plan
    # Then the node says it is ready, and 3 agents register
    ready = read_json_line(node.proc)
    assert ready == {"event": "ready", "node_id": NODE_ID, "pid": node.proc.pid,
                     "catalogue": [*BUILT_INS, ECHO]}
    assert (node.home / "node.pid").read_text().split()[0] == str(node.proc.pid)
    broker.report(lambda r: r.running == {ECHO: 3} and r.epochs == {ECHO: 1}, "3 running")
    broker.wait_for(lambda: len(broker.agents) == 3, "3 agents registered")
    pids = node.replicas()
    assert len(pids) == 3

    # When one replica is killed
    os.kill(pids[0], signal.SIGKILL)
    # Then the node reports it gone, restarts it, and reports 3 again
    broker.report(lambda r: r.running == {ECHO: 2}, "the crash reported")
    broker.report(lambda r: r.running == {ECHO: 3}, "3 running again")
    broker.wait_for(lambda: len(broker.agents) == 4, "the new replica registered")
    after = node.replicas()
    assert len(after) == 3 and pids[0] not in after
    assert "crashed with exit code -9 (SIGKILL)" in node.stderr()

    # When the plan drops to 1
    broker.plan = plan({ECHO: 1}, {ECHO: 2})
    # Then two replicas drain (SIGTERM: they say goodbye) and exit
    broker.report(lambda r: r.running == {ECHO: 1} and r.epochs == {ECHO: 2}, "1 running")
    broker.wait_for(lambda: sum(reason == "bye" for _, reason in broker.goodbyes) == 2,
                    "two goodbyes")
    broker.wait_for(lambda: len(node.replicas()) == 1, "two replicas exited")
    remaining = node.replicas()
    assert remaining[0] in after
    # (the supervisor logs an exit when it reaps it, which may be a moment after it)
    broker.wait_for(lambda: "stopped (exit code 0)" in node.stderr(), "the exits logged")

    # When the supervisor gets SIGTERM
    node.proc.send_signal(signal.SIGTERM)
    # Then it stops its last replica, reports nothing running, and exits 0
    broker.report(lambda r: r.running == {}, "a last report with nothing running")
    assert node.proc.wait(timeout=15) == 0
    assert wait_gone(remaining, 15.0) == []
    assert not (node.home / "node.pid").exists()


def test_a_crash_loop_is_reported_and_retried_on_a_new_epoch(
        broker: FakeBroker, nodes: Callable[..., Node]) -> None:
    # Given a node whose catalogue holds an agent that cannot start
    node = nodes(broker, "--catalogue", ECHO, CRASH)
    # When the broker plans one of it
    broker.plan = plan({CRASH: 1}, {CRASH: 1})
    # Then after 5 crashes the node reports it failing, with why
    failing = broker.report(lambda r: CRASH in r.failing, "the crash loop reported")
    log = node.home / "agents.log"
    assert failing.failing[CRASH] == ("crash loop: 5 crashes within 30 s (last exit code 2); "
                                      f"its log: {log}")
    assert failing.running == {} and failing.epochs == {CRASH: 1}
    assert node.starts_of_crashing_agent() == 5
    assert "not restarting it until it is scaled again" in node.stderr()
    # And it does not start it again, whatever time passes (longer than the back-off)
    still = broker.reports_more(10)
    assert CRASH in still.failing and node.starts_of_crashing_agent() == 5
    assert node.replicas() == []

    # When the broker's epoch for it moves (someone scaled it again)
    broker.plan = plan({CRASH: 1}, {CRASH: 2})
    # Then the node tries again: the failure clears, and 5 more crashes set it again
    broker.report(lambda r: CRASH not in r.failing and r.epochs == {CRASH: 2}, "retrying")
    broker.report(lambda r: CRASH in r.failing, "the crash loop again")
    assert node.starts_of_crashing_agent() == 10

    # When the broker names agents that are not in the catalogue
    broker.plan = plan({GROUP: 2, "nosuch": 1, CRASH: 1}, {CRASH: 2})
    # Then the node starts nothing, and warns once per name
    last = broker.reports_more(10)
    assert last.running == {} and node.replicas() == []
    assert node.stderr().count(f"{GROUP!r}, which is not in this node's catalogue") == 1
    assert node.stderr().count("'nosuch', which is not in this node's catalogue") == 1

    # When HOME/node.json adds that class to the catalogue while the node runs
    (node.home / "node.json").write_text(f'{{"catalogue": ["{GROUP}"]}}')
    # Then the node reports the new catalogue, and runs what the plan asks of it
    broker.report(lambda r: r.catalogue == (*BUILT_INS, ECHO, CRASH, GROUP), "new catalogue")
    broker.report(lambda r: r.running == {GROUP: 2}, "the new entry running")


def test_replicas_end_when_the_supervisor_is_killed(broker: FakeBroker,
                                                     nodes: Callable[..., Node]) -> None:
    # Given a node running 2 replicas
    node = nodes(broker, "--catalogue", ECHO)
    broker.plan = plan({ECHO: 2})
    broker.report(lambda r: r.running == {ECHO: 2}, "2 running")
    broker.wait_for(lambda: len(broker.agents) == 2, "2 agents registered")
    pids = node.replicas()
    assert len(pids) == 2
    # When the supervisor is SIGKILLed (it can clean nothing up)
    node.proc.kill()
    node.proc.wait(timeout=10)
    # Then its replicas end on their own (parent-death signal)
    assert wait_gone(pids, 10.0) == []


def test_a_second_supervisor_on_the_same_data_dir_is_refused(
        broker: FakeBroker, nodes: Callable[..., Node], tmp_path: Path) -> None:
    node = nodes(broker)
    broker.report(lambda r: True, "a first report")
    second = python_process("-m", "nodes", "--broker", broker.url, "--home", str(node.home),
                            env={"ORCH_PURE_PYTHON": "1"}, stderr=subprocess.PIPE)
    try:
        _, err = second.communicate(timeout=20)
    finally:
        kill(second)
    assert second.returncode == 1
    assert b"a node supervisor runs already" in err


def test_a_secure_node_uses_its_key_and_a_scoped_routing_id(
        nodes: Callable[..., Node], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a CURVE broker (no ZAP handler: libzmq then takes any client key) and a node key
    server_public, server_secret = (k.decode() for k in zmq.curve_keypair())
    _, node_secret_file = write_key_pair(tmp_path / "keys", "node")
    node_public, _ = read_secret_file(node_secret_file)
    fake = FakeBroker(curve_secret=server_secret)
    try:
        monkeypatch.setenv("ORCH_CURVE_SERVER_KEY", server_public)
        monkeypatch.setenv("ORCH_CURVE_KEY_FILE", str(node_secret_file))
        nodes(fake)
        # Then its report arrives under CURVE, from "node-ID" in its key's scope
        fake.report(lambda r: r.node_id == NODE_ID, "a report over CURVE")
        assert fake.node_identities == {
            scoped(key_scope(node_public), "node-" + NODE_ID).encode()}
    finally:
        fake.close()
