"""The broker's spans of a task, emitted after the fact from its timeline.

The broker does not trace as it goes (that would cost on every task's path): when a
task that carried a ``traceparent`` ends, :meth:`TaskSpans.task_ended` turns its
timeline into finished spans, children of the client's span::

    orchestrator.broker.task          submitted -> final state (kind SERVER)
      queue_wait                      submitted -> first dispatch
      dispatch                        one per attempt: agent id, attempt number, outcome

so a retried task shows every attempt and the agent of each. The spans go to the
exporter as finished spans (:func:`wire.tracing.emit_span`), a third of what the SDK's
live spans cost; tasks without a traceparent never reach this module.

Timeline entries are ``(wall-clock seconds, event, detail)`` as
:meth:`broker.engine.model.TaskRecord.timeline` orders them (dicts with ``at``,
``event``, ``detail`` are accepted as well): ``submitted``; ``dispatched`` (detail:
``attempt N to <agent id>``, ``attempt N`` when the agent is unknown, or an older
broker's bare agent id); ``reclaimed``
(detail: agent id); ``running``; ``retrying`` / ``requeued`` / ``second_opinion`` (detail:
why; ``failed on <agent id>`` names the agent); ``restored``; and the final state.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

from wire.tracing import (
    GEN_AI_AGENT_ID, MESSAGING_SYSTEM, ORCH_ATTEMPT, ORCH_CAPABILITIES, ORCH_TASK_ID,
    ORCH_TASK_STATUS, emit_span, new_span_id, parse_traceparent,
)

#: Span names.
TASK_SPAN: Final = "orchestrator.broker.task"
QUEUE_WAIT_SPAN: Final = "queue_wait"
DISPATCH_SPAN: Final = "dispatch"

#: Our attribute names of broker spans (the shared ones are wire.tracing's).
ORCH_ATTEMPTS: Final = "orchestrator.attempts"
ORCH_OUTCOME: Final = "orchestrator.dispatch.outcome"
ORCH_REASON: Final = "orchestrator.dispatch.reason"
ORCH_RECLAIMED: Final = "orchestrator.dispatch.reclaimed"

#: Final states that are failures (status ERROR); ``cancelled`` is the caller's choice.
FAILED_STATES: Final = frozenset({"failed", "timed_out", "rejected"})
FINAL_STATES: Final = frozenset({"succeeded", "cancelled"}) | FAILED_STATES
#: Events that end an attempt without ending the task.
ATTEMPT_ENDINGS: Final = frozenset({"retrying", "requeued", "second_opinion"})

_ATTEMPT_DETAIL: Final = re.compile(r"attempt (\d+)(?: (?:to|on) (\S+))?")
_FAILED_ON: Final = re.compile(r"failed on (\S+)")


class _Attempt:
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


def _entries(timeline: Iterable[Any]) -> list[tuple[float, str, str]]:
    out: list[tuple[float, str, str]] = []
    for entry in timeline:
        if isinstance(entry, Mapping):
            out.append((float(entry["at"]), str(entry["event"]), str(entry.get("detail", ""))))
        else:
            at, event, detail = entry
            out.append((float(at), event, detail))
    out.sort(key=lambda e: e[0])  # stable: equal times keep their order
    return out


def attempts_of(timeline: Iterable[Any]) -> list[_Attempt]:
    """The task's attempts, oldest first, from its timeline."""
    attempts: list[_Attempt] = []
    current: _Attempt | None = None
    for at, event, detail in _entries(timeline):
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
            current = _Attempt(at, number, agent, event == "reclaimed")
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


class TaskSpans:
    """Emits the broker's spans of ended tasks as finished spans
    (:func:`wire.tracing.emit_span`: ids drawn here, times from the timeline). No I/O
    but the exporter's."""

    def task_ended(self, traceparent: str, task_id: str, capabilities: Sequence[str],
                   timeline: Sequence[Any], status: str, error_code: str | None,
                   attempts: int) -> None:
        """Emit the spans of a task that ended with ``status`` (a final state's value)
        after ``attempts`` attempts. A malformed or unsampled ``traceparent``, or an empty
        timeline, emits nothing; this never raises for bad input."""
        try:
            self._emit(traceparent, task_id, capabilities, timeline, status, error_code,
                       attempts)
        except (ValueError, TypeError, KeyError, IndexError):
            return  # a timeline we do not understand must not break the broker

    def _emit(self, traceparent: str, task_id: str, capabilities: Sequence[str],
              timeline: Sequence[Any], status: str, error_code: str | None,
              attempts: int) -> None:
        parent = parse_traceparent(traceparent)
        entries = _entries(timeline)
        if parent is None or not parent[2] or not entries:
            return
        trace_id, parent_id, _ = parent
        start, end = entries[0][0], entries[-1][0]
        task_span = new_span_id()
        events = [(event, {"detail": detail} if detail else None, _ns(at))
                  for at, event, detail in entries[1:-1]
                  if event not in ("dispatched", "running", "reclaimed")]
        tries = attempts_of(entries)
        first = tries[0].start if tries else end
        emit_span(QUEUE_WAIT_SPAN, trace_id, new_span_id(), task_span, _ns(start),
                  _ns(first), {ORCH_TASK_ID: task_id})
        for attempt in tries:
            attrs: dict[str, Any] = {ORCH_TASK_ID: task_id, ORCH_ATTEMPT: attempt.number,
                                     ORCH_OUTCOME: attempt.outcome or status}
            if attempt.agent:
                attrs[GEN_AI_AGENT_ID] = attempt.agent
            if attempt.reason:
                attrs[ORCH_REASON] = attempt.reason
            if attempt.reclaimed:
                attrs[ORCH_RECLAIMED] = True
            outcome = attempt.outcome
            failure = outcome if outcome in ATTEMPT_ENDINGS else \
                (error_code or outcome) if outcome in FAILED_STATES else None
            emit_span(DISPATCH_SPAN, trace_id, new_span_id(), task_span,
                      _ns(attempt.start), _ns(attempt.end if attempt.end is not None else end),
                      attrs, error=None if failure is None else (failure, attempt.reason),
                      events=() if attempt.running_at is None
                      else (("running", None, _ns(attempt.running_at)),))
        emit_span(TASK_SPAN, trace_id, task_span, parent_id, _ns(start), _ns(end),
                  {ORCH_TASK_ID: task_id, ORCH_CAPABILITIES: list(capabilities),
                   ORCH_TASK_STATUS: status, ORCH_ATTEMPTS: attempts,
                   MESSAGING_SYSTEM: "zeromq"}, "server",
                  (error_code or status, status) if status in FAILED_STATES else None,
                  events)


def _ns(wall_s: float) -> int:
    """Wall-clock seconds as nanoseconds, to the microsecond (what a float holds)."""
    return round(wall_s * 1e6) * 1000


__all__ = ["DISPATCH_SPAN", "QUEUE_WAIT_SPAN", "TASK_SPAN", "TaskSpans", "attempts_of"]
