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
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import orjson

from cli.common import PING_TIMEOUT_S
from cli.processes import ProcessRef, end_child, log_size, spawn
from nodes import PID_FILE

#: How long `start` waits for the broker, the runner, then each agent, to report ready.
START_TIMEOUT_S: Final = 30.0
#: Between two looks at the broker's status while the pool starts.
POOL_POLL_S: Final = 0.1
#: How long a failed `start` gives what it started to exit before it kills it.
UNDO_TIMEOUT_S: Final = 10.0
#: The node supervisor's log in the data dir (its pid file: ``nodes.PID_FILE``).
NODE_LOG: Final = "node.log"
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
        #: this data dir's node supervisor (:meth:`start_pool`), when started
        self.node: subprocess.Popen[bytes] | None = None

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

    def start_pool(self, agents: list[tuple[str, int]], endpoint: str,
                   node_env: Mapping[str, str] | None = None) -> list[str]:
        """Start this data dir's node supervisor (``python -m nodes``) and have the broker
        scale each agent of the pool to its count; wait until every replica registered.
        A crash loop or a replica that never registers fails the start.

        Args:
            agents: (``module:Class``, N) pairs; a built-in's spec is scaled by its name,
                any other spec is put in the supervisor's catalogue.
            endpoint: the broker's URL.
            node_env: variables added to the supervisor's environment (its replicas
                inherit them: ``ORCH_ALLOW_COMMANDS``; its keys on a secure broker).

        Returns:
            The ids of the agents registered once the pool runs.
        """
        from agent_sdk import SyncClient
        from cli.pool import BUILT_INS

        names = {b.spec: name for name, b in BUILT_INS.items()}
        pool = [(names.get(spec, spec), count) for spec, count in agents if count]
        custom = [spec for spec, _ in agents if spec not in names]
        self.node = start_supervisor(self.home, endpoint, node_env, custom)
        agents_log = self.home / "agents.log"
        agents_offset = log_size(agents_log)
        client = SyncClient(endpoint)
        try:
            for name, count in pool:
                client.scale(name, count)
            return _wait_pool(client, dict(pool), agents_log, agents_offset)
        finally:
            client.close()

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
        if self.node is not None:
            end_child(self.node, UNDO_TIMEOUT_S)  # it stops its replicas first
            (self.home / PID_FILE).unlink(missing_ok=True)
        if self.runner is not None:
            end_child(self.runner, UNDO_TIMEOUT_S)
            (self.home / RUNNER_PID).unlink(missing_ok=True)
        if self.broker is not None:
            end_child(self.broker, UNDO_TIMEOUT_S)
            broker_pid_file(self.home).unlink(missing_ok=True)
            (self.home / "broker.json").unlink(missing_ok=True)
        return {"broker": self.broker.pid if self.broker is not None else None,
                "runner": self.runner.pid if self.runner is not None else None,
                "agents": [agent.pid for agent, _ in self.agents],
                "node": self.node.pid if self.node is not None else None}


def start_supervisor(home: Path, endpoint: str, env: Mapping[str, str] | None = None,
                     catalogue: list[str] | None = None) -> subprocess.Popen[bytes]:
    """Start the data dir's node supervisor (``python -m nodes``) and wait for its ready
    line (it prints it once the broker's first plan arrived).

    Raises:
        StartFailed: it exited or did not report ready within :data:`START_TIMEOUT_S`.
    """
    log = home / NODE_LOG
    offset = log_size(log)
    args = ["-m", "nodes", "--broker", endpoint, "--home", str(home)]
    if catalogue:
        args += ["--catalogue", *catalogue]
    proc = spawn(args, log, env=env or None)
    try:
        wait_ready(proc, "the node supervisor", log, offset)
    except StartFailed:
        end_child(proc, UNDO_TIMEOUT_S)
        raise
    return proc


def _wait_pool(client: Any, counts: dict[str, int], log: Path, offset: int) -> list[str]:
    """Wait until the broker's pools run ``counts`` and that many agents registered;
    the registered agents' ids.

    Raises:
        StartFailed: a node gave up on an agent (a crash loop), or the pool is not up
            within :data:`START_TIMEOUT_S`.
    """
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        status = client.status()
        pools = status.get("pools", {})
        failing = {name: why for name in counts
                   for why in (pools.get(name, {}).get("failing") or {}).values()}
        if failing:
            name, why = next(iter(failing.items()))
            raise StartFailed(f"the agent {name} did not start: {why}", log, offset)
        registered = [a["id"] for a in status.get("agents", [])
                      if a.get("state") == "ready"]
        if all(pools.get(name, {}).get("running") == n for name, n in counts.items()) \
                and len(registered) >= sum(counts.values()):
            return registered
        if time.monotonic() >= deadline:
            short = {name: pools.get(name, {}).get("running", 0) for name in counts}
            raise StartFailed(f"the agents did not all start within {START_TIMEOUT_S:g} s "
                              f"(running {short} of {counts})", log, offset)
        time.sleep(POOL_POLL_S)
