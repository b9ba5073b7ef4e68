"""The latency and workflow benchmarks run end to end and print what the benchmark
contract says (a few round trips each: their numbers are for bench runs, not for tests)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
RUN_S = 120.0


def run_bench(script: str, *args: str) -> dict[str, Any]:
    # A session of its own, so that a timeout takes the script's broker and agents too.
    proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / script), *args, "--json"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=RUN_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"{script} did not finish within {RUN_S} s")
    assert proc.returncode == 0, err.decode()
    report: dict[str, Any] = orjson.loads(out)
    return report


def test_latency_reports_ours_and_the_baseline() -> None:
    report = run_bench("latency.py", "--tasks", "20")
    for key in ("p50_us", "p99_us", "baseline_p50_us", "baseline_p99_us", "p50_ratio"):
        assert report[key] > 0, key


def test_latency_floor_reports_every_setup_against_the_baseline() -> None:
    report = run_bench("latency_floor.py", "--tasks", "20")
    for setup in ("baseline", "forwarder", "forwarder_sdk", "orchestrator"):
        assert report[f"{setup}_p50_us"] > 0, setup
    assert report["baseline_ratio"] == 1.0


def test_workflows_reports_the_workflow_and_the_direct_side() -> None:
    report = run_bench("workflows.py", "--items", "200", "--rounds", "1")
    assert report["items"] == 200
    for key in ("workflow_tasks_per_s", "direct_tasks_per_s", "ratio"):
        assert report[key] > 0, key
    assert len(report["runs"]["ratio"]) == 1


def test_audit_reports_ours_against_bandit_on_the_same_files() -> None:
    # The smoke run of bench/audit.py: the reviewer's planted fixture, whose bandit
    # findings are known to be there
    path = ROOT / "tests" / "agents" / "fixtures" / "planted"
    report = run_bench("audit.py", "--path", str(path),
                       "--agents", "reviewer=2,researcher=0,coder=0")
    assert report["files"] >= 20 and report["tasks"] >= 1 and report["agents"] == 3
    for key in ("ours_s", "bandit_s", "ratio"):
        assert report[key] > 0, key
    assert report["findings"] > 10 and report["same_findings"] is True, report


def test_observability_reports_each_mode_against_its_reference() -> None:
    report = run_bench("observability.py", "--pairs", "1", "--tasks", "300")
    assert set(report["tasks_per_s"]) == {"metrics_off", "metrics_on", "tracing_default",
                                          "tracing_full"}
    for name in ("metrics_on_vs_metrics_off", "tracing_default_vs_metrics_on",
                 "tracing_full_vs_metrics_on"):
        found = report["ratios"][name]
        assert found["ratio"] > 0 and len(found["pairs"]) == 1, name
        assert found["min"] <= found["ratio"] <= found["max"]
    assert report["default_sample_ratio"] == 0.001


def test_secure_reports_curve_beside_plaintext() -> None:
    # The smoke run of bench/secure.py: one pair, a few tasks (its numbers mean nothing)
    report = run_bench("secure.py", "--pairs", "1", "--tasks", "200", "--latency-tasks", "20")
    assert report["pairs"] == 1
    for key in ("throughput_plain", "throughput_curve", "throughput_ratio",
                "latency_p50_plain_us", "latency_p50_curve_us", "latency_p99_plain_us",
                "latency_p99_curve_us"):
        assert report[key] > 0, key
    assert report["throughput_ratio_min"] <= report["throughput_ratio"] \
        <= report["throughput_ratio_max"]
    assert len(report["runs"]["throughput_ratios"]) == 1


def test_scale_reports_throughput_by_replicas_spread_and_scale_to_work() -> None:
    # The smoke run of bench/scale.py: a broker, a node supervisor started by `agents
    # start`, 2, 4 and 8 echo replicas, one scale-up from 2 to 8 (its numbers mean nothing)
    report = run_bench("scale.py", "--smoke")
    assert set(report["throughput_by_replicas"]) == {"2", "4", "8"}
    for rate in report["throughput_by_replicas"].values():
        assert isinstance(rate, int | float) and rate > 0
    for key in ("ratio_8_to_2", "spread", "scale_to_work_p50_s", "scale_to_work_max_s"):
        assert isinstance(report[key], int | float) and report[key] >= 0, key
    assert report["scale_to_work_p50_s"] <= report["scale_to_work_max_s"]
    assert set(report["pass"]) == {"ratio_8_to_2", "spread", "scale_to_work_p50_s"}
    assert all(isinstance(met, bool) for met in report["pass"].values())
    assert len(report["runs"]["scale_to_work_s"]) == 1
