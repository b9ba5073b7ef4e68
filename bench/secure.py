"""The cost of CURVE: the standard throughput and latency workloads on a plaintext broker
and on a ``--secure`` one, alternated in one run.

``python bench/secure.py --pairs 5 --tasks 20000 --latency-tasks 5000 --json``

Each pair runs, in turn, a plaintext broker and a secure broker (``--secure``: CURVE
and ZAP on every socket, the client and the agents authenticated with the data dir's
local admin key), each fresh with its own echo agents: first the throughput workload of
``bench/throughput.py`` (a client keeping ``--window`` tasks in flight through
``--agents`` agents), then the latency workload of ``bench/latency.py`` (sequential
round trips through one agent). Ratios are taken per pair (secure against the plaintext
run beside it), so that the machine's drift between pairs does not count; the report
gives their median and spread. Which of the two goes first alternates from pair to pair,
so that neither always runs on a warmer (or more tired) machine.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Final

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson  # noqa: E402

from agent_sdk.loop import loop_name, run as run_loop  # noqa: E402
from bench import latency as latency_bench  # noqa: E402
from bench._harness import (  # noqa: E402
    _python, _read_json_line, _stop, median, percentile, zmq_version,
)
from bench.throughput import measure_ours as measure_throughput  # noqa: E402
from wire.curve import ENV_KEY_FILE, ENV_SERVER_KEY, ENV_SERVER_KEY_FILE  # noqa: E402

#: What the issue asks: throughput with CURVE at least this fraction of plaintext.
TARGET_THROUGHPUT_RATIO: Final = 0.8
#: The secure broker's files in its data dir that a client of it needs.
_SERVER_KEY: Final = Path("keys") / "broker.key"
_CLIENT_SECRET: Final = Path("keys") / "local-admin.key_secret"
_CURVE_VARS: Final = (ENV_SERVER_KEY, ENV_SERVER_KEY_FILE, ENV_KEY_FILE)
#: max_concurrent of the latency workload's one agent (as in ``bench/latency.py``).
LATENCY_AGENT_CONCURRENCY: Final = 16


@contextlib.contextmanager
def broker_with_agents(secure: bool, agents: int, concurrency: int) -> Iterator[str]:
    """A broker (``--secure`` or not) and ``agents`` echo agents; yields the broker URL.

    With ``secure``, this process's client and the agents use the local admin key by the
    ORCH_CURVE_* variables (set in ``os.environ`` for the block's duration), as a remote
    agent would, rather than relying on finding the data dir.
    """
    procs = []
    with tempfile.TemporaryDirectory(prefix="orch-bench-secure-") as home:
        try:
            broker = _python("-m", "broker", "--bind", "127.0.0.1:0", "--data-dir", home,
                             "--log-level", "WARNING", *(("--secure",) if secure else ()))
            procs.append(broker)
            url = _read_json_line(broker)["endpoint"]
            if secure:
                os.environ[ENV_SERVER_KEY_FILE] = str(Path(home) / _SERVER_KEY)
                os.environ[ENV_KEY_FILE] = str(Path(home) / _CLIENT_SECRET)
            for _ in range(agents):
                procs.append(_python("-m", "agent_sdk", "run", "bench.echo_agent:EchoAgent",
                                     "--broker", url, "--max-concurrent", str(concurrency)))
            for agent in procs[1:]:
                _read_json_line(agent)
            yield url
        finally:
            _stop(procs)
            for name in _CURVE_VARS:
                os.environ.pop(name, None)


def run_mode(secure: bool, args: argparse.Namespace) -> tuple[float, list[float]]:
    """One throughput run and one latency run (each on a fresh broker): tasks/s and the
    sorted round-trip samples in microseconds."""
    payload = b"x" * args.payload_bytes
    with broker_with_agents(secure, args.agents, args.agent_concurrency) as url:
        rate = measure_throughput(url, args.tasks, args.window, payload)
    with broker_with_agents(secure, 1, LATENCY_AGENT_CONCURRENCY) as url:
        samples = sorted(run_loop(latency_bench.measure_ours(url, args.latency_tasks, payload)))
    return rate, samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=5, help="rounds of plaintext and CURVE")
    parser.add_argument("--tasks", type=int, default=20_000, help="throughput tasks per run")
    parser.add_argument("--latency-tasks", type=int, default=5_000,
                        help="sequential round trips per latency run")
    parser.add_argument("--agents", type=int, default=2)
    parser.add_argument("--window", type=int, default=500)
    parser.add_argument("--payload-bytes", type=int, default=100)
    parser.add_argument("--agent-concurrency", type=int, default=256)
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args(argv)
    if args.pairs < 1 or args.tasks < 1 or args.latency_tasks < 1:
        parser.error("--pairs, --tasks and --latency-tasks must be at least 1")
    rates: dict[str, list[float]] = {"plain": [], "curve": []}
    p50: dict[str, list[float]] = {"plain": [], "curve": []}
    p99: dict[str, list[float]] = {"plain": [], "curve": []}
    for pair in range(args.pairs):
        order = ("plain", "curve") if pair % 2 == 0 else ("curve", "plain")
        for mode in order:
            rate, samples = run_mode(mode == "curve", args)
            rates[mode].append(rate)
            p50[mode].append(percentile(samples, 0.50))
            p99[mode].append(percentile(samples, 0.99))
            print(f"pair {pair + 1} {mode}: {rate:,.0f} tasks/s, p50 {p50[mode][-1]:.0f} us, "
                  f"p99 {p99[mode][-1]:.0f} us", file=sys.stderr, flush=True)
    ratios = [c / p for c, p in zip(rates["curve"], rates["plain"])]
    ratio = median(ratios)
    report = {
        "pairs": args.pairs, "tasks": args.tasks, "latency_tasks": args.latency_tasks,
        "agents": args.agents, "window": args.window, "payload_bytes": args.payload_bytes,
        "loop": loop_name(), "zmq": zmq_version(),
        "throughput_plain": round(median(rates["plain"])),
        "throughput_curve": round(median(rates["curve"])),
        "throughput_ratio": round(ratio, 3),
        "throughput_ratio_min": round(min(ratios), 3),
        "throughput_ratio_max": round(max(ratios), 3),
        "target_ratio": TARGET_THROUGHPUT_RATIO, "met": ratio >= TARGET_THROUGHPUT_RATIO,
        "latency_p50_plain_us": round(median(p50["plain"]), 1),
        "latency_p50_curve_us": round(median(p50["curve"]), 1),
        "latency_p99_plain_us": round(median(p99["plain"]), 1),
        "latency_p99_curve_us": round(median(p99["curve"]), 1),
        "runs": {"throughput": {m: [round(v) for v in rates[m]] for m in rates},
                 "p50_us": {m: [round(v, 1) for v in p50[m]] for m in p50},
                 "p99_us": {m: [round(v, 1) for v in p99[m]] for m in p99},
                 "throughput_ratios": [round(r, 3) for r in ratios]},
    }
    if args.json:
        print(orjson.dumps(report).decode())
    else:
        print(f"throughput  plain {report['throughput_plain']:>9,} tasks/s   "
              f"curve {report['throughput_curve']:>9,} tasks/s   ratio "
              f"{report['throughput_ratio']} (pairs {report['throughput_ratio_min']}-"
              f"{report['throughput_ratio_max']}, target {TARGET_THROUGHPUT_RATIO})")
        print(f"latency p50 plain {report['latency_p50_plain_us']:>8.1f} us   curve "
              f"{report['latency_p50_curve_us']:>8.1f} us")
        print(f"latency p99 plain {report['latency_p99_plain_us']:>8.1f} us   curve "
              f"{report['latency_p99_curve_us']:>8.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
