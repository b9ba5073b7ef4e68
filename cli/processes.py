"""The processes ``orchestrator start`` runs and ``stop`` ends: spawning them with their
logs, knowing whether one is still the process that was started, ending it.

A pid alone does not say that: a killed process stays a zombie until its parent reaps
it (for good, under a minimal init), and a pid is reused. The broker is known by the lock
it holds (:func:`cli.common.lock_held`); an agent by its pid and its start time, which
its pid file keeps (``/proc/PID/stat`` field 22; a zombie counts as gone).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from nodes import PID_FILE

#: Lines of a log that a failed start prints.
LOG_TAIL_LINES: Final = 12
#: Bytes read from the end of a log for its last lines.
LOG_TAIL_BYTES: Final = 16 * 1024
#: Between two looks at a process that is ending: there is no event to wait on for a
#: process that is not our child (or a lock another process holds).
POLL_S: Final = 0.02


@dataclass(frozen=True, slots=True)
class ProcessRef:
    """A process as it was started: its pid and its start time (clock ticks since boot;
    None where ``/proc`` is missing), so that a reused pid is not taken for it."""

    pid: int
    started: str | None

    @classmethod
    def of(cls, pid: int) -> ProcessRef:
        """The process ``pid`` now, with its start time."""
        return cls(pid, start_time(pid))

    @classmethod
    def parse(cls, text: str) -> ProcessRef | None:
        """Read a pid file's text (``PID [START]``); None when it holds no pid."""
        parts = text.split()
        if not parts or not parts[0].isdigit():
            return None
        return cls(int(parts[0]), parts[1] if len(parts) > 1 else None)

    def text(self) -> str:
        """The pid file's text."""
        return f"{self.pid} {self.started}\n" if self.started else f"{self.pid}\n"

    def alive(self) -> bool:
        """Whether the process still runs: not gone, not a zombie, not another process
        that got its pid."""
        if not Path("/proc/self/stat").exists():
            return _signal_alive(self.pid)
        now = start_time(self.pid)
        return now is not None and (self.started is None or now == self.started)

    def gone(self) -> bool:
        """Whether the process has ended (the opposite of :meth:`alive`)."""
        return not self.alive()


def start_time(pid: int) -> str | None:
    """When process ``pid`` started (``/proc/PID/stat`` field 22); None when it is gone
    or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces: split after it.
    fields = stat.rpartition(")")[2].split()
    if len(fields) < 20 or fields[0] in ("Z", "X"):
        return None
    return fields[19]


def _signal_alive(pid: int) -> bool:
    """Whether ``pid`` exists (where there is no ``/proc``; a zombie counts here)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_ref(path: Path) -> ProcessRef | None:
    """The process a pid file names, if it still runs."""
    try:
        ref = ProcessRef.parse(path.read_text())
    except OSError:
        return None
    return ref if ref is not None and ref.alive() else None


def log_size(log: Path) -> int:
    """The log's size now: where the lines of a process started next begin."""
    try:
        return log.stat().st_size
    except OSError:
        return 0


def log_tail(log: Path, offset: int = 0) -> list[str]:
    """The last lines of ``log`` written after ``offset``.

    Args:
        log: A log file.
        offset: Where the lines of interest begin (:func:`log_size` before the start).

    Returns:
        Up to :data:`LOG_TAIL_LINES` lines, without their line ends.
    """
    try:
        with open(log, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(offset, size - LOG_TAIL_BYTES))
            data = f.read()
    except OSError:
        return []
    lines = data.decode("utf-8", "replace").splitlines()
    return [line for line in lines if line.strip()][-LOG_TAIL_LINES:]


def spawn(args: list[str], log: Path,
          env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Run ``python ARGS`` detached from this terminal, stderr appended to ``log``, with
    ``env`` added to this process's environment."""
    log.parent.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, **env} if env else None
    # 0600: a process's stderr may quote what its tasks carried (README, "Data at rest").
    with open(log, "ab", opener=lambda path, flags: os.open(path, flags, 0o600)) as log_file:
        os.fchmod(log_file.fileno(), 0o600)
        return subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=log_file,
                                stdin=subprocess.DEVNULL, start_new_session=True, env=full_env)


def children_of(pid: int) -> list[int]:
    """The child processes of ``pid`` (a node supervisor's replicas), from /proc; none
    where /proc is missing or the process is gone."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def kill_supervisor(home: Path) -> None:
    """SIGKILL the node supervisor of the data dir ``home`` (its pid file) and its
    replicas: what a test or a benchmark started, at its end."""
    try:
        ref = ProcessRef.parse((home / PID_FILE).read_text())
    except OSError:
        return
    if ref is None or not ref.alive():
        return
    for pid in [*children_of(ref.pid), ref.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_until(done: Callable[[], bool], timeout: float) -> bool:
    """Look at ``done`` until it is true or ``timeout`` seconds passed.

    Returns:
        Whether ``done`` became true.
    """
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_S)
    return True


def end_process(pid: int, gone: Callable[[], bool], timeout: float) -> bool:
    """SIGTERM ``pid``, wait until ``gone()``; SIGKILL after ``timeout`` seconds.

    Args:
        pid: The process.
        gone: Whether it has ended (its lock released, its start time gone).
        timeout: How long a graceful exit may take.

    Returns:
        True if it ended on SIGTERM (or was gone already), False if it was killed.
    """
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return True
    if wait_until(gone, timeout):
        return True
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return True
    wait_until(gone, timeout)
    return False


def end_child(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """End a process this one started (SIGTERM, SIGKILL after ``timeout``) and reap it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()
