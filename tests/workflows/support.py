"""Helpers of the workflow tests: agent and runner processes, execution logs, waits.

Every wait is on an event or a reply with a deadline: a state watch, a bus message, a
process's ready line. Execution logs are the files :mod:`tests.workflows.agents` writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from agent_sdk import Change, Client
from agent_sdk.loop import run as run_loop
from tests.conftest import BrokerProcess, Cluster, python_process, read_json_line
from workflows import ids
from workflows.runs import RunRecord, RunStatus, RunStore

T = TypeVar("T")

AGENT_CLASS = "tests.workflows.agents:WorkAgent"
#: Deadline of every wait in these tests.
WAIT_S = 30.0


def run(coro: Awaitable[T]) -> T:
    """Run a test scenario on a fresh event loop (uvloop when present)."""
    async def main() -> T:
        return await coro

    return run_loop(main())


def start_agents(cluster: Cluster, url: str, *envs: dict[str, Any],
                 spec: str = AGENT_CLASS) -> list[tuple[subprocess.Popen[bytes], dict[str, Any]]]:
    """Start one agent process per ``env`` at once; return each with its registration."""
    procs = [cluster.agent(url, spec, wait=False, **{k: str(v) for k, v in env.items()})
             for env in envs]
    return [(proc, read_json_line(proc)) for proc in procs]


@contextlib.contextmanager
def module_cluster(tmp_path_factory: pytest.TempPathFactory, name: str
                   ) -> Iterator[tuple[Cluster, str, Path]]:
    """A broker shared by a test module, with its own ORCH_HOME and a directory for the
    agents' execution logs: ``(cluster, broker url, exec dir)``; everything is killed
    on exit."""
    tmp = tmp_path_factory.mktemp(name)
    exec_dir = tmp / "exec"
    exec_dir.mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ORCH_HOME", str(tmp / "home"))
        cluster = Cluster(tmp)
        try:
            yield cluster, cluster.broker().url, exec_dir
        finally:
            cluster.close()


def start_runner(cluster: Cluster, url: str) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    """Start a standing runner process; return it with its ready line."""
    proc = python_process("-m", "workflows.runner", "--broker", url)
    cluster.procs.append(proc)
    info = read_json_line(proc)
    assert info["event"] == "ready", info
    return proc, info


def mapping_client(cluster: Cluster, tmp_path: Path, run_id: str, items: int,
                   sleep_s: float | None = None
                   ) -> tuple[BrokerProcess, Path, subprocess.Popen[bytes]]:
    """A broker, two mapper processes (``square``, 2 at a time each, logging their
    executions to the returned directory) and a client process mapping ``items`` items
    in itself (``tests/workflows/client_script.py``: each ``sleep_s`` long, its default
    when None); returns once the client started the run."""
    broker = cluster.broker()
    exec_dir = tmp_path / "exec"
    exec_dir.mkdir()
    square = {"EXEC_DIR": exec_dir, "AGENT_NAME": "squarer", "AGENT_CAPS": "square",
              "AGENT_OP": "square", "AGENT_MAX": 2}
    start_agents(cluster, broker.url, square, square)
    sleep = () if sleep_s is None else ("--sleep", str(sleep_s))
    client_proc = python_process("-m", "tests.workflows.client_script", "--broker", broker.url,
                                 "--run-id", run_id, "--items", str(items), *sleep)
    cluster.procs.append(client_proc)
    assert read_json_line(client_proc)["event"] == "started"
    return broker, exec_dir, client_proc


def exec_lines(exec_dir: Path, run_id: str | None = None) -> list[dict[str, Any]]:
    """Every execution event the agents logged (of ``run_id``'s tasks only, if given)."""
    lines = []
    for path in sorted(exec_dir.glob("*.jsonl")):
        for raw in path.read_text().splitlines():
            line = json.loads(raw)
            if run_id is None or line["task"].startswith(ids.task_id(run_id, "")):
                lines.append(line)
    return lines


def starts(lines: Iterable[dict[str, Any]]) -> Counter[str]:
    """How many times each task id started executing."""
    return Counter(line["task"] for line in lines if line["event"] == "start")


def peak_concurrency(lines: Iterable[dict[str, Any]]) -> int:
    """Most executions running at one moment, across every process (one clock)."""
    events = sorted((line["at"], 1 if line["event"] == "start" else -1) for line in lines)
    # At equal times an end sorts before a start: a slot freed and taken again is not two.
    running = peak = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    return peak


async def wait_record(client: Client, run_id: str, done: Callable[[RunRecord], bool],
                      timeout: float = WAIT_S) -> RunRecord:
    """The run's record once ``done(record)`` holds (a watch on the record, no polling)."""
    store = RunStore(client.state)
    changed = asyncio.Event()

    def on_change(_: Change) -> None:
        changed.set()

    watch = await client.state.watch(ids.run_key(run_id), on_change)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        while True:
            changed.clear()
            record = await store.load(run_id)
            if record is not None and done(record):
                return record
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(f"run {run_id} did not get there in {timeout:g} s; "
                                     f"last record: {record!r}")
            try:
                await asyncio.wait_for(changed.wait(), remaining)
            except asyncio.TimeoutError:
                pass
    finally:
        await watch.cancel()


async def wait_status(client: Client, run_id: str, status: RunStatus,
                      timeout: float = WAIT_S) -> RunRecord:
    """The run's record once it has ``status``."""
    return await wait_record(client, run_id, lambda r: r.status is status, timeout)
