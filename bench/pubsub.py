"""Pub/sub: messages/s from one publisher to three subscribers, ours against raw ZeroMQ.

``python bench/pubsub.py --messages 100000 --json``

Ours: a real broker process (whose forwarder thread is the bus), a publisher using the
public asyncio ``Client.publish`` in this process, and three subscriber processes using
``Client.subscribe`` with a handler. Baseline: the same message count and payload size
from a raw PUB socket through a ``zmq.proxy`` XSUB/XPUB device (same high-water marks)
to three raw SUB processes. Both wait until every subscription is known to work before
the first message, and the clock runs from the first publish until the last subscriber
got the last message. ``--repeat N`` alternates the two and reports medians.

Subscriber processes: ``python -m bench.pubsub sub URL TOPIC COUNT`` (ours) and
``python -m bench.pubsub raw-sub URL TOPIC COUNT``; the device: ``python -m bench.pubsub
proxy HWM``. Each prints one JSON line when ready and one with what it received.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import msgpack  # noqa: E402
import orjson  # noqa: E402
import zmq  # noqa: E402

from agent_sdk import BusMessage, Client  # noqa: E402
from agent_sdk.loop import loop_name, run as run_loop  # noqa: E402
from bench._harness import (  # noqa: E402
    _python, _read_json_line, _stop, median, orchestrator, zmq_version,
)
from broker.config import DEFAULT_BUS_HWM  # noqa: E402

TOPIC = "bench.pubsub"
SUBSCRIBERS = 3
#: How long a subscriber waits for the rest once messages stop coming (some were lost).
IDLE_S = 5.0
#: Warm-up messages of the baseline are marked with this index (subscribers skip them).
WARMUP_INDEX = -1


def _message(index: int, payload: bytes) -> dict[str, Any]:
    return {"i": index, "p": payload}


# ------------------------------------------------------------------ ours


async def _subscriber(url: str, topic: str, count: int) -> dict[str, Any]:
    async with Client(url) as client:
        done = asyncio.get_running_loop().create_future()
        state = {"received": 0, "last_at": 0.0}

        def on_message(message: BusMessage) -> None:
            state["received"] += 1
            state["last_at"] = time.time()
            if message.data["i"] == count - 1 or state["received"] == count:
                if not done.done():
                    done.set_result(None)

        await client.subscribe(topic, on_message)
        print(json.dumps({"event": "ready"}), flush=True)
        await _wait_until_idle(done, lambda: state["received"])
        return {"received": state["received"], "last_at": state["last_at"],
                "lost": client.messaging.stats().get("bus_gaps", 0)}


async def _wait_until_idle(done: asyncio.Future[None], progress: Any) -> None:
    """Wait for ``done``, or until nothing arrived for IDLE_S (the rest was lost)."""
    seen = -1
    while not done.done() and progress() != seen:
        seen = progress()
        try:
            await asyncio.wait_for(asyncio.shield(done), IDLE_S)
        except asyncio.TimeoutError:
            pass


async def _publish(url: str, count: int, payload: bytes) -> float:
    async with Client(url) as client:
        await client.wait_for_subscribers(TOPIC, timeout=30)
        started = time.time()
        for index in range(count):
            await client.publish(TOPIC, _message(index, payload))
        return started


def measure_ours(count: int, payload: bytes, hwm: int) -> dict[str, Any]:
    with orchestrator(0, 1, ("--bus-hwm", str(hwm))) as url:
        subscribers = _start_subscribers("sub", url, count)
        try:
            started = run_loop(_publish(url, count, payload))
            return _collect(subscribers, started, count)
        finally:
            _stop(subscribers)


# ------------------------------------------------------------------ baseline


def _raw_subscriber(url: str, topic: str, count: int) -> dict[str, Any]:
    sock: zmq.Socket[Any] = zmq.Context.instance().socket(zmq.SUB)
    sock.rcvhwm = DEFAULT_BUS_HWM
    sock.rcvtimeo = int(IDLE_S * 1000)
    sock.connect(url)
    sock.subscribe(topic.encode())
    received = 0
    ready = False
    last_at = 0.0
    unpack = msgpack.unpackb
    recv = sock.recv_multipart
    while True:
        try:
            _, body = recv()
        except zmq.Again:
            break  # nothing for IDLE_S: the rest was lost
        index = unpack(body)["i"]
        if index == WARMUP_INDEX:
            if not ready:
                ready = True
                print(json.dumps({"event": "ready"}), flush=True)
            continue
        received += 1
        last_at = time.time()
        if index == count - 1 or received == count:
            break
    sock.close(linger=0)
    return {"received": received, "last_at": last_at, "lost": count - received}


def _proxy(hwm: int) -> None:
    ctx = zmq.Context()
    xsub, xpub = ctx.socket(zmq.XSUB), ctx.socket(zmq.XPUB)
    for sock in (xsub, xpub):
        sock.sndhwm = sock.rcvhwm = hwm
    in_port = xsub.bind_to_random_port("tcp://127.0.0.1")
    out_port = xpub.bind_to_random_port("tcp://127.0.0.1")
    print(json.dumps({"in": f"tcp://127.0.0.1:{in_port}", "out": f"tcp://127.0.0.1:{out_port}"}),
          flush=True)
    zmq.proxy(xsub, xpub)


def measure_baseline(count: int, payload: bytes, hwm: int) -> dict[str, Any]:
    proxy = _python("-m", "bench.pubsub", "proxy", str(hwm))
    try:
        endpoints = _read_json_line(proxy)
        subscribers = _start_subscribers("raw-sub", endpoints["out"], count, wait=False)
        pub: zmq.Socket[Any] = zmq.Context.instance().socket(zmq.PUB)
        pub.sndhwm = hwm
        pub.connect(endpoints["in"])
        packb = msgpack.packb
        try:
            # Raw ZeroMQ has no confirmation: publish warm-up messages until every
            # subscriber said it receives them.
            warmup = [TOPIC.encode(), packb(_message(WARMUP_INDEX, payload))]
            pending = {proc.stdout.fileno(): proc for proc in subscribers}  # type: ignore[union-attr]
            deadline = time.monotonic() + 30
            while pending and time.monotonic() < deadline:
                pub.send_multipart(warmup)
                ready, _, _ = select.select(list(pending), [], [], 0.01)
                for fd in ready:
                    pending.pop(fd).stdout.readline()  # type: ignore[union-attr]
            if pending:
                raise RuntimeError("raw subscribers never received the warm-up messages")
            started = time.time()
            send = pub.send_multipart
            topic = TOPIC.encode()
            for index in range(count):
                send([topic, packb(_message(index, payload))])
            return _collect(subscribers, started, count)
        finally:
            pub.close(linger=1000)
            _stop(subscribers)
    finally:
        _stop([proxy])


# ------------------------------------------------------------------ both


def _start_subscribers(kind: str, url: str, count: int, wait: bool = True
                       ) -> list[subprocess.Popen[bytes]]:
    procs = [_python("-m", "bench.pubsub", kind, url, TOPIC, str(count))
             for _ in range(SUBSCRIBERS)]
    if wait:
        for proc in procs:
            _read_json_line(proc)
    return procs


def _collect(subscribers: list[subprocess.Popen[bytes]], started: float, count: int
             ) -> dict[str, Any]:
    reports = [_read_json_line(proc) for proc in subscribers]
    finished = max(report["last_at"] for report in reports)
    received = [report["received"] for report in reports]
    return {"messages_per_s": count / (finished - started), "received": received,
            "lost": [report["lost"] for report in reports]}


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] in ("sub", "raw-sub"):
        url, topic, count = argv[1], argv[2], int(argv[3])
        report = (run_loop(_subscriber(url, topic, count)) if argv[0] == "sub"
                  else _raw_subscriber(url, topic, count))
        print(json.dumps(report), flush=True)
        return 0
    if argv and argv[0] == "proxy":
        _proxy(int(argv[1]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--payload-bytes", type=int, default=100)
    parser.add_argument("--hwm", type=int, default=DEFAULT_BUS_HWM,
                        help="queue bound per subscriber (both sides)")
    parser.add_argument("--repeat", type=int, default=1, help="alternate ours/baseline N times")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args(argv)
    payload = b"x" * args.payload_bytes
    ours: list[dict[str, Any]] = []
    base: list[dict[str, Any]] = []
    for _ in range(args.repeat):
        base.append(measure_baseline(args.messages, payload, args.hwm))
        ours.append(measure_ours(args.messages, payload, args.hwm))
    rate = median([run["messages_per_s"] for run in ours])
    base_rate = median([run["messages_per_s"] for run in base])
    report = {
        "messages": args.messages, "subscribers": SUBSCRIBERS,
        "payload_bytes": args.payload_bytes, "hwm": args.hwm, "repeat": args.repeat,
        "loop": loop_name(), "zmq": zmq_version(),
        "messages_per_s": round(rate), "baseline_messages_per_s": round(base_rate),
        "ratio": round(rate / base_rate, 3),
        "deliveries_per_s": round(rate * SUBSCRIBERS),
        "received": {"ours": [run["received"] for run in ours],
                     "baseline": [run["received"] for run in base]},
        "lost": {"ours": [run["lost"] for run in ours], "baseline": [run["lost"] for run in base]},
        "runs": {"ours": [round(run["messages_per_s"]) for run in ours],
                 "baseline": [round(run["messages_per_s"]) for run in base]},
    }
    if args.json:
        print(orjson.dumps(report).decode())
    else:
        print(f"orchestrator: {report['messages_per_s']:>9,} messages/s to {SUBSCRIBERS} "
              f"subscribers ({report['deliveries_per_s']:,} deliveries/s)")
        print(f"zmq.proxy:    {report['baseline_messages_per_s']:>9,} messages/s")
        print(f"ratio:        {report['ratio']:.3f}  ({args.messages} messages of "
              f"{args.payload_bytes} B, {report['loop']}); lost {report['lost']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
