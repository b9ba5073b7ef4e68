"""Run an agent class as a process: ``python -m agent_sdk run module:Class --broker URL``.

Prints one JSON line ``{"event": "registered", "agent_id": ...}`` on stdout once the broker
accepted the agent, so whoever started it can wait for that instead of sleeping.

Exit codes: 0 stopped (SIGINT, SIGTERM), 1 the broker refused the agent (its READY, or
its protocol version), 2 the agent cannot be built (a bad ``module:Class``, a name the
broker would refuse); the reason is one line on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import signal
import sys
from typing import Any, Callable

import orjson

from agent_sdk.agent import BaseAgent
from agent_sdk.errors import OrchestratorError
from agent_sdk.names import check_names, new_agent_id
from wire.home import home_dir
from wire.logs import install_json_log


def load_agent_class(spec: str) -> Callable[[], BaseAgent]:
    """Import ``module:Class`` and check it is a BaseAgent subclass.

    Raises:
        ValueError: with a message saying what is wrong with ``spec``.
    """
    module_name, sep, class_name = spec.partition(":")
    if not sep or not module_name or not class_name:
        raise ValueError(f"expected module:Class, got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"cannot import {module_name!r}: {e}") from e
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type) or not issubclass(cls, BaseAgent):
        raise ValueError(f"{spec!r} is not a BaseAgent subclass")
    return cls


def build_agent(spec: str, name: str | None = None, capabilities: list[str] | None = None,
                max_concurrent: int | None = None) -> BaseAgent:
    """Instantiate ``module:Class`` and apply command-line overrides.

    Raises:
        ValueError: the class cannot be loaded or built, or a name, id or capability is
            one the broker would refuse (:class:`~agent_sdk.errors.InvalidName`).
    """
    agent_class = load_agent_class(spec)
    try:
        agent = agent_class()
    except TypeError as e:
        raise ValueError(f"{spec!r} must be constructible without arguments "
                         f"(give __init__ defaults): {e}") from e
    if name:
        agent.name = name
        agent.agent_id = new_agent_id(name)
    if capabilities:
        agent.capabilities = tuple(capabilities)
    if max_concurrent:
        agent.max_concurrent = max_concurrent
    check_names(agent.name, agent.agent_id, agent.capabilities)
    return agent


async def _serve(agent: BaseAgent, broker: str | None) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, agent.stop)
    runner = asyncio.create_task(agent.async_run(broker))
    registered = asyncio.create_task(agent.wait_registered())
    await asyncio.wait([runner, registered], return_when=asyncio.FIRST_COMPLETED)
    if registered.done() and not registered.cancelled() and registered.exception() is None:
        info: dict[str, Any] = {"event": "registered", "agent_id": agent.agent_id,
                                "name": agent.name, "pid": os.getpid()}
        sys.stdout.write(orjson.dumps(info).decode() + "\n")
        sys.stdout.flush()
    else:
        registered.cancel()
    await runner


def _seconds(text: str) -> float:
    """A number of seconds, finite and not negative (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not 0 <= value < 1e9:  # also refuses nan and inf
        raise argparse.ArgumentTypeError(f"expected seconds from 0 to 1e9, got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit code (2: the agent cannot be built)."""
    parser = argparse.ArgumentParser(prog="python -m agent_sdk",
                                     description="Run an Orchestrator agent process.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run module:Class as an agent")
    run.add_argument("spec", help="module:Class of a BaseAgent subclass")
    run.add_argument("--broker", default=None, help="broker URL (default $ORCH_BROKER)")
    run.add_argument("--name", default=None, help="override the agent name")
    run.add_argument("--capability", action="append", default=None, help="override capabilities")
    run.add_argument("--max-concurrent", type=int, default=None)
    run.add_argument("--drain-timeout", type=_seconds, default=None, metavar="SECONDS",
                     help="on SIGTERM, how long running tasks may finish before the rest "
                          "are handed back to the broker (default 30)")
    run.add_argument("--log-level", default=os.environ.get("ORCH_LOG_LEVEL", "WARNING"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        agent = build_agent(args.spec, args.name, args.capability, args.max_concurrent)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.drain_timeout is not None:
        agent.drain_timeout_s = args.drain_timeout
    # This machine's data dir: an agent on another host keeps its log there.
    install_json_log(home_dir(), "agent-" + agent.agent_id.replace(os.sep, "_"),
                     args.log_level, defaults={"agent_id": agent.agent_id})
    from agent_sdk.loop import run as run_loop

    try:
        run_loop(_serve(agent, args.broker))
    except OrchestratorError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
