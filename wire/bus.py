"""Agent messaging: DIRECT headers and the pub/sub bus frames

DIRECT (0x05) moves messages from one peer to another through the broker's ROUTER
(:class:`DirectItem`, :class:`Direct` and :class:`DirectVerdict` above; their decoder is
below). The bus does not go through the broker's loop at all: an XSUB/XPUB forwarder
(``broker/bus.py``) moves frames between publishers and subscribers, and ZeroMQ matches
subscriptions as byte prefixes of frame 0. A bus message is two frames:

    frame 0: topic, UTF-8
    frame 1: msgpack map {"from": publisher id, "seq": int, "data": message}

``seq`` counts a publisher's messages per topic from 1; a subscriber that sees it jump
counts the missing ones as dropped (a queue on the way was full). A probe,
``{"from": id, "probe": int}`` and no ``seq``, is what a subscriber publishes on a topic
it just subscribed to: receiving its own probe proves that the subscription has reached
the forwarder. SDK subscribers swallow probes.

Versions: bus frames carry none, and the bus cannot refuse anything (it has no way back
to a publisher). The version check is the handshake: a peer learns the bus endpoints only
from a WELCOME or STATUS reply, which a peer of another protocol version never gets.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Final, NamedTuple

from wire.codec import new_tuple, pack, unpackb
from wire.errors import DecodeError

#: The first byte of the messages an XPUB receives: subscribe, unsubscribe.
_SUBSCRIBE: Final = 1
_UNSUBSCRIBE: Final = 0

#: Topics the broker publishes on: an agent registered, an agent left (payload
#: ``{"id", "name", "capabilities"}``, plus ``"reason"`` for left), an agent's health
#: changed (plus ``"health"``: healthy, unresponsive or unhealthy, and ``"detail"``), its
#: circuit opened or closed (plus ``"circuit"``), and a task changed state (topic
#: ``tasks.<task id>``, payload ``{"task_id", "state", "attempt", "agent", "at"}``,
#: ``at`` in wall-clock seconds).
BUS_AGENT_JOINED: Final = "agents.joined"
BUS_AGENT_LEFT: Final = "agents.left"
BUS_AGENT_HEALTH: Final = "agents.health"
BUS_AGENT_CIRCUIT: Final = "agents.circuit"
#: A secure broker refused a peer (a key not authorized, a role without the right):
#: ``{"peer", "reason"}``, at most once a minute per peer.
BUS_PEER_REFUSED: Final = "agents.refused"
#: Agent pools changed: ``{"event", "node", ...}`` with event ``node_joined``,
#: ``node_lost``, ``node_returned``, ``scaled`` (plus ``"agent"``, ``"desired"``,
#: ``"nodes"``) or ``crash_loop`` (plus ``"agent"``, ``"detail"``).
BUS_POOL: Final = "agents.pool"
BUS_TASKS_PREFIX: Final = "tasks."
#: The ``from`` of events the broker publishes.
BUS_BROKER_SENDER: Final = "broker"
#: Topic prefixes only the broker publishes on. Its events leave on a socket of its own
#: (the ``events`` endpoint, an XPUB only the broker sends on), never through the
#: shared forwarder, which anyone who reaches it can publish on. So subscribers take
#: these topics from the events socket only and drop them when they come through the
#: forwarder, and the SDK refuses to publish them: an agent cannot forge a broker event.
RESERVED_PREFIXES: Final = ("agents.", "tasks.")
#: The same as bytes, for a check on a topic frame before it is decoded.
RESERVED_PREFIX_BYTES: Final = tuple(p.encode() for p in RESERVED_PREFIXES)


def is_reserved(topic: str) -> bool:
    """Whether ``topic`` is one of the broker's (only the broker publishes it)."""
    return topic.startswith(RESERVED_PREFIXES)


def topic_routes(prefix: str) -> tuple[bool, bool]:
    """Where a subscription to ``prefix`` must listen: (the shared forwarder, the
    broker's events socket). A prefix inside a reserved one (``tasks.t-1``) matches
    broker topics only; one that a reserved prefix starts with (``""``, ``t``) matches
    both kinds; any other only topics of the shared bus."""
    if prefix.startswith(RESERVED_PREFIXES):
        return False, True
    return True, any(reserved.startswith(prefix) for reserved in RESERVED_PREFIXES)


class BusEnvelope(NamedTuple):
    """One decoded bus message. ``probe`` is set (and ``seq`` 0) for probes."""

    topic: str
    sender: str
    seq: int
    data: Any
    probe: int | None = None


def encode_bus(topic: str, sender: str, seq: int, data: Any) -> list[bytes]:
    """The two frames of a bus message.

    Raises:
        TypeError: ``data`` is not msgpack-encodable.
    """
    return [topic.encode(), pack({"from": sender, "seq": seq, "data": data})]


def encode_bus_probe(topic: str, sender: str, token: int) -> list[bytes]:
    """The two frames of a subscription probe (see the section comment)."""
    return [topic.encode(), pack({"from": sender, "probe": token})]


def encode_broker_probe(prefix: bytes) -> list[bytes]:
    """The probe the broker's events socket answers a subscription with: on the
    subscribed prefix itself, so that it reaches the new subscriber (and whoever
    subscribed to a shorter prefix, who swallows it as any probe). Token 0: it answers
    every subscriber of that prefix, not one probe."""
    return [prefix, pack({"from": BUS_BROKER_SENDER, "probe": 0})]


def decode_bus(frames: list[Any]) -> BusEnvelope:
    """Decode the frames of a bus message.

    Raises:
        DecodeError: not two frames, a topic that is not UTF-8, or a bad envelope.
    """
    if len(frames) != 2:
        raise DecodeError(f"a bus message has 2 frames, got {len(frames)}")
    try:
        topic, body = frames
        topic = topic.decode() if type(topic) is bytes else bytes(topic).decode()
        envelope = unpackb(body)
        sender = envelope["from"]
        seq = envelope.get("seq")
        if type(sender) is str and type(seq) is int:
            return new_tuple(BusEnvelope, (topic, sender, seq, envelope.get("data"), None))
        probe = envelope.get("probe")
        if type(sender) is str and type(probe) is int:
            return BusEnvelope(topic, sender, 0, None, probe)
        raise ValueError("the envelope needs a string 'from' and an integer 'seq' or 'probe'")
    except Exception as e:  # noqa: BLE001 - any codec failure is the publisher's bad frame
        raise DecodeError(f"bad bus message: {e}") from e


class PrefixSet:
    """The subscribed prefixes as an XPUB hears them (``b"\\x01prefix"`` subscribes,
    ``b"\\x00prefix"`` unsubscribes), counted so that a repeated subscription needs as
    many unsubscriptions."""

    def __init__(self) -> None:
        self._counts: dict[bytes, int] = {}

    def apply(self, message: bytes) -> bool:
        """Take one (un)subscription message; True when the set of prefixes changed."""
        if not message or message[0] not in (_SUBSCRIBE, _UNSUBSCRIBE):
            return False
        prefix = bytes(message[1:])
        count = self._counts.get(prefix, 0)
        if message[0] == _SUBSCRIBE:
            self._counts[prefix] = count + 1
            return count == 0
        if count <= 1:
            self._counts.pop(prefix, None)
            return count == 1
        self._counts[prefix] = count - 1
        return False

    def clear(self) -> None:
        self._counts.clear()

    def __len__(self) -> int:
        return len(self._counts)

    def __iter__(self) -> Iterator[bytes]:
        return iter(list(self._counts))

    def matches(self, topic: bytes) -> bool:
        """Would a message on ``topic`` reach somebody?"""
        return any(topic.startswith(prefix) for prefix in self._counts)

    def overlapping(self, prefix: bytes) -> list[bytes]:
        """Subscribed prefixes that match some topic starting with ``prefix``."""
        return [p for p in self._counts if p.startswith(prefix) or prefix.startswith(p)]
