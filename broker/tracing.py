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

The timeline is read as attempts by :mod:`wire.timeline`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

from wire.timeline import ATTEMPT_ENDINGS, FAILED_STATES, attempts_of, timeline_entries
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
        entries = timeline_entries(timeline)
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


__all__ = ["DISPATCH_SPAN", "QUEUE_WAIT_SPAN", "TASK_SPAN", "TaskSpans"]
