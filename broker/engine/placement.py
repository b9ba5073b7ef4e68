"""Where an agent pool's replicas run: the desired totals spread over the live nodes.

A pure function of what the nodes report and of the last placement, so that it can be
tested alone and re-run on every change (a scale, a node joining, lost or back). It is
stable: replicas stay where they are (the last placement, else what a node reports
running) and only the difference moves, so a node that comes back after a loss gives up
its extra replicas rather than making everything shuffle.

A node that joins, or comes back with nothing running (its supervisor restarted), is
therefore not given replicas until they are placed again: a scale of the agent (to any
count, its current one included) *evens it out*, moving replicas one at a time from the
node with the most to the node with the fewest until no two eligible nodes differ by more
than one: as few moves as an even spread takes, the rest stays put.

Rules, for each agent with a desired total:

- only live nodes whose catalogue has the agent, and that have not given up on it (a
  crash loop), may run it;
- to add a replica: the node with the fewest replicas of that agent, then the fewest
  replicas in all, then the most free CPU (``cpus - load``), then the node id;
- to remove one: the node with the most replicas of that agent, then the most in all,
  then the least free CPU, then the node id;
- to even out (the agents named in ``even_out``): remove one as above, add one as above,
  while the two nodes differ by two or more.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class NodeView:
    """What placement needs to know of one live node."""

    node_id: str
    catalogue: frozenset[str]
    #: replicas the node reports running, by agent name
    running: dict[str, int]
    #: agents the node gave up on (a crash loop)
    failing: frozenset[str]
    cpus: int
    load: float

    @property
    def free_cpu(self) -> float:
        return self.cpus - self.load

    def can_run(self, name: str) -> bool:
        return name in self.catalogue and name not in self.failing


Placement = dict[str, dict[str, int]]
"""Replicas by node id, then by agent name."""


def place(desired: dict[str, int], nodes: list[NodeView], previous: Placement,
          even_out: frozenset[str] = frozenset()) -> Placement:
    """The new placement of every agent of ``desired`` over ``nodes``.

    Args:
        desired: the desired total of each agent.
        nodes: the live nodes.
        previous: the last placement (nodes no longer live are ignored).
        even_out: agents whose replicas are spread evenly again (a scale asked for it).

    Returns:
        Replicas by node id and agent name; every live node has an entry (maybe empty).
        An agent no node can run gets fewer replicas than desired (none).
    """
    plan: Placement = {node.node_id: {} for node in nodes}
    totals = {node.node_id: 0 for node in nodes}
    for name in sorted(desired):
        eligible = [node for node in nodes if node.can_run(name)]
        counts: dict[str, int] = {}
        for node in eligible:
            before = previous.get(node.node_id)
            counts[node.node_id] = (before.get(name, 0) if before is not None
                                    else node.running.get(name, 0))
        _adjust(counts, desired[name], eligible, totals)
        if name in even_out:
            _even_out(counts, eligible, totals)
        for node_id, count in counts.items():
            plan[node_id][name] = count
            totals[node_id] += count
    return plan


def _adjust(counts: dict[str, int], target: int, eligible: list[NodeView],
            totals: dict[str, int]) -> None:
    """Add or remove replicas in ``counts`` until they sum to ``target`` (the rules of the
    module's docstring; ``totals`` are the other agents' replicas placed so far)."""
    if not eligible:
        return
    total = sum(counts.values())
    while total < target:
        counts[_fewest(counts, eligible, totals).node_id] += 1
        total += 1
    while total > target:
        counts[_most(counts, eligible, totals).node_id] -= 1
        total -= 1


def _fewest(counts: dict[str, int], eligible: list[NodeView],
            totals: dict[str, int]) -> NodeView:
    """Where a replica is added: the fewest of the agent, then in all, then the most free
    CPU, then the node id."""
    return min(eligible, key=lambda n: (counts[n.node_id], totals[n.node_id] + counts[n.node_id],
                                        -n.free_cpu, n.node_id))


def _most(counts: dict[str, int], eligible: list[NodeView],
          totals: dict[str, int]) -> NodeView:
    """Where a replica is removed: the most of the agent, then in all, then the least
    free CPU, then the node id (only nodes that run one)."""
    return max((n for n in eligible if counts[n.node_id] > 0),
               key=lambda n: (counts[n.node_id], totals[n.node_id] + counts[n.node_id],
                              -n.free_cpu, n.node_id))


def _even_out(counts: dict[str, int], eligible: list[NodeView],
              totals: dict[str, int]) -> None:
    """Move replicas from the node with the most to the node with the fewest until no
    two differ by more than one (each move brings the two closer: it ends)."""
    if not any(counts.values()):
        return
    while True:
        most = _most(counts, eligible, totals)
        fewest = _fewest(counts, eligible, totals)
        if counts[most.node_id] - counts[fewest.node_id] < 2:
            return
        counts[most.node_id] -= 1
        counts[fewest.node_id] += 1
