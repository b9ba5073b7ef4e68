"""The ``orchestrator`` command line: start and stop the broker, submit work, inspect it.

Exit codes: 0 success, 1 task failed or not found, 2 usage error, 3 broker unreachable,
4 findings at or above ``--fail-on``, 5 unauthorized (a secure broker refused our key).
Every command that prints data takes ``--json`` and then prints exactly one JSON document.

This module only assembles the group: the commands live in one module per topic
(:mod:`cli.lifecycle`, :mod:`cli.tasks`, :mod:`cli.state`, :mod:`cli.bench`,
:mod:`cli.workflow`, ...), imported when used, and what they share in :mod:`cli.common`.
Nothing imports this module but the entry points.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

import click

from broker import __version__
from cli.common import EXIT_CODES_HELP, URL, CliGroup, Context, DirPath

HELP = "Orchestrator: run many AI agents as processes and coordinate them through a broker."

#: Every command, as ``module:attribute``, imported when it is asked for: ``orchestrator
#: submit`` loads :mod:`cli.tasks` and what it needs, not every command's dependencies
#: (the node supervisor, the benchmarks, the workflow engine, rich tables). ``--help``
#: lists them all, and so imports them all.
COMMANDS: Final = {
    "start": "cli.lifecycle:start", "stop": "cli.lifecycle:stop",
    "status": "cli.lifecycle:status", "submit": "cli.tasks:submit",
    "result": "cli.tasks:result", "cancel": "cli.tasks:cancel", "trace": "cli.tasks:trace",
    "tasks": "cli.tasks:tasks", "bench": "cli.bench:bench", "state": "cli.state:state",
    "workflow": "cli.workflow:workflow", "run": "cli.oneshot:run",
    "events": "cli.events:events", "logs": "cli.logs:logs", "keys": "cli.keys:keys",
    "purge": "cli.purge:purge", "agents": "cli.agents:agents",
}


@click.group(cls=CliGroup, lazy_commands=COMMANDS, help=HELP, epilog=EXIT_CODES_HELP)
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


if __name__ == "__main__":
    main()
