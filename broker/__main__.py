"""Run the broker alone: ``python -m broker --bind 127.0.0.1:5555 --data-dir DIR``.

On start it prints one JSON line ``{"event": "ready", "endpoint": ..., "state": ...,
"pid": ...}`` to stdout and writes the same document to ``DATA_DIR/broker.json``; whoever
started it (the CLI, a test fixture) waits for that line instead of sleeping.

Before it opens anything in the data dir it takes ``DATA_DIR/broker.lock`` with
``fcntl.flock`` and holds it for its whole life (the file names its pid). The kernel drops
the lock when the process dies, however it dies, before it is a zombie: so "a broker of
this data dir is alive" is "the lock is held", never "a process has the pid in a file"
(a zombie, or a process that reused the pid, would pass that test). A second broker on
the same data dir exits at once with one line naming the holder.

The state service runs in a thread of this process (its own socket, loop and SQLite
connection) on ``--state-bind`` (default: the broker's port + 3, or any free port when
that one is taken or the broker's is 0), unless ``--no-state``.
"""

from __future__ import annotations

import argparse
import fcntl
import gc
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

import orjson
import zmq

from broker.config import (
    DURABILITIES, LOCK_FILE, POLICIES, BrokerConfig, StateConfig, home_dir, is_loopback,
    metrics_bind_for, parse_host_port, state_bind_for,
)
from broker.bus import BusForwarder
from broker.config import DEFAULT_BUS_HWM, BusConfig, events_bind_for
from broker.errors import ConfigError
from broker.server import Broker
from wire.logs import install_json_log
from wire.sockets import with_host

if TYPE_CHECKING:
    # Types only: the metrics server (prometheus-client) is imported when asked for.
    from broker.engine.ledger import EventSink
    from broker.metrics import MetricsServer

#: The logger of the broker's structured event lines (``extra=`` task and agent ids).
event_logger = logging.getLogger("broker.events")


#: How long a starting broker tries for the data dir's lock. A running broker holds it for
#: good; ``orchestrator start`` and ``stop`` take it shared for an instant to test it, and
#: a broker starting in that instant must not take the test for a running broker.
LOCK_WAIT_S: Final = 2.0
#: Between two tries: flock(2) has no timeout, and a blocking one would wait forever
#: behind a running broker.
LOCK_RETRY_S: Final = 0.01


class DataDirBusy(Exception):
    """Raised when another live broker holds the data dir's lock.

    Args:
        data_dir: The data dir.
        holder: The pid the lock file names ("?" when it names none).
    """

    def __init__(self, data_dir: Path, holder: str) -> None:
        super().__init__(
            f"another broker (pid {holder}) is running with the data dir {data_dir} (it "
            f"holds {data_dir / LOCK_FILE}); stop it first (orchestrator stop) or give this "
            f"one another --data-dir")


def lock_data_dir(data_dir: Path) -> int:
    """Take the data dir's lock for the rest of this process's life.

    Returns:
        The lock file's descriptor: keep it open (closing it releases the lock). It is
        not inherited by child processes.

    Raises:
        DataDirBusy: Another process holds the lock (a live broker of this data dir).
        OSError: The lock file cannot be created.
    """
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # 0700: payloads at rest
    fd = os.open(data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise DataDirBusy(data_dir, holder) from None
            time.sleep(LOCK_RETRY_S)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError as e:
        # A full disk: the lock is what counts; the pid is only for people and `stop`.
        logging.getLogger(__name__).warning("cannot write the pid to %s: %s",
                                            data_dir / LOCK_FILE, e)
    return fd


SECURE_HELP: Final = ("CURVE encryption and key authentication on every socket (also "
                      "ORCH_SECURE=1); keys in DATA_DIR/keys (broker/security.py)")


def add_limit_options(parser: argparse.ArgumentParser) -> None:
    """The broker's queue and size limits (docs/limits.md)."""
    parser.add_argument("--max-pending", type=int, default=None, metavar="N",
                        help="tasks waiting for an agent, in all; more: queue_full "
                             "(default 100000)")
    parser.add_argument("--max-pending-per-client", type=int, default=None, metavar="N",
                        help="one client's unfinished tasks; more: queue_full for it "
                             "(default 50000)")
    parser.add_argument("--max-in-flight-per-client", type=int, default=None, metavar="N",
                        help="one client's tasks on agents at once; more wait queued "
                             "(0: no limit)")
    parser.add_argument("--max-message-bytes", type=int, default=None, metavar="BYTES",
                        help="largest frame any socket accepts (announced to the SDK, "
                             "which refuses bigger sends with too_large; default 64 MiB)")
    parser.add_argument("--max-header-bytes", type=int, default=None, metavar="BYTES",
                        help="largest message header decoded; bigger: too_large "
                             "(default 4 MiB)")


def add_bus_options(parser: argparse.ArgumentParser) -> None:
    """The bus forwarder's options and the broker's events socket's."""
    parser.add_argument("--bus-out", default=None, metavar="HOST:PORT",
                        help="where bus subscribers connect (default: broker port + 1)")
    parser.add_argument("--bus-in", default=None, metavar="HOST:PORT",
                        help="where bus publishers connect (default: broker port + 2)")
    parser.add_argument("--bus-hwm", type=int, default=None, metavar="N",
                        help=f"messages queued per bus subscriber before it loses some "
                             f"(default {DEFAULT_BUS_HWM})")
    parser.add_argument("--events-bind", default=None, metavar="HOST:PORT",
                        help="where subscribers get the broker's own events, agents.* and "
                             "tasks.* (default: broker port + 4)")
    parser.add_argument("--bus-connect", default=None, metavar="OUT_URL,IN_URL",
                        help="use a forwarder run elsewhere (python -m broker.bus)")
    parser.add_argument("--no-bus", action="store_true", help="run no pub/sub forwarder")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m broker", description=__doc__.splitlines()[0])
    parser.add_argument("--bind", default=None, help="HOST:PORT of the ROUTER (port 0: any free)")
    parser.add_argument("--advertise", default=None, metavar="HOST",
                        help="the host other machines reach this broker at; announced to "
                             "agents and clients in every endpoint (bus, state, events, "
                             "metrics). Default: as bound, with 0.0.0.0 replaced by each "
                             "peer with the host it used to reach the broker")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="data dir (default: $ORCH_HOME, else ./.orchestrator where it "
                             "exists, else $XDG_STATE_HOME/orchestrator, "
                             "~/.local/state/orchestrator)")
    parser.add_argument("--policy", choices=POLICIES, default=None, help="routing policy")
    parser.add_argument("--heartbeat-interval", type=float, default=None, metavar="SECONDS")
    parser.add_argument("--heartbeat-liveness", type=int, default=None, metavar="N")
    add_limit_options(parser)
    parser.add_argument("--default-timeout", type=float, default=None, metavar="SECONDS")
    parser.add_argument("--drain-timeout", type=float, default=None, metavar="SECONDS",
                        help="how long a graceful stop waits for in-flight tasks, and how "
                             "long a replica drained by a scale-down may finish its tasks "
                             "before it hands the rest back (default 30)")
    parser.add_argument("--durability", choices=DURABILITIES, default=None,
                        help="journal: none, batch (default) or fsync")
    parser.add_argument("--retries", type=int, default=None, metavar="N",
                        help="default retries of a failed task (default 3)")
    parser.add_argument("--retry-base-delay", type=float, default=None, metavar="SECONDS")
    parser.add_argument("--retry-max-delay", type=float, default=None, metavar="SECONDS")
    parser.add_argument("--circuit-threshold", type=int, default=None, metavar="N")
    parser.add_argument("--circuit-recovery", type=float, default=None, metavar="SECONDS")
    parser.add_argument("--ping-timeout", type=float, default=None, metavar="SECONDS",
                        help="an agent that does not answer a health check (PING) this "
                             "fast is unresponsive and gets no new tasks (default: half "
                             "the liveness window, heartbeat interval x liveness / 2)")
    parser.add_argument("--retention", type=float, default=None, metavar="SECONDS",
                        help="keep finished results this long (default 3600)")
    parser.add_argument("--retention-bytes", type=int, default=None, metavar="BYTES",
                        help="result payloads kept in memory (default 256 MiB)")
    parser.add_argument("--result-store-threshold", type=int, default=None, metavar="BYTES",
                        help="payloads this large go to the result store on disk "
                             "(default 1 MiB)")
    parser.add_argument("--result-store-bytes", type=int, default=None, metavar="BYTES",
                        help="payloads kept in the result store (default 8 GiB)")
    parser.add_argument("--max-agents-per-address", type=int, default=None, metavar="N",
                        help="registered agents per remote address (default 512)")
    parser.add_argument("--max-agents", type=int, default=None, metavar="N",
                        help="registered agents in all (default 10000)")
    parser.add_argument("--state-bind", default=None, metavar="HOST:PORT",
                        help="the state service's address (default: broker port + 3)")
    parser.add_argument("--state-memory", action="store_true",
                        help="keep the state service in memory only (nothing on disk)")
    parser.add_argument("--no-state", action="store_true", help="do not run the state service")
    add_bus_options(parser)
    parser.add_argument("--metrics-bind", default=None, metavar="HOST:PORT",
                        help="HTTP /metrics and /healthz (default: broker port + 4000)")
    parser.add_argument("--no-metrics", action="store_true",
                        help="serve no /metrics or /healthz")
    parser.add_argument("--secure", action="store_true", default=None, help=SECURE_HELP)
    parser.add_argument("--log-level", default=os.environ.get("ORCH_LOG_LEVEL", "INFO"))
    return parser


def start_bus(args: argparse.Namespace, config: BrokerConfig, broker: Broker
              ) -> BusForwarder | None:
    """Run the pub/sub forwarder in a thread (unless ``--no-bus`` or ``--bus-connect``)
    and have the broker announce it, beside its own events socket (``--events-bind``);
    returns the forwarder (None when none runs in this process).

    Raises:
        ConfigError: the bus options are invalid.
        zmq.ZMQError: a bus socket could not be bound.
    """
    if args.no_bus:
        return None
    if args.bus_connect:
        out_url, sep, in_url = args.bus_connect.partition(",")
        if not sep or not out_url or not in_url:
            raise ConfigError(f"--bus-connect wants OUT_URL,IN_URL, got {args.bus_connect!r}")
        broker.attach_bus(out_url, in_url, args.bus_hwm or DEFAULT_BUS_HWM,
                          events_bind=args.events_bind or events_bind_for(config.bind),
                          any_port_if_taken=not args.events_bind)
        return None
    bus_config = BusConfig.for_broker(config.bind, out_bind=args.bus_out, in_bind=args.bus_in,
                                      hwm=args.bus_hwm,
                                      max_message_bytes=config.max_message_bytes)
    forwarder = BusForwarder(bus_config, broker.security)
    # Ports derived from the broker's may be taken by chance; ones asked for must not be.
    forwarder.bind(any_port_if_taken=not (args.bus_out or args.bus_in))
    forwarder.start_thread()
    broker.attach_bus(forwarder.out_endpoint, forwarder.in_endpoint, bus_config.hwm,
                      forwarder.statistics,
                      events_bind=args.events_bind or events_bind_for(config.bind),
                      any_port_if_taken=not args.events_bind)
    return forwarder


class LoggedEvents:
    """The engine's event sink, wrapped: each event also becomes a log line with
    ``task_id``, ``agent_id`` and ``event`` (``extra=``), for the JSON log.

    Agents joining and leaving log at INFO; task state changes at DEBUG, and only while
    the engine builds task events (``ledger.watch_tasks``), so that they cost nothing at
    the default level.

    Args:
        inner: The sink the events went to (the bus publisher, or none).
    """

    def __init__(self, inner: EventSink) -> None:
        self.inner = inner

    def task_changed(self, task_id: str, state: str, attempt: int, agent: str | None,
                     at: float, final: bool) -> None:
        event_logger.debug("task %s %s (attempt %d, agent %s)", task_id, state, attempt, agent,
                           extra={"task_id": task_id, "agent_id": agent,
                                  "event": f"task_{state}"})
        self.inner.task_changed(task_id, state, attempt, agent, at, final)

    def agent_joined(self, agent_id: str, name: str, capabilities: list[str]) -> None:
        event_logger.info("agent %s (%s) joined: capabilities %s", agent_id, name,
                          capabilities, extra={"agent_id": agent_id, "event": "agent_joined"})
        self.inner.agent_joined(agent_id, name, capabilities)

    def agent_left(self, agent_id: str, name: str, capabilities: list[str],
                   reason: str) -> None:
        event_logger.info("agent %s (%s) left: %s", agent_id, name, reason,
                          extra={"agent_id": agent_id, "event": "agent_left"})
        self.inner.agent_left(agent_id, name, capabilities, reason)

    def agent_health(self, agent_id: str, name: str, capabilities: list[str], health: str,
                     detail: str | None) -> None:
        log = event_logger.info if health == "healthy" else event_logger.warning
        log("agent %s (%s) is %s%s", agent_id, name, health, f": {detail}" if detail else "",
            extra={"agent_id": agent_id, "event": f"agent_{health}"})
        self.inner.agent_health(agent_id, name, capabilities, health, detail)

    def agent_circuit(self, agent_id: str, name: str, capabilities: list[str],
                      circuit: str) -> None:
        log = event_logger.info if circuit == "closed" else event_logger.warning
        log("agent %s (%s): circuit %s", agent_id, name, circuit,
            extra={"agent_id": agent_id, "event": f"circuit_{circuit}"})
        self.inner.agent_circuit(agent_id, name, capabilities, circuit)

    def peer_refused(self, peer: str, reason: str) -> None:
        event_logger.warning("refused %s: %s", peer, reason, extra={"event": "unauthorized"})
        self.inner.peer_refused(peer, reason)

    def pool_changed(self, event: str, node: str, fields: dict[str, Any]) -> None:
        log = event_logger.warning if event in ("node_lost", "crash_loop") else \
            event_logger.info
        log("pool: %s %s %s", event, node, " ".join(f"{k}={v}" for k, v in fields.items()),
            extra={"event": event, "node": node})
        self.inner.pool_changed(event, node, fields)


def install_tracing(broker: Broker) -> None:
    """With tracing on (``ORCH_OTEL_EXPORTER``), the broker's spans of the tasks that
    carry a traceparent, emitted when each ends (``broker/tracing.py``); off, nothing.

    Raises:
        ValueError: the tracing settings in the environment are invalid.
    """
    from wire.tracing import init_tracing

    tracer = init_tracing("orchestrator-broker")
    if tracer is not None:
        from broker.tracing import TaskSpans

        broker.engine.ledger.spans = TaskSpans()


def install_event_log(broker: Broker) -> None:
    """Log the engine's events (see :class:`LoggedEvents`); at DEBUG, build task events
    from the start so that every task's state changes reach the log."""
    ledger = broker.engine.ledger
    ledger.events = LoggedEvents(ledger.events)
    if event_logger.isEnabledFor(logging.DEBUG):
        broker.log_tasks = ledger.watch_tasks = True


def start_metrics(config: BrokerConfig, broker: Broker, data_dir: Path,
                  state: Any = None) -> MetricsServer | None:
    """Serve ``/metrics`` and ``/healthz`` from a thread (None with ``--no-metrics``), and
    install the loop's test hooks when ``ORCH_TEST_HOOKS=1``. ``state``: the state service
    run in this process (None with ``--no-state``), whose counters are reported too.

    Raises:
        OSError: the HTTP port could not be bound.
    """
    from broker.metrics import MetricsServer, install_test_hooks  # after broker.server

    install_test_hooks(broker, data_dir)
    if config.metrics_bind == "":
        return None
    # A port derived from the broker's may be taken by chance; one asked for must not be.
    server = MetricsServer(broker, config.metrics_bind or metrics_bind_for(config.bind),
                           any_port_if_taken=config.metrics_bind is None, state=state)
    server.start_thread()
    broker.endpoints["metrics"] = server.endpoint
    return server


def start_state_service(args: argparse.Namespace, config: BrokerConfig,
                        security: Any = None) -> Any:
    """Bind the state service and run it in a thread; returns the server (None with
    ``--no-state``).

    Raises:
        ConfigError: the state options are invalid.
    """
    if args.no_state:
        return None
    from broker.state.server import StateServer

    explicit = args.state_bind or os.environ.get("ORCH_STATE_BIND")
    state_config = StateConfig(
        bind=explicit or state_bind_for(config.bind), data_dir=config.data_dir,
        persist=not args.state_memory, heartbeat_interval_s=config.heartbeat_interval_s,
        heartbeat_liveness=config.heartbeat_liveness,
        max_message_bytes=config.max_message_bytes, max_header_bytes=config.max_header_bytes)
    server = StateServer(state_config, security=security)
    # A port derived from the broker's may be taken by chance; one asked for must not be.
    server.bind(any_port_if_taken=not explicit)
    server.start_thread()
    return server


def tune_garbage_collector() -> None:
    """Collect cycles far less often than Python's default (every 700 allocations).

    The broker allocates a few container objects per task and keeps finished ones for
    retention; with the default thresholds the cyclic collector traversed them again and
    again (15% of the broker's samples in a native py-spy profile of the throughput
    benchmark). Its own structures hold no cycles that outlive a task (they are broken
    when a task ends), so rare collections lose nothing. Objects alive at start-up
    (modules, configuration) are frozen out of collection altogether.
    """
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


def config_from_args(args: argparse.Namespace) -> BrokerConfig:
    """The broker's configuration: defaults, the environment, then the command line.

    Raises:
        ConfigError: a value is invalid.
    """
    return BrokerConfig.from_env(
        bind=args.bind, data_dir=args.data_dir.absolute() if args.data_dir else None,
        policy=args.policy,
        heartbeat_interval_s=args.heartbeat_interval,
        heartbeat_liveness=args.heartbeat_liveness, max_pending=args.max_pending,
        max_pending_per_client=args.max_pending_per_client,
        max_in_flight_per_client=args.max_in_flight_per_client,
        max_message_bytes=args.max_message_bytes, max_header_bytes=args.max_header_bytes,
        default_timeout_s=args.default_timeout, drain_timeout_s=args.drain_timeout,
        durability=args.durability, default_max_retries=args.retries,
        retry_base_delay_s=args.retry_base_delay, retry_max_delay_s=args.retry_max_delay,
        circuit_failure_threshold=args.circuit_threshold,
        circuit_recovery_s=args.circuit_recovery, ping_timeout_s=args.ping_timeout,
        result_retention_s=args.retention,
        result_retention_bytes=args.retention_bytes,
        result_store_threshold=args.result_store_threshold,
        result_store_max_bytes=args.result_store_bytes,
        max_agents_per_address=args.max_agents_per_address, max_agents=args.max_agents,
        metrics_bind="" if args.no_metrics else args.metrics_bind, secure=args.secure,
        advertise=args.advertise)


def prepare(args: argparse.Namespace) -> tuple[BrokerConfig, Path, Any]:
    """The configuration, the data dir, and the sockets' security: a
    :class:`broker.security.CurveServer` with ``--secure`` (the data dir's keys created
    when missing, their permissions checked), else None after a warning on stderr when a
    socket is bound to an address other machines can reach.

    Raises:
        ConfigError: a value is invalid, or a key file or permission is wrong.
    """
    config = config_from_args(args)
    data_dir = Path(config.data_dir or home_dir())
    if not config.secure:
        warn_if_exposed(config, args)
        return config, data_dir, None
    from broker.security import CurveServer, prepare_secure_home
    from wire.curve import KeyFileError

    try:
        return config, data_dir, CurveServer(prepare_secure_home(data_dir))
    except KeyFileError as e:
        raise ConfigError(f"--secure: {e}") from None
    except OSError as e:
        raise ConfigError(f"--secure: cannot create the keys in {data_dir}: "
                          f"{e.strerror or e}") from None


def warn_if_exposed(config: BrokerConfig, args: argparse.Namespace) -> None:
    """One line on stderr when a plaintext socket is bound where other machines reach it:
    which addresses, and what anyone reaching them can do."""
    binds = {"tasks": config.bind, "state": args.state_bind or state_bind_for(config.bind),
             "bus": args.bus_out or config.bind, "bus in": args.bus_in or config.bind,
             "events": args.events_bind or config.bind}
    exposed = [f"{name} {bind}" for name, bind in binds.items()
               if not is_loopback(parse_host_port(bind)[0])]
    if exposed:
        print(f"warning: listening without --secure on addresses other machines can reach "
              f"({', '.join(exposed)}; the bus takes the broker port + 1 and + 2, the "
              f"state service + 3, the broker's events + 4 unless set): anyone who can reach them can submit, run, "
              f"cancel and read tasks, register agents, and read and write shared state "
              f"and the bus, unauthenticated and unencrypted; use --secure (see the "
              f"README, Security)", file=sys.stderr, flush=True)


def _host_port(url: str) -> tuple[str, int]:
    """Host and port of ``tcp://HOST:PORT`` or ``http://HOST:PORT/path``."""
    parts = urlsplit(url)
    return parts.hostname or "", parts.port or 0


def say_firewall_ports(router: str, endpoints: dict[str, str]) -> None:
    """One line on stderr when the broker listens where other machines reach it: the TCP
    ports a firewall between them must open (secure or not)."""
    host, port = _host_port(router)
    if is_loopback(host):
        return
    ports = [f"{port} (tasks)"]
    ports += [f"{_host_port(url)[1]} ({name})" for name, url in sorted(endpoints.items())
              if not is_loopback(_host_port(url)[0])]
    print(f"listening for other machines: open TCP {', '.join(ports)} between them and "
          f"this one", file=sys.stderr, flush=True)


def announce_ready(broker: Broker, state: Any, data_dir: Path) -> None:
    """Write ``broker.json`` and print the ready line (the broker's endpoints and pid)."""
    info: dict[str, Any] = {"event": "ready", "endpoint": broker.endpoint, "pid": os.getpid(),
                            "data_dir": str(data_dir)}
    if broker.security is not None:
        info["curve_public_key"] = broker.security.public_key
    if "bus_out" in broker.endpoints:
        info["bus_out"] = broker.endpoints["bus_out"]
        info["bus_in"] = broker.endpoints["bus_in"]
        info["events"] = broker.endpoints["events"]
    if state is not None:
        broker.endpoints["state"] = info["state"] = state.endpoint
    if "metrics" in broker.endpoints:
        info["metrics"] = broker.endpoints["metrics"]
    say_firewall_ports(broker.endpoint, broker.endpoints)
    advertise = broker.config.advertise
    if advertise is not None:
        # Peers get the advertised host; broker.json keeps the bound endpoints (local CLI).
        # A loopback endpoint stays as it is: no other machine reaches it anyway.
        broker.endpoints.update({name: with_host(url, advertise)
                                 for name, url in broker.endpoints.items()
                                 if not is_loopback(_host_port(url)[0])})
    document = orjson.dumps(info)
    try:
        (data_dir / "broker.json").write_bytes(document)
    except OSError as e:
        # A full disk must not keep the broker from serving the tasks its journal holds;
        # whoever started it reads the ready line below.
        logging.getLogger(__name__).error("cannot write %s: %s", data_dir / "broker.json", e)
    sys.stdout.write(document.decode() + "\n")
    sys.stdout.flush()


def keep_desired_counts(broker: Broker, state: Any) -> Any:
    """With a state service: the pools' desired counts an earlier broker kept, restored
    into the engine, and every change written back (``broker/pools.py``); the store, to
    close at the end. None without a state service (the counts live in memory)."""
    if state is None:
        return None
    from broker.pools import DesiredStore

    store = DesiredStore(state.endpoint, broker.security)
    desired = store.load()
    if desired:
        logging.getLogger(__name__).info("pools: desired counts restored: %r", desired)
    broker.engine.nodes.restore(desired)
    broker.engine.nodes.on_desired = store.save
    store.start()
    return store


def serve(broker: Broker, data_dir: Path, metrics: MetricsServer | None,
          bus: BusForwarder | None, state: Any) -> None:
    """Run the broker's loop until a graceful stop, then stop the threads beside it."""
    try:
        broker.run()
    finally:
        if metrics is not None:
            metrics.stop_thread()
        if bus is not None:
            bus.stop_thread()
        if state is not None:
            # After the broker: agents finishing their last tasks may still use state.
            state.stop_thread()
        # Only a clean exit gets here: a killed broker leaves its file, and the next
        # start overwrites it.
        (data_dir / "broker.json").unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config, data_dir, security = prepare(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        lock_data_dir(data_dir)  # held until the process ends
    except DataDirBusy as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: cannot lock the data dir {data_dir}: {e}", file=sys.stderr)
        return 1
    install_json_log(data_dir, "broker", args.log_level)
    broker = Broker(config, security=security,
                    grants=security.grants if security is not None else None)
    try:
        install_tracing(broker)
    except ValueError as e:  # wire.tracing.TracingConfigError: a bad ORCH_OTEL_* value
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        broker.bind()
    except zmq.ZMQError as e:
        print(f"error: cannot bind {config.router_endpoint}: {e}", file=sys.stderr)
        return 3
    except OSError as e:
        print(f"error: cannot open the journal in {config.data_dir}: {e}", file=sys.stderr)
        return 1
    try:
        state = start_state_service(args, config, security)
    except Exception as e:  # noqa: BLE001 - report any bind or load failure in one line
        print(f"error: cannot start the state service: {e}", file=sys.stderr)
        return 3
    try:
        bus = start_bus(args, config, broker)
    except (ConfigError, zmq.ZMQError) as e:
        print(f"error: cannot start the bus: {e}", file=sys.stderr)
        return 3
    install_event_log(broker)
    # Before /healthz answers and the ready line: the loop starts right after those.
    pools = keep_desired_counts(broker, state)
    try:
        metrics = start_metrics(config, broker, data_dir, state)
    except OSError as e:
        print(f"error: cannot serve the metrics: {e}", file=sys.stderr)
        return 3
    broker.install_signal_handlers()
    announce_ready(broker, state, data_dir)
    tune_garbage_collector()
    try:
        serve(broker, data_dir, metrics, bus, state)
    finally:
        if pools is not None:
            pools.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
