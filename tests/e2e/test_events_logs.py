"""``orchestrator events`` and ``orchestrator logs`` end to end: a real broker started by
the CLI in a temp data dir, real agent processes, the real bus and the real log files.

Nothing sleeps: every step waits for a line of output (the events command's
``{"event": "subscribed"}`` on stderr, an agent's ``registered`` line) with a deadline.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

from tests.conftest import ROOT

DEADLINE_S = 15.0


def cli_env(home: Path) -> dict[str, str]:
    env = {**os.environ, "ORCH_HOME": str(home), "PYTHONPATH": str(ROOT),
           "ORCH_PURE_PYTHON": "1", "ORCH_LOG_LEVEL": "DEBUG"}
    env.pop("ORCH_BROKER", None)
    return env


def orchestrator(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli", *args], cwd=ROOT, env=cli_env(home),
                          check=False, capture_output=True, text=True, timeout=60)


class Lines:
    """The lines of a pipe, read by a thread into a queue, so a test waits for one with a
    deadline instead of sleeping."""

    def __init__(self, stream: IO[str]) -> None:
        self._queue: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self.stream = stream
        self.thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.thread.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, text: str, timeout: float = DEADLINE_S) -> str:
        """The first line containing ``text``; fails at the deadline or at end of stream."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"no line with {text!r} within {timeout} s; saw {self.seen}")
            try:
                line = self._queue.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                pytest.fail(f"stream ended without {text!r}; saw {self.seen}")
            self.seen.append(line)
            if text in line:
                return line

    def rest(self, timeout: float = DEADLINE_S) -> list[str]:
        """Every line until the stream ends."""
        deadline = time.monotonic() + timeout
        lines: list[str] = []
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=deadline - time.monotonic())
            except queue.Empty:
                break
            if line is None:
                return lines
            lines.append(line)
        pytest.fail(f"stream did not end within {timeout} s; got {lines}")


class Proc:
    """A process with its stdout and stderr read line by line."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.popen = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True)
        assert self.popen.stdout is not None and self.popen.stderr is not None
        self.out = Lines(self.popen.stdout)
        self.err = Lines(self.popen.stderr)

    def wait(self, timeout: float = DEADLINE_S) -> int:
        return self.popen.wait(timeout)

    def kill(self) -> None:
        """Kill it if it runs, then close its pipes once their readers saw the end."""
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait(DEADLINE_S)
        for lines in (self.out, self.err):
            lines.thread.join(DEADLINE_S)
            lines.stream.close()


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for proc in started:
        proc.kill()


def start_broker(home: Path, *extra: str) -> str:
    started = orchestrator(home, "start", "--bind", "127.0.0.1:0", "--no-agents", *extra)
    assert started.returncode == 0, started.stderr
    return str(json.loads((home / "broker.json").read_text())["endpoint"])


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    home = tmp_path / "home"
    yield home
    orchestrator(home, "stop")


def start_events(home: Path, procs: list[Proc], *args: str) -> Proc:
    proc = Proc([sys.executable, "-m", "cli", "events", *args], cli_env(home))
    procs.append(proc)
    proc.err.wait_for('"subscribed"')
    return proc


def start_agent(home: Path, procs: list[Proc], url: str, name: str) -> tuple[Proc, str]:
    proc = Proc([sys.executable, "-m", "agent_sdk", "run", "tests.sample_agents:EchoAgent",
                 "--broker", url, "--name", name], cli_env(home))
    procs.append(proc)
    registered = json.loads(proc.out.wait_for('"registered"'))
    return proc, str(registered["agent_id"])


def test_events_json_shows_an_agent_joining_and_leaving(home: Path, procs: list[Proc]) -> None:
    # Given a broker and a tail of its events, subscribed
    url = start_broker(home)
    events = start_events(home, procs, "--json", "--count", "2",
                          "--type", "agent_joined", "--type", "agent_left")

    # When an agent starts and stops
    agent, agent_id = start_agent(home, procs, url, "probe")
    agent.popen.send_signal(signal.SIGTERM)
    assert agent.wait() == 0

    # Then the tail printed its joining and its leaving, one JSON object a line, and ended
    lines = [json.loads(line) for line in events.out.rest()]
    assert events.wait() == 0
    assert [e["type"] for e in lines] == ["agent_joined", "agent_left"]
    assert {(e["agent"], e["agent_id"]) for e in lines} == {("probe", agent_id)}
    assert lines[0]["capabilities"] == ["echo"]
    assert lines[1]["details"]["reason"]


def test_events_filter_by_agent_and_task_states(home: Path, procs: list[Proc]) -> None:
    # Given a tail of one agent's events only
    url = start_broker(home)
    events = start_events(home, procs, "--json", "--count", "3", "--agent", "wanted")

    # When another agent joins first, then the wanted one, and a task goes to it
    start_agent(home, procs, url, "other")
    _, wanted_id = start_agent(home, procs, url, "wanted")
    submitted = orchestrator(home, "submit", "hello", "--agent", "wanted", "--json")
    assert submitted.returncode == 0, submitted.stderr
    task_id = json.loads(submitted.stdout)["task_id"]

    # Then only the wanted agent's join and its task's states show (dispatched and
    # succeeded: the pending state has no agent yet)
    lines = [json.loads(line) for line in events.out.rest()]
    assert events.wait() == 0
    assert lines[0]["type"] == "agent_joined" and lines[0]["agent_id"] == wanted_id
    tasks = lines[1:]
    assert {e["task_id"] for e in tasks} == {task_id}
    assert [e["details"]["state"] for e in tasks][-1] == "succeeded"
    assert all(e["agent"] == "wanted" and e["agent_id"] == wanted_id for e in tasks)


def test_events_readable_lines_and_ctrl_c(home: Path, procs: list[Proc]) -> None:
    # Given a readable tail of a broker's events
    url = start_broker(home)
    events = start_events(home, procs)

    # When an agent joins, a line names it; then Ctrl-C ends the tail with 130, cleanly
    start_agent(home, procs, url, "reader")
    line = events.out.wait_for("agent_joined")
    assert "reader" in line and "capabilities=echo" in line
    events.popen.send_signal(signal.SIGINT)
    assert events.wait() == 130
    assert events.out.rest() == []
    assert "Traceback" not in "\n".join(events.err.rest())


def test_events_without_a_bus_or_a_broker(home: Path, procs: list[Proc]) -> None:
    # A broker without a bus: one line saying so, exit 1
    start_broker(home, "--no-bus")
    no_bus = orchestrator(home, "events", "--count", "1")
    assert no_bus.returncode == 1
    lines = no_bus.stderr.strip().splitlines()
    assert len(lines) == 1 and "no pub/sub bus" in lines[0], no_bus.stderr

    # A broker that does not answer: exit 3 with the usual line
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    silent = orchestrator(home, "--broker", f"tcp://127.0.0.1:{port}", "events")
    assert silent.returncode == 3
    assert "is not answering" in silent.stderr and len(silent.stderr.splitlines()) == 1


def test_logs_task_finds_the_broker_and_agent_lines(home: Path, procs: list[Proc]) -> None:
    # Given a broker and an agent logging at DEBUG to the data dir
    url = start_broker(home)
    _, agent_id = start_agent(home, procs, url, "logged")

    # When a task runs
    submitted = orchestrator(home, "submit", "hello", "--capability", "echo", "--json")
    assert submitted.returncode == 0, submitted.stderr
    task_id = json.loads(submitted.stdout)["task_id"]

    # Then logs --task finds that task's lines in both logs, merged by time
    found = orchestrator(home, "logs", "--task", task_id, "--json")
    assert found.returncode == 0, found.stderr
    lines = [json.loads(line) for line in found.stdout.splitlines()]
    assert {line["task_id"] for line in lines} == {task_id}
    sources = {line["source"] for line in lines}
    assert sources == {"broker", f"agent-{agent_id}"}
    events = {(line["source"], line["event"]) for line in lines}
    assert ("broker", "task_dispatched") in events
    assert (f"agent-{agent_id}", "task_finished") in events
    assert [line["ts"] for line in lines] == sorted(line["ts"] for line in lines)

    # And --agent keeps that agent's lines only (its registration among them)
    mine = orchestrator(home, "logs", "--agent", "logged", "--json")
    records = [json.loads(line) for line in mine.stdout.splitlines()]
    assert records and {r["agent_id"] for r in records} <= {agent_id, "logged"}
    assert any(r.get("event") == "registered" for r in records)
    # The readable form prints the same lines
    readable = orchestrator(home, "logs", "--task", task_id)
    assert len(readable.stdout.splitlines()) == len(lines) and task_id in readable.stdout
    # And a filter that matches nothing says so, naming the agents that have lines
    nobody = orchestrator(home, "logs", "--agent", "nobody", "--json")
    assert nobody.returncode == 1, nobody.stdout
    error = json.loads(nobody.stdout)["error"]
    assert error.startswith("no log line of agent 'nobody' in ") and "logged" in error


def test_logs_follow_prints_new_lines(home: Path, procs: list[Proc]) -> None:
    # Given a broker and `logs --follow` on its data dir
    url = start_broker(home)
    follow = Proc([sys.executable, "-m", "cli", "logs", "--follow", "--agent", "late"],
                  cli_env(home))
    procs.append(follow)

    # When an agent starts afterwards, its registration line appears in the tail
    _, agent_id = start_agent(home, procs, url, "late")
    line = follow.out.wait_for("event=registered")
    assert agent_id in line
    follow.popen.send_signal(signal.SIGINT)
    assert follow.wait() == 130
