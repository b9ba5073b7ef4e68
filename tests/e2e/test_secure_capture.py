"""A ``--secure`` broker's traffic on the wire is not plaintext (issue 15).

What: a capture on the loopback interface, taken while a task and a state write carrying a
random marker cross it, holds no occurrence of the marker with a ``--secure`` broker,
neither in the submit, the dispatch, the result nor the state request and its answer;
while the same exchange with a plaintext broker shows the marker in the capture.

Why: the other secure tests prove that peers without the right keys are refused, not
that the accepted ones are encrypted; a broker that authenticated with CURVE but sent
its messages in clear would pass them. The plaintext control proves that the capture
works, so that the secure test cannot pass because nothing was captured.

How: no tcpdump: a raw ``AF_PACKET`` socket bound to ``lo`` (root only; the tests skip
otherwise), read by a background thread. Every frame is kept; the marker is searched in
the raw frames and in each TCP stream reassembled by sequence number (so that a marker
split across two segments is found too), and the kernel's drop counter must stay at 0.
Real processes on free ports; every wait has a deadline, no sleeps.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from agent_sdk import SyncStateClient
from broker.security import authorize, authorized_path
from tests.conftest import BrokerProcess, Cluster
from tests.e2e.test_secure import key_env, new_key

#: Deadline of every task and request in these tests.
WAIT_S = 15.0
#: How long the capture thread blocks in one read before it looks at its stop event.
READ_TIMEOUT_S = 0.05
#: ETH_P_ALL: every protocol.
ETH_P_ALL = 0x0003
ETH_HEADER = 14
ETH_P_IP = 0x0800
IPPROTO_TCP = 6
SOL_PACKET = 263
PACKET_STATISTICS = 6
#: A receive buffer large enough that no frame of a test is dropped (root may force it).
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
RCVBUF_BYTES = 32 * 1024 * 1024


def _capture_unavailable() -> str | None:
    """Why a loopback capture cannot be taken here, or None."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "a raw packet capture needs root"
    if not hasattr(socket, "AF_PACKET"):
        return "AF_PACKET sockets are not available on this platform"
    try:
        probe = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    except OSError as e:
        return f"cannot open an AF_PACKET socket: {e}"
    probe.close()
    return None


pytestmark = pytest.mark.skipif(_capture_unavailable() is not None,
                                reason=str(_capture_unavailable()))


@dataclass
class Segment:
    """The payload of one captured TCP segment."""

    src: tuple[str, int]
    dst: tuple[str, int]
    seq: int
    payload: bytes


@dataclass
class LoopbackCapture:
    """Every frame seen on ``lo`` between :meth:`start` and :meth:`stop`."""

    frames: list[bytes] = field(default_factory=list)
    drops: int = 0
    _sock: socket.socket | None = None
    _thread: threading.Thread | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _error: OSError | None = None

    def start(self) -> None:
        """Open and bind the socket (from here on the kernel queues every frame), then
        start the reader."""
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF_BYTES)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF_BYTES)
        sock.bind(("lo", 0))
        # reading the statistics resets them: count from here on only
        sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8)
        sock.settimeout(READ_TIMEOUT_S)
        self._sock = sock
        self._thread = threading.Thread(target=self._read, name="lo-capture", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self._sock is not None
        try:
            while not self._stop.is_set():
                try:
                    self.frames.append(self._sock.recv(1 << 17))
                except TimeoutError:
                    continue
            # the frames of the traffic that ended before stop() are queued already
            self._sock.setblocking(False)
            while True:
                try:
                    self.frames.append(self._sock.recv(1 << 17))
                except BlockingIOError:
                    return
        except OSError as e:  # reported by stop()
            self._error = e

    def stop(self) -> None:
        """Stop the reader, read what remains queued, close the socket."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            assert not self._thread.is_alive(), "the capture thread did not stop"
        if self._sock is not None:
            _packets, self.drops = struct.unpack(
                "II", self._sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))
            self._sock.close()
            self._sock = None
        if self._error is not None:
            raise self._error

    def segments(self) -> list[Segment]:
        """The TCP segments over IPv4 with a payload, in capture order."""
        found = []
        for frame in self.frames:
            if len(frame) < ETH_HEADER + 20:
                continue
            if struct.unpack("!H", frame[12:14])[0] != ETH_P_IP:
                continue
            ip = frame[ETH_HEADER:]
            ihl = (ip[0] & 0x0F) * 4
            total = struct.unpack("!H", ip[2:4])[0]
            if ip[0] >> 4 != 4 or ip[9] != IPPROTO_TCP or len(ip) < ihl + 20:
                continue
            tcp = ip[ihl:total]
            sport, dport, seq = struct.unpack("!HHI", tcp[:8])
            offset = (tcp[12] >> 4) * 4
            payload = tcp[offset:]
            if payload:
                found.append(Segment((socket.inet_ntoa(ip[12:16]), sport),
                                     (socket.inet_ntoa(ip[16:20]), dport), seq, payload))
        return found

    def streams(self) -> dict[tuple[tuple[str, int], tuple[str, int]], bytes]:
        """Each direction of each TCP connection, its segments in sequence order (a
        frame seen twice on ``lo``, outgoing and incoming, or retransmitted, counts once)."""
        by_flow: dict[tuple[tuple[str, int], tuple[str, int]], dict[int, bytes]] = {}
        for segment in self.segments():
            by_flow.setdefault((segment.src, segment.dst), {}).setdefault(
                segment.seq, segment.payload)
        streams = {}
        for flow, pieces in by_flow.items():
            first = min(pieces)  # sequence numbers may wrap: order them from the first
            ordered = sorted(pieces, key=lambda seq: (seq - first) % (1 << 32))
            streams[flow] = b"".join(pieces[seq] for seq in ordered)
        return streams

    def streams_holding(self, marker: bytes) -> set[int]:
        """Both ports of every reassembled TCP stream that holds ``marker``."""
        return {port for (src, dst), stream in self.streams().items() if marker in stream
                for port in (src[1], dst[1])}

    def holds(self, marker: bytes) -> bool:
        """Whether ``marker`` occurs in a captured frame or a reassembled TCP stream."""
        return (any(marker in frame for frame in self.frames)
                or any(marker in stream for stream in self.streams().values()))

    def payload_bytes_to(self, ports: set[int]) -> int:
        """How many TCP payload bytes were captured to or from ``ports`` on 127.0.0.1."""
        return sum(len(segment.payload) for segment in self.segments()
                   if segment.src[1] in ports or segment.dst[1] in ports)


@pytest.fixture
def capture() -> Iterator[LoopbackCapture]:
    taken = LoopbackCapture()
    try:
        yield taken
    finally:
        taken.stop()


def broker_info(broker: BrokerProcess) -> dict[str, Any]:
    return json.loads((broker.data_dir / "broker.json").read_text())


def broker_ports(info: dict[str, Any]) -> set[int]:
    """Every TCP port the broker listens on (tasks, bus, events, state, metrics)."""
    return {int(value.rsplit(":", 1)[1]) for value in info.values()
            if isinstance(value, str) and value.startswith("tcp://")}


def new_marker() -> str:
    return f"marker-{secrets.token_hex(16)}"


def run_exchange(cluster: Cluster, broker: BrokerProcess, capture: LoopbackCapture,
                 task_marker: str, state_marker: str) -> None:
    """Under ``capture``: a task whose payload (and so its echoed result) holds
    ``task_marker``, and a state write and read of ``state_marker``; both succeed.
    The agent must have registered already; the client and the state client take their
    keys from the environment."""
    client = cluster.client(broker.url)
    state = SyncStateClient(broker_info(broker)["state"], request_timeout_s=WAIT_S)
    try:
        client.ping(WAIT_S)  # connected (and, when secure, handshaken) before the capture
        state.get("capture.warmup")
        capture.start()
        result = client.submit(capabilities=["echo"],
                               data={"secret": task_marker}).result(timeout=WAIT_S)
        assert result.ok, result
        # the marker came back from the agent process: it crossed the wire both ways
        assert result.data == {"secret": task_marker}
        state.set("capture.k", {"secret": state_marker})
        assert state.get("capture.k") == {"secret": state_marker}
    finally:
        state.close()
        capture.stop()


def test_the_capture_shows_a_plaintext_brokers_payloads(
        cluster: Cluster, capture: LoopbackCapture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a plaintext broker and an echo agent (no keys anywhere)
    for name in [n for n in os.environ if n.startswith("ORCH_CURVE_")]:
        monkeypatch.delenv(name)
    broker = cluster.broker()
    cluster.agent(broker.url)
    task_marker, state_marker = new_marker(), new_marker()
    # When a task and a state write carry markers while the capture runs
    run_exchange(cluster, broker, capture, task_marker, state_marker)
    # Then the capture works: both markers are in it, in clear...
    assert capture.drops == 0
    assert capture.holds(task_marker.encode())
    assert capture.holds(state_marker.encode())
    # ...and so does the stream reassembly: the task marker is in the streams to and
    # from the broker's task port, the state marker in those of the state port
    info = broker_info(broker)
    assert broker.port in capture.streams_holding(task_marker.encode())
    state_port = int(info["state"].rsplit(":", 1)[1])
    assert state_port in capture.streams_holding(state_marker.encode())


def test_a_secure_brokers_traffic_carries_no_plaintext_payload(
        cluster: Cluster, capture: LoopbackCapture, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a secure broker, an agent key and a client key in its allow-list
    broker = cluster.broker("--secure")
    keys = broker.data_dir / "keys"
    agent_public, agent_secret = new_key(tmp_path / "agent-keys", "agent")
    client_public, client_secret = new_key(tmp_path / "client-keys", "client")
    authorize(authorized_path(broker.data_dir), agent_public, "agent")
    authorize(authorized_path(broker.data_dir), client_public, "client")
    agent_env = key_env(keys / "broker.key", agent_secret)
    cluster.agent(broker.url, ORCH_CURVE_SERVER_KEY_FILE=agent_env["ORCH_CURVE_SERVER_KEY_FILE"],
                  ORCH_CURVE_KEY_FILE=agent_env["ORCH_CURVE_KEY_FILE"])
    for name, value in key_env(keys / "broker.key", client_secret).items():
        monkeypatch.setenv(name, value)
    task_marker, state_marker = new_marker(), new_marker()
    # When a task and a state write carry markers while the capture runs (both succeed)
    run_exchange(cluster, broker, capture, task_marker, state_marker)
    # Then the capture saw the broker's traffic, complete...
    assert capture.drops == 0
    ports = broker_ports(broker_info(broker))
    assert capture.payload_bytes_to(ports) > 2 * (len(task_marker) + len(state_marker))
    # ...and no marker in it: not in the submit, the dispatch, the result, the state
    # write nor the state read
    assert not capture.holds(task_marker.encode())
    assert not capture.holds(state_marker.encode())
    # (nor the markers' random parts alone, however a codec framed the strings)
    assert not capture.holds(task_marker.split("-", 1)[1].encode())
    assert not capture.holds(state_marker.split("-", 1)[1].encode())
