"""Who may do what on a secure broker: the roles' permissions, decided per message.

A secure broker (``--secure``) knows the sender of every message: its CURVE key, which
libzmq authenticated, and the key's :class:`Grant` from the allow-list. The broker's
loop (``broker/server.py``) checks that the sender's routing id lies in its key's scope
(so no other key can pose as a peer) and hands the message here, through
:meth:`Engine.handle_granted <broker.engine.engine.Engine.handle_granted>`. This module
decides, with no I/O:

========  ==========================================================================
role      may
========  ==========================================================================
agent     register (READY) under the names and capabilities its grant lists (any,
          when the grant lists none); send results, progress and pongs; submit tasks
          (subtasks too) in its own scope; see, fetch, cancel and trace its own tasks;
          send direct messages to anyone
client    submit tasks in its own scope; see, fetch, read, release, cancel and trace
          its own tasks; send direct messages to agents only (not to other clients)
node      report as a node supervisor (NODE) and get its plan; heartbeats, status
          and its own tasks
admin     everything, every key's tasks included; only admin keys may scale (SCALE)
========  ==========================================================================

Everyone may ask for the broker's status. Task ids are scoped: a non-admin's ids start
with its key's scope (``wire/curve.py``: 20 base32 characters of the key and ``~``);
the SDK adds it, so submitting another key's id makes a task of one's own. An id a
non-admin names outside its scope is read as an id *in* its scope, so asking for another
key's task finds nothing (``not_found``), and never learns whether it exists. (An agent's
subtask ids are in the agent key's scope: a parent retried on an agent of another key
runs its subtasks again.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final, Protocol

from broker.engine.direct import DirectRouting
from wire.curve import in_scope
from wire.nodes import NodeReport, Scale
from wire.tasks import (
    Cancel, Direct, Disconnect, Fetch, Heartbeat, Message, Pong, Progress, Read, Ready,
    Release, Results, StatusRequest, Submit, TaskQuery,
)

ADMIN: Final = "admin"
AGENT: Final = "agent"
CLIENT: Final = "client"
NODE: Final = "node"

#: A refused peer is announced on the bus (``agents.refused``) at most this often.
ANNOUNCE_EVERY_S: Final = 60.0
#: Peers whose last announcement is remembered.
MAX_ANNOUNCED_PEERS: Final = 10_000
#: Roles that may run tasks (register, answer for tasks).
_RUNS_TASKS: Final = frozenset({AGENT, ADMIN})


@dataclass(frozen=True, slots=True)
class Grant:
    """What the allow-list says about one key.

    Attributes:
        role: ``agent``, ``client``, ``node``, ``admin`` (or ``broker``: the broker's own).
        scope: the key's scope (``wire.curve.key_scope``): its routing ids and task ids
            start with it.
        names: agent names the key may register under (empty: any).
        capabilities: capabilities it may offer (empty: any).
    """

    role: str
    scope: str
    names: frozenset[str] = field(default_factory=frozenset)
    capabilities: frozenset[str] = field(default_factory=frozenset)


class GrantSource(Protocol):
    """Where the broker loop finds a key's grant (``broker/security.py`` KeyGrants: the
    allow-list file, cached)."""

    def grant(self, public_key: str) -> Grant | None:
        """The grant of ``public_key`` (Z85), or None when it is not authorized."""

    def refresh(self) -> set[str]:
        """Re-read the allow-list if it changed; the scopes of keys no longer in it."""

    def take_refusals(self) -> list[tuple[str, str]]:
        """The handshakes refused since the last call: (key, address)."""


#: What :meth:`Permissions.admit` gives back: the message to handle (ids read in the
#: sender's scope), or why it is refused.
Admitted = Message | str


class Permissions:
    """The roles' permissions (the table above).

    Args:
        routing: resolves a direct message's receivers.
    """

    def __init__(self, routing: DirectRouting) -> None:
        self.routing = routing
        #: when each refused peer was last announced on the bus (bounded)
        self._announced: dict[bytes, float] = {}

    def worth_announcing(self, identity: bytes, now: float) -> bool:
        """Whether a refusal of ``identity`` goes on the bus: once per
        :data:`ANNOUNCE_EVERY_S` per peer, so a revoked agent's heartbeats do not flood
        it."""
        last = self._announced.get(identity)
        if last is not None and now - last < ANNOUNCE_EVERY_S:
            return False
        if len(self._announced) >= MAX_ANNOUNCED_PEERS:
            self._announced.clear()
        self._announced[identity] = now
        return True

    def admit(self, grant: Grant, msg: Message) -> Admitted:
        """``msg`` from a peer of ``grant``'s key, as the engine should handle it, or the
        one-line reason it is refused (``unauthorized``)."""
        role = grant.role
        if role == ADMIN:
            return msg
        match msg:
            case Heartbeat() | StatusRequest():
                return msg
            case Submit():
                return self._submit(grant, msg)
            case Fetch():
                return Fetch(msg.req, self._own(grant, msg.task_ids), msg.wait)
            case Read():
                return Read(msg.req, in_scope(grant.scope, msg.task_id), msg.offset,
                            msg.length)
            case Release():
                return Release(self._own(grant, msg.task_ids))
            case Cancel():
                return Cancel(self._own(grant, msg.task_ids))
            case TaskQuery():
                if msg.task_ids is None:
                    return msg  # the listing is filtered to the scope: Engine.handle_granted
                return TaskQuery(msg.req, msg.statuses, msg.limit,
                                 self._own(grant, msg.task_ids))
            case Direct():
                return self._direct(grant, msg)
            case Ready():
                return self._ready(grant, msg)
            case Results() | Progress() | Pong() | Disconnect():
                if role in _RUNS_TASKS:
                    return msg
                return f"a {role} key may not answer for tasks: only agent keys run them"
            case NodeReport():
                if role == NODE:
                    return msg
                return (f"a key of role {role} may not report as a node supervisor: give "
                        "the supervisor a node key (keys authorize --role node)")
            case Scale():
                return (f"scaling {msg.name!r} needs an admin key, and this key's role is "
                        f"{role}")
            case _:
                return msg  # unknown commands are answered by the engine

    @staticmethod
    def _own(grant: Grant, task_ids: list[str]) -> list[str]:
        """``task_ids`` read in the sender's scope: another scope's id becomes an id of
        the sender's own (which finds nothing unless the sender made it)."""
        scope = grant.scope
        return [in_scope(scope, task_id) for task_id in task_ids]

    @staticmethod
    def _submit(grant: Grant, msg: Submit) -> Admitted:
        scope = grant.scope
        for spec in msg.tasks:
            if not spec.id.startswith(scope):
                return (f"task id {spec.id!r} is outside this key's scope: the ids of key "
                        f"{scope[:-1]}... start with {scope!r} (the SDK adds it)")
        return msg

    def _direct(self, grant: Grant, msg: Direct) -> Admitted:
        if grant.role == AGENT:
            return msg
        if grant.role != CLIENT:
            return f"a {grant.role} key may not send direct messages"
        resolve = self.routing.resolve
        for item in msg.items:
            to = item.to
            if to is None or resolve(to, False) is None:
                return (f"a client key may send direct messages to agents only, not to "
                        f"{to!r}")
        return msg

    @staticmethod
    def _ready(grant: Grant, msg: Ready) -> Admitted:
        if grant.role != AGENT:
            return (f"a {grant.role} key may not register as an agent: authorize an agent "
                    "key (orchestrator keys authorize KEY --role agent)")
        if grant.names and msg.name not in grant.names:
            return (f"this key may register as {', '.join(sorted(grant.names))}, not "
                    f"{msg.name!r}")
        if grant.capabilities:
            extra = sorted(set(msg.capabilities) - grant.capabilities)
            if extra:
                return (f"this key may not offer the capabilities {', '.join(extra)} "
                        f"(it may offer {', '.join(sorted(grant.capabilities))})")
        return msg

    def visible(self, grant: Grant, task_id: str) -> bool:
        """May ``grant``'s key see the task ``task_id`` in a listing?"""
        return grant.role == ADMIN or task_id.startswith(grant.scope)


__all__ = ["ADMIN", "AGENT", "Admitted", "CLIENT", "Grant", "GrantSource", "NODE",
           "Permissions"]
