"""Where the built-in agents' tools run: a child process with limits, on a throwaway copy.

The tools that read user files or run commands (bandit, radon, test commands, formatters)
never run in the agent's own process and never on the user's tree:

- :func:`materialize` writes the files a task carries into a fresh temporary directory
  (refusing absolute paths and ``..``), so a tool that writes (a formatter) or deletes
  touches a copy;
- :func:`child_setup` is the ``preexec_fn`` of every tool process: a new session (so the
  whole process group dies together), a memory limit (``RLIMIT_AS``), a CPU limit, no core
  files, no network where the platform allows it (a new network namespace), and, when the
  agent runs as root, the unprivileged user ``nobody``;
- :func:`run_command` runs one command that way with a time limit, and kills its process
  group at once when the time runs out or the task is cancelled.

Long-lived workers (the reviewer's analysis pool) use :func:`child_setup` too.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
import resource
import shutil
import signal
import stat
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Final

#: The unprivileged user tools run as when the agent runs as root.
NOBODY_UID: Final = 65534
NOBODY_GID: Final = 65534
#: Default limits of a tool process.
DEFAULT_MEMORY_MB: Final = 1024
DEFAULT_TIMEOUT_S: Final = 60.0
#: Output a command may leave in its result, per stream: the rest is cut (and said so).
MAX_OUTPUT_BYTES: Final = 256 * 1024
#: Environment a tool gets: enough to run Python and common tools, nothing of the agent's.
_PASSED_ENV: Final = ("PATH", "LANG", "LC_ALL", "PYTHONPATH", "VIRTUAL_ENV", "TZ")

_CLONE_NEWUSER: Final = 0x10000000
_CLONE_NEWNET: Final = 0x40000000


class SandboxError(ValueError):
    """A task's files cannot be laid out (a path that leaves the copy); one line."""


@dataclass(frozen=True, slots=True)
class Limits:
    """What a tool process may use.

    Attributes:
        memory_mb: address space, in MiB (``RLIMIT_AS``); 0 for no limit.
        timeout_s: wall time; the process group is killed past it.
        network: whether the process may use the network.
    """

    memory_mb: int = DEFAULT_MEMORY_MB
    timeout_s: float = DEFAULT_TIMEOUT_S
    network: bool = False


def _unshare(flags: int) -> bool:
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    return int(libc.unshare(flags)) == 0


def child_setup(limits: Limits, *, drop_root: bool = True) -> Callable[[], None]:
    """The ``preexec_fn`` of a tool process (runs in the child, before ``exec``)."""

    drop = drop_root and os.geteuid() == 0 and nobody_can_run()

    def setup() -> None:
        os.setsid()
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if limits.memory_mb > 0:
            size = limits.memory_mb * 1024 * 1024
            resource.setrlimit(resource.RLIMIT_AS, (size, size))
        if limits.timeout_s > 0:
            # A CPU limit backs the wall-time kill: a process that escapes its group still
            # stops.
            cpu = int(limits.timeout_s) + 5
            resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 5))
        is_root = os.geteuid() == 0
        if not limits.network:
            # As root, a new network namespace (only a down loopback inside); otherwise a
            # user namespace makes it allowed where the kernel permits. Where neither
            # works the tool runs with the network, as on any other platform.
            if not _unshare(_CLONE_NEWNET) and not is_root:
                _unshare(_CLONE_NEWUSER | _CLONE_NEWNET)
        if drop:
            os.setgroups([])
            os.setgid(NOBODY_GID)
            os.setuid(NOBODY_UID)

    return setup


_NOBODY_CAN_RUN: list[bool] = []


def nobody_can_run() -> bool:
    """Whether ``nobody`` can run this interpreter and read its packages.

    An interpreter under ``/root`` (pyenv, a venv in root's home) is out of ``nobody``'s
    reach; tools then keep the agent's user, and :func:`privilege_note` says so once.
    Computed once, in the parent (the answer is inherited by every child).
    """
    if not _NOBODY_CAN_RUN:
        needed = [Path(os.path.realpath(sys.executable)), Path(sys.prefix),
                  Path(__file__).resolve().parent]
        _NOBODY_CAN_RUN.append(all(_world_reachable(p) for p in needed))
    return _NOBODY_CAN_RUN[0]


def _world_reachable(path: Path) -> bool:
    try:
        mode = path.stat().st_mode
        if not mode & (stat.S_IROTH if path.is_file() else stat.S_IXOTH):
            return False
        return all(parent.stat().st_mode & stat.S_IXOTH for parent in path.parents)
    except OSError:
        return False


def privilege_note() -> str | None:
    """One line for the agent's log when tools keep root (None when they do not)."""
    if os.geteuid() != 0 or nobody_can_run():
        return None
    return (f"tools run as root: the user nobody cannot reach this Python "
            f"({os.path.realpath(sys.executable)}); install it outside /root to drop root")


def tool_env(extra: Mapping[str, str] | None = None, home: Path | None = None) -> dict[str, str]:
    """A tool's environment: the agent's PATH and locale, none of its secrets."""
    env = {k: os.environ[k] for k in _PASSED_ENV if k in os.environ}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    if home is not None:
        env["HOME"] = str(home)
    env.update(extra or {})
    return env


def safe_relative(path: str) -> PurePosixPath:
    """A carried file's path as a relative path inside the copy.

    Raises:
        SandboxError: an absolute path, a ``..`` component, or an empty name.
    """
    pure = PurePosixPath(path.replace("\\", "/"))
    if pure.is_absolute() or not pure.parts or any(p in ("..", "") for p in pure.parts):
        raise SandboxError(f"a carried file has a path that leaves its directory: {path!r}")
    if pure.parts[0] == ".":
        pure = PurePosixPath(*pure.parts[1:])
        if not pure.parts:
            raise SandboxError(f"a carried file has no name: {path!r}")
    return pure


class Workspace:
    """A throwaway directory holding a task's files; removed on exit.

    ::

        with Workspace(files) as ws:
            await run_command(["python", "-m", "pytest"], cwd=ws.root, ...)
    """

    def __init__(self, files: Iterable[Mapping[str, str]] = (), *, prefix: str = "orch-") -> None:
        self.root = Path(tempfile.mkdtemp(prefix=prefix))
        try:
            materialize(files, self.root)
            if os.geteuid() == 0 and nobody_can_run():
                _give_to_nobody(self.root)
        except BaseException:
            shutil.rmtree(self.root, ignore_errors=True)
            raise

    def __enter__(self) -> Workspace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def materialize(files: Iterable[Mapping[str, str]], root: Path) -> list[Path]:
    """Write carried files (``{"path", "content"}``) under ``root``; return their paths.

    Raises:
        SandboxError: a path that would leave ``root``, or a file without a path.
    """
    written = []
    for record in files:
        relative = safe_relative(str(record.get("path", "")))
        target = root.joinpath(*relative.parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(str(record.get("content", "")), encoding="utf-8")
        written.append(target)
    return written


def _give_to_nobody(root: Path) -> None:
    """Hand a workspace to ``nobody``, so a tool that dropped root can write to it."""
    for dirpath, dirnames, filenames in os.walk(root):
        os.chown(dirpath, NOBODY_UID, NOBODY_GID)
        for name in filenames:
            os.chown(os.path.join(dirpath, name), NOBODY_UID, NOBODY_GID)


@dataclass(frozen=True, slots=True)
class CommandRun:
    """How a command ended.

    Attributes:
        returncode: its exit status (negative: killed by that signal).
        stdout: its output, decoded, cut at :data:`MAX_OUTPUT_BYTES`.
        stderr: likewise.
        timed_out: it ran past its time limit and was killed.
    """

    returncode: int
    stdout: str
    stderr: str
    timed_out: bool

    @property
    def memory_exhausted(self) -> bool:
        """Whether it most likely died of its memory limit (a MemoryError, or killed)."""
        return "MemoryError" in self.stderr or "Cannot allocate memory" in self.stderr


def kill_group(pid: int) -> None:
    """Kill a tool's whole process group (it is its session leader)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


async def run_command(argv: list[str], *, cwd: Path, limits: Limits = Limits(),
                      env: Mapping[str, str] | None = None,
                      stdin: bytes | None = None) -> CommandRun:
    """Run ``argv`` in ``cwd`` as a limited tool process (see the module's doc).

    The process group is killed when the time runs out (``timed_out``) and when the
    awaiting task is cancelled (the cancellation goes on once it is dead).

    Raises:
        FileNotFoundError: the program does not exist.
    """
    proc = await asyncio.create_subprocess_exec(
        *argv, cwd=str(cwd), env=dict(env) if env is not None else tool_env(home=cwd),
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        preexec_fn=child_setup(limits), start_new_session=False)
    timed_out = False
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin),
                                          limits.timeout_s if limits.timeout_s > 0 else None)
    except asyncio.TimeoutError:
        timed_out = True
        kill_group(proc.pid)
        out, err = await proc.communicate()
    except BaseException:
        kill_group(proc.pid)
        await proc.wait()
        raise
    finally:
        # Whatever it left running in its group goes with it.
        kill_group(proc.pid)
    return CommandRun(proc.returncode if proc.returncode is not None else -9,
                      _cut(out), _cut(err), timed_out)


def _cut(raw: bytes) -> str:
    if len(raw) <= MAX_OUTPUT_BYTES:
        return raw.decode("utf-8", "replace")
    return (raw[:MAX_OUTPUT_BYTES].decode("utf-8", "replace")
            + f"\n[... {len(raw) - MAX_OUTPUT_BYTES} more bytes cut]")
