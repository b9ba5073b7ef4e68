"""Fixtures: a real broker process and real agent processes on 127.0.0.1, free ports.

Every process a test starts is killed at teardown, whatever happened. Readiness is a
JSON line the process prints (the broker's ``ready``, the agent's ``registered``), read
with a deadline: no sleeps.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from agent_sdk import SyncClient

ROOT = Path(__file__).resolve().parent.parent
#: How long a started process may take to report ready.
READY_TIMEOUT_S = 20.0
#: Heartbeat settings for tests: fast enough that dead-agent detection takes < 1 s.
TEST_HEARTBEAT_S = 0.2
TEST_LIVENESS = 3
#: Retry back-off for tests: retries happen, quickly.
TEST_RETRY_DELAY_S = 0.05


def pytest_configure(config: pytest.Config) -> None:
    """Give the processes the tests start a Ctrl-C they can receive: a shell that runs
    pytest in the background without job control ignores SIGINT, every child inherits
    that, and the tests that press Ctrl-C in a CLI then wait in vain."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def read_json_line(proc: subprocess.Popen[bytes], timeout: float = READY_TIMEOUT_S) -> dict[str, Any]:
    """The next JSON line the process prints, within ``timeout`` seconds."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise TimeoutError(f"{proc.args!r} printed nothing within {timeout} s")
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"{proc.args!r} exited with {proc.wait()} before it was ready")
    return json.loads(line)


def python_process(*args: str, env: dict[str, str] | None = None,
                   stderr: Any = None) -> subprocess.Popen[bytes]:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=full_env,
                            stdout=subprocess.PIPE, stderr=stderr)


def kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)
    if proc.stdout is not None:
        proc.stdout.close()


@dataclass
class BrokerProcess:
    """A broker started by a test."""

    proc: subprocess.Popen[bytes]
    url: str
    data_dir: Path
    args: tuple[str, ...]

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def sigkill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)


@dataclass
class Cluster:
    """Starts brokers and agents for one test and kills them all at teardown."""

    tmp_path: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    clients: list[SyncClient] = field(default_factory=list)

    def broker(self, *args: str, port: int = 0, data_dir: Path | None = None) -> BrokerProcess:
        data_dir = data_dir or self.tmp_path / f"broker-{len(self.procs)}"
        full_args = ("--bind", f"127.0.0.1:{port}", "--data-dir", str(data_dir),
                     "--heartbeat-interval", str(TEST_HEARTBEAT_S),
                     "--heartbeat-liveness", str(TEST_LIVENESS), "--log-level", "WARNING",
                     "--retry-base-delay", str(TEST_RETRY_DELAY_S),
                     "--retry-max-delay", str(TEST_RETRY_DELAY_S * 4), *args)
        proc = python_process("-m", "broker", *full_args)
        self.procs.append(proc)
        info = read_json_line(proc)
        return BrokerProcess(proc, info["endpoint"], data_dir, full_args)

    def restart(self, broker: BrokerProcess) -> BrokerProcess:
        """Start a broker again on the same port and data dir (after a kill)."""
        args = list(broker.args)
        args[1] = f"127.0.0.1:{broker.port}"
        proc = python_process("-m", "broker", *args)
        self.procs.append(proc)
        info = read_json_line(proc)
        return BrokerProcess(proc, info["endpoint"], broker.data_dir, tuple(args))

    def agent(self, url: str, spec: str = "tests.sample_agents:EchoAgent",
              wait: bool = True, **env: str) -> subprocess.Popen[bytes]:
        """Start an agent process; with ``wait``, return once it registered."""
        proc = python_process("-m", "agent_sdk", "run", spec, "--broker", url,
                              env={k.upper(): str(v) for k, v in env.items()})
        self.procs.append(proc)
        if wait:
            read_json_line(proc)
        return proc

    def client(self, url: str) -> SyncClient:
        client = SyncClient(url)
        self.clients.append(client)
        return client

    def close(self) -> None:
        # Processes die even when closing a client fails: otherwise every broker and
        # agent of a test that broke its client outlives the run.
        try:
            for client in self.clients:
                client.close()
        finally:
            for proc in self.procs:
                kill(proc)


@pytest.fixture(autouse=True)
def orch_home(tmp_path_factory: pytest.TempPathFactory,
              monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test's data dir is a fresh temporary directory (``ORCH_HOME``, which the
    processes a test starts inherit): no test reads or writes the user's own data dir,
    ``./.orchestrator`` or ``~/.local/state/orchestrator``."""
    home = tmp_path_factory.mktemp("orch-home")
    monkeypatch.setenv("ORCH_HOME", str(home))
    return home


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.close()
