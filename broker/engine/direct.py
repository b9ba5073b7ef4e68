"""Direct messages between peers: whom a DIRECT goes to, and what the sender is told.

The engine holds no socket: forwarded messages leave through a :class:`Forwarder` (the
broker's socket loop), which says at once whether each receiver took them; this module
holds the rules:

- ``to`` names an agent id: that agent. An agent name: one live instance, in turn
  (round-robin), or every live instance with ``broadcast``. Instances that are draining
  still receive messages, but only when no ready instance is left.
- Anything else is tried as a raw routing id (a client's ``client_id`` is its routing
  id); ROUTER_MANDATORY makes a send to nobody fail, and the sender gets ``no_agent``.
- An agent that left (dead, unreachable, disconnected) is refused by its id as well,
  even while its TCP connection lingers (a stopped process): the broker declared it gone.
- Each pass, every sender gets one DIRECT verdict: the ids handed to receivers' queues
  (``acks``) and the ones that were not (``errs``).
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from typing import Any, Final, Protocol

from broker.engine.ledger import Ledger
from broker.engine.model import AgentRecord, AgentState
from broker.engine.routing import AgentTable
from wire.codec import chunks
from wire.tasks import (
    DIRECT_BROADCAST, DIRECT_NO_ACK, Direct, DirectItem, DirectVerdict, ErrorCode, encode,
)

#: Direct messages queued in the broker for one receiver whose connection is full, on top
#: of the socket's own queue (``send_hwm``); beyond this the sender gets ``mailbox_full``.
DIRECT_BACKLOG_LIMIT: Final = 1000
#: Agents that left, remembered so that messages to them are refused (oldest forgotten).
DEPARTED_MEMORY: Final = 10_000


_NO_AGENT: Final = ErrorCode.NO_AGENT.value
_MAILBOX_FULL: Final = ErrorCode.MAILBOX_FULL.value
#: A direct message's outcome until one of its receivers took it.
_UNDELIVERED: Final = ("", "")
_new_tuple = tuple.__new__


class Forwarder(Protocol):
    """How direct messages leave: at once, in order behind what already waits for the
    receiver, so that the sender's verdict can say whether the receiver took them."""

    def forward(self, receiver: bytes, messages: list[list[Any]], backlog_limit: int
                ) -> str | None:
        """Send ``messages`` to ``receiver`` now, or queue them behind its backlog.

        Returns:
            None when sent or queued; ``mailbox_full`` when the receiver's backlog would
            pass ``backlog_limit``; ``no_agent`` when the receiver is not connected.
        """
        ...


class DirectRouting:
    """Resolves DIRECT targets and collects the verdicts owed to senders.

    Args:
        agents: the broker's agent table (read only; the name index follows its
            ``version``).
    """

    def __init__(self, agents: AgentTable) -> None:
        self._agents = agents
        self._version = -1
        self._by_id: dict[str, AgentRecord] = {}
        self._by_name: dict[str, list[AgentRecord]] = {}
        self._turns: dict[str, int] = {}
        self._departed: OrderedDict[bytes, str] = OrderedDict()
        self._acks: dict[bytes, list[int]] = {}
        self._errors: dict[bytes, list[tuple[int, str, str]]] = {}
        self.counters: Counter[str] = Counter()

    # ------------------------------------------------------------------ targets

    def _refresh(self) -> None:
        if self._version == self._agents.version:
            return
        self._version = self._agents.version
        self._by_id = {}
        self._by_name = {}
        for agent in self._agents:
            self._by_id[agent.agent_id] = agent
            self._by_name.setdefault(agent.name, []).append(agent)

    def resolve(self, to: str | bytes, broadcast: bool) -> list[AgentRecord] | None:
        """The agents a message to ``to`` goes to: ``[]`` when ``to`` names agents but
        none is live, None when ``to`` is no agent id or name (try it as a routing id)."""
        if type(to) is not str:
            return None
        self._refresh()
        agent = self._by_id.get(to)
        if agent is not None:
            return [agent]
        instances = self._by_name.get(to)
        if instances is None:
            return None
        live = [a for a in instances if a.state is AgentState.READY] or \
               [a for a in instances if a.state is AgentState.DRAINING]
        if broadcast or len(live) <= 1:
            return live
        turn = self._turns.get(to, 0)
        self._turns[to] = turn + 1
        return [live[turn % len(live)]]

    def departed(self, identity: bytes, reason: str) -> None:
        """An agent left: refuse messages to its routing id until it registers again."""
        self._departed[identity] = reason
        self._departed.move_to_end(identity)
        while len(self._departed) > DEPARTED_MEMORY:
            self._departed.popitem(last=False)

    def rejoined(self, identity: bytes) -> None:
        self._departed.pop(identity, None)

    def refusal(self, identity: bytes) -> str | None:
        """Why messages to this routing id are refused (the agent left), or None."""
        return self._departed.get(identity)

    @staticmethod
    def sender_ref(identity: bytes) -> str | bytes:
        """The ``from`` of a forwarded message: the routing id as text when it is UTF-8
        (every SDK peer), else the raw bytes (libzmq's generated ids)."""
        try:
            return identity.decode()
        except UnicodeDecodeError:
            return identity

    # ------------------------------------------------------------------ verdicts

    def ack(self, identity: bytes, msg_id: int) -> None:
        acks = self._acks.get(identity)
        if acks is None:
            acks = self._acks[identity] = []
        acks.append(msg_id)

    def error(self, identity: bytes, msg_id: int, code: str, message: str) -> None:
        self.counters[code] += 1
        self._errors.setdefault(identity, []).append((msg_id, code, message))

    @property
    def has_verdicts(self) -> bool:
        return bool(self._acks or self._errors)

    def take_verdicts(self) -> list[tuple[bytes, DirectVerdict]]:
        """The verdicts of this pass, one per sender; clears them."""
        acks, self._acks = self._acks, {}
        errors, self._errors = self._errors, {}
        return [(identity, DirectVerdict(acks.get(identity, []), errors.get(identity, [])))
                for identity in acks.keys() | errors.keys()]


class DirectDesk:
    """Forwards DIRECT batches: grouped per receiver and in order, payloads untouched and
    the sender's routing id added as ``from``; the sender hears what became of each in
    this pass's verdict.

    Args:
        ledger: the engine's books.
        routing: the rules (targets, departed agents, verdicts).
        forwarder: sends the forwarded messages.
    """

    def __init__(self, ledger: Ledger, routing: DirectRouting, forwarder: Forwarder) -> None:
        self.ledger = ledger
        self.routing = routing
        self.forwarder = forwarder

    def handle(self, identity: bytes, msg: Direct) -> None:
        items = msg.items
        self.ledger.items_this_pass += len(items)
        sender = self.routing.sender_ref(identity)
        #: per item: None once delivered to some receiver, else (code, message) to report
        #: (_UNDELIVERED: its receivers were not reachable; the message is built only then)
        outcomes: list[tuple[str, str] | None] = []
        groups: dict[bytes, tuple[list[DirectItem], list[int]]] = {}
        for index, item in enumerate(items):
            receivers, refusal = self._receivers(item.to, bool(item.flags & DIRECT_BROADCAST))
            outcomes.append(refusal if refusal is not None else _UNDELIVERED)
            if not receivers:
                continue
            forwarded = _new_tuple(DirectItem, (item.to, item.msg_id, item.payload,
                                                item.reply_to, item.flags, item.error, sender))
            for receiver in receivers:
                group = groups.get(receiver)
                if group is None:
                    group = groups[receiver] = ([], [])
                group[0].append(forwarded)
                group[1].append(index)
        for receiver, (forwarded_items, indexes) in groups.items():
            self._forward(receiver, forwarded_items, indexes, items, outcomes)
        self._verdicts(identity, items, outcomes)

    def _forward(self, receiver: bytes, forwarded: list[DirectItem], indexes: list[int],
                 items: list[DirectItem], outcomes: list[tuple[str, str] | None]) -> None:
        code = self.forwarder.forward(
            receiver, [encode(Direct(part)) for part in chunks(forwarded)],
            DIRECT_BACKLOG_LIMIT)
        if code == _MAILBOX_FULL:
            agent = self.ledger.agents.get(receiver)
            if agent is not None:
                agent.messaging["broker_refused"] = (agent.messaging.get("broker_refused", 0)
                                                     + len(indexes))
        for index in indexes:
            if code is None:
                outcomes[index] = None
            elif code == _MAILBOX_FULL and outcomes[index] is not None:
                outcomes[index] = (code, f"{items[index].to!r} is not keeping up: "
                                         f"{DIRECT_BACKLOG_LIMIT} messages already wait "
                                         "for it in the broker")

    def _verdicts(self, identity: bytes, items: list[DirectItem],
                  outcomes: list[tuple[str, str] | None]) -> None:
        routing = self.routing
        routed = 0
        for item, outcome in zip(items, outcomes):
            if outcome is None:
                routed += 1
                if not item.flags & DIRECT_NO_ACK:
                    routing.ack(identity, item.msg_id)
            elif outcome == _UNDELIVERED:  # a value, not an identity: compiled code copies
                routing.error(identity, item.msg_id, _NO_AGENT,
                              f"no agent or client {item.to!r} is connected")
            else:
                routing.error(identity, item.msg_id, outcome[0], outcome[1])
        routing.counters["routed"] += routed

    def _receivers(self, to: str | bytes | None, broadcast: bool
                   ) -> tuple[list[bytes], tuple[str, str] | None]:
        """The routing ids a direct message to ``to`` goes to, or why there are none."""
        if to is None:
            return [], (ErrorCode.BAD_FRAME.value,
                        "a direct message needs 'to': an agent id, an agent name or a client id")
        targets = self.routing.resolve(to, broadcast)
        if targets is None:
            raw = to.encode() if isinstance(to, str) else to
            refusal = self.routing.refusal(raw)
            if refusal is not None:
                return [], (_NO_AGENT, f"agent {to!r} left ({refusal})")
            return [raw], None
        if not targets:
            return [], (_NO_AGENT, f"no live agent named {to!r}")
        return [agent.identity for agent in targets], None

    def release_verdicts(self) -> None:
        """Queue this pass's verdicts, one DIRECT verdict per sender."""
        if self.routing.has_verdicts:
            for identity, verdict in self.routing.take_verdicts():
                self.ledger.outbox(identity).control.append(encode(verdict))

    def status(self, backlogged_receivers: int) -> dict[str, Any]:
        counters = self.routing.counters
        return {"routed": counters["routed"], "no_agent": counters[_NO_AGENT],
                "mailbox_full": counters[_MAILBOX_FULL],
                "backlogged_receivers": backlogged_receivers}
