"""Process plumbing shared by the benchmark scripts: our broker and agents, and the raw
ZeroMQ baseline (a ``zmq.proxy`` device between a DEALER client and DEALER echo workers).

Everything binds to 127.0.0.1 on free ports and is killed on exit.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import zmq

ROOT = Path(__file__).resolve().parent.parent
#: How long a started process may take to say it is ready.
START_TIMEOUT_S = 30.0


def _python(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)


def _read_json_line(proc: subprocess.Popen[bytes]) -> dict[str, Any]:
    import select

    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], START_TIMEOUT_S)
    if not ready:
        raise RuntimeError(f"process {proc.args!r} did not report ready in {START_TIMEOUT_S} s")
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"process {proc.args!r} exited before it was ready")
    return json.loads(line)


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
    for proc in procs:
        proc.wait(timeout=10)


@contextlib.contextmanager
def orchestrator(agents: int, agent_concurrency: int, extra_broker_args: tuple[str, ...] = (),
                 agent_spec: str = "bench.echo_agent:EchoAgent") -> Iterator[str]:
    """A broker and ``agents`` agents of ``agent_spec`` (echo agents by default); yields
    the broker URL."""
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="orch-bench-") as home:
        try:
            broker = _python("-m", "broker", "--bind", "127.0.0.1:0", "--data-dir", home,
                             "--log-level", "WARNING", *extra_broker_args)
            procs.append(broker)
            url = _read_json_line(broker)["endpoint"]
            for _ in range(agents):
                agent = _python("-m", "agent_sdk", "run", agent_spec,
                                "--broker", url, "--max-concurrent", str(agent_concurrency))
                procs.append(agent)
            for agent in procs[1:]:
                _read_json_line(agent)
            yield url
        finally:
            _stop(procs)


@contextlib.contextmanager
def baseline(workers: int) -> Iterator[str]:
    """The raw ZeroMQ baseline: a zmq.proxy device and ``workers`` DEALER echo workers;
    yields the proxy's front-end URL."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        proxy = _python("-m", "bench.baseline", "proxy")
        procs.append(proxy)
        endpoints = _read_json_line(proxy)
        for _ in range(workers):
            procs.append(_python("-m", "bench.baseline", "worker", endpoints["backend"]))
        for worker in procs[1:]:
            _read_json_line(worker)
        yield endpoints["frontend"]
    finally:
        _stop(procs)


def percentile(sorted_values: list[float], fraction: float) -> float:
    """The value below which ``fraction`` of the sorted values fall (nearest rank)."""
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, int(round(fraction * len(sorted_values))) - 1))
    return sorted_values[index]


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def zmq_version() -> str:
    return f"pyzmq {zmq.__version__} / libzmq {zmq.zmq_version()}"
