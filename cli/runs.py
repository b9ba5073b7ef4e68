"""What the workflow commands share: a broker connection on a loop thread, the checked
types of run ids and run inputs, following a run with its progress, and printing it.

The workflow API (:mod:`workflows.api`) is asynchronous; a command runs it on an event
loop in a background thread (:class:`Session`), so that Ctrl-C interrupts the command's
own thread alone and leaves no coroutine half-done on the loop: the command then says
where the run is (it goes on, driven by the standing runner) and exits 130.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import re
import sys
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, NoReturn, TypeVar

import click
import orjson

from cli.common import (
    EXIT_FAILED, EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE, PING_TIMEOUT_S, Context, Text,
    echo_data, emit_json, fail, one_line,
)
from cli.report_view import Presentation, is_report, present_report, readable

if TYPE_CHECKING:
    from agent_sdk import Client
    from agent_sdk.sync import LoopThread
    from workflows import RunDetails, Workflow

T = TypeVar("T")

#: How long a driver may take to close down after its run ended.
DRIVER_EXIT_S: Final = 10.0
#: The exit code after Ctrl-C (128 + SIGINT), as a shell reports it.
EXIT_INTERRUPTED: Final = 130
#: Run ids: what :func:`workflows.ids.check_run_id` accepts.
MAX_RUN_ID_CHARS: Final = 64
_RUN_ID: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class RunId(Text):
    """A run id: 1 to 64 of ``A-Z a-z 0-9 _ . -``, starting with a letter or digit."""

    name = "run_id"

    def __init__(self) -> None:
        super().__init__("run id", non_empty=True, printable=True, max_chars=MAX_RUN_ID_CHARS)

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> str:
        text = super().convert(value, param, ctx)
        if not _RUN_ID.fullmatch(text):
            self.fail(f"{one_line(repr(text))} is not a run id: use 1 to {MAX_RUN_ID_CHARS} "
                      "of A-Z a-z 0-9 _ . - (starting with a letter or digit)", param, ctx)
        return text


class JsonValue(click.ParamType):
    """A JSON value given as text, ``@FILE`` (a file's JSON) or ``-`` (JSON on stdin);
    read and parsed while the command line is parsed, so a bad one is a usage error."""

    name = "json|@file|-"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Any:
        text = str(value)
        source = ""
        try:
            if text == "-":
                raw: str | bytes = sys.stdin.buffer.read()
                source = " (stdin)"
            elif text.startswith("@"):
                source = f" ({text[1:]})"
                with open(text[1:], "rb") as file:
                    raw = file.read()
            else:
                raw = text.encode("utf-8")
        except (OSError, ValueError, UnicodeError) as e:
            reason = getattr(e, "strerror", None) or e
            self.fail(f"cannot read {text[1:] or 'stdin'}: {one_line(str(reason))}", param, ctx)
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            self.fail(f"not valid JSON{one_line(source)}: {e}", param, ctx)


RUN_ID = RunId()
JSON_VALUE = JsonValue()


class Session:
    """An async :class:`agent_sdk.Client` on a loop thread, for one command; exits 3 when
    the broker does not answer.

    Args:
        obj: The command's context (which broker).
    """

    def __init__(self, obj: Context) -> None:
        import zmq

        from agent_sdk import BrokerUnavailable
        from agent_sdk.sync import LoopThread

        self.obj = obj
        self.url = obj.broker_url
        self.thread: LoopThread = LoopThread("orchestrator-workflow")
        try:
            self.client: Client = self.thread.call(self._open())
        except BrokerUnavailable:
            self.thread.close()
            fail(obj.unreachable_message(self.url), EXIT_UNREACHABLE)
        except zmq.ZMQError as e:
            self.thread.close()
            fail(f"cannot connect to {self.url}: {e}", EXIT_USAGE)
        except BaseException:
            self.thread.close()
            raise

    async def _open(self) -> Client:
        from agent_sdk import Client

        client = Client(self.url)
        try:
            await client.connect()
            await client.ping(PING_TIMEOUT_S)
        except BaseException:
            await client.close()
            raise
        return client

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop; the workflow errors become one line and their exit
        code (:func:`exit_for_error`)."""
        future = asyncio.run_coroutine_threadsafe(coro, self.thread.loop)
        try:
            return future.result()
        except BaseException as e:
            future.cancel()
            if isinstance(e, Exception):
                exit_for_error(e, self.obj, self.url)
            raise

    def close(self) -> None:
        """Close the client, then the loop thread."""
        self.thread.close(self.client.close)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()


def exit_for_error(error: Exception, obj: Context, url: str) -> NoReturn:
    """Exit with the one-line message and exit code of a workflow call's error: 1 for an
    unknown run or one whose status forbids the call, 2 for a bad definition or input,
    3 for a broker or state service that does not answer. Anything else is raised."""
    from agent_sdk import BrokerUnavailable, OrchestratorError, StateUnavailable
    from workflows import DefinitionError, RunNotFound, RunStateError, WorkflowInputError

    if isinstance(error, BrokerUnavailable):
        fail(obj.unreachable_message(url), EXIT_UNREACHABLE)
    if isinstance(error, StateUnavailable):
        fail(f"the state service of the broker at {url} is not answering ({error}); runs "
             "live there: start the broker with its state service", EXIT_UNREACHABLE)
    if isinstance(error, RunNotFound):
        fail(str(error), EXIT_FAILED, {"run_id": error.run_id})
    if isinstance(error, RunStateError):
        fail(str(error), EXIT_FAILED, {"run_id": error.run_id, "status": error.status})
    if isinstance(error, (DefinitionError, WorkflowInputError)):
        fail(str(error), EXIT_USAGE)
    if isinstance(error, OrchestratorError):
        fail(str(error), EXIT_FAILED)
    raise error


# ------------------------------------------------------------------------- printing


def details_document(details: RunDetails, include_input: bool = False) -> dict[str, Any]:
    """A run's details as one JSON-able map (its input only when asked: it may carry
    whole files)."""
    document = dataclasses.asdict(details)
    document["status"] = details.status.value
    if not include_input:
        document.pop("input", None)
    return document


def outcome_line(details: RunDetails) -> str:
    """How a run that did not succeed ended, on one line: status, step, code, message
    (and a rejection's comment and who gave it)."""
    error = details.error
    line = f"run {details.run_id} {details.status.value}"
    if error is not None:
        where = f" at {error.path}" if error.path else ""
        line += f"{where} ({error.code}): {error.message}"
    if details.status.value == "rejected":
        answer = next((h for h in reversed(details.history) if h.event == "approval"), None)
        if answer is not None and answer.comment and answer.comment not in line:
            line += f" (by {answer.by or 'someone'}: {answer.comment!r})"
    return one_line(line)


def print_outcome(details: RunDetails, as_json: bool,
                  presentation: Presentation | None = None) -> NoReturn:
    """Print how a run ended (its output, or why it did not succeed) and exit 0 when it
    succeeded, 1 otherwise; a run that ended with a findings report is presented as one
    (:mod:`cli.report_view`: files written, exit 4 past ``--fail-on``)."""
    ok = details.status.value == "succeeded"
    if ok and details.output is not None and is_report(details.output.data):
        present_report(details.run_id, details.output.data, presentation or Presentation(),
                       as_json)
    if as_json:
        emit_json(details_document(details))
    elif ok:
        if details.output is not None:
            text = readable(details.output.data)
            if text is not None:
                click.echo(text)
            else:
                echo_data(details.output.data)
    else:
        click.echo(f"error: {outcome_line(details)}", err=True)
    sys.exit(EXIT_OK if ok else EXIT_FAILED)


def interrupted(run_id: str) -> NoReturn:
    """Ctrl-C while following a run: say where it is and what to do with it, exit 130."""
    click.echo(f"interrupted; run {run_id} goes on (the workflow runner drives it): follow "
               f"it with `orchestrator workflow status {run_id} --wait`, have a runner take it "
               f"over at once with `orchestrator workflow resume {run_id}`, cancel it with "
               f"`orchestrator workflow cancel {run_id}`", err=True)
    sys.exit(EXIT_INTERRUPTED)


# ------------------------------------------------------------------------- following


def _planned_total(definition: dict[str, Any]) -> int:
    """The steps a run's definition needs at least (before its runner counted them)."""
    from workflows import DefinitionError, Workflow
    from workflows.events import planned_steps

    try:
        return planned_steps(Workflow.from_dict(definition).root)
    except DefinitionError:
        return 0


async def _follow(client: Client, run_id: str,
                  on_progress: Callable[[int, int], None] | None) -> RunDetails:
    """Wait until the run ends, calling ``on_progress(done, total)`` for its start and
    each of its progress events on the bus (None: no events are watched)."""
    from agent_sdk import BusUnavailable, OrchestratorError
    from agent_sdk.messaging import BusMessage
    from workflows import run_status, wait_run
    from workflows.ids import events_topic

    subscription = None
    if on_progress is not None:
        def on_event(message: BusMessage) -> None:
            data = message.data if isinstance(message.data, dict) else {}
            if data.get("run_id") == run_id and isinstance(data.get("done"), int):
                on_progress(data["done"], data.get("total") or 0)

        try:
            subscription = await client.subscribe(events_topic(run_id), on_event).confirm(
                PING_TIMEOUT_S)
        except (BusUnavailable, OrchestratorError):
            subscription = None  # no bus: the run is followed without its progress
        current = await run_status(run_id, client=client)
        on_progress(current.progress.done,
                    current.progress.total or _planned_total(current.definition))
    try:
        return await wait_run(run_id, client=client)
    finally:
        if subscription is not None:
            await subscription.unsubscribe()


def follow(session: Session, run_id: str, as_json: bool) -> RunDetails:
    """Wait until the run ends and return its details, showing its steps done/total as a
    bar on stderr when stderr is a terminal (nothing on a pipe, nor with ``--json``)."""
    if as_json or not sys.stderr.isatty():
        return session.call(_follow(session.client, run_id, None))
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, \
        TimeElapsedColumn

    with Progress(TextColumn(f"run {run_id}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("steps"), TimeElapsedColumn(), console=Console(stderr=True),
                  transient=True) as progress:
        bar = progress.add_task("steps", total=None)

        def on_progress(done: int, total: int) -> None:
            progress.update(bar, completed=done, total=max(total, done) or None)

        return session.call(_follow(session.client, run_id, on_progress))


def submit_and_follow(session: Session, workflow: Workflow, data: Any, *,
                      run_id: str | None, deadline_s: float | None, no_wait: bool,
                      as_json: bool,
                      on_submitted: Callable[[str], None] | None = None,
                      presentation: Presentation | None = None) -> NoReturn:
    """Submit a durable run, say its id first (on stderr), then follow it and print how
    it ended (see :func:`print_outcome`); with ``no_wait``, print the id and exit 0.

    Args:
        session: The broker connection.
        workflow: The definition.
        data: The run's input.
        run_id: The run id (None: a new one).
        deadline_s: The run's deadline (None: the definition's).
        no_wait: Return once submitted.
        as_json: Print one JSON document on stdout.
        on_submitted: Called with the run id once it is said (more to say about it).
        presentation: How a findings report it ends with is presented.
    """
    from workflows import submit_run

    submitted = session.call(submit_run(workflow, data, client=session.client, run_id=run_id,
                                        deadline_s=deadline_s))
    if not (no_wait and not as_json):
        click.echo(f"run {submitted} submitted (workflow {workflow.name})", err=True)
    if on_submitted is not None:
        on_submitted(submitted)
    if no_wait:
        if as_json:
            emit_json({"run_id": submitted, "status": "submitted"})
        else:
            click.echo(submitted)
        sys.exit(EXIT_OK)
    try:
        details = follow(session, submitted, as_json)
    except KeyboardInterrupt:
        interrupted(submitted)
    print_outcome(details, as_json, presentation)


def drive_and_follow(session: Session, run_id: str, as_json: bool,
                     presentation: Presentation | None = None) -> NoReturn:
    """Drive the run in this process (no runner serves it) while following it; print how
    it ended (see :func:`print_outcome`). Ctrl-C stops driving it and says so."""
    from workflows import drive_run

    driver = asyncio.run_coroutine_threadsafe(drive_run(run_id, client=session.client),
                                              session.thread.loop)
    try:
        details = follow(session, run_id, as_json)
    except KeyboardInterrupt:
        driver.cancel()
        click.echo(f"interrupted; run {run_id} is no longer driven here (a runner continues "
                   f"it: `orchestrator workflow resume {run_id}`)", err=True)
        sys.exit(EXIT_INTERRUPTED)
    # The driver ends once it saved the outcome; let it close its checkpoint and event
    # loops before this loop goes.
    try:
        driver.result(DRIVER_EXIT_S)
    except (concurrent.futures.TimeoutError, concurrent.futures.CancelledError):
        driver.cancel()
    except Exception as error:  # noqa: BLE001 - the run's outcome is known already
        click.echo(f"warning: the run's driver ended with: {error}", err=True)
    print_outcome(details, as_json, presentation)


def warn_if_undriven(obj: Context, session: Session) -> None:
    """Say on stderr when no standing runner, on any machine, will drive a submitted run:
    the data dir's runner was started but is not running (its log says why), or no
    runner serves this broker at all."""
    from cli.processes import ProcessRef
    from workflows.api import live_runners

    path = obj.home / "runner.pid"
    try:
        ref = ProcessRef.parse(path.read_text())
    except OSError:
        ref = None
    if ref is not None and not ref.alive():
        click.echo(f"warning: the workflow runner (pid {ref.pid}) is not running; the run "
                   f"waits until one drives it (see {obj.home / 'runner.log'}, restart with "
                   "`orchestrator stop` and `orchestrator start`)", err=True)
    elif not session.call(live_runners(client=session.client)):
        click.echo("warning: no workflow runner serves this broker; the run waits until one "
                   "drives it (`orchestrator start` runs one, or `python -m workflows.runner "
                   f"--broker {session.url}`)", err=True)
