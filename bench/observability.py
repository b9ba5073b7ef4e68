"""The cost of observability: the throughput benchmark with metrics off and on, and with
tracing off, at the default sampling and at 100%, alternated in one run.

``python bench/observability.py --pairs 5 --tasks 20000 --json``

Each pair runs every mode once, in turn, on a fresh broker and agents (the standard
throughput set-up of ``bench/throughput.py``: echo agents, a client keeping ``--window``
tasks in flight). Ratios are per pair (a mode against the reference run of the same
pair), so that the machine's drift between pairs does not count; the report gives their
median and their spread (min, max) to judge a ratio against. Modes:

- ``metrics_off``: ``--no-metrics``, no tracing (the reference of ``metrics_on``);
- ``metrics_on``: the default broker, no tracing (the reference of the tracing modes);
- ``tracing_default``: ``ORCH_OTEL_EXPORTER=jsonl`` at the default sample ratio;
- ``tracing_full``: the same with ``ORCH_OTEL_SAMPLE_RATIO=1``.

Tracing exports to a JSON-lines file in a temporary directory (the cheapest exporter
that does the whole work: build, batch, serialise, write) for the client, the broker and
the agents alike.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Final

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson  # noqa: E402

from bench._harness import median, orchestrator, zmq_version  # noqa: E402
from bench.throughput import measure_ours  # noqa: E402
from wire.tracing import DEFAULT_SAMPLE_RATIO, shutdown_tracing  # noqa: E402

#: mode -> (extra broker arguments, environment of every process, reference mode)
MODES: Final = {
    "metrics_off": (("--no-metrics",), {}, None),
    "metrics_on": ((), {}, "metrics_off"),
    "tracing_default": ((), {"ORCH_OTEL_EXPORTER": "jsonl"}, "metrics_on"),
    "tracing_full": ((), {"ORCH_OTEL_EXPORTER": "jsonl", "ORCH_OTEL_SAMPLE_RATIO": "1"},
                     "metrics_on"),
}
#: what the issue asks of each mode against its reference
TARGETS: Final = {"metrics_on": 0.95, "tracing_default": 0.9, "tracing_full": 0.5}
_TRACING_VARS: Final = ("ORCH_OTEL_EXPORTER", "ORCH_OTEL_SAMPLE_RATIO", "ORCH_OTEL_FILE")


def run_mode(mode: str, args: argparse.Namespace, spans_dir: Path) -> float:
    """One throughput run of ``mode``; tasks/s."""
    broker_args, env, _ = MODES[mode]
    for name in _TRACING_VARS:
        os.environ.pop(name, None)
    os.environ.update(env)
    if env:
        os.environ["ORCH_OTEL_FILE"] = str(spans_dir / f"{mode}.jsonl")
    shutdown_tracing()  # the client (this process) reads the environment afresh
    try:
        with orchestrator(args.agents, args.agent_concurrency, broker_args) as url:
            return measure_ours(url, args.tasks, args.window, b"x" * args.payload_bytes)
    finally:
        shutdown_tracing()
        for name in _TRACING_VARS:
            os.environ.pop(name, None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=5, help="rounds of every mode")
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--agents", type=int, default=2)
    parser.add_argument("--window", type=int, default=500)
    parser.add_argument("--payload-bytes", type=int, default=100)
    parser.add_argument("--agent-concurrency", type=int, default=256)
    parser.add_argument("--modes", default=",".join(MODES),
                        help=f"comma-separated, of: {', '.join(MODES)}")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if unknown or args.pairs < 1 or args.tasks < 1:
        parser.error(f"unknown mode(s) {unknown}" if unknown else "--pairs and --tasks >= 1")
    runs: dict[str, list[float]] = {mode: [] for mode in modes}
    with tempfile.TemporaryDirectory(prefix="orch-bench-spans-") as spans:
        for _ in range(args.pairs):
            for mode in modes:
                runs[mode].append(run_mode(mode, args, Path(spans)))
                print(f"{mode}: {runs[mode][-1]:,.0f} tasks/s", file=sys.stderr, flush=True)
    ratios: dict[str, dict[str, object]] = {}
    for mode in modes:
        reference = MODES[mode][2]
        if reference is None or reference not in runs:
            continue
        pairs = [a / b for a, b in zip(runs[mode], runs[reference])]
        ratio = median(pairs)
        ratios[f"{mode}_vs_{reference}"] = {
            "ratio": round(ratio, 3), "min": round(min(pairs), 3), "max": round(max(pairs), 3),
            "pairs": [round(p, 3) for p in pairs], "target": TARGETS[mode],
            "met": ratio >= TARGETS[mode]}
    report = {
        "tasks": args.tasks, "agents": args.agents, "window": args.window,
        "pairs": args.pairs, "zmq": zmq_version(), "default_sample_ratio": DEFAULT_SAMPLE_RATIO,
        "tasks_per_s": {mode: round(median(values)) for mode, values in runs.items()},
        "ratios": ratios,
        "runs": {mode: [round(v) for v in values] for mode, values in runs.items()},
    }
    if args.json:
        print(orjson.dumps(report).decode())
    else:
        for mode, rate in report["tasks_per_s"].items():  # type: ignore[union-attr]
            print(f"{mode:<16} {rate:>9,} tasks/s")
        for name, found in ratios.items():
            print(f"{name:<32} {found['ratio']}  (pairs {found['min']}-{found['max']}, "
                  f"target {found['target']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
