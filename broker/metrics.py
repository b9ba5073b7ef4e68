"""Prometheus ``/metrics`` and ``/healthz``, served over HTTP from a thread of the broker.

Nothing on the per-task path calls ``prometheus_client``: the engine keeps plain integer
counters (:class:`broker.engine.status.TaskMetrics`, the ledger's counters, the service's
message counters) and :class:`BrokerCollector` reads them when a scrape comes, building
every family afresh (so the series of an agent that left disappear with it).

The scrape runs on the HTTP thread and reads the engine without a lock. That is safe in
CPython because it only copies: ``dict(x)`` and ``list(x)`` of a dict or list are one C
call under the GIL, and reading an ``int`` or ``float`` attribute is atomic. Where a copy
is taken through a Python-level iterator a concurrent change can raise "dictionary changed
size during iteration": the snapshot is then taken again. The alternative, asking the
loop for a snapshot through its wake-up pipe, would make a scrape of a stuck loop hang
and put work on the loop; the copies cost the loop nothing.

The state service, when it runs in a thread of the broker process, is read the same way
by :class:`StateCollector`: its store's request counters (by message class, reported by
protocol command), its lock table's count of ACQUIREs that waited and its waiters, and
its mirror of the ``llm/usage/`` keys (:attr:`broker.state.store.StateStore.usage`, kept
by the loop on each change of such a key, so that a scrape never walks the key space).
The agents publish their running LLM totals there, one key per agent process; a scrape
sums them per agent name.

``/healthz`` answers 200 while the loop turns: the broker stores the clock reading of
each pass (:attr:`broker.server.Broker.last_turn`), the loop wakes at least every quarter
heartbeat interval even when idle, and a reading older than two heartbeat intervals
answers 503.

With ``ORCH_TEST_HOOKS=1`` (tests only; off by default) the loop polls the file
``DATA_DIR/test-block-loop`` about four times a heartbeat interval; when it finds one it
removes it and sleeps inside that pass for the seconds the file holds, which blocks the
loop thread only (a SIGSTOP would freeze the HTTP thread too).
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from broker.config import parse_host_port
from broker.engine.circuit import CircuitState
from broker.engine.model import AgentHealth, TaskState
from broker.engine.status import DURATION_BUCKETS_S, capability_label
from broker.journal import COMMIT_BUCKETS_S, Durability
from broker.state.store import USAGE_PREFIX
from wire.codec import unpackb

if TYPE_CHECKING:
    from broker.server import Broker
    from broker.state.server import StateServer

logger = logging.getLogger(__name__)

#: The environment variable that turns the test hooks on ("1"); never set in production.
TEST_HOOKS_ENV: Final = "ORCH_TEST_HOOKS"
#: The file in the data dir whose presence blocks the loop (test hooks only).
BLOCK_LOOP_FILE: Final = "test-block-loop"
#: ``/healthz`` fails when the loop's last pass is older than this many heartbeat
#: intervals, and never sooner than :data:`HEALTH_MIN_AGE_S`: an idle loop wakes once an
#: interval, and a busy machine delays a wake-up by a fraction of a second, which must
#: not look like a stuck broker to a liveness probe (it would restart a healthy one).
HEALTH_INTERVALS: Final = 2.0
HEALTH_MIN_AGE_S: Final = 1.0
#: Snapshot attempts before a scrape gives up on a table the loop keeps changing.
SNAPSHOT_TRIES: Final = 20
_PREFIX: Final = "orchestrator_"
# Enum members are compared by value here: in a broker running the mypyc build, members
# read off engine objects did not match this module's enum members as dict keys.
_CIRCUIT_VALUE: Final = {CircuitState.CLOSED.value: 0, CircuitState.HALF_OPEN.value: 1,
                         CircuitState.OPEN.value: 2}
_OPEN_VALUE: Final = CircuitState.OPEN.value
_HEALTH_VALUE: Final = {AgentHealth.HEALTHY.value: 0, AgentHealth.UNRESPONSIVE.value: 1,
                        AgentHealth.UNHEALTHY.value: 2}
#: The state service's requests (message classes, as its store counts them) by the
#: protocol's command names (``wire.state.StateCommand``), lower-cased for the label.
_STATE_COMMANDS: Final = {
    "StatePing": "ping", "StateGet": "get", "StatePut": "put", "StateDelete": "delete",
    "StateList": "list", "LockAcquire": "acquire", "LockRenew": "renew",
    "LockRelease": "release", "StateWatch": "watch", "StateUnwatch": "unwatch",
    "LockList": "locks", "StateInfoRequest": "info"}
_PENDING_VALUE: Final = TaskState.PENDING.value
_IN_FLIGHT: Final = frozenset({TaskState.DISPATCHED.value, TaskState.RUNNING.value})
_TASK_LABELS: Final = ["agent", "capability"]


@dataclass(slots=True)
class AgentSample:
    """One live agent as a scrape saw it."""

    agent_id: str
    name: str
    heartbeat_age_s: float
    circuit: int
    health: int


@dataclass(slots=True)
class TaskSample:
    """One agent name and capability set's counters as a scrape saw them."""

    name: str
    capability: str
    started: int
    completed: int
    retried: int
    failed: dict[str, int]
    buckets: list[int]
    duration_sum_s: float


@dataclass(slots=True)
class Snapshot:
    """Everything one scrape reports, copied out of the engine."""

    tasks: list[TaskSample] = field(default_factory=list)
    agents: list[AgentSample] = field(default_factory=list)
    #: capability label -> waiting tasks
    queue_depth: dict[str, int] = field(default_factory=dict)
    #: (agent name, capability label) -> dispatched or running tasks
    in_flight: dict[tuple[str, str], int] = field(default_factory=dict)
    pending: int = 0
    clients: int = 0
    #: clients that sent a SUBMIT or a heartbeat within the liveness window
    connected_clients: int = 0
    messages_in: int = 0
    messages_out: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    #: the journal's write times: per-bucket counts (COMMIT_BUCKETS_S, then +Inf), sum;
    #: None without a journal (durability none)
    commit_buckets: list[int] | None = None
    commit_sum_s: float = 0.0


def circuit_value(state: CircuitState, opened_at: float, recovery_s: float, now: float) -> int:
    """0 closed, 1 half-open, 2 open, computed without touching the breaker (its own
    ``state_at`` turns it half-open, a write the HTTP thread must not make)."""
    value = state.value
    if value == _OPEN_VALUE and now - opened_at >= recovery_s:
        return 1
    return _CIRCUIT_VALUE[value]


def cumulative_buckets(bounds: tuple[float, ...], counts: list[int]
                       ) -> list[tuple[str, float]]:
    """Per-bucket counts (the engine's plain ones, +Inf last) as Prometheus' cumulative
    ``(le, count)`` buckets."""
    buckets: list[tuple[str, float]] = []
    cumulative = 0
    for bound, count in zip((*map(str, bounds), "+Inf"), counts):
        cumulative += count
        buckets.append((bound, cumulative))
    return buckets


def counter_by(name: str, documentation: str, label: str, counts: dict[str, int]
               ) -> CounterMetricFamily:
    """A counter family with one series per value of ``label``, sorted."""
    family = CounterMetricFamily(name, documentation, labels=[label])
    for value, count in sorted(counts.items()):
        family.add_metric([value], count)
    return family


_Snap = TypeVar("_Snap")


def copied(take: Callable[[], _Snap]) -> _Snap:
    """``take()``, again when the loop changed a table while it copied (the loop thread
    never waits for a scrape).

    Raises:
        RuntimeError: the tables kept changing for :data:`SNAPSHOT_TRIES` attempts.
    """
    for _ in range(SNAPSHOT_TRIES - 1):
        try:
            return take()
        except RuntimeError:  # "dictionary changed size during iteration"
            continue
    return take()


class BrokerCollector:
    """Reads the broker's plain counters at scrape time (a prometheus_client collector).

    Args:
        broker: The broker whose engine and service are read.
    """

    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    def snapshot(self) -> Snapshot:
        """Copy what a scrape reports, again if the loop changed a table meanwhile.

        Raises:
            RuntimeError: the tables kept changing for :data:`SNAPSHOT_TRIES` attempts.
        """
        return copied(self._snapshot)

    def _snapshot(self) -> Snapshot:
        broker = self.broker
        engine = broker.engine
        ledger = engine.ledger
        now = broker.clock()
        snap = Snapshot()
        for (name, capabilities), stats in dict(engine.lifecycle.metrics.by_key).items():
            snap.tasks.append(TaskSample(
                name, capability_label(capabilities), stats.started, stats.completed,
                stats.retried, dict(stats.failed), list(stats.buckets), stats.duration_sum_s))
        for agent in list(ledger.agents.by_identity.values()):
            breaker = agent.breaker
            snap.agents.append(AgentSample(
                agent.agent_id, agent.name, max(0.0, now - agent.last_seen),
                circuit_value(breaker.state, breaker.opened_at, breaker.recovery_s, now),
                _HEALTH_VALUE[agent.health.value]))
        clients: set[bytes] = set()
        for task in list(ledger.tasks.values()):
            state = task.state.value
            label = capability_label(task.spec.capabilities)
            if state == _PENDING_VALUE:
                snap.queue_depth[label] = snap.queue_depth.get(label, 0) + 1
            elif state in _IN_FLIGHT:
                holder = task.agent
                key = (holder.name if holder is not None else "", label)
                snap.in_flight[key] = snap.in_flight.get(key, 0) + 1
            if task.open:
                clients.add(task.client)
        snap.clients = len(clients)
        desk = engine.clients
        cutoff = now - desk.window_s
        snap.connected_clients = sum(1 for seen in dict(desk.last_seen).values()
                                     if seen >= cutoff)
        snap.pending = ledger.pending.count
        counters = broker.service.counters
        snap.messages_in = counters.messages_in
        snap.messages_out = counters.messages_out
        snap.rejected = dict(ledger.errors)
        journal = broker.journal
        if journal.durability is not Durability.NONE:
            times = journal.commit_times
            snap.commit_buckets, snap.commit_sum_s = list(times.buckets), times.sum_s
        return snap

    def collect(self) -> Iterator[Metric]:
        """The families of one scrape, built afresh from a :meth:`snapshot`."""
        snap = self.snapshot()
        yield from self._task_families(snap)
        yield from self._load_families(snap)
        yield from self._agent_families(snap)
        yield from self._journal_families(snap)
        yield from self._broker_families(snap)

    @staticmethod
    def _task_families(snap: Snapshot) -> Iterator[Metric]:
        task_labels = _TASK_LABELS
        started = CounterMetricFamily(f"{_PREFIX}tasks_started",
                                      "Task attempts dispatched to an agent.", labels=task_labels)
        completed = CounterMetricFamily(f"{_PREFIX}tasks_completed",
                                        "Tasks that ended succeeded.", labels=task_labels)
        failed = CounterMetricFamily(
            f"{_PREFIX}tasks_failed",
            "Tasks that ended otherwise than succeeded (failed, timed out, cancelled), by "
            "error code.", labels=[*task_labels, "code"])
        retried = CounterMetricFamily(f"{_PREFIX}tasks_retried",
                                      "Failed attempts scheduled for a retry.", labels=task_labels)
        duration = HistogramMetricFamily(
            f"{_PREFIX}task_duration_seconds",
            "Seconds from a task's last dispatch to its end.", labels=task_labels)
        for sample in snap.tasks:
            labels = [sample.name, sample.capability]
            started.add_metric(labels, sample.started)
            completed.add_metric(labels, sample.completed)
            retried.add_metric(labels, sample.retried)
            for code, count in sorted(sample.failed.items()):
                failed.add_metric([*labels, code], count)
            duration.add_metric(labels, cumulative_buckets(DURATION_BUCKETS_S, sample.buckets),
                                sample.duration_sum_s)
        yield from (started, completed, failed, retried, duration)

    @staticmethod
    def _load_families(snap: Snapshot) -> Iterator[Metric]:
        depth = GaugeMetricFamily(f"{_PREFIX}queue_depth",
                                  "Tasks waiting for an agent, by capability set.",
                                  labels=["capability"])
        for label, count in sorted(snap.queue_depth.items()):
            depth.add_metric([label], count)
        in_flight = GaugeMetricFamily(f"{_PREFIX}tasks_in_flight",
                                      "Tasks dispatched or running.", labels=_TASK_LABELS)
        for (name, label), count in sorted(snap.in_flight.items()):
            in_flight.add_metric([name, label], count)
        yield from (depth, in_flight)

    @staticmethod
    def _agent_families(snap: Snapshot) -> Iterator[Metric]:
        age = GaugeMetricFamily(f"{_PREFIX}agent_heartbeat_age_seconds",
                                "Seconds since the agent's last message.",
                                labels=["agent_id", "agent"])
        circuit = GaugeMetricFamily(f"{_PREFIX}agent_circuit_state",
                                    "The agent's circuit: 0 closed, 1 half-open, 2 open.",
                                    labels=["agent_id", "agent"])
        health = GaugeMetricFamily(f"{_PREFIX}agent_health",
                                   "The agent's health checks: 0 healthy, 1 unresponsive, "
                                   "2 unhealthy.", labels=["agent_id", "agent"])
        for agent in snap.agents:
            labels = [agent.agent_id, agent.name]
            age.add_metric(labels, agent.heartbeat_age_s)
            circuit.add_metric(labels, agent.circuit)
            health.add_metric(labels, agent.health)
        yield from (age, circuit, health)

    @staticmethod
    def _journal_families(snap: Snapshot) -> Iterator[Metric]:
        if snap.commit_buckets is None:
            return
        commits = HistogramMetricFamily(
            f"{_PREFIX}journal_commit_seconds",
            "Seconds each journal write took (one per loop pass that recorded something, "
            "with its fsync in fsync mode).")
        commits.add_metric([], cumulative_buckets(COMMIT_BUCKETS_S, snap.commit_buckets),
                           snap.commit_sum_s)
        yield commits

    @staticmethod
    def _broker_families(snap: Snapshot) -> Iterator[Metric]:
        yield CounterMetricFamily(f"{_PREFIX}messages_received",
                                  "Messages the broker's ROUTER received.",
                                  value=snap.messages_in)
        yield CounterMetricFamily(f"{_PREFIX}messages_sent",
                                  "Messages the broker's ROUTER sent.", value=snap.messages_out)
        yield counter_by(f"{_PREFIX}messages_rejected",
                         "Messages answered with ERROR, by error code.", "code", snap.rejected)
        yield GaugeMetricFamily(f"{_PREFIX}pending_tasks", "Tasks waiting for an agent.",
                                value=snap.pending)
        yield GaugeMetricFamily(
            f"{_PREFIX}clients_with_open_tasks",
            "Distinct client connections with open tasks.", value=snap.clients)
        yield GaugeMetricFamily(
            f"{_PREFIX}connected_clients",
            "Client connections that sent a SUBMIT or a heartbeat within the liveness window "
            "(heartbeat interval x liveness).", value=snap.connected_clients)


@dataclass(slots=True)
class StateSnapshot:
    """What one scrape reports of the state service, copied out of its store."""

    #: protocol command (lower case) -> requests served
    requests: dict[str, int] = field(default_factory=dict)
    lock_waits: int = 0
    waiting_sessions: int = 0
    #: agent name -> {"input", "output", "calls", "failed_calls"} summed over its processes
    llm: dict[str, dict[str, int]] = field(default_factory=dict)


def usage_by_agent(usage: dict[str, bytes]) -> dict[str, dict[str, int]]:
    """The ``llm/usage/<agent name>/<agent id>`` records (msgpack maps, as
    ``agent_sdk.llm`` writes them) summed per agent name; a record that does not decode
    to a map is skipped."""
    totals: dict[str, dict[str, int]] = {}
    for key, data in sorted(usage.items()):
        try:
            record: Any = unpackb(data)
        except Exception as e:  # noqa: BLE001 - foreign bytes under the prefix
            logger.debug("%s is not a usage record: %s", key, e)
            continue
        if not isinstance(record, dict):
            continue
        name = str(record.get("agent") or key.removeprefix(USAGE_PREFIX).split("/")[0])
        total = totals.setdefault(name, {"input": 0, "output": 0, "calls": 0,
                                         "failed_calls": 0})
        for kind, field_name in (("input", "prompt_tokens"), ("output", "completion_tokens"),
                                 ("calls", "calls"), ("failed_calls", "failed_calls")):
            value = record.get(field_name)
            if isinstance(value, int) and not isinstance(value, bool):
                total[kind] += value
    return totals


class StateCollector:
    """Reads the in-process state service's plain counters at scrape time (a
    prometheus_client collector), the way :class:`BrokerCollector` reads the engine's:
    copies under the GIL, again if a table changed size meanwhile.

    Args:
        state: The state service run in a thread of the broker process.
    """

    def __init__(self, state: StateServer) -> None:
        self.server = state

    def snapshot(self) -> StateSnapshot:
        """Copy what a scrape reports, again if the loop changed a table meanwhile."""
        return copied(self._snapshot)

    def _snapshot(self) -> StateSnapshot:
        store = self.server.store
        snap = StateSnapshot()
        for kind, count in dict(store.counters).items():
            command = _STATE_COMMANDS.get(kind)
            if command is not None:
                snap.requests[command] = count
        # HELLO is served apart from the other requests and counted as a session opened.
        snap.requests["hello"] = dict(store.lifecycle).get("sessions_opened", 0)
        snap.lock_waits = store.locks.waits
        snap.waiting_sessions = store.locks.waiting_sessions()
        snap.llm = usage_by_agent(dict(store.usage))
        return snap

    def collect(self) -> Iterator[Metric]:
        """The families of one scrape, built afresh from a :meth:`snapshot`."""
        snap = self.snapshot()
        yield counter_by(f"{_PREFIX}state_requests",
                         "Requests the state service served, by command.", "command",
                         snap.requests)
        yield CounterMetricFamily(f"{_PREFIX}state_lock_waits",
                                  "Lock ACQUIREs that found the lock held and waited.",
                                  value=snap.lock_waits)
        yield GaugeMetricFamily(f"{_PREFIX}state_sessions_waiting_for_lock",
                                "Sessions with a lock ACQUIRE waiting now.",
                                value=snap.waiting_sessions)
        tokens = CounterMetricFamily(
            f"{_PREFIX}llm_tokens",
            "LLM tokens the agents reported (llm/usage/ in the state service), by agent "
            "name and kind: input (prompt) or output (completion).",
            labels=["agent", "kind"])
        calls = CounterMetricFamily(f"{_PREFIX}llm_calls",
                                    "LLM calls the agents reported, by agent name.",
                                    labels=["agent"])
        failed = CounterMetricFamily(f"{_PREFIX}llm_failed_calls",
                                     "LLM calls that failed, as the agents reported them.",
                                     labels=["agent"])
        for agent, total in sorted(snap.llm.items()):
            tokens.add_metric([agent, "input"], total["input"])
            tokens.add_metric([agent, "output"], total["output"])
            calls.add_metric([agent], total["calls"])
            failed.add_metric([agent], total["failed_calls"])
        yield from (tokens, calls, failed)


class HealthProbe:
    """Whether the broker's loop turns: its last pass is recent enough.

    Args:
        broker: The broker whose ``last_turn`` is read.
        max_age_s: The oldest last pass that still counts as turning.
    """

    def __init__(self, broker: Broker, max_age_s: float) -> None:
        self.broker = broker
        self.max_age_s = max_age_s

    def healthy(self) -> tuple[bool, float]:
        """(turning, seconds since the last pass)."""
        last = self.broker.last_turn
        age = self.broker.clock() - last
        return last > 0.0 and age <= self.max_age_s, age


class BlockLoopHook:
    """Test hook (``ORCH_TEST_HOOKS=1`` only): blocks the loop thread when asked to.

    Called by the loop on every pass; looks for :data:`BLOCK_LOOP_FILE` at most every
    ``check_every_s`` (one ``stat`` then, nothing otherwise), and when the file is there,
    removes it and sleeps the seconds it holds inside the pass.

    Args:
        data_dir: The broker's data dir.
        check_every_s: The least time between two looks for the file.
    """

    def __init__(self, data_dir: Path, check_every_s: float) -> None:
        self.path = data_dir / BLOCK_LOOP_FILE
        self.check_every_s = check_every_s
        self.next_check = 0.0

    def __call__(self, now: float) -> None:
        if now < self.next_check:
            return
        self.next_check = now + self.check_every_s
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return
        self.path.unlink(missing_ok=True)
        seconds = float(text.strip() or "0")
        logger.warning("test hook: blocking the broker loop for %.2f s", seconds)
        time.sleep(seconds)  # the hook's purpose: a stuck loop, not a wait for an event


def _handler_class(registry: CollectorRegistry, probe: HealthProbe
                   ) -> type[BaseHTTPRequestHandler]:
    class MetricsHandler(BaseHTTPRequestHandler):
        """GET /metrics (Prometheus text format) and GET /healthz."""

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._reply(200, CONTENT_TYPE_LATEST, generate_latest(registry))
            elif path == "/healthz":
                ok, age = probe.healthy()
                body = f"{'ok' if ok else 'stalled'}: last loop pass {age:.3f} s ago\n"
                self._reply(200 if ok else 503, "text/plain; charset=utf-8", body.encode())
            else:
                self._reply(404, "text/plain; charset=utf-8", b"not found: try /metrics\n")

        def _reply(self, code: int, content_type: str, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            logger.debug("metrics http: " + format, *args)

    return MetricsHandler


class MetricsServer:
    """The HTTP server of ``/metrics`` and ``/healthz``, run in a daemon thread.

    Args:
        broker: The broker to report on.
        bind: HOST:PORT to listen on (port 0: any free port).
        any_port_if_taken: when the port is taken, listen on any free one (and log it):
            for a port derived from the broker's, never for one asked for.
        state: The state service running in this process, if any (its requests, lock
            waits and the agents' LLM usage are reported too).
    """

    def __init__(self, broker: Broker, bind: str, any_port_if_taken: bool,
                 state: StateServer | None = None) -> None:
        host, port = parse_host_port(bind)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(BrokerCollector(broker))  # type: ignore[arg-type]
        if state is not None:
            self.registry.register(StateCollector(state))  # type: ignore[arg-type]
        probe = HealthProbe(broker, max(HEALTH_MIN_AGE_S,
                                        broker.config.heartbeat_interval_s * HEALTH_INTERVALS))
        handler = _handler_class(self.registry, probe)
        try:
            self.httpd = ThreadingHTTPServer((host, port), handler)
        except OSError as e:
            if e.errno != errno.EADDRINUSE or not any_port_if_taken:
                raise
            self.httpd = ThreadingHTTPServer((host, 0), handler)
            logger.warning("metrics port %d is taken; serving on %d instead", port,
                           self.httpd.socket.getsockname()[1])
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        """The URL of ``/metrics`` (with the real port)."""
        host, port = self.httpd.socket.getsockname()[:2]
        return f"http://{host}:{port}/metrics"

    def start_thread(self) -> None:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="metrics-http",
                                        daemon=True)
        self._thread.start()

    def stop_thread(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread is not None:
            self._thread.join(5.0)


def install_test_hooks(broker: Broker, data_dir: Path,
                       environ: dict[str, str] | None = None) -> bool:
    """Install :class:`BlockLoopHook` when ``ORCH_TEST_HOOKS=1``; True if installed."""
    env = os.environ if environ is None else environ
    if env.get(TEST_HOOKS_ENV) != "1":
        return False
    logger.warning("%s=1: test hooks are on (never in production)", TEST_HOOKS_ENV)
    hook: Callable[[float], None] = BlockLoopHook(
        data_dir, broker.config.heartbeat_interval_s / 4)
    broker.loop_hook = hook
    return True
