"""`submit`, `result` and `tasks` as a user meets them, with real processes: a task no
agent can take, Ctrl-C while waiting, open tasks in `tasks`, and the rough edges."""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.e2e.test_cli import as_json, orchestrator

LINE_TIMEOUT_S = 30.0


@pytest.fixture
def home(tmp_path: Path):  # type: ignore[no-untyped-def]
    home = tmp_path / "home"
    yield home
    orchestrator(home, "stop")


def start(home: Path, *agents: str) -> None:
    extra = ["--agents", ",".join(agents)] if agents else ["--no-agents"]
    started = orchestrator(home, "start", "--bind", "127.0.0.1:0", *extra)
    assert started.returncode == 0, started.stderr


def spawn(home: Path, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "ORCH_HOME": str(home), "PYTHONPATH": str(ROOT)}
    env.pop("ORCH_BROKER", None)
    return subprocess.Popen([sys.executable, "-m", "cli", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def read_line(stream: object, timeout: float = LINE_TIMEOUT_S) -> str:
    with selectors.DefaultSelector() as selector:
        selector.register(stream, selectors.EVENT_READ)  # type: ignore[arg-type]
        assert selector.select(timeout), "no line in time"
    return stream.readline()  # type: ignore[attr-defined, no-any-return]


def test_a_task_nobody_can_take_is_said_at_once_and_ctrl_c_says_how_to_cancel(
        home: Path) -> None:
    start(home)
    # (free text without --capability goes to the planner: this task names one)
    proc = spawn(home, "submit", "anything", "-c", "nobody-offers-this", "--id", "lonely")
    try:
        # The first line on stderr, at once: nobody offers it, it waits, how long, its id.
        line = read_line(proc.stderr)
        assert "no agent online offers capability 'nobody-offers-this'" in line, line
        assert "lonely" in line, line
        assert "up to 300 s" in line and "orchestrator cancel lonely" in line, line
        assert proc.poll() is None  # it waits
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=LINE_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode in (130, 1)
    assert "orchestrator cancel lonely" in err
    assert "Traceback" not in err and "destroyed" not in err and out == ""
    # The task is still there, pending, and listed as such.
    listed = as_json(orchestrator(home, "tasks", "--json"))
    assert [(t["task_id"], t["status"]) for t in listed] == [("lonely", "pending")]


def test_tasks_lists_pending_ones_and_a_pending_result_has_no_confidence(home: Path) -> None:
    start(home)
    for task_id in ("first", "second"):
        queued = orchestrator(home, "submit", "x", "-c", "nobody-has-this", "--no-wait",
                              "--id", task_id)
        assert queued.returncode == 0, queued.stderr
        assert "no agent online offers capability 'nobody-has-this'" in queued.stderr
    listed = as_json(orchestrator(home, "tasks", "--json"))
    assert [(t["task_id"], t["status"]) for t in listed] == [
        ("second", "pending"), ("first", "pending")]
    table = orchestrator(home, "tasks")
    assert "second" in table.stdout and "pending" in table.stdout
    assert as_json(orchestrator(home, "tasks", "--failed", "--json")) == []
    pending = as_json(orchestrator(home, "result", "first", "--json"))
    assert pending["status"] == "pending" and "confidence" not in pending

    # result --wait --timeout 2 gives up at about 2 s.
    began = time.monotonic()
    waited = orchestrator(home, "result", "first", "--wait", "--timeout", "2")
    elapsed = time.monotonic() - began
    assert waited.returncode == 1 and "no result for first yet" in waited.stderr
    assert 2.0 <= elapsed < 4.0, elapsed

    # A cancelled task says so once.
    assert orchestrator(home, "cancel", "first").returncode == 0
    cancelled = orchestrator(home, "result", "first")
    assert cancelled.returncode == 1
    assert cancelled.stderr.strip() == "first: cancelled: cancelled by request"


def test_submit_to_an_unknown_agent_talks_about_the_agent(home: Path) -> None:
    start(home)
    submitted = orchestrator(home, "submit", "x", "--agent", "nobody", "--timeout", "0.5",
                             "--json")
    assert submitted.returncode == 1
    assert "no agent named 'nobody' is online" in submitted.stderr
    error = as_json(submitted)["error"]
    assert error["code"] == "no_agent" and "agent name" in error["message"]
    assert "capabilit" not in submitted.stderr + error["message"]


def test_large_payloads_from_a_file_or_stdin_and_a_reused_id(home: Path,
                                                              tmp_path: Path) -> None:
    start(home, "tests.sample_agents:EchoAgent")
    data = {"blob": "x" * (200 * 1024)}
    path = tmp_path / "payload.json"
    path.write_text(json.dumps(data))
    from_file = orchestrator(home, "submit", "big", "-c", "echo", "--payload", f"@{path}",
                             "--json", "--id", "big-1")
    assert from_file.returncode == 0, from_file.stderr
    assert as_json(from_file)["data"] == data
    assert "no agent" not in from_file.stderr

    env = {**os.environ, "ORCH_HOME": str(home), "PYTHONPATH": str(ROOT)}
    env.pop("ORCH_BROKER", None)
    from_stdin = subprocess.run(
        [sys.executable, "-m", "cli", "submit", "big", "-c", "echo", "--payload", "-",
         "--json"], cwd=ROOT, env=env, input=json.dumps(data), capture_output=True,
        text=True, timeout=60)
    assert from_stdin.returncode == 0, from_stdin.stderr
    assert as_json(from_stdin)["data"] == data

    missing = orchestrator(home, "submit", "x", "--payload", f"@{tmp_path / 'nope.json'}")
    assert missing.returncode == 2 and "cannot read" in missing.stderr

    # The same --id again shows the first task's result, and says so.
    again = orchestrator(home, "submit", "other", "-c", "echo", "--id", "big-1", "--json")
    assert again.returncode == 0, again.stderr
    assert "task big-1 exists; showing its result" in again.stderr
    assert as_json(again)["data"] == data
