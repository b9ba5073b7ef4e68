"""A task's timeline read back as attempts: the one reading of the broker's timeline
vocabulary (:meth:`broker.engine.model.TaskRecord.timeline`), shared by the broker's
spans (``broker/tracing.py``) and ``orchestrator trace`` (``cli/trace_view.py``).

Entries are ``(wall-clock seconds, event, detail)`` (dicts with ``at``, ``event``,
``detail`` are accepted as well): ``submitted``; ``dispatched`` (detail ``attempt N on
AGENT_ID``; older brokers wrote ``attempt N``, or the bare agent id for the current
attempt); ``reclaimed`` (detail: agent id); ``running``; ``retrying`` / ``requeued`` /
``second_opinion`` (detail: why; ``failed on <agent id>`` names the agent);
``restored``; and the final state.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any, Final

#: Final states that are failures (status ERROR); ``cancelled`` is the caller's choice.
FAILED_STATES: Final = frozenset({"failed", "timed_out", "rejected"})
FINAL_STATES: Final = frozenset({"succeeded", "cancelled"}) | FAILED_STATES
#: Events that end an attempt without ending the task.
ATTEMPT_ENDINGS: Final = frozenset({"retrying", "requeued", "second_opinion"})

_ATTEMPT_DETAIL: Final = re.compile(r"attempt (\d+)(?: (?:to|on) (\S+))?")
_FAILED_ON: Final = re.compile(r"failed on (\S+)")


class Attempt:
    """One attempt of a task: when it was dispatched (``start``), to which agent (its id,
    when the timeline names it), when it ran and ended, how (``outcome``: the event that
    ended it, ``superseded``, or "" while it runs) and why (``reason``)."""

    __slots__ = (
        "agent",
        "end",
        "number",
        "outcome",
        "reason",
        "reclaimed",
        "running_at",
        "start",
    )

    def __init__(self, start: float, number: int, agent: str | None,
                 reclaimed: bool = False) -> None:
        self.start = start
        self.end: float | None = None
        self.number = number
        self.agent = agent
        self.outcome = ""
        self.reason = ""
        self.reclaimed = reclaimed
        self.running_at: float | None = None


def timeline_entries(timeline: Iterable[Any]) -> list[tuple[float, str, str]]:
    out: list[tuple[float, str, str]] = []
    for entry in timeline:
        if isinstance(entry, Mapping):
            out.append((float(entry["at"]), str(entry["event"]), str(entry.get("detail", ""))))
        else:
            at, event, detail = entry
            out.append((float(at), event, detail))
    out.sort(key=lambda e: e[0])  # stable: equal times keep their order
    return out


def attempts_of(timeline: Iterable[Any]) -> list[Attempt]:
    """The task's attempts, oldest first, from its timeline."""
    attempts: list[Attempt] = []
    current: Attempt | None = None
    for at, event, detail in timeline_entries(timeline):
        if event == "dispatched" or event == "reclaimed":
            match = _ATTEMPT_DETAIL.fullmatch(detail)
            number = int(match.group(1)) if match else len(attempts) + 1
            agent = (match.group(2) if match else detail) or None
            previous = attempts[-1] if attempts else None
            if previous is not None and previous.start == at:
                # The same dispatch twice: the history's copy and dispatched_at's (a task
                # that ended while waiting), or a reclaim and its new dispatched_at.
                previous.agent = previous.agent or agent
                if match:
                    previous.number = number
                current = previous if previous.end is None else current
                continue
            if current is not None and current.end is None:
                current.end, current.outcome = at, current.outcome or "superseded"
            current = Attempt(at, number, agent, event == "reclaimed")
            attempts.append(current)
        elif event == "running":
            if current is not None and current.running_at is None:
                current.running_at = at
        elif event in ATTEMPT_ENDINGS or event in FINAL_STATES:
            if current is not None and current.end is None:
                current.end, current.outcome = at, event
                current.reason = detail
                if current.agent is None:
                    failed_on = _FAILED_ON.search(detail)
                    if failed_on:
                        current.agent = failed_on.group(1)
            current = None if event in ATTEMPT_ENDINGS else current
    return attempts
