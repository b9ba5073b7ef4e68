"""``orchestrator run TEXT``: the answer in one command, no daemon.

The planner turns TEXT into a workflow; a private broker starts in this process
(:class:`broker.embedded.EmbeddedBroker`, its state and bus in memory, on free ports), the
built-in agents the plan needs start as processes against it, this process drives the run
and presents its outcome as ``submit`` does (a findings report: summary, three files,
exit 4 past ``--fail-on``), and then everything stops, whatever happened.

With ``--secure`` the private broker's sockets (its ROUTER, state service, bus and events)
are CURVE servers with ZAP, as ``start --secure`` makes them: the keys are made in the
private broker's data dir (a fresh temporary directory, 0700, removed at the end, so
every run has keys of its own), the agents get the ``local-agents`` key (role agent) and
this process's client the ``local-admin`` key, through the same variables ``start``
gives its agents and runner (``cli.lifecycle.secure_env``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import click

from cli.common import (
    EXIT_FAILED, EXIT_USAGE, SECONDS, TEXT, Context, DataDirCommand, DirPath, fail, json_option,
)
from cli.launch import Launch, StartFailed
from cli.pool import AgentSpecs, BUILT_INS, builtins_for, parse_agents, say_llm_endpoint
from cli.processes import log_tail
from cli.report_view import (
    Presentation, fail_on_option, max_tokens_option, report_dir_option,
)
from cli.runs import Session, drive_and_follow

RUN_HELP = """Plan TEXT into a workflow and run it in this process, with no daemon: a
private broker and the built-in agents the plan needs start, the run is followed to its
end, and everything stops again.

  orchestrator run "Analyze this codebase for security issues"

Ends as `submit TEXT` does: a findings report prints a summary and writes report.md,
report.json and report.sarif (--report-dir), and exits 4 when a finding reaches
--fail-on. --agents adjusts which agents start (reviewer=4, or module:Class[=N]).
--secure runs the private broker with CURVE encryption and key authentication on every
socket, as `start --secure` does, with keys made for this run only.
"""


@click.command("run", cls=DataDirCommand, help=RUN_HELP)
@click.argument("text", type=TEXT)
@click.option("--path", type=DirPath(exists=True), default=None,
              help="The directory the workflow works on (default: the working directory).")
@click.option("--agents", "agents_spec", type=AgentSpecs(), default=None,
              help="Agents to start instead of the ones the plan needs: NAME=N adjusts "
                   "the built-ins, module:Class[=N] adds your own.")
@click.option("--allow-commands", is_flag=True,
              help="Let the coder run test commands (debugging) on the carried files.")
@click.option("--timeout", type=SECONDS, default=None,
              help="The run's deadline in seconds (default: the plan's).")
@click.option("--secure", is_flag=True, envvar="ORCH_SECURE",
              help="CURVE encryption and key authentication on every socket of the private "
                   "broker, as `start --secure` (also ORCH_SECURE=1); its keys are made "
                   "for this run and removed with it.")
@max_tokens_option()
@fail_on_option()
@report_dir_option()
@json_option()
@click.pass_obj
def run(obj: Context, text: str, path: Path | None, agents_spec: str | None,
        allow_commands: bool, timeout: float | None, secure: bool, max_tokens: int | None,
        fail_on: str, report_dir: Path | None, as_json: bool) -> None:
    """Plan, start a private broker and the agents, run, present, stop."""
    from workflows.llm_planner import make_planner
    from workflows.planner import PlanError

    offered = builtin_capabilities(allow_commands)
    try:
        planned = make_planner().plan(text, cwd=os.getcwd(), path=path,
                                      online_capabilities=offered)
    except PlanError as e:
        fail(str(e), EXIT_USAGE)
    if planned.missing and agents_spec is None:
        # Nothing else will come online in a private run: say so now, not at the deadline.
        fail(f"the plan needs {', '.join(planned.missing)}, which no built-in agent offers "
             f"here: {_how_to_offer(planned.missing)}", EXIT_USAGE,
             {"missing": list(planned.missing)})
    agents = parse_agents(agents_spec) if agents_spec is not None else \
        builtins_for(set(planned.capabilities))
    if not as_json:
        click.echo(f"plan: {planned.summary}", err=True)
    say_llm_endpoint()
    presentation = Presentation(fail_on.lower(), report_dir, obj.home)
    scratch = Path(tempfile.mkdtemp(prefix="orch-run-"))
    try:
        _run_private(scratch, agents, {"ORCH_ALLOW_COMMANDS": "1"} if allow_commands else {},
                     dataclasses.replace(planned.workflow, max_tokens=max_tokens),
                     planned.input, timeout, presentation, as_json,
                     obj.home, secure)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def builtin_capabilities(allow_commands: bool) -> set[str]:
    """What the built-in agents will offer in this environment: code generation only with
    an LLM configured, debugging only with commands allowed."""
    from agent_sdk.llm import LLMConfig

    offered = {c for b in BUILT_INS.values() for c in b.capabilities}
    if LLMConfig.from_env() is None:
        offered.discard("code_generation")
    if not allow_commands:
        offered.discard("debugging")
    return offered


def _how_to_offer(missing: tuple[str, ...]) -> str:
    """What would make the built-in agents offer ``missing``."""
    ways = []
    if "code_generation" in missing:
        ways.append("code_generation needs an LLM (set ORCH_LLM_BASE_URL and ORCH_LLM_MODEL; "
                    "see docs/agents.md)")
    if "debugging" in missing:
        ways.append("debugging runs test commands only with --allow-commands")
    others = [c for c in missing if c not in ("code_generation", "debugging")]
    if others:
        ways.append(f"start agents offering {', '.join(others)} with --agents module:Class")
    return "; ".join(ways)


def _run_private(scratch: Path, agents: list[tuple[str, int]], agent_env: dict[str, str],
                 workflow: Any, data: Any, timeout: float | None,
                 presentation: Presentation, as_json: bool, home: Path,
                 secure: bool = False) -> None:
    """Start the private broker and the agents, drive the run, present it; stop all."""
    from broker.embedded import EmbeddedBroker
    from broker.errors import ConfigError
    from workflows import submit_run

    broker_dir = scratch / "broker"
    client_keys: dict[str, str] = {}
    if secure:
        from cli.lifecycle import secure_env

        # The keys `start --secure` makes, in the private broker's data dir (exits 2
        # with one line on a key or permission problem); the agents get theirs as
        # `start` gives them, this process's client the local admin key.
        client_keys, agent_keys = secure_env(broker_dir)
        agent_env = {**agent_env, **agent_keys}
    embedded = EmbeddedBroker(broker_dir, ("--secure",) if secure else ())
    try:
        embedded.start()
    except ConfigError as e:  # a key or permission problem found by the broker's checks
        fail(str(e), EXIT_USAGE)
    if secure and not as_json:
        click.echo(f"private broker at {embedded.endpoint}: CURVE on every socket, with "
                   "keys made for this run", err=True)
    launch = Launch(scratch)
    try:
        try:
            if not as_json:
                count = sum(n for _, n in agents)
                click.echo(f"starting {count} agent process(es)", err=True)
            launch.start_agents(agents, embedded.endpoint, agent_env)
        except StartFailed as e:
            launch.undo()
            fail(f"{e}; its last lines:", EXIT_FAILED, {"log": str(e.log)},
                 log_tail(e.log, e.offset))
        try:
            with _environment(client_keys), \
                    Session(Context(home, embedded.endpoint)) as session:
                run_id = session.call(submit_run(workflow, data, client=session.client,
                                                 deadline_s=timeout, submitted_by="run"))
                if not as_json:
                    click.echo(f"run {run_id} started", err=True)
                drive_and_follow(session, run_id, as_json, presentation)
        finally:
            launch.undo()
    finally:
        embedded.stop()


@contextlib.contextmanager
def _environment(variables: Mapping[str, str]) -> Iterator[None]:
    """This process's environment with ``variables`` set for the block, then restored.

    The SDK reads its CURVE keys from ``ORCH_CURVE_*`` whenever a socket connects (the
    run's client, its state and bus connections); a ``ORCH_CURVE_SERVER_KEY_FILE`` of
    the user's (for another broker) is hidden meanwhile, so that only these apply.
    """
    if not variables:
        yield
        return
    from wire.curve import ENV_SERVER_KEY_FILE

    saved = {name: os.environ.get(name) for name in (*variables, ENV_SERVER_KEY_FILE)}
    os.environ.pop(ENV_SERVER_KEY_FILE, None)
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
