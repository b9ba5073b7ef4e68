"""Throughput: tasks/s through Orchestrator against raw ZeroMQ, measured in one run.

``python bench/throughput.py --tasks 50000 --agents 2 --window 500 --json``

Ours: a real broker process and ``--agents`` echo agent processes (``BaseAgent``), driven
by the public asyncio ``Client`` keeping ``--window`` tasks in flight. Baseline: the same
payloads through ``zmq.proxy`` between a DEALER client and DEALER echo workers. With
``--repeat N`` the two alternate N times and the medians are reported.
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

from agent_sdk import Client  # noqa: E402
from agent_sdk.loop import loop_name, run as run_loop  # noqa: E402
from bench._harness import baseline, median, orchestrator, zmq_version  # noqa: E402


def measure_baseline(url: str, tasks: int, window: int, payload: bytes) -> float:
    """Round trips/s of a DEALER client keeping ``window`` messages in flight."""
    ctx: zmq.Context[Any] = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.sndhwm = sock.rcvhwm = 100_000
    sock.connect(url)
    try:
        send, recv = sock.send, sock.recv
        # one warm-up round trip so that connection set-up is not measured
        send(payload)
        recv()
        started = time.perf_counter()
        sent = 0
        for _ in range(min(window, tasks)):
            send(payload)
            sent += 1
        for _ in range(tasks):
            recv()
            if sent < tasks:
                send(payload)
                sent += 1
        return tasks / (time.perf_counter() - started)
    finally:
        sock.close(linger=0)


async def _measure_ours(url: str, tasks: int, window: int, data: bytes) -> float:
    async with Client(url) as client:
        await client.wait_for_agents(1, "echo", timeout=30)
        await client.submit(capabilities=["echo"], data=data).result(timeout=30)
        done = asyncio.get_running_loop().create_future()
        state = {"sent": 0, "received": 0, "failed": 0}

        def on_result(handle: Any) -> None:
            state["received"] += 1
            if not handle.result_nowait().ok:
                state["failed"] += 1
            if state["sent"] < tasks:
                state["sent"] += 1
                client.submit(capabilities=["echo"], data=data).add_done_callback(on_result)
            elif state["received"] == tasks and not done.done():
                done.set_result(None)

        started = time.perf_counter()
        for _ in range(min(window, tasks)):
            state["sent"] += 1
            client.submit(capabilities=["echo"], data=data).add_done_callback(on_result)
        await asyncio.wait_for(done, timeout=600)
        elapsed = time.perf_counter() - started
        if state["failed"]:
            raise RuntimeError(f"{state['failed']} task(s) failed during the benchmark")
        return tasks / elapsed


def measure_ours(url: str, tasks: int, window: int, data: bytes) -> float:
    return run_loop(_measure_ours(url, tasks, window, data))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=50_000)
    parser.add_argument("--agents", type=int, default=2)
    parser.add_argument("--window", type=int, default=500)
    parser.add_argument("--payload-bytes", type=int, default=100)
    parser.add_argument("--agent-concurrency", type=int, default=256,
                        help="max_concurrent of each echo agent")
    parser.add_argument("--repeat", type=int, default=1, help="alternate ours/baseline N times")
    parser.add_argument("--durability", default="batch",
                        help="broker journal mode(s), comma-separated: none,batch,fsync; the "
                             "first is the headline number, all are reported")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args(argv)
    payload = b"x" * args.payload_bytes
    modes = [m.strip() for m in args.durability.split(",") if m.strip()]
    ours: dict[str, list[float]] = {mode: [] for mode in modes}
    base: list[float] = []
    for _ in range(args.repeat):
        with baseline(args.agents) as url:
            base.append(measure_baseline(url, args.tasks, args.window, payload))
        for mode in modes:
            with orchestrator(args.agents, args.agent_concurrency,
                              ("--durability", mode)) as url:
                ours[mode].append(measure_ours(url, args.tasks, args.window, payload))
    headline = median(ours[modes[0]])
    report = {
        "tasks": args.tasks, "agents": args.agents, "window": args.window,
        "payload_bytes": args.payload_bytes, "repeat": args.repeat, "loop": loop_name(),
        "zmq": zmq_version(), "durability": modes[0],
        "tasks_per_s": round(headline), "baseline_tasks_per_s": round(median(base)),
        "ratio": round(headline / median(base), 3),
        "by_durability": {mode: round(median(values)) for mode, values in ours.items()},
        "runs": {"ours": {mode: [round(v) for v in values] for mode, values in ours.items()},
                 "baseline": [round(v) for v in base]},
    }
    if "none" in ours:
        none = median(ours["none"])
        report["vs_none"] = {mode: round(median(values) / none, 3)
                             for mode, values in ours.items()}
    if args.json:
        print(orjson.dumps(report).decode())
    else:
        print(f"orchestrator: {report['tasks_per_s']:>9,} tasks/s")
        print(f"zmq.proxy:    {report['baseline_tasks_per_s']:>9,} round trips/s")
        print(f"ratio:        {report['ratio']:.3f}  ({args.tasks} tasks, {args.agents} agents, "
              f"window {args.window}, {args.payload_bytes}-byte payload, {report['loop']}, "
              f"durability {modes[0]})")
        if len(modes) > 1:
            for mode, rate in report["by_durability"].items():
                print(f"  durability {mode:<6} {rate:>9,} tasks/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
