"""What ``orchestrator start`` launches: the broker, the standing workflow runner and the
agents of ``--agents``, each waited for until it reports ready, so that a failure can stop
exactly what was started.

Every process prints one JSON line on stdout once it is ready (the broker its endpoints,
the runner ``{"event": "ready", ...}``, an agent its registration); its stderr goes to its
log in the data dir, which a failed start quotes.
"""

from __future__ import annotations

import select
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import click
import orjson

from cli.common import PING_TIMEOUT_S
from cli.processes import ProcessRef, end_child, log_size, spawn

#: How long `start` waits for the broker, the runner, then each agent, to report ready.
START_TIMEOUT_S: Final = 30.0
#: How long a failed `start` gives what it started to exit before it kills it.
UNDO_TIMEOUT_S: Final = 10.0
#: The standing runner's pid file and log, in the data dir.
RUNNER_PID: Final = "runner.pid"
RUNNER_LOG: Final = "runner.log"


def broker_pid_file(home: Path) -> Path:
    """The broker's pid file in the data dir ``home``."""
    return home / "broker.pid"


class StartFailed(Exception):
    """Raised when a process `start` launched did not report ready.

    Args:
        message: What did not start, and how it ended.
        log: The log it wrote to.
        offset: Where its lines begin in the log.
    """

    def __init__(self, message: str, log: Path, offset: int) -> None:
        super().__init__(message)
        self.log = log
        self.offset = offset


def wait_ready(proc: subprocess.Popen[bytes], what: str, log: Path,
               offset: int) -> dict[str, Any]:
    """The first stdout line of a started process (its ready report), parsed as JSON.

    Raises:
        StartFailed: It exited, printed something else, or printed nothing within
            :data:`START_TIMEOUT_S`.
    """
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], START_TIMEOUT_S)
    line = proc.stdout.readline() if ready else b""
    if line:
        try:
            report: dict[str, Any] = orjson.loads(line)
            return report
        except orjson.JSONDecodeError:
            raise StartFailed(f"{what} printed {line[:80]!r} instead of its ready line",
                              log, offset) from None
    if not ready:
        raise StartFailed(f"{what} did not report ready within {START_TIMEOUT_S:g} s",
                          log, offset)
    try:
        code: int | None = proc.wait(PING_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        code = None
    raise StartFailed(f"{what} did not start (exit code {code})", log, offset)


class Launch:
    """What one `start` launched: the broker, the runner, then the agents, so that a
    failure can stop exactly those again.

    Args:
        home: The data dir.
        env: Variables added to the runner's and the agents' environment (their CURVE
            keys with ``start --secure``).
    """

    def __init__(self, home: Path, env: Mapping[str, str] | None = None) -> None:
        self.home = home
        self.env = dict(env or {})
        self.broker: subprocess.Popen[bytes] | None = None
        self.runner: subprocess.Popen[bytes] | None = None
        self.agents: list[tuple[subprocess.Popen[bytes], Path | None]] = []

    def start_broker(self, args: list[str]) -> dict[str, Any]:
        """Run the broker; returns its ready report once it answers."""
        log = self.home / "broker.log"
        offset = log_size(log)
        self.broker = spawn(args, log)
        info = wait_ready(self.broker, "the broker", log, offset)
        broker_pid_file(self.home).write_text(ProcessRef.of(self.broker.pid).text())
        return info

    def start_runner(self, endpoint: str) -> dict[str, Any]:
        """Run the standing workflow runner (``python -m workflows.runner``) against the
        broker; returns its ready report (``runner_id``, ``pid``). Its pid file is
        ``home/runner.pid``, its log ``home/runner.log``."""
        log = self.home / RUNNER_LOG
        offset = log_size(log)
        self.runner = spawn(["-m", "workflows.runner", "--broker", endpoint], log,
                            env=self.env or None)
        info = wait_ready(self.runner, "the workflow runner", log, offset)
        (self.home / RUNNER_PID).write_text(ProcessRef.of(self.runner.pid).text())
        return info

    def start_agents(self, agents: list[tuple[str, int]], endpoint: str,
                     env: Mapping[str, str] | None = None) -> list[str]:
        """Start every agent process at once, then wait for each to register (their
        imports overlap: a pool starts in about the time of its slowest agent).

        Args:
            agents: (``module:Class``, N) pairs.
            endpoint: The broker's URL.
            env: Variables added to the agents' environment (``ORCH_ALLOW_COMMANDS``).

        Returns:
            The agent ids, in launch order; their pid files are in ``home/agents``.
        """
        log = self.home / "agents.log"
        pid_dir = self.home / "agents"
        pid_dir.mkdir(exist_ok=True)
        offset = log_size(log)
        env = {**self.env, **(env or {})} or None
        launched = []
        for spec, replicas in agents:
            for _ in range(replicas):
                agent = spawn(["-m", "agent_sdk", "run", spec, "--broker", endpoint], log,
                              env=env)
                self.agents.append((agent, None))
                launched.append((len(self.agents) - 1, spec))
        started = []
        for index, spec in launched:
            agent, _ = self.agents[index]
            registered = wait_ready(agent, f"the agent {spec}", log, offset)
            pid_file = pid_dir / f"{registered['agent_id']}.pid"
            pid_file.write_text(ProcessRef.of(agent.pid).text())
            self.agents[index] = (agent, pid_file)
            started.append(registered["agent_id"])
        return started

    def undo(self) -> dict[str, Any]:
        """Stop what was launched (agents first, then the runner, then the broker) and
        remove their files.

        Returns:
            The pids stopped, for the report:
            ``{"broker": pid, "runner": pid, "agents": [pid, ...]}``.
        """
        for agent, pid_file in reversed(self.agents):
            end_child(agent, UNDO_TIMEOUT_S)
            if pid_file is not None:
                pid_file.unlink(missing_ok=True)
        if self.runner is not None:
            end_child(self.runner, UNDO_TIMEOUT_S)
            (self.home / RUNNER_PID).unlink(missing_ok=True)
        if self.broker is not None:
            end_child(self.broker, UNDO_TIMEOUT_S)
            broker_pid_file(self.home).unlink(missing_ok=True)
            (self.home / "broker.json").unlink(missing_ok=True)
        return {"broker": self.broker.pid if self.broker is not None else None,
                "runner": self.runner.pid if self.runner is not None else None,
                "agents": [agent.pid for agent, _ in self.agents]}
