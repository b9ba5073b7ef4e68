"""Run the state service alone: ``python -m broker.state --bind 127.0.0.1:5558``.

On start it prints one JSON line ``{"event": "ready", "state": url, "endpoint": url,
"pid": ...}`` to stdout, so that whoever started it waits for that instead of sleeping.

With ``--secure`` (or ``ORCH_SECURE=1``) its ROUTER is a CURVE server with ZAP, set up
from the data dir exactly as the broker's ``--secure`` does (``broker/security.py``:
the broker's key pair in ``DATA_DIR/keys``, created when missing, the same allow-list,
the same permission checks), and requests are checked against the per-role key prefix
rules (``broker/state/access.py``); the ready line then carries ``curve_public_key``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

import orjson

from broker.config import StateConfig
from broker.errors import ConfigError

#: ``--secure``'s help, shared by the state service and the bus forwarder.
SECURE_HELP = ("CURVE encryption and key authentication (also ORCH_SECURE=1), with the "
               "keys and allow-list of DATA_DIR/keys, as the broker's --secure: a "
               "standalone service beside a broker of the same data dir accepts the same "
               "keys (docs/security.md)")


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
                        help="data dir holding state.db, and keys/ with --secure "
                             "(default $ORCH_HOME)")
    parser.add_argument("--memory", action="store_true", help="keep nothing on disk")
    parser.add_argument("--heartbeat-interval", type=float, default=None, metavar="SECONDS")
    parser.add_argument("--heartbeat-liveness", type=int, default=None, metavar="N")
    # default None, not False: unset, ORCH_SECURE decides (as the broker's option does).
    parser.add_argument("--secure", action="store_true", default=None, help=SECURE_HELP)
    parser.add_argument("--log-level", default=os.environ.get("ORCH_LOG_LEVEL", "INFO"))


def serve(bind: str | None = None, data_dir: Path | None = None, memory: bool = False,
          heartbeat_interval_s: float | None = None, heartbeat_liveness: int | None = None,
          log_level: str = "INFO", secure: bool | None = None) -> int:
    """Run the service in this process until SIGTERM/SIGINT; returns the exit code.

    Args:
        secure: CURVE and ZAP on its socket (``--secure``); None or False: as
            ``ORCH_SECURE`` says.
    """
    from broker.security import curve_server_for, secure_requested
    from broker.state.server import StateServer
    from wire.curve import KeyFileError

    logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = StateConfig.from_env(bind=bind, data_dir=data_dir.absolute() if data_dir
                                      else None, persist=not memory,
                                      heartbeat_interval_s=heartbeat_interval_s,
                                      heartbeat_liveness=heartbeat_liveness)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    security: Any = None
    if secure_requested(secure):
        try:
            # Before the database opens: a secure data dir is created 0700 and checked.
            security = curve_server_for(Path(config.data_dir))
        except KeyFileError as e:
            print(f"error: --secure: {e}", file=sys.stderr)
            return 2
    try:
        # The rules file (keys/state_rules.json) of a secure service is read here.
        server = StateServer(config, security=security)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        endpoint = server.bind()
    except Exception as e:  # noqa: BLE001 - report any bind or load failure in one line
        print(f"error: cannot start the state service at {config.router_endpoint}: {e}",
              file=sys.stderr)
        return 3
    server.install_signal_handlers()
    info: dict[str, Any] = {"event": "ready", "state": endpoint, "endpoint": endpoint,
                            "pid": os.getpid()}
    if security is not None:
        # As the broker's ready line: the key its clients give as ORCH_CURVE_SERVER_KEY.
        info["curve_public_key"] = security.public_key
    sys.stdout.write(orjson.dumps(info).decode() + "\n")
    sys.stdout.flush()
    server.run()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return serve(args.bind, args.data_dir, args.memory, args.heartbeat_interval,
                 args.heartbeat_liveness, args.log_level, args.secure)


if __name__ == "__main__":
    sys.exit(main())
