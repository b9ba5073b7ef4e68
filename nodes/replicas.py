"""Replica processes of a node: starting, stopping, restarting, and giving up.

Two layers, so that the policy is tested on a fake clock and fake processes:

- :class:`CrashBook`: per agent name, the crashes within the window, the restart
  back-off, and the crash loop (pure bookkeeping: every method takes ``now``).
- :class:`ReplicaPool`: the replicas of every name against their targets; it starts
  processes through an injected launcher and reads time only from its callers' ``now``.

:class:`ReplicaProcess` and :func:`spawn_replica` are the real processes: ``python -m
agent_sdk run SPEC``, stderr appended to ``HOME/agents.log``, stdout read for the
``registered`` line, and (on Linux) ``PR_SET_PDEATHSIG`` so that the replicas end with
the supervisor even when it is SIGKILLed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import subprocess
import sys
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Protocol

import orjson

logger = logging.getLogger(__name__)

#: First restart delay after a crash, doubled per crash in a row, up to the maximum.
BACKOFF_S: Final = 0.5
BACKOFF_MAX_S: Final = 10.0
#: A replica SIGTERMed to stop may drain this long past its drain time, then SIGKILL.
KILL_GRACE_S: Final = 10.0
#: Longest stdout line kept from a replica (its ``registered`` line is ~150 bytes).
MAX_LINE_BYTES: Final = 64 * 1024
#: The environment variable naming the key file a node gives its agents: the
#: supervisor's own key (``ORCH_CURVE_KEY_FILE``) is a node key, its agents need an agent
#: key.
ENV_AGENT_KEY_FILE: Final = "ORCH_AGENT_CURVE_KEY_FILE"
_PR_SET_PDEATHSIG: Final = 1


class ProcessHandle(Protocol):
    """A started replica process (:class:`ReplicaProcess`, or a fake in tests)."""

    pid: int

    def poll(self) -> int | None:
        """The exit code once it exited (reaped), else None."""

    def send_signal(self, sig: int) -> None:
        """Signal it (nothing when it is gone)."""

    def read_lines(self) -> list[str]:
        """Complete stdout lines printed since the last call (never blocks)."""

    def close(self) -> None:
        """Release its pipes (after it exited)."""


Launcher = Callable[[str], ProcessHandle]


def exit_text(code: int) -> str:
    """An exit code as a person reads it: ``2``, ``-9 (SIGKILL)``."""
    if code < 0:
        try:
            return f"{code} ({signal.Signals(-code).name})"
        except ValueError:
            return str(code)
    return str(code)


# --------------------------------------------------------------------------- crashes


@dataclass(slots=True)
class _Crashes:
    """One name's crash record."""

    times: deque[float] = field(default_factory=deque)
    #: crashes in a row without a healthy replica between them: the back-off's exponent
    streak: int = 0
    not_before_s: float = 0.0
    failing: str | None = None
    #: the SCALE epoch the node had acted on when it gave up
    failed_epoch: int = 0


class CrashBook:
    """Crash counting, restart back-off and crash loops, per agent name.

    A crash restarts the name after a delay (``backoff_s`` doubled per crash in a row,
    at most ``backoff_max_s``): a replica that cannot start must not spin the CPU.
    ``limit`` crashes within ``window_s`` is a crash loop: the node gives up on the name
    until the broker's epoch for it moves (someone scaled it again, presumably after a
    fix), since restarting forever only fills the log.

    Args:
        limit: Crashes within the window that make a crash loop.
        window_s: The window, in seconds.
        log_path: The replicas' log, named in the failing reason.
    """

    def __init__(self, limit: int, window_s: float, log_path: Path,
                 backoff_s: float = BACKOFF_S, backoff_max_s: float = BACKOFF_MAX_S) -> None:
        self.limit = limit
        self.window_s = window_s
        self.log_path = log_path
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self._names: dict[str, _Crashes] = {}

    def _of(self, name: str) -> _Crashes:
        record = self._names.get(name)
        if record is None:
            record = self._names[name] = _Crashes()
        return record

    def crashed(self, name: str, now: float, exit_code: int, ran_s: float,
                epoch: int) -> float | None:
        """Count a crash of a replica of ``name`` that ran ``ran_s`` seconds.

        Returns:
            The restart delay in seconds, or None when this crash made a crash loop
            (:meth:`failing` then names it).
        """
        record = self._of(name)
        if ran_s >= self.backoff_max_s:
            record.streak = 0  # it ran well for a while: not a crash in a row
        while record.times and record.times[0] <= now - self.window_s:
            record.times.popleft()
        record.times.append(now)
        if record.failing is None and len(record.times) >= self.limit:
            record.failing = (f"crash loop: {len(record.times)} crashes within "
                              f"{self.window_s:g} s (last exit code {exit_text(exit_code)}); "
                              f"its log: {self.log_path}")
            record.failed_epoch = epoch
            return None
        if record.failing is not None:
            return None
        delay = min(self.backoff_s * 2.0 ** record.streak, self.backoff_max_s)
        record.streak += 1
        record.not_before_s = now + delay
        return delay

    def healthy(self, name: str) -> None:
        """A replica of ``name`` is up (it registered): the next crash starts the back-off
        from its first step again."""
        record = self._names.get(name)
        if record is not None:
            record.streak = 0

    def may_start(self, name: str, now: float) -> bool:
        """Whether a replica of ``name`` may start now (not failing, back-off over)."""
        record = self._names.get(name)
        return record is None or (record.failing is None and now >= record.not_before_s)

    def retry(self, name: str, epoch: int) -> bool:
        """Forget a crash loop of ``name`` when ``epoch`` is past the one it gave up at.

        Returns:
            Whether ``name`` was failing and is cleared.
        """
        record = self._names.get(name)
        if record is None or record.failing is None or epoch <= record.failed_epoch:
            return False
        self._names[name] = _Crashes()
        return True

    def failing(self) -> dict[str, str]:
        """The names given up on, with why."""
        return {name: r.failing for name, r in self._names.items() if r.failing is not None}


# --------------------------------------------------------------------------- replicas


@dataclass(slots=True)
class Replica:
    """One replica process and what the pool knows about it."""

    name: str
    process: ProcessHandle
    started_s: float
    agent_id: str | None = None
    #: when it was asked to stop (SIGTERM); None while it should run
    stopping_s: float | None = None
    #: when to SIGKILL it if it has not exited by then
    kill_at_s: float | None = None


class ReplicaPool:
    """The replicas of every agent name, kept at their targets.

    The broker's PLAN sets targets (:meth:`apply_plan`); :meth:`tick`, called every loop
    pass, reaps exits, restarts crashed replicas after their back-off, starts missing
    ones and stops surplus ones (the newest first: the oldest are the ones known to
    work, and hold the most warmed-up state).

    Args:
        launch: Starts a replica from a ``module:Class`` spec.
        spec_of: The spec of an agent name, None when the node may not run it.
        crashes: The crash bookkeeping.
    """

    def __init__(self, launch: Launcher, spec_of: Callable[[str], str | None],
                 crashes: CrashBook) -> None:
        self._launch = launch
        self._spec_of = spec_of
        self.crashes = crashes
        self.replicas: list[Replica] = []
        self.targets: dict[str, int] = {}
        #: the last SCALE epoch acted on, per name
        self.epochs: dict[str, int] = {}
        #: how long a replica may drain once asked to stop (the plan's ``drain_s``)
        self.drain_s = 30.0
        self.stopping_all = False

    # ---------------------------------------------------------------- plan

    def apply_plan(self, running: Mapping[str, int], epochs: Mapping[str, int]) -> list[str]:
        """Take the broker's targets for the names it decides; other names keep theirs.

        A name given up on (crash loop) is tried again only when its epoch moved.

        Returns:
            The names of ``running`` this node may not run (ignored).
        """
        refused = []
        for name, count in running.items():
            if self._spec_of(name) is None:
                refused.append(name)
                continue
            epoch = epochs.get(name, self.epochs.get(name, 0))
            if self.crashes.retry(name, epoch):
                logger.info("agent %r: epoch %d is past the crash loop; trying again",
                            name, epoch)
            self.epochs[name] = epoch
            self.targets[name] = count
        return refused

    def forget(self, name: str) -> None:
        """``name`` left the catalogue: stop its replicas and never start it again."""
        if self.targets.pop(name, 0):
            logger.info("agent %r is no longer in the catalogue; stopping its replicas", name)
        self.epochs.pop(name, None)

    # ---------------------------------------------------------------- views

    def alive(self, name: str) -> list[Replica]:
        """Replicas of ``name`` that run and are not being stopped, oldest first."""
        return [r for r in self.replicas if r.name == name and r.stopping_s is None]

    def running(self) -> dict[str, int]:
        """Replicas that run and are not being stopped, by name."""
        counts: dict[str, int] = {}
        for r in self.replicas:
            if r.stopping_s is None:
                counts[r.name] = counts.get(r.name, 0) + 1
        return counts

    def registered(self) -> dict[str, int]:
        """Replicas that run, registered with the broker (they printed their
        ``registered`` line) and are not being stopped, by name: what the node reports
        as running, so that "3 running" means three agents taking tasks."""
        counts: dict[str, int] = {}
        for r in self.replicas:
            if r.stopping_s is None and r.agent_id is not None:
                counts[r.name] = counts.get(r.name, 0) + 1
        return counts

    def empty(self) -> bool:
        """Whether no replica process is left (stopped ones included)."""
        return not self.replicas

    # ---------------------------------------------------------------- the pass

    def tick(self, now: float) -> bool:
        """Reap, read, kill the overdue, then bring every name to its target.

        Returns:
            Whether what runs or fails changed.
        """
        changed = self._reap(now)
        for replica in self.replicas:
            self._read(replica)
            if replica.kill_at_s is not None and now >= replica.kill_at_s:
                logger.warning("agent %r (pid %d) did not exit within %g s of SIGTERM; "
                               "SIGKILL", replica.name, replica.process.pid,
                               replica.kill_at_s - (replica.stopping_s or now))
                replica.process.send_signal(signal.SIGKILL)
                replica.kill_at_s = None
        if self.stopping_all:
            return changed
        for name in dict.fromkeys([*self.targets, *(r.name for r in self.replicas)]):
            changed |= self._converge(name, self.targets.get(name, 0), now)
        return changed

    def _converge(self, name: str, target: int, now: float) -> bool:
        alive = self.alive(name)
        if len(alive) > target:
            for replica in sorted(alive, key=lambda r: r.started_s)[target:][::-1]:
                self._stop(replica, now)
            return True
        if len(alive) == target or not self.crashes.may_start(name, now):
            return False
        spec = self._spec_of(name)
        if spec is None:
            return False
        for _ in range(target - len(alive)):
            try:
                process = self._launch(spec)
            except OSError as e:
                logger.error("cannot start agent %r: %s", name, e)
                self.crashes.crashed(name, now, 127, 0.0, self.epochs.get(name, 0))
                return True
            logger.info("started agent %r (pid %d)", name, process.pid)
            self.replicas.append(Replica(name, process, now))
        return True

    def _reap(self, now: float) -> bool:
        changed = False
        for replica in list(self.replicas):
            code = replica.process.poll()
            if code is None:
                continue
            self._read(replica)
            replica.process.close()
            self.replicas.remove(replica)
            changed = True
            if replica.stopping_s is not None:
                logger.info("agent %r (pid %d) stopped (exit code %s)", replica.name,
                            replica.process.pid, exit_text(code))
                continue
            delay = self.crashes.crashed(replica.name, now, code, now - replica.started_s,
                                         self.epochs.get(replica.name, 0))
            if delay is None:
                logger.error("agent %r: %s; not restarting it until it is scaled again",
                             replica.name, self.crashes.failing().get(replica.name))
            else:
                logger.warning("agent %r (pid %d) crashed with exit code %s after %.1f s; "
                               "restarting in %g s", replica.name, replica.process.pid,
                               exit_text(code), now - replica.started_s, delay)
        return changed

    def _read(self, replica: Replica) -> None:
        for line in replica.process.read_lines():
            try:
                event = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if isinstance(event, dict) and event.get("event") == "registered":
                replica.agent_id = str(event.get("agent_id"))
                self.crashes.healthy(replica.name)
                logger.info("agent %r (pid %d) registered as %r", replica.name,
                            replica.process.pid, replica.agent_id)

    def _stop(self, replica: Replica, now: float) -> None:
        replica.stopping_s = now
        replica.kill_at_s = now + self.drain_s + KILL_GRACE_S
        logger.info("stopping agent %r (pid %d)", replica.name, replica.process.pid)
        replica.process.send_signal(signal.SIGTERM)

    def stop_all(self, now: float) -> None:
        """Stop every replica (the supervisor is leaving): SIGTERM now, SIGKILL after
        the drain time and its grace."""
        self.stopping_all = True
        for replica in self.replicas:
            if replica.stopping_s is None:
                self._stop(replica, now)

    def kill_all(self) -> None:
        """SIGKILL every replica now (a second signal to the supervisor: stop waiting)."""
        for replica in self.replicas:
            replica.process.send_signal(signal.SIGKILL)
            replica.kill_at_s = None


# --------------------------------------------------------------------------- processes


class ReplicaProcess:
    """A real replica: a :class:`subprocess.Popen` with a non-blocking stdout."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self._popen = popen
        self.pid = popen.pid
        self._buffer = b""
        self._fd: int | None = None
        if popen.stdout is not None:
            self._fd = popen.stdout.fileno()
            os.set_blocking(self._fd, False)

    def poll(self) -> int | None:
        """The exit code once it exited (reaped), else None."""
        return self._popen.poll()

    def send_signal(self, sig: int) -> None:
        """Signal it; nothing once it was reaped (its pid may be another process's)."""
        if self._popen.returncode is None:
            try:
                self._popen.send_signal(sig)
            except ProcessLookupError:
                pass

    def read_lines(self) -> list[str]:
        """Complete stdout lines printed since the last call."""
        if self._fd is None:
            return []
        chunks = []
        while True:
            try:
                data = os.read(self._fd, 65536)
            except BlockingIOError:
                break
            except OSError:
                data = b""
            if not data:
                break
            chunks.append(data)
        if not chunks:
            return []
        self._buffer += b"".join(chunks)
        *lines, self._buffer = self._buffer.split(b"\n")
        self._buffer = self._buffer[-MAX_LINE_BYTES:]
        return [line.decode("utf-8", "replace") for line in lines]

    def close(self) -> None:
        """Close its stdout."""
        if self._popen.stdout is not None:
            self._popen.stdout.close()
        self._fd = None


def _die_with_parent_hook() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child receive SIGTERM when the supervisor dies
    (Linux ``prctl(PR_SET_PDEATHSIG)``); None where there is no prctl.

    The libc function is looked up here, before the fork: the child between fork and
    exec should do as little as it can (no imports, no allocation worth a lock). The
    signal is sent when the *thread* that forked the child ends: the supervisor forks
    from its one loop thread, which lives as long as the process.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()
    getppid, getpid, kill, sigterm = os.getppid, os.getpid, os.kill, int(signal.SIGTERM)

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, sigterm, 0, 0, 0)
        # The supervisor may have died between fork and prctl: then no signal would come.
        if getppid() != parent:
            kill(getpid(), sigterm)

    return hook


def replica_env(environ: Mapping[str, str], home: Path) -> dict[str, str]:
    """The environment of a replica: the supervisor's, with the agent key in place of the
    node key (when one is given) and the node's data dir (its agents log there)."""
    env = dict(environ)
    agent_key = env.get(ENV_AGENT_KEY_FILE, "").strip()
    if agent_key:
        env["ORCH_CURVE_KEY_FILE"] = agent_key
    env["ORCH_HOME"] = str(home)
    return env


def spawn_replica(spec: str, broker: str, drain_s: float, log_path: Path,
                  env: Mapping[str, str]) -> ReplicaProcess:
    """Start ``python -m agent_sdk run SPEC`` for the broker at ``broker``.

    Its stderr is appended to ``log_path`` (0600: an agent's errors may quote its tasks),
    its stdout piped (the ``registered`` line); it gets a session of its own so that a
    terminal's Ctrl-C reaches the supervisor only, which then stops its replicas in
    order.

    Raises:
        OSError: the process or its log cannot be started or opened.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    args = [sys.executable, "-m", "agent_sdk", "run", spec, "--broker", broker,
            "--drain-timeout", f"{drain_s:g}"]
    with open(log_path, "ab", opener=lambda p, flags: os.open(p, flags, 0o600)) as log:
        popen = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=log, env=dict(env), start_new_session=True,
                                 preexec_fn=_die_with_parent_hook())
    return ReplicaProcess(popen)


__all__ = ["BACKOFF_MAX_S", "BACKOFF_S", "CrashBook", "ENV_AGENT_KEY_FILE", "KILL_GRACE_S",
           "Launcher", "ProcessHandle", "Replica", "ReplicaPool", "ReplicaProcess",
           "exit_text", "replica_env", "spawn_replica"]
