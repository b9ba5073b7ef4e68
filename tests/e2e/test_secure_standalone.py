"""``--secure`` beyond the broker process (issue 15: "CURVE on every socket"): the
standalone state service (``python -m broker.state``), the standalone bus forwarder
(``python -m broker.bus``) and the one-shot ``orchestrator run``.

Real processes on free ports, killed at teardown (the ``cluster`` fixture); every wait
has a deadline (ready lines, socket polls, monitor events), no sleeps.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from agent_sdk import StateAccessDenied, SyncClient, SyncStateClient, Unauthorized
from broker.security import SecureHome, authorize, authorized_path, prepare_secure_home
from tests.conftest import ROOT, Cluster, python_process, read_json_line
from tests.e2e.test_secure import REFUSAL_DEADLINE_S, new_key
from wire.bus import encode_bus
from wire.curve import (
    ENV_KEY_FILE, ENV_SERVER_KEY, ENV_SERVER_KEY_FILE, ClientKeys, apply_client,
    read_secret_file,
)

#: Deadline of every request and wait in these tests.
WAIT_S = 10.0
#: The variables that would make a process secure, or give it keys, behind our back.
SECURITY_VARIABLES = ("ORCH_SECURE", ENV_KEY_FILE, ENV_SERVER_KEY, ENV_SERVER_KEY_FILE)


@dataclass
class Keys:
    """A secure data dir, and a client key and a stranger's key beside it."""

    home: Path
    secure: SecureHome
    #: authorized, role client
    client_secret: Path
    #: never authorized
    stranger_secret: Path
    stranger_public: str

    def env(self, secret: Path) -> dict[str, str]:
        """The variables that give an SDK client the key in ``secret``."""
        return {ENV_SERVER_KEY: self.secure.broker_public, ENV_KEY_FILE: str(secret)}

    def client_keys(self, secret: Path) -> ClientKeys:
        """Raw socket options of the key in ``secret``."""
        public, secret_key = read_secret_file(secret)
        return ClientKeys(self.secure.broker_public, public, secret_key)


@pytest.fixture(autouse=True)
def no_ambient_security(monkeypatch: pytest.MonkeyPatch) -> None:
    """Start from plaintext and no keys, whatever the environment running the tests
    says: each test gives keys where it means to."""
    for name in SECURITY_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    # Made before any process starts, so that no two processes create them at once.
    home = tmp_path / "home"
    secure = prepare_secure_home(home)
    client_public, client_secret = new_key(tmp_path / "client-keys", "client")
    authorize(authorized_path(home), client_public, "client")
    stranger_public, stranger_secret = new_key(tmp_path / "stranger-keys", "stranger")
    return Keys(home, secure, client_secret, stranger_secret, stranger_public)


def use_keys(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    """Clients made from now on in this process connect with ``env``'s key (none:
    plaintext)."""
    for name in SECURITY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)


def start_state(cluster: Cluster, home: Path, *extra: str) -> dict[str, Any]:
    """A standalone state service on a free port; its ready line."""
    proc = python_process("-m", "broker.state", "--bind", "127.0.0.1:0", "--data-dir",
                          str(home), "--memory", "--log-level", "WARNING", *extra)
    cluster.procs.append(proc)
    return read_json_line(proc)


def start_bus(cluster: Cluster, home: Path, *extra: str) -> dict[str, Any]:
    """A standalone bus forwarder on free ports; its ready line."""
    proc = python_process("-m", "broker.bus", "--out", "127.0.0.1:0", "--in", "127.0.0.1:0",
                          "--data-dir", str(home), "--log-level", "WARNING", *extra)
    cluster.procs.append(proc)
    return read_json_line(proc)


def assert_refused(url: str, expected: str) -> None:
    """A state client of ``url`` with this process's settings is refused, in time."""
    started = time.monotonic()
    with pytest.raises(Unauthorized) as refused:
        state = SyncStateClient(url, request_timeout_s=WAIT_S)
        try:
            state.get("jobs/1")
        finally:
            state.close()
    assert time.monotonic() - started < REFUSAL_DEADLINE_S
    assert expected in str(refused.value)


# ---------------------------------------------------------------- the state service


def test_a_secure_standalone_state_service(cluster: Cluster, keys: Keys,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a standalone state service started with --secure on a secure data dir
    info = start_state(cluster, keys.home, "--secure")
    # Its ready line names the key its clients expect: the data dir's broker key
    assert info["curve_public_key"] == keys.secure.broker_public
    url = info["state"]
    # An authorized client key reads and writes, within its role's prefixes
    use_keys(monkeypatch, keys.env(keys.client_secret))
    state = SyncStateClient(url, request_timeout_s=WAIT_S)
    try:
        state.set("jobs/1", {"n": 1})
        assert state.get("jobs/1") == {"n": 1}
        # The per-role rules apply as in the broker's process: a client may not forge
        # the agents' LLM usage counters
        with pytest.raises(StateAccessDenied):
            state.set("llm/usage/coder/a1", {})
    finally:
        state.close()
    # An unknown key is refused, and says which key
    use_keys(monkeypatch, keys.env(keys.stranger_secret))
    assert_refused(url, f"refused our key {keys.stranger_public}")
    # A plaintext client is refused
    use_keys(monkeypatch, {})
    assert_refused(url, "requires CURVE")


def test_orch_secure_makes_the_standalone_state_service_secure(
        cluster: Cluster, keys: Keys, monkeypatch: pytest.MonkeyPatch) -> None:
    # ORCH_SECURE=1, as the broker reads it, with no --secure
    monkeypatch.setenv("ORCH_SECURE", "1")
    info = start_state(cluster, keys.home)
    assert info["curve_public_key"] == keys.secure.broker_public
    monkeypatch.delenv("ORCH_SECURE")
    assert_refused(info["state"], "requires CURVE")


def test_a_standalone_state_service_beside_a_broker_accepts_the_brokers_keys(
        cluster: Cluster, keys: Keys, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a secure broker without its own state service, and a standalone state
    # service on the same data dir
    broker = cluster.broker("--secure", "--no-state", "--no-metrics", data_dir=keys.home)
    url = start_state(cluster, keys.home, "--secure")["state"]
    # When a key is authorized in the broker's allow-list after both started
    public, secret = new_key(tmp_path / "late-keys", "late")
    use_keys(monkeypatch, keys.env(secret))
    assert_refused(url, f"refused our key {public}")
    authorize(authorized_path(keys.home), public, "client")
    # Then both accept it (the allow-list is read again when it changes)
    client = cluster.client(broker.url)
    client.ping(WAIT_S)
    state = SyncStateClient(url, request_timeout_s=WAIT_S)
    try:
        state.set("jobs/late", 1)
        assert state.get("jobs/late") == 1
    finally:
        state.close()


# ---------------------------------------------------------------- the bus forwarder


@pytest.fixture
def sockets() -> Iterator[list[zmq.Socket[Any]]]:
    """Raw sockets a test opens, closed at teardown."""
    opened: list[zmq.Socket[Any]] = []
    try:
        yield opened
    finally:
        for sock in opened:
            sock.close(linger=0)


def raw_socket(opened: list[zmq.Socket[Any]], kind: int, url: str,
               keys: ClientKeys | None) -> zmq.Socket[Any]:
    """A connected socket of ``kind`` (CURVE with ``keys``, else plaintext)."""
    sock: zmq.Socket[Any] = zmq.Context.instance().socket(kind)
    opened.append(sock)
    sock.setsockopt(zmq.LINGER, 0)
    if keys is not None:
        apply_client(sock, keys)
    return sock


def monitor(opened: list[zmq.Socket[Any]], sock: zmq.Socket[Any]) -> zmq.Socket[Any]:
    """A monitor of ``sock``'s refused handshakes (closed at teardown with the rest)."""
    events = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH)
    opened.insert(0, events)  # closed before the socket it watches
    return events


def wait_event(events: zmq.Socket[Any], wanted: int) -> bool:
    """Whether ``events`` (a monitor) reports ``wanted`` within
    :data:`REFUSAL_DEADLINE_S`."""
    deadline = time.monotonic() + REFUSAL_DEADLINE_S
    while (left := deadline - time.monotonic()) > 0:
        if events.poll(int(left * 1000) + 1) and recv_monitor_message(events)["event"] == wanted:
            return True
    return False


def receive_until(sub: zmq.Socket[Any], topic: bytes) -> list[bytes]:
    """The topics ``sub`` receives up to and including ``topic`` (within
    :data:`WAIT_S`)."""
    seen: list[bytes] = []
    deadline = time.monotonic() + WAIT_S
    while (left := deadline - time.monotonic()) > 0:
        if sub.poll(int(left * 1000) + 1):
            seen.append(sub.recv_multipart()[0])
            if seen[-1] == topic:
                return seen
    raise AssertionError(f"{topic!r} did not arrive within {WAIT_S} s; got {seen[-5:]}")


def test_a_secure_standalone_bus(cluster: Cluster, keys: Keys,
                                 sockets: list[zmq.Socket[Any]]) -> None:
    # Given a standalone bus forwarder started with --secure
    info = start_bus(cluster, keys.home, "--secure")
    assert info["curve_public_key"] == keys.secure.broker_public
    authorized = keys.client_keys(keys.client_secret)
    # An authorized subscriber, a plaintext one and one with an unknown key
    sub = raw_socket(sockets, zmq.SUB, info["bus_out"], authorized)
    plain = raw_socket(sockets, zmq.SUB, info["bus_out"], None)
    stranger = raw_socket(sockets, zmq.SUB, info["bus_out"],
                          keys.client_keys(keys.stranger_secret))
    stranger_monitor = monitor(sockets, stranger)
    for sock in (sub, plain, stranger):
        sock.setsockopt(zmq.SUBSCRIBE, b"news.")
        sock.connect(info["bus_out"])
    # An unknown publisher is refused at its handshake (so it can deliver nothing)
    forger = raw_socket(sockets, zmq.PUB, info["bus_in"], keys.client_keys(keys.stranger_secret))
    forger_monitor = monitor(sockets, forger)
    forger.connect(info["bus_in"])
    assert wait_event(forger_monitor, zmq.EVENT_HANDSHAKE_FAILED_AUTH)
    assert wait_event(stranger_monitor, zmq.EVENT_HANDSHAKE_FAILED_AUTH)
    # When an authorized publisher publishes: the subscription reaches it through the
    # forwarder some time after connecting, so it publishes until the subscriber hears
    pub = raw_socket(sockets, zmq.PUB, info["bus_in"], authorized)
    pub.connect(info["bus_in"])
    deadline = time.monotonic() + WAIT_S
    seq = 0
    while not sub.poll(50):  # a bounded wait for the message, not a pause
        assert time.monotonic() < deadline, "the authorized subscriber heard nothing"
        seq += 1
        pub.send_multipart(encode_bus("news.first", "publisher", seq, {"n": seq}))
        forger.send_multipart(encode_bus("news.forged", "forger", seq, {}))
    # Then the authorized subscriber receives it, and a later message too
    assert sub.recv_multipart()[0] == b"news.first"
    pub.send_multipart(encode_bus("news.last", "publisher", seq + 1, {}))
    assert b"news.forged" not in receive_until(sub, b"news.last")
    # And by the time the later message arrived, the plaintext and unknown subscribers
    # have received nothing (the forwarder sends each message to every subscriber)
    assert plain.poll(0) == 0
    assert stranger.poll(0) == 0


def test_a_plaintext_standalone_bus_still_takes_plaintext(
        cluster: Cluster, tmp_path: Path, sockets: list[zmq.Socket[Any]]) -> None:
    # Without --secure (and ORCH_SECURE unset) nothing changes: no key, no keys dir
    info = start_bus(cluster, tmp_path / "plain")
    assert "curve_public_key" not in info
    assert not (tmp_path / "plain").exists()
    sub = raw_socket(sockets, zmq.SUB, info["bus_out"], None)
    sub.setsockopt(zmq.SUBSCRIBE, b"x.")
    sub.connect(info["bus_out"])
    pub = raw_socket(sockets, zmq.PUB, info["bus_in"], None)
    pub.connect(info["bus_in"])
    deadline = time.monotonic() + WAIT_S
    while not sub.poll(50):
        assert time.monotonic() < deadline
        pub.send_multipart(encode_bus("x.1", "p", 1, {}))
    assert sub.recv_multipart()[0] == b"x.1"


# ---------------------------------------------------------------- bad keys at start


def run_module(module: str, home: Path) -> subprocess.CompletedProcess[str]:
    """``python -m MODULE --secure`` on ``home``, expected to refuse to start."""
    args = {"broker.state": ["--bind", "127.0.0.1:0", "--memory"],
            "broker.bus": ["--out", "127.0.0.1:0", "--in", "127.0.0.1:0"]}[module]
    env = {k: v for k, v in os.environ.items() if k not in SECURITY_VARIABLES}
    return subprocess.run([sys.executable, "-m", module, *args, "--data-dir", str(home),
                           "--secure", "--log-level", "WARNING"], check=False, cwd=ROOT,
                          capture_output=True, text=True, timeout=30,
                          env={**env, "PYTHONPATH": str(ROOT)})


@pytest.mark.parametrize("module", ["broker.state", "broker.bus"])
@pytest.mark.parametrize("problem", ["open_data_dir", "open_secret", "bad_secret"])
def test_bad_keys_are_refused_at_start_in_one_line(keys: Keys, module: str,
                                                   problem: str) -> None:
    secret = keys.home / "keys" / "broker.key_secret"
    if problem == "open_data_dir":
        keys.home.chmod(0o755)
        expected = f"chmod 700 {keys.home}"
    elif problem == "open_secret":
        secret.chmod(0o644)
        expected = f"chmod 600 {secret}"
    else:
        secret.write_text("not a key\n")
        expected = f"{secret} holds no CURVE key"
    outcome = run_module(module, keys.home)
    assert outcome.returncode == 2, outcome.stderr
    assert outcome.stdout == ""
    lines = outcome.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --secure: "), outcome.stderr
    assert expected in lines[0]


# ---------------------------------------------------------------- orchestrator run


def test_a_secure_private_broker_refuses_plaintext_on_every_socket(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The private broker ``run --secure`` starts (in this process, as ``run`` does)."""
    from broker.embedded import EmbeddedBroker
    from cli.lifecycle import secure_env

    data_dir = tmp_path / "private"
    runner_env, agent_env = secure_env(data_dir)
    embedded = EmbeddedBroker(data_dir, ("--secure",))
    embedded.start()
    try:
        assert embedded.broker is not None
        endpoints = embedded.broker.endpoints
        # Plaintext: the broker and its state service refuse (the bus's sockets are the
        # same CurveServer's, as the standalone bus above)
        with pytest.raises(Unauthorized):
            client = SyncClient(embedded.endpoint)
            try:
                client.ping(WAIT_S)
            finally:
                client.close()
        assert_refused(endpoints["state"], "requires CURVE")
        # The keys `run` gives its own client and its agents are accepted
        for env in (runner_env, agent_env):
            use_keys(monkeypatch, env)
            client = SyncClient(embedded.endpoint)
            try:
                client.ping(WAIT_S)
            finally:
                client.close()
    finally:
        embedded.stop()


def test_run_secure_completes_a_task(tmp_path: Path) -> None:
    # A codebase of one file with one problem: the security audit is quick
    project = tmp_path / "project"
    project.mkdir()
    (project / "app.py").write_text("import os\n\n\ndef run(cmd):\n    os.system(cmd)\n")
    env = {k: v for k, v in os.environ.items()
           if k not in SECURITY_VARIABLES and not k.startswith(("ORCH_LLM", "ORCH_BROKER"))}
    env.update({"PYTHONPATH": str(ROOT), "ORCH_HOME": str(tmp_path / "home")})
    # `run` stops everything it started before it exits, whatever happens
    done = subprocess.run([sys.executable, "-m", "cli", "run",
                           "Analyze this codebase for security issues", "--secure",
                           "--fail-on", "never", "--report-dir", str(tmp_path / "reports")],
                          check=False, cwd=project, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    # Its private broker was secure: its client and agents spoke CURVE (a plaintext
    # broker would have refused them), and it says so
    assert "CURVE on every socket" in done.stderr
    assert "app.py:" in done.stdout, done.stdout
