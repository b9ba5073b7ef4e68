"""``orchestrator submit TEXT`` without ``--capability`` or ``--agent``: the planner turns
the text into a workflow (:mod:`workflows.planner`), which runs as a durable run.

``--plan`` prints the plan without running it, marking the capabilities no agent online
offers. A text the planner cannot place is a usage error (exit 2) whose one line lists
what the agents online can do.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, NoReturn

import click
import zmq

from cli.common import EXIT_OK, EXIT_USAGE, PING_TIMEOUT_S, Context, emit_json, fail
from agent_sdk.status import offered_capabilities
from cli.report_view import Presentation
from cli.runs import Session, submit_and_follow, warn_if_undriven

def _say_missing(missing: tuple[str, ...], run_id: str, deadline_s: float | None) -> None:
    """Tell the user at once which capabilities nobody online offers, and how long the
    run waits for them."""
    how_long = (f"up to its deadline ({deadline_s:g} s)" if deadline_s
                else "until an agent offers them (no deadline; --timeout sets one)")
    names = ", ".join(repr(c) for c in missing)
    click.echo(f"no agent online offers {names}; run {run_id} waits for them {how_long}. "
               f"Start an agent, or cancel it with `orchestrator workflow cancel {run_id}`",
               err=True)


def _online_if_reachable(obj: Context) -> set[str] | None:
    """What the agents of the broker offer, or None when no broker answers (a plan can
    still be shown: nothing of it needs the broker but this check)."""
    from agent_sdk import OrchestratorError, SyncClient

    try:
        client = SyncClient(obj.broker_url)
    except (OrchestratorError, zmq.ZMQError):
        return None
    try:
        return offered_capabilities(client.status(timeout=PING_TIMEOUT_S))
    except OrchestratorError:
        return None
    finally:
        client.close()


def _print_plan(obj: Context, text: str, path: Path | None, as_json: bool) -> NoReturn:
    """``--plan``: the plan, its missing capabilities marked when a broker answers, and
    a note on stderr when none does."""
    from workflows.llm_planner import make_planner
    from workflows.planner import PlanError

    online = _online_if_reachable(obj)
    try:
        planned = make_planner().plan(text, cwd=os.getcwd(), path=path,
                                            online_capabilities=online)
    except PlanError as e:
        fail(str(e), EXIT_USAGE)
    if online is None:
        click.echo(f"note: no broker answers at {obj.broker_url}: the plan does not say which "
                   "capabilities are online", err=True)
    if as_json:
        emit_json({**planned.to_dict(include_input=False), "online_checked": online is not None})
    else:
        click.echo(planned.describe())
    raise SystemExit(EXIT_OK)


def submit_planned(obj: Context, text: str, path: Path | None, plan_only: bool,
                   timeout: float | None, run_id: str | None, no_wait: bool, as_json: bool,
                   task_only: list[str], presentation: Presentation,
                   max_tokens: int | None = None) -> NoReturn:
    """Plan ``text`` and print the plan (``plan_only``) or run it as a durable run.

    Args:
        obj: The command's context.
        text: The request.
        path: ``--path``: the tree to work on (default: the working directory).
        plan_only: ``--plan``: print the plan, run nothing.
        timeout: ``--timeout``: the run's deadline in seconds.
        run_id: ``--id``: the run id.
        no_wait: ``--no-wait``: print the run id once submitted.
        as_json: ``--json``.
        task_only: The options given that only a task sent as is takes.
        presentation: How a findings report the run ends with is presented.
        max_tokens: ``--max-tokens``: the run's LLM token budget.
    """
    from workflows.llm_planner import make_planner
    from workflows.planner import PlanError

    if plan_only and not task_only:
        _print_plan(obj, text, path, as_json)
    with Session(obj) as session:
        if task_only:
            verb = "applies" if len(task_only) == 1 else "apply"
            fail(f"{', '.join(task_only)} {verb} only to a task sent with --capability or "
                 "--agent; without them the planner turns TEXT into a workflow", EXIT_USAGE)
        status = session.call(session.client.status(PING_TIMEOUT_S))
        online = offered_capabilities(status)
        try:
            planned = make_planner().plan(text, cwd=os.getcwd(), path=path,
                                            online_capabilities=online)
        except PlanError as e:
            fail(str(e), EXIT_USAGE)
        deadline_s = timeout or planned.workflow.deadline_s

        def submitted(new_id: str) -> None:
            if planned.missing:
                _say_missing(planned.missing, new_id, deadline_s)

        warn_if_undriven(obj, session)
        workflow = planned.workflow if max_tokens is None else \
            dataclasses.replace(planned.workflow, max_tokens=max_tokens)
        submit_and_follow(session, workflow, planned.input, run_id=run_id,
                          deadline_s=timeout, no_wait=no_wait, as_json=as_json,
                          on_submitted=submitted, presentation=presentation)
