"""``orchestrator trace`` end to end: a task retried after its agent was SIGKILLed shows
both attempts and both agents; a workflow run shows its steps and their tasks; an
unknown id exits 1 and an unreachable broker 3, each with one line.

Every process is real (broker, agents, runner, the CLI in a subprocess). Waits are on
the broker's status or a task's result, with deadlines; never a sleep.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.conftest import ROOT, Cluster
from tests.support import agents_by_name, wait_finished, wait_status

CLI_TIMEOUT_S = 60
FAULT_AGENT = "tests.e2e.faults.agents:CountingAgent"
WORKFLOW_AGENTS = "tests.workflows.agents:Alpha,tests.workflows.agents:Beta"
THREE_STEPS = """\
workflow: three
steps:
  - capability: alpha
  - capability: beta
  - capability: alpha
"""


def orchestrator(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ORCH_HOME": str(home), "PYTHONPATH": str(ROOT)}
    env.pop("ORCH_BROKER", None)
    return subprocess.run([sys.executable, "-m", "cli", *args], check=False, cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=CLI_TIMEOUT_S)


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_trace_of_a_task_retried_after_an_agent_sigkill_shows_both_attempts(
        cluster: Cluster, tmp_path: Path) -> None:
    # Given a task running on an agent that would hold it for a minute
    broker = cluster.broker()
    victim = cluster.agent(broker.url, FAULT_AGENT, agent_name="victim", echo_delay_s="60")
    client = cluster.client(broker.url)
    client.submit(capabilities=["echo"], data="x", task_id="traced", timeout=30)
    status = wait_status(client, lambda s: s["tasks"]["running"] == 1,
                         what="the victim runs the task")
    victim_id = agents_by_name(status)["victim"]["id"]
    # And a second agent that can take it
    cluster.agent(broker.url, FAULT_AGENT, agent_name="healthy", echo_delay_s="0")
    healthy_id = agents_by_name(wait_status(
        client, lambda s: "healthy" in agents_by_name(s), what="healthy registered"))["healthy"]["id"]
    # When the victim is SIGKILLed mid-task, and the task succeeds on the other agent
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=10)
    finished = wait_finished(client, "traced", timeout=30)
    assert finished.ok and finished.attempts == 2, finished

    # Then the JSON trace is the broker's task document with both attempts read from it
    home = tmp_path / "home"
    as_json = orchestrator(home, "--broker", broker.url, "trace", "traced", "--json")
    assert as_json.returncode == 0, as_json.stderr
    document: dict[str, Any] = json.loads(as_json.stdout)
    assert document["kind"] == "task" and document["task_id"] == "traced"
    assert document["status"] == "succeeded" and document["attempts"] == 2
    first, second = document["attempt_details"]
    assert (first["attempt"], first["agent"], first["outcome"]) == (1, victim_id, "lost")
    # The broker sees the closed connection or the attempt's lease expire first: either
    # reason names the victim.
    assert victim_id in first["reason"], first
    assert first["run_s"] >= 0 and first["queued_s"] >= 0
    assert (second["attempt"], second["outcome"]) == (2, "succeeded")
    # The broker names the last attempt's agent by id, or (older brokers) by name only
    assert second["agent"] == healthy_id or second["agent_name"] == "healthy", second
    events = [e["event"] for e in document["timeline"]]
    assert events[0] == "submitted" and events[-1] == "succeeded"
    assert events.count("dispatched") == 2 and "requeued" in events

    # And the human output shows each attempt, its agent and why the first one ended
    text = orchestrator(home, "--broker", broker.url, "trace", "traced")
    assert text.returncode == 0, text.stderr
    out = text.stdout
    assert out.startswith("task traced  succeeded"), out
    assert "+0.000 s  submitted" in out
    assert f"attempt 1 on {victim_id}: lost (" in out and "requeued" in out
    assert f"attempt 2 on {healthy_id}: succeeded" in out or \
        "attempt 2 on an agent named healthy: succeeded" in out, out
    assert "result: succeeded after 2 attempts" in out


def test_trace_of_a_workflow_run_shows_its_steps_and_their_tasks(tmp_path: Path) -> None:
    # Given a broker with its runner and agents, and a 3-step run that succeeded
    home = tmp_path / "home"
    started = orchestrator(home, "start", "--bind", "127.0.0.1:0", "--agents",
                           WORKFLOW_AGENTS, "--json")
    assert started.returncode == 0, started.stderr
    try:
        (tmp_path / "three.yaml").write_text(THREE_STEPS)
        done = orchestrator(home, "workflow", "run", str(tmp_path / "three.yaml"), "--json")
        assert done.returncode == 0, done.stderr
        run_id = json.loads(done.stdout)["run_id"]

        # When it is traced as JSON
        as_json = orchestrator(home, "trace", run_id, "--json")
        assert as_json.returncode == 0, as_json.stderr
        document = json.loads(as_json.stdout)
        # Then it is the run's timeline, with every step and its task's trace
        assert (document["kind"], document["run_id"], document["status"]) == \
            ("run", run_id, "succeeded")
        steps = document["steps"]
        assert len(steps) == 3 and all(s["status"] == "succeeded" for s in steps), steps
        for step in steps:
            task = step["task"]
            assert task is not None and task["task_id"] == step["task_id"], step
            assert task["status"] == "succeeded" and len(task["attempt_details"]) == 1
            assert step["duration_s"] is not None and step["duration_s"] >= 0
        events = [e["event"] for e in document["timeline"]]
        assert events[0] == "submitted" and events[-1] == "finished", events
        assert events.count("step_started") == 3 and events.count("step_ended") == 3
        assert [e["offset_s"] for e in document["timeline"]] == \
            sorted(e["offset_s"] for e in document["timeline"])

        # And the human output lists the steps with their tasks' timelines
        text = orchestrator(home, "trace", run_id)
        assert text.returncode == 0, text.stderr
        assert text.stdout.startswith(f"run {run_id}  workflow three  succeeded"), text.stdout
        for step in steps:
            assert f"task {step['task_id']}  succeeded" in text.stdout
        assert text.stdout.count("step_started") == 3 and "result: succeeded" in text.stdout
    finally:
        assert orchestrator(home, "stop").returncode == 0


def test_trace_of_an_unknown_id_exits_1_and_of_an_unreachable_broker_3(
        cluster: Cluster, tmp_path: Path) -> None:
    broker = cluster.broker()
    home = tmp_path / "home"
    for args in (("nobody-has-this",), ("nobody-has-this", "--json"), ("not/a-run-id",)):
        missing = orchestrator(home, "--broker", broker.url, "trace", *args)
        assert missing.returncode == 1, missing
        assert "no task with id" in one_line_error(missing)
    # A port nobody listens on: the broker does not answer
    unreachable = orchestrator(home, "--broker", "tcp://127.0.0.1:9", "trace", "anything")
    assert unreachable.returncode == 3, unreachable
    one_line_error(unreachable)


def test_attempts_and_notes_are_read_from_the_timeline() -> None:
    # A pure reading of a broker timeline (wire.timeline), with the printed notes.
    from cli.trace_view import attempts_of

    document = {"agent": "healthy", "error": None, "timeline": [
        {"at": 1.0, "event": "submitted", "detail": ""},
        {"at": 1.0, "event": "dispatched", "detail": "attempt 1 on victim-1"},
        {"at": 1.4, "event": "requeued", "detail": "agent victim-1 unreachable"},
        {"at": 1.45, "event": "dispatched", "detail": "attempt 2 on healthy-2"},
        {"at": 1.46, "event": "running", "detail": ""},
        {"at": 1.47, "event": "succeeded", "detail": ""}]}
    reading = attempts_of(document)
    assert [(a.number, a.agent, a.outcome, a.reason) for a in reading.attempts] == [
        (1, "victim-1", "lost", "agent victim-1 unreachable"),
        (2, "healthy-2", "succeeded", "")]
    assert reading.attempts[1].to_doc()["queued_s"] == 0.05
    assert reading.notes == {1: "waited 0.000 s", 2: "attempt 1 ran 0.400 s",
                             3: "waited 0.050 s", 4: "0.010 s after dispatch",
                             5: "attempt 2 ran 0.020 s"}
