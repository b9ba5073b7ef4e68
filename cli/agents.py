"""``orchestrator agents``: agent pools run by node supervisors, resized through the broker.

A node supervisor (``python -m nodes``, one per machine and data dir) keeps replicas of
the agents of its catalogue running and reports to the broker; the broker keeps each
agent's desired total and spreads it over the nodes that can run it (``docs/deployment.md``).

- ``agents start NAME|module:Class [--replicas N]``: start (or reuse) this machine's
  supervisor, add a ``module:Class`` to its catalogue, and set the desired total;
- ``agents scale NAME --replicas N``: set the desired total from any machine;
- ``agents stop NAME``: scale to 0 (its replicas drain: none of their tasks is lost);
- ``agents status``: desired against running, per agent and per node;
- ``agents submit TEXT``: the seed's alias of ``submit``.
"""

from __future__ import annotations

import time
from contextlib import closing
from pathlib import Path
from typing import Any, Final

import click
import orjson

from cli.common import (
    EXIT_FAILED,
    EXIT_UNAUTHORIZED,
    EXIT_UNREACHABLE,
    SECONDS,
    Context,
    DataDirCommand,
    DataDirGroup,
    answered_or_exit,
    count,
    emit_json,
    fail,
    json_option,
    open_client,
)
from cli.pool import BUILT_INS
from nodes.catalogue import CATALOGUE_FILE as NODE_CONFIG
from nodes import PID_FILE as NODE_PID

#: How long `agents start` and `scale --wait` wait for the replicas by default.
WAIT_TIMEOUT_S: Final = 60.0
#: Between two looks at the broker's status while waiting.
POLL_S: Final = 0.2

CRASH_DEFAULTS: Final = ("A supervisor restarts a crashed replica with back-off and gives "
                         "up after 5 crashes within 60 s (a crash loop: `agents status` "
                         "and the events show it); a later `agents start` or `agents "
                         "scale` of that agent tries again.")


class AgentName(click.ParamType):
    """An agent's name as a pool knows it: a built-in name or ``module:Class``, 1 to 256
    printable characters (what the broker accepts in SCALE)."""

    name = "NAME"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> str:
        from wire.nodes import MAX_NAME_CHARS

        text = str(value)
        if not text or len(text) > MAX_NAME_CHARS or not text.isprintable() or \
                text != text.strip():
            self.fail(f"an agent name is 1 to {MAX_NAME_CHARS} printable characters "
                      f"without surrounding spaces (a built-in: {', '.join(BUILT_INS)}; or "
                      f"module:Class), got {text[:60]!r}", param, ctx)
        return text


class StartableAgent(AgentName):
    """``agents start``'s NAME: a built-in agent, or a ``module:Class`` this machine can
    import (a node runs what its catalogue lists; a class that cannot load would only
    crash until its supervisor gave up)."""

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> str:
        name = super().convert(value, param, ctx)
        if name in BUILT_INS:
            return name
        if ":" not in name:
            self.fail(f"{name!r} is neither a built-in agent ({', '.join(BUILT_INS)}) nor "
                      "module:Class", param, ctx)
        from cli.pool import check_importable

        try:
            check_importable(name)
        except ValueError as e:
            self.fail(str(e), param, ctx)
        return name


AGENT_NAME = AgentName()
STARTABLE_AGENT = StartableAgent()


@click.group(cls=DataDirGroup, help="\n\n".join(__doc__.split("\n\n")[1:3]).replace("``", "`")
             .replace("\n- ", "\n\b\n- ", 1),
             short_help="Agent pools: start, scale, stop, status.")
def agents() -> None:
    """The ``agents`` command group."""


def _client(obj: Context) -> Any:
    from agent_sdk import BrokerUnavailable, SyncClient

    url = obj.broker_url
    client = open_client(SyncClient, url)
    answered_or_exit(client, client.ping, BrokerUnavailable,
                     f"{obj.unreachable_message(url)}; agent pools are run through the "
                     "broker (`orchestrator start --no-agents` starts one)")
    return client


def _scale(client: Any, name: str, replicas: int) -> Any:
    """SCALE through the broker, or exit with its refusal."""
    from agent_sdk import BrokerUnavailable, RequestRefused

    try:
        return client.scale(name, replicas)
    except RequestRefused as e:
        fail(str(e), EXIT_UNAUTHORIZED if e.code == "unauthorized" else EXIT_FAILED,
             {"code": e.code})
    except BrokerUnavailable as e:
        fail(f"the broker did not answer the scale: {e}", EXIT_UNREACHABLE)


def _pool(client: Any, name: str) -> dict[str, Any]:
    return dict(client.status().get("pools", {}).get(name) or {})


def _wait_running(client: Any, name: str, replicas: int, timeout: float,
                  as_json: bool) -> dict[str, Any]:
    """Wait until ``replicas`` of ``name`` run (as the nodes report), or a node gives up
    on it; the pool's document at the end. Progress on stderr."""
    deadline = time.monotonic() + timeout
    shown = -1
    while True:
        pool = _pool(client, name)
        running = int(pool.get("running") or 0)
        if running != shown and not as_json:
            click.echo(f"{name}: {running} of {replicas} running", err=True)
            shown = running
        if running == replicas or pool.get("failing") or time.monotonic() >= deadline:
            return pool
        time.sleep(POLL_S)


def _report(name: str, reply: Any, pool: dict[str, Any], as_json: bool) -> None:
    """Print a scale's outcome; exit 1 when a node gave up on the agent or it is short."""
    failing = pool.get("failing") or {}
    running = int(pool.get("running") or 0)
    document = {"agent": name, "desired": reply.desired, "placement": reply.nodes,
                "running": running, "failing": failing}
    if as_json:
        emit_json(document)
    else:
        where = ", ".join(f"{node} {n}" for node, n in sorted(reply.nodes.items())) or "none"
        click.echo(f"{name}: {reply.desired} desired ({where}), {running} running")
        for node, why in sorted(failing.items()):
            click.echo(f"  {node}: {why}", err=True)
    if failing:
        raise SystemExit(EXIT_FAILED)


# ---------------------------------------------------------------- the supervisor


def _supervisor_alive(home: Path) -> bool:
    from cli.processes import read_ref

    return read_ref(home / NODE_PID) is not None


def add_to_catalogue(home: Path, spec: str) -> bool:
    """Add ``spec`` to this machine's node catalogue (``HOME/node.json``); True when it
    was not there (a running supervisor re-reads the file when it changes)."""
    path = home / NODE_CONFIG
    try:
        config = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        config = {}
    except (OSError, orjson.JSONDecodeError) as e:
        fail(f"cannot read the node configuration {path}: {e}; fix or remove it",
             EXIT_FAILED)
    catalogue = list(config.get("catalogue") or [])
    if spec in catalogue:
        return False
    catalogue.append(spec)
    config["catalogue"] = catalogue
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(config, option=orjson.OPT_INDENT_2))
    return True


def ensure_supervisor(home: Path, url: str, secure: bool) -> None:
    """Start this data dir's node supervisor unless it runs; wait for its ready line."""
    if _supervisor_alive(home):
        return
    from cli.launch import StartFailed, start_supervisor
    from cli.lifecycle import node_env

    try:
        start_supervisor(home, url, node_env(home) if secure else None)
    except StartFailed as e:
        fail(f"{e}; see {e.log}", EXIT_FAILED)


def _wait_catalogue(client: Any, name: str, timeout: float) -> None:
    """Wait until a live node lists ``name`` (a supervisor re-reads its catalogue file
    and reports within a heartbeat interval)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for node in client.status().get("nodes", []):
            if node.get("state") == "live" and name in node.get("catalogue", ()):
                return
        time.sleep(POLL_S)
    fail(f"no node supervisor lists {name!r} after {timeout:g} s; see "
         f"`orchestrator agents status` and the node log", EXIT_FAILED)


def _secure_broker(client: Any) -> bool:
    return bool(client.status().get("broker", {}).get("secure"))


# ---------------------------------------------------------------- commands


@agents.command("start", cls=DataDirCommand, help=f"""Run NAME (a built-in agent:
{", ".join(BUILT_INS)}; or module:Class) with N replicas in total, starting this machine's
node supervisor if it does not run. A module:Class is added to this machine's node
catalogue ({NODE_CONFIG} in the data dir): a node runs only what its catalogue lists.
Waits until the replicas run (progress on stderr). {CRASH_DEFAULTS}""")
@click.argument("name", type=STARTABLE_AGENT)
@click.option("--replicas", type=count(0, 1024), default=1, show_default=True,
              help="Replicas in total, over every node that can run it.")
@click.option("--timeout", type=SECONDS, default=WAIT_TIMEOUT_S, show_default=True,
              help="Seconds to wait for the replicas to run.")
@json_option("Print {agent, desired, placement, running, failing} as JSON.")
@click.pass_obj
def start(obj: Context, name: str, replicas: int, timeout: float, as_json: bool) -> None:
    """Start this machine's supervisor if needed, list NAME in its catalogue, scale."""
    home = obj.home
    client = _client(obj)
    with closing(client):
        added = ":" in name and add_to_catalogue(home, name)
        ensure_supervisor(home, obj.broker_url, _secure_broker(client))
        if added or ":" in name:
            _wait_catalogue(client, name, timeout)
        reply = _scale(client, name, replicas)
        pool = _wait_running(client, name, replicas, timeout, as_json)
        _report(name, reply, pool, as_json)


@agents.command("scale", cls=DataDirCommand, help=f"""Set NAME's desired total to N
replicas: the broker spreads them over the nodes whose catalogue has it (fewest replicas
first, then most free CPU) and tells their supervisors. Replicas beyond the count are
drained: they take no new task, finish theirs (or hand them back, without using a retry)
and exit. A scale also spreads NAME evenly again, moving as few replicas as that takes:
scaling to the current N gives a node that joined (or came back empty) its share. Works
from any machine; on a secure broker it needs an admin key. {CRASH_DEFAULTS}""")
@click.argument("name", type=AGENT_NAME)
@click.option("--replicas", type=count(0, 1024), required=True,
              help="Replicas in total (0 stops them all).")
@click.option("--wait/--no-wait", default=True, show_default=True,
              help="Wait until that many run.")
@click.option("--timeout", type=SECONDS, default=WAIT_TIMEOUT_S, show_default=True,
              help="Seconds to wait with --wait.")
@json_option("Print {agent, desired, placement, running, failing} as JSON.")
@click.pass_obj
def scale(obj: Context, name: str, replicas: int, wait: bool, timeout: float,
          as_json: bool) -> None:
    """SCALE through the broker, then (with --wait) wait for the count."""
    client = _client(obj)
    with closing(client):
        reply = _scale(client, name, replicas)
        pool = _wait_running(client, name, replicas, timeout, as_json) if wait \
            else _pool(client, name)
        _report(name, reply, pool, as_json)


@agents.command("stop", cls=DataDirCommand, help="""Stop every replica of NAME (scale it
to 0): they drain, so none of their tasks is lost or uses a retry.""")
@click.argument("name", type=AGENT_NAME)
@click.option("--timeout", type=SECONDS, default=WAIT_TIMEOUT_S, show_default=True,
              help="Seconds to wait for the replicas to exit.")
@json_option("Print {agent, desired, placement, running, failing} as JSON.")
@click.pass_obj
def stop(obj: Context, name: str, timeout: float, as_json: bool) -> None:
    """Scale NAME to 0 and wait."""
    client = _client(obj)
    with closing(client):
        reply = _scale(client, name, 0)
        _report(name, reply, _wait_running(client, name, 0, timeout, as_json), as_json)


@agents.command("status", cls=DataDirCommand, help="""Agent pools: per agent, the desired
total against the replicas running, by node, and any crash loop; per node, its host,
state (live or lost), CPUs, load and catalogue.""")
@json_option("Print {pools, nodes} as JSON.")
@click.pass_obj
def status(obj: Context, as_json: bool) -> None:
    """Print the broker's pools and nodes."""
    client = _client(obj)
    with closing(client):
        document = client.status()
    pools = document.get("pools", {})
    nodes = document.get("nodes", [])
    if as_json:
        emit_json({"pools": pools, "nodes": nodes})
        return
    if not nodes:
        click.echo("no node supervisor has reported (start one: `orchestrator agents "
                   "start NAME`)")
    for name, pool in sorted(pools.items()):
        desired = pool.get("desired")
        by_node = ", ".join(f"{n} {c}" for n, c in sorted(pool.get("nodes", {}).items()))
        click.echo(f"{name}: {pool.get('running', 0)} running of "
                   f"{'?' if desired is None else desired} desired ({by_node or 'no node'})")
        for node, why in sorted((pool.get("failing") or {}).items()):
            click.echo(f"  {node}: {why}")
    for node in nodes:
        click.echo(f"node {node['id']} ({node['host']}): {node['state']}, "
                   f"{node['cpus']} CPU(s), load {node['load']}, catalogue "
                   f"{', '.join(node.get('catalogue', []))}")


def _add_submit_alias() -> None:
    """``agents submit`` is ``submit`` itself (the seed's spelling): the same command
    object, so its arguments, options, help and checks are one."""
    from cli.tasks import submit

    agents.add_command(submit, name="submit")


_add_submit_alias()
