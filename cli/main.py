"""The ``orchestrator`` command line: start and stop the broker, submit work, inspect it.

Exit codes: 0 success, 1 task failed or not found, 2 usage error, 3 broker unreachable.
Every command that prints data takes ``--json`` and then prints exactly one JSON document.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import click
import orjson

from broker import __version__
from broker.config import DEFAULT_BIND, DURABILITIES, POLICIES, home_dir

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3

#: How long `start` waits for the broker to report ready.
START_TIMEOUT_S = 30.0
#: How long a command waits for the broker to answer before calling it unreachable.
PING_TIMEOUT_S = 3.0
#: How long `stop` waits for a graceful exit before it kills.
STOP_TIMEOUT_S = 45.0

HELP = "Orchestrator: run many AI agents as processes and coordinate them through a broker."
START_HELP = """Start the broker in the background (pid file and log in the data dir).

Returns once the broker answers. Built-in agents do not exist yet, so no agent is started
unless --agents names some: `--agents module:Class[=N],...` starts N processes of each.
"""


def _json_default(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)


def emit_json(document: Any) -> None:
    """Print one JSON document on stdout."""
    click.echo(orjson.dumps(document, default=_json_default,
                            option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS).decode())


def fail(message: str, code: int) -> NoReturn:
    """One line on stderr, then exit with ``code``."""
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


class Context:
    """Options every command shares."""

    def __init__(self, home: Path, broker: str | None) -> None:
        self.home = home
        self._broker = broker

    @property
    def broker_url(self) -> str:
        if self._broker:
            return self._broker
        info = read_broker_info(self.home)
        if info is not None:
            return str(info["endpoint"])
        return os.environ.get("ORCH_BROKER", f"tcp://{DEFAULT_BIND}")

    def client(self) -> Any:
        """A SyncClient that answered a ping, or exit 3."""
        from agent_sdk import BrokerUnavailable, SyncClient

        client = SyncClient(self.broker_url)
        try:
            client.ping(PING_TIMEOUT_S)
        except BrokerUnavailable:
            client.close()
            fail(f"the broker at {self.broker_url} is not answering; start it with "
                 "`orchestrator start` (or pass --broker URL)", EXIT_UNREACHABLE)
        return client


def read_broker_info(home: Path) -> dict[str, Any] | None:
    try:
        info = orjson.loads((home / "broker.json").read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    return info if isinstance(info, dict) and "endpoint" in info else None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_pid(path: Path) -> int | None:
    try:
        pid = int(path.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if pid_alive(pid) else None


@click.group(help=HELP)
@click.version_option(__version__, prog_name="orchestrator")
@click.option("--home", type=click.Path(path_type=Path), default=None, envvar="ORCH_HOME",
              help="Data dir (pid file, logs, journal). Default: ./.orchestrator")
@click.option("--broker", "broker_url", default=None,
              help="Broker URL. Default: the running broker of the data dir, else $ORCH_BROKER.")
@click.pass_context
def main(ctx: click.Context, home: Path | None, broker_url: str | None) -> None:
    ctx.obj = Context(home or home_dir(), broker_url)


# ---------------------------------------------------------------------- start / stop


def _parse_agents(spec: str) -> list[tuple[str, int]]:
    agents = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, count = part.partition("=")
        if ":" not in name or (count and not count.isdigit()):
            raise click.BadParameter(f"expected module:Class[=N], got {part!r}", param_hint="--agents")
        agents.append((name, int(count or 1)))
    return agents


def _wait_json_line(proc: subprocess.Popen[bytes], timeout: float, what: str) -> dict[str, Any]:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready else b""
    if not line:
        code = proc.poll()
        raise click.ClickException(
            f"{what} did not start (exit code {code}); see the log for why")
    return orjson.loads(line)


def _spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as log_file:
        return subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=log_file,
                                stdin=subprocess.DEVNULL, start_new_session=True)


@main.command(help=START_HELP)
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
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_obj
def start(obj: Context, bind: str, policy: str, durability: str, agents_spec: str,
          no_agents: bool, foreground: bool, state_bind: str | None, state_memory: bool,
          no_state: bool, no_bus: bool, as_json: bool) -> None:
    home = obj.home
    agents = [] if no_agents else _parse_agents(agents_spec)
    running = read_pid(home / "broker.pid")
    if running is not None:
        info = read_broker_info(home) or {}
        message = f"already running (pid {running}) at {info.get('endpoint', '?')}"
        if as_json:
            emit_json({"status": "running", "pid": running, "endpoint": info.get("endpoint")})
        else:
            click.echo(message)
        return
    broker_args = ["-m", "broker", "--bind", bind, "--data-dir", str(home), "--policy", policy,
                   "--durability", durability]
    broker_args += ["--state-bind", state_bind] if state_bind else []
    broker_args += ["--state-memory"] * state_memory + ["--no-state"] * no_state
    broker_args += ["--no-bus"] * no_bus
    if foreground:
        from broker.__main__ import main as broker_main

        sys.exit(broker_main(broker_args[2:]))
    home.mkdir(parents=True, exist_ok=True)
    proc = _spawn(broker_args, home / "broker.log")
    info = _wait_json_line(proc, START_TIMEOUT_S, "the broker")
    (home / "broker.pid").write_text(str(proc.pid))
    started = []
    for spec, replicas in agents:
        for _ in range(replicas):
            agent = _spawn(["-m", "agent_sdk", "run", spec, "--broker", info["endpoint"]],
                           home / "agents.log")
            registered = _wait_json_line(agent, START_TIMEOUT_S, f"agent {spec}")
            pid_dir = home / "agents"
            pid_dir.mkdir(exist_ok=True)
            (pid_dir / f"{registered['agent_id']}.pid").write_text(str(agent.pid))
            started.append(registered["agent_id"])
    if as_json:
        emit_json({"status": "started", "pid": proc.pid, "endpoint": info["endpoint"],
                   "state": info.get("state"), "bus_out": info.get("bus_out"),
                   "bus_in": info.get("bus_in"), "agents": started, "home": str(home)})
    else:
        click.echo(f"broker started (pid {proc.pid}) at {info['endpoint']}; data in {home}")
        if info.get("state"):
            click.echo(f"state service at {info['state']}")
        if info.get("bus_out"):
            click.echo(f"bus: subscribers connect to {info['bus_out']}, publishers to "
                       f"{info['bus_in']}")
        if started:
            click.echo(f"agents: {', '.join(started)}")


def _terminate(pid: int, timeout: float) -> bool:
    """SIGTERM, wait for the exit; SIGKILL after ``timeout``. True if it exited gracefully."""
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


@main.command(help="Stop the broker gracefully (in-flight work drains first) and its agents.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_obj
def stop(obj: Context, as_json: bool) -> None:
    home = obj.home
    pid = read_pid(home / "broker.pid")
    agent_pids = []
    pid_dir = home / "agents"
    if pid_dir.is_dir():
        for path in pid_dir.glob("*.pid"):
            agent_pid = read_pid(path)
            if agent_pid is not None:
                agent_pids.append(agent_pid)
            path.unlink(missing_ok=True)
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


def _status_table(status: dict[str, Any]) -> Any:
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


@main.command(help="Show the broker, its agents, the queue and task counts.")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@click.option("--watch", is_flag=True, help="Refresh every second until Ctrl-C.")
@click.pass_obj
def status(obj: Context, as_json: bool, watch: bool) -> None:
    client = obj.client()
    try:
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
    finally:
        client.close()


# ---------------------------------------------------------------------- tasks


def _print_result(result: Any, as_json: bool) -> None:
    if as_json:
        emit_json(result.to_dict())
        return
    if result.error is not None:
        click.echo(f"{result.task_id}: {result.status}: {result.error}", err=True)
        return
    data = result.data
    if isinstance(data, str):
        click.echo(data)
    else:
        emit_json(data)


def _exit_for(result: Any) -> NoReturn:
    sys.exit(EXIT_OK if result.ok else EXIT_FAILED)


@main.command(help="""Submit a task and (unless --no-wait) print its result.

TEXT becomes the task's `text` field. Without --capability or --agent the task goes to
any agent (the planner that turns TEXT into a workflow comes later).""")
@click.argument("text")
@click.option("--capability", "-c", "capabilities", multiple=True,
              help="A capability the agent must have (repeatable).")
@click.option("--agent", default=None, help="The agent name (or id) to run it.")
@click.option("--payload", default=None, help="JSON data for the task (task.data).")
@click.option("--timeout", type=click.FloatRange(min=0.001), default=None,
              help="Seconds the task may take, queueing included.")
@click.option("--retries", type=click.IntRange(min=0), default=None, help="Retries on failure.")
@click.option("--priority", type=int, default=0, show_default=True)
@click.option("--id", "task_id", default=None, help="Task id (the idempotency key).")
@click.option("--no-wait", is_flag=True, help="Return once the broker accepted the task.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_obj
def submit(obj: Context, text: str, capabilities: tuple[str, ...], agent: str | None,
           payload: str | None, timeout: float | None, retries: int | None, priority: int,
           task_id: str | None, no_wait: bool, as_json: bool) -> None:
    options: dict[str, Any] = {}
    if payload is not None:
        try:
            options["data"] = orjson.loads(payload)
        except orjson.JSONDecodeError as e:
            raise click.BadParameter(f"not valid JSON: {e}", param_hint="--payload") from None
    client = obj.client()
    try:
        handle = client.submit(text, capabilities=capabilities, agent=agent, timeout=timeout,
                               retries=retries, priority=priority, task_id=task_id, **options)
        if no_wait:
            handle.wait_accepted(PING_TIMEOUT_S)
            # A fast task may already be done: say so, but print the same shape.
            outcome = handle.result() if handle.done() else None
            if outcome is not None and outcome.status == "rejected":
                _print_result(outcome, as_json)
                _exit_for(outcome)
            if as_json:
                emit_json({"task_id": handle.id,
                           "status": "accepted" if outcome is None else outcome.status})
            else:
                click.echo(handle.id)
            return
        result = _wait_with_progress(handle, timeout, as_json)
        _print_result(result, as_json)
        _exit_for(result)
    finally:
        client.close()


def _wait_with_progress(handle: Any, timeout: float | None, quiet: bool) -> Any:
    """Wait for the result, showing a spinner on stderr when it is a terminal."""
    from agent_sdk import WaitTimeout

    # The broker ends the task at its own deadline; give its answer time to arrive.
    wait_s = None if timeout is None else timeout + PING_TIMEOUT_S
    if quiet or not sys.stderr.isatty():
        try:
            return handle.result(wait_s)
        except WaitTimeout:
            fail(f"no result for {handle.id} yet; check later with `orchestrator result "
                 f"{handle.id}`", EXIT_FAILED)
    from rich.console import Console

    with Console(stderr=True).status(f"waiting for {handle.id}"):
        try:
            return handle.result(wait_s)
        except WaitTimeout:
            fail(f"no result for {handle.id} yet; check later with `orchestrator result "
                 f"{handle.id}`", EXIT_FAILED)


@main.command(help="Print a task's result (or its state, if it has not finished).")
@click.argument("task_id")
@click.option("--wait", is_flag=True, help="Wait until the task finishes.")
@click.option("--timeout", type=float, default=None, help="With --wait: give up after S seconds.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_obj
def result(obj: Context, task_id: str, wait: bool, timeout: float | None, as_json: bool) -> None:
    from agent_sdk import TaskNotFound

    client = obj.client()
    try:
        try:
            found = client.fetch(task_id, PING_TIMEOUT_S)
        except TaskNotFound as e:
            fail(str(e), EXIT_FAILED)
        if not found.finished:
            if not wait:
                if as_json:
                    emit_json(found.to_dict())
                else:
                    click.echo(f"{task_id}: {found.status}")
                return
            found = _wait_with_progress(client.watch(task_id), timeout, as_json)
        _print_result(found, as_json)
        _exit_for(found)
    finally:
        client.close()


@main.command(help="Cancel a task: pending ones are dropped, running ones stopped.")
@click.argument("task_id")
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON.")
@click.pass_obj
def cancel(obj: Context, task_id: str, as_json: bool) -> None:
    from agent_sdk import TaskNotFound

    client = obj.client()
    try:
        try:
            before = client.fetch(task_id, PING_TIMEOUT_S)
        except TaskNotFound as e:
            fail(str(e), EXIT_FAILED)
        if before.finished:
            outcome = {"task_id": task_id, "status": before.status, "cancelled": False}
        else:
            client.cancel(task_id)
            after = client.watch(task_id).result(PING_TIMEOUT_S)
            outcome = {"task_id": task_id, "status": after.status,
                       "cancelled": after.status == "cancelled"}
        if as_json:
            emit_json(outcome)
        else:
            click.echo(f"{task_id}: {outcome['status']}")
    finally:
        client.close()


def _print_trace(document: dict[str, Any], indent: int = 0) -> None:
    pad = "  " * indent
    error = document.get("error")
    line = f"{pad}{document['task_id']}  {document['status']}"
    if document.get("agent"):
        line += f"  on {document['agent']}"
    if document.get("attempts"):
        line += f"  attempts {document['attempts']}"
    if error:
        line += f"  ({error['code']}: {error['message']})"
    click.echo(line)
    start = None
    for event in document.get("timeline", []):
        start = event["at"] if start is None else start
        detail = f"  {event['detail']}" if event["detail"] else ""
        click.echo(f"{pad}  +{(event['at'] - start) * 1000:10.3f} ms  {event['event']}{detail}")
    for child in document.get("children", []):
        _print_trace(child, indent + 1)


@main.command(help="Show a task's timeline (every state change) and its subtask tree.")
@click.argument("task_id")
@click.option("--json", "as_json", is_flag=True, help="Print the trace as JSON.")
@click.pass_obj
def trace(obj: Context, task_id: str, as_json: bool) -> None:
    from agent_sdk import TaskNotFound

    client = obj.client()
    try:
        try:
            document = client.trace(task_id, PING_TIMEOUT_S)
        except TaskNotFound as e:
            fail(str(e), EXIT_FAILED)
    finally:
        client.close()
    if as_json:
        emit_json(document)
    else:
        _print_trace(document)


@main.command(help="""List finished tasks the broker retains, newest first.

With --failed: the dead letters, tasks that failed or timed out after their retries,
with their last error.""")
@click.option("--failed", is_flag=True, help="Only tasks that failed or timed out.")
@click.option("--status", "statuses", multiple=True,
              type=click.Choice(["succeeded", "failed", "timed_out", "cancelled", "rejected"]),
              help="Only tasks with this status (repeatable).")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON.")
@click.pass_obj
def tasks(obj: Context, failed: bool, statuses: tuple[str, ...], limit: int,
          as_json: bool) -> None:
    wanted = list(statuses) + (["failed", "timed_out"] if failed else [])
    client = obj.client()
    try:
        listed = client.tasks(wanted or None, limit, PING_TIMEOUT_S)
    finally:
        client.close()
    if as_json:
        emit_json(listed)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{len(listed)} task(s)", title_justify="left")
    for column in ("task", "status", "attempts", "agent", "error"):
        table.add_column(column)
    for task in listed:
        error = task["error"]
        table.add_row(task["task_id"], task["status"], str(task["attempts"]), task["agent"] or "",
                      f"{error['code']}: {error['message']}" if error else "")
    Console().print(table)


from cli.bench import bench as _bench_group  # noqa: E402 - it imports this module's helpers
from cli.state import state as _state_group  # noqa: E402

main.add_command(_bench_group)
main.add_command(_state_group)


if __name__ == "__main__":
    main()
