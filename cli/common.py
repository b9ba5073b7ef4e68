"""What every ``orchestrator`` command shares: exit codes, JSON output, errors, the context.

The command modules (:mod:`cli.lifecycle`, :mod:`cli.tasks`, :mod:`cli.state`,
:mod:`cli.bench`) import from here and never from :mod:`cli.main`, which only assembles
the group: so no module of the CLI imports another that imports it back.
"""

from __future__ import annotations

import fcntl
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, Protocol, TypeVar

import click
import orjson

from broker.config import DEFAULT_BIND, LOCK_FILE, locate_home

if TYPE_CHECKING:
    from agent_sdk import SyncClient

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3

#: How long a command waits for the broker to answer before calling it unreachable.
PING_TIMEOUT_S = 3.0

F = TypeVar("F", bound=Callable[..., Any])


class Closable(Protocol):
    """A client the CLI opens for one command and closes after it."""

    def close(self) -> None:
        """Release the client's sockets."""


C = TypeVar("C", bound=Closable)


def json_option(help_text: str = "Print the result as JSON.") -> Callable[[F], F]:
    """The ``--json`` flag (parameter ``as_json``) of every command that prints data.

    Args:
        help_text: The flag's help: what the JSON document holds.

    Returns:
        The click option decorator.
    """
    return click.option("--json", "as_json", is_flag=True, help=help_text)


def _json_default(value: Any) -> Any:
    """Turn what orjson cannot serialise into something it can (text, lists, ``str``)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)


def emit_json(document: Any) -> None:
    """Print one JSON document on stdout.

    Args:
        document: Any value; bytes become text, sets and tuples lists, the rest ``str``.
    """
    click.echo(orjson.dumps(document, default=_json_default,
                            option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS).decode())


def echo_data(data: Any) -> None:
    """Print a value as it reads best: a string as is, anything else as JSON.

    Args:
        data: A task's result data or a state value.
    """
    if isinstance(data, str):
        click.echo(data)
    else:
        emit_json(data)


def json_requested() -> bool:
    """Whether the command being run was given ``--json``."""
    ctx = click.get_current_context(silent=True)
    return ctx is not None and bool(ctx.params.get("as_json"))


def fail(message: str, code: int, details: dict[str, Any] | None = None,
         lines: list[str] | None = None) -> NoReturn:
    """Print the error on stderr (and, under ``--json``, as one JSON document on stdout),
    then exit.

    Args:
        message: What went wrong, for a person, on one line (``error: `` is prepended).
        code: The exit code, one of the ``EXIT_*`` constants.
        details: More keys for the JSON document (``error`` and ``exit_code`` are set).
        lines: Lines to print on stderr after the message, indented (a log's last lines);
            the JSON document has them under ``lines``.
    """
    click.echo(f"error: {message}", err=True)
    for line in lines or ():
        click.echo(f"  {line}", err=True)
    if json_requested():
        emit_json({"error": message, "exit_code": code, **(details or {}),
                   **({"lines": lines} if lines is not None else {})})
    sys.exit(code)


def answered_or_exit(client: C, probe: Callable[[float], object],
                     unavailable: type[Exception], message: str) -> C:
    """The client once it answered ``probe``; else close it and exit 3.

    Args:
        client: A client just opened.
        probe: Its call that needs an answer from the server (given ``PING_TIMEOUT_S``).
        unavailable: The error ``probe`` raises when the server does not answer.
        message: What to print then: which server, and how to start it.

    Returns:
        ``client``, for the caller to use and close.
    """
    try:
        probe(PING_TIMEOUT_S)
    except unavailable:
        client.close()
        fail(message, EXIT_UNREACHABLE)
    return client


def lock_held(home: Path) -> bool:
    """Whether a live broker holds the data dir's lock (``broker.lock``).

    The broker holds the lock with ``fcntl.flock`` for its whole life, and the kernel
    drops it when the process dies, zombie or not; so this answers for the broker
    itself, never for whatever process has its old pid now. Taking the lock shared for
    an instant is the test; a missing file means no broker ever ran here (and this
    creates nothing).

    Args:
        home: The data dir.

    Returns:
        True when another process holds the lock.
    """
    try:
        fd = os.open(home / LOCK_FILE, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # releases the probe's lock at once
    return False


def lock_holder(home: Path) -> int | None:
    """The pid the data dir's lock file names, while a broker holds the lock.

    Returns:
        The pid, or None when no broker holds the lock (or it named no pid).
    """
    if not lock_held(home):
        return None
    try:
        return int((home / LOCK_FILE).read_text().strip())
    except (OSError, ValueError):
        return None


def running_broker_info(home: Path) -> dict[str, Any] | None:
    """The data dir's ``broker.json`` while its broker runs (holds the lock): a killed
    broker leaves the file behind, and its endpoints would only time out.

    Args:
        home: The data dir.

    Returns:
        The document, or None when no broker runs or the file is missing or unreadable.
    """
    return read_broker_info(home) if lock_held(home) else None


def read_broker_info(home: Path) -> dict[str, Any] | None:
    """The running broker's ``broker.json`` (its endpoints), if the data dir has one.

    Args:
        home: The data dir.

    Returns:
        The document, or None when it is missing, unreadable or has no ``endpoint``.
    """
    try:
        info = orjson.loads((home / "broker.json").read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    return info if isinstance(info, dict) and "endpoint" in info else None


class Context:
    """The options every command shares: the data dir and the broker to talk to."""

    def __init__(self, home: Path, broker: str | None, home_source: str = "") -> None:
        """Hold the resolved data dir and the ``--broker`` URL, if one was given.

        Args:
            home: The data dir.
            broker: The URL given with ``--broker``, or None to look for one.
            home_source: Why this data dir (``from ORCH_HOME``, ...), for people.
        """
        self.home = home
        self.home_source = home_source
        self._broker = broker

    @classmethod
    def from_options(cls, home: Path | None, broker: str | None,
                     home_source: str = "from --home") -> Context:
        """The context of the group's ``--home`` and ``--broker`` options.

        Args:
            home: ``--home`` (or ``$ORCH_HOME``); None for the default data dir.
            broker: ``--broker``; None to find the broker when a command needs it.
            home_source: Where ``home`` came from, when given.

        Returns:
            The context the commands receive as their ``obj``.
        """
        if home is not None:
            return cls(home.absolute(), broker, home_source)
        default, source = locate_home()
        return cls(default, broker, source)

    @property
    def broker_url(self) -> str:
        """``--broker``, else the data dir's running broker, else ``$ORCH_BROKER``.

        The data dir's ``broker.json`` counts only while its broker runs
        (:func:`running_broker_info`).
        """
        if self._broker:
            return self._broker
        info = running_broker_info(self.home)
        if info is not None:
            return str(info["endpoint"])
        return os.environ.get("ORCH_BROKER", f"tcp://{DEFAULT_BIND}")

    def unreachable_message(self, url: str) -> str:
        """What to say when the broker at ``url`` does not answer: which data dir was
        looked at, and what to do."""
        found = "" if self._broker else (
            f" (the data dir {self.home} has a running broker that is not answering)"
            if lock_held(self.home) else f" (no broker is running for the data dir "
            f"{self.home}, {self.home_source})")
        return (f"the broker at {url} is not answering{found}; start it with `orchestrator "
                "start` (or pass --broker URL)")

    def client(self) -> SyncClient:
        """A SyncClient that answered a ping, or exit 3.

        Returns:
            The connected client; the caller closes it.
        """
        # Imported here so that commands which talk to no broker do not load the SDK.
        from agent_sdk import BrokerUnavailable, SyncClient

        url = self.broker_url
        client = SyncClient(url)
        return answered_or_exit(client, client.ping, BrokerUnavailable,
                                self.unreachable_message(url))


def write_data_dir(ctx: click.Context, formatter: click.HelpFormatter) -> None:
    """End ``--help`` with the data dir this command uses, and why that one."""
    obj = ctx.find_object(Context)
    if obj is not None:
        home, source = obj.home, obj.home_source
    else:
        # The group's own --help runs before its options are resolved.
        home, source = locate_home()
    formatter.write_paragraph()
    # Written as is: wrapping would break the path in two.
    formatter.write(f"{'':>{formatter.current_indent}}Data dir: {home} ({source}).\n")
    formatter.write_text("It is $ORCH_HOME, else ./.orchestrator where that exists, else "
                         "$XDG_STATE_HOME/orchestrator (~/.local/state/orchestrator).")


class DataDirCommand(click.Command):
    """A command whose ``--help`` ends by naming the data dir it uses."""

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        super().format_epilog(ctx, formatter)
        write_data_dir(ctx, formatter)


class DataDirGroup(click.Group):
    """A group whose ``--help`` names the data dir, as do its commands' (made with
    ``group.command``)."""

    command_class = DataDirCommand

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        super().format_epilog(ctx, formatter)
        write_data_dir(ctx, formatter)
