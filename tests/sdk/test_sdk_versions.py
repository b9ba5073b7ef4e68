"""A broker or state service of another protocol version refuses the SDK with ERROR
``bad_version``; the SDK must then fail at once, with one clear line naming both
versions (:class:`VersionMismatch`), and stop: no wait until a timeout, no
``BrokerUnavailable``, no reconnecting or resubmitting.

End to end, both ways round:

- an SDK of the next version against a real broker and state service of this one: a client,
  a state client and an agent in a subprocess whose wire constants are patched
  (``python -m tests.sdk.test_sdk_versions ROLE URL``, the ``__main__`` block below);
- the SDK of this release against a peer of "version 2": a raw ROUTER in this process
  answering every message as a newer broker would, talking to a client subprocess and
  to ``python -m agent_sdk run``.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from tests.conftest import ROOT, Cluster
from wire.limits import PROTOCOL_VERSION

#: How long a refused subprocess may take to exit: far less than any timeout it uses.
EXIT_S = 20.0
#: How long each refused call may take: at once (no timeout runs out first).
AT_ONCE_S = 5.0
#: What a call waits at most in the subprocess: a hang shows as a step this long.
CALL_TIMEOUT_S = 30.0
#: The wire version the patched subprocess speaks, and the fake newer peer's.
OTHER_VERSION = PROTOCOL_VERSION + 1


def run_peer(*args: str) -> subprocess.CompletedProcess[str]:
    """Run ``python ARGS`` from the repository root (pure Python: the wire constants
    are patched there), within :data:`EXIT_S`."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ORCH_PURE_PYTHON": "1"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=EXIT_S)


def steps(done: subprocess.CompletedProcess[str]) -> dict[str, dict[str, Any]]:
    """The JSON lines a ``__main__`` role printed, by step."""
    assert done.returncode == 0, done.stderr
    return {line["step"]: line for line in map(json.loads, done.stdout.splitlines())}


def assert_refused(step: dict[str, Any], peer: str, ours: int, theirs: int) -> None:
    """A step failed at once with a VersionMismatch naming both versions."""
    assert step["error"] == "VersionMismatch", step
    assert step["elapsed_s"] < AT_ONCE_S, step
    message = step["message"]
    assert "\n" not in message
    assert message.startswith(f"{peer} at tcp://127.0.0.1:") and "(bad_version)" in message
    assert f"protocol version {ours} " in message and f"speaks version {theirs}" in message


def assert_one_line_refusal(done: subprocess.CompletedProcess[str], ours: int,
                            theirs: int) -> None:
    """``python -m agent_sdk run`` exited 1 with one line saying why, and never said it
    registered."""
    assert done.returncode == 1, (done.returncode, done.stderr)
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: the broker at tcp://127.0.0.1:"), lines
    assert "refused our messages (bad_version): protocol version mismatch" in lines[0]
    assert f"protocol version {ours} " in lines[0] and f"speaks version {theirs}" in lines[0]


# ------------------------------------------------------------------ an older SDK's view


def test_a_client_of_another_version_fails_at_once_and_stops(cluster: Cluster) -> None:
    # Given a broker of this version
    broker = cluster.broker()
    # When a client of version 2 submits a task, then asks for the status, then submits
    done = steps(run_peer("-m", "tests.sdk.test_sdk_versions", "client", broker.url))
    # Then the task's result, the status and the next submit each fail at once, with
    # both versions named
    for step in ("result", "status", "submit_again"):
        assert_refused(done[step], "the broker", OTHER_VERSION, PROTOCOL_VERSION)
    # And the client keeps nothing to send again
    assert done["open"]["message"] == "0", done["open"]
    # And the broker refused its one message (the SUBMIT), and took no task
    status = cluster.client(broker.url).status()
    assert status["errors"] == {"bad_version": 1}, status["errors"]
    assert status["tasks"]["submitted"] == 0


def test_a_state_client_of_another_version_fails_at_once(cluster: Cluster) -> None:
    broker = cluster.broker()
    state_url = cluster.client(broker.url).status()["broker"]["endpoints"]["state"]
    done = steps(run_peer("-m", "tests.sdk.test_sdk_versions", "state", state_url))
    for step in ("connect", "get", "set_again"):
        assert_refused(done[step], "the state service", OTHER_VERSION, PROTOCOL_VERSION)
    assert done["open"]["message"] == "0", done["open"]


def test_an_agent_of_another_version_exits_with_one_line(cluster: Cluster) -> None:
    broker = cluster.broker()
    done = run_peer("-m", "tests.sdk.test_sdk_versions", "agent", broker.url)
    assert_one_line_refusal(done, OTHER_VERSION, PROTOCOL_VERSION)
    assert cluster.client(broker.url).status()["agents"] == []


# ------------------------------------------------------------------ a newer peer's view


class NewerPeer:
    """A raw ROUTER that answers every message as a broker (and state service) of
    protocol version 2 answers one of version 1: ERROR ``bad_version``, no ``req``."""

    def __init__(self) -> None:
        self._context = zmq.Context()
        self._sock = self._context.socket(zmq.ROUTER)
        self._sock.linger = 0
        port = self._sock.bind_to_random_port("tcp://127.0.0.1")
        self.url = f"tcp://127.0.0.1:{port}"
        self.received = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        from wire.codec import packb

        while not self._stop.is_set():
            if not self._sock.poll(50):
                continue
            identity, signature, command, *_ = self._sock.recv_multipart()
            self.received += 1
            theirs = signature[4:].decode("ascii", "replace")
            message = (f"protocol version mismatch: the message is protocol version {theirs}"
                       f" (frame 0 {signature!r}), its receiver speaks version "
                       f"{OTHER_VERSION}: run the same Orchestrator release on both sides "
                       "(upgrade the older one)")
            # 0x40-0x5F are the state service's commands; its ERROR is 0x5F
            error = b"\x5f" if 0x40 <= command[0] <= 0x5F else b"\x7f"
            self._sock.send_multipart([identity, f"ORCH{OTHER_VERSION}".encode(), error,
                                       packb({"code": "bad_version", "message": message})])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()
        self._context.term()


@pytest.fixture
def newer_peer() -> Iterator[NewerPeer]:
    peer = NewerPeer()
    try:
        yield peer
    finally:
        peer.close()


def test_a_client_refused_by_a_newer_broker_fails_at_once(newer_peer: NewerPeer) -> None:
    done = steps(run_peer("-m", "tests.sdk.test_sdk_versions", "client", newer_peer.url,
                          "--unpatched"))
    for step in ("result", "status", "submit_again"):
        assert_refused(done[step], "the broker", PROTOCOL_VERSION, OTHER_VERSION)
    assert done["open"]["message"] == "0", done["open"]
    assert newer_peer.received == 1  # the SUBMIT; nothing after the refusal


def test_a_state_client_refused_by_a_newer_service_fails_at_once(
        newer_peer: NewerPeer) -> None:
    done = steps(run_peer("-m", "tests.sdk.test_sdk_versions", "state", newer_peer.url,
                          "--unpatched"))
    for step in ("connect", "get", "set_again"):
        assert_refused(done[step], "the state service", PROTOCOL_VERSION, OTHER_VERSION)
    assert newer_peer.received == 1  # the HELLO; no HELLO again


def test_an_agent_refused_by_a_newer_broker_exits_with_one_line(newer_peer: NewerPeer) -> None:
    started = time.monotonic()
    done = run_peer("-m", "agent_sdk", "run", "tests.e2e.faults.agents:CountingAgent",
                    "--broker", newer_peer.url)
    assert_one_line_refusal(done, PROTOCOL_VERSION, OTHER_VERSION)
    assert time.monotonic() - started < EXIT_S
    # One READY, refused; no registering again
    assert newer_peer.received == 1


# ------------------------------------------------------------------ the subprocess roles


def _speak_other_version() -> None:
    """Make this process's wire package speak another protocol version (pure Python only)."""
    import wire.codec
    import wire.state
    import wire.tasks

    signature = f"ORCH{OTHER_VERSION}".encode()
    for module in (wire.codec, wire.tasks, wire.state):
        module.SIGNATURE = signature  # type: ignore[misc]
        module.PROTOCOL_VERSION = OTHER_VERSION  # type: ignore[misc]
    wire.state._EMPTY_STATE_PING[0] = signature


async def _step(name: str, call: Any) -> None:
    """Run one call and print how it ended as a JSON line."""
    started = time.monotonic()
    try:
        outcome = await call()
        line: dict[str, Any] = {"error": None, "message": str(outcome)}
    except Exception as e:  # noqa: BLE001 - reported to the test
        line = {"error": type(e).__name__, "message": str(e)}
    line.update(step=name, elapsed_s=round(time.monotonic() - started, 3))
    print(json.dumps(line), flush=True)


async def _client(url: str) -> None:
    from agent_sdk import Client

    async with Client(url) as client:
        handle = client.submit(capabilities=["echo"], data=1)
        await _step("result", lambda: handle.result(timeout=CALL_TIMEOUT_S))
        await _step("status", lambda: client.status(timeout=CALL_TIMEOUT_S))

        async def submit_again() -> Any:
            return client.submit(capabilities=["echo"], data=2)

        await _step("submit_again", submit_again)

        async def open_tasks() -> str:
            return str(len(client._handles) + len(client._outgoing))

        await _step("open", open_tasks)


async def _state(url: str) -> None:
    from agent_sdk.state import StateClient

    state = StateClient(url, request_timeout_s=CALL_TIMEOUT_S)

    async def open_requests() -> str:
        return str(len(state._session._requests._pending))

    try:
        await _step("connect", state.connect)
        await _step("get", lambda: state.get("k"))
        await _step("set_again", lambda: state.set("k", 1))
        await _step("open", open_requests)
    finally:
        await state.close()


def _agent(url: str) -> int:
    from agent_sdk.__main__ import main

    return main(["run", "tests.e2e.faults.agents:CountingAgent", "--broker", url])


if __name__ == "__main__":
    role, peer_url, *flags = sys.argv[1:]
    if "--unpatched" not in flags:
        _speak_other_version()
    if role == "agent":
        sys.exit(_agent(peer_url))
    asyncio.run(asyncio.wait_for(_client(peer_url) if role == "client" else _state(peer_url),
                                 EXIT_S))
