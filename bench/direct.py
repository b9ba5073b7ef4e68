"""Direct messages: request/reply through the broker against raw ZeroMQ, in one run.

``python bench/direct.py --requests 5000 --json``

Ours: the public asyncio ``Client`` sends ``request("direct-echo", payload)`` through a
real broker to one agent process (:class:`DirectEchoAgent`, a ``BaseAgent`` whose
``on_message`` handler returns what it got): p50/p99 of sequential round trips, then
requests/s with ``--window`` requests in flight. Baseline: the same payloads through
``zmq.proxy`` (ROUTER/DEALER) to one DEALER echo worker, the device a broker that routes
point to point is measured against. ``--repeat N`` alternates the two N times and reports
medians.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson  # noqa: E402
import zmq  # noqa: E402

from agent_sdk import BaseAgent, Client, DirectMessage, Result, Task  # noqa: E402
from agent_sdk.loop import loop_name, run as run_loop  # noqa: E402
from bench._harness import baseline, median, orchestrator, percentile, zmq_version  # noqa: E402

#: Round trips before measuring (connection set-up, caches).
WARMUP = 200
#: The echo agent's name; requests address it by name (one instance).
AGENT_NAME = "direct-echo"


class DirectEchoAgent(BaseAgent):
    """Answers every direct request with its data, as users write handlers."""

    def __init__(self) -> None:
        super().__init__(name=AGENT_NAME, capabilities=["direct-echo"])
        self.on_message(self.echo)

    def echo(self, message: DirectMessage) -> Any:
        return message.data

    async def execute(self, task: Task) -> Result:
        return Result(data=task.data)


def baseline_latency(url: str, requests: int, payload: bytes) -> list[float]:
    sock: zmq.Socket[Any] = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(url)
    try:
        samples = []
        for i in range(WARMUP + requests):
            started = time.perf_counter()
            sock.send(payload)
            sock.recv()
            if i >= WARMUP:
                samples.append((time.perf_counter() - started) * 1e6)
        return samples
    finally:
        sock.close(linger=0)


def baseline_rate(url: str, requests: int, window: int, payload: bytes) -> float:
    """Round trips/s of a DEALER keeping ``window`` requests in flight."""
    sock: zmq.Socket[Any] = zmq.Context.instance().socket(zmq.DEALER)
    sock.sndhwm = sock.rcvhwm = 100_000
    sock.connect(url)
    try:
        send, recv = sock.send, sock.recv
        started = time.perf_counter()
        sent = 0
        for _ in range(min(window, requests)):
            send(payload)
            sent += 1
        for _ in range(requests):
            recv()
            if sent < requests:
                send(payload)
                sent += 1
        return requests / (time.perf_counter() - started)
    finally:
        sock.close(linger=0)


async def _ours(url: str, requests: int, window: int, payload: bytes
                ) -> tuple[list[float], float]:
    async with Client(url) as client:
        await client.wait_for_agents(1, name=AGENT_NAME, timeout=30)
        samples = []
        for i in range(WARMUP + requests):
            started = time.perf_counter()
            reply = await client.request(AGENT_NAME, payload, timeout=30)
            if i >= WARMUP:
                samples.append((time.perf_counter() - started) * 1e6)
            if reply != payload:
                raise RuntimeError("the echo agent answered something else")

        async def lane(count: int) -> None:
            for _ in range(count):
                await client.request(AGENT_NAME, payload, timeout=60)

        lanes = [requests // window + (1 if i < requests % window else 0)
                 for i in range(min(window, requests))]
        started = time.perf_counter()
        await asyncio.gather(*(lane(count) for count in lanes))
        return samples, requests / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--window", type=int, default=100,
                        help="requests in flight for the requests/s measurement")
    parser.add_argument("--payload-bytes", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=1, help="alternate ours/baseline N times")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args(argv)
    payload = b"x" * args.payload_bytes
    ours: dict[str, list[float]] = {"p50": [], "p99": [], "rate": []}
    base: dict[str, list[float]] = {"p50": [], "p99": [], "rate": []}
    for _ in range(args.repeat):
        with baseline(1) as url:
            samples = sorted(baseline_latency(url, args.requests, payload))
            base["rate"].append(baseline_rate(url, args.requests, args.window, payload))
        base["p50"].append(percentile(samples, 0.50))
        base["p99"].append(percentile(samples, 0.99))
        with orchestrator(1, 16, agent_spec="bench.direct:DirectEchoAgent") as url:
            samples, rate = run_loop(_ours(url, args.requests, args.window, payload))
        samples.sort()
        ours["p50"].append(percentile(samples, 0.50))
        ours["p99"].append(percentile(samples, 0.99))
        ours["rate"].append(rate)
    report = {
        "requests": args.requests, "window": args.window, "payload_bytes": args.payload_bytes,
        "repeat": args.repeat, "loop": loop_name(), "zmq": zmq_version(),
        "p50_us": round(median(ours["p50"]), 1), "p99_us": round(median(ours["p99"]), 1),
        "baseline_p50_us": round(median(base["p50"]), 1),
        "baseline_p99_us": round(median(base["p99"]), 1),
        "requests_per_s": round(median(ours["rate"])),
        "baseline_requests_per_s": round(median(base["rate"])),
    }
    report["p50_ratio"] = round(report["p50_us"] / report["baseline_p50_us"], 3)
    report["p99_ratio"] = round(report["p99_us"] / report["baseline_p99_us"], 3)
    report["ratio"] = round(report["requests_per_s"] / report["baseline_requests_per_s"], 3)
    if args.json:
        print(orjson.dumps(report).decode())
    else:
        print(f"orchestrator: p50 {report['p50_us']:>8.1f} us   p99 {report['p99_us']:>8.1f} us"
              f"   {report['requests_per_s']:>8,} requests/s")
        print(f"zmq.proxy:    p50 {report['baseline_p50_us']:>8.1f} us   "
              f"p99 {report['baseline_p99_us']:>8.1f} us   "
              f"{report['baseline_requests_per_s']:>8,} round trips/s")
        print(f"ratios:       p50 {report['p50_ratio']:.3f}  p99 {report['p99_ratio']:.3f}  "
              f"rate {report['ratio']:.3f}  ({args.requests} requests, window {args.window}, "
              f"{report['loop']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
