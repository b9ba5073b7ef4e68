"""Large results: 12 tasks whose results are 64,000,000 bytes each, submitted together to
2 agents while a probe task runs every 100 ms (issue 11, "Memory and large messages").

Measures the broker's RSS growth (peak over the run, against its RSS once the agents
registered), the probe's round-trip p99, how often an agent registered again, and whether
every result fetched afterwards by id (FETCH, what ``orchestrator result ID`` sends) has
its SHA-256 intact, before and after a broker restart (SIGKILL, then a start on the same
data dir).

    .venv/bin/python -m bench.large_results [--tasks 12] [--size 64000000] [--json]

Targets: rss_growth_mb < 512, probe_p99_ms < 100, reregistrations == 0, intact.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from agent_sdk import BaseAgent, Result, SyncClient, Task


#: The pseudo-random block a result is built from (see :func:`blob`).
BLOCK_BYTES = 1 << 20


def blob(seed: int, size: int) -> bytes:
    """``size`` bytes made from ``seed``: 1 MiB blocks of pseudo-random bytes, each
    starting with its own index, so that a range returned out of place fails the SHA-256
    check. Built with one copy: drawing 64 MB from ``random`` took about 40% of the
    machine's CPU during the run (its big-integer conversions), and the benchmark
    measures moving results, not making them."""
    base = random.Random(seed).randbytes(BLOCK_BYTES)
    blocks = -(-size // BLOCK_BYTES)
    return b"".join(i.to_bytes(8, "little") + base[8:] for i in range(blocks))[:size]


class BigAgent(BaseAgent):
    """Returns ``size`` pseudo-random bytes made from the task's seed."""

    def __init__(self) -> None:
        super().__init__(name="big", capabilities=["big"], max_concurrent=16)

    async def execute(self, task: Task) -> Result:
        return Result(data=blob(int(task.data["seed"]), int(task.data["size"])))


class ProbeAgent(BaseAgent):
    def __init__(self) -> None:
        super().__init__(name="probe", capabilities=["probe"])

    async def execute(self, task: Task) -> Result:
        return Result(data=task.data)


def _python(*args: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env.setdefault("ORCH_PURE_PYTHON", "1")
    return subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env=env)


def _ready_line(proc: subprocess.Popen[bytes]) -> dict[str, Any]:
    assert proc.stdout is not None
    for raw in proc.stdout:
        line = raw.decode(errors="replace").strip()
        if line.startswith("{"):
            return dict(json.loads(line))
    raise RuntimeError(f"process {proc.args!r} exited before its ready line")


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _start_broker(data_dir: Path, port: int = 0) -> tuple[subprocess.Popen[bytes], str]:
    proc = _python("-m", "broker", "--bind", f"127.0.0.1:{port}", "--data-dir",
                   str(data_dir), "--log-level", "WARNING", "--no-state")
    return proc, str(_ready_line(proc)["endpoint"])


def _registrations(client: SyncClient) -> dict[str, Any]:
    return {a.get("agent_id") or a.get("name"): a.get("registered_at", a.get("since"))
            for a in client.status()["agents"]}


def _fetch_all(client: SyncClient, ids: dict[str, int], size: int) -> bool:
    for task_id, seed in ids.items():
        data = client.fetch(task_id, timeout=120).data
        if hashlib.sha256(data).digest() != hashlib.sha256(blob(seed, size)).digest():
            return False
    return True


def probe_loop(url: str) -> None:
    """The prober process: a probe task every 100 ms until stdin closes, then the
    round trips (ms) as one JSON line. Its own process, so that what it measures is the
    broker's and the probe agent's latency, not the CPU of the client that is busy
    reading 768 MB of results (that one is reported too, as ``probe_same_client``)."""
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    client = SyncClient(url)
    rounds: list[float] = []
    try:
        client.submit(capabilities=["probe"], data="warm-up").result(30)
        print(json.dumps({"ready": True}), flush=True)
        while not stop.is_set():
            start = time.perf_counter()
            client.submit(capabilities=["probe"], data="ping").result(30)
            rounds.append((time.perf_counter() - start) * 1000)
            stop.wait(max(0.0, 0.1 - (time.perf_counter() - start)))
    finally:
        client.close()
    print(json.dumps({"probes": rounds}), flush=True)


def _percentiles(probes: list[float]) -> tuple[float, float, float]:
    """p50, p99 and max of ``probes`` (ms)."""
    if not probes:
        return 0.0, 0.0, 0.0
    ordered = sorted(probes)
    return (ordered[len(ordered) // 2], ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))],
            ordered[-1])


def run(tasks: int, size: int) -> dict[str, Any]:
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="large-results-") as tmp:
        data_dir = Path(tmp)
        broker, url = _start_broker(data_dir)
        procs.append(broker)
        try:
            for spec in ("bench.large_results:BigAgent", "bench.large_results:BigAgent",
                         "bench.large_results:ProbeAgent"):
                agent = _python("-m", "agent_sdk", "run", spec, "--broker", url)
                procs.append(agent)
                _ready_line(agent)
            prober = subprocess.Popen(
                [sys.executable, "-m", "bench.large_results", "--probe", url],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                env={**os.environ, "ORCH_PURE_PYTHON": os.environ.get("ORCH_PURE_PYTHON", "1")})
            procs.append(prober)
            _ready_line(prober)
            client = SyncClient(url)
            try:
                before = _registrations(client)
                baseline = _rss_mb(broker.pid)
                peak = [baseline]
                done = threading.Event()

                def sample() -> None:
                    while not done.wait(0.02):
                        peak[0] = max(peak[0], _rss_mb(broker.pid))

                sampler = threading.Thread(target=sample, daemon=True)
                sampler.start()
                ids = {f"big-{n}-{os.getpid()}": n for n in range(tasks)}
                handles = [client.submit(capabilities=["big"], task_id=task_id,
                                         data={"seed": seed, "size": size}, timeout=600)
                           for task_id, seed in ids.items()]
                probes: list[float] = []
                pending = list(handles)
                next_probe = time.monotonic()
                while pending:
                    now = time.monotonic()
                    if now >= next_probe:
                        start = time.perf_counter()
                        client.submit(capabilities=["probe"], data="ping").result(30)
                        probes.append((time.perf_counter() - start) * 1000)
                        next_probe = now + 0.1
                    still = []
                    for handle in pending:
                        try:
                            handle.result_nowait()
                        except Exception:  # noqa: BLE001 - not finished yet
                            still.append(handle)
                    pending = still
                    time.sleep(max(0.0, next_probe - time.monotonic()))
                for handle in handles:
                    handle.result(600)
                assert prober.stdin is not None
                prober.stdin.close()
                separate = [float(p) for p in _ready_line(prober)["probes"]]
                done.set()
                sampler.join()
                peak[0] = max(peak[0], _rss_mb(broker.pid))
                after = _registrations(client)
                reregistrations = sum(1 for k, v in before.items() if after.get(k) != v)
                intact = _fetch_all(client, ids, size)
            finally:
                client.close()
            broker.send_signal(signal.SIGKILL)
            broker.wait()
            broker, url = _start_broker(data_dir, int(url.rsplit(":", 1)[1]))
            procs.append(broker)
            client = SyncClient(url)
            try:
                intact_after_restart = _fetch_all(client, ids, size)
                rss_after_restart = _rss_mb(broker.pid)
            finally:
                client.close()
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                if proc.stdout is not None:
                    proc.stdout.close()
    if os.environ.get("LARGE_RESULTS_TRACE"):
        print("probes (ms, in order):", [round(p, 1) for p in separate], file=sys.stderr)
    p50, p99, top = _percentiles(separate)
    same_p50, same_p99, same_top = _percentiles(probes)
    return {"tasks": tasks, "size": size, "rss_baseline_mb": round(baseline, 1),
            "rss_growth_mb": round(peak[0] - baseline, 1), "probe_p50_ms": round(p50, 1), "probe_p99_ms": round(p99, 1),
            "probe_same_client_p50_ms": round(same_p50, 1),
            "probe_same_client_p99_ms": round(same_p99, 1),
            "probe_max_ms": round(top, 1), "probes": len(separate),
            "probe_same_client_max_ms": round(same_top, 1),
            "reregistrations": reregistrations, "intact": intact and intact_after_restart,
            "intact_before_restart": intact, "intact_after_restart": intact_after_restart,
            "rss_after_restart_mb": round(rss_after_restart, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=12)
    parser.add_argument("--size", type=int, default=64_000_000)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--probe", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        probe_loop(args.probe)
        return
    report = run(args.tasks, args.size)
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            print(f"{key:24} {value}")


if __name__ == "__main__":
    main()
