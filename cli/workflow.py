"""``orchestrator workflow``: declarative workflows and durable runs.

``workflow run FILE`` loads a YAML workflow (:mod:`workflows.yamlform`), submits it as a
durable run for the standing workflow runner (which ``orchestrator start`` launches), then
follows it; ``status``, ``list``, ``cancel``, ``resume`` and ``approve`` act on runs by id.

Exit codes: 0 the run succeeded (or the request was done), 1 it failed, was cancelled or
rejected, or there is no such run, 2 a usage error (a workflow file with an error, named
by its line), 3 the broker does not answer. Ctrl-C while following a run leaves it going
and exits 130.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from cli.common import (
    EXIT_USAGE, SECONDS, TEXT, Context, DataDirGroup, Text, count, emit_json, fail,
    json_option,
)
from cli.report_view import (
    Presentation, fail_on_option, max_tokens_option, report_dir_option,
)
from cli.runs import (
    JSON_VALUE, RUN_ID, Session, details_document, drive_and_follow, follow, interrupted,
    outcome_line, print_outcome, submit_and_follow, warn_if_undriven,
)

if TYPE_CHECKING:
    from workflows import RunDetails, Workflow

#: How wide ``workflow list`` prints when its output is not a terminal.
LIST_PIPE_WIDTH = 200
#: The statuses a run can have, for ``workflow list --status``.
RUN_STATES = ("submitted", "running", "waiting_approval", "succeeded", "failed", "cancelled",
              "rejected", "budget_exceeded")

WORKFLOW_HELP = """Declarative workflows and durable runs.

A run is kept in the broker's state service and driven by the standing workflow runner
that `orchestrator start` launches: it goes on when this command exits, and waits
durably at approval steps until `workflow approve` answers."""
RUN_HELP = """Run the workflow of the YAML file FILE as a durable run.

Prints the run id first (on stderr), then follows the run (steps done/total, as a bar on a
terminal) and prints its output. Exit 0 when it succeeded, 1 when it failed, was cancelled
or rejected; 2 when FILE has an error (the message names its line and field). Ctrl-C
leaves the run going and says how to follow, resume or cancel it."""

# The positional arguments are named `text` (the file) and `task_id` (a run id), with
# FILE and RUN_ID shown in the help: the names every command's arguments share.
_FILE = Text("workflow file", non_empty=True)


@click.group("workflow", cls=DataDirGroup, help=WORKFLOW_HELP)
def workflow() -> None:
    """The ``workflow`` group: its commands do the work."""


def _load(file: str) -> Workflow:
    """The workflow of the YAML file ``file``, or exit 2 with its one-line error."""
    from workflows.yamlform import WorkflowFileError, load_workflow_file

    try:
        return load_workflow_file(file)
    except WorkflowFileError as e:
        fail(str(e), EXIT_USAGE, {"file": e.file, "line": e.line, "field": e.field})


@workflow.command("run", help=RUN_HELP)
@click.argument("text", metavar="FILE", type=_FILE)
@click.option("--input", "data", type=JSON_VALUE, default=None,
              help="The run's input as JSON; @FILE reads it from a file, - from stdin.")
@click.option("--timeout", type=SECONDS, default=None,
              help="The run's deadline, seconds from submission (default: the file's "
                   "deadline_s, else none).")
@click.option("--id", "run_id", type=RUN_ID, default=None,
              help="The run id (default: a new one).")
@click.option("--no-wait", is_flag=True, help="Print the run id once submitted and return.")
@max_tokens_option()
@fail_on_option()
@report_dir_option()
@json_option("Print the run's details (status, output, error, steps) as JSON.")
@click.pass_obj
def run(obj: Context, text: str, data: Any, timeout: float | None, run_id: str | None,
        no_wait: bool, max_tokens: int | None, fail_on: str, report_dir: Path | None,
        as_json: bool) -> None:
    """Submit the workflow of the file ``text`` as a durable run, then follow it."""
    # A file that is there is checked before anything connects; one that is not is said
    # once the broker answered (as an unknown run id would be).
    try:
        exists = Path(text).is_file()
    except OSError:  # a name the system refuses (too long): _load says so in one line
        exists = False
    definition = _load(text) if exists else None
    with Session(obj) as session:
        definition = definition or _load(text)
        if max_tokens is not None:
            definition = dataclasses.replace(definition, max_tokens=max_tokens)
        warn_if_undriven(obj, session)
        submit_and_follow(session, definition, data, run_id=run_id, deadline_s=timeout,
                          no_wait=no_wait, as_json=as_json,
                          presentation=Presentation(fail_on.lower(), report_dir, obj.home))


def _print_details(details: RunDetails) -> None:
    """A run's details for people: a summary, its pending approvals, its outcome."""
    def when(at: float | None) -> str:
        return "-" if at is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))

    click.echo(f"run {details.run_id}  workflow {details.workflow}  {details.status.value}")
    click.echo(f"  steps {details.progress.done}/{details.progress.total}  submitted "
               f"{when(details.created_at)} by {details.submitted_by}  finished "
               f"{when(details.finished_at)}")
    if details.runner:
        click.echo(f"  runner {details.runner}  takeovers {details.takeovers}")
    for pending in details.pending:
        click.echo(f"  waiting for approval at {pending.path}: {pending.prompt}  (answer with "
                   f"`orchestrator workflow approve {details.run_id} [--reject]`)")
    for step in details.steps:
        error = f"  {step.error}" if step.error else ""
        click.echo(f"  {step.path}  {step.status}{error}")
    if details.status.value == "succeeded" and details.output is not None:
        click.echo("output:")
        data = details.output.data
        click.echo(data if isinstance(data, str) else _json_text(data))
    elif details.status.terminal:
        click.echo(f"  {outcome_line(details)}")


def _json_text(value: Any) -> str:
    """``value`` as indented JSON text."""
    import orjson

    return orjson.dumps(value, default=str, option=orjson.OPT_INDENT_2).decode()


@workflow.command("status", help="Show a run: status, steps done/total, pending approvals, "
                                 "output or error. With --wait, follow it until it ends.")
@click.argument("task_id", metavar="RUN_ID", type=RUN_ID)
@click.option("--wait", is_flag=True, help="Follow the run until it ends, then print its "
                                           "output (exit 1 if it did not succeed).")
@fail_on_option()
@report_dir_option()
@json_option("Print the run's details as JSON (its input included).")
@click.pass_obj
def status(obj: Context, task_id: str, wait: bool, fail_on: str, report_dir: Path | None,
           as_json: bool) -> None:
    """Print the run ``task_id``; with ``--wait``, follow it and print how it ended."""
    from workflows import run_status

    with Session(obj) as session:
        if wait:
            try:
                details = follow(session, task_id, as_json)
            except KeyboardInterrupt:
                interrupted(task_id)
            print_outcome(details, as_json,
                          Presentation(fail_on.lower(), report_dir, obj.home))
        details = session.call(run_status(task_id, client=session.client))
    if as_json:
        emit_json(details_document(details, include_input=True))
    else:
        _print_details(details)


@workflow.command("list", help="List the workflow runs, newest first.")
@click.option("--status", "statuses", type=click.Choice(RUN_STATES), default=None,
              help="Only runs with this status.")
@click.option("--limit", type=count(1), default=50, show_default=True)
@json_option("Print the list as JSON.")
@click.pass_obj
def list_(obj: Context, statuses: str | None, limit: int, as_json: bool) -> None:
    """List the runs as a table or JSON."""
    from workflows import list_runs

    with Session(obj) as session:
        runs = session.call(list_runs(client=session.client, status=statuses, limit=limit))
    if as_json:
        emit_json([{"run_id": r.run_id, "workflow": r.workflow, "status": r.status.value,
                    "created_at": r.created_at, "updated_at": r.updated_at,
                    "runner": r.runner, "waiting_approvals": r.waiting_approvals}
                   for r in runs])
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{len(runs)} run(s)", title_justify="left")
    for column in ("run", "workflow", "status", "submitted", "runner"):
        # Ids are never cut: a cell too wide for the terminal wraps whole.
        table.add_column(column, overflow="fold")
    for r in runs:
        table.add_row(r.run_id, r.workflow, r.status.value + (
            f" ({r.waiting_approvals})" if r.waiting_approvals else ""),
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.created_at)), r.runner)
    console = Console()
    # Piped: no width to fit, so every cell at its full width.
    Console(width=LIST_PIPE_WIDTH).print(table) if not console.is_terminal else \
        console.print(table)


@workflow.command("cancel", help="Cancel a run: every open task of it is cancelled and it "
                                 "ends cancelled.")
@click.argument("task_id", metavar="RUN_ID", type=RUN_ID)
@click.option("--reason", type=TEXT, default="", help="Why, kept in the run's history.")
@json_option("Print the outcome as JSON.")
@click.pass_obj
def cancel(obj: Context, task_id: str, reason: str, as_json: bool) -> None:
    """Cancel the run ``task_id`` and print the status it has then."""
    from workflows import cancel_run

    with Session(obj) as session:
        record = session.call(cancel_run(task_id, reason=reason, client=session.client))
    if as_json:
        emit_json({"run_id": record.run_id, "status": record.status.value,
                   "ended": record.ended, "by": record.by, "at": record.at})
    else:
        click.echo(f"{record.run_id}: {record.status.value}"
                   + ("" if record.ended else " (cancel requested; its runner ends it)"))


@workflow.command("resume", help="Make a runner take a run over at once from its checkpoints "
                                 "(open tasks are attached to, not run again). When no "
                                 "runner serves the broker, this command drives the run "
                                 "itself until it ends.")
@click.argument("task_id", metavar="RUN_ID", type=RUN_ID)
@fail_on_option()
@report_dir_option()
@json_option("Print the outcome as JSON.")
@click.pass_obj
def resume(obj: Context, task_id: str, fail_on: str, report_dir: Path | None,
           as_json: bool) -> None:
    """Ask for a takeover of the run ``task_id``; say who drives it now."""
    from workflows import resume_run

    with Session(obj) as session:
        record = session.call(resume_run(task_id, client=session.client))
        if record.drive_here and not record.status.terminal:
            # No standing runner serves this broker: this command drives the run.
            click.echo(f"no workflow runner serves this broker: driving run {record.run_id} "
                       "here until it ends (Ctrl-C stops; `orchestrator start` runs a "
                       "standing runner)", err=True)
            drive_and_follow(session, record.run_id, as_json,
                             Presentation(fail_on.lower(), report_dir, obj.home))
    if as_json:
        emit_json({"run_id": record.run_id, "status": record.status.value,
                   "holder": record.holder, "at": record.at, "runners": list(record.runners)})
        return
    click.echo(f"{record.run_id}: {record.status.value}; "
               + (f"driven by {record.holder}" if record.holder else
                  f"a runner takes it over ({len(record.runners)} serve this broker)"))


@workflow.command("approve", help="Answer the approval step a run waits at: approve it, or "
                                  "--reject it (the run then ends rejected).")
@click.argument("task_id", metavar="RUN_ID", type=RUN_ID)
@click.option("--reject", is_flag=True, help="Reject instead of approving.")
@click.option("--comment", type=TEXT, default="", help="A comment kept with the answer.")
@click.option("--step", type=Text("step path", non_empty=True, printable=True), default=None,
              help="The approval step's path, when the run waits at several.")
@json_option("Print the answer as JSON.")
@click.pass_obj
def approve(obj: Context, task_id: str, reject: bool, comment: str, step: str | None,
            as_json: bool) -> None:
    """Answer the waiting approval of the run ``task_id``."""
    from workflows import approve_run

    with Session(obj) as session:
        answer = session.call(approve_run(task_id, not reject, comment, path=step,
                                          client=session.client))
    if as_json:
        emit_json({"run_id": answer.run_id, "path": answer.path, "approved": answer.approved,
                   "comment": answer.comment, "by": answer.by, "at": answer.at})
    else:
        click.echo(f"{answer.run_id}: {answer.path} "
                   f"{'approved' if answer.approved else 'rejected'} by {answer.by}")
