"""The node supervisor's loop: one DEALER to the broker, the replicas, the timers.

One thread does everything, in passes: poll the DEALER (at most :data:`POLL_MS`, which
also bounds how late a crash is seen and a timer fires), handle what the broker sent,
let the replica pool reap and converge, re-read the catalogue file, and report. The
report (NODE) is the node's heartbeat: it is sent at connect, on every change of what
runs or fails, and once per heartbeat interval; the broker answers every NODE with a
PLAN, so silence for a liveness window means the connection is gone and the socket is
opened again (under CURVE a refused handshake is never retried on the same socket).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Final, TextIO

import orjson
import zmq

from cli.processes import ProcessRef
from nodes import PID_FILE
from nodes.catalogue import Catalogue
from nodes.replicas import (
    BACKOFF_MAX_S, BACKOFF_S, CrashBook, ReplicaPool, replica_env, spawn_replica,
)
from wire.curve import apply_client, client_keys, key_scope, scoped
from wire.nodes import NodePlan, NodeReport
from wire.sockets import apply_common_options
from wire.tasks import Disconnect, Error, ErrorCode, decode, encode

logger = logging.getLogger(__name__)

#: Longest wait of one loop pass: how late an exit is reaped and a timer fires.
POLL_MS: Final = 80
#: The heartbeat interval and liveness until the first PLAN says otherwise.
FIRST_INTERVAL_S: Final = 1.0
FIRST_LIVENESS: Final = 3
#: Shortest report interval, whatever a PLAN says (an ``ivl`` of 0 must not spin).
MIN_INTERVAL_S: Final = 0.05
#: Reports queued for a broker that does not read (stale ones are worth nothing: the
#: next report says it all).
REPORT_HWM: Final = 16
#: How long the last report may wait to be delivered when the supervisor leaves.
FINAL_LINGER_MS: Final = 1000
#: How long a replica may drain before the first PLAN says (none runs before it).
DEFAULT_DRAIN_S: Final = 30.0
#: The replicas' log in the data dir (the pid file: :data:`nodes.PID_FILE`).
AGENTS_LOG: Final = "agents.log"
#: ERROR codes that mean the broker will not take this node as it is.
_REFUSALS: Final = frozenset({ErrorCode.BAD_VERSION.value, ErrorCode.UNAUTHORIZED.value})


class NodeRunning(RuntimeError):
    """Raised when another supervisor runs on the same data dir (its pid file is live)."""


@dataclass(frozen=True, slots=True)
class NodeSettings:
    """What ``python -m nodes`` was given."""

    broker: str
    node_id: str
    home: Path
    catalogue: tuple[str, ...] = ()
    crash_limit: int = 5
    crash_window_s: float = 60.0
    #: the replicas' drain time; None: the broker's (the PLAN's ``drain_s``)
    drain_s: float | None = None
    backoff_s: float = BACKOFF_S
    backoff_max_s: float = BACKOFF_MAX_S


def memory_bytes() -> int:
    """This machine's memory (``MemTotal``; sysconf where there is no /proc)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError):
        return 0


def load_average() -> float:
    """The one-minute load average (0 where there is none)."""
    try:
        return max(0.0, os.getloadavg()[0])
    except OSError:
        return 0.0


class Supervisor:
    """Keeps this node's replicas as the broker plans them, and reports them.

    Args:
        settings: The command line.
        clock: Monotonic seconds (injected for tests of the timers).
        out: Where the ``ready`` line goes.
        environ: The environment the replicas start from.
    """

    def __init__(self, settings: NodeSettings, clock: Callable[[], float] = time.monotonic,
                 out: TextIO = sys.stdout, environ: Mapping[str, str] = os.environ) -> None:
        self.settings = settings
        self.clock = clock
        self.out = out
        self.catalogue = Catalogue(settings.home, settings.catalogue)
        self.log_path = settings.home / AGENTS_LOG
        crashes = CrashBook(settings.crash_limit, settings.crash_window_s, self.log_path,
                            settings.backoff_s, settings.backoff_max_s)
        self.pool = ReplicaPool(self._launch, self.catalogue.spec, crashes)
        self.pool.drain_s = settings.drain_s if settings.drain_s is not None else DEFAULT_DRAIN_S
        self._env = replica_env(environ, settings.home)
        self.interval_s = FIRST_INTERVAL_S
        self.liveness = FIRST_LIVENESS
        self.ready = False
        self._signals = 0
        self._killed = False
        self._stopping = False
        self._refused_names: set[str] = set()
        self._last_error: tuple[str, str] | None = None
        self._last_report: tuple[Any, ...] | None = None
        self._next_report_s = 0.0
        self._last_heard_s = 0.0
        self._ctx: zmq.Context[Any] = zmq.Context.instance()
        self._sock: zmq.Socket[Any] | None = None
        self._poller = zmq.Poller()
        self._pid_file = settings.home / PID_FILE
        self._pid_ref: ProcessRef | None = None

    # ---------------------------------------------------------------- lifecycle

    def run(self) -> int:
        """Serve until SIGTERM or SIGINT; returns the exit code (0).

        Raises:
            NodeRunning: another supervisor holds this data dir.
            wire.curve.KeyFileError: a half or wrong CURVE setting.
        """
        self._claim_pid_file()
        previous = {sig: signal.signal(sig, self._on_signal)
                    for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            self._connect()
            self._loop()
            self._send_report(self.clock(), force=True)
            return 0
        finally:
            # Replicas of a supervisor that failed must not outlive it (PDEATHSIG covers
            # a killed one; this, an exception).
            self.pool.kill_all()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._close(FINAL_LINGER_MS)
            self._release_pid_file()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals += 1

    def _loop(self) -> None:
        while True:
            if self._signals and not self._stopping:
                logger.info("stopping: draining %d replica(s)", len(self.pool.replicas))
                self._stopping = True
                self.pool.stop_all(self.clock())
            if self._signals > 1 and not self._killed:
                logger.warning("second signal: killing the replicas now")
                self._killed = True
                self.pool.kill_all()
            assert self._sock is not None
            if self._poller.poll(POLL_MS):
                self._receive()
            now = self.clock()
            changed = self.pool.tick(now)
            if self.catalogue.refresh():
                changed = True
                for name in set(self.pool.targets) - set(self.catalogue.names()):
                    self.pool.forget(name)
            if self._stopping and self.pool.empty():
                return
            if now - self._last_heard_s > self.interval_s * self.liveness:
                logger.warning("no answer from the broker at %s for %.1f s; connecting again",
                               self.settings.broker, now - self._last_heard_s)
                self._close(0)
                self._connect()
                continue
            self._send_report(now, force=changed)

    # ---------------------------------------------------------------- connection

    def _connect(self) -> None:
        keys = client_keys(self.settings.home, self.settings.broker)
        identity = "node-" + self.settings.node_id
        if keys is not None:
            identity = scoped(key_scope(keys.public_key), identity)
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTING_ID, identity.encode())
        apply_common_options(sock, REPORT_HWM)
        if keys is not None:
            apply_client(sock, keys)
        sock.connect(self.settings.broker)
        self._sock = sock
        self._poller.register(sock, zmq.POLLIN)
        self._last_heard_s = self.clock()
        logger.info("node %r connecting to %s (%s)", self.settings.node_id,
                    self.settings.broker, "CURVE" if keys is not None else "plaintext")
        self._send_report(self._last_heard_s, force=True)

    def _close(self, linger_ms: int) -> None:
        if self._sock is None:
            return
        self._poller.unregister(self._sock)
        self._sock.close(linger=linger_ms)
        self._sock = None

    def _receive(self) -> None:
        """Handle every message waiting (the poll said at least one is)."""
        assert self._sock is not None
        while True:
            try:
                frames = self._sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._last_heard_s = self.clock()
            try:
                msg = decode(frames)
            except Exception as e:  # noqa: BLE001 - whatever a peer sends, the node goes on
                logger.warning("dropped a malformed message from the broker: %s", e)
                continue
            match msg:
                case NodePlan():
                    self._on_plan(msg)
                case Error(code, message):
                    self._on_error(code, message)
                case Disconnect(reason):
                    logger.info("the broker said goodbye (%s); reporting on", reason or "-")
                case _:
                    logger.warning("ignored an unexpected %s from the broker",
                                   type(msg).__name__)

    def _on_plan(self, plan: NodePlan) -> None:
        self._last_error = None
        self.interval_s = max(plan.heartbeat_interval_s, MIN_INTERVAL_S)
        self.liveness = plan.heartbeat_liveness
        # The next report at the broker's interval, not the first guess's: a broker whose
        # heartbeat expiry is under that guess would otherwise declare us lost at once.
        self._next_report_s = min(self._next_report_s, self.clock() + self.interval_s)
        if self.settings.drain_s is None:
            self.pool.drain_s = plan.drain_s
        if not self.ready:
            self.ready = True
            self._print_ready()
        if self._stopping:
            return
        refused = self.pool.apply_plan(plan.running, plan.epochs)
        for name in refused:
            if name not in self._refused_names:
                self._refused_names.add(name)
                logger.warning("the broker asks for %d of %r, which is not in this node's "
                               "catalogue; ignored", plan.running[name], name)

    def _on_error(self, code: str, message: str) -> None:
        if (code, message) == self._last_error:
            logger.debug("broker error again: %s: %s", code, message)
            return
        self._last_error = (code, message)
        if code in _REFUSALS:
            logger.error("the broker refuses this node (%s): %s; retrying every %g s",
                         code, message, self.interval_s)
        else:
            logger.warning("broker error %s: %s", code, message)

    # ---------------------------------------------------------------- reports

    def report(self) -> NodeReport:
        """What this node tells the broker now."""
        running = {} if self._stopping else self.pool.registered()
        return NodeReport(self.settings.node_id, socket.gethostname(), os.cpu_count() or 1,
                          memory_bytes(), load_average(), self.catalogue.names(), running,
                          self.pool.crashes.failing(), dict(self.pool.epochs))

    def _send_report(self, now: float, force: bool) -> None:
        report = self.report()
        content = (report.catalogue, report.running, report.failing, report.epochs)
        if not force and content == self._last_report and now < self._next_report_s:
            return
        if self._sock is None:
            return
        try:
            self._sock.send_multipart(encode(report), zmq.NOBLOCK)
        except zmq.Again:
            logger.debug("report not sent: the broker does not read")
        self._last_report = content
        self._next_report_s = now + self.interval_s

    def _print_ready(self) -> None:
        line = {"event": "ready", "node_id": self.settings.node_id, "pid": os.getpid(),
                "catalogue": list(self.catalogue.names())}
        self.out.write(orjson.dumps(line).decode() + "\n")
        self.out.flush()
        logger.info("node %r ready: first plan received", self.settings.node_id)

    # ---------------------------------------------------------------- replicas, files

    def _launch(self, spec: str) -> Any:
        return spawn_replica(spec, self.settings.broker, self.pool.drain_s, self.log_path,
                             self._env)

    def _claim_pid_file(self) -> None:
        """Write ``node.pid``, unless a live supervisor's is there: two supervisors of
        one data dir would fight over its replicas and its node id."""
        self.settings.home.mkdir(parents=True, exist_ok=True)
        try:
            other = ProcessRef.parse(self._pid_file.read_text())
        except OSError:
            other = None
        if other is not None and other.pid != os.getpid() and other.alive():
            raise NodeRunning(f"a node supervisor runs already for {self.settings.home} "
                              f"(pid {other.pid}, {self._pid_file})")
        self._pid_ref = ProcessRef.of(os.getpid())
        self._pid_file.write_text(self._pid_ref.text())

    def _release_pid_file(self) -> None:
        try:
            if self._pid_ref is not None and self._pid_file.read_text() == self._pid_ref.text():
                self._pid_file.unlink()
        except OSError:
            pass


__all__ = ["NodeRunning", "NodeSettings", "Supervisor", "load_average", "memory_bytes"]
