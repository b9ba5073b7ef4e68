"""What every ``orchestrator`` command shares: exit codes, JSON output, errors, the context.

The command modules (:mod:`cli.lifecycle`, :mod:`cli.tasks`, :mod:`cli.state`,
:mod:`cli.bench`) import from here and never from :mod:`cli.main`, which only assembles
the group: so no module of the CLI imports another that imports it back.
"""

from __future__ import annotations

import difflib
import fcntl
import importlib
import math
import os
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, Protocol, TypeVar

import click
import orjson

from broker.config import DEFAULT_BIND, LOCK_FILE
from wire.home import add_local_home, locate_home
from wire.limits import MAX_NAME_CHARS
from wire.state import MAX_KEY_BYTES

if TYPE_CHECKING:
    from agent_sdk import SyncClient

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
#: A findings report has a finding at or above ``--fail-on``.
EXIT_FINDINGS = 4
#: A secure broker refused this process's key (or a key or mechanism mismatch).
EXIT_UNAUTHORIZED = 5

#: The exit codes, as ``--help`` and the docs list them.
EXIT_CODES_HELP = ("Exit codes: 0 ok; 1 task or run failed, or not found; 2 usage error; "
                   "3 broker unreachable; 4 findings at or above --fail-on; 5 unauthorized "
                   "(the broker refused our key).")

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
    options = orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS
    try:
        text = orjson.dumps(document, default=_json_default, option=options)
    except TypeError:
        # Text with undecodable bytes (a path or value from argv): bytes as U+FFFD.
        text = orjson.dumps(_valid_utf8(document), default=_json_default, option=options)
    click.echo(text.decode())


def _valid_utf8(value: Any) -> Any:
    """``value`` with the lone surrogates of its strings (undecodable bytes, as Python
    reads them from argv or the file system) replaced by U+FFFD, at any depth."""
    if isinstance(value, str):
        return "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in value)
    if isinstance(value, dict):
        return {_valid_utf8(k): _valid_utf8(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_valid_utf8(v) for v in value]
    return value


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
    """Whether the command being run was given ``--json`` (anywhere on its command line)."""
    ctx = click.get_current_context(silent=True)
    if ctx is not None and ctx.params.get("as_json"):
        return True
    root = ctx.find_root().command if ctx is not None else None
    return isinstance(root, CliGroup) and json_in(root.argv)


def json_in(argv: list[str]) -> bool:
    """Whether ``--json`` is among the options of a command line (before any ``--``)."""
    for arg in argv:
        if arg == "--":
            return False
        if arg == "--json":
            return True
    return False


def one_line(text: str) -> str:
    """``text`` on one line: control characters (newlines, escapes) written as escapes,
    so that an error quoting a hostile value still prints as one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


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
    click.echo(f"error: {one_line(message)}", err=True)
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
    except BaseException:
        # Unauthorized (exit 5), or any other error: the client's loop thread must not
        # outlive the exit (the interpreter could crash tearing its sockets down).
        client.close()
        raise
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
    except OSError:  # missing, or a data dir that cannot exist (a name too long...)
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
            # Its local admin key, for the endpoints of its broker if that is secure.
            add_local_home(home.absolute())
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
        url = os.environ.get("ORCH_BROKER") or f"tcp://{DEFAULT_BIND}"
        try:
            return URL.convert(url, None, None)
        except click.BadParameter as e:
            fail(f"ORCH_BROKER: {e.format_message()}", EXIT_USAGE)

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
        client = open_client(SyncClient, url)
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

    def resolve_command(self, ctx: click.Context, args: list[str]
                        ) -> tuple[str | None, click.Command | None, list[str]]:
        """Click's lookup, with the nearest command named when there is none by that
        name (``sumbit``: did you mean 'submit'?)."""
        try:
            return super().resolve_command(ctx, args)
        except click.UsageError as error:
            # (click suggests from the commands it holds: not those imported on use)
            text = error.format_message()
            if args and text.startswith("No such command") and "id you mean" not in text:
                near = difflib.get_close_matches(args[0], self.list_commands(ctx), n=1)
                if near:
                    error.message = f"{error.message.rstrip('.')}. Did you mean {near[0]!r}?"
            raise


class CliGroup(DataDirGroup):
    """The ``orchestrator`` group: every usage error of any command, wherever click
    raises it, is one line on stderr and exit 2 (never click's usage block), and, when
    ``--json`` is anywhere on the command line, also one JSON document on stdout
    (``{"error": ..., "exit_code": 2}``)."""

    #: The command line being run (for ``--json`` before the command has parsed it).
    argv: list[str] = []

    def __init__(self, *args: Any, lazy_commands: Mapping[str, str] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: commands by name as ``module:attribute``, imported when first asked for, so
        #: that a command loads only what it needs (``--help`` lists, so imports, all)
        self.lazy_commands = dict(lazy_commands or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy_commands})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.commands and name in self.lazy_commands:
            module, attribute = self.lazy_commands[name].split(":")
            self.add_command(getattr(importlib.import_module(module), attribute), name)
        return super().get_command(ctx, name)

    def main(self, args: Any = None, *posargs: Any, **kwargs: Any) -> Any:
        self.argv = [str(a) for a in (sys.argv[1:] if args is None else args)]
        return super().main(self.argv, *posargs, **kwargs)

    def make_context(self, info_name: str | None, args: list[str],
                     parent: click.Context | None = None, **extra: Any) -> click.Context:
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.ClickException as e:
            self._report(e)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.ClickException as e:
            self._report(e)
        except Exception as e:  # noqa: BLE001 - re-raised unless it is the SDK's below
            # Only a command that loaded the SDK can raise its errors: looked up, not
            # imported, so that commands which talk to no broker never load it.
            errors = sys.modules.get("agent_sdk.errors")
            if errors is not None and isinstance(e, errors.Unauthorized):
                fail(str(e), EXIT_UNAUTHORIZED, {"reason": e.reason})
            if errors is not None and isinstance(e, errors.KeyConfigError):
                fail(f"CURVE keys: {e}", EXIT_USAGE)
            raise

    def _report(self, error: click.ClickException) -> NoReturn:
        """Print ``error`` as one line (and JSON under ``--json``); exit with its code."""
        if isinstance(error, click.exceptions.NoArgsIsHelpError):
            error.show()  # a group run bare: its help, as click prints it
            raise click.exceptions.Exit(error.exit_code)
        message = error.format_message()
        ctx = getattr(error, "ctx", None)
        if isinstance(error, click.UsageError) and ctx is not None:
            see = f"`{ctx.command_path} --help`"
            message = (f"{message} (see {see})" if message.endswith("?")
                       else f"{message.rstrip('.')}; see {see}")
        click.echo(f"error: {one_line(message)}", err=True)
        if json_in(self.argv):
            emit_json({"error": one_line(message), "exit_code": error.exit_code})
        raise click.exceptions.Exit(error.exit_code)


# ---------------------------------------------------------------- validated types
# Every value an option takes is checked while click parses the command line, so that a
# bad one is a usage error (one line, exit 2) before anything connects or starts.

#: The longest time any option takes, in seconds (about 31 years): beyond it, waits
#: overflow the platform's timers.
MAX_SECONDS = 1e9
#: Integers travel as msgpack int64.
INT64_MIN = -(2 ** 63)
INT64_MAX = 2 ** 63 - 1

_HOST = re.compile(r"\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?")


def _show(value: Any) -> str:
    """A value quoted for an error message: one line, at most 60 characters."""
    text = repr(value)
    return one_line(text if len(text) <= 60 else text[:57] + "...")


class Seconds(click.ParamType):
    """A finite number of seconds greater than 0 and at most :data:`MAX_SECONDS`."""

    name = "seconds"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{_show(value)} is not a number of seconds", param, ctx)
        if not (math.isfinite(number) and 0 < number <= MAX_SECONDS):
            self.fail(f"{_show(value)} is not a number of seconds greater than 0 and at most "
                      f"{MAX_SECONDS:g}", param, ctx)
        return number


class BoundedInt(click.ParamType):
    """An integer within ``[low, high]`` (by default, what msgpack's int64 holds)."""

    name = "integer"

    def __init__(self, low: int = INT64_MIN, high: int = INT64_MAX) -> None:
        self.low = low
        self.high = high

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            self.fail(f"{_show(value)} is not an integer", param, ctx)
        try:
            number = int(value)
        except ValueError:  # also a number of more than 4,300 digits
            self.fail(f"{_show(value)} is not an integer", param, ctx)
        if not self.low <= number <= self.high:
            self.fail(f"{_show(value)} is not an integer from {self.low} to {self.high}",
                      param, ctx)
        return number


class Text(click.ParamType):
    """Text that travels on the wire: valid UTF-8 (no undecodable bytes), optionally
    non-empty, printable, or at most so many bytes."""

    name = "text"

    def __init__(self, what: str = "text", non_empty: bool = False, printable: bool = False,
                 max_bytes: int | None = None, max_chars: int | None = None) -> None:
        self.what = what
        self.non_empty = non_empty
        self.printable = printable
        self.max_bytes = max_bytes
        self.max_chars = max_chars

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> str:
        text = str(value)
        try:
            size = len(text.encode("utf-8"))
        except UnicodeEncodeError:
            self.fail(f"{_show(text)} is not valid UTF-8 text", param, ctx)
        if self.non_empty and not text:
            self.fail(f"the {self.what} must not be empty", param, ctx)
        if self.printable and not text.isprintable():
            self.fail(f"the {self.what} {_show(text)} contains control characters (newlines, "
                      "tabs, escapes...)", param, ctx)
        if self.max_chars is not None and len(text) > self.max_chars:
            self.fail(f"the {self.what} has {len(text)} characters; at most {self.max_chars}",
                      param, ctx)
        if self.max_bytes is not None and size > self.max_bytes:
            self.fail(f"the {self.what} has {size} bytes in UTF-8; at most {self.max_bytes}",
                      param, ctx)
        return text


class Url(click.ParamType):
    """A URL to connect to: ``tcp://HOST:PORT`` (``HOST:PORT`` is taken for the same),
    port 1 to 65535."""

    name = "url"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> str:
        text = str(value)
        host, sep, port = text.removeprefix("tcp://").rpartition(":")
        if not (sep and _HOST.fullmatch(host) and port.isascii() and port.isdigit()
                and 1 <= int(port) <= 65535):
            self.fail(f"{_show(text)} is not a URL tcp://HOST:PORT (port 1 to 65535)",
                      param, ctx)
        return f"tcp://{host}:{int(port)}"


class Bind(click.ParamType):
    """An address to listen on: ``HOST:PORT`` (``*`` for every interface; port 0: any
    free port)."""

    name = "host:port"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> str:
        text = str(value)
        host, sep, port = text.removeprefix("tcp://").rpartition(":")
        if not (sep and (host == "*" or _HOST.fullmatch(host)) and port.isascii()
                and port.isdigit() and int(port) <= 65535):
            self.fail(f"{_show(text)} is not HOST:PORT (port 0 to 65535)", param, ctx)
        return f"{host}:{int(port)}"


class DirPath(click.Path):
    """A directory: non-empty text, no NUL, not an existing file; with ``exists`` (``submit
    --path``), one that exists. Without, the data dir, which is made when missing."""

    def __init__(self, exists: bool = False) -> None:
        super().__init__(exists=exists, file_okay=False, dir_okay=True, path_type=Path)

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Any:
        if isinstance(value, str) and (not value or "\0" in value):
            self.fail(f"{_show(value)} is not a directory path", param, ctx)
        return super().convert(value, param, ctx)


SECONDS = Seconds()
#: A count of retries, items or processes: 0 (or ``low``) up to int64.
RETRIES = BoundedInt(0)
PRIORITY = BoundedInt()
URL = Url()
BIND = Bind()
#: State keys: what the state service accepts.
KEY = Text("key", non_empty=True, max_bytes=MAX_KEY_BYTES)
PREFIX = Text("prefix", max_bytes=MAX_KEY_BYTES)
#: Agent names, agent ids and capabilities: what the broker accepts at registration.
NAME = Text("name", non_empty=True, printable=True, max_chars=MAX_NAME_CHARS)
#: Task ids: printed on lines of their own, so printable.
TASK_ID = Text("task id", non_empty=True, printable=True, max_bytes=MAX_KEY_BYTES)
TEXT = Text()


def count(low: int = 1, high: int = INT64_MAX) -> BoundedInt:
    """An integer option from ``low`` to ``high``."""
    return BoundedInt(low, high)


def open_client(factory: Callable[[str], C], url: str) -> C:
    """``factory(url)``, or exit 2 when ZeroMQ refuses the address.

    Returns:
        The client the factory made.
    """
    import zmq

    try:
        return factory(url)
    except zmq.ZMQError as e:
        fail(f"cannot connect to {url}: {e}", EXIT_USAGE)
