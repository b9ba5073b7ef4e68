"""Live fuzzing (issue 15, security): a running broker, its state service and its bus
take thousands of generated frame sequences from raw sockets, then still do their work.

Each test starts a broker (with its state service and bus) and an echo agent, and sends
:data:`COUNT` generated messages to one of the three entry points from bare ZeroMQ
sockets that nobody registered: random multipart messages, messages with a plausible
outside (the ``ORCH5`` signature or a wrong one, a command byte, a msgpack header), and
valid messages mutated (:func:`tests.wire.test_fuzz_decoders.mutate`: truncated, bytes
flipped, elements added, dropped or replaced with huge or negative integers, nan, wrong
types, deep nesting), from routing ids that change as it goes. Valid messages are among
them, so that fuzz agents register, fuzz tasks queue and fuzz sessions hold locks, and
the mutated messages after them reach the engine's deeper paths.

Afterwards: every process is alive, the broker logged no error (a handler that raised
logs one), and a normal task runs end to end, a state set/get works and a bus message
published is received.

The generator is a ``random.Random`` seeded from ``ORCH_FUZZ_SEED`` or at random; the
seed is in every assertion message (and printed), so that a failure reproduces with
``ORCH_FUZZ_SEED=<seed>``. ``ORCH_FUZZ_LONG=1`` sends :data:`LONG_COUNT` messages per
entry point instead of :data:`CI_COUNT`.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import zmq

from agent_sdk import SyncClient, SyncStateClient, WaitTimeout
from tests.conftest import BrokerProcess, Cluster
from tests.support import agents_by_name, wait_status
from tests.wire.test_fuzz_decoders import HOSTILE, RAW_HEADERS, mutate
from tests.wire.test_protocol import EVERY_MESSAGE, EVERY_STATE_MESSAGE
from wire.codec import packb
from wire.errors import DecodeError
from wire.limits import SIGNATURE
from wire.logs import LOG_SUFFIX, LOGS_DIR
from wire.state import (
    LockAcquire, LockList, LockRelease, LockRenew, StateCommand, StateDelete, StateGet,
    StateHello, StateInfoRequest, StateList, StatePing, StatePut, StateUnwatch, StateWatch,
    decode_state, encode_state,
)
from wire.tasks import (
    Cancel, Command, Direct, DirectItem, Disconnect, Fetch, Heartbeat, Pong, Progress,
    Read, Ready, Release, ResultItem, Results, StatusRequest, Submit, TaskQuery, TaskSpec,
    decode, encode,
)

#: Messages per entry point: in CI, and with ``ORCH_FUZZ_LONG=1``.
CI_COUNT = 500
LONG_COUNT = 10_000
COUNT = LONG_COUNT if os.environ.get("ORCH_FUZZ_LONG") == "1" else CI_COUNT
#: Raw sockets sending at once, and the chance that one is replaced by a socket with a
#: new routing id before a message.
SOCKETS = 6
NEW_IDENTITY_CHANCE = 0.05
#: Deadline of every wait: a send into a full pipe, a reply, a subscription.
WAIT_S = 20.0
#: The capability of the fuzz's own agents and tasks; the checks use their own agent
#: name, so that a fuzz agent (which never answers) cannot take the check's task.
FUZZ_CAP = "fuzz-cap"
CHECK_AGENT = "fuzz-check-echo"
#: Task ids, agent names and state keys the valid messages share, so that they meet:
#: a RESULT for a task a fuzz SUBMIT queued, a RELEASE of a lock a fuzz ACQUIRE took.
IDS = [f"fz-{i}" for i in range(8)]
AGENTS = [f"fz-agent-{i}" for i in range(4)]
KEYS = [f"fz/{i}" for i in range(6)]
#: The bus prefix the check subscribes to, and the topics the fuzz publishes on.
BUS_PREFIX = "fuzz"


def fuzz_seed() -> int:
    """``ORCH_FUZZ_SEED`` when set (to reproduce a failure), else a random seed."""
    raw = os.environ.get("ORCH_FUZZ_SEED")
    return int(raw) if raw else random.SystemRandom().randrange(2 ** 32)


# ------------------------------------------------------------------ generators


def random_value(rnd: random.Random, depth: int = 0) -> Any:
    """A random msgpack value, containers included (at most 3 levels)."""
    roll = rnd.random()
    if depth < 3 and roll < 0.15:
        return [random_value(rnd, depth + 1) for _ in range(rnd.randint(0, 5))]
    if depth < 3 and roll < 0.3:
        return {rnd.choice(["req", "id", "key", "ids", "caps", "name", "x", ""]):
                random_value(rnd, depth + 1) for _ in range(rnd.randint(0, 5))}
    if roll < 0.6:
        return rnd.choice(HOSTILE)
    if roll < 0.75:
        return rnd.randint(-(2 ** 63), 2 ** 64 - 1)
    if roll < 0.9:
        return rnd.choice([*IDS, *KEYS, *AGENTS, FUZZ_CAP, ""])
    return rnd.randbytes(rnd.randint(0, 24))


def random_frames(rnd: random.Random, commands: list[int]) -> list[bytes]:
    """Random bytes, or a plausible outside (signature, command, header, blobs)."""
    if rnd.random() < 0.35:
        return [rnd.randbytes(rnd.randint(0, 48)) for _ in range(rnd.randint(1, 6))]
    signature = SIGNATURE if rnd.random() < 0.75 else rnd.choice(
        [b"ORCH4", b"ORCH6", b"ORCH", b"", b"ORCH5 ", rnd.randbytes(5)])
    command = bytes((rnd.choice(commands) if rnd.random() < 0.85 else rnd.getrandbits(8),))
    roll = rnd.random()
    if roll < 0.7:
        header = packb(random_value(rnd))
    elif roll < 0.85:
        header = rnd.choice(RAW_HEADERS)
    else:
        header = rnd.randbytes(rnd.randint(0, 32))
    blobs = [rnd.randbytes(rnd.randint(0, 16)) for _ in range(rnd.choice([0, 0, 0, 1, 2]))]
    return [signature, command, header, *blobs]


def task_message(rnd: random.Random) -> Any:
    """A valid message of the task protocol, on the shared ids and names."""
    tid, agent = rnd.choice(IDS), rnd.choice(AGENTS)
    req = rnd.randrange(1000)
    makers: list[Callable[[], Any]] = [
        lambda: Ready(agent, agent, (FUZZ_CAP,), rnd.randint(1, 4)),
        lambda: Heartbeat(),
        lambda: Heartbeat(role="client"),
        lambda: Submit([TaskSpec(tid, packb({"i": rnd.random()}), (FUZZ_CAP,), None,
                                 rnd.randint(-3, 3), rnd.choice([None, 30.0, 0.01]),
                                 rnd.choice([None, 0, 2]))]),
        lambda: Results([ResultItem(tid, rnd.choice(["succeeded", "failed"]), b"\x90",
                                    *rnd.choice([(None, None), ("agent_error", "boom")]))]),
        lambda: Progress([tid], [tid]),
        lambda: Cancel([tid]),
        lambda: Fetch(req, [tid], wait=rnd.random() < 0.5),
        lambda: StatusRequest(req),
        lambda: StatusRequest(req, {"agents": 1, "capability": [FUZZ_CAP]}, 0.05),
        lambda: TaskQuery(req, None, 5, [tid]),
        lambda: Read(req, tid, 0, 64),
        lambda: Release([tid]),
        lambda: Direct([DirectItem(agent, req, b"\x90")]),
        lambda: Pong(rnd.randrange(8), rnd.random() < 0.5),
        lambda: Disconnect(rnd.choice(["bye", "draining"])),
        lambda: rnd.choice(EVERY_MESSAGE),
    ]
    return rnd.choice(makers)()


def task_frames(rnd: random.Random) -> list[bytes]:
    """One generated message for the broker's ROUTER."""
    roll = rnd.random()
    if roll < 0.3:
        return random_frames(rnd, [int(c) for c in Command])
    frames = [bytes(f) for f in encode(task_message(rnd))]
    return frames if roll < 0.45 else mutate(frames, rnd)


def state_message(rnd: random.Random) -> Any:
    """A valid message of the state protocol, on the shared keys."""
    key, req = rnd.choice(KEYS), rnd.randrange(1000)
    makers: list[Callable[[], Any]] = [
        lambda: StateHello(req, "fuzz"),
        lambda: StatePing(),
        lambda: StateGet(req, key),
        lambda: StatePut(req, key, packb(rnd.random()), rnd.choice([None, 0, 1, 2]),
                         rnd.choice([None, 0.05, 30.0])),
        lambda: StateDelete(req, key, rnd.choice([None, 1])),
        lambda: StateList(req, "fz/", None, rnd.randint(1, 5)),
        lambda: LockAcquire(req, key, rnd.choice([0.05, 5.0]), rnd.choice([0.0, 0.05])),
        lambda: LockRenew(req, key, rnd.randint(0, 5), 1.0),
        lambda: LockRelease(req, key, rnd.randint(0, 5)),
        lambda: StateWatch(req, "fz/", rnd.choice([None, 0])),
        lambda: StateUnwatch(req, rnd.randrange(1000)),
        lambda: LockList(req, "fz/"),
        lambda: StateInfoRequest(req),
        lambda: rnd.choice(EVERY_STATE_MESSAGE),
    ]
    return rnd.choice(makers)()


def state_frames(rnd: random.Random) -> list[bytes]:
    """One generated message for the state service's ROUTER."""
    roll = rnd.random()
    if roll < 0.3:
        return random_frames(rnd, [int(c) for c in StateCommand])
    frames = [bytes(f) for f in encode_state(state_message(rnd))]
    return frames if roll < 0.45 else mutate(frames, rnd)


def bus_frames(rnd: random.Random) -> list[bytes]:
    """One generated message for the bus forwarder's XSUB: mostly on topics the check's
    subscriber receives (so that the SDK decodes them), some anywhere."""
    topic = (BUS_PREFIX.encode() if rnd.random() < 0.8 else b"") + rnd.randbytes(
        rnd.randint(0, 6))
    roll = rnd.random()
    if roll < 0.25:
        # On a few topics only, so that streams (sender, topic) repeat and their
        # sequence numbers jump
        # (seq jumps by up to 2^64 between two messages of one stream: what the
        # subscribers count as lost must stay a number they can report)
        envelope = {"from": rnd.choice(["p", "p", 1, None]),
                    "seq": rnd.choice([1, -1, -(2 ** 63), 2 ** 64 - 1, "1", None]),
                    "data": random_value(rnd)}
        return [rnd.choice([b"fuzz", b"fuzz.a", topic]), packb(envelope)]
    if roll < 0.45:
        envelope = {"from": "p", rnd.choice(["seq", "probe"]): rnd.randint(0, 100),
                    "data": random_value(rnd)}
        return [topic, packb(mutate_map(envelope, rnd))]
    if roll < 0.6:
        return [topic, rnd.choice(RAW_HEADERS)]
    if roll < 0.8:
        return [topic, packb(random_value(rnd))]
    return [topic, *(rnd.randbytes(rnd.randint(0, 24)) for _ in range(rnd.randint(0, 3)))]


def mutate_map(envelope: dict[str, Any], rnd: random.Random) -> dict[str, Any]:
    """``envelope`` with one value made hostile (or left valid, a third of the time)."""
    if rnd.random() < 0.66:
        envelope[rnd.choice(list(envelope))] = rnd.choice(HOSTILE)
    return envelope


# ------------------------------------------------------------------ raw sockets


#: Request ids of the sync round trips, far above the ones the fuzz uses.
SYNC_REQ_BASE = 1 << 40


def sync_broker(req: int) -> list[bytes]:
    """The frames of a STATUS request (answered whoever sends it)."""
    return encode(StatusRequest(req))


def sync_state(req: int) -> list[bytes]:
    """The frames of an INFO request (answered, or refused with its req, by any state
    service whatever the session)."""
    return encode_state(StateInfoRequest(req))


def answers(frames: list[bytes], req: int, decoder: Callable[[list[Any]], Any]) -> bool:
    """Whether ``frames`` (from the service) are the reply to request ``req``."""
    try:
        return getattr(decoder(frames), "req", None) == req
    except DecodeError:
        return False


class RawSenders:
    """:data:`SOCKETS` raw DEALER sockets connected to ``url``, one replaced now and then
    by a socket with a fresh routing id.

    A socket is closed only after a sync round trip (a request whose reply comes after
    everything sent before it on that connection): closing drops what libzmq has not
    sent yet, and then the fuzz would be shorter than it says. Replies are read and
    dropped as they come, so that the service's pipes to us never fill up.
    """

    def __init__(self, url: str, rnd: random.Random, seed: int,
                 sync: Callable[[int], list[bytes]],
                 decoder: Callable[[list[Any]], Any]) -> None:
        self.url, self.rnd, self.seed = url, rnd, seed
        self.sync_frames, self.decoder = sync, decoder
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        #: every routing id used: two open sockets with one id would hand the first one's
        #: connection over to the second (ROUTER_HANDOVER), and its sync reply with it
        self.identities: set[bytes] = set()
        self.sockets = [self._socket() for _ in range(SOCKETS)]
        self.sent = 0
        self.received = 0
        self.syncs = 0

    def _socket(self) -> zmq.Socket[bytes]:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if self.rnd.random() < 0.8:
            # 1..41 bytes, a new one (a leading zero byte is libzmq's own: the ids it
            # makes up for the other 20%)
            identity = b""
            while not identity or identity in self.identities:
                identity = bytes((self.rnd.randint(1, 255),)) + self.rnd.randbytes(
                    self.rnd.randint(0, 40))
            self.identities.add(identity)
            sock.setsockopt(zmq.ROUTING_ID, identity)
        sock.connect(self.url)
        return sock

    def send(self, frames: list[bytes]) -> None:
        """Send ``frames`` from one of the sockets; a pipe that stays full for
        :data:`WAIT_S` fails the test (the service stopped reading)."""
        if self.rnd.random() < NEW_IDENTITY_CHANCE:
            i = self.rnd.randrange(SOCKETS)
            self.sync(self.sockets[i])
            self.sockets[i].close(linger=0)
            self.sockets[i] = self._socket()
        self._send(self.rnd.choice(self.sockets), frames or [b""])  # >= 1 frame
        self.sent += 1
        if self.sent % 50 == 0:
            self.drain()

    def _send(self, sock: zmq.Socket[bytes], frames: list[bytes]) -> None:
        deadline = time.monotonic() + WAIT_S
        while True:
            try:
                sock.send_multipart(frames, zmq.NOBLOCK)
                return
            except zmq.Again:
                self.drain()
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"the service stopped reading (seed {self.seed})"
                sock.poll(min(100, int(remaining * 1000)), zmq.POLLOUT)

    def sync(self, sock: zmq.Socket[bytes]) -> None:
        """A round trip on ``sock``: once its reply is in, the service has read
        everything sent before on that connection."""
        self.syncs += 1
        req = SYNC_REQ_BASE + self.syncs
        self._send(sock, self.sync_frames(req))
        deadline = time.monotonic() + WAIT_S
        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0 and sock.poll(int(remaining * 1000)), \
                f"no reply to a sync request within {WAIT_S:g} s (seed {self.seed})"
            self.received += 1
            if answers(sock.recv_multipart(), req, self.decoder):
                return

    def drain(self) -> None:
        """Read whatever the service sent back (errors, replies, pings) and drop it."""
        for sock in self.sockets:
            while sock.poll(0):
                sock.recv_multipart()
                self.received += 1

    def close(self) -> None:
        """Sync every socket, then close them all."""
        try:
            for sock in self.sockets:
                self.sync(sock)
        finally:
            for sock in self.sockets:
                sock.close(linger=0)
            self.ctx.term()


# ------------------------------------------------------------------ the cluster under fuzz


@dataclass
class Target:
    """A broker (state service and bus included) with an echo agent, and its endpoints."""

    cluster: Cluster
    broker: BrokerProcess
    agent: Any
    endpoints: dict[str, str]
    seed: int
    rnd: random.Random

    def alive(self) -> None:
        assert self.broker.proc.poll() is None, f"the broker died (seed {self.seed})"
        assert self.agent.poll() is None, f"the echo agent died (seed {self.seed})"

    def errors_logged(self) -> list[str]:
        """The broker's log lines at ERROR or above (a handler that raised logs one)."""
        path = self.broker.data_dir / LOGS_DIR / f"broker{LOG_SUFFIX}"
        lines = path.read_text().splitlines() if path.exists() else []
        return [line for line in lines
                if json.loads(line).get("level") in ("ERROR", "CRITICAL")]


@pytest.fixture
def target(cluster: Cluster) -> Iterator[Target]:
    seed = fuzz_seed()
    print(f"fuzz seed {seed} (ORCH_FUZZ_SEED={seed} reproduces it)")
    broker = cluster.broker()
    agent = cluster.agent(broker.url, agent_name=CHECK_AGENT)
    endpoints = json.loads((broker.data_dir / "broker.json").read_bytes())
    yield Target(cluster, broker, agent, endpoints, seed, random.Random(seed))


def check_everything_works(t: Target, subscription: Any, client: SyncClient) -> None:
    """After the fuzz: processes alive, no error logged, and a task, a state set/get and
    a bus message go through."""
    t.alive()
    # A normal task, end to end, on the check's agent
    handle = client.submit(capabilities=["echo"], agent=CHECK_AGENT, data={"n": t.seed},
                           timeout=WAIT_S)
    result = handle.result(timeout=WAIT_S)
    assert result.ok and result.data == {"n": t.seed}, (result, t.seed)
    # A state set and get
    with SyncStateClient(t.endpoints["state"], request_timeout_s=WAIT_S) as state:
        state.set("fuzz-check/after", {"seed": t.seed})
        assert state.get("fuzz-check/after") == {"seed": t.seed}
    # A bus message, published until it arrives (the subscriber's queue may still hold
    # fuzz messages, and a queue on the way may have been full when it was published)
    marker = {"check": t.seed}
    deadline = time.monotonic() + WAIT_S
    client.wait_for_subscribers(f"{BUS_PREFIX}.check", timeout=WAIT_S)
    seen = False
    while not seen:
        assert time.monotonic() < deadline, f"no bus message after the fuzz (seed {t.seed})"
        client.publish(f"{BUS_PREFIX}.check", marker)
        try:
            while not seen:
                message = subscription.next(timeout=1.0)
                seen = message.topic == f"{BUS_PREFIX}.check" and message.data == marker
        except WaitTimeout:
            continue  # nothing more queued: publish again
    t.alive()
    status = client.status(timeout=WAIT_S)
    print(f"refusals counted by the broker: {status['errors']}")
    assert status["errors"].get("internal_error", 0) == 0, (status["errors"], t.seed)
    assert t.errors_logged() == [], f"the broker logged errors (seed {t.seed})"


def fuzz(t: Target, url: str, generate: Callable[[random.Random], list[bytes]],
         sync: Callable[[int], list[bytes]],
         decoder: Callable[[list[Any]], Any]) -> RawSenders:
    """Send :data:`COUNT` generated messages to ``url`` from raw DEALER sockets."""
    senders = RawSenders(url, t.rnd, t.seed, sync, decoder)
    try:
        for _ in range(COUNT):
            senders.send(generate(t.rnd))
    finally:
        senders.close()
    print(f"sent {senders.sent} messages to {url}, read {senders.received} replies")
    return senders


# ------------------------------------------------------------------ the tests


def test_the_broker_router_survives_fuzzed_messages(target: Target) -> None:
    # Given a broker, its echo agent, and a client subscribed on the bus
    client = target.cluster.client(target.broker.url)
    subscription = client.subscribe(BUS_PREFIX, timeout=WAIT_S)
    # When raw DEALER sockets send it COUNT generated messages
    senders = fuzz(target, target.broker.url, task_frames, sync_broker, decode)
    assert senders.sent == COUNT
    # Then everything still works
    check_everything_works(target, subscription, client)


def test_the_state_service_survives_fuzzed_messages(target: Target) -> None:
    # Given a broker with its state service, and a client
    client = target.cluster.client(target.broker.url)
    subscription = client.subscribe(BUS_PREFIX, timeout=WAIT_S)
    # When raw DEALER sockets send the state service COUNT generated messages
    senders = fuzz(target, target.endpoints["state"], state_frames, sync_state, decode_state)
    # Then it answered (refusals included), and everything still works
    assert senders.sent == COUNT and senders.received > 0, target.seed
    check_everything_works(target, subscription, client)


def sync_through_bus(publisher: zmq.Socket[bytes], subscriber: zmq.Socket[bytes],
                     seed: int) -> None:
    """Publish a marker on ``publisher`` until ``subscriber`` receives it (it is
    published again while a queue on the way drops it)."""
    marker = [b"zz-sync", packb({"from": "raw", "seq": 1, "data": seed})]
    deadline = time.monotonic() + WAIT_S
    while True:
        assert time.monotonic() < deadline, f"the bus forwarder passes nothing (seed {seed})"
        publisher.send_multipart(marker)
        while subscriber.poll(200):
            if subscriber.recv_multipart() == marker:
                return


def test_the_bus_survives_fuzzed_publications(target: Target) -> None:
    # Given a client and an agent subscribed to the fuzz topics through the SDK (the
    # agent's task answers once its subscription is confirmed), and a raw subscriber to
    # everything (so that the forwarder passes every topic on)
    client = target.cluster.client(target.broker.url)
    subscription = client.subscribe(BUS_PREFIX, timeout=WAIT_S)
    subscriber = target.cluster.agent(target.broker.url, "tests.e2e.fuzz_agents:FuzzSubscriber",
                                      agent_name="fuzz-sub", sub_topic=BUS_PREFIX)
    client.submit(capabilities=["fuzz-sub"], timeout=WAIT_S).result(timeout=WAIT_S)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    everything = ctx.socket(zmq.SUB)
    everything.setsockopt(zmq.LINGER, 0)
    everything.setsockopt(zmq.SUBSCRIBE, b"")
    everything.connect(target.endpoints["bus_out"])
    try:
        # And a raw publisher (an XPUB, to see that the subscriptions reached it)
        publisher = ctx.socket(zmq.XPUB)
        publisher.setsockopt(zmq.LINGER, 0)
        publisher.connect(target.endpoints["bus_in"])
        try:
            deadline = time.monotonic() + WAIT_S
            heard: set[bytes] = set()
            while b"\x01" not in heard:
                remaining = deadline - time.monotonic()
                assert remaining > 0 and publisher.poll(int(remaining * 1000)), \
                    f"the subscriptions never reached the raw publisher: {heard}"
                heard.add(publisher.recv())
            # When it publishes COUNT generated messages
            for i in range(COUNT):
                publisher.send_multipart(bus_frames(target.rnd))
                if i % 100 == 0:
                    while everything.poll(0):  # keep the raw subscriber's queue short
                        everything.recv_multipart()
            # (and they all left: a marker published after them reached the forwarder's
            # other side; closing the publisher earlier would drop what it still queues)
            sync_through_bus(publisher, everything, target.seed)
        finally:
            publisher.close(linger=0)
    finally:
        everything.close(linger=0)
        ctx.term()
    # Then the SDK subscriber, the forwarder and the broker still work
    check_everything_works(target, subscription, client)
    # And the subscribers did see the fuzz: they dropped what they could not decode
    stats = client.client.messaging.stats()
    print(f"the client's bus counters: {stats}")
    assert stats.get("bus_undecodable", 0) > 0, (stats, target.seed)
    # And the agent is alive and still heartbeats: its counters, changed by the fuzz,
    # reach the broker (a counter past 64 bits once made every heartbeat raise)
    status = wait_status(client, lambda s: agents_by_name(s)["fuzz-sub"]["messaging"].get(
        "bus_undecodable", 0) > 0, timeout=WAIT_S, what="the subscriber agent reports")
    print(f"the agent's bus counters: {agents_by_name(status)['fuzz-sub']['messaging']}")
    assert subscriber.poll() is None, f"the subscriber agent died (seed {target.seed})"
