"""``orchestrator submit``, ``result``, ``cancel``, ``trace`` and ``tasks``: work and its
outcome.

A command exits 0 when its task succeeded, 1 when it failed or the broker does not know
it, and 3 when the broker does not answer.
"""

from __future__ import annotations

import sys
import threading
import uuid
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, ParamSpec, TypeVar

import click
import orjson

from cli.common import (
    EXIT_FAILED, EXIT_OK, EXIT_USAGE, NAME, PING_TIMEOUT_S, PRIORITY, RETRIES, SECONDS, TASK_ID, TEXT,
    Context, DataDirCommand, DirPath, count, echo_data, emit_json, fail, json_option,
)
from cli.plans import submit_planned
from cli.report_view import (
    Presentation, fail_on_option, max_tokens_option, report_dir_option,
)

if TYPE_CHECKING:
    from agent_sdk import Result, SyncClient, SyncTaskHandle

P = ParamSpec("P")
T = TypeVar("T")

SUBMIT_HELP = """Submit a task and (unless --no-wait) print its result.

With --capability or --agent, TEXT becomes the task's `text` field and the task goes to an
agent that matches. Without them, the planner turns TEXT into a workflow ("Analyze this
codebase for security issues", "Research vector databases", "Build a REST API", ...) over
the files of --path (default: the working directory) and runs it as a durable run: the
run id is printed first (on stderr), then the steps done/total and the output. --plan
prints the plan instead, marking the capabilities no agent online offers; a text the
planner cannot place exits 2, listing what the agents online can do."""
TASKS_HELP = """List tasks: the open ones (pending, dispatched, running, retrying), newest
first, then the finished ones the broker retains, newest first.

With --failed: the dead letters, tasks that failed or timed out after their retries,
with their last error."""
#: The exit code after Ctrl-C (128 + SIGINT), as a shell reports it.
EXIT_INTERRUPTED = 130
#: The task states ``tasks --status`` filters on.
TASK_STATES = ("pending", "dispatched", "running", "retrying", "succeeded", "failed",
               "timed_out", "cancelled", "rejected")


def _known(call: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """``call(*args, **kwargs)``, or exit 1 with the broker's message if it has no such task.

    Returns:
        What ``call`` returned.
    """
    from agent_sdk import TaskNotFound

    try:
        return call(*args, **kwargs)
    except TaskNotFound as e:
        fail(str(e), EXIT_FAILED)


def _result_document(result: Result) -> dict[str, Any]:
    """What ``--json`` prints for a result: a task that has not finished has no
    confidence yet (nor data)."""
    document = result.to_dict()
    if not result.finished:
        document.pop("confidence", None)
    return document


def _print_result(result: Result, as_json: bool) -> None:
    """Print a result: its data on stdout, or its error on stderr (all of it with --json)."""
    if as_json:
        emit_json(_result_document(result))
        return
    error = result.error
    if _purged(result):
        assert error is not None
        click.echo(f"{result.task_id}: purged: {error.message}", err=True)
        return
    if error is not None:
        # A code that only repeats the status (``cancelled``) is said once.
        said = error.message if error.code == result.status else str(error)
        click.echo(f"{result.task_id}: {result.status}: {said}", err=True)
        return
    echo_data(result.data)


def _purged(result: Result) -> bool:
    """Whether ``orchestrator purge`` removed the task's payloads (its data is gone)."""
    return result.error is not None and result.error.code == "purged"


def _exit_for(result: Result) -> NoReturn:
    """Exit 0 if the task succeeded (and its data is there), else 1."""
    sys.exit(EXIT_OK if result.ok and not _purged(result) else EXIT_FAILED)


def _result_or_exit(handle: SyncTaskHandle, wait_s: float | None) -> Result:
    """The task's result within ``wait_s`` seconds, or exit 1 saying how to get it later.

    The wait is on an event set by the handle's done callback, not on a call into the
    client's loop: Ctrl-C then interrupts this thread alone and leaves no coroutine
    pending on the loop (``_interrupted`` reports it).
    """
    done = threading.Event()
    handle.add_done_callback(lambda _: done.set())
    if not done.wait(wait_s):
        fail(f"no result for {handle.id} yet; check later with `orchestrator result "
             f"{handle.id}`", EXIT_FAILED)
    return handle.result_nowait()


def _interrupted(task_id: str | None) -> NoReturn:
    """Ctrl-C while waiting: say where the task is and how to cancel it, exit 130."""
    if task_id is not None:
        click.echo(f"interrupted; task {task_id} goes on at the broker: see it with "
                   f"`orchestrator result {task_id}`, cancel it with `orchestrator cancel "
                   f"{task_id}`", err=True)
    else:
        click.echo("interrupted", err=True)
    sys.exit(EXIT_INTERRUPTED)


def _wait_with_progress(handle: SyncTaskHandle, wait_s: float | None, quiet: bool) -> Result:
    """Wait for the result, showing a spinner on stderr when it is a terminal.

    Args:
        handle: The task's handle.
        wait_s: How long to wait (None: as long as it takes).
        quiet: No spinner (the output is JSON).

    Returns:
        The result; exits 1 when none came in time.
    """
    if quiet or not sys.stderr.isatty():
        return _result_or_exit(handle, wait_s)
    from rich.console import Console

    with Console(stderr=True).status(f"waiting for {handle.id}"):
        return _result_or_exit(handle, wait_s)


def _parse_payload(payload: str | None) -> dict[str, Any]:
    """The ``data`` keyword of ``submit`` from ``--payload`` (none without it): JSON
    text, ``@FILE`` for a file's JSON, ``-`` for the JSON on stdin (a shell argument tops
    out near 128 KiB).

    Raises:
        click.BadParameter: the file cannot be read, or the text is not valid JSON.
    """
    if payload is None:
        return {}
    text: str | bytes = payload
    source = ""
    if payload == "-":
        text, source = sys.stdin.buffer.read(), " (stdin)"
    elif payload.startswith("@"):
        path = payload[1:]
        try:
            with open(path, "rb") as file:
                text = file.read()
        except OSError as e:
            raise click.BadParameter(f"cannot read {path}: {e.strerror or e}",
                                     param_hint="--payload") from None
        source = f" ({path})"
    try:
        return {"data": orjson.loads(text)}
    except orjson.JSONDecodeError as e:
        raise click.BadParameter(f"not valid JSON{source}: {e}",
                                 param_hint="--payload") from None


def _offered(status: dict[str, Any], capabilities: tuple[str, ...],
             agent: str | None) -> bool:
    """Whether a live agent of the broker's status can take a task needing these."""
    from agent_sdk.status import live_agents, serves

    return any(serves(a, capabilities, agent) for a in live_agents(status))


def _need(capabilities: tuple[str, ...], agent: str | None) -> str:
    """What a task needs of an agent, for people."""
    parts = [f"capability {c!r}" for c in capabilities]
    if agent is not None:
        return f"no agent named {agent!r}" + (f" with {' and '.join(parts)}" if parts else "") \
            + " is online"
    if not parts:
        return "no agent is online"
    return f"no agent online offers {' and '.join(parts)}"


def _say_waiting(task_id: str, need: str, timeout_s: float | None) -> None:
    """Tell the user at once that the task waits for an agent nobody runs yet."""
    how_long = f"up to {timeout_s:g} s (its timeout)" if timeout_s else "until one comes"
    click.echo(f"{need}; task {task_id} waits for one {how_long}. Start an agent, or "
               f"cancel it with `orchestrator cancel {task_id}`", err=True)


def _report_accepted(handle: SyncTaskHandle, as_json: bool) -> None:
    """``submit --no-wait``: print the id once the broker accepted the task.

    A task the broker rejected at once is reported as ``result`` would, and exits 1.
    """
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


@click.command(cls=DataDirCommand, help=SUBMIT_HELP)
@click.argument("text", type=TEXT)
@click.option("--capability", "-c", "capabilities", type=NAME, multiple=True,
              help="A capability the agent must have (repeatable).")
@click.option("--agent", type=NAME, default=None, help="The agent name (or id) to run it.")
@click.option("--payload", default=None,
              help="JSON data for the task (task.data); @FILE reads it from a file, - from "
                   "stdin.")
@click.option("--timeout", type=SECONDS, default=None,
              help="The task's deadline: seconds from submission for the whole task "
                   "(waiting for an agent, every attempt and retry); it then ends timed_out "
                   "and submit returns (default: the broker's default task timeout).")
@click.option("--attempt-timeout", type=SECONDS, default=None,
              help="Seconds each attempt may run before it is cut and retried within "
                   "--timeout (default: no limit but --timeout).")
@click.option("--retries", type=RETRIES, default=None, help="Retries on failure.")
@click.option("--priority", type=PRIORITY, default=0, show_default=True)
@click.option("--id", "task_id", type=TASK_ID, default=None, help="Task id (the idempotency key).")
@click.option("--no-wait", is_flag=True, help="Return once the broker accepted the task "
                                               "(or the run was submitted).")
@click.option("--path", type=DirPath(exists=True), default=None,
              help="Without --capability/--agent: the directory the planned workflow works "
                   "on (default: the working directory).")
@click.option("--plan", "plan_only", is_flag=True,
              help="Without --capability/--agent: print the plan, run nothing.")
@max_tokens_option()
@fail_on_option()
@report_dir_option()
@json_option()
@click.pass_obj
def submit(obj: Context, text: str, capabilities: tuple[str, ...], agent: str | None,
           payload: str | None, timeout: float | None, attempt_timeout: float | None,
           retries: int | None, priority: int, task_id: str | None, no_wait: bool,
           path: Path | None, plan_only: bool, max_tokens: int | None, fail_on: str,
           report_dir: Path | None, as_json: bool) -> None:
    """Submit TEXT as a task; print its id (``--no-wait``) or wait and print its result.
    Without ``--capability``/``--agent``, plan TEXT into a workflow and run that
    (:func:`cli.plans.submit_planned`; ``--id`` is then the run id, ``--timeout`` the
    run's deadline).

    A task no live agent can take is said at once on stderr (with how long it waits);
    Ctrl-C while waiting says how to cancel the task and exits 130.
    """
    # Parsed before connecting, so that a bad --payload is a usage error (exit 2), not 3.
    options = _parse_payload(payload)
    if max_tokens is not None:
        options["llm_budget"] = {"scope": f"task:{uuid.uuid4().hex}", "max_tokens": max_tokens}
    if not capabilities and agent is None:
        given = [name for name, value in (("--payload", payload), ("--retries", retries),
                                          ("--priority", priority or None),
                                          ("--attempt-timeout", attempt_timeout))
                 if value is not None]
        presentation = Presentation(fail_on.lower(), report_dir, obj.home)
        submit_planned(obj, text, path, plan_only, timeout, task_id, no_wait, as_json, given,
                       presentation, max_tokens)
    if plan_only or path is not None:
        fail("--plan and --path are for the planner: leave out --capability and --agent",
             EXIT_USAGE)
    submitted: str | None = None
    try:
        with closing(obj.client()) as client:
            existed = task_id is not None and _exists(client, task_id)
            if existed:
                click.echo(f"task {task_id} exists; showing its result", err=True)
            status = client.status(PING_TIMEOUT_S)
            # None: the broker applies its default, which the CLI then waits for.
            timeout_s = timeout or status.get("broker", {}).get("default_timeout_s")
            handle = client.submit(text, capabilities=capabilities, agent=agent,
                                   timeout=timeout, retries=retries, priority=priority,
                                   task_id=task_id, attempt_timeout=attempt_timeout,
                                   **options)
            submitted = handle.id
            if not existed and not _offered(status, capabilities, agent):
                _say_waiting(handle.id, _need(capabilities, agent), timeout_s)
            if no_wait:
                _report_accepted(handle, as_json)
                return
            # The broker ends the task at its deadline; give its answer time to arrive.
            wait_s = None if timeout_s is None else timeout_s + PING_TIMEOUT_S
            result = _wait_with_progress(handle, wait_s, as_json)
    except KeyboardInterrupt:
        _interrupted(submitted)
    _print_result(result, as_json)
    _exit_for(result)


def _exists(client: SyncClient, task_id: str) -> bool:
    """Whether the broker knows a task with this id (a submit with it shows that task)."""
    from agent_sdk import TaskNotFound

    try:
        client.fetch(task_id, PING_TIMEOUT_S)
    except TaskNotFound:
        return False
    return True


@click.command(cls=DataDirCommand,
               help="Print a task's result (or its state, if it has not finished).")
@click.argument("task_id", type=TASK_ID)
@click.option("--wait", is_flag=True, help="Wait until the task finishes.")
@click.option("--timeout", type=SECONDS, default=None, help="With --wait: give up after S seconds.")
@json_option()
@click.pass_obj
def result(obj: Context, task_id: str, wait: bool, timeout: float | None, as_json: bool) -> None:
    """Print a finished task's result, else its state (or wait for it with ``--wait``)."""
    try:
        with closing(obj.client()) as client:
            found = _known(client.fetch, task_id, PING_TIMEOUT_S)
            if not found.finished:
                if not wait:
                    if as_json:
                        emit_json(_result_document(found))
                    else:
                        click.echo(f"{task_id}: {found.status}")
                    return
                found = _wait_with_progress(client.watch(task_id), timeout, as_json)
    except KeyboardInterrupt:
        _interrupted(task_id)
    _print_result(found, as_json)
    _exit_for(found)


@click.command(cls=DataDirCommand,
               help="Cancel a task: pending ones are dropped, running ones stopped.")
@click.argument("task_id", type=TASK_ID)
@json_option("Print the outcome as JSON.")
@click.pass_obj
def cancel(obj: Context, task_id: str, as_json: bool) -> None:
    """Cancel a task that has not finished, and print the status it ended with."""
    with closing(obj.client()) as client:
        before = _known(client.fetch, task_id, PING_TIMEOUT_S)
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


TRACE_HELP = """Show the timeline of a task or of a workflow run.

For a task: every event since submission (+seconds), with the agent each attempt went
to, why an attempt was requeued or retried, the waits and run times, the result, and the
subtask tree. For a run id: the run's timeline (created, started, each step started and
ended, finished), then each step with its task's trace. Exit 1 when neither a task nor a
run has this id."""
#: Step tasks traced at once for a run (a map's steps may number thousands).
TRACE_CONCURRENCY = 32


def _run_trace(obj: Context, run_id: str, missing: str) -> dict[str, Any]:
    """The trace document of the workflow run ``run_id``; exits 1 with ``missing`` (the
    broker's word on the task id) when there is no such run either."""
    import asyncio

    from agent_sdk import StateUnavailable
    from cli.runs import Session, exit_for_error
    from cli.trace_view import run_document
    from workflows import RunNotFound, WorkflowInputError

    with Session(obj) as session:
        future = asyncio.run_coroutine_threadsafe(_load_run(session, run_id),
                                                  session.thread.loop)
        try:
            details, traces = future.result()
        except (RunNotFound, WorkflowInputError):
            # Not a run (or not even a valid run id): the id is unknown.
            fail(f"{missing}, nor a workflow run", EXIT_FAILED, {"id": run_id})
        except StateUnavailable:
            fail(f"{missing}; runs cannot be looked up: the state service does not answer",
                 EXIT_FAILED, {"id": run_id})
        except Exception as e:  # noqa: BLE001 - each error has its one line and exit code
            exit_for_error(e, obj, session.url)
    return run_document(details, traces)


async def _load_run(session: Any, run_id: str) -> tuple[Any, dict[str, dict[str, Any] | None]]:
    """A run's details and the broker's trace of each of its steps' tasks (None for a
    task the broker no longer retains)."""
    import asyncio

    from agent_sdk import TaskNotFound
    from workflows import run_status

    client = session.client
    details = await run_status(run_id, client=client)
    ids = sorted({s.task_id for s in details.steps if s.task_id})
    limit = asyncio.Semaphore(TRACE_CONCURRENCY)

    async def one(task_id: str) -> dict[str, Any] | None:
        async with limit:
            try:
                return await client.trace(task_id, PING_TIMEOUT_S)
            except TaskNotFound:
                return None

    found = await asyncio.gather(*(one(task_id) for task_id in ids))
    return details, dict(zip(ids, found))


@click.command(cls=DataDirCommand, help=TRACE_HELP)
@click.argument("task_id", metavar="ID", type=TASK_ID)
@json_option("Print the trace as one JSON document ({\"kind\": \"task\"|\"run\", ...}).")
@click.pass_obj
def trace(obj: Context, task_id: str, as_json: bool) -> None:
    """Print the trace of the task ``task_id`` or, when the broker knows no such task, of
    the workflow run with that id."""
    from agent_sdk import TaskNotFound
    from cli.trace_view import print_run, print_task, task_document

    missing = ""
    with closing(obj.client()) as client:
        try:
            document = task_document(client.trace(task_id, PING_TIMEOUT_S))
        except TaskNotFound as e:
            document = None
            missing = str(e)
    if document is None:
        # Closed first: the run is looked up on a connection of its own (an async one).
        document = _run_trace(obj, task_id, missing)
    if as_json:
        emit_json(document)
    elif document["kind"] == "run":
        print_run(document)
    else:
        print_task(document)


@click.command(cls=DataDirCommand, help=TASKS_HELP)
@click.option("--failed", is_flag=True, help="Only tasks that failed or timed out.")
@click.option("--status", "statuses", multiple=True,
              type=click.Choice(TASK_STATES),
              help="Only tasks with this status (repeatable).")
@click.option("--limit", type=count(1), default=50, show_default=True)
@json_option("Print the list as JSON.")
@click.pass_obj
def tasks(obj: Context, failed: bool, statuses: tuple[str, ...], limit: int,
          as_json: bool) -> None:
    """List the open tasks, then the finished ones the broker retains, as a table or JSON."""
    wanted = list(statuses) + (["failed", "timed_out"] if failed else [])
    with closing(obj.client()) as client:
        listed = client.tasks(wanted or None, limit, PING_TIMEOUT_S)
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
