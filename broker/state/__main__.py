"""Run the state service alone: ``python -m broker.state --bind 127.0.0.1:5558``.

On start it prints one JSON line ``{"event": "ready", "state": url, "endpoint": url,
"pid": ...}`` to stdout, so that whoever started it waits for that instead of sleeping.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import orjson

from broker.config import StateConfig
from broker.errors import ConfigError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m broker.state",
                                     description=__doc__.splitlines()[0])
    add_arguments(parser)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of a standalone state service (shared with the CLI's help text)."""
    parser.add_argument("--bind", default=None,
                        help="HOST:PORT of the ROUTER (default 127.0.0.1:5558; port 0: any free)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="data dir holding state.db (default $ORCH_HOME)")
    parser.add_argument("--memory", action="store_true", help="keep nothing on disk")
    parser.add_argument("--heartbeat-interval", type=float, default=None, metavar="SECONDS")
    parser.add_argument("--heartbeat-liveness", type=int, default=None, metavar="N")
    parser.add_argument("--log-level", default=os.environ.get("ORCH_LOG_LEVEL", "INFO"))


def serve(bind: str | None = None, data_dir: Path | None = None, memory: bool = False,
          heartbeat_interval_s: float | None = None, heartbeat_liveness: int | None = None,
          log_level: str = "INFO") -> int:
    """Run the service in this process until SIGTERM/SIGINT; returns the exit code."""
    from broker.state.server import StateServer

    logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = StateConfig.from_env(bind=bind, data_dir=data_dir, persist=not memory,
                                      heartbeat_interval_s=heartbeat_interval_s,
                                      heartbeat_liveness=heartbeat_liveness)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    server = StateServer(config)
    try:
        endpoint = server.bind()
    except Exception as e:  # noqa: BLE001 - report any bind or load failure in one line
        print(f"error: cannot start the state service at {config.router_endpoint}: {e}",
              file=sys.stderr)
        return 3
    server.install_signal_handlers()
    info = {"event": "ready", "state": endpoint, "endpoint": endpoint, "pid": os.getpid()}
    sys.stdout.write(orjson.dumps(info).decode() + "\n")
    sys.stdout.flush()
    server.run()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return serve(args.bind, args.data_dir, args.memory, args.heartbeat_interval,
                 args.heartbeat_liveness, args.log_level)


if __name__ == "__main__":
    sys.exit(main())
