"""Latency floor: what any Python broker speaking this protocol costs here, next to what
Orchestrator costs, in one run.

``python bench/latency_floor.py --tasks 3000 --repeat 3 --json`` measures four set-ups
alternately, each one client and one echo agent with one task at a time (the workload of
``bench/latency.py``):

``baseline``
    the ``zmq.proxy`` device between a DEALER client and a DEALER echo worker;
``forwarder``
    a forwarding-only Python broker (below) with bare protocol endpoints: a blocking DEALER
    client and agent that only encode and decode;
``forwarder_sdk``
    the same forwarder with the SDK's ``Client`` and ``BaseAgent``;
``orchestrator``
    the real broker with the SDK's ``Client`` and ``BaseAgent`` (``bench/latency.py``).

The forwarder keeps nothing: no journal, no task table, no routing, no credit, no deadlines;
one blocking receive, one decode, one encode and one send per message. It is the least a
broker speaking this protocol can do, so ``forwarder`` is the floor for any Python broker
and ``forwarder_sdk`` the floor with the SDK's endpoints. It is a measuring instrument, not
a broker: it serves one agent and answers nothing else.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson  # noqa: E402
import zmq  # noqa: E402

from agent_sdk.loop import run as run_loop  # noqa: E402
from bench._harness import (  # noqa: E402
    _python, _read_json_line, _stop, baseline, median, orchestrator, percentile, zmq_version,
)
from bench.latency import WARMUP, measure_baseline, measure_ours  # noqa: E402
from wire.codec import packb  # noqa: E402
from wire.sockets import recv_frames, send_frames  # noqa: E402
from wire.tasks import (  # noqa: E402
    Ack, Assignment, Dispatch, Ready, ResultItem, Results, Submit, TaskSpec, Welcome, decode,
    encode,
)

SETUPS = ("baseline", "forwarder", "forwarder_sdk", "orchestrator")
#: The forwarder acknowledges results in batches, as the broker does (an ACK per result
#: would wake the agent once more per task).
ACK_BATCH = 200
AGENT_ID = "echo-floor"


def forward(url_out: Callable[[str], None]) -> None:
    """Serve as the forwarding-only broker until killed."""
    router: zmq.Socket[Any] = zmq.Context.instance().socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    url_out(f"tcp://127.0.0.1:{port}")
    agent: bytes | None = None
    owners: dict[str, bytes] = {}
    unacked: list[str] = []
    while True:
        frames = recv_frames(router)
        identity = frames[0]
        msg = decode(frames[1:])
        if type(msg) is Submit and agent is not None:
            for spec in msg.tasks:
                owners[spec.id] = identity
            send_frames(router, [agent, *encode(Dispatch([
                Assignment(spec.id, spec.payload, 1, 30.0, spec.capabilities)
                for spec in msg.tasks]))])
        elif type(msg) is Results:
            for item in msg.results:
                owner = owners.pop(item.task_id, None)
                if owner is not None:
                    send_frames(router, [owner, *encode(Results([item._replace(
                        agent=AGENT_ID, attempts=1)]))])
                unacked.append(item.task_id)
            if len(unacked) >= ACK_BATCH:
                send_frames(router, [identity, *encode(Ack(unacked))])
                unacked = []
        elif type(msg) is Ready:
            agent = identity
            send_frames(router, [identity, *encode(Welcome(1.0, 3, {}))])


def echo(url: str) -> None:
    """Serve as a bare protocol agent: decode each TASK, answer its payload, until killed."""
    sock: zmq.Socket[Any] = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.ROUTING_ID, AGENT_ID.encode())
    sock.connect(url)
    send_frames(sock, encode(Ready(AGENT_ID, "echo", ("echo",), 1)))
    while not isinstance(decode(recv_frames(sock)), Welcome):
        pass
    print(orjson.dumps({"event": "registered"}).decode(), flush=True)
    while True:
        msg = decode(recv_frames(sock))
        if type(msg) is Dispatch:
            send_frames(sock, encode(Results([
                ResultItem(task.id, "succeeded", task.payload) for task in msg.tasks])))


@contextlib.contextmanager
def forwarder(sdk_agent: bool) -> Iterator[str]:
    """The forwarder and one echo agent (the SDK's, or the bare one); yields the URL."""
    procs = []
    try:
        procs.append(_python("-m", "bench.latency_floor", "forwarder"))
        url = _read_json_line(procs[0])["endpoint"]
        if sdk_agent:
            procs.append(_python("-m", "agent_sdk", "run", "bench.echo_agent:EchoAgent",
                                 "--broker", url))
        else:
            procs.append(_python("-m", "bench.latency_floor", "echo", url))
        _read_json_line(procs[1])
        yield url
    finally:
        _stop(procs)


def measure_bare(url: str, tasks: int, payload: bytes) -> list[float]:
    """Round trips from a blocking DEALER that encodes SUBMITs and decodes RESULTs."""
    sock: zmq.Socket[Any] = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(url)
    body = packb({"data": payload})
    try:
        samples = []
        for i in range(WARMUP + tasks):
            started = time.perf_counter()
            send_frames(sock, encode(Submit([TaskSpec(f"t{i}", body, ("echo",))])))
            while type(decode(recv_frames(sock))) is not Results:
                pass
            if i >= WARMUP:
                samples.append((time.perf_counter() - started) * 1e6)
        return samples
    finally:
        sock.close(linger=0)


def measure(setup: str, tasks: int, payload: bytes) -> list[float]:
    if setup == "baseline":
        with baseline(1) as url:
            return measure_baseline(url, tasks, payload)
    if setup == "forwarder":
        with forwarder(sdk_agent=False) as url:
            return measure_bare(url, tasks, payload)
    if setup == "forwarder_sdk":
        with forwarder(sdk_agent=True) as url:
            return run_loop(measure_ours(url, tasks, payload, wait_for_agent=False))
    with orchestrator(1, 16) as url:
        return run_loop(measure_ours(url, tasks, payload))


def main(argv: list[str] | None = None) -> int:
    args_in = sys.argv[1:] if argv is None else argv
    if args_in[:1] == ["forwarder"]:
        forward(lambda url: print(orjson.dumps({"endpoint": url}).decode(), flush=True))
        return 0
    if args_in[:1] == ["echo"]:
        echo(args_in[1])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=3000)
    parser.add_argument("--payload-bytes", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=1, help="alternate the set-ups N times")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args(args_in)
    payload = b"x" * args.payload_bytes
    p50s: dict[str, list[float]] = {setup: [] for setup in SETUPS}
    for _ in range(args.repeat):
        for setup in SETUPS:
            p50s[setup].append(percentile(sorted(measure(setup, args.tasks, payload)), 0.50))
    base = median(p50s["baseline"])
    report: dict[str, Any] = {"tasks": args.tasks, "payload_bytes": args.payload_bytes,
                              "repeat": args.repeat, "zmq": zmq_version()}
    for setup in SETUPS:
        report[f"{setup}_p50_us"] = round(median(p50s[setup]), 1)
        report[f"{setup}_ratio"] = round(median(p50s[setup]) / base, 3)
    if args.json:
        print(orjson.dumps(report).decode())
    else:
        for setup in SETUPS:
            print(f"{setup:<14} p50 {report[f'{setup}_p50_us']:>8.1f} us   "
                  f"{report[f'{setup}_ratio']:.2f}x the baseline")
    return 0


if __name__ == "__main__":
    sys.exit(main())
