"""``orchestrator bench``: the benchmark suites of ``bench/``, ours against raw ZeroMQ in
the same run.

Each command runs its script in a process of its own (the scripts start and kill their
brokers, agents and baseline devices) and prints what the script prints: a table, or one
JSON document with ``--json``. The scripts ship with the source checkout, not with an
installed package.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click
from rich.console import Console

from broker.config import DURABILITIES

from cli.common import EXIT_FAILED, EXIT_USAGE, DataDirGroup, F, count, fail, json_option

BENCH_DIR = Path(__file__).resolve().parent.parent / "bench"

BENCH_HELP = """Run a benchmark suite: Orchestrator through its public Client and BaseAgent,
and the raw-ZeroMQ baseline (a zmq.proxy device between DEALER clients and DEALER echo
workers) in the same run, alternating when repeated. Compare ratios only: the machine's
noise moves absolute numbers between runs."""


def _run(script: str, args: list[str], as_json: bool, what: str) -> None:
    """Run ``bench/SCRIPT ARGS`` and print its stdout; exit 1 if it fails, 2 if it is missing.

    Args:
        script: The script's file name under ``bench/``.
        args: Its arguments (``--json`` is added when ``as_json``).
        as_json: The script prints one JSON document instead of its table.
        what: The workload, for the progress line on stderr.
    """
    path = BENCH_DIR / script
    if not path.is_file():
        fail(f"{path} not found: the benchmarks ship with the source checkout; run "
             "orchestrator from a clone (./orchestrator.sh bench ...)", EXIT_USAGE)
    command = [sys.executable, str(path), *args, *(["--json"] if as_json else [])]
    # Progress on stderr, so that stdout stays the script's own output (one JSON
    # document with --json).
    with Console(stderr=True).status(f"{what} (ours and the baseline, alternating)..."):
        proc = subprocess.run(command, cwd=BENCH_DIR.parent, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        fail(f"the {script} benchmark failed (exit {proc.returncode}); its output is above",
             EXIT_FAILED)
    sys.stdout.write(proc.stdout)


def _common(function: F) -> F:
    """Add the options every suite takes: payload size, repeats and ``--json``."""
    for option in reversed([
        click.option("--payload-bytes", type=count(1), default=100,
                     show_default=True, help="Bytes of payload per task."),
        click.option("--repeat", type=count(1), default=1, show_default=True,
                     help="Alternate ours and the baseline N times; medians are reported."),
        json_option("Print one JSON document."),
    ]):
        function = option(function)
    return function


class Durabilities(click.ParamType):
    """``--durability``: journal modes, comma-separated, each one the broker knows."""

    name = "modes"

    def convert(self, value: object, param: click.Parameter | None,
                ctx: click.Context | None) -> str:
        modes = [mode.strip() for mode in str(value).split(",")]
        if not all(mode in DURABILITIES for mode in modes):
            self.fail(f"{value!r} is not a comma-separated list of {', '.join(DURABILITIES)}",
                      param, ctx)
        return ",".join(modes)


DURABILITY_LIST = Durabilities()
bench: click.Group = DataDirGroup("bench", help=BENCH_HELP)


@bench.command(help="""Tasks per second with a window of tasks in flight, against zmq.proxy
round trips per second (the standard workload: 50,000 tasks, window 500, 2 agents).""")
@click.option("--tasks", type=count(1), default=50_000, show_default=True)
@click.option("--agents", type=count(1), default=2, show_default=True,
              help="Echo agent processes (and baseline workers).")
@click.option("--window", type=count(1), default=500, show_default=True,
              help="Tasks in flight at once.")
@click.option("--durability", type=DURABILITY_LIST, default="batch", show_default=True,
              help="Broker journal mode(s), comma-separated: none,batch,fsync.")
@_common
def throughput(tasks: int, agents: int, window: int, durability: str, payload_bytes: int,
               repeat: int, as_json: bool) -> None:
    """Run ``bench/throughput.py`` with these options."""
    _run("throughput.py", ["--tasks", str(tasks), "--agents", str(agents), "--window",
                           str(window), "--durability", durability, "--payload-bytes",
                           str(payload_bytes), "--repeat", str(repeat)], as_json,
         f"throughput: {tasks} tasks, window {window}, {agents} agent(s)")


@bench.command(help="""p50 and p99 of sequential round trips through one agent, against
zmq.proxy's (the standard workload: 5,000 round trips).""")
@click.option("--tasks", type=count(1), default=5000, show_default=True,
              help="Round trips measured (after a warm-up).")
@_common
def latency(tasks: int, payload_bytes: int, repeat: int, as_json: bool) -> None:
    """Run ``bench/latency.py`` with these options."""
    _run("latency.py", ["--tasks", str(tasks), "--payload-bytes", str(payload_bytes),
                        "--repeat", str(repeat)], as_json, f"latency: {tasks} round trips")


@bench.command("latency-floor", help="""The latency benchmark next to a forwarding-only
Python broker (no journal, no task table, no routing), with bare protocol endpoints and
with the SDK's: what any Python broker costs here, against what Orchestrator costs.""")
@click.option("--tasks", type=count(1), default=3000, show_default=True,
              help="Round trips measured per set-up (after a warm-up).")
@_common
def latency_floor(tasks: int, payload_bytes: int, repeat: int, as_json: bool) -> None:
    """Run ``bench/latency_floor.py`` with these options."""
    _run("latency_floor.py", ["--tasks", str(tasks), "--payload-bytes", str(payload_bytes),
                              "--repeat", str(repeat)], as_json,
         f"latency floor: 4 set-ups x {tasks} round trips")


@bench.command(help="""The cost of CURVE: the throughput and latency workloads on a
plaintext broker and on a --secure one (CURVE and ZAP on every socket), alternated in
pairs; reports the median throughput ratio (target 0.8) and p50/p99 of both.""")
@click.option("--pairs", type=count(1), default=5, show_default=True,
              help="Rounds of plaintext and CURVE.")
@click.option("--tasks", type=count(1), default=20_000, show_default=True,
              help="Throughput tasks per run.")
@click.option("--latency-tasks", type=count(1), default=5000, show_default=True,
              help="Sequential round trips per latency run.")
@click.option("--payload-bytes", type=count(1), default=100, show_default=True,
              help="Bytes of payload per task.")
@json_option("Print one JSON document.")
def secure(pairs: int, tasks: int, latency_tasks: int, payload_bytes: int,
           as_json: bool) -> None:
    """Run ``bench/secure.py`` with these options."""
    _run("secure.py", ["--pairs", str(pairs), "--tasks", str(tasks), "--latency-tasks",
                       str(latency_tasks), "--payload-bytes", str(payload_bytes)], as_json,
         f"CURVE against plaintext: {pairs} pair(s) of {tasks} tasks")
