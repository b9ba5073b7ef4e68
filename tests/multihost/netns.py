"""Hosts for multi-host tests: Linux network namespaces joined by veth pairs.

``Hosts`` creates one ``broker`` namespace and a few others (``node1``, ``node2``,
``client``, ...). The broker namespace holds a bridge with the broker's address; every
other host has one veth pair, its ``eth0`` in its own namespace and its peer
(``v<host>``) a port of that bridge::

      node1 eth0 ──── vnode1 ┐
      node2 eth0 ──── vnode2 ├─ br0 (broker, 10.X.Y.1/24)
     client eth0 ──── vclient┘

All the devices are created inside the namespaces (``ip -n NS ...``): the root
namespace, where the test itself runs, never gets a device or a route, so a run that
dies hard leaves at most namespaces behind (``ip netns list``), never a device in the
host's own ``ip link``. ``host.link_down()`` takes that host's bridge port down (a cable
pulled out of the switch: silence both ways, no RST, no FIN); ``host.link_up()`` plugs it
back in.

Each host also has its own host name (a UTS namespace per process: ``unshare --uts``),
its own ``ORCH_HOME`` (a directory under the test's tmp dir) and the processes started
in it (``host.python(...)``), which are SIGKILLed and reaped at teardown; then the
namespaces are deleted, in ``finally``, whatever the test did.

Names are unique per run and per ``Hosts`` (``orchmh-<pid>-<n>-<host>``), so parallel
runs and leftovers of a killed run never collide. Creating namespaces needs root: not
root skips (with the reason); root and creation fails is an error of the test.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import pytest

from tests.conftest import ROOT, kill

#: Prefix of every namespace these tests create (``ip netns list | grep orchmh-``).
PREFIX = "orchmh-"
#: The bridge in the broker's namespace.
BRIDGE = "br0"
#: Each host's end of its veth pair, in its own namespace.
HOST_DEV = "eth0"
#: How long one ``ip`` command may take.
IP_TIMEOUT_S = 20.0

_counter = itertools.count(1)


class HostsError(RuntimeError):
    """Namespaces, devices or addresses could not be created (the test fails)."""


def skip_unless_root() -> None:
    """Skip with the reason when this process cannot create network namespaces."""
    if os.geteuid() != 0:
        pytest.skip("multi-host tests create network namespaces and veth pairs, which "
                    "needs root (CI and the team run them as root: sudo .venv/bin/python "
                    "-m pytest tests/multihost)")


def ip(*args: str) -> str:
    """Run ``ip ARGS``; its stdout. Raises HostsError with ip's own message."""
    ip_bin = shutil.which("ip")
    if ip_bin is None:
        raise HostsError("iproute2's `ip` is not installed (Debian/Ubuntu: apt-get install "
                         "iproute2)")
    done = subprocess.run([ip_bin, *args], check=False, capture_output=True, text=True,
                          timeout=IP_TIMEOUT_S)
    if done.returncode != 0:
        raise HostsError(f"`ip {' '.join(args)}` failed ({done.returncode}): "
                         f"{done.stderr.strip()}")
    return done.stdout


def subnet_for(pid: int) -> str:
    """``10.X.Y``: a private /24 derived from ``pid`` (so that two runs' addresses differ
    too, though each run's devices live only in its own namespaces)."""
    return f"10.{100 + (pid >> 8) % 100}.{pid & 0xFF}"


@dataclass
class Host:
    """One "machine": a network namespace, an address, a host name, an ORCH_HOME."""

    name: str
    netns: str
    ip: str
    home: Path
    hosts: Hosts = field(repr=False)
    #: Environment every process of this host gets (e.g. its CURVE key files).
    env: dict[str, str] = field(default_factory=dict)

    @property
    def hostname(self) -> str:
        return self.name

    @property
    def bridge_port(self) -> str:
        """This host's veth end in the broker's namespace (a port of the bridge)."""
        return f"v{self.name}"[:15]

    def command(self, *argv: str) -> list[str]:
        """``argv`` run inside this host: its network namespace, a UTS namespace of its
        own with this host's name (``exec``: the pid is the command's own)."""
        return ["ip", "netns", "exec", self.netns, "unshare", "--uts", "sh", "-c",
                'hostname "$0" && exec "$@"', self.hostname, *argv]

    def process_env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The test's environment without its ORCH_HOME and CURVE settings, then this
        host's: ``ORCH_HOME``, ``PYTHONPATH``, :attr:`env`, ``extra``."""
        base = {k: v for k, v in os.environ.items()
                if not k.startswith("ORCH_CURVE_") and k not in ("ORCH_HOME", "ORCH_BROKER")}
        return {**base, "PYTHONPATH": str(ROOT), "ORCH_HOME": str(self.home),
                **self.env, **(extra or {})}

    def python(self, *args: str, env: dict[str, str] | None = None,
               log: str | None = None, stdin: bool = False) -> subprocess.Popen[bytes]:
        """Start ``python ARGS`` in this host; killed at teardown. Its stdout is a pipe
        (``read_json_line``); its stderr goes to ``HOME/LOG.stderr`` (``log``) or is
        inherited."""
        stderr: Any = None
        if log is not None:
            stderr = open(self.home / f"{log}.stderr", "ab")  # noqa: SIM115 - closed below
        try:
            proc = subprocess.Popen(self.command(sys.executable, *args), cwd=ROOT,
                                    env=self.process_env(env), stdout=subprocess.PIPE,
                                    stderr=stderr,
                                    stdin=subprocess.PIPE if stdin else subprocess.DEVNULL)
        finally:
            if stderr is not None:
                stderr.close()
        self.hosts.procs.append(proc)
        return proc

    def run(self, *args: str, env: dict[str, str] | None = None,
            timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """Run ``python ARGS`` in this host to the end (text output captured)."""
        return subprocess.run(self.command(sys.executable, *args), check=False, cwd=ROOT,
                              env=self.process_env(env), capture_output=True, text=True,
                              timeout=timeout)

    def stderr_of(self, log: str) -> str:
        """What a process started with ``log=LOG`` wrote on stderr so far."""
        path = self.home / f"{log}.stderr"
        return path.read_text(errors="replace") if path.exists() else ""

    def link_down(self) -> None:
        """Cut this host off the broker's network (its bridge port goes down)."""
        self.hosts.broker_ns_ip("link", "set", self.bridge_port, "down")

    def link_up(self) -> None:
        """Plug this host back in."""
        self.hosts.broker_ns_ip("link", "set", self.bridge_port, "up")


class Hosts:
    """A broker host and ``others`` hosts on one bridged /24; a context manager.

    ``hosts.broker``, ``hosts["node1"]`` (also ``hosts.node1``), ``hosts.all``.
    """

    def __init__(self, base_dir: Path, others: tuple[str, ...] = ("node1", "node2")) -> None:
        self.run_id = f"{os.getpid()}-{next(_counter)}"
        self.subnet = subnet_for(os.getpid())
        self.base_dir = base_dir
        self.procs: list[subprocess.Popen[bytes]] = []
        self.created: list[str] = []
        names = ("broker", *others)
        assert len(set(names)) == len(names), names
        self.all: list[Host] = []
        for index, name in enumerate(names):
            home = base_dir / f"home-{name}"
            address = f"{self.subnet}.1" if name == "broker" else f"{self.subnet}.{10 + index}"
            self.all.append(Host(name, f"{PREFIX}{self.run_id}-{name}", address, home, self))
        self.broker = self.all[0]

    def __getitem__(self, name: str) -> Host:
        for host in self.all:
            if host.name == name:
                return host
        raise KeyError(name)

    def __getattr__(self, name: str) -> Host:
        if name.startswith("_") or name in ("all", "broker"):
            raise AttributeError(name)
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def broker_ns_ip(self, *args: str) -> str:
        return ip("-n", self.broker.netns, *args)

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> Self:
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _create(self) -> None:
        for host in self.all:
            host.home.mkdir(mode=0o700, parents=True, exist_ok=True)
            ip("netns", "add", host.netns)
            self.created.append(host.netns)
            ip("-n", host.netns, "link", "set", "lo", "up")
        broker = self.broker
        ip("-n", broker.netns, "link", "add", BRIDGE, "type", "bridge")
        ip("-n", broker.netns, "addr", "add", f"{broker.ip}/24", "dev", BRIDGE)
        ip("-n", broker.netns, "link", "set", BRIDGE, "up")
        for host in self.all[1:]:
            # One veth pair per host, made in the broker's namespace with the host's end
            # moved into the host's namespace at once.
            ip("-n", broker.netns, "link", "add", host.bridge_port, "type", "veth",
               "peer", "name", HOST_DEV, "netns", host.netns)
            ip("-n", broker.netns, "link", "set", host.bridge_port, "master", BRIDGE)
            ip("-n", broker.netns, "link", "set", host.bridge_port, "up")
            ip("-n", host.netns, "addr", "add", f"{host.ip}/24", "dev", HOST_DEV)
            ip("-n", host.netns, "link", "set", HOST_DEV, "up")
        self._verify()

    def _verify(self) -> None:
        """Each host has its own host name, and sees its own address only."""
        probe = ("import json, socket, subprocess; print(json.dumps({'hostname': "
                 "socket.gethostname(), 'addrs': subprocess.run(['ip', '-4', '-o', 'addr'], "
                 "capture_output=True, text=True).stdout}))")
        for host in self.all:
            done = host.run("-c", probe, timeout=30)
            if done.returncode != 0:
                raise HostsError(f"cannot run a process in {host.netns}: {done.stderr}")
            seen = json.loads(done.stdout)
            if seen["hostname"] != host.hostname:
                raise HostsError(f"{host.netns}: socket.gethostname() is "
                                 f"{seen['hostname']!r}, not {host.hostname!r}")
            if f" {host.ip}/24 " not in seen["addrs"]:
                raise HostsError(f"{host.netns} lacks {host.ip}: {seen['addrs']}")

    def close(self) -> None:
        """Kill every process (SIGKILL, reaped), then delete the namespaces (their veth
        ends and the bridge go with them). Deleting is tried for each even when one
        fails; failures are raised at the end."""
        errors: list[str] = []
        for proc in self.procs:
            try:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGKILL)
                kill(proc)
                if proc.stdin is not None:
                    proc.stdin.close()
            except Exception as e:  # noqa: BLE001 - keep going: the namespaces must go
                errors.append(f"pid {proc.pid}: {e}")
        self.procs.clear()
        for netns in reversed(self.created):
            try:
                ip("netns", "delete", netns)
            except HostsError as e:
                errors.append(str(e))
        self.created.clear()
        if errors:
            raise HostsError("; ".join(errors))

    def leftovers(self) -> list[str]:
        """Namespaces of this ``Hosts`` that still exist."""
        listed = ip("netns", "list")
        mine = {host.netns for host in self.all}
        return [line.split()[0] for line in listed.splitlines()
                if line.split() and line.split()[0] in mine]


@contextmanager
def hosts_for(base_dir: Path, others: tuple[str, ...] = ("node1", "node2")
              ) -> Iterator[Hosts]:
    """``Hosts`` as a context manager, skipping when not root."""
    skip_unless_root()
    with Hosts(base_dir, others) as hosts:
        yield hosts
    assert not hosts.leftovers(), hosts.leftovers()
