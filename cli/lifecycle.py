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

import signal
import sys
import time
from contextlib import closing
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, Final

import click

from broker.config import DEFAULT_BIND, DURABILITIES, POLICIES
from cli.common import (
    BIND, EXIT_FAILED, EXIT_UNREACHABLE, EXIT_USAGE, PING_TIMEOUT_S, Context, DataDirCommand, emit_json,
    fail, json_option, lock_held, lock_holder, read_broker_info,
)
from cli.common import F, count
from cli.launch import RUNNER_PID, Launch, StartFailed, broker_pid_file
from nodes import PID_FILE
from cli.pool import AgentSpecs, parse_agents, say_llm_endpoint
from cli.processes import ProcessRef, end_process, log_tail, read_ref
from wire.limits import MAX_MESSAGE_BYTES_ENV

if TYPE_CHECKING:
    from rich.console import RenderableType

    from agent_sdk import SyncClient

#: How long `stop` waits for a graceful exit before it kills.
STOP_TIMEOUT_S: Final = 45.0

START_HELP = """Start the broker, the workflow runner and the agents, in the background
(lock, pid files and logs in the data dir).

Returns once every process answers. The standing workflow runner drives the runs of
`workflow run` and `submit TEXT` (--no-runner to skip it). The default pool of built-in
agents is reviewer x2, researcher, coder and synthesizer, each a process: built-in names
adjust it (`--agents reviewer=4,coder=0`), a `module:Class[=N]` spec replaces it (the
built-ins named beside it still start), and --no-agents starts none. The coder runs test
commands (`debugging`) only with --allow-commands. If anything does not come up,
everything this start started is stopped again, and the error names the log and prints
its last lines.
"""


_pid_file = broker_pid_file


# ---------------------------------------------------------------------- start


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
                 state_memory: bool, no_state: bool, no_bus: bool,
                 secure: bool = False) -> list[str]:
    """The ``python`` arguments that run the broker with `start`'s options."""
    broker_args = ["-m", "broker", "--bind", bind, "--data-dir", str(home), "--policy", policy,
                   "--durability", durability]
    broker_args += ["--state-bind", state_bind] if state_bind else []
    broker_args += ["--state-memory"] * state_memory + ["--no-state"] * no_state
    broker_args += ["--no-bus"] * no_bus + ["--secure"] * secure
    return broker_args


#: `start`'s limit options (docs/limits.md), each passed on to the broker as
#: ``--NAME VALUE``; unset, the broker's default applies.
LIMIT_OPTIONS: Final = (
    ("max-message-bytes", 1, "Largest frame any socket accepts (default 64 MiB); the "
                             "SDK refuses a bigger send with too_large."),
    ("max-header-bytes", 1, "Largest message header the broker decodes (default 4 MiB)."),
    ("max-pending-per-client", 1, "One client's unfinished tasks (default 50,000); more "
                                  "are refused with queue_full."),
    ("max-in-flight-per-client", 0, "One client's tasks on agents at once; more wait "
                                    "queued (default 0: no limit)."),
)


def limit_options(command: F) -> F:
    """Add the :data:`LIMIT_OPTIONS` to ``command``."""
    for name, low, help_text in reversed(LIMIT_OPTIONS):
        command = click.option(f"--{name}", type=count(low), default=None,
                               help=help_text)(command)
    return command


def _limit_args(limits: dict[str, int | None]) -> list[str]:
    """The broker arguments of the limit options given."""
    args: list[str] = []
    for name, _, _ in LIMIT_OPTIONS:
        value = limits.get(name.replace("-", "_"))
        if value is not None:
            args += [f"--{name}", str(value)]
    return args


def _warn_if_exposed(bind: str, state_bind: str | None) -> None:
    """Say on stderr when a plaintext broker listens where other machines reach it."""
    from broker.config import is_loopback, parse_host_port

    hosts = [parse_host_port(bind)[0]] + ([parse_host_port(state_bind)[0]] if state_bind
                                          else [])
    if not all(is_loopback(host) for host in hosts):
        click.echo(f"warning: {bind} (and the bus and state ports beside it) can be reached "
                   "from other machines without --secure: anyone who can reach them can "
                   "submit, run, cancel and read tasks, register agents, and read and write "
                   "shared state and the bus; use --secure (see the README, Security)",
                   err=True)


def _secure_home(home: Path) -> Any:
    """The data dir prepared for a secure broker (:func:`broker.security.prepare_secure_home`);
    exit 2 with one line on a key or permission problem."""
    from broker.security import prepare_secure_home
    from wire.curve import KeyFileError

    try:
        return prepare_secure_home(home)
    except KeyFileError as e:
        fail(f"--secure: {e}", EXIT_USAGE, {"home": str(home)})
    except OSError as e:
        fail(f"--secure: cannot create the keys in {home}: {e.strerror or e}", EXIT_FAILED,
             {"home": str(home)})


def secure_env(home: Path) -> tuple[dict[str, str], dict[str, str]]:
    """Prepare the data dir for a secure broker (its keys, the local admin key and the
    local agents' key, permissions checked) and return the variables that give the local
    runner the admin key, and those that give the agents theirs (role agent); exit 2
    with one line on a key or permission problem."""
    from wire.curve import ENV_KEY_FILE, ENV_SERVER_KEY

    keys = _secure_home(home)
    return ({ENV_SERVER_KEY: keys.broker_public, ENV_KEY_FILE: str(keys.local_secret_file)},
            {ENV_SERVER_KEY: keys.broker_public,
             ENV_KEY_FILE: str(keys.local_agent_secret_file)})


def node_env(home: Path) -> dict[str, str]:
    """The variables of this data dir's node supervisor on a secure broker: its own key
    (role node) and the key it gives its agents (role agent)."""
    from nodes.replicas import ENV_AGENT_KEY_FILE
    from wire.curve import ENV_KEY_FILE, ENV_SERVER_KEY

    keys = _secure_home(home)
    # Its own key is a node key; the one it gives its agents, an agent key.
    return {ENV_SERVER_KEY: keys.broker_public, ENV_KEY_FILE: str(keys.local_node_secret_file),
            ENV_AGENT_KEY_FILE: str(keys.local_agent_secret_file)}


def _print_started(pid: int, info: dict[str, Any], runner: dict[str, Any] | None,
                   started: list[str], home: Path, as_json: bool) -> None:
    """Report a started broker: its pid, endpoints, runner, agents and data dir."""
    if as_json:
        emit_json({"status": "started", "pid": pid, "endpoint": info["endpoint"],
                   "state": info.get("state"), "bus_out": info.get("bus_out"),
                   "bus_in": info.get("bus_in"), "events": info.get("events"),
                   "runner": None if runner is None else {"pid": runner.get("pid"),
                                                          "runner_id": runner.get("runner_id")},
                   "agents": started, "home": str(home)})
        return
    click.echo(f"broker started (pid {pid}) at {info['endpoint']}; data in {home}")
    if info.get("state"):
        click.echo(f"state service at {info['state']}")
    if info.get("bus_out"):
        click.echo(f"bus: subscribers connect to {info['bus_out']}, publishers to "
                   f"{info['bus_in']}; the broker's events at {info.get('events')}")
    if runner is not None:
        click.echo(f"workflow runner started (pid {runner.get('pid')})")
    if started:
        click.echo(f"agents: {', '.join(started)}")


def _undone(launch: Launch) -> str:
    """What a failed start stopped again, before the process that failed: for its
    message (empty when the broker itself failed)."""
    if launch.broker is None or (launch.runner is None and launch.node is None):
        return ""
    # The process that failed is the last one started: the runner, or the node
    # supervisor and its agents.
    earlier = ["the broker"]
    if launch.node is not None:
        if launch.runner is not None:
            earlier.append("the workflow runner")
        earlier.append("the node supervisor with its agents")
    if len(earlier) == 1:
        return "; the broker was stopped again"
    return f"; {', '.join(earlier[:-1])} and {earlier[-1]} were stopped again"


def _launch(home: Path, broker_args: list[str], agents: list[tuple[str, int]], runner: bool,
            agent_env: dict[str, str], secure_env: dict[str, str] | None,
            as_json: bool) -> None:
    """Start the broker, the workflow runner (when ``runner``) and the agents (a node
    supervisor runs them); on any failure stop them again and exit 1 with the log and
    its last lines."""
    launch = Launch(home, secure_env)
    try:
        info = launch.start_broker(broker_args)
        ready = launch.start_runner(info["endpoint"]) if runner else None
        node_keys = node_env(home) if secure_env is not None else {}
        started = launch.start_pool(agents, info["endpoint"], {**agent_env, **node_keys}) \
            if agents else []
    except StartFailed as e:
        undone = _undone(launch)
        stopped = launch.undo()
        fail(f"{e}{undone}. Its log is {e.log}; its last lines:", EXIT_FAILED,
             {"status": "failed", "log": str(e.log), "stopped": stopped, "home": str(home)},
             log_tail(e.log, e.offset))
    except BaseException:
        launch.undo()  # Ctrl-C, or a bug: leave nothing half-started behind
        raise
    assert launch.broker is not None
    _print_started(launch.broker.pid, info, ready, started, home, as_json)


@click.command(cls=DataDirCommand, help=START_HELP)
@click.option("--bind", type=BIND, default=DEFAULT_BIND, show_default=True,
              help="HOST:PORT of the broker.")
@click.option("--advertise", default=None, metavar="HOST",
              help="The host other machines reach the broker at, announced in every "
                   "endpoint (bus, state, events); default: each peer uses the address it "
                   "reached the broker at.")
@click.option("--policy", type=click.Choice(POLICIES), default="capability", show_default=True)
@click.option("--durability", type=click.Choice(DURABILITIES), default="batch", show_default=True,
              help="Journal: none, batch (survives a crash) or fsync (survives power loss).")
@click.option("--agents", "agents_spec", type=AgentSpecs(), default="",
              help="Adjust the default pool (reviewer=4,coder=0) or replace it "
                   "(module:Class[=N],...).")
@click.option("--no-agents", is_flag=True, help="Start no agents.")
@click.option("--allow-commands", is_flag=True,
              help="Let the coder run test commands on the files of `debugging` tasks (in a "
                   "throwaway copy, with time and memory limits, no network).")
@click.option("--foreground", is_flag=True, help="Run the broker in this process.")
@click.option("--state-bind", type=BIND, default=None,
              help="HOST:PORT of the state service. Default: the broker's port + 3.")
@click.option("--state-memory", is_flag=True, help="Keep shared state in memory only.")
@click.option("--no-state", is_flag=True, help="Do not run the state service.")
@click.option("--no-bus", is_flag=True, help="Do not run the pub/sub forwarder.")
@click.option("--secure", is_flag=True, envvar="ORCH_SECURE",
              help="CURVE encryption and key authentication on every socket (also "
                   "ORCH_SECURE=1). Keys in DATA_DIR/keys; see `orchestrator keys`.")
@click.option("--no-runner", is_flag=True,
              help="Do not start the standing workflow runner (it drives the workflow runs "
                   "submitted from the CLI; none starts with --no-state either).")
@limit_options
@json_option()
@click.pass_obj
def start(obj: Context, bind: str, advertise: str | None, policy: str, durability: str,
          agents_spec: str,
          no_agents: bool, foreground: bool, state_bind: str | None, state_memory: bool,
          no_state: bool, no_bus: bool, no_runner: bool, allow_commands: bool,
          secure: bool, as_json: bool, max_message_bytes: int | None,
          max_header_bytes: int | None, max_pending_per_client: int | None,
          max_in_flight_per_client: int | None) -> None:
    """Start the broker, the workflow runner and the agents, unless the broker already
    runs."""
    home = obj.home
    # Parsed first, so that a bad --agents is a usage error before anything starts.
    if no_agents and agents_spec:
        raise click.UsageError("--agents and --no-agents contradict each other; give one")
    agents = [] if no_agents else parse_agents(agents_spec)
    if _report_running(home, as_json):
        return
    broker_args = _broker_args(home, bind, policy, durability, state_bind, state_memory,
                               no_state, no_bus, secure) + \
        (["--advertise", advertise] if advertise else []) + _limit_args({
        "max_message_bytes": max_message_bytes, "max_header_bytes": max_header_bytes,
        "max_pending_per_client": max_pending_per_client,
        "max_in_flight_per_client": max_in_flight_per_client})
    # Before anything creates the data dir: a secure one is made 0700.
    runner_env, agent_keys = secure_env(home) if secure else (None, {})
    if not secure:
        _warn_if_exposed(bind, state_bind)
    if foreground:
        from broker.__main__ import main as broker_main

        sys.exit(broker_main(broker_args[2:]))
    try:
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        fail(f"cannot create the data dir {home}: {e.strerror or e}", EXIT_FAILED,
             {"home": str(home)})
    # What a killed broker left: its endpoint would only time out.
    (home / "broker.json").unlink(missing_ok=True)
    if agents:
        say_llm_endpoint()
    agent_env = {"ORCH_ALLOW_COMMANDS": "1"} if allow_commands else {}
    agent_env.update(agent_keys)
    if max_message_bytes:
        # Its agents accept frames as big as the broker's limit (fixed at connect).
        agent_env[MAX_MESSAGE_BYTES_ENV] = str(max_message_bytes)
    _launch(home, broker_args, agents, not (no_runner or no_state), agent_env, runner_env,
            as_json)


def _llm_usage(status: dict[str, Any]) -> dict[str, Any] | None:
    """The agents' LLM token usage and the budgets, from the state service (None when
    it does not answer or no agent called an LLM)."""
    url = (status.get("broker", {}).get("endpoints") or {}).get("state")
    if not url:
        return None
    from agent_sdk import OrchestratorError, SyncStateClient
    from agent_sdk.llm import read_usage

    try:
        with closing(SyncStateClient(str(url))) as state:
            state.connect(PING_TIMEOUT_S)
            usage = read_usage(state)
    except OrchestratorError:
        return None
    return usage if usage["agents"] or usage["budgets"] else None


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


def _take(path: Path) -> ProcessRef | None:
    """The process a pid file names, if it runs; the pid file is removed."""
    ref = read_ref(path)
    try:
        path.unlink(missing_ok=True)
    except OSError:  # a data dir that cannot exist (a name too long...): nothing there
        pass
    return ref


def runner_state(home: Path) -> dict[str, Any] | None:
    """The standing workflow runner `start` launched for the data dir, for `status`:
    ``{"pid", "running"}``, or None when `start` launched none (or it was stopped)."""
    path = home / RUNNER_PID
    try:
        ref = ProcessRef.parse(path.read_text())
    except OSError:
        return None
    return None if ref is None else {"pid": ref.pid, "running": ref.alive()}


@click.command(cls=DataDirCommand,
               help="Stop the workflow runner, then the broker gracefully (in-flight work "
                    "drains first), then its agents.")
@json_option()
@click.pass_obj
def stop(obj: Context, as_json: bool) -> None:
    """Stop the runner, the broker, then its agents; exit 3 when none of them runs."""
    home = obj.home
    agents = _take_agents(home)
    runner = _take(home / RUNNER_PID)
    node = _take(home / PID_FILE)
    if not lock_held(home) and not agents and runner is None and node is None:
        _pid_file(home).unlink(missing_ok=True)
        fail(f"no broker is running for the data dir {home} ({obj.home_source})",
             EXIT_UNREACHABLE, {"home": str(home)})
    # The runner first: it lets go of the runs it drives while the broker still answers.
    if runner is not None:
        end_process(runner.pid, runner.gone, STOP_TIMEOUT_S)
    # Then the node supervisor, which drains its agents: what they cannot finish in time
    # they hand back to the broker, which keeps it in its journal.
    if node is not None:
        end_process(node.pid, node.gone, STOP_TIMEOUT_S)
    pid, graceful = _stop_broker(home)
    for agent in agents:
        end_process(agent.pid, agent.gone, STOP_TIMEOUT_S)
    _pid_file(home).unlink(missing_ok=True)
    (home / "broker.json").unlink(missing_ok=True)
    if as_json:
        emit_json({"status": "stopped", "pid": pid, "graceful": graceful,
                   "runner_stopped": runner.pid if runner is not None else None,
                   "node_stopped": node.pid if node is not None else None,
                   "agents_stopped": len(agents), "home": str(home)})
    elif pid is None:
        click.echo(f"no broker was running; {len(agents)} agent(s) stopped"
                   + (f", the workflow runner (pid {runner.pid}) stopped" if runner else ""))
    else:
        if node is not None:
            click.echo(f"node supervisor stopped (pid {node.pid}); its agents drained")
        click.echo(f"broker stopped (pid {pid})" + ("" if graceful else " (killed after timeout)"))


# ---------------------------------------------------------------------- status


#: How often ``status --watch`` asks the broker again, in seconds.
WATCH_PERIOD_S: Final = 1.0


@click.command(cls=DataDirCommand,
               help="Show the broker, its data dir and storage, its agents (state, health, "
                    "circuit breaker, in flight / max, done, failed, p50 latency), the queue "
                    "by capability and the task counts.")
@json_option("Print the status as JSON (once; not with --watch).")
@click.option("--watch", is_flag=True,
              help="Refresh in place every second until Ctrl-C (exit 0); while the broker "
                   "does not answer, say so and keep asking.")
@click.pass_obj
def status(obj: Context, as_json: bool, watch: bool) -> None:
    """Print the broker's status once, or refresh it every second with ``--watch``;
    the standing workflow runner `start` launched is shown under ``runner``."""
    if watch and as_json:
        # A stream of documents would break "--json prints exactly one JSON document".
        raise click.UsageError("--watch and --json cannot be used together; for a JSON "
                               "feed run `status --json` in a loop or use `events --json`")
    if watch:
        _watch_status(obj)
        return
    with closing(obj.client()) as client:
        if as_json:
            emit_json(_status_document(obj, client))
            return
        from cli.status_view import print_status

        print_status(_status_document(obj, client), str(obj.home))


def _status_document(obj: Context, client: SyncClient) -> dict[str, Any]:
    """The broker's status, with the workflow runner and the LLM token usage added."""
    found = client.status(PING_TIMEOUT_S)
    found["runner"] = runner_state(obj.home)
    found["llm"] = _llm_usage(found)
    return found


def _end_watch(signum: int, frame: FrameType | None) -> None:
    """The first Ctrl-C ends the watch; ignore the next ones, so that pressing it again
    while the display and the client close cannot break them with a traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def _watch_status(obj: Context) -> None:
    """``status --watch``: redraw the status in place every :data:`WATCH_PERIOD_S` until
    Ctrl-C, which exits 0 with the terminal restored.

    Exits 3 (one line) only when the broker does not answer at the start. Once watching,
    a broker that stops answering is one line in place of the status, and the watch
    keeps asking; the data dir's ``broker.json`` is read again each time, so a broker
    started anew on another port is found.
    """
    from rich.console import Console
    from rich.live import Live
    from rich.text import Text

    from agent_sdk import BrokerUnavailable, SyncClient
    from cli.common import open_client
    from cli.status_view import status_view

    # Installed only over Python's own handler: a watch started in the background of a
    # script, with SIGINT ignored, keeps ignoring it.
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _end_watch)
    console = Console()
    client: SyncClient | None = None
    try:
        url = obj.broker_url
        client = obj.client()
        lost_since: float | None = None
        # No refresh thread: the view changes once a period, when it is redrawn.
        with Live(console=console, auto_refresh=False) as live:
            while True:
                try:
                    view: RenderableType = status_view(_status_document(obj, client),
                                                       str(obj.home), console.width)
                    lost_since = None
                except BrokerUnavailable:
                    lost_since = lost_since or time.time()
                    view = Text(f"{time.strftime('%H:%M:%S')}  the broker at {url} is not "
                                "answering (since "
                                f"{time.strftime('%H:%M:%S', time.localtime(lost_since))}); "
                                "still asking, Ctrl-C to stop", style="bold red",
                                no_wrap=True, overflow="ellipsis")  # one line, in place
                    moved = obj.broker_url
                    if moved != url:
                        client.close()
                        client = None  # closed: not to be closed again below
                        url, client = moved, open_client(SyncClient, moved)
                live.update(view, refresh=True)
                time.sleep(WATCH_PERIOD_S)  # the refresh period, not a synchronisation
    except KeyboardInterrupt:
        pass  # Ctrl-C is how a watch ends: exit 0, Live has restored the cursor
    finally:
        if client is not None:
            client.close()
