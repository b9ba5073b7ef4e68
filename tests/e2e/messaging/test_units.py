"""Messaging without processes: DIRECT and bus codecs, the prefix set, direct routing
rules and the SDK's bookkeeping (sequence gaps, mailbox overflow, handler replies)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from agent_sdk import MailboxFull, NoSuchAgent, RemoteError
from agent_sdk.messaging import Messenger
from wire.bus import PrefixSet
from broker.engine.direct import DirectRouting
from wire.errors import DecodeError
from wire.bus import BusEnvelope, decode_bus, encode_bus, encode_bus_probe
from wire.codec import packb
from wire.limits import INLINE_PAYLOAD_MAX, SIGNATURE
from wire.tasks import (
    Command, decode, Direct, DIRECT_ASK, DIRECT_BROADCAST, DIRECT_NO_ACK, DirectItem,
    DirectVerdict, encode, Heartbeat,
)
from broker.engine.model import AgentRecord, AgentState
from broker.engine.routing import AgentTable

# ------------------------------------------------------------------ codecs


@pytest.mark.parametrize("msg", [
    Direct([DirectItem("replier", 1, b"\x01")]),
    Direct([DirectItem(b"\x00raw", 7, b"", 3, DIRECT_BROADCAST | DIRECT_ASK | DIRECT_NO_ACK,
                       ("mailbox_full", "no room"), "client-1"),
            DirectItem("big", 8, b"B" * (INLINE_PAYLOAD_MAX + 1))]),
    DirectVerdict([1, 2, 3], [(4, "no_agent", "nobody")]),
    DirectVerdict([], []),
    Heartbeat(stats={"bus_gaps": 3, "mailbox_dropped": 0}),
], ids=lambda m: type(m).__name__)
def test_direct_messages_round_trip(msg: Any) -> None:
    # Given a DIRECT batch, a verdict or a heartbeat with stats
    # When encoded and decoded
    # Then the same message comes back; a large payload travels in a frame of its own
    frames = encode(msg)
    assert decode(frames) == msg
    assert frames[1] == bytes((Command.DIRECT,)) or isinstance(msg, Heartbeat)
    if isinstance(msg, Direct):
        assert len(frames) == 3 + sum(len(i.payload) > INLINE_PAYLOAD_MAX for i in msg.items)


@pytest.mark.parametrize("header, blobs", [
    ([["a", 1, b""]], []),                                 # too short an item
    ([["a", "1", b"", None, 0, None, None]], []),          # id not an integer
    ([["a", 1, 0, None, 0, None, None]], []),              # payload frame missing
    ([[5, 1, b"", None, 0, None, None]], []),              # to not a string
    ([["a", 1, b"", None, "ask", None, None]], []),        # flags not an integer
    ([["a", 1, b"", "re", 0, None, None]], []),            # re not an integer
    ([["a", 1, b"", None, 0, ["x"], None]], []),           # err not [code, message]
    ({"acks": [1, "2"]}, []),                              # ack id not an integer
    ({"errs": [[1, "no_agent"]]}, []),                     # error without its message
    ("items", []),                                         # neither a batch nor a verdict
], ids=lambda v: repr(v)[:40])
def test_bad_direct_headers_are_bad_frames(header: Any, blobs: list[bytes]) -> None:
    # Given a DIRECT with a malformed header
    frames = [SIGNATURE, bytes((Command.DIRECT,)), packb(header), *blobs]
    # When decoded
    # Then it is refused as bad_frame
    with pytest.raises(DecodeError) as info:
        decode(frames)
    assert info.value.code == "bad_frame"


def test_bus_frames_round_trip_and_reject_garbage() -> None:
    # Given a bus message and a probe
    message = encode_bus("tasks.t-1", "broker", 7, {"state": "running"})
    probe = encode_bus_probe("news", "agent-1", 42)
    # When decoded
    # Then topic, sender, sequence and data (or the probe token) come back
    assert message[0] == b"tasks.t-1"
    assert decode_bus(message) == BusEnvelope("tasks.t-1", "broker", 7, {"state": "running"})
    assert decode_bus(probe) == BusEnvelope("news", "agent-1", 0, None, 42)
    # And malformed frames are decode errors
    for frames in ([b"t"], [b"t", b"\xc1"], [b"t", packb([1])], [b"t", packb({"from": "a"})],
                   [b"\xff", packb({"from": "a", "seq": 1})]):
        with pytest.raises(DecodeError):
            decode_bus(frames)


# ------------------------------------------------------------------ broker side


def test_prefix_set_counts_subscriptions_and_matches_prefixes() -> None:
    # Given the subscriptions an XPUB hears
    prefixes = PrefixSet()
    assert prefixes.apply(b"\x01tasks.")
    assert not prefixes.apply(b"\x01tasks.")       # a second subscriber to the same prefix
    assert prefixes.apply(b"\x01agents.joined")
    # Then topics match by prefix, and overlapping() finds what could match a family
    assert prefixes.matches(b"tasks.t-1") and not prefixes.matches(b"agents.left")
    assert sorted(prefixes.overlapping(b"tasks.")) == [b"tasks."]
    assert sorted(prefixes.overlapping(b"agents.")) == [b"agents.joined"]
    # When one of the two subscribers to "tasks." leaves, it stays; when both, it goes
    assert not prefixes.apply(b"\x00tasks.")
    assert prefixes.matches(b"tasks.t-1")
    assert prefixes.apply(b"\x00tasks.")
    assert not prefixes.matches(b"tasks.t-1")
    assert not prefixes.apply(b"\x02junk") and len(prefixes) == 1


def _agent(identity: str, name: str, state: AgentState = AgentState.READY) -> AgentRecord:
    return AgentRecord(identity.encode(), identity, name, frozenset(), 1, 0.0, 0.0, 0.0, state)


def test_direct_routing_resolves_ids_names_and_refuses_departed_agents() -> None:
    # Given two instances of "worker" (one draining) and one of "solo"
    table = AgentTable()
    for agent in (_agent("w-1", "worker"), _agent("w-2", "worker"),
                  _agent("w-3", "worker", AgentState.DRAINING), _agent("s-1", "solo")):
        table.add(agent)
    routing = DirectRouting(table)
    # Then an id names its agent, and a name takes turns over its ready instances only
    assert [a.agent_id for a in routing.resolve("w-3", False)] == ["w-3"]
    turns = [routing.resolve("worker", False)[0].agent_id for _ in range(4)]
    assert turns == ["w-1", "w-2", "w-1", "w-2"]
    # And broadcast takes every ready instance; an unknown name is "not an agent"
    assert sorted(a.agent_id for a in routing.resolve("worker", True)) == ["w-1", "w-2"]
    assert routing.resolve("client-9", False) is None
    # When the ready workers leave, the draining one takes messages to the name
    table.remove(b"w-1")
    table.remove(b"w-2")
    routing.departed(b"w-1", "dead")
    assert [a.agent_id for a in routing.resolve("worker", False)] == ["w-3"]
    # And a departed agent's id is refused until it registers again
    assert routing.refusal(b"w-1") == "dead"
    routing.rejoined(b"w-1")
    assert routing.refusal(b"w-1") is None


def test_direct_routing_batches_one_verdict_per_sender() -> None:
    routing = DirectRouting(AgentTable())
    routing.ack(b"a", 1)
    routing.ack(b"a", 2)
    routing.error(b"a", 3, "no_agent", "nobody")
    routing.error(b"b", 1, "mailbox_full", "lagging")
    verdicts = dict(routing.take_verdicts())
    assert verdicts == {b"a": DirectVerdict([1, 2], [(3, "no_agent", "nobody")]),
                        b"b": DirectVerdict([], [(1, "mailbox_full", "lagging")])}
    assert not routing.has_verdicts
    assert routing.counters == {"no_agent": 1, "mailbox_full": 1}


# ------------------------------------------------------------------ SDK bookkeeping


class Wire:
    """Stands in for the broker connection: records what the messenger sends."""

    def __init__(self) -> None:
        self.sent: list[Any] = []

    def send(self, msg: Any) -> None:
        self.sent.append(msg)

    async def endpoints(self) -> dict[str, str]:
        return {}


def _messenger(wire: Wire, mailbox_size: int = 10) -> Messenger:
    return Messenger(lambda: "me", wire.send, wire.endpoints, mailbox_size=mailbox_size)


def _incoming(msg_id: int, data: Any, flags: int = 0, reply_to: int | None = None,
              error: tuple[str, str] | None = None) -> Direct:
    return Direct([DirectItem("me", msg_id, packb(data), reply_to, flags, error, "peer")])


def _sent_items(wire: Wire, messenger: Messenger) -> list[DirectItem]:
    """What the messenger sent, once it flushed (it does so at the end of each loop
    iteration; the tests do not wait for that)."""
    messenger._flush()
    return [item for msg in wire.sent for item in msg.items]


def test_subscriber_counts_sequence_gaps_per_publisher_and_topic() -> None:
    async def scenario() -> None:
        messenger = _messenger(Wire())
        subscription = messenger.subscribe("news")
        # Given messages from two publishers, the first seen of each stream at any number
        for sender, seq in [("p1", 5), ("p1", 6), ("p2", 1), ("p1", 9), ("p2", 2), ("p1", 10)]:
            messenger._on_bus_frames(encode_bus("news.a", sender, seq, seq))
        # A probe of someone else is swallowed, and so is a topic we did not subscribe to
        messenger._on_bus_frames(encode_bus_probe("news", "p1", 1))
        # Then only the jump 6 -> 9 counts: two messages lost
        assert messenger.counters["bus_gaps"] == 2
        assert messenger.counters["bus_received"] == 6
        assert [(await subscription.next(1)).seq for _ in range(6)] == [5, 6, 1, 9, 2, 10]

    asyncio.run(scenario())


def test_full_mailbox_drops_and_answers_requests_with_mailbox_full() -> None:
    async def scenario() -> None:
        wire = Wire()
        messenger = _messenger(wire, mailbox_size=2)
        # Given a mailbox of 2 that nobody reads, and four messages, the last a request
        for msg_id in (1, 2, 3):
            messenger.on_direct(_incoming(msg_id, msg_id))
        messenger.on_direct(_incoming(4, "?", DIRECT_ASK))
        # Then two were dropped and counted, and the request was answered with an error
        assert messenger.counters["mailbox_dropped"] == 2
        (answer,) = _sent_items(wire, messenger)
        assert (answer.to, answer.reply_to, answer.error[0]) == ("peer", 4, "mailbox_full")
        assert [(await messenger.receive(1)).data for _ in range(2)] == [1, 2]

    asyncio.run(scenario())


def test_handlers_answer_requests_and_errors_become_remote_errors() -> None:
    async def scenario() -> None:
        wire = Wire()
        messenger = _messenger(wire)

        async def double(message: Any) -> Any:
            if message.data == "boom":
                raise KeyError("boom")
            return message.data * 2

        messenger.on_message(double)
        # Given two requests to an async handler, one of which makes it raise
        messenger.on_direct(_incoming(1, 21, DIRECT_ASK))
        messenger.on_direct(_incoming(2, "boom", DIRECT_ASK))
        await asyncio.gather(*messenger._tasks)
        # Then the first is answered with the handler's value, the second with agent_error
        replies = {m.reply_to: m for m in _sent_items(wire, messenger)}
        assert replies[1].error is None and replies[1].payload == packb(42)
        assert replies[2].error[0] == "agent_error" and "KeyError" in replies[2].error[1]
        # And on the requesting side, such replies and the broker's verdicts become
        # results and exceptions of the right type
        loop = asyncio.get_running_loop()
        for reply_to, error, expected in [(10, None, 42), (11, ("agent_error", "x"), RemoteError),
                                          (12, ("mailbox_full", "x"), MailboxFull)]:
            future = messenger._replies[reply_to] = loop.create_future()
            messenger.on_direct(_incoming(99, 42, DIRECT_NO_ACK, reply_to, error))
            if expected == 42:
                assert future.result() == 42
            else:
                assert isinstance(future.exception(), expected)
        sent = messenger.send_nowait("nobody", 1)
        (item,) = _sent_items(wire, messenger)[-1:]
        assert item.to == "nobody" and item.flags == 0
        messenger.on_verdict(DirectVerdict([], [(item.msg_id, "no_agent", "none")]))
        assert isinstance(sent.exception(), NoSuchAgent)

    asyncio.run(scenario())
