"""Direct messages between peers: whom a DIRECT goes to, and what the sender is told.

The broker's loop (``broker/server.py``) owns the socket; this module holds the rules:

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
from typing import Final

from broker.protocol import DirectVerdict
from broker.routing import AgentRecord, AgentState, AgentTable

#: Direct messages queued in the broker for one receiver whose connection is full, on top
#: of the socket's own queue (``send_hwm``); beyond this the sender gets ``mailbox_full``.
DIRECT_BACKLOG_LIMIT: Final = 1000
#: Agents that left, remembered so that messages to them are refused (oldest forgotten).
DEPARTED_MEMORY: Final = 10_000


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
        #: receivers that have direct messages waiting in the broker's backlog
        self.backlogged: set[bytes] = set()
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
