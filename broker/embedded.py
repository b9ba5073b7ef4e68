"""A broker in threads of the calling process, for one command that wants no daemon.

``orchestrator run TEXT`` starts one of these (the broker, its state service and its bus
forwarder, each on a free port of 127.0.0.1), starts the agents it needs against it,
runs the workflow, and stops everything. The broker is configured exactly as
``python -m broker`` would be from the same arguments (:func:`broker.__main__.build_parser`),
so nothing here is a second configuration path.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import TracebackType
from typing import Any, Final

from broker.__main__ import (
    build_parser, lock_data_dir, prepare, start_bus, start_state_service,
)
from broker.bus import BusForwarder
from broker.server import Broker

logger = logging.getLogger(__name__)

#: How long a stop waits for each thread.
STOP_TIMEOUT_S: Final = 10.0


class EmbeddedBroker:
    """A private broker for the life of a ``with`` block.

    Args:
        data_dir: its data dir (a fresh temporary directory: the journal and the state are
            in memory, the directory only holds the lock).
        extra_args: more ``python -m broker`` arguments.

    Raises (on enter):
        ConfigError, zmq.ZMQError, OSError: it could not be configured or bound.
    """

    def __init__(self, data_dir: Path, extra_args: tuple[str, ...] = ()) -> None:
        self.data_dir = data_dir
        self.args = build_parser().parse_args([
            "--bind", "127.0.0.1:0", "--data-dir", str(data_dir), "--durability", "none",
            "--state-memory", "--log-level", "WARNING", *extra_args])
        self.broker: Broker | None = None
        self.state_service: Any = None
        self.bus: BusForwarder | None = None

    @property
    def endpoint(self) -> str:
        """The broker's URL."""
        assert self.broker is not None, "the broker is not started"
        return self.broker.endpoint

    def start(self) -> str:
        """Bind everything and run it in threads; returns the broker's URL. With
        ``--secure`` among the arguments every socket is secured as ``python -m broker
        --secure`` secures it (the data dir's keys, created when missing, and its
        allow-list: :func:`broker.__main__.prepare`).

        Raises:
            ConfigError: a value, a key file or a permission is wrong (one line).
        """
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        config, _, security = prepare(self.args)
        lock_data_dir(self.data_dir)
        self.broker = Broker(config, security=security,
                             grants=security.grants if security is not None else None)
        try:
            self.broker.bind()
            self.state_service = start_state_service(self.args, config, security)
            if self.state_service is not None:
                self.broker.endpoints["state"] = self.state_service.endpoint
            self.bus = start_bus(self.args, config, self.broker)
            self.broker.service.start_thread()
        except BaseException:
            self.stop()
            raise
        return self.broker.endpoint

    def stop(self) -> None:
        """Stop the broker, then the state service and the bus (each waited for)."""
        if self.broker is not None:
            if self.broker.service.stop_thread(STOP_TIMEOUT_S) is False:
                logger.warning("the embedded broker did not stop within %g s", STOP_TIMEOUT_S)
        if self.bus is not None:
            self.bus.stop_thread()
        if self.state_service is not None:
            self.state_service.stop_thread()

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
