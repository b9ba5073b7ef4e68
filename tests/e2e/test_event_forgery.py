"""Broker events cannot be forged (issue 15): a raw ZeroMQ publisher on the shared bus
sending frames on the broker's topics (``tasks.*``, ``agents.*``) never reaches an SDK
subscriber of those topics, while the broker's real events do; plaintext and --secure
(where the forger even holds an authorized agent key).

Real processes (broker, agent); the subscriber is a ``SyncClient`` in the test process,
the forger a raw PUB socket. No sleep: the forger sends its forgeries and then a control
message on an ordinary topic through the same socket, and ZeroMQ keeps one publisher's
messages in order through the forwarder to one subscriber, so once the control message
arrived every forgery before it had arrived too (and was dropped).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq

from agent_sdk import BusMessage, ReservedTopic, WaitTimeout
from broker.security import authorize, authorized_path
from tests.conftest import Cluster
from tests.e2e.test_secure import key_env, new_key
from wire.curve import ClientKeys, apply_client, read_public_key, read_secret_file

#: How long the whole forging (rounds of forgeries and a control message) may take.
FORGE_DEADLINE_S = 20.0
#: How long one round waits for its control message before sending again (the raw PUB
#: drops what it sends before the forwarder passed it the subscriptions: slow joiner).
ROUND_WAIT_S = 0.2
#: How long a real event may take to arrive.
EVENT_WAIT_S = 15.0
CONTROL_TOPIC = "news.control"
FORGED = [("tasks.forged-1", {"task_id": "forged-1", "state": "succeeded", "attempt": 1,
                              "agent": "evil", "at": 0.0}),
          ("agents.health", {"id": "a-1", "name": "echo", "capabilities": ["echo"],
                             "health": "unhealthy", "detail": "forged"}),
          ("agents.joined", {"id": "evil", "name": "evil", "capabilities": ["echo"]})]


def forge_frames(topic: str, data: Any, seq: int) -> list[bytes]:
    """A bus message claiming to be the broker's (``from`` = ``broker``)."""
    return [topic.encode(), msgpack.packb({"from": "broker", "seq": seq, "data": data})]


def raw_publisher(bus_in: str, keys: ClientKeys | None) -> zmq.Socket[Any]:
    """A raw PUB on the forwarder's publisher side, as any peer (or agent key) can open."""
    sock: zmq.Socket[Any] = zmq.Context.instance().socket(zmq.PUB)
    sock.setsockopt(zmq.LINGER, 0)
    if keys is not None:
        apply_client(sock, keys)
    sock.connect(bus_in)
    return sock


def forge_until_control_arrives(pub: zmq.Socket[Any], everything: Any) -> list[BusMessage]:
    """Send the forgeries, then a control message, until a control message arrives on
    ``everything`` (a subscription to ""); returns what arrived there meanwhile."""
    deadline = time.monotonic() + FORGE_DEADLINE_S
    seen: list[BusMessage] = []
    seq = 0
    while time.monotonic() < deadline:
        seq += 1
        for topic, data in FORGED:
            pub.send_multipart(forge_frames(topic, data, seq))
        pub.send_multipart([CONTROL_TOPIC.encode(),
                            msgpack.packb({"from": "raw", "seq": seq, "data": "control"})])
        try:
            while True:
                message = everything.next(timeout=ROUND_WAIT_S)
                seen.append(message)
                if message.topic == CONTROL_TOPIC:
                    return seen
        except WaitTimeout:
            continue  # the forwarder had not passed our PUB the subscriptions yet
    pytest.fail(f"no control message through the bus within {FORGE_DEADLINE_S} s")


def check_no_forgery_arrives(cluster: Cluster, url: str, bus_in: str,
                             forger_keys: ClientKeys | None, agent_env: dict[str, str]) -> None:
    # Given an SDK subscriber of everything, of the task topics and of the agent topics
    client = cluster.client(url)
    everything = client.subscribe("")
    tasks = client.subscribe("tasks.")
    agents = client.subscribe("agents.")
    # When a raw publisher on the shared bus sends frames on the broker's topics, posing
    # as the broker, followed by a control message on an ordinary topic
    pub = raw_publisher(bus_in, forger_keys)
    try:
        seen = forge_until_control_arrives(pub, everything)
    finally:
        pub.close(linger=0)
    # Then the forgeries came through the forwarder to the subscriber (which counted
    # them) but none was delivered, on any subscription
    assert [m.topic for m in seen if m.topic != CONTROL_TOPIC] == []
    assert client.client.messaging.stats().get("bus_forged", 0) >= len(FORGED)
    # And the broker's real events do arrive: an agent joining, a task's states
    cluster.agent(url, **agent_env)
    joined = agents.next(timeout=EVENT_WAIT_S)
    assert (joined.topic, joined.sender, joined.data["name"]) == (
        "agents.joined", "broker", "echo")
    result = client.submit("hi", capabilities=["echo"]).result(timeout=EVENT_WAIT_S)
    assert result.ok, result
    states: list[str] = []
    while not states or states[-1] != "succeeded":
        event = tasks.next(timeout=EVENT_WAIT_S)
        assert event.topic == f"tasks.{result.task_id}", event
        states.append(event.data["state"])
    assert states[0] == "pending"
    # (the subscription to everything gets them too, from the events socket)
    first_real = everything.next(timeout=EVENT_WAIT_S)
    assert first_real.topic in ("agents.joined", f"tasks.{result.task_id}"), first_real
    # And the SDK refuses to publish a broker topic, saying why
    with pytest.raises(ReservedTopic, match="reserved for the broker"):
        client.publish("tasks.mine", {"state": "succeeded"})
    with pytest.raises(ReservedTopic):
        client.publish("agents.health", {})


def test_forged_broker_events_never_reach_a_subscriber(cluster: Cluster) -> None:
    broker = cluster.broker()
    info = json.loads((broker.data_dir / "broker.json").read_text())
    assert info["events"] not in (info["bus_out"], info["bus_in"])
    check_no_forgery_arrives(cluster, broker.url, info["bus_in"], None, {})


def test_forged_broker_events_never_reach_a_subscriber_under_secure(
        cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a secure broker, an authorized agent key (the forger's) and the client using
    # the local admin key
    broker = cluster.broker("--secure")
    keys = broker.data_dir / "keys"
    info = json.loads((broker.data_dir / "broker.json").read_text())
    agent_public, agent_secret = new_key(tmp_path / "agent-keys", "agent")
    authorize(authorized_path(broker.data_dir), agent_public, "agent")
    public, secret = read_secret_file(agent_secret)
    forger = ClientKeys(read_public_key(str(keys / "broker.key")), public, secret)
    for name, value in key_env(keys / "broker.key",
                               keys / "local-admin.key_secret").items():
        monkeypatch.setenv(name, value)
    check_no_forgery_arrives(cluster, broker.url, info["bus_in"], forger,
                             key_env(keys / "broker.key", agent_secret))
