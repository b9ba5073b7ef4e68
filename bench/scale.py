"""Agent pools: the standard throughput workload with 2, 4 and 8 echo replicas run by a
node supervisor, and the time a scale-up takes to reach the new replicas.

``python bench/scale.py --tasks 50000 --window 500 --runs 3 --json``

A real broker (``python -m broker``, durability ``batch`` as the standard workload) and a
node supervisor started through the real CLI: ``python -m cli --home NODE_HOME --broker
URL agents start tests.sample_agents:EchoAgent --replicas 2`` (its replicas run with
``AGENT_MAX`` = ``--agent-concurrency``, as the standard workload's agents run with
``--max-concurrent``). Per run, alternating: for N in 2, 4, 8, ``agents scale --replicas N
--wait`` and the throughput workload of ``bench/throughput.py`` (its own client code);
then, with 2 replicas under load, ``agents scale --replicas 8 --no-wait`` and the time
until each new replica has done a task (the broker's status, polled). Medians over runs.

Targets: 8 replicas keep >= 0.8 of the 2-replica throughput (no collapse on 2 cores);
the tasks of the 8-replica measurement are spread within 20% of even (the largest
deviation of a replica's count from the mean, as a fraction of the mean); scale-to-work
p50 under 5 s. ``--smoke`` runs a few hundred tasks once (CI): its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Self

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson

from agent_sdk import SyncClient
from agent_sdk.loop import loop_name
from bench._harness import (
    ROOT,
    _python,
    _read_json_line,
    _stop,
    median,
    percentile,
    zmq_version,
)
from bench.throughput import measure_ours
from cli.processes import ProcessRef, children_of, kill_supervisor

ECHO = "tests.sample_agents:EchoAgent"
NAME = "echo"
#: Deadlines: a CLI command, replicas reaching a count, the new replicas taking work.
CLI_TIMEOUT_S = 120.0
SETTLE_TIMEOUT_S = 60.0
WORK_TIMEOUT_S = 60.0
POLL_S = 0.05
#: Tasks per chunk of the background load during a scale-up.
LOAD_CHUNK = 2000
TARGET_RATIO = 0.8
TARGET_SPREAD = 0.2
TARGET_SCALE_P50_S = 5.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
ROLES = ("broker", "agents", "client", "supervisor")


def _cpu_s(pid: int) -> float:
    """CPU seconds (user and system) of process ``pid`` so far; 0 when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


class Pool:
    """The broker, the node supervisor and the CLI that drives it."""

    def __init__(self, home: Path, durability: str, agent_concurrency: int) -> None:
        self.home = home
        self.node_home = home / "node-home"
        self.node_home.mkdir(mode=0o700)
        self.broker = _python("-m", "broker", "--bind", "127.0.0.1:0", "--data-dir",
                              str(home / "broker"), "--log-level", "WARNING",
                              "--durability", durability)
        try:
            self.url: str = _read_json_line(self.broker)["endpoint"]
        except BaseException:
            _stop([self.broker])
            raise
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("ORCH_CURVE_")
               and k not in ("ECHO_DELAY_S", "EXEC_LOG", "AGENT_NAME", "AGENT_CAPS")}
        env.update({"PYTHONPATH": str(ROOT), "AGENT_MAX": str(agent_concurrency)})
        self.env = env
        self.client = SyncClient(self.url)
        self.seen: dict[str, int] = {}

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``python -m cli --home NODE_HOME --broker URL agents ARGS``; exit 0 or raise."""
        proc = subprocess.run(
            [sys.executable, "-m", "cli", "--home", str(self.node_home), "--broker",
             self.url, "agents", *args], check=False, cwd=ROOT, env=self.env,
            capture_output=True, text=True, timeout=CLI_TIMEOUT_S)
        if proc.returncode != 0:
            raise RuntimeError(f"agents {' '.join(args)} exited {proc.returncode}: "
                               f"{proc.stdout}{proc.stderr}")
        return proc

    def echo_agents(self) -> list[dict[str, Any]]:
        return [a for a in self.client.status()["agents"] if a["name"] == NAME]

    def ready(self) -> dict[str, int]:
        """Ready echo agents: id -> tasks done, oldest first (in the order this
        benchmark first saw them ready)."""
        found = {a["id"]: int(a["done"]) for a in self.echo_agents() if a["state"] == "ready"}
        for agent_id in found:
            self.seen.setdefault(agent_id, len(self.seen))
        return dict(sorted(found.items(), key=lambda item: self.seen[item[0]]))

    def settle(self, replicas: int) -> None:
        """Wait until exactly ``replicas`` echo agents are ready and none drains."""
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while True:
            agents = self.echo_agents()
            ready = sum(a["state"] == "ready" for a in agents)
            draining = sum(a["state"] == "draining" for a in agents)
            if ready == replicas and not draining:
                return
            if time.monotonic() >= deadline:
                raise RuntimeError(f"{ready} ready and {draining} draining echo agents "
                                   f"after {SETTLE_TIMEOUT_S:g} s, {replicas} wanted")
            time.sleep(POLL_S)

    def scale(self, replicas: int) -> None:
        self.cli("scale", ECHO, "--replicas", str(replicas), "--wait", "--json")
        self.settle(replicas)

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far of the broker, the replicas (together), this process (the
        client) and the supervisor."""
        try:
            ref = ProcessRef.parse((self.node_home / "node.pid").read_text())
        except OSError:
            ref = None
        replicas = children_of(ref.pid) if ref is not None else []
        times = os.times()
        return {"broker": _cpu_s(self.broker.pid),
                "agents": sum(_cpu_s(pid) for pid in replicas),
                "client": times.user + times.system,
                "supervisor": _cpu_s(ref.pid) if ref is not None else 0.0}

    def close(self) -> None:
        try:
            self.client.close()
        finally:
            kill_supervisor(self.node_home)
            _stop([self.broker])


class Load:
    """The throughput workload's client, chunk after chunk in a thread, until stopped."""

    def __init__(self, url: str, window: int, payload: bytes) -> None:
        self.url, self.window, self.payload = url, window, payload
        self.rates: list[float] = []
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self.rates.append(measure_ours(self.url, LOAD_CHUNK, self.window,
                                               self.payload))
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            self.error = e

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(120)


def spread_of(before: dict[str, int], after: dict[str, int]) -> tuple[float, list[int]]:
    """The largest deviation of a replica's task count from the mean, as a fraction of
    the mean, over the replicas ready at the end; and the counts (in ``after``'s order)."""
    counts = [done - before.get(agent_id, 0) for agent_id, done in after.items()]
    mean = sum(counts) / len(counts)
    if mean <= 0:
        return float("nan"), counts
    return max(abs(c - mean) for c in counts) / mean, counts


def scale_to_work(pool: Pool, low: int, high: int, window: int,
                  payload: bytes) -> tuple[list[float], int]:
    """With ``low`` replicas under load, ``agents scale --replicas high --no-wait``; the
    seconds until each new replica had done a task, and how many never did (before the
    deadline)."""
    pool.scale(low)
    old = set(pool.ready())
    with Load(pool.url, window, payload) as load:
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while not load.rates and load.error is None and time.monotonic() < deadline:
            time.sleep(POLL_S)  # the load runs: its first chunk is through
        started = time.monotonic()
        pool.cli("scale", ECHO, "--replicas", str(high), "--no-wait", "--json")
        took: dict[str, float] = {}
        deadline = started + WORK_TIMEOUT_S
        while len(took) < high - low and time.monotonic() < deadline:
            if load.error is not None:
                raise RuntimeError(f"the load failed: {load.error!r}") from load.error
            now = time.monotonic()
            for agent_id, done in pool.ready().items():
                if agent_id not in old and agent_id not in took and done >= 1:
                    took[agent_id] = now - started
            time.sleep(POLL_S)
    if load.error is not None:
        raise RuntimeError(f"the load failed: {load.error!r}") from load.error
    return sorted(took.values()), high - low - len(took)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=50_000,
                        help="tasks per throughput measurement")
    parser.add_argument("--window", type=int, default=500)
    parser.add_argument("--payload-bytes", type=int, default=100)
    parser.add_argument("--agent-concurrency", type=int, default=256,
                        help="max_concurrent of each echo replica (AGENT_MAX)")
    parser.add_argument("--durability", default="batch", help="the broker's journal mode")
    parser.add_argument("--runs", type=int, default=3,
                        help="alternating runs of 2, 4, 8 replicas and a scale-up")
    parser.add_argument("--smoke", action="store_true",
                        help="a few hundred tasks, one run (CI; the numbers mean nothing)")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args(argv)
    if args.smoke:
        args.tasks, args.window, args.runs = 300, 100, 1
    counts = (2, 4, 8)
    low, high = counts[0], counts[-1]
    payload = b"x" * args.payload_bytes
    rates: dict[int, list[float]] = {n: [] for n in counts}
    cpu: dict[int, dict[str, list[float]]] = {n: {r: [] for r in ROLES} for n in counts}
    spreads: list[float] = []
    per_replica: list[list[int]] = []
    scale_times: list[list[float]] = []
    missed = 0
    with tempfile.TemporaryDirectory(prefix="orch-bench-scale-") as tmp:
        pool = Pool(Path(tmp), args.durability, args.agent_concurrency)
        try:
            pool.cli("start", ECHO, "--replicas", str(low), "--json")
            pool.settle(low)
            for _ in range(args.runs):
                for n in counts:
                    pool.scale(n)
                    before = pool.ready()
                    cpu_before = pool.cpu()
                    rates[n].append(measure_ours(pool.url, args.tasks, args.window, payload))
                    cpu_after = pool.cpu()
                    for role in ROLES:
                        cpu[n][role].append((cpu_after[role] - cpu_before[role])
                                            / args.tasks * 1e6)
                    if n == high:
                        spread, done = spread_of(before, pool.ready())
                        spreads.append(spread)
                        per_replica.append(done)
                times, lost = scale_to_work(pool, low, high, args.window, payload)
                scale_times.append(times)
                missed += lost
        finally:
            pool.close()
    all_times = sorted(t for run in scale_times for t in run)
    by_replicas = {str(n): round(median(values)) for n, values in rates.items()}
    ratio = median(rates[high]) / median(rates[low])
    spread = median(spreads)
    # a replica that never took work counts as the deadline
    p50 = percentile(sorted(all_times + [WORK_TIMEOUT_S] * missed), 0.5)
    worst = WORK_TIMEOUT_S if missed else max(all_times)
    report = {
        "tasks": args.tasks, "window": args.window, "payload_bytes": args.payload_bytes,
        "agent_concurrency": args.agent_concurrency, "durability": args.durability,
        "runs_count": args.runs, "replicas": list(counts), "loop": loop_name(),
        "zmq": zmq_version(), "cpus": os.cpu_count(),
        "throughput_by_replicas": by_replicas,
        f"ratio_{high}_to_{low}": round(ratio, 3),
        "spread": round(spread, 3),
        "spread_max": round(max(spreads), 3),
        "scale_to_work_p50_s": round(p50, 3),
        "scale_to_work_max_s": round(worst, 3),
        "scale_to_work_missed": missed,
        # CPU per task by process (us, medians over runs): where the 2 cores went
        "cpu_us_per_task": {str(n): {role: round(median(values), 1)
                                     for role, values in by_role.items()}
                            for n, by_role in cpu.items()},
        "pass": {
            f"ratio_{high}_to_{low}": ratio >= TARGET_RATIO,
            "spread": spread <= TARGET_SPREAD,
            "scale_to_work_p50_s": missed == 0 and p50 < TARGET_SCALE_P50_S,
        },
        "targets": {f"ratio_{high}_to_{low}": TARGET_RATIO, "spread": TARGET_SPREAD,
                    "scale_to_work_p50_s": TARGET_SCALE_P50_S},
        "runs": {
            "throughput": {str(n): [round(v) for v in values] for n, values in rates.items()},
            "spread": [round(s, 3) for s in spreads],
            # oldest replica first
            f"tasks_per_replica_at_{high}": per_replica,
            "scale_to_work_s": [[round(t, 3) for t in run] for run in scale_times],
        },
    }
    if args.json:
        print(orjson.dumps(report).decode())
    else:
        ok = {True: "met", False: "NOT met"}
        for n in counts:
            us = report["cpu_us_per_task"][str(n)]
            print(f"{n} replicas: {by_replicas[str(n)]:>9,} tasks/s  "
                  f"(runs {', '.join(f'{v:,.0f}' for v in rates[n])}; CPU us/task "
                  f"{', '.join(f'{role} {us[role]:g}' for role in ROLES)})")
        print(f"ratio {high}/{low}:    {ratio:.3f}  (target >= {TARGET_RATIO}: "
              f"{ok[report['pass'][f'ratio_{high}_to_{low}']]})")
        print(f"spread at {high}:   {spread:.3f}  (target <= {TARGET_SPREAD}: "
              f"{ok[report['pass']['spread']]}; per run {report['runs']['spread']})")
        print(f"scale {low}->{high} to work: p50 {p50:.2f} s, max {worst:.2f} s"
              f"{f', {missed} never' if missed else ''}  (target p50 < "
              f"{TARGET_SCALE_P50_S:g} s: {ok[report['pass']['scale_to_work_p50_s']]})")
        print(f"({args.tasks} tasks, window {args.window}, {args.payload_bytes}-byte payload, "
              f"{args.runs} run(s), {report['loop']}, durability {args.durability}, "
              f"{os.cpu_count()} CPUs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
