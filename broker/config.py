"""Broker tunables in one frozen dataclass, with validation and environment defaults."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final

from broker.errors import ConfigError
from wire.home import home_dir
from wire.limits import (
    MAX_FRAME_BYTES, MAX_HEADER_BYTES, MAX_MESSAGE_BYTES_ENV, MIN_HEADER_BYTES,
    MIN_MESSAGE_BYTES,
)

#: Where agents and clients find the broker when nothing else says so.
DEFAULT_BROKER_URL: Final = "tcp://127.0.0.1:5555"
DEFAULT_BIND: Final = "127.0.0.1:5555"
#: The file in the data dir that a running broker holds locked (``fcntl.flock``) for its
#: whole life; the lock dies with the process, so a killed broker never looks alive.
LOCK_FILE: Final = "broker.lock"

POLICIES: Final = ("capability", "least_loaded", "round_robin")
DURABILITIES: Final = ("none", "batch", "fsync")


def parse_host_port(text: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (or ``tcp://HOST:PORT``); port 0 means "any free port".

    Raises:
        ConfigError: when the text is not HOST:PORT with a port in 0..65535.
    """
    address = text.removeprefix("tcp://")
    host, sep, port_text = address.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"expected HOST:PORT, got {text!r}")
    return host, int(port_text)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (of a HOST:PORT) is reachable from this machine only."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # "*", an interface or host name: reachable from elsewhere


def broker_url() -> str:
    """The broker URL clients and agents use: ``$ORCH_BROKER`` or the default."""
    return os.environ.get("ORCH_BROKER", DEFAULT_BROKER_URL)


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    """Everything the broker process can be told. Build with :meth:`from_env` or directly."""

    #: HOST:PORT of the ROUTER socket; port 0 picks a free port.
    bind: str = DEFAULT_BIND
    data_dir: Path = field(default_factory=home_dir)
    #: routing policy name, one of :data:`POLICIES`
    policy: str = "capability"
    #: seconds between heartbeats to an idle peer; a peer silent for
    #: ``heartbeat_interval_s * heartbeat_liveness`` is dead
    heartbeat_interval_s: float = 1.0
    heartbeat_liveness: int = 3
    #: tasks waiting for an agent; beyond it submits get ERROR queue_full
    max_pending: int = 100_000
    #: one client's tasks accepted and not yet finished (waiting, running, retrying);
    #: beyond it that client's submits get ERROR queue_full, so that one client cannot
    #: fill the shared queue (half of ``max_pending``: another client always finds room)
    max_pending_per_client: int = 50_000
    #: one client's tasks on agents at once (dispatched or running); more wait in the
    #: queue, not refused, until one of its tasks ends. 0: no limit (a lone client may
    #: use every agent; fair sharing still takes clients in turn)
    max_in_flight_per_client: int = 0
    #: largest frame every socket (ROUTER, bus, state service) accepts (ZMQ_MAXMSGSIZE);
    #: announced to agents and clients, whose SDK refuses a bigger send with too_large
    max_message_bytes: int = MAX_FRAME_BYTES
    #: largest msgpack header frame decoded; a bigger one is answered too_large
    max_header_bytes: int = MAX_HEADER_BYTES
    #: how long a task may wait and run when the client names no timeout
    default_timeout_s: float = 300.0
    #: finished results kept for ``result`` / FETCH: whichever limit is reached first
    result_retention_s: float = 3600.0
    result_retention_max: int = 100_000
    #: bytes of retained result payloads held in memory; the oldest go beyond it
    result_retention_bytes: int = 256 * 1024 * 1024
    #: a result payload at least this large goes to the result store in the data dir
    #: (``broker/results.py``), not into memory or the journal, once it is written
    result_store_threshold: int = 1024 * 1024
    #: bytes of payloads the result store keeps on disk; the oldest go beyond it
    result_store_max_bytes: int = 8 * 1024 * 1024 * 1024
    #: registered agents per remote address, and in all: more get ERROR too_many_agents
    max_agents_per_address: int = 512
    max_agents: int = 10_000
    #: messages read from the socket before the loop dispatches and flushes
    drain_batch: int = 2000
    #: how long a graceful stop waits for in-flight tasks to finish, and how long a
    #: replica drained by a scale-down may finish its tasks before it hands them back
    drain_timeout_s: float = 30.0
    #: per-peer outgoing queue (messages); batching keeps messages few
    send_hwm: int = 100_000
    #: journal: "none", "batch" (written each loop pass) or "fsync" (and fsync'd)
    durability: str = "batch"
    #: retries of a failed, timed-out or orphaned task when its submit names none
    default_max_retries: int = 3
    retry_base_delay_s: float = 1.0
    retry_max_delay_s: float = 60.0
    #: an agent failing this many tasks in a row gets none until a probe succeeds
    circuit_failure_threshold: int = 5
    circuit_recovery_s: float = 30.0
    #: an agent that has not answered a health check (PING) within this many seconds is
    #: UNRESPONSIVE and gets no new tasks; None: half the liveness window, so that a
    #: stuck agent loop is seen before the agent is declared dead
    ping_timeout_s: float | None = None
    #: HOST:PORT of the HTTP ``/metrics`` and ``/healthz`` (``broker/metrics.py``); None:
    #: derived from ``bind`` (:func:`metrics_bind_for`); "" with ``--no-metrics``: none
    metrics_bind: str | None = None
    #: CURVE encryption and ZAP authentication on every socket (``--secure``,
    #: ``ORCH_SECURE=1``): see ``broker/security.py``
    secure: bool = False
    #: the host other machines reach this broker at (``--advertise``): it replaces the
    #: host of every endpoint announced to peers (bus, state, events, metrics); None:
    #: announced as bound (a peer replaces 0.0.0.0 by the host it used to reach us)
    advertise: str | None = None

    def __post_init__(self) -> None:
        parse_host_port(self.bind)
        if self.advertise is not None and (not self.advertise.strip() or any(
                c in self.advertise for c in "/: \t")) and not self.advertise.startswith("["):
            raise ConfigError(f"--advertise takes a host name or address (no port), got "
                              f"{self.advertise!r}")
        if self.metrics_bind:
            parse_host_port(self.metrics_bind)
        if self.policy not in POLICIES:
            raise ConfigError(f"unknown policy {self.policy!r}; choose one of {', '.join(POLICIES)}")
        if self.heartbeat_interval_s <= 0 or self.heartbeat_liveness < 1:
            raise ConfigError("heartbeat interval must be > 0 and liveness >= 1")
        if self.max_pending < 1 or self.default_timeout_s <= 0 or self.drain_batch < 1:
            raise ConfigError("max_pending, default_timeout_s and drain_batch must be positive")
        if self.durability not in DURABILITIES:
            raise ConfigError(f"unknown durability {self.durability!r}; choose one of "
                              f"{', '.join(DURABILITIES)}")
        if self.default_max_retries < 0 or self.retry_base_delay_s < 0 or \
                self.retry_max_delay_s < 0:
            raise ConfigError("retries and retry delays must not be negative")
        if self.circuit_failure_threshold < 1 or self.circuit_recovery_s < 0:
            raise ConfigError("circuit threshold must be >= 1 and recovery >= 0")
        if self.ping_timeout_s is not None and \
                not 0 < self.ping_timeout_s < self.heartbeat_expiry_s:
            raise ConfigError(f"ping timeout must be > 0 and shorter than the liveness window "
                              f"({self.heartbeat_expiry_s:g} s: heartbeat interval x liveness)")
        if min(self.result_retention_bytes, self.result_store_threshold,
               self.result_store_max_bytes, self.max_agents_per_address,
               self.max_agents) < 1:
            raise ConfigError("result byte limits and agent caps must be positive")
        if self.max_pending_per_client < 1 or self.max_in_flight_per_client < 0:
            raise ConfigError("max_pending_per_client must be positive and "
                              "max_in_flight_per_client not negative (0: no limit)")
        if self.max_message_bytes < MIN_MESSAGE_BYTES:
            raise ConfigError(f"max_message_bytes must be at least {MIN_MESSAGE_BYTES} "
                              "(the SDK's largest batch and a READ chunk must fit)")
        if not MIN_HEADER_BYTES <= self.max_header_bytes <= self.max_message_bytes:
            raise ConfigError(f"max_header_bytes must be at least {MIN_HEADER_BYTES} (one "
                              "batch of inline payloads) and at most max_message_bytes")

    @property
    def heartbeat_expiry_s(self) -> float:
        """Silence after which a peer is declared dead."""
        return self.heartbeat_interval_s * self.heartbeat_liveness

    @property
    def ping_deadline_s(self) -> float:
        """How long an agent has to answer a PING before it counts as unresponsive."""
        if self.ping_timeout_s is not None:
            return self.ping_timeout_s
        return self.heartbeat_expiry_s / 2

    @property
    def router_endpoint(self) -> str:
        host, port = parse_host_port(self.bind)
        return f"tcp://{host}:{port}"

    @classmethod
    def from_env(cls, **overrides: Any) -> BrokerConfig:
        """Defaults, then ``ORCH_*`` environment variables, then explicit overrides
        (``None`` values in ``overrides`` are ignored)."""
        env: dict[str, Any] = {}
        if "ORCH_BIND" in os.environ:
            env["bind"] = os.environ["ORCH_BIND"]
        if "ORCH_POLICY" in os.environ:
            env["policy"] = os.environ["ORCH_POLICY"]
        if os.environ.get("ORCH_SECURE", "").strip().lower() in ("1", "true", "yes", "on"):
            env["secure"] = True
        if os.environ.get(MAX_MESSAGE_BYTES_ENV, "").strip().isdigit():
            env["max_message_bytes"] = int(os.environ[MAX_MESSAGE_BYTES_ENV])
        env.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**env)

    def with_changes(self, **changes: Any) -> BrokerConfig:
        return replace(self, **changes)


#: The bus forwarder's ports are the broker's plus these: subscribers connect to "out"
#: (5555 gives 5556), publishers to "in" (5557).
BUS_OUT_PORT_OFFSET: Final = 1
BUS_IN_PORT_OFFSET: Final = 2
#: Messages the forwarder queues per subscriber (and per publisher) before it drops.
DEFAULT_BUS_HWM: Final = 100_000


def bus_binds_for(broker_bind: str) -> tuple[str, str]:
    """The bus forwarder's default (out, in) HOST:PORTs for a broker bound at
    ``broker_bind``: the same host, the broker's port plus the offsets (port 0 stays 0:
    any free port)."""
    host, port = parse_host_port(broker_bind)
    if not port:
        return f"{host}:0", f"{host}:0"
    return f"{host}:{port + BUS_OUT_PORT_OFFSET}", f"{host}:{port + BUS_IN_PORT_OFFSET}"


@dataclass(frozen=True, slots=True)
class BusConfig:
    """The pub/sub forwarder's settings (``broker/bus.py``)."""

    #: HOST:PORT of the XPUB socket subscribers connect to; port 0 picks a free port
    out_bind: str = bus_binds_for(DEFAULT_BIND)[0]
    #: HOST:PORT of the XSUB socket publishers connect to
    in_bind: str = bus_binds_for(DEFAULT_BIND)[1]
    #: per-subscriber send queue and per-publisher receive queue, in messages; a
    #: subscriber whose queue is full loses messages (the forwarder never waits for it)
    hwm: int = DEFAULT_BUS_HWM
    #: largest frame either socket accepts (the broker's ``--max-message-bytes``)
    max_message_bytes: int = MAX_FRAME_BYTES

    def __post_init__(self) -> None:
        parse_host_port(self.out_bind)
        parse_host_port(self.in_bind)
        if self.hwm < 1:
            raise ConfigError("the bus high-water mark must be at least 1")

    @classmethod
    def for_broker(cls, broker_bind: str, **overrides: Any) -> BusConfig:
        """Ports derived from the broker's, then explicit overrides (``None`` ignored)."""
        out_bind, in_bind = bus_binds_for(broker_bind)
        values: dict[str, Any] = {"out_bind": out_bind, "in_bind": in_bind}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


#: The broker's events socket (an XPUB only the broker publishes on: ``agents.*``,
#: ``tasks.*``) is on the broker's port plus this (5555 gives 5559).
EVENTS_PORT_OFFSET: Final = 4


def events_bind_for(broker_bind: str) -> str:
    """The events socket's default HOST:PORT for a broker bound at ``broker_bind``: the
    same host, port + :data:`EVENTS_PORT_OFFSET` (port 0 stays 0: any free port)."""
    host, port = parse_host_port(broker_bind)
    return f"{host}:{port + EVENTS_PORT_OFFSET if port else 0}"


#: The metrics endpoint's port is the broker's plus this (5555 gives 9555).
METRICS_PORT_OFFSET: Final = 4000


def metrics_bind_for(broker_bind: str) -> str:
    """The metrics endpoint's default HOST:PORT for a broker bound at ``broker_bind``:
    127.0.0.1 whatever the broker's host (metrics are not for the network unless asked),
    port + :data:`METRICS_PORT_OFFSET` (port 0 stays 0: any free port; a sum beyond
    65535 also gives any free port)."""
    _, port = parse_host_port(broker_bind)
    derived = port + METRICS_PORT_OFFSET if port else 0
    return f"127.0.0.1:{derived if derived <= 65535 else 0}"


#: The state service's port is the broker's plus this (5555 gives 5558).
STATE_PORT_OFFSET: Final = 3
#: The state store's file in the data dir.
STATE_DB_NAME: Final = "state.db"


def state_bind_for(broker_bind: str) -> str:
    """The state service's default HOST:PORT for a broker bound at ``broker_bind``: the
    same host, port + :data:`STATE_PORT_OFFSET` (port 0 stays 0: any free port)."""
    host, port = parse_host_port(broker_bind)
    return f"{host}:{port + STATE_PORT_OFFSET if port else 0}"


@dataclass(frozen=True, slots=True)
class StateConfig:
    """Everything the state service can be told. Build with :meth:`from_env` or directly."""

    #: HOST:PORT of its ROUTER socket; port 0 picks a free port.
    bind: str = state_bind_for(DEFAULT_BIND)
    data_dir: Path = field(default_factory=home_dir)
    #: False: keep everything in memory only (``--memory``); nothing survives a restart
    persist: bool = True
    #: a client heartbeats after an idle interval; a session silent for
    #: ``heartbeat_interval_s * heartbeat_liveness`` expires and its leases are released
    heartbeat_interval_s: float = 1.0
    heartbeat_liveness: int = 3
    #: messages read from the socket before the loop commits and replies
    drain_batch: int = 2000
    #: per-peer outgoing queue (messages)
    send_hwm: int = 100_000
    #: recent changes kept in memory, so that a watch set up again after a reconnect
    #: gets exactly the changes it missed
    changelog_size: int = 65_536
    #: messages queued for a watcher whose pipe is full before its watches are cancelled
    #: with ``watch_overflow``
    watcher_backlog: int = 10_000
    #: largest frame its socket accepts, and largest header it decodes (the broker's
    #: ``--max-message-bytes`` and ``--max-header-bytes``)
    max_message_bytes: int = MAX_FRAME_BYTES
    max_header_bytes: int = MAX_HEADER_BYTES

    def __post_init__(self) -> None:
        parse_host_port(self.bind)
        if self.heartbeat_interval_s <= 0 or self.heartbeat_liveness < 1:
            raise ConfigError("heartbeat interval must be > 0 and liveness >= 1")
        if self.drain_batch < 1 or self.changelog_size < 1 or self.watcher_backlog < 1:
            raise ConfigError("drain_batch, changelog_size and watcher_backlog must be positive")

    @property
    def session_expiry_s(self) -> float:
        """Silence after which a client's session expires."""
        return self.heartbeat_interval_s * self.heartbeat_liveness

    @property
    def router_endpoint(self) -> str:
        host, port = parse_host_port(self.bind)
        return f"tcp://{host}:{port}"

    @property
    def db_path(self) -> Path:
        return Path(self.data_dir) / STATE_DB_NAME

    @classmethod
    def from_env(cls, **overrides: Any) -> StateConfig:
        """Defaults, then ``ORCH_STATE_BIND``, then explicit overrides (``None`` values in
        ``overrides`` are ignored)."""
        env: dict[str, Any] = {}
        if "ORCH_STATE_BIND" in os.environ:
            env["bind"] = os.environ["ORCH_STATE_BIND"]
        env.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**env)
