"""``orchestrator state``: read and write shared state, list locks, run the service alone.

The state service's URL comes from ``--state URL``, else ``$ORCH_STATE``, else the
running broker of the data dir (``broker.json``, while the broker holds its lock), else
the broker's status.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import orjson

from cli.common import (
    BIND, EXIT_FAILED, EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE, KEY, PING_TIMEOUT_S, PREFIX,
    SECONDS, TEXT, URL, Context, DataDirGroup, DirPath, answered_or_exit, count, echo_data,
    emit_json, fail, json_option, open_client, running_broker_info,
)

if TYPE_CHECKING:
    from agent_sdk import SyncStateClient

STATE_HELP = """Shared state: versioned keys, locks (the state service).

Values are JSON on the command line and msgpack in the store: what an agent writes with
`self.state.set(key, {"a": 1})` reads back here as {"a": 1}, and the other way round.
"""
#: The levels of :mod:`logging`, in any case.
LOG_LEVEL = click.Choice(["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"], case_sensitive=False)
SET_HELP = """Write KEY. VALUE is parsed as JSON when it is valid JSON (`42`, `"text"`,
`{"a": 1}`), else stored as a string; --string always stores it as a string."""


class StateContext:
    """The shared CLI context plus where the state service is."""

    def __init__(self, base: Context, state_url: str | None) -> None:
        """Wrap the group's context.

        Args:
            base: The context of the ``orchestrator`` group (data dir, broker).
            state_url: ``--state`` (or ``$ORCH_STATE``); None to ask the broker.
        """
        self.base = base
        self._state_url = state_url

    def state_url(self) -> str:
        """The state service's URL, or exit 3 when none can be found.

        Returns:
            ``--state``, else the data dir's broker's, else the one the broker reports.
        """
        if self._state_url:
            return self._state_url
        info = running_broker_info(self.base.home)
        if info is not None and info.get("state"):
            return str(info["state"])
        from agent_sdk.state import endpoint_from
        from wire.sockets import reachable_endpoints

        with closing(self.base.client()) as client:
            status = client.status(PING_TIMEOUT_S)
        try:
            return endpoint_from(reachable_endpoints(
                status.get("broker", {}).get("endpoints") or {}, self.base.broker_url),
                f"the broker at {self.base.broker_url}")
        except Exception as e:  # noqa: BLE001 - StateUnavailable: say why, exit 3
            fail(str(e), EXIT_UNREACHABLE)

    def client(self) -> SyncStateClient:
        """A SyncStateClient whose session is open, or exit 3.

        Returns:
            The connected client; the caller closes it.
        """
        from agent_sdk import StateUnavailable, SyncStateClient

        url = self.state_url()
        client = open_client(
            lambda u: SyncStateClient(u, name="cli", request_timeout_s=PING_TIMEOUT_S), url)
        return answered_or_exit(client, client.connect, StateUnavailable,
                                f"the state service at {url} is not answering; start it with "
                                "`orchestrator start` or `orchestrator state serve` (or pass "
                                "--state URL)")


@contextmanager
def _writing(obj: StateContext) -> Iterator[SyncStateClient]:
    """A state client for one write, closed after it; a refused write exits 1 with why.

    Yields:
        The connected client.
    """
    from agent_sdk import StateError, Unauthorized

    client = obj.client()
    try:
        yield client
    except Unauthorized:
        raise  # the access rules of a secure service: exit 5, as any refused key
    except StateError as e:
        # A failed compare-and-set or a refused key: an outcome to report, not a crash.
        fail(str(e), EXIT_FAILED)
    finally:
        client.close()


@click.group("state", cls=DataDirGroup, help=STATE_HELP)
@click.option("--state", "state_url", type=URL, default=None, envvar="ORCH_STATE",
              help="State service URL, tcp://HOST:PORT. Default: the running broker's.")
@click.pass_context
def state(ctx: click.Context, state_url: str | None) -> None:
    """Give the ``state`` commands a context that knows where the state service is."""
    ctx.obj = StateContext(ctx.obj, state_url)


@state.command("get", help="Print the value of KEY (exit 1 when it does not exist).")
@click.argument("key", type=KEY)
@json_option('Print {"key", "value", "version"}.')
@click.pass_obj
def get(obj: StateContext, key: str, as_json: bool) -> None:
    """Print KEY's value (with its version under ``--json``); exit 1 if it does not exist."""
    with closing(obj.client()) as client:
        entry = client.get_entry(key)
    if not entry.exists:
        if as_json:
            emit_json({"key": key, "value": None, "version": 0, "exists": False})
            sys.exit(EXIT_FAILED)
        fail(f"no key {key!r}", EXIT_FAILED)
    if as_json:
        emit_json({"key": key, "value": entry.value, "version": entry.version, "exists": True})
    else:
        echo_data(entry.value)


@state.command("set", help=SET_HELP)
@click.argument("key", type=KEY)
@click.argument("value", type=TEXT)
@click.option("--string", "as_string", is_flag=True, help="Store VALUE as a string, always.")
@click.option("--ttl", type=SECONDS, default=None,
              help="Delete the key after this many seconds.")
@click.option("--expect-version", type=count(0), default=None,
              help="Write only if the key is at this version (0: only if it does not exist).")
@json_option('Print {"key", "version"}.')
@click.pass_obj
def set_(obj: StateContext, key: str, value: str, as_string: bool, ttl: float | None,
         expect_version: int | None, as_json: bool) -> None:
    """Write KEY (only at ``--expect-version`` if given) and print its new version."""
    parsed: Any = value
    if not as_string:
        try:
            parsed = orjson.loads(value)
        except orjson.JSONDecodeError:
            parsed = value
    with _writing(obj) as client:
        if expect_version is None:
            version = client.set(key, parsed, ttl=ttl)
        else:
            version = client.cas(key, expect_version, parsed, ttl=ttl)
    if as_json:
        emit_json({"key": key, "version": version})
    else:
        click.echo(f"{key}: version {version}")


@state.command("del", help="Delete KEY (succeeds whether or not it existed).")
@click.argument("key", type=KEY)
@click.option("--expect-version", type=count(1), default=None,
              help="Delete only if the key is at this version.")
@json_option('Print {"key", "deleted"}.')
@click.pass_obj
def delete(obj: StateContext, key: str, expect_version: int | None, as_json: bool) -> None:
    """Delete KEY (only at ``--expect-version`` if given) and say whether it existed."""
    with _writing(obj) as client:
        existed = client.delete(key, expected_version=expect_version)
    if as_json:
        emit_json({"key": key, "deleted": existed})
    else:
        click.echo(f"{key}: {'deleted' if existed else 'did not exist'}")


@state.command("list", help="List the keys under PREFIX (all keys without one), in order.")
@click.argument("prefix", type=PREFIX, default="")
@click.option("--values", is_flag=True, help="Include the values.")
@json_option("Print a JSON array of entries.")
@click.pass_obj
def list_(obj: StateContext, prefix: str, values: bool, as_json: bool) -> None:
    """List the keys under PREFIX with their versions (and values with ``--values``)."""
    with closing(obj.client()) as client:
        entries = client.list(prefix, values=values)
    if as_json:
        emit_json([{"key": e.key, "version": e.version, **({"value": e.value} if values else {})}
                   for e in entries])
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{len(entries)} key(s)", title_justify="left")
    table.add_column("key")
    table.add_column("version", justify="right")
    if values:
        table.add_column("value")
    for e in entries:
        row = [e.key, str(e.version)]
        if values:
            row.append(e.value if isinstance(e.value, str)
                       else orjson.dumps(e.value, default=str).decode())
        table.add_row(*row)
    Console().print(table)


@state.command("locks", help="""List the held locks under PREFIX: token, holder, time left.

On a secure broker, the token and session of a lock held by another session show as "-"
(null under --json) unless the key is an admin's.""")
@click.argument("prefix", type=PREFIX, default="")
@json_option("Print a JSON array of locks.")
@click.pass_obj
def locks(obj: StateContext, prefix: str, as_json: bool) -> None:
    """List the locks held under PREFIX, with their fencing tokens and holders."""
    with closing(obj.client()) as client:
        held = client.locks(prefix)
    if as_json:
        emit_json([lock._asdict() for lock in held])
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{len(held)} lock(s) held", title_justify="left")
    for column in ("name", "token", "holder", "session", "expires in s", "waiters"):
        table.add_column(column, justify="right" if column in (
            "token", "expires in s", "waiters") else "left")
    for lock in held:
        # A secure service shows another session's token and session id to admins only.
        table.add_row(lock.name, "-" if lock.token is None else str(lock.token), lock.holder,
                      lock.session or "-",
                      f"{lock.expires_in_s:.1f}", str(lock.waiters))
    Console().print(table)


@state.command("serve", help="""Run the state service alone, in the foreground.

Prints one JSON line {"event": "ready", "state": URL, ...} once it listens. `orchestrator
start` already runs one beside the broker; this is for running it elsewhere.""")
@click.option("--bind", type=BIND, default=None,
              help="HOST:PORT to listen on (default 127.0.0.1:5558; port 0: any free).")
@click.option("--data-dir", type=DirPath(), default=None,
              help="Where state.db lives. Default: the data dir (--home).")
@click.option("--memory", is_flag=True, help="Keep nothing on disk.")
@click.option("--heartbeat-interval", type=SECONDS, default=None,
              help="Seconds between client heartbeats.")
@click.option("--heartbeat-liveness", type=count(1, 1_000_000), default=None,
              help="Missed heartbeats after which a session (and its locks) expires.")
@click.option("--log-level", type=LOG_LEVEL, show_default=True,
              default=os.environ.get("ORCH_LOG_LEVEL", "INFO"))
@click.option("--secure", is_flag=True,
              help="CURVE encryption and key authentication (also ORCH_SECURE=1): the "
                   "data dir's keys and allow-list, as the broker's --secure.")
@click.pass_obj
def serve(obj: StateContext, bind: str | None, data_dir: Path | None, memory: bool,
          heartbeat_interval: float | None, heartbeat_liveness: int | None, log_level: str,
          secure: bool) -> None:
    """Run the state service in this process until it is stopped; exit with its code."""
    from broker.state.__main__ import serve as run_service

    code = run_service(bind, data_dir or obj.base.home, memory, heartbeat_interval,
                       heartbeat_liveness, log_level, secure=secure)
    sys.exit(code if code in (EXIT_OK, EXIT_USAGE, EXIT_UNREACHABLE) else EXIT_FAILED)
