"""Consensus: distinct live agent instances vote on the same input; votes are weighted.

1. The voters are chosen among the live instances (``client.status()``) that offer the
   voter step's capability (or carry its agent name, or id): ``voters`` of them, the
   least busy first, or all of them when ``voters`` is not set. The choice is
   checkpointed before any vote is submitted, so a runner that takes over pins the same
   copies to the same instances.
2. One copy of the task goes to each, pinned by agent id (``[k]`` in its path): no
   instance votes twice.
3. A vote is the result's ``decision`` field, or its data; its weight is the result's
   confidence. The winner is the heaviest vote (the first seen among equals);
   ``confidence`` is its share of the total weight, ``consensus`` whether that share
   reaches ``threshold``.
4. A voter that fails, times out, or whose agent leaves (the broker's ``agents.left``
   event on the bus, or its absence from the status) is left out and reported under
   ``missing``, with why. Only a vote with no ballot at all fails the step. Fewer live
   instances than ``voters`` is reported the same way (``agent`` None).

The output data (and extras) is ``{"decision", "confidence", "consensus", "threshold",
"votes": [{"agent", "decision", "confidence", "task_id"}], "missing": [{"agent",
"reason"}]}``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, TYPE_CHECKING

from agent_sdk import BusMessage, BusUnavailable, OrchestratorError, Subscription, WaitTimeout
from agent_sdk.status import DRAINING, READY, live_agents, serves
from wire.bus import BUS_AGENT_LEFT
from workflows import ids
from workflows.errors import StepFailed
from workflows.ids import Scope
from workflows.model import Consensus, TaskStep
from workflows.outputs import entry_error, entry_ok, entry_output, StepOutput

if TYPE_CHECKING:
    from workflows.executor import Executor

logger = logging.getLogger(__name__)

#: How long the voters' watch waits for its bus subscription to be confirmed.
SUBSCRIBE_TIMEOUT_S: Final = 5.0


@dataclass(frozen=True, slots=True)
class Vote:
    """One ballot: who voted, for what, with which confidence."""

    agent: str
    decision: Any
    confidence: float
    task_id: str


def describe(step: TaskStep) -> str:
    """``capability X`` / ``agent Y`` / both, for messages."""
    parts = []
    if step.capability is not None:
        parts.append(f"capability {step.capability!r}")
    if step.agent is not None:
        parts.append(f"agent {step.agent!r}")
    return " and ".join(parts)


def live_instances(status: dict[str, Any], step: TaskStep) -> list[str]:
    """Ids of the live agents that can take ``step``, the least busy first."""
    found = []
    wanted = () if step.capability is None else (step.capability,)
    for agent in live_agents(status):
        if agent.get("circuit") == "open" or not serves(agent, wanted, step.agent):
            continue
        load = agent.get("in_flight", 0) / max(1, agent.get("max_concurrent", 1))
        found.append((load, str(agent["id"])))
    return [agent_id for _, agent_id in sorted(found)]


def _canonical(value: Any) -> Any:
    """A hashable stand-in for ``value``, equal for equal votes (maps in any order)."""
    if isinstance(value, dict):
        return ("map", tuple(sorted(((repr(k), _canonical(v)) for k, v in value.items()))))
    if isinstance(value, (list, tuple)):
        return ("list", tuple(_canonical(v) for v in value))
    try:
        hash(value)
    except TypeError:
        return ("repr", repr(value))
    return value


def tally(votes: Sequence[Vote], threshold: float) -> tuple[Any, float, bool]:
    """``(decision, share, consensus)`` of ``votes`` (at least one).

    Weights are the confidences (negative ones count as 0); when they sum to 0 every
    vote weighs the same.
    """
    weights: dict[Any, float] = {}
    decisions: dict[Any, Any] = {}
    use_counts = sum(max(0.0, v.confidence) for v in votes) <= 0
    for vote in votes:
        key = _canonical(vote.decision)
        decisions.setdefault(key, vote.decision)
        weights[key] = weights.get(key, 0.0) + (1.0 if use_counts else max(0.0, vote.confidence))
    total = sum(weights.values())
    # max() keeps the first of equal weights: the vote seen first (lowest slot) wins ties.
    winner = max(weights, key=lambda key: weights[key])
    share = weights[winner] / total
    # A share that equals the threshold is consensus: 3 of 5 at 0.6 must not lose to the
    # rounding of a sum of floats (0.5999999999999999).
    return decisions[winner], share, share >= threshold - SHARE_TOLERANCE


#: How far below the threshold a share may fall and still count (float rounding only).
SHARE_TOLERANCE = 1e-9


class VoterWatch:
    """Cancels the task of every voter whose agent leaves, so that the vote does not wait
    for a dead voter until its deadline.

    Args:
        ex: the executor.
        slots: voter slot -> (agent id, task id) of the open ballots.
    """

    def __init__(self, ex: Executor, slots: dict[int, tuple[str, str]]) -> None:
        self.ex = ex
        self.slots = dict(slots)
        #: agent id -> why it is gone
        self.gone: dict[str, str] = {}
        self._subscription: Subscription | None = None
        #: cancels in flight (a task nobody references may be collected mid-flight)
        self._leaving: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Subscribe to the broker's ``agents.left`` events (if there is a bus)."""
        try:
            self._subscription = self.ex.client.subscribe(BUS_AGENT_LEFT, self._on_left)
            await self._subscription.confirm(SUBSCRIBE_TIMEOUT_S)
        except (BusUnavailable, WaitTimeout) as e:
            logger.info("run %s: voters are not watched on the bus (%s); a dead voter is "
                        "left out at its deadline", self.ex.run_id, e)

    async def check(self) -> None:
        """Leave out the voters whose agent is not live now (died before the watch)."""
        try:
            status = await self.ex.client.status()
        except OrchestratorError as e:
            logger.warning("run %s: cannot check the voters' agents: %s", self.ex.run_id, e)
            return
        # A draining agent still finishes what it holds: its ballot stays.
        live = {str(a.get("id")) for a in live_agents(status, (READY, DRAINING))}
        for agent_id, _ in list(self.slots.values()):
            if agent_id not in live:
                await self._leave(agent_id, "not live")

    def _on_left(self, message: BusMessage) -> None:
        data = message.data if isinstance(message.data, dict) else {}
        agent_id = str(data.get("id", ""))
        if any(agent == agent_id for agent, _ in self.slots.values()):
            task = asyncio.get_running_loop().create_task(
                self._leave(agent_id, f"agent left ({data.get('reason', 'gone')})"))
            self._leaving.add(task)
            task.add_done_callback(self._leaving.discard)

    async def _leave(self, agent_id: str, why: str) -> None:
        self.gone.setdefault(agent_id, why)
        for slot, (agent, task_id) in list(self.slots.items()):
            if agent == agent_id:
                del self.slots[slot]
                await self.ex.client.cancel(task_id)

    def settled(self, slot: int) -> None:
        """Ballot ``slot`` is in: nothing to cancel for it any more."""
        self.slots.pop(slot, None)

    async def stop(self) -> None:
        """Stop watching."""
        if self._subscription is not None:
            await self.ex.client.unsubscribe(self._subscription)


async def run_consensus(ex: Executor, node: Consensus, data: Any, scope: Scope,
                        fields: dict[str, Any]) -> StepOutput:
    """Run a consensus node (see the module docstring).

    Raises:
        StepFailed: no instance could vote (``no_agent``), or none did (``no_votes``).
    """
    voter = node.voter
    agents, shortfall = await _voters(ex, node, scope)
    ex.progress.total += len(agents) - (node.voters or 1)
    voter_scope = scope.child(voter.name)
    paths = [voter_scope.slot(k).path for k in range(len(agents))]
    open_slots = {k: (agents[k], ids.task_id(ex.run_id, paths[k]))
                  for k in range(len(agents)) if ex.log.get(paths[k]) is None}
    watch = VoterWatch(ex, open_slots)
    if open_slots:
        await watch.start()

    async def ballot(slot: int) -> dict[str, Any]:
        try:
            return await ex.leaf(voter, data, voter_scope.slot(slot), fields, pin=agents[slot])
        finally:
            watch.settled(slot)

    ballots = [asyncio.get_running_loop().create_task(ballot(k)) for k in range(len(agents))]
    try:
        if open_slots:
            await watch.check()
        entries = await asyncio.gather(*ballots)
    finally:
        for pending in ballots:
            pending.cancel()
        await watch.stop()
    votes: list[Vote] = []
    missing: list[dict[str, Any]] = [
        {"agent": None, "reason": f"only {len(agents)} live instance(s) of {describe(voter)}"}
        for _ in range(shortfall)]
    for slot, entry in enumerate(entries):
        if entry_ok(entry):
            output = entry_output(entry)
            decision = output.field("decision")
            votes.append(Vote(agents[slot], output.data if decision is None else decision,
                              float(output.confidence), str(entry.get("t", ""))))
        else:
            code, message = entry_error(entry)
            missing.append({"agent": agents[slot],
                            "reason": watch.gone.get(agents[slot], f"{code}: {message}")})
    if not votes:
        reasons = "; ".join(f"{m['agent']}: {m['reason']}" for m in missing)
        raise StepFailed(scope.path, "no_votes", f"none of the {len(agents)} voters answered "
                         f"({reasons})")
    decision, share, agreed = tally(votes, node.threshold)
    verdict = {
        "decision": decision, "confidence": share, "consensus": agreed,
        "threshold": node.threshold, "missing": missing,
        "votes": [{"agent": v.agent, "decision": v.decision, "confidence": v.confidence,
                   "task_id": v.task_id} for v in votes],
    }
    # The share is the output's own confidence; the rest reads as attributes too.
    return StepOutput(verdict, share, {k: v for k, v in verdict.items() if k != "confidence"})


async def _voters(ex: Executor, node: Consensus, scope: Scope) -> tuple[list[str], int]:
    """The voters' agent ids and the shortfall, checkpointed (or as checkpointed)."""
    mark = scope.mark("voters")
    entry = ex.log.get(mark)
    if entry is not None:
        return [str(a) for a in entry.get("voters") or []], int(entry.get("shortfall", 0))
    live = live_instances(await ex.client.status(), node.voter)
    wanted = node.voters or len(live)
    agents = live[:wanted]
    if not agents:
        raise StepFailed(scope.path, "no_agent", f"no live agent offers {describe(node.voter)} "
                         "to vote")
    ex.log.record(mark, {"voters": agents, "shortfall": wanted - len(agents)})
    # Durable before any ballot is pinned by it: a runner taking over pins the same.
    await ex.log.flush()
    return agents, wanted - len(agents)


__all__ = ["Vote", "VoterWatch", "live_instances", "run_consensus", "tally"]
