"""The ``orchestrator`` command line: start and stop the broker, submit work, inspect it.

Exit codes: 0 success, 1 task failed or not found, 2 usage error, 3 broker unreachable,
4 findings at or above ``--fail-on``, 5 unauthorized (a secure broker refused our key).
Every command that prints data takes ``--json`` and then prints exactly one JSON document.

This module only assembles the group: the commands live in one module per topic
(:mod:`cli.lifecycle`, :mod:`cli.tasks`, :mod:`cli.state`, :mod:`cli.bench`,
:mod:`cli.workflow`) and what
they share in :mod:`cli.common`. Nothing imports this module but the entry points.
"""

from __future__ import annotations

from pathlib import Path

import click

from broker import __version__
from cli.agents import agents
from cli.bench import bench
from cli.common import EXIT_CODES_HELP, URL, CliGroup, Context, DirPath
from cli.events import events
from cli.keys import keys
from cli.lifecycle import start, status, stop
from cli.logs import logs
from cli.oneshot import run
from cli.purge import purge
from cli.state import state
from cli.tasks import cancel, result, submit, tasks, trace
from cli.workflow import workflow

HELP = "Orchestrator: run many AI agents as processes and coordinate them through a broker."


@click.group(cls=CliGroup, help=HELP, epilog=EXIT_CODES_HELP)
@click.version_option(__version__, prog_name="orchestrator")
@click.option("--home", type=DirPath(), default=None, envvar="ORCH_HOME",
              help="Data dir (lock, pid files, logs, journal, state). Default: $ORCH_HOME, "
                   "else ./.orchestrator where it exists, else "
                   "$XDG_STATE_HOME/orchestrator (~/.local/state/orchestrator).")
@click.option("--broker", "broker_url", type=URL, default=None,
              help="Broker URL, tcp://HOST:PORT. Default: the running broker of the data dir, "
                   "else $ORCH_BROKER.")
@click.pass_context
def main(ctx: click.Context, home: Path | None, broker_url: str | None) -> None:
    """Resolve the options every command shares into the commands' context."""
    source = "from ORCH_HOME" if ctx.get_parameter_source("home") is \
        click.core.ParameterSource.ENVIRONMENT else "from --home"
    ctx.obj = Context.from_options(home, broker_url, source)


# `--help` lists the commands sorted by name, so the order here does not show.
for _command in (start, stop, status, submit, result, cancel, trace, tasks, bench, state,
                 workflow, run, events, logs, keys, purge, agents):
    main.add_command(_command)


if __name__ == "__main__":
    main()
