"""What every ``orchestrator`` command shares: exit codes, JSON output, errors, the context.

The command modules (:mod:`cli.lifecycle`, :mod:`cli.tasks`, :mod:`cli.state`,
:mod:`cli.bench`) import from here and never from :mod:`cli.main`, which only assembles
the group: so no module of the CLI imports another that imports it back.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, Protocol, TypeVar

import click
import orjson

from broker.config import DEFAULT_BIND, home_dir

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


def fail(message: str, code: int) -> NoReturn:
    """Print one line on stderr, then exit.

    Args:
        message: What went wrong, for a person (``error: `` is prepended).
        code: The exit code, one of the ``EXIT_*`` constants.
    """
    click.echo(f"error: {message}", err=True)
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

    def __init__(self, home: Path, broker: str | None) -> None:
        """Hold the resolved data dir and the ``--broker`` URL, if one was given.

        Args:
            home: The data dir.
            broker: The URL given with ``--broker``, or None to look for one.
        """
        self.home = home
        self._broker = broker

    @classmethod
    def from_options(cls, home: Path | None, broker: str | None) -> Context:
        """The context of the group's ``--home`` and ``--broker`` options.

        Args:
            home: ``--home`` (or ``$ORCH_HOME``); None for the default data dir.
            broker: ``--broker``; None to find the broker when a command needs it.

        Returns:
            The context the commands receive as their ``obj``.
        """
        return cls(home or home_dir(), broker)

    @property
    def broker_url(self) -> str:
        """``--broker``, else the data dir's running broker, else ``$ORCH_BROKER``."""
        if self._broker:
            return self._broker
        info = read_broker_info(self.home)
        if info is not None:
            return str(info["endpoint"])
        return os.environ.get("ORCH_BROKER", f"tcp://{DEFAULT_BIND}")

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
                                f"the broker at {url} is not answering; start it with "
                                "`orchestrator start` (or pass --broker URL)")
