"""The CLI end to end on a fresh data dir: start, submit, status, result, stop."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from tests.conftest import ROOT

CLI_TIMEOUT_S = 60


def orchestrator(home: Path, *args: str, broker: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ORCH_HOME": str(home), "PYTHONPATH": str(ROOT)}
    env.pop("ORCH_BROKER", None)
    prefix = ["--broker", broker] if broker else []
    return subprocess.run([sys.executable, "-m", "cli", *prefix, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=CLI_TIMEOUT_S)


def as_json(proc: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(proc.stdout)


@pytest.fixture
def home(tmp_path: Path):  # type: ignore[no-untyped-def]
    home = tmp_path / "home"
    yield home
    # Whatever a test did, no broker or agent outlives it.
    orchestrator(home, "stop")


def test_start_submit_status_stop_on_a_fresh_data_dir(home: Path) -> None:
    # Given a fresh data dir, when the broker starts with two echo agents
    started = orchestrator(home, "start", "--bind", "127.0.0.1:0", "--json",
                           "--agents", "tests.sample_agents:EchoAgent=2")
    assert started.returncode == 0, started.stderr
    info = as_json(started)
    assert info["status"] == "started" and len(info["agents"]) == 2
    assert (home / "broker.pid").exists() and (home / "broker.log").exists()

    # Then status --json lists both agents
    status = orchestrator(home, "status", "--json")
    assert status.returncode == 0, status.stderr
    document = as_json(status)
    assert {a["id"] for a in document["agents"]} == set(info["agents"])
    assert document["broker"]["state"] == "running"

    # When a task is submitted with --json, its result is one JSON document
    submitted = orchestrator(home, "submit", "review this", "--capability", "echo",
                             "--payload", '{"x": [1, 2]}', "--json")
    assert submitted.returncode == 0, submitted.stderr
    result = as_json(submitted)
    assert result["status"] == "succeeded"
    assert result["data"] == {"x": [1, 2]}
    assert result["agent"] == "echo"

    # And `result ID` finds it again
    again = orchestrator(home, "result", result["task_id"], "--json")
    assert again.returncode == 0 and as_json(again)["data"] == {"x": [1, 2]}

    # And the status counts it
    assert as_json(orchestrator(home, "status", "--json"))["tasks"]["succeeded"] >= 1

    # When stopped, the broker is gone and a second stop says so with exit 3
    stopped = orchestrator(home, "stop", "--json")
    assert stopped.returncode == 0, stopped.stderr
    assert as_json(stopped)["graceful"] is True
    assert not (home / "broker.pid").exists()
    assert orchestrator(home, "stop").returncode == 3


def test_no_wait_then_result(home: Path) -> None:
    orchestrator(home, "start", "--bind", "127.0.0.1:0", "--agents",
                 "tests.sample_agents:EchoAgent")
    accepted = orchestrator(home, "submit", "later", "-c", "echo", "--no-wait", "--json",
                            "--id", "task-42")
    assert accepted.returncode == 0, accepted.stderr
    # (a task this quick may have finished before the broker confirmed it)
    assert as_json(accepted)["task_id"] == "task-42"
    assert as_json(accepted)["status"] in ("accepted", "succeeded")
    waited = orchestrator(home, "result", "task-42", "--wait", "--timeout", "20", "--json")
    assert waited.returncode == 0, waited.stderr
    assert as_json(waited)["data"] == {"text": "later"}


def test_failures_have_meaningful_exit_codes(home: Path) -> None:
    # A broker that is not running: one line on stderr, exit 3, no traceback.
    down = orchestrator(home, "status", broker="tcp://127.0.0.1:1")
    assert down.returncode == 3
    assert "Traceback" not in down.stderr and "not answering" in down.stderr
    assert orchestrator(home, "submit", "x", broker="tcp://127.0.0.1:1").returncode == 3

    orchestrator(home, "start", "--bind", "127.0.0.1:0", "--no-agents")
    # A task nobody can run fails with no_agent after its timeout: exit 1.
    failed = orchestrator(home, "submit", "x", "-c", "nobody-has-this", "--timeout", "0.3",
                          "--json")
    assert failed.returncode == 1
    assert as_json(failed)["error"]["code"] == "no_agent"
    # An unknown task id: exit 1.
    assert orchestrator(home, "result", "no-such-task").returncode == 1
    # Usage errors: exit 2.
    assert orchestrator(home, "submit", "x", "--payload", "{not json").returncode == 2
    assert orchestrator(home, "submit").returncode == 2


def test_every_command_has_help(home: Path) -> None:
    for command in ("start", "stop", "status", "submit", "result", "cancel"):
        shown = orchestrator(home, command, "--help")
        assert shown.returncode == 0 and "Usage:" in shown.stdout, command


def test_a_mistyped_command_names_the_nearest_one(home: Path) -> None:
    # In the top-level group (its commands are imported on use) and in a subgroup
    for args, near in ((("sumbit", "hello"), "submit"), (("agents", "scal"), "scale")):
        typo = orchestrator(home, *args, "--json")
        assert typo.returncode == 2, typo.stderr
        assert f"Did you mean {near!r}?" in json.loads(typo.stdout)["error"], typo.stdout
    # Nothing near: no guess
    assert "Did you mean" not in orchestrator(home, "xyzzy").stderr


def test_a_command_imports_only_what_it_needs() -> None:
    # `logs --help` loads neither the SDK, the node supervisor nor the benchmarks
    probe = ("import sys\nfrom cli.main import main\n"
             "try:\n    main(['logs', '--help'], standalone_mode=False)\n"
             "finally:\n    print(sorted(m for m in ('agent_sdk', 'nodes.supervisor', "
             "'cli.bench', 'cli.agents', 'workflows') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                          text=True, timeout=CLI_TIMEOUT_S,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout


def test_bench_commands_print_the_scripts_json(home: Path) -> None:
    latency = orchestrator(home, "bench", "latency", "--tasks", "20", "--json")
    assert latency.returncode == 0, latency.stderr
    report = as_json(latency)
    assert report["tasks"] == 20 and report["p50_us"] > 0 and report["baseline_p50_us"] > 0
    throughput = orchestrator(home, "bench", "throughput", "--tasks", "300", "--agents", "1",
                              "--window", "20", "--json")
    assert throughput.returncode == 0, throughput.stderr
    report = as_json(throughput)
    assert report["tasks"] == 300 and report["tasks_per_s"] > 0 and report["ratio"] > 0


def test_bench_without_the_scripts_says_where_they_are(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import cli.bench
    from cli.main import main

    monkeypatch.setattr(cli.bench, "BENCH_DIR", tmp_path / "bench")
    outcome = CliRunner().invoke(main, ["bench", "latency", "--json"])
    assert outcome.exit_code == 2
    assert "ship with the source checkout" in outcome.output
