"""Helpers of the fault tests: deadline waits paced by network round trips (never
sleeps), a broker restart that keeps the broker's log, process signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent_sdk import SyncClient
from agent_sdk.errors import WaitTimeout
from tests.conftest import ROOT, BrokerProcess, Cluster, python_process, read_json_line
from tests.support import wait_status  # noqa: F401 - the fault tests import it from here

#: Default deadline of the waits below: the machine is small and shared.
WAIT_S = 20.0
#: Deadline of one task's result in the fault tests.
RESULT_S = 30.0
#: Python running the agents' modules (for the CLI test).
PYTHON = sys.executable


def wait_until(client: SyncClient, predicate: Callable[[], bool], timeout: float = WAIT_S,
               what: str = "condition") -> None:
    """Check ``predicate()`` (e.g. a file's content) until it holds, one broker STATUS
    round trip between checks to pace the loop."""
    deadline = time.monotonic() + timeout
    while not predicate():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"{what}: not within {timeout:g} s")
        client.status(timeout=max(remaining, 0.5))


def collect(handles: list[Any], broker: BrokerProcess | None = None,
            timeout: float = RESULT_S, client: SyncClient | None = None) -> list[Any]:
    """The results of ``handles`` (SyncTaskHandles), in order, within ``timeout`` in all.

    Fails fast, with the broker's exit code, if ``broker`` dies meanwhile: a crashed
    broker must not look like a slow one. With ``client``, a failure shows the broker's
    view of the first missing task and its status (agents, task counts).
    """
    deadline = time.monotonic() + timeout
    results = []
    for handle in handles:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no result for task {handle.id} within {timeout:g} s "
                                     f"({len(results)} of {len(handles)} arrived)"
                                     + explain(client, handle.id))
            try:
                results.append(handle.result(timeout=min(1.0, remaining)))
                break
            except WaitTimeout:
                if broker is not None and broker.proc.poll() is not None:
                    raise AssertionError(
                        f"the broker died (exit code {broker.proc.returncode}) while task "
                        f"{handle.id} was open; see its traceback in the captured stderr"
                    ) from None
    return results


#: Capability no agent offers: a task for it stays open until cancelled.
NOBODY = "__nobody__"


def learn_boot(client: SyncClient, timeout: float = WAIT_S) -> str:
    """Make the client learn the broker's boot id; returns it.

    A client pings (and hears the boot id) only while it has open tasks, once a second;
    one that knows the boot id notices a restart at its next ping and at once sends
    again what it has open (one that does not falls back to asking again after
    RECOVER_AFTER_S). So: hold one task open (no agent offers its capability) until the
    client heard the boot id, then cancel it. Call before a WireTap is installed.
    """
    boot = client.status()["broker"]["boot"]
    probe = client.submit(capabilities=[NOBODY], data=None, task_id=f"boot-probe-{boot}",
                          timeout=60)
    wait_until(client, lambda: client.client._recovery.boot == boot, timeout,
               what="the client learned the broker's boot id")
    probe.cancel()
    assert probe.result(timeout=timeout).status == "cancelled"
    return boot


def explain(client: SyncClient | None, task_id: str) -> str:
    """The broker's view of ``task_id`` and its status, for a failure message."""
    if client is None:
        return ""
    try:
        fetched = client.fetch(task_id, timeout=5)
        status = client.status(timeout=5)
    except Exception as e:  # noqa: BLE001 - a diagnostic, whatever it finds
        return f"; the broker does not say more: {type(e).__name__}: {e}"
    return (f"; broker: {task_id} is {fetched.status} (attempts {fetched.attempts}, agent "
            f"{fetched.agent}); tasks {status['tasks']}; agents {status['agents']}")


def agents_by_name(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {agent["name"]: agent for agent in status["agents"]}


def agent_field(status: dict[str, Any], name: str, key: str, default: Any = None) -> Any:
    agent = agents_by_name(status).get(name)
    return default if agent is None else agent[key]


def restart_logged(cluster: Cluster, broker: BrokerProcess, log: Path,
                   *extra: str) -> BrokerProcess:
    """Like ``cluster.restart`` (same port, same data dir), but the broker's stderr goes to
    ``log``; ``extra`` arguments are added (later ones win in argparse)."""
    args = list(broker.args)
    args[1] = f"127.0.0.1:{broker.port}"
    args.extend(extra)
    with open(log, "ab") as stderr:
        proc = python_process("-m", "broker", *args, stderr=stderr)
    cluster.procs.append(proc)
    info = read_json_line(proc)
    return BrokerProcess(proc, info["endpoint"], broker.data_dir, tuple(args))


def run_cli(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run ``python -m cli ARGS`` from the repository root."""
    return subprocess.run([PYTHON, "-m", "cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def parse_json(text: str) -> Any:
    return json.loads(text)


class Signals:
    """Sends SIGSTOP/SIGCONT to processes and resumes every stopped one at teardown."""

    def __init__(self) -> None:
        self.stopped: list[subprocess.Popen[bytes]] = []

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        proc.send_signal(signal.SIGSTOP)
        self.stopped.append(proc)

    def cont(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
        if proc in self.stopped:
            self.stopped.remove(proc)

    def close(self) -> None:
        for proc in list(self.stopped):
            self.cont(proc)
