"""``orchestrator start``, ``stop`` and ``status``: the broker's processes and their state.

``start`` runs the broker (and the agents of ``--agents``) in the background, with the pid
files and logs in the data dir; ``stop`` ends them; ``status`` asks the running broker.

Whether a broker of the data dir is alive is never read from a pid: the broker holds
the data dir's lock for its whole life (:func:`cli.common.lock_held`), and it must answer
as the process that holds it. A broker killed a moment ago (still a zombie) or a pid
reused by another process does not count; ``stop`` waits for the lock to go, not for a
pid.
"""

from __future__ import annotations

import select
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path
from typing import Any, Final

import click
import orjson

from broker.config import DEFAULT_BIND, DURABILITIES, POLICIES
from cli.common import (
    BIND, EXIT_FAILED, EXIT_UNREACHABLE, PING_TIMEOUT_S, Context, DataDirCommand, emit_json,
    fail, json_option, lock_held, lock_holder, read_broker_info,
)
from cli.processes import (
    ProcessRef, end_child, end_process, log_size, log_tail, read_ref, spawn,
)

#: How long `start` waits for the broker, then each agent, to report ready.
START_TIMEOUT_S: Final = 30.0
#: How long `stop` waits for a graceful exit before it kills.
STOP_TIMEOUT_S: Final = 45.0
#: How long a failed `start` gives what it started to exit before it kills it.
UNDO_TIMEOUT_S: Final = 10.0
#: Most processes `--agents` starts of one agent class.
MAX_REPLICAS: Final = 1024

START_HELP = """Start the broker in the background (lock, pid file and log in the data dir).

Returns once the broker answers. Built-in agents do not exist yet, so no agent is started
unless --agents names some: `--agents module:Class[=N],...` starts N processes of each,
one after the other. If the broker or an agent does not come up, everything this start
started is stopped again, and the error names the log and prints its last lines.
"""


def _pid_file(home: Path) -> Path:
    return home / "broker.pid"


# ---------------------------------------------------------------------- start


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


def _parse_agents(spec: str) -> list[tuple[str, int]]:
    """Parse ``--agents module:Class[=N],...`` into (``module:Class``, N) pairs.

    Raises:
        click.BadParameter: A part is not ``module:Class`` with an optional ``=N``.
    """
    agents = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, count = part.partition("=")
        module, _, cls = name.partition(":")
        if not (module and cls and name.isprintable()) or (
                count and not (count.isascii() and count.isdigit()
                               and 1 <= int(count) <= MAX_REPLICAS)):
            raise click.BadParameter(f"expected module:Class[=N] with N from 1 to "
                                     f"{MAX_REPLICAS}, got {part!r}", param_hint="--agents")
        agents.append((name, int(count or 1)))
    return agents


class AgentSpecs(click.ParamType):
    """``--agents``: checked while the command line is parsed (see :func:`_parse_agents`)."""

    name = "module:Class[=N],..."

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> str:
        try:
            _parse_agents(str(value))
        except click.BadParameter as e:
            self.fail(e.format_message(), param, ctx)
        return str(value)


def _wait_ready(proc: subprocess.Popen[bytes], what: str, log: Path,
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
    """What one `start` launched: the broker, then its agents, so that a failure can stop
    exactly those again.

    Args:
        home: The data dir.
    """

    def __init__(self, home: Path) -> None:
        self.home = home
        self.broker: subprocess.Popen[bytes] | None = None
        self.agents: list[tuple[subprocess.Popen[bytes], Path | None]] = []

    def start_broker(self, args: list[str]) -> dict[str, Any]:
        """Run the broker; returns its ready report once it answers."""
        log = self.home / "broker.log"
        offset = log_size(log)
        self.broker = spawn(args, log)
        info = _wait_ready(self.broker, "the broker", log, offset)
        _pid_file(self.home).write_text(ProcessRef.of(self.broker.pid).text())
        return info

    def start_agents(self, agents: list[tuple[str, int]], endpoint: str) -> list[str]:
        """Start each agent's processes one at a time, each registered before the next.

        Returns:
            The agent ids, in the order they registered; their pid files are in
            ``home/agents``.
        """
        started = []
        log = self.home / "agents.log"
        pid_dir = self.home / "agents"
        pid_dir.mkdir(exist_ok=True)
        for spec, replicas in agents:
            for _ in range(replicas):
                offset = log_size(log)
                agent = spawn(["-m", "agent_sdk", "run", spec, "--broker", endpoint], log)
                self.agents.append((agent, None))
                registered = _wait_ready(agent, f"the agent {spec}", log, offset)
                pid_file = pid_dir / f"{registered['agent_id']}.pid"
                pid_file.write_text(ProcessRef.of(agent.pid).text())
                self.agents[-1] = (agent, pid_file)
                started.append(registered["agent_id"])
        return started

    def undo(self) -> dict[str, Any]:
        """Stop what was launched (agents first, then the broker) and remove its files.

        Returns:
            The pids stopped, for the report: ``{"broker": pid, "agents": [pid, ...]}``.
        """
        for agent, pid_file in reversed(self.agents):
            end_child(agent, UNDO_TIMEOUT_S)
            if pid_file is not None:
                pid_file.unlink(missing_ok=True)
        if self.broker is not None:
            end_child(self.broker, UNDO_TIMEOUT_S)
            _pid_file(self.home).unlink(missing_ok=True)
            (self.home / "broker.json").unlink(missing_ok=True)
        return {"broker": self.broker.pid if self.broker is not None else None,
                "agents": [agent.pid for agent, _ in self.agents]}


def _ask_broker(endpoint: str | None) -> dict[str, Any] | None:
    """The status document of the broker at ``endpoint``, or None if it does not answer."""
    if not endpoint:
        return None
    from agent_sdk import BrokerUnavailable, SyncClient

    with closing(SyncClient(endpoint)) as client:
        try:
            return client.status(PING_TIMEOUT_S)
        except BrokerUnavailable:
            return None


def _report_running(home: Path, as_json: bool) -> bool:
    """Say so when the data dir's broker runs (it holds the lock and answers as itself).

    Returns:
        True when it runs (and was reported), so that `start` starts nothing; False
        when no broker holds the data dir. Exits 1 when one holds it but does not answer.
    """
    if not lock_held(home):
        return False
    holder = lock_holder(home)
    info = read_broker_info(home) or {}
    endpoint = info.get("endpoint")
    answer = _ask_broker(endpoint)
    pid = (answer or {}).get("broker", {}).get("pid")
    if answer is None or pid not in (holder, info.get("pid")):
        fail(f"a broker (pid {holder or '?'}) holds the data dir {home} but does not answer "
             f"at {endpoint or '(no endpoint yet)'}: it is starting, or hung; see "
             f"{home / 'broker.log'}, or end it with `orchestrator stop`", EXIT_FAILED,
             {"status": "not_answering", "pid": holder, "endpoint": endpoint,
              "home": str(home)})
    if as_json:
        emit_json({"status": "running", "pid": pid, "endpoint": endpoint, "home": str(home)})
    else:
        click.echo(f"already running (pid {pid}) at {endpoint}; data in {home}")
    return True


def _broker_args(home: Path, bind: str, policy: str, durability: str, state_bind: str | None,
                 state_memory: bool, no_state: bool, no_bus: bool) -> list[str]:
    """The ``python`` arguments that run the broker with `start`'s options."""
    broker_args = ["-m", "broker", "--bind", bind, "--data-dir", str(home), "--policy", policy,
                   "--durability", durability]
    broker_args += ["--state-bind", state_bind] if state_bind else []
    broker_args += ["--state-memory"] * state_memory + ["--no-state"] * no_state
    broker_args += ["--no-bus"] * no_bus
    return broker_args


def _print_started(pid: int, info: dict[str, Any], started: list[str], home: Path,
                   as_json: bool) -> None:
    """Report a started broker: its pid, endpoints, agents and data dir."""
    if as_json:
        emit_json({"status": "started", "pid": pid, "endpoint": info["endpoint"],
                   "state": info.get("state"), "bus_out": info.get("bus_out"),
                   "bus_in": info.get("bus_in"), "agents": started, "home": str(home)})
        return
    click.echo(f"broker started (pid {pid}) at {info['endpoint']}; data in {home}")
    if info.get("state"):
        click.echo(f"state service at {info['state']}")
    if info.get("bus_out"):
        click.echo(f"bus: subscribers connect to {info['bus_out']}, publishers to "
                   f"{info['bus_in']}")
    if started:
        click.echo(f"agents: {', '.join(started)}")


def _launch(home: Path, broker_args: list[str], agents: list[tuple[str, int]],
            as_json: bool) -> None:
    """Start the broker and the agents; on any failure stop them again and exit 1 with
    the log and its last lines."""
    launch = Launch(home)
    try:
        info = launch.start_broker(broker_args)
        started = launch.start_agents(agents, info["endpoint"])
    except StartFailed as e:
        stopped = launch.undo()
        earlier = len(launch.agents) - 1
        undone = "" if not launch.agents else "; the broker was stopped again" \
            if not earlier else f"; the broker and the {earlier} agent(s) started before " \
            "it were stopped again"
        fail(f"{e}{undone}. Its log is {e.log}; its last lines:", EXIT_FAILED,
             {"status": "failed", "log": str(e.log), "stopped": stopped, "home": str(home)},
             log_tail(e.log, e.offset))
    except BaseException:
        launch.undo()  # Ctrl-C, or a bug: leave nothing half-started behind
        raise
    assert launch.broker is not None
    _print_started(launch.broker.pid, info, started, home, as_json)


@click.command(cls=DataDirCommand, help=START_HELP)
@click.option("--bind", type=BIND, default=DEFAULT_BIND, show_default=True,
              help="HOST:PORT of the broker.")
@click.option("--policy", type=click.Choice(POLICIES), default="capability", show_default=True)
@click.option("--durability", type=click.Choice(DURABILITIES), default="batch", show_default=True,
              help="Journal: none, batch (survives a crash) or fsync (survives power loss).")
@click.option("--agents", "agents_spec", type=AgentSpecs(), default="", help="Agents to start: module:Class[=N],...")
@click.option("--no-agents", is_flag=True, help="Start no agents (the default for now).")
@click.option("--foreground", is_flag=True, help="Run the broker in this process.")
@click.option("--state-bind", type=BIND, default=None,
              help="HOST:PORT of the state service. Default: the broker's port + 3.")
@click.option("--state-memory", is_flag=True, help="Keep shared state in memory only.")
@click.option("--no-state", is_flag=True, help="Do not run the state service.")
@click.option("--no-bus", is_flag=True, help="Do not run the pub/sub forwarder.")
@json_option()
@click.pass_obj
def start(obj: Context, bind: str, policy: str, durability: str, agents_spec: str,
          no_agents: bool, foreground: bool, state_bind: str | None, state_memory: bool,
          no_state: bool, no_bus: bool, as_json: bool) -> None:
    """Start the broker and the agents of ``--agents``, unless it already runs."""
    home = obj.home
    # Parsed first, so that a bad --agents is a usage error before anything starts.
    agents = [] if no_agents else _parse_agents(agents_spec)
    if _report_running(home, as_json):
        return
    broker_args = _broker_args(home, bind, policy, durability, state_bind, state_memory,
                               no_state, no_bus)
    if foreground:
        from broker.__main__ import main as broker_main

        sys.exit(broker_main(broker_args[2:]))
    try:
        home.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        fail(f"cannot create the data dir {home}: {e.strerror or e}", EXIT_FAILED,
             {"home": str(home)})
    # What a killed broker left: its endpoint would only time out.
    (home / "broker.json").unlink(missing_ok=True)
    _launch(home, broker_args, agents, as_json)


# ---------------------------------------------------------------------- stop


def _stop_broker(home: Path) -> tuple[int | None, bool]:
    """End the data dir's broker (SIGTERM; SIGKILL after :data:`STOP_TIMEOUT_S`), waiting
    for its lock to go, which happens when it exits, however it exits.

    Returns:
        Its pid (None when none was running) and whether it exited gracefully.
    """
    if not lock_held(home):
        return None, True
    pid = lock_holder(home)
    if pid is None:
        # The lock file names nobody (a full disk when it started): the pid file `start`
        # wrote, if it still names a live process.
        ref = read_ref(_pid_file(home))
        pid = ref.pid if ref is not None else None
    if pid is None:
        fail(f"a broker holds the data dir {home}, but neither {home / 'broker.lock'} nor "
             f"{_pid_file(home)} names its pid", EXIT_FAILED)
    graceful = end_process(pid, lambda: not lock_held(home), STOP_TIMEOUT_S)
    return pid, graceful


def _take_agents(home: Path) -> list[ProcessRef]:
    """The data dir's live agents; every agent pid file is removed."""
    agents = []
    pid_dir = home / "agents"
    if pid_dir.is_dir():
        for path in pid_dir.glob("*.pid"):
            ref = read_ref(path)
            if ref is not None:
                agents.append(ref)
            path.unlink(missing_ok=True)
    return agents


@click.command(cls=DataDirCommand,
               help="Stop the broker gracefully (in-flight work drains first) and its agents.")
@json_option()
@click.pass_obj
def stop(obj: Context, as_json: bool) -> None:
    """Stop the broker, then its agents; exit 3 when neither runs."""
    home = obj.home
    agents = _take_agents(home)
    if not lock_held(home) and not agents:
        _pid_file(home).unlink(missing_ok=True)
        fail(f"no broker is running for the data dir {home} ({obj.home_source})",
             EXIT_UNREACHABLE, {"home": str(home)})
    pid, graceful = _stop_broker(home)
    for agent in agents:
        end_process(agent.pid, agent.gone, STOP_TIMEOUT_S)
    _pid_file(home).unlink(missing_ok=True)
    (home / "broker.json").unlink(missing_ok=True)
    if as_json:
        emit_json({"status": "stopped", "pid": pid, "graceful": graceful,
                   "agents_stopped": len(agents), "home": str(home)})
    elif pid is None:
        click.echo(f"no broker was running; {len(agents)} agent(s) stopped")
    else:
        click.echo(f"broker stopped (pid {pid})" + ("" if graceful else " (killed after timeout)"))


# ---------------------------------------------------------------------- status


@click.command(cls=DataDirCommand,
               help="Show the broker, its data dir and storage, its agents (with their "
                    "circuit breakers), the queue and task counts.")
@json_option("Print the status as JSON.")
@click.option("--watch", is_flag=True, help="Refresh every second until Ctrl-C.")
@click.pass_obj
def status(obj: Context, as_json: bool, watch: bool) -> None:
    """Print the broker's status once, or refresh it every second with ``--watch``."""
    with closing(obj.client()) as client:
        if as_json:
            emit_json(client.status(PING_TIMEOUT_S))
            return
        from rich.console import Console
        from rich.live import Live

        from cli.status_view import print_status, status_view

        console = Console()
        if not watch:
            print_status(client.status(PING_TIMEOUT_S), str(obj.home), console)
            return
        with Live(console=console) as live:
            try:
                while True:
                    live.update(status_view(client.status(PING_TIMEOUT_S), str(obj.home),
                                            console.width))
                    time.sleep(1.0)  # the refresh period of --watch
            except KeyboardInterrupt:
                pass
