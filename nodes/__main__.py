"""Run a node supervisor: ``python -m nodes --broker URL``.

Prints one JSON line ``{"event": "ready", "node_id", "pid", "catalogue"}`` on stdout once
the broker's first PLAN arrived, so whoever started it can wait for that instead of
sleeping. Logs go to stderr and to the data dir's JSON log ``node-ID``.

Exit codes: 0 stopped (SIGTERM, SIGINT), 1 it cannot run (another supervisor holds the
data dir, a wrong CURVE key setting), 2 a bad command line.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import socket
import sys
from pathlib import Path

from nodes.catalogue import CatalogueError, check_spec
from nodes.replicas import BACKOFF_MAX_S, BACKOFF_S, ENV_AGENT_KEY_FILE
from nodes.supervisor import NodeRunning, NodeSettings, Supervisor
from wire.curve import KeyFileError
from wire.home import home_dir
from wire.logs import install_json_log
from wire.nodes import MAX_NAME_CHARS

DESCRIPTION = (
    "Run a node supervisor: keep replicas of this node's catalogue of agents running as "
    "the broker plans them (the broker names agents; the node runs only what its own "
    "catalogue holds), and report them.")
EPILOG = (
    "The catalogue: the built-in agents (reviewer, researcher, coder, synthesizer), the "
    "--catalogue entries and the \"catalogue\" list of HOME/node.json (re-read when it "
    "changes). A replica that exits unasked is restarted after a back-off; --crash-limit "
    "crashes within --crash-window seconds (default: 5 crashes within 60 s) is a crash "
    "loop: the node stops restarting that agent and reports it failing until it is "
    f"scaled again. Replicas get ${ENV_AGENT_KEY_FILE} as their ORCH_CURVE_KEY_FILE when "
    "it is set. Replica stderr: HOME/agents.log.")


#: The variable that sets ``--restart-delay`` for a supervisor a command starts.
RESTART_DELAY_ENV = "ORCH_NODE_RESTART_DELAY_S"


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number")
    return value


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a number >= 0")
    return value


def _count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be a whole number >= 1")
    return int(text)


def _spec(text: str) -> str:
    try:
        return check_spec(text)
    except CatalogueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(prog="python -m nodes", description=DESCRIPTION,
                                epilog=EPILOG)
    p.add_argument("--broker", required=True, metavar="URL",
                   help="the broker's URL (tcp://HOST:PORT)")
    p.add_argument("--node-id", default=None, metavar="ID",
                   help="this node's id (default: the host name)")
    p.add_argument("--home", type=Path, default=None, metavar="DIR",
                   help="the data dir: node.json, node.pid, agents.log (default: "
                        "$ORCH_HOME, ./.orchestrator, or the per-user data dir)")
    p.add_argument("--catalogue", nargs="+", action="extend", default=[], type=_spec,
                   metavar="module:Class", help="agent classes this node may run, besides "
                   "the built-ins and HOME/node.json")
    p.add_argument("--crash-limit", type=_count, default=5, metavar="N",
                   help="crashes within --crash-window that make a crash loop (default: 5)")
    p.add_argument("--crash-window", type=_positive, default=60.0, metavar="SECONDS",
                   help="the crash-loop window in seconds (default: 60)")
    p.add_argument("--drain-timeout", type=_non_negative, default=None, metavar="SECONDS",
                   help="how long a stopped replica may finish its tasks before it hands "
                        "the rest back (default: the broker's plan says); SIGKILL 10 s later")
    p.add_argument("--restart-delay", type=_positive,
                   default=os.environ.get(RESTART_DELAY_ENV, str(BACKOFF_S)), metavar="SECONDS",
                   help=f"first restart delay after a crash, doubled per crash in a row "
                        f"(default: ${RESTART_DELAY_ENV}, else {BACKOFF_S:g}: `start` and "
                        "`agents start` start the supervisor, so the variable reaches it)")
    p.add_argument("--restart-delay-max", type=_positive, default=BACKOFF_MAX_S,
                   metavar="SECONDS", help=f"longest restart delay (default: {BACKOFF_MAX_S:g})")
    p.add_argument("--log-level", default=os.environ.get("ORCH_LOG_LEVEL", "INFO"),
                   type=str.upper, choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def main(argv: list[str] | None = None) -> int:
    """Parse, set up logging, run; returns the exit code."""
    args = parser().parse_args(argv)
    node_id = args.node_id if args.node_id is not None else socket.gethostname()
    if not node_id or len(node_id) > MAX_NAME_CHARS or not node_id.isprintable():
        print(f"error: --node-id must be 1 to {MAX_NAME_CHARS} printable characters",
              file=sys.stderr)
        return 2
    home = (args.home or home_dir()).absolute()
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    install_json_log(home, "node-" + node_id.replace(os.sep, "_"), args.log_level,
                     defaults={"node_id": node_id})
    settings = NodeSettings(args.broker, node_id, home, tuple(args.catalogue),
                            args.crash_limit, args.crash_window, args.drain_timeout,
                            args.restart_delay, max(args.restart_delay, args.restart_delay_max))
    try:
        return Supervisor(settings).run()
    except (NodeRunning, KeyFileError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
