"""``start`` after a broker died, and a ``start`` that fails (issue 11).

Whether a broker of a data dir is alive is its lock (``broker.lock``, held with
``fcntl.flock`` for the broker's life) and its answer, never a pid: a broker killed a
moment ago is a zombie until its parent reaps it (for good, under a minimal init), and a
pid is reused. The tests make the zombie certain: this process adopts the orphans of the
CLI (``PR_SET_CHILD_SUBREAPER``, as an init would) and reaps nothing until the end.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cli.common import lock_held
from cli.processes import start_time
from tests.conftest import ROOT

CLI_TIMEOUT_S = 60
#: prctl(2): make this process the reaper of its descendants' orphans.
PR_SET_CHILD_SUBREAPER = 36
#: Options of a broker that needs no state service and no bus here.
LEAN = ("--bind", "127.0.0.1:0", "--no-state", "--no-bus")
#: ... and for `start`, none of the built-in agents.
BARE = (*LEAN, "--no-agents")


def run(home: Path, *args: str,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``orchestrator ARGS`` with ``home`` as the data dir (and ``env`` added)."""
    full_env = {**os.environ, "ORCH_HOME": str(home), "PYTHONPATH": str(ROOT), **(env or {})}
    full_env.pop("ORCH_BROKER", None)
    return subprocess.run([sys.executable, "-m", "cli", *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=CLI_TIMEOUT_S)


def document(proc: subprocess.CompletedProcess[str]) -> Any:
    assert proc.stdout, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture
def home(orch_home: Path) -> Iterator[Path]:
    yield orch_home
    run(orch_home, "stop")  # whatever the test did, no broker outlives it


@pytest.fixture
def adopted() -> Iterator[list[int]]:
    """Orphans started meanwhile become this process's children and stay zombies when
    they die, until the test ends; the test lists their pids here to be reaped."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        pytest.skip(f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(ctypes.get_errno())}")
    pids: list[int] = []
    try:
        yield pids
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass


def zombie(pid: int) -> bool:
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"


def test_start_right_after_a_sigkill_starts_a_broker_with_its_journal(
        home: Path, adopted: list[int]) -> None:
    # Given a running broker with a task accepted and open (no agent can take it)
    first = document(run(home, "start", *BARE, "--json"))
    adopted.append(first["pid"])
    accepted = run(home, "submit", "x", "-c", "nobody", "--id", "before", "--timeout", "600",
                   "--no-wait", "--json")
    assert document(accepted)["status"] == "accepted"
    # When the broker is SIGKILLed: it stays a zombie (nobody reaps it), its pid "alive".
    # It is this process's child now: wait for its exit without reaping it.
    os.kill(first["pid"], signal.SIGKILL)
    os.waitid(os.P_PID, first["pid"], os.WEXITED | os.WNOWAIT)
    assert zombie(first["pid"])
    # Then `start` at once starts a new broker on the first try
    again = run(home, "start", *BARE, "--json")
    assert again.returncode == 0, again.stderr
    second = document(again)
    adopted.append(second["pid"])
    assert second["status"] == "started" and second["pid"] != first["pid"]
    # And it is the one that answers, with the journal restored
    status = document(run(home, "status", "--json"))
    assert status["broker"]["pid"] == second["pid"]
    assert status["tasks"]["restored_open"] == 1
    assert document(run(home, "result", "before", "--json"))["status"] == "pending"


def test_a_pid_file_naming_another_process_neither_blocks_start_nor_gets_it_killed(
        home: Path) -> None:
    # Given pid files that name live processes which are not ours (their pids reused)
    bystanders = [subprocess.Popen(["sleep", "300"]) for _ in range(2)]
    try:
        home.mkdir(parents=True, exist_ok=True)
        (home / "broker.pid").write_text(f"{bystanders[0].pid}\n")
        (home / "agents").mkdir()
        (home / "agents" / "echo-gone.pid").write_text(f"{bystanders[1].pid} 1\n")
        # When start and stop run
        started = run(home, "start", *BARE, "--json")
        assert started.returncode == 0, started.stderr
        assert document(started)["status"] == "started"
        stopped = run(home, "stop", "--json")
        assert stopped.returncode == 0, stopped.stderr
        assert document(stopped)["pid"] == document(started)["pid"]
        # Then the bystanders were never signalled
        assert [p.poll() for p in bystanders] == [None, None]
    finally:
        for proc in bystanders:
            proc.kill()
            proc.wait()


def test_a_second_broker_on_a_held_data_dir_exits_with_one_line(home: Path) -> None:
    # Given a running broker
    started = document(run(home, "start", *BARE, "--json"))
    assert lock_held(home)
    # When another broker process is started on the same data dir
    second = subprocess.run([sys.executable, "-m", "broker", *LEAN, "--data-dir", str(home)],
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            capture_output=True, text=True, timeout=CLI_TIMEOUT_S)
    # Then it exits 1 at once, naming the running one
    assert second.returncode == 1 and not second.stdout
    assert second.stderr.strip().splitlines() == [
        f"error: another broker (pid {started['pid']}) is running with the data dir {home} "
        f"(it holds {home / 'broker.lock'}); stop it first (orchestrator stop) or give this "
        "one another --data-dir"]
    # And `start` says the first one runs
    assert document(run(home, "start", *BARE, "--json"))["status"] == "running"


def test_a_failed_start_stops_what_it_started_and_prints_the_log(home: Path) -> None:
    # When an agent of --agents keeps crashing at start-up, beside one that starts
    failed = run(home, "start", *LEAN, "--agents",
                 "tests.sample_agents:EchoAgent,tests.nodes.crashing_agents:CrashingAgent",
                 "--json", env={"ORCH_NODE_RESTART_DELAY_S": "0.1"})
    # Then start exits 1, once the node supervisor gave up on it (a crash loop), with one
    # JSON document naming the log and its last lines
    assert failed.returncode == 1
    report = document(failed)
    log = home / "agents.log"
    assert report["status"] == "failed" and report["log"] == str(log)
    assert ("the agent tests.nodes.crashing_agents:CrashingAgent did not start: crash loop: "
            "5 crashes") in report["error"]
    assert any("crashing-agent-refuses-to-start" in line for line in report["lines"])
    # And stderr says the same to a person
    assert f"Its log is {log}" in failed.stderr
    # And nothing it started runs: not the broker, not the supervisor or its agents
    stopped = report["stopped"]
    assert [start_time(pid) for pid in [stopped["broker"], stopped["node"]]] == [None] * 2
    assert not lock_held(home)
    assert not (home / "node.pid").exists()
    assert run(home, "stop").returncode == 3


def test_an_agent_class_that_cannot_be_imported_is_a_usage_error(home: Path) -> None:
    failed = run(home, "start", *LEAN, "--agents", "tests.sample_agents:EchoAgent,bad:Spec")
    assert failed.returncode == 2
    assert "cannot import 'bad'" in failed.stderr
    assert not lock_held(home)


def test_a_broker_that_cannot_start_is_reported_with_its_log(home: Path) -> None:
    # Given a port that is taken
    holder = document(run(home, "start", *BARE, "--json"))
    port = holder["endpoint"].rsplit(":", 1)[1]
    other = home.parent / f"{home.name}-other"
    # When another data dir's broker is started on it
    failed = run(other, "start", "--bind", f"127.0.0.1:{port}", "--no-state", "--no-bus")
    # Then the error names the broker's log and prints why it could not bind
    assert failed.returncode == 1
    assert f"Its log is {other / 'broker.log'}" in failed.stderr
    assert f"error: cannot bind tcp://127.0.0.1:{port}" in failed.stderr
    assert not lock_held(other)
