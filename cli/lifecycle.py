"""``orchestrator start``, ``stop`` and ``status``: the broker's processes and their state.

``start`` runs the broker (and the agents of ``--agents``) in the background, with the pid
files and logs in the data dir; ``stop`` ends them; ``status`` asks the running broker.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import orjson

from broker.config import DEFAULT_BIND, DURABILITIES, POLICIES
from cli.common import (
    EXIT_UNREACHABLE, PING_TIMEOUT_S, Context, emit_json, fail, json_option, read_broker_info,
)

if TYPE_CHECKING:
    from rich.console import Group

#: How long `start` waits for the broker to report ready.
START_TIMEOUT_S = 30.0
#: How long `stop` waits for a graceful exit before it kills.
STOP_TIMEOUT_S = 45.0

START_HELP = """Start the broker in the background (pid file and log in the data dir).

Returns once the broker answers. Built-in agents do not exist yet, so no agent is started
unless --agents names some: `--agents module:Class[=N],...` starts N processes of each.
"""


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (one of another user's counts as alive).

    Args:
        pid: The process id.

    Returns:
        True unless no such process exists.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_pid(path: Path) -> int | None:
    """The pid in a pid file, if that process is alive.

    Args:
        path: The pid file.

    Returns:
        The pid, or None when the file is missing, unreadable or its process is gone.
    """
    try:
        pid = int(path.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if pid_alive(pid) else None


# ---------------------------------------------------------------------- start


def _parse_agents(spec: str) -> list[tuple[str, int]]:
    """Parse ``--agents module:Class[=N],...`` into (``module:Class``, N) pairs.

    Raises:
        click.BadParameter: A part is not ``module:Class`` with an optional ``=N``.
    """
    agents = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, count = part.partition("=")
        if ":" not in name or (count and not count.isdigit()):
            raise click.BadParameter(f"expected module:Class[=N], got {part!r}", param_hint="--agents")
        agents.append((name, int(count or 1)))
    return agents


def _wait_json_line(proc: subprocess.Popen[bytes], timeout: float, what: str) -> dict[str, Any]:
    """The first stdout line of a started process (its ready report), parsed as JSON.

    Raises:
        click.ClickException: The process wrote nothing within ``timeout`` seconds.
    """
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready else b""
    if not line:
        code = proc.poll()
        raise click.ClickException(
            f"{what} did not start (exit code {code}); see the log for why")
    report: dict[str, Any] = orjson.loads(line)
    return report


def _spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    """Run ``python ARGS`` detached from this terminal, stderr appended to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as log_file:
        return subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=log_file,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def _report_running(home: Path, as_json: bool) -> bool:
    """Say so when the data dir's broker already runs.

    Returns:
        True when it runs (and was reported), so that `start` starts nothing.
    """
    running = read_pid(home / "broker.pid")
    if running is None:
        return False
    info = read_broker_info(home) or {}
    if as_json:
        emit_json({"status": "running", "pid": running, "endpoint": info.get("endpoint")})
    else:
        click.echo(f"already running (pid {running}) at {info.get('endpoint', '?')}")
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


def _start_agents(agents: list[tuple[str, int]], endpoint: str, home: Path) -> list[str]:
    """Start each agent's processes one at a time, each registered before the next.

    Returns:
        The agent ids, in the order they registered; their pid files are in ``home/agents``.
    """
    started = []
    for spec, replicas in agents:
        for _ in range(replicas):
            agent = _spawn(["-m", "agent_sdk", "run", spec, "--broker", endpoint],
                           home / "agents.log")
            registered = _wait_json_line(agent, START_TIMEOUT_S, f"agent {spec}")
            pid_dir = home / "agents"
            pid_dir.mkdir(exist_ok=True)
            (pid_dir / f"{registered['agent_id']}.pid").write_text(str(agent.pid))
            started.append(registered["agent_id"])
    return started


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


@click.command(help=START_HELP)
@click.option("--bind", default=DEFAULT_BIND, show_default=True, help="HOST:PORT of the broker.")
@click.option("--policy", type=click.Choice(POLICIES), default="capability", show_default=True)
@click.option("--durability", type=click.Choice(DURABILITIES), default="batch", show_default=True,
              help="Journal: none, batch (survives a crash) or fsync (survives power loss).")
@click.option("--agents", "agents_spec", default="", help="Agents to start: module:Class[=N],...")
@click.option("--no-agents", is_flag=True, help="Start no agents (the default for now).")
@click.option("--foreground", is_flag=True, help="Run the broker in this process.")
@click.option("--state-bind", default=None,
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
    home.mkdir(parents=True, exist_ok=True)
    proc = _spawn(broker_args, home / "broker.log")
    info = _wait_json_line(proc, START_TIMEOUT_S, "the broker")
    (home / "broker.pid").write_text(str(proc.pid))
    started = _start_agents(agents, info["endpoint"], home)
    _print_started(proc.pid, info, started, home, as_json)


# ---------------------------------------------------------------------- stop


def _terminate(pid: int, timeout: float) -> bool:
    """SIGTERM, wait for the exit; SIGKILL after ``timeout``.

    Returns:
        True if the process exited gracefully (or was already gone).
    """
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return True
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            waited, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            waited = 0
        if waited == pid or not pid_alive(pid):
            return True
        time.sleep(0.05)  # polling another process's exit: there is no event to wait on
    os.kill(pid, signal.SIGKILL)
    return False


def _take_agent_pids(home: Path) -> list[int]:
    """The pids of the data dir's live agents; every agent pid file is removed."""
    agent_pids = []
    pid_dir = home / "agents"
    if pid_dir.is_dir():
        for path in pid_dir.glob("*.pid"):
            agent_pid = read_pid(path)
            if agent_pid is not None:
                agent_pids.append(agent_pid)
            path.unlink(missing_ok=True)
    return agent_pids


@click.command(help="Stop the broker gracefully (in-flight work drains first) and its agents.")
@json_option()
@click.pass_obj
def stop(obj: Context, as_json: bool) -> None:
    """Stop the broker, then its agents; exit 3 when neither runs."""
    home = obj.home
    pid = read_pid(home / "broker.pid")
    agent_pids = _take_agent_pids(home)
    if pid is None and not agent_pids:
        (home / "broker.pid").unlink(missing_ok=True)
        fail(f"no broker is running for {home}", EXIT_UNREACHABLE)
    graceful = _terminate(pid, STOP_TIMEOUT_S) if pid is not None else True
    for agent_pid in agent_pids:
        _terminate(agent_pid, STOP_TIMEOUT_S)
    (home / "broker.pid").unlink(missing_ok=True)
    (home / "broker.json").unlink(missing_ok=True)
    if as_json:
        emit_json({"status": "stopped", "pid": pid, "graceful": graceful,
                   "agents_stopped": len(agent_pids)})
    else:
        click.echo(f"broker stopped (pid {pid})" + ("" if graceful else " (killed after timeout)"))


# ---------------------------------------------------------------------- status


def _status_table(status: dict[str, Any]) -> Group:
    """The status document as rich renderables: a summary grid, then one row per agent."""
    from rich.console import Group
    from rich.table import Table

    broker = status["broker"]
    tasks = status["tasks"]
    head = Table.grid(padding=(0, 2))
    head.add_row("broker", f"{broker['endpoint']}  pid {broker['pid']}  {broker['state']}  "
                 f"up {broker['uptime_s']:.0f} s  policy {broker['policy']}")
    head.add_row("queue", f"{status['queue']['pending']} pending (max {status['queue']['max_pending']})")
    head.add_row("tasks", "  ".join(f"{k} {v}" for k, v in tasks.items()))
    if status.get("errors"):
        head.add_row("errors", "  ".join(f"{k} {v}" for k, v in status["errors"].items()))
    messaging = status.get("messaging") or {}
    if messaging.get("bus"):
        bus = messaging["bus"]
        head.add_row("bus", f"out {bus['out']}  in {bus['in']}  "
                            f"{bus['subscribed_prefixes']} subscribed prefix(es)")
    if messaging.get("direct"):
        head.add_row("direct", "  ".join(f"{k} {v}" for k, v in messaging["direct"].items()))
    agents = Table(title=f"{len(status['agents'])} agent(s)", title_justify="left")
    for column in ("name", "id", "capabilities", "state", "in flight", "done", "failed",
                   "latency ms", "msgs lost"):
        agents.add_column(column, justify="right" if column in (
            "in flight", "done", "failed", "latency ms", "msgs lost") else "left")
    for agent in status["agents"]:
        counters = agent.get("messaging") or {}
        lost = sum(counters.get(k, 0) for k in ("bus_gaps", "bus_overflow", "mailbox_dropped",
                                                "broker_refused"))
        agents.add_row(agent["name"], agent["id"], ", ".join(agent["capabilities"]),
                       agent["state"], f"{agent['in_flight']}/{agent['max_concurrent']}",
                       str(agent["done"]), str(agent["failed"]), f"{agent['latency_ms']:.2f}",
                       str(lost))
    return Group(head, agents)


@click.command(help="Show the broker, its agents, the queue and task counts.")
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

        console = Console()
        if not watch:
            console.print(_status_table(client.status(PING_TIMEOUT_S)))
            return
        with Live(_status_table(client.status(PING_TIMEOUT_S)), console=console) as live:
            try:
                while True:
                    time.sleep(1.0)  # the refresh period of --watch
                    live.update(_status_table(client.status(PING_TIMEOUT_S)))
            except KeyboardInterrupt:
                pass
