"""Agent pools: the node supervisors the broker knows, the desired replica counts, and the
plans it sends each node (``wire/nodes.py``). No I/O: messages go to the outboxes.

Level-triggered: every NODE report is answered with that node's PLAN, and a node acts
on the last PLAN it got, so a lost message costs one heartbeat interval, never a wrong
state. The broker decides counts only for the agents it has a desired total for; one
it has none for (after a restart, before anybody scaled it) takes what the nodes report
running as its desired total, so that a restart never stops a running pool.

A node whose reports stop for the heartbeat expiry is *lost*: its replicas are placed
on the other nodes that can run them (its agents' tasks are dispatched again as any
dead agent's are). When it reports again it is placed again, from what it runs: the
placement takes the extra replicas away from the node that has the most, so no more than
the desired total keeps running. A node that comes back with nothing running, or joins,
gets its share at the agent's next SCALE (any count, the same one included), which
spreads that agent evenly again (``broker/engine/placement.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from broker.engine.ledger import Ledger
from broker.engine.placement import NodeView, Placement, place
from wire.nodes import NodePlan, NodeReport, Scale, ScaleReply
from wire.tasks import ErrorCode, encode

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class NodeRecord:
    """One node supervisor as the broker knows it."""

    identity: bytes
    report: NodeReport
    joined_at: float
    last_seen: float
    lost: bool = False
    #: what the last plan asked of it, by agent name
    planned: dict[str, int] = field(default_factory=dict)

    def view(self) -> NodeView:
        report = self.report
        return NodeView(report.node_id, frozenset(report.catalogue), report.running,
                        frozenset(report.failing), report.cpus, report.load)

    def document(self, now: float) -> dict[str, Any]:
        report = self.report
        return {"id": report.node_id, "host": report.host, "cpus": report.cpus,
                "memory_bytes": report.memory_bytes, "load": round(report.load, 2),
                "state": "lost" if self.lost else "live",
                "last_seen_s": round(now - self.last_seen, 3),
                "catalogue": list(report.catalogue), "running": dict(report.running),
                "planned": dict(self.planned), "failing": dict(report.failing)}


class NodeDesk:
    """The engine's book of nodes and pools.

    Args:
        ledger: the engine's books (outboxes, config, events, counters).
        drain_s: how long a drained replica may finish its tasks (sent in every PLAN).
    """

    def __init__(self, ledger: Ledger, drain_s: float = 30.0) -> None:
        self.ledger = ledger
        self.drain_s = drain_s
        self.nodes: dict[str, NodeRecord] = {}
        #: desired total replicas by agent name
        self.desired: dict[str, int] = {}
        #: SCALE requests so far by agent name (a node retries a crash loop when it moves)
        self.epochs: dict[str, int] = {}
        self.placement: Placement = {}
        #: called with every new set of desired counts (``broker/pools.py`` keeps them
        #: in the state service); None: they live as long as the broker
        self.on_desired: Callable[[dict[str, int]], None] | None = None

    def restore(self, desired: dict[str, int]) -> None:
        """The desired counts an earlier broker kept (before any node reported)."""
        self.desired.update(desired)

    # ------------------------------------------------------------ input

    def report(self, identity: bytes, msg: NodeReport, now: float) -> None:
        """A node's NODE: remember it, adopt what it runs, plan again, answer its PLAN."""
        node = self.nodes.get(msg.node_id)
        if node is None:
            node = self.nodes[msg.node_id] = NodeRecord(identity, msg, now, now)
            logger.info("node %r (%r) joined: %d CPU(s), catalogue %r", msg.node_id, msg.host,
                        msg.cpus, list(msg.catalogue))
            self.ledger.events.pool_changed("node_joined", msg.node_id, {
                "host": msg.host, "cpus": msg.cpus, "catalogue": list(msg.catalogue)})
        else:
            if node.lost:
                logger.info("node %r is back", msg.node_id)
                self.ledger.events.pool_changed("node_returned", msg.node_id,
                                                {"host": msg.host})
            for name, why in msg.failing.items():
                if name not in node.report.failing:
                    self.ledger.events.pool_changed("crash_loop", msg.node_id,
                                                    {"agent": name, "detail": why})
            node.identity = identity  # a restarted supervisor may connect anew
            node.report = msg
            node.last_seen = now
        changed = node.lost
        node.lost = False
        adopted = False
        for name in msg.running:
            if name not in self.desired:  # after a restart: keep the pool as it runs
                self.desired[name] = sum(n.report.running.get(name, 0)
                                         for n in self._live())
                changed = adopted = True
        if adopted:
            self._desired_changed()
        for name, epoch in msg.epochs.items():
            if epoch > self.epochs.get(name, 0):
                self.epochs[name] = epoch
        self._replan()
        if changed:
            self._send_plans()
        else:
            self._send_plan(node)

    def scale(self, identity: bytes, msg: Scale, now: float) -> None:
        """SCALE: set an agent's desired total, plan, tell the nodes, answer."""
        name = msg.name
        able = [n for n in self._live() if name in n.report.catalogue]
        if not able and msg.replicas > 0:
            live = sorted(n.report.node_id for n in self._live())
            where = f"the live nodes ({', '.join(live)})" if live else "no live node"
            self.ledger.reject(identity, ErrorCode.NO_NODE, (
                f"no live node can run {name!r}: {where} list(s) it in no catalogue; start "
                f"it on a machine with `orchestrator agents start {name}` (which adds a "
                "module:Class to that node's catalogue) or add it to a node's "
                "configuration"), req=msg.req)
            return
        self.desired[name] = msg.replicas
        self.epochs[name] = self.epochs.get(name, 0) + 1
        self._desired_changed()
        # A scale also spreads the agent evenly again: the way to give a node that
        # joined, or came back empty, its share (placement is otherwise stable).
        self._replan(even_out=frozenset((name,)))
        self._send_plans()
        nodes = {node_id: counts[name] for node_id, counts in self.placement.items()
                 if counts.get(name)}
        logger.info("agent %r scaled to %d replica(s): %r", name, msg.replicas, nodes)
        self.ledger.events.pool_changed("scaled", "", {"agent": name,
                                                       "desired": msg.replicas,
                                                       "nodes": nodes})
        self.ledger.outbox(identity).control.append(encode(ScaleReply(
            msg.req, name, msg.replicas, nodes)))

    def tick(self, now: float) -> None:
        """Mark nodes whose reports stopped lost, and place their replicas elsewhere."""
        expiry = self.ledger.config.heartbeat_expiry_s
        lost = [n for n in self.nodes.values() if not n.lost and now - n.last_seen > expiry]
        for node in lost:
            node.lost = True
            logger.warning("node %r lost: no report for %.1f s; its replicas go to other "
                           "nodes", node.report.node_id, now - node.last_seen)
            self.ledger.events.pool_changed("node_lost", node.report.node_id, {
                "host": node.report.host, "silent_s": round(now - node.last_seen, 3)})
        if lost:
            self._replan()
            self._send_plans()

    # ------------------------------------------------------------ planning

    def _desired_changed(self) -> None:
        if self.on_desired is not None:
            self.on_desired(self.desired)

    def _live(self) -> list[NodeRecord]:
        return [node for node in self.nodes.values() if not node.lost]

    def _replan(self, even_out: frozenset[str] = frozenset()) -> None:
        live = self._live()
        self.placement = place(self.desired, [node.view() for node in live], self.placement,
                               even_out)
        for node in live:
            node.planned = self.placement.get(node.report.node_id, {})

    def _send_plans(self) -> None:
        for node in self._live():
            self._send_plan(node)

    def _send_plan(self, node: NodeRecord) -> None:
        config = self.ledger.config
        self.ledger.outbox(node.identity).control.append(encode(NodePlan(
            dict(node.planned), dict(self.epochs), config.heartbeat_interval_s,
            config.heartbeat_liveness, self.drain_s)))

    # ------------------------------------------------------------ status

    def document(self, now: float) -> dict[str, Any]:
        """The status document's ``nodes`` and ``pools`` (desired against running)."""
        live = self._live()
        pools: dict[str, dict[str, Any]] = {}
        for name in sorted(set(self.desired) | {n for node in live for n in node.report.running}):
            pools[name] = {
                "desired": self.desired.get(name),
                "running": sum(node.report.running.get(name, 0) for node in live),
                "nodes": {node.report.node_id: node.report.running.get(name, 0)
                          for node in live if name in node.report.catalogue},
                "failing": {node.report.node_id: node.report.failing[name]
                            for node in live if name in node.report.failing}}
        return {"nodes": [node.document(now) for node in self.nodes.values()],
                "pools": pools}
