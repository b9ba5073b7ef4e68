"""Agent pools: node supervisors and scaling (commands NODE 0x08, PLAN 0x15, SCALE 0x27).

A *node* is one supervisor process on one machine (``python -m nodes``): it keeps
replicas of the agents of its own catalogue running and reports them; the broker decides
how many of each it should run. :mod:`wire.tasks` frames these messages and dispatches to
:func:`decode_node_message`; they live here so that the task protocol's hot module does not
grow for them.

NODE, node -> broker, header map (:class:`NodeReport`), sent at connect, on every change
of what runs and once per heartbeat interval (it is the node's heartbeat):
``{"v", "id", "host", "cpus", "mem", "load", "cat", "run", "fail", "epochs"}``.

PLAN, broker -> node, header map (:class:`NodePlan`), the answer to every NODE (a lost
PLAN is made good by the next one): ``{"run", "epochs", "ivl", "live", "drain_s"}``.
``run`` names only the agents whose count the broker decides; the node keeps what it runs
of any other. ``epochs`` counts the SCALE requests of each agent: a node that gave up on
an agent after a crash loop tries again when its epoch moves.

SCALE, client -> broker, header map ``{"req", "name", "n"}`` (:class:`Scale`): set the
desired total of agent ``name`` to ``n`` replicas over every node that can run it.
The answer is the same command with ``{"req", "name", "desired", "nodes"}``
(:class:`ScaleReply`: the placement, replicas by node id), or an ERROR carrying ``req``:
``no_node`` when no live node has ``name`` in its catalogue, ``unauthorized``
on a secure broker for a key whose role is not ``admin``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Final

from wire.codec import as_map, as_req, version_mismatch
from wire.errors import DecodeError
from wire.limits import PROTOCOL_VERSION

#: Most replicas of one agent a SCALE may ask for (over all nodes).
MAX_REPLICAS: Final = 1024
#: Longest agent name and node id, in characters.
MAX_NAME_CHARS: Final = 256
#: Most catalogue entries a node may report.
MAX_CATALOGUE: Final = 1024


@dataclass(frozen=True, slots=True)
class NodeReport:
    """Node -> broker: who the node is, what it can run and what runs now."""

    node_id: str
    host: str
    cpus: int
    memory_bytes: int
    #: the one-minute load average (free CPU is ``cpus - load``)
    load: float
    #: agent names this node may run (its catalogue), in its order
    catalogue: tuple[str, ...]
    #: replicas running now by agent name: registered with the broker, not being stopped
    running: dict[str, int] = field(default_factory=dict)
    #: agents the node gave up on (a crash loop), with why, by agent name
    failing: dict[str, str] = field(default_factory=dict)
    #: the SCALE epoch of each agent the node last acted on
    epochs: dict[str, int] = field(default_factory=dict)
    version: int = PROTOCOL_VERSION


@dataclass(frozen=True, slots=True)
class NodePlan:
    """Broker -> node: how many replicas of each agent it should run."""

    running: dict[str, int]
    epochs: dict[str, int]
    heartbeat_interval_s: float
    heartbeat_liveness: int
    #: how long a drained replica may finish its tasks before it hands the rest back
    drain_s: float


@dataclass(frozen=True, slots=True)
class Scale:
    """Client -> broker: run ``replicas`` of agent ``name`` in total."""

    req: int
    name: str
    replicas: int


@dataclass(frozen=True, slots=True)
class ScaleReply:
    """Broker -> client: the desired total now, and its placement by node id."""

    req: int
    name: str
    desired: int
    nodes: dict[str, int]


NodeMessage = NodeReport | NodePlan | Scale | ScaleReply


def node_header(msg: NodeMessage) -> dict[str, Any]:
    """The header map of a NODE, PLAN or SCALE message."""
    match msg:
        case NodeReport():
            return {"v": msg.version, "id": msg.node_id, "host": msg.host, "cpus": msg.cpus,
                    "mem": msg.memory_bytes, "load": msg.load, "cat": list(msg.catalogue),
                    "run": msg.running, "fail": msg.failing, "epochs": msg.epochs}
        case NodePlan():
            return {"run": msg.running, "epochs": msg.epochs,
                    "ivl": msg.heartbeat_interval_s, "live": msg.heartbeat_liveness,
                    "drain_s": msg.drain_s}
        case Scale():
            return {"req": msg.req, "name": msg.name, "n": msg.replicas}
    return {"req": msg.req, "name": msg.name, "desired": msg.desired, "nodes": msg.nodes}


def _name(value: Any, what: str) -> str:
    if type(value) is not str or not value or len(value) > MAX_NAME_CHARS:
        raise ValueError(f"{what} must be a non-empty string of at most {MAX_NAME_CHARS} "
                         "characters")
    return value


def _count(value: Any, what: str, limit: int = MAX_REPLICAS) -> int:
    if type(value) is not int or not 0 <= value <= limit:
        raise ValueError(f"{what} must be an integer from 0 to {limit}")
    return value


def _number(value: Any, what: str) -> float:
    if type(value) not in (int, float) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{what} must be a finite non-negative number")
    return float(value)


def _counts(value: Any, what: str) -> dict[str, int]:
    h = as_map(value if value is not None else {})
    if len(h) > MAX_CATALOGUE:
        raise ValueError(f"{what} names more than {MAX_CATALOGUE} agents")
    return {_name(k, f"{what}'s agent name"): _count(v, f"{what}[{k!r}]", 2**31)
            for k, v in h.items()}


def decode_node(header: Any) -> NodeReport:
    """A NODE header.

    Raises:
        DecodeError: ``bad_version`` for a node of another protocol version (naming both).
        ValueError: a missing or mistyped field.
    """
    h = as_map(header)
    version = h.get("v")
    if version != PROTOCOL_VERSION:
        theirs = 'unknown (its NODE has no "v")' if version is None else repr(version)
        raise DecodeError(version_mismatch(theirs), code="bad_version")
    catalogue = h.get("cat", ())
    if type(catalogue) is not tuple or len(catalogue) > MAX_CATALOGUE:
        raise ValueError(f"cat must be an array of at most {MAX_CATALOGUE} agent names")
    failing = as_map(h.get("fail") or {})
    return NodeReport(
        _name(h.get("id"), "id"), _name(h.get("host"), "host"),
        _count(h.get("cpus"), "cpus", 1 << 20), _count(h.get("mem"), "mem", 1 << 62),
        _number(h.get("load", 0.0), "load"),
        tuple(_name(n, "a catalogue entry") for n in catalogue),
        _counts(h.get("run"), "run"),
        {_name(k, "fail's agent name"): str(v)[:1000] for k, v in failing.items()},
        _counts(h.get("epochs"), "epochs"))


def decode_plan(header: Any) -> NodePlan:
    """A PLAN header.

    Raises:
        ValueError: a missing or mistyped field.
    """
    h = as_map(header)
    liveness = h.get("live")
    if type(liveness) is not int or liveness < 1:
        raise ValueError("live must be a positive integer")
    return NodePlan(_counts(h.get("run"), "run"), _counts(h.get("epochs"), "epochs"),
                    _number(h.get("ivl"), "ivl"), liveness, _number(h.get("drain_s"), "drain_s"))


def decode_scale(header: Any) -> Scale | ScaleReply:
    """A SCALE header: an answer when it has ``desired``, else a request.

    Raises:
        ValueError: a missing or mistyped field.
    """
    h = as_map(header)
    req = as_req(h)
    name = _name(h.get("name"), "name")
    if "desired" in h:
        return ScaleReply(req, name, _count(h.get("desired"), "desired"),
                          _counts(h.get("nodes"), "nodes"))
    return Scale(req, name, _count(h.get("n"), "n"))


__all__ = ["MAX_REPLICAS", "NodeMessage", "NodePlan", "NodeReport", "Scale", "ScaleReply",
           "decode_node", "decode_plan", "decode_scale", "node_header"]
