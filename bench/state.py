"""State service benchmarks: ``python bench/state.py --json``.

Runs a state service alone (``python -m broker.state``, SQLite in WAL mode in a temporary
data dir unless ``--memory``) and measures, through the public ``StateClient``:

- uncontended ``set`` and ``get``: one client, one request at a time (latency-bound),
  and with ``--window`` requests in flight (throughput);
- contended ``update(+1)``: ``--writers`` processes on one key at once (optimistic CAS
  with retries), successful updates per second and conflicts per update;
- lock cycles: ``async with lock()`` then exit, one process alone, and ``--writers``
  processes on one lock.

For scale, the same run measures raw ZeroMQ round trips (``baseline_rt_per_s``: a
DEALER through the ``zmq.proxy`` device of the other benchmarks to a DEALER echo worker,
one at a time), the floor any request/reply over TCP has on the machine.

Prints one JSON object with ``--json``; without it, one line per measurement.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson  # noqa: E402

from agent_sdk import StateClient  # noqa: E402
from agent_sdk.loop import loop_name, run as run_loop  # noqa: E402
import zmq  # noqa: E402

from bench._harness import START_TIMEOUT_S, baseline, percentile, zmq_version  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
#: Operations before measuring (connections, caches, SQLite pages).
WARMUP = 300


@contextlib.contextmanager
def state_service(memory: bool) -> Iterator[str]:
    """A state service process on a free port; yields its URL."""
    with tempfile.TemporaryDirectory(prefix="orch-state-bench-") as data_dir:
        args = [sys.executable, "-m", "broker.state", "--bind", "127.0.0.1:0", "--data-dir",
                data_dir, "--log-level", "WARNING", *(["--memory"] if memory else [])]
        proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
        try:
            yield str(_json_line(proc)["state"])
        finally:
            proc.kill()
            proc.wait(timeout=10)


def _json_line(proc: subprocess.Popen[bytes]) -> dict[str, Any]:
    import select

    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], START_TIMEOUT_S)
    line = proc.stdout.readline() if ready else b""
    if not line:
        raise RuntimeError(f"{proc.args!r} did not answer within {START_TIMEOUT_S} s")
    return orjson.loads(line)


# ---------------------------------------------------------------- one process


def _baseline_round_trips(round_trips: int) -> float:
    """Sequential raw ZeroMQ round trips per second (100-byte payloads)."""
    with baseline(1) as url:
        sock: zmq.Socket[Any] = zmq.Context.instance().socket(zmq.DEALER)
        sock.connect(url)
        try:
            for _ in range(WARMUP):
                sock.send(b"x" * 100)
                sock.recv()
            started = time.perf_counter()
            for _ in range(round_trips):
                sock.send(b"x" * 100)
                sock.recv()
            return round_trips / (time.perf_counter() - started)
        finally:
            sock.close(linger=0)


async def _sequential(url: str, ops: int) -> dict[str, float]:
    async with StateClient(url, name="bench") as state:
        for i in range(WARMUP):
            await state.set(f"warm/{i % 100}", i)
        results: dict[str, float] = {}
        for name in ("set", "get"):
            samples = []
            started = time.perf_counter()
            for i in range(ops):
                t0 = time.perf_counter()
                if name == "set":
                    await state.set(f"seq/{i % 1000}", {"i": i, "text": "x" * 64})
                else:
                    await state.get(f"seq/{i % 1000}")
                samples.append((time.perf_counter() - t0) * 1e6)
            elapsed = time.perf_counter() - started
            samples.sort()
            results[f"{name}_ops_per_s"] = round(ops / elapsed)
            results[f"{name}_p50_us"] = round(percentile(samples, 0.50), 1)
            results[f"{name}_p99_us"] = round(percentile(samples, 0.99), 1)
        return results


async def _pipelined(url: str, ops: int, window: int) -> dict[str, float]:
    async with StateClient(url, name="bench") as state:
        results: dict[str, float] = {}
        for name in ("set", "get"):
            counter = iter(range(ops))

            async def lane() -> None:
                for i in counter:
                    if name == "set":
                        await state.set(f"pipe/{i % 1000}", {"i": i, "text": "x" * 64})
                    else:
                        await state.get(f"pipe/{i % 1000}")

            started = time.perf_counter()
            await asyncio.gather(*(lane() for _ in range(window)))
            results[f"{name}_ops_per_s"] = round(ops / (time.perf_counter() - started))
        return results


async def _lock_cycles(url: str, cycles: int) -> float:
    async with StateClient(url, name="bench") as state:
        for _ in range(WARMUP // 10):
            async with state.lock("bench/warm"):
                pass
        started = time.perf_counter()
        for _ in range(cycles):
            async with state.lock("bench/solo", ttl=10, wait=10):
                pass
        return cycles / (time.perf_counter() - started)


# ---------------------------------------------------------------- several processes


async def _worker(url: str, mode: str, count: int) -> None:
    """One writer process: connect, say ready, wait for "go", run, say done."""
    async with StateClient(url, name=f"bench-{os.getpid()}") as state:
        sys.stdout.write('{"event": "ready"}\n')
        sys.stdout.flush()
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        if mode == "update":
            for _ in range(count):
                await state.update("bench/counter", lambda n: (n or 0) + 1)
        else:
            for _ in range(count):
                async with state.lock("bench/shared", ttl=10, wait=60):
                    pass
        sys.stdout.write('{"event": "done"}\n')
        sys.stdout.flush()


def _contended(url: str, mode: str, writers: int, count: int) -> tuple[float, float]:
    """``writers`` processes run ``count`` operations each, released together; returns
    operations per second (all of them) and the service's conflicts per operation."""
    before = run_loop(_info(url))
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", mode, url, str(count)],
                              cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
             for _ in range(writers)]
    try:
        for proc in procs:
            _json_line(proc)
        started = time.perf_counter()
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(b"go\n")
            proc.stdin.close()
        for proc in procs:
            _json_line(proc)
        elapsed = time.perf_counter() - started
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(timeout=10)
    after = run_loop(_info(url))
    conflicts = (after["errors"].get("conflict", 0) - before["errors"].get("conflict", 0))
    total = writers * count
    return total / elapsed, conflicts / total


async def _info(url: str) -> dict[str, Any]:
    async with StateClient(url, name="bench-info") as state:
        return await state.info()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=10_000, help="set and get operations")
    parser.add_argument("--window", type=int, default=64, help="requests in flight")
    parser.add_argument("--writers", type=int, default=4, help="contending processes")
    parser.add_argument("--updates", type=int, default=1000, help="updates per writer")
    parser.add_argument("--cycles", type=int, default=2000, help="lock cycles (per writer)")
    parser.add_argument("--memory", action="store_true", help="service without SQLite")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("--worker", nargs=3, metavar=("MODE", "URL", "COUNT"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        mode, url, count = args.worker
        run_loop(_worker(url, mode, int(count)))
        return 0
    baseline_rate = _baseline_round_trips(min(args.ops, 5000))
    with state_service(args.memory) as url:
        sequential = run_loop(_sequential(url, args.ops))
        pipelined = run_loop(_pipelined(url, args.ops, args.window))
        update_rate, update_conflicts = _contended(url, "update", args.writers, args.updates)
        solo_locks = run_loop(_lock_cycles(url, args.cycles))
        shared_locks, _ = _contended(url, "lock", args.writers, args.cycles // args.writers)
    report = {
        "store": "memory" if args.memory else "sqlite-wal",
        "loop": loop_name(), "zmq": zmq_version(), "cpus": os.cpu_count(),
        "ops": args.ops, "window": args.window, "writers": args.writers,
        "set_ops_per_s": sequential["set_ops_per_s"],
        "set_p50_us": sequential["set_p50_us"], "set_p99_us": sequential["set_p99_us"],
        "get_ops_per_s": sequential["get_ops_per_s"],
        "get_p50_us": sequential["get_p50_us"], "get_p99_us": sequential["get_p99_us"],
        "set_pipelined_ops_per_s": pipelined["set_ops_per_s"],
        "get_pipelined_ops_per_s": pipelined["get_ops_per_s"],
        "update_contended_ops_per_s": round(update_rate),
        "update_conflicts_per_op": round(update_conflicts, 3),
        "lock_cycles_per_s": round(solo_locks),
        "lock_cycles_contended_per_s": round(shared_locks),
        "baseline_rt_per_s": round(baseline_rate),
        "set_vs_baseline": round(sequential["set_ops_per_s"] / baseline_rate, 3),
        "get_vs_baseline": round(sequential["get_ops_per_s"] / baseline_rate, 3),
    }
    if args.json:
        sys.stdout.write(orjson.dumps(report).decode() + "\n")
    else:
        for key, value in report.items():
            print(f"{key:32} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
