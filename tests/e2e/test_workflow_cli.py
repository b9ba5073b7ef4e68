"""The workflow CLI end to end: ``start`` with its standing runner, ``workflow run`` of a
YAML file, ``status``/``list``/``approve``, Ctrl-C, and ``submit`` through the planner.

Every process is real: the broker, the runner and the agents are launched by the CLI's
own ``start`` in a temporary data dir (free ports), and each command runs the CLI in a
subprocess. Waits are on a process's output or on a watch of the run record, never a
sleep.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent_sdk import Client
from cli.processes import start_time
from tests.conftest import ROOT
from tests.workflows.support import run, wait_status
from workflows.runs import RunRecord, RunStatus

CLI_TIMEOUT_S = 60
AGENTS = "tests.workflows.agents:Alpha,tests.workflows.agents:Beta"

TWO_STEPS = """\
workflow: two
steps:
  - capability: alpha
  - capability: beta
"""
GATED = """\
workflow: gated
steps:
  - capability: alpha
  - kind: approval
    name: sign-off
    prompt: Ship it?
  - capability: beta
"""
BAD = """\
workflow: bad
steps:
  - capability: alpha
  - kind: fan_out
"""


def cli_env(home: Path) -> dict[str, str]:
    env = {**os.environ, "ORCH_HOME": str(home), "PYTHONPATH": str(ROOT)}
    env.pop("ORCH_BROKER", None)
    return env


def orchestrator(home: Path, *args: str, stdin: str | None = None
                 ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli", *args], cwd=ROOT, env=cli_env(home),
                          capture_output=True, text=True, timeout=CLI_TIMEOUT_S, input=stdin)


def spawn(home: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "cli", *args], cwd=ROOT, env=cli_env(home),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def as_json(proc: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(proc.stdout)


def submitted_id(proc: subprocess.Popen[str]) -> str:
    """The run id a following `workflow run` says first on stderr."""
    assert proc.stderr is not None
    line = proc.stderr.readline()
    assert line.startswith("run ") and "submitted" in line, line
    return line.split()[1]


def wait_for(url: str, run_id: str, status: RunStatus) -> RunRecord:
    """The run's record once it has ``status`` (a watch on the record)."""
    async def watch() -> RunRecord:
        client = Client(url)
        await client.connect()
        try:
            return await wait_status(client, run_id, status)
        finally:
            await client.close()

    return run(watch())


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str, Path]]:
    """A broker, its runner and the agents alpha and beta, started by the CLI; yields the
    data dir, the broker URL and a directory for workflow files."""
    base = tmp_path_factory.mktemp("workflow-cli")
    home = base / "home"
    started = orchestrator(home, "start", "--bind", "127.0.0.1:0", "--agents", AGENTS,
                           "--json")
    assert started.returncode == 0, started.stderr
    files = base / "files"
    files.mkdir()
    for name, text in (("two.yaml", TWO_STEPS), ("gated.yaml", GATED), ("bad.yaml", BAD)):
        (files / name).write_text(text)
    try:
        yield home, as_json(started)["endpoint"], files
    finally:
        orchestrator(home, "stop")


def test_start_launches_the_runner_status_shows_it_and_stop_stops_it(tmp_path: Path) -> None:
    home = tmp_path / "home"
    started = orchestrator(home, "start", "--bind", "127.0.0.1:0", "--no-agents", "--json")
    try:
        assert started.returncode == 0, started.stderr
        runner = as_json(started)["runner"]
        assert runner is not None and start_time(runner["pid"]) is not None
        status = orchestrator(home, "status", "--json")
        assert status.returncode == 0, status.stderr
        assert as_json(status)["runner"] == {"pid": runner["pid"], "running": True}
        assert "workflow runner" in orchestrator(home, "status").stdout
        # A run submitted now has a runner to drive it: no warning
        (tmp_path / "two.yaml").write_text(TWO_STEPS)
        queued = orchestrator(home, "workflow", "run", str(tmp_path / "two.yaml"), "--no-wait")
        assert queued.returncode == 0, queued.stderr
        assert "warning" not in queued.stderr, queued.stderr
    finally:
        stopped = orchestrator(home, "stop", "--json")
    assert stopped.returncode == 0, stopped.stderr
    assert as_json(stopped)["runner_stopped"] == runner["pid"]
    assert start_time(runner["pid"]) is None
    assert not (home / "runner.pid").exists()

    # --no-runner: no runner at all
    started = orchestrator(home, "start", "--bind", "127.0.0.1:0", "--no-runner", "--agents",
                           AGENTS, "--json")
    try:
        assert started.returncode == 0, started.stderr
        assert as_json(started)["runner"] is None
        assert as_json(orchestrator(home, "status", "--json"))["runner"] is None
        # A run submitted now waits for a runner, and the user is told so at once
        queued = orchestrator(home, "workflow", "run", str(tmp_path / "two.yaml"), "--no-wait")
        assert queued.returncode == 0, queued.stderr
        assert "warning: no workflow runner serves this broker" in queued.stderr, queued.stderr
        # `workflow resume` with no runner anywhere drives the run itself, to its end
        resumed = orchestrator(home, "workflow", "resume", queued.stdout.strip(), "--json")
        assert resumed.returncode == 0, resumed.stderr
        assert "driving run" in resumed.stderr
        assert as_json(resumed)["status"] == "succeeded"
        assert as_json(resumed)["output"]["data"][-2:] == ["alpha", "beta"]
    finally:
        assert orchestrator(home, "stop").returncode == 0


def test_workflow_run_prints_the_output_and_status_and_list_find_the_run(
        cluster: tuple[Path, str, Path]) -> None:
    home, _, files = cluster
    done = orchestrator(home, "workflow", "run", str(files / "two.yaml"), "--input", '["x"]')
    assert done.returncode == 0, done.stderr
    assert done.stderr.startswith("run ") and "Traceback" not in done.stderr
    assert json.loads(done.stdout) == ["x", "alpha", "beta"]

    # --json: exactly one JSON document, the input read from stdin
    as_doc = orchestrator(home, "workflow", "run", str(files / "two.yaml"), "--input", "-",
                          "--json", stdin='["y"]')
    assert as_doc.returncode == 0, as_doc.stderr
    document = as_json(as_doc)
    assert document["status"] == "succeeded"
    assert document["output"]["data"] == ["y", "alpha", "beta"]
    assert document["progress"] == {"done": 2, "total": 2}
    run_id = document["run_id"]

    status = orchestrator(home, "workflow", "status", run_id, "--json")
    assert status.returncode == 0, status.stderr
    assert as_json(status)["status"] == "succeeded" and as_json(status)["input"] == ["y"]
    text = orchestrator(home, "workflow", "status", run_id)
    assert text.returncode == 0 and f"run {run_id}" in text.stdout and "succeeded" in text.stdout

    listed = orchestrator(home, "workflow", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert {"run_id": run_id, "workflow": "two", "status": "succeeded"}.items() <= \
        next(r for r in as_json(listed) if r["run_id"] == run_id).items()
    assert run_id in orchestrator(home, "workflow", "list").stdout


def test_a_yaml_error_is_one_line_naming_the_line_and_exit_2(
        cluster: tuple[Path, str, Path]) -> None:
    home, _, files = cluster
    bad = orchestrator(home, "workflow", "run", str(files / "bad.yaml"))
    assert bad.returncode == 2
    assert one_line_error(bad).startswith(f"error: {files / 'bad.yaml'}:4: steps[1].kind: ")
    as_doc = orchestrator(home, "workflow", "run", str(files / "bad.yaml"), "--json")
    assert as_doc.returncode == 2 and as_json(as_doc)["line"] == 4
    missing = orchestrator(home, "workflow", "run", str(files / "missing.yaml"))
    assert missing.returncode == 2 and "cannot read" in one_line_error(missing)
    bad_input = orchestrator(home, "workflow", "run", str(files / "two.yaml"), "--input", "{x")
    assert bad_input.returncode == 2 and "not valid JSON" in one_line_error(bad_input)


def test_approve_continues_a_waiting_run_and_reject_ends_it(
        cluster: tuple[Path, str, Path]) -> None:
    home, url, files = cluster
    # Given a run waiting at its approval step, followed by `workflow run`
    follower = spawn(home, "workflow", "run", str(files / "gated.yaml"), "--input", '["z"]')
    try:
        run_id = submitted_id(follower)
        record = wait_for(url, run_id, RunStatus.WAITING_APPROVAL)
        assert [p.prompt for p in record.pending] == ["Ship it?"]
        waiting = orchestrator(home, "workflow", "status", run_id)
        assert "waiting for approval" in waiting.stdout
        # When it is approved, the run goes on and the follower prints its output
        approved = orchestrator(home, "workflow", "approve", run_id, "--comment", "ok",
                                "--json")
        assert approved.returncode == 0, approved.stderr
        assert as_json(approved)["approved"] is True
        out, err = follower.communicate(timeout=CLI_TIMEOUT_S)
    finally:
        if follower.poll() is None:
            follower.kill()
    assert follower.returncode == 0, err
    assert json.loads(out) == ["z", "alpha", "beta"]

    # When another one is rejected, it ends rejected with the comment: exit 1
    follower = spawn(home, "workflow", "run", str(files / "gated.yaml"), "--input", '["w"]')
    try:
        run_id = submitted_id(follower)
        wait_for(url, run_id, RunStatus.WAITING_APPROVAL)
        rejected = orchestrator(home, "workflow", "approve", run_id, "--reject", "--comment",
                                "not now")
        assert rejected.returncode == 0, rejected.stderr
        out, err = follower.communicate(timeout=CLI_TIMEOUT_S)
    finally:
        if follower.poll() is None:
            follower.kill()
    assert follower.returncode == 1 and out == ""
    assert "rejected" in err and "not now" in err and "Traceback" not in err
    status = orchestrator(home, "workflow", "status", run_id, "--json")
    assert as_json(status)["status"] == "rejected"
    # Answering again: exit 1, one line
    again = orchestrator(home, "workflow", "approve", run_id)
    assert again.returncode == 1 and "nothing to approve" in one_line_error(again)


def test_ctrl_c_leaves_the_run_going_and_says_how_to_find_it(
        cluster: tuple[Path, str, Path]) -> None:
    home, url, files = cluster
    follower = spawn(home, "workflow", "run", str(files / "gated.yaml"), "--input", '["c"]')
    try:
        run_id = submitted_id(follower)
        wait_for(url, run_id, RunStatus.WAITING_APPROVAL)
        follower.send_signal(signal.SIGINT)
        out, err = follower.communicate(timeout=CLI_TIMEOUT_S)
    finally:
        if follower.poll() is None:
            follower.kill()
    assert follower.returncode == 130 and out == ""
    assert f"workflow cancel {run_id}" in err and f"workflow resume {run_id}" in err
    assert "Traceback" not in err
    # The run goes on with no client alive: approved, the runner finishes it
    assert orchestrator(home, "workflow", "approve", run_id).returncode == 0
    waited = orchestrator(home, "workflow", "status", run_id, "--wait", "--json")
    assert waited.returncode == 0, waited.stderr
    assert as_json(waited)["output"]["data"] == ["c", "alpha", "beta"]


def test_cancel_resume_and_unknown_runs(cluster: tuple[Path, str, Path]) -> None:
    home, url, files = cluster
    submitted = orchestrator(home, "workflow", "run", str(files / "gated.yaml"), "--no-wait",
                             "--json")
    assert submitted.returncode == 0, submitted.stderr
    run_id = as_json(submitted)["run_id"]
    wait_for(url, run_id, RunStatus.WAITING_APPROVAL)
    resumed = orchestrator(home, "workflow", "resume", run_id, "--json")
    assert resumed.returncode == 0, resumed.stderr
    cancelled = orchestrator(home, "workflow", "cancel", run_id, "--json")
    assert cancelled.returncode == 0, cancelled.stderr
    assert as_json(cancelled)["status"] == "cancelled"
    assert orchestrator(home, "workflow", "status", run_id, "--wait").returncode == 1

    for command in ("status", "cancel", "resume", "approve"):
        unknown = orchestrator(home, "workflow", command, "no-such-run")
        assert unknown.returncode == 1, (command, unknown.stderr)
        assert "no workflow run 'no-such-run'" in one_line_error(unknown)
        as_doc = orchestrator(home, "workflow", command, "no-such-run", "--json")
        assert as_json(as_doc)["exit_code"] == 1


def test_submit_plan_names_the_steps_and_marks_what_is_missing(
        cluster: tuple[Path, str, Path], tmp_path: Path) -> None:
    home, _, _ = cluster
    for name in ("app.py", "db.py"):
        (tmp_path / name).write_text("import os\n\nos.system(input())\n")
    text = "Analyze this codebase for security issues"
    shown = orchestrator(home, "submit", "--plan", text, "--path", str(tmp_path))
    assert shown.returncode == 0, shown.stderr
    assert "capability security_audit" in shown.stdout
    assert "capability synthesis" in shown.stdout
    assert "missing: security_audit, synthesis" in shown.stdout
    planned = orchestrator(home, "submit", "--plan", text, "--path", str(tmp_path), "--json")
    assert planned.returncode == 0, planned.stderr
    document = as_json(planned)
    assert document["missing"] == ["security_audit", "synthesis"]
    assert {"security_audit", "synthesis"} <= set(document["capabilities"])
    assert "input" not in document and document["files"] == 2

    # Run, it says what is missing and waits for it up to the run's deadline
    ran = orchestrator(home, "submit", text, "--path", str(tmp_path), "--timeout", "0.5")
    assert ran.returncode == 1
    lines = ran.stderr.splitlines()
    assert lines[0].startswith("run ") and "security_audit" in lines[1]
    assert "up to its deadline (0.5 s)" in lines[1] and "deadline" in lines[-1]


def test_an_unplannable_text_exits_2_listing_what_agents_can_do(
        cluster: tuple[Path, str, Path]) -> None:
    home, _, _ = cluster
    refused = orchestrator(home, "submit", "frobnicate the quux")
    assert refused.returncode == 2
    line = one_line_error(refused)
    assert "cannot plan" in line and "alpha, beta" in line
    assert as_json(orchestrator(home, "submit", "frobnicate the quux", "--json"))[
        "exit_code"] == 2


def test_every_workflow_command_has_help_and_needs_a_broker(tmp_path: Path) -> None:
    home = tmp_path / "home"
    for command in ("run", "status", "list", "cancel", "resume", "approve"):
        shown = orchestrator(home, "workflow", command, "--help")
        assert shown.returncode == 0 and "Usage:" in shown.stdout, command
    assert orchestrator(home, "workflow", "--help").returncode == 0
    down = orchestrator(home, "--broker", "tcp://127.0.0.1:1", "workflow", "status", "r1",
                        "--json")
    assert down.returncode == 3 and as_json(down)["exit_code"] == 3
    assert "not answering" in one_line_error(down)


def test_submit_plan_works_without_a_broker_and_says_so(tmp_path: Path) -> None:
    # Given no broker at all, and a project
    home = tmp_path / "home"
    (tmp_path / "app.py").write_text("import os\n")
    text = "audit this project for vulnerabilities"
    # When the plan is asked for
    shown = orchestrator(home, "--broker", "tcp://127.0.0.1:1", "submit", "--plan", text,
                         "--path", str(tmp_path))
    # Then it is shown, with a note that the capabilities online were not checked
    assert shown.returncode == 0, shown.stderr
    assert "capability security_audit" in shown.stdout
    assert "no broker answers at tcp://127.0.0.1:1" in shown.stderr
    planned = orchestrator(home, "--broker", "tcp://127.0.0.1:1", "submit", "--plan", text,
                           "--path", str(tmp_path), "--json")
    assert planned.returncode == 0 and as_json(planned)["online_checked"] is False
    # And running it still needs the broker (exit 3)
    ran = orchestrator(home, "--broker", "tcp://127.0.0.1:1", "submit", text, "--path",
                       str(tmp_path))
    assert ran.returncode == 3, ran.stderr


def test_a_file_name_the_system_refuses_is_no_traceback(tmp_path: Path) -> None:
    home = tmp_path / "home"
    refused = orchestrator(home, "--broker", "tcp://127.0.0.1:1", "workflow", "run", "x" * 300)
    assert refused.returncode in (2, 3), refused.stderr
    one_line_error(refused)
