"""Latency: sequential round trips through Orchestrator against raw ZeroMQ, in one run.

``python bench/latency.py --tasks 5000 --json``: one client, one echo agent, one task at a
time; the baseline sends the same payloads one at a time through ``zmq.proxy`` to one
DEALER echo worker. Reports p50/p99 in microseconds for both.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson  # noqa: E402
import zmq  # noqa: E402

from agent_sdk import Client  # noqa: E402
from agent_sdk.loop import loop_name, run as run_loop  # noqa: E402
from bench._harness import baseline, median, orchestrator, percentile, zmq_version  # noqa: E402

#: Round trips before measuring (connection set-up, caches).
WARMUP = 200


def measure_baseline(url: str, tasks: int, payload: bytes) -> list[float]:
    sock: zmq.Socket[Any] = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(url)
    try:
        samples = []
        for i in range(WARMUP + tasks):
            started = time.perf_counter()
            sock.send(payload)
            sock.recv()
            if i >= WARMUP:
                samples.append((time.perf_counter() - started) * 1e6)
        return samples
    finally:
        sock.close(linger=0)


async def measure_ours(url: str, tasks: int, payload: bytes,
                       wait_for_agent: bool = True) -> list[float]:
    """Round trips through the SDK's Client. ``wait_for_agent=False`` is for a broker
    that answers no STATUS (bench/latency_floor.py's forwarder, whose agent registered
    before it returns)."""
    async with Client(url) as client:
        if wait_for_agent:
            await client.wait_for_agents(1, "echo", timeout=30)
        samples = []
        for i in range(WARMUP + tasks):
            started = time.perf_counter()
            result = await client.submit(capabilities=["echo"], data=payload).result(timeout=30)
            if i >= WARMUP:
                samples.append((time.perf_counter() - started) * 1e6)
            if not result.ok:
                raise RuntimeError(f"task failed during the benchmark: {result.error}")
        return samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--payload-bytes", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=1, help="alternate ours/baseline N times")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args(argv)
    payload = b"x" * args.payload_bytes
    ours: dict[str, list[float]] = {"p50": [], "p99": []}
    base: dict[str, list[float]] = {"p50": [], "p99": []}
    for _ in range(args.repeat):
        with baseline(1) as url:
            samples = sorted(measure_baseline(url, args.tasks, payload))
        base["p50"].append(percentile(samples, 0.50))
        base["p99"].append(percentile(samples, 0.99))
        with orchestrator(1, 16) as url:
            samples = sorted(run_loop(measure_ours(url, args.tasks, payload)))
        ours["p50"].append(percentile(samples, 0.50))
        ours["p99"].append(percentile(samples, 0.99))
    report = {
        "tasks": args.tasks, "payload_bytes": args.payload_bytes, "repeat": args.repeat,
        "loop": loop_name(), "zmq": zmq_version(),
        "p50_us": round(median(ours["p50"]), 1), "p99_us": round(median(ours["p99"]), 1),
        "baseline_p50_us": round(median(base["p50"]), 1),
        "baseline_p99_us": round(median(base["p99"]), 1),
    }
    report["p50_ratio"] = round(report["p50_us"] / report["baseline_p50_us"], 3)
    if args.json:
        print(orjson.dumps(report).decode())
    else:
        print(f"orchestrator: p50 {report['p50_us']:>8.1f} us   p99 {report['p99_us']:>8.1f} us")
        print(f"zmq.proxy:    p50 {report['baseline_p50_us']:>8.1f} us   "
              f"p99 {report['baseline_p99_us']:>8.1f} us")
        print(f"p50 ratio:    {report['p50_ratio']:.3f}  ({args.tasks} sequential round trips, "
              f"{report['loop']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
