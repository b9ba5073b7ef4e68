"""Reading the broker's status document (``client.status()``): which agents are live and
what they can take.

One place for the question "who can run this?", asked by ``submit`` (to say at once that
no agent can), by the planner's callers (which capabilities are online), by the workflow
patterns (a step names an agent that is not there) and by consensus (one voter per live
instance).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from typing import Any, Final

#: The agent states of a status document that take new work.
READY: Final = "ready"
#: An agent finishing what it holds before it leaves: no new work, but alive.
DRAINING: Final = "draining"


def live_agents(status: Mapping[str, Any], states: Collection[str] = (READY,)
                ) -> list[dict[str, Any]]:
    """The agents of a status document in one of ``states`` (ready ones by default)."""
    return [a for a in status.get("agents") or () if a.get("state") in states]


def serves(agent: Mapping[str, Any], capabilities: Iterable[str] = (),
           name: str | None = None) -> bool:
    """Whether ``agent`` offers every one of ``capabilities`` and, when ``name`` is given,
    is that agent (by name or id)."""
    offered = set(agent.get("capabilities") or ())
    return offered.issuperset(capabilities) and \
        (name is None or name in (agent.get("name"), agent.get("id")))


def offered_capabilities(status: Mapping[str, Any]) -> set[str]:
    """What the ready agents of a status document offer, together."""
    return {str(c) for agent in live_agents(status) for c in agent.get("capabilities") or ()}


__all__ = ["DRAINING", "READY", "live_agents", "offered_capabilities", "serves"]
