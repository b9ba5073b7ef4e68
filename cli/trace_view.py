"""What ``orchestrator trace`` prints: a task's timeline read as attempts, and a workflow
run's timeline with the traces of its steps' tasks.

The broker keeps one timeline per task (``submitted``, ``dispatched``, ``running``,
``requeued``, ``retrying``, ``second_opinion``, ``reclaimed``, ``restored``, the final
status). It does not keep attempts as such: :mod:`wire.timeline` reads them back from
it (:func:`attempts_of` adds what is printed beside them). Each ``dispatched`` entry names
its agent (``attempt N on AGENT_ID``); for a timeline of an older broker that did not,
the agent is taken from the reason that ended the attempt (``agent X dead``, ``no sign of
life from X``, ``failed on X``), and the last attempt by the task's ``agent`` (a name).

Pure functions over the documents the broker and the state service return: fetching is
the command's (:mod:`cli.tasks`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import click

if TYPE_CHECKING:
    from workflows import RunDetails

#: The statuses a task's last timeline event can have once it ended.
ENDED: Final = frozenset({"succeeded", "failed", "timed_out", "cancelled", "rejected"})
#: Reasons that name the agent an attempt was lost on or failed on (lifecycle.py and
#: agents.py of the broker write them).
_AGENT_IN_REASON: Final = (re.compile(r"^agent (\S+) "), re.compile(r"^no sign of life from (\S+) "),
                           re.compile(r"^failed on (\S+) "))
#: What an event that ends an attempt says of it.
_ENDING_OUTCOME: Final = {"requeued": "lost", "retrying": "failed", "second_opinion": "failed",
                          "restored": "interrupted"}


@dataclass
class Attempt:
    """One attempt of a task, as read from its timeline.

    Attributes:
        number: 1 for the first.
        agent: the id of the agent that held it, when the timeline says.
        agent_name: the agent's name, when only that is known (the last attempt).
        queued_at: since when it waited for an agent (submission, or the end of the
            previous attempt: a retry's back-off counts as waiting).
        dispatched_at: when it went to the agent.
        running_at: when the agent said it started (the broker keeps this for the last
            attempt only).
        ended_at: when it ended (None: still on the agent).
        outcome: ``lost``, ``failed``, ``interrupted`` or the task's final status.
        reason: why it ended, as the broker said.
    """

    number: int
    agent: str | None = None
    agent_name: str | None = None
    queued_at: float | None = None
    dispatched_at: float | None = None
    running_at: float | None = None
    ended_at: float | None = None
    outcome: str | None = None
    reason: str = ""

    def to_doc(self) -> dict[str, Any]:
        return {"attempt": self.number, "agent": self.agent, "agent_name": self.agent_name,
                "dispatched_at": self.dispatched_at, "running_at": self.running_at,
                "ended_at": self.ended_at, "outcome": self.outcome or "in_progress",
                "reason": self.reason, "queued_s": _span(self.queued_at, self.dispatched_at),
                "run_s": _span(self.dispatched_at, self.ended_at)}

    def who(self) -> str:
        """The agent, for people."""
        if self.agent:
            return self.agent
        if self.agent_name:
            return f"an agent named {self.agent_name}"
        return "an unrecorded agent"


@dataclass
class Reading:
    """A task's timeline read as attempts, with a note on the timeline's events that
    end a wait or an attempt (how long it took)."""

    attempts: list[Attempt] = field(default_factory=list)
    notes: dict[int, str] = field(default_factory=dict)


def _span(start: float | None, end: float | None) -> float | None:
    return None if start is None or end is None else round(end - start, 6)


def _agent_in(reason: str) -> str | None:
    for pattern in _AGENT_IN_REASON:
        found = pattern.match(reason)
        if found:
            return found.group(1)
    return None


def attempts_of(document: dict[str, Any]) -> Reading:
    """A task document's attempts (read by :func:`wire.timeline.attempts_of`, the one
    reading of the broker's timeline), with the notes to print beside its events."""
    from wire.timeline import attempts_of as read_attempts

    timeline = document.get("timeline") or []
    index = {(float(e["at"]), e["event"]): i for i, e in enumerate(timeline)}
    waiting_since = next((float(e["at"]) for e in timeline if e["event"] == "submitted"),
                         None)
    reading = Reading()
    notes = reading.notes
    for read in read_attempts(timeline):
        attempt = Attempt(read.number, agent=read.agent or _agent_in(read.reason),
                          queued_at=waiting_since, dispatched_at=read.start,
                          running_at=read.running_at, ended_at=read.end)
        reading.attempts.append(attempt)
        waited = _span(waiting_since, read.start)
        at = index.get((read.start, "dispatched"))
        if waited is not None and at is not None:
            notes[at] = f"waited {waited:.3f} s"
        at = index.get((read.running_at, "running")) if read.running_at is not None else None
        if at is not None and read.running_at is not None:
            notes[at] = f"{read.running_at - read.start:.3f} s after dispatch"
        if read.end is not None:
            _end(attempt, read.outcome, read.reason, document)
            at = index.get((read.end, read.outcome))
            if at is not None:
                notes[at] = f"attempt {read.number} ran {read.end - read.start:.3f} s"
        waiting_since = read.end
    if reading.attempts and reading.attempts[-1].agent is None and document.get("agent"):
        # The broker names the last attempt's agent only in the task's ``agent``.
        reading.attempts[-1].agent_name = document["agent"]
    return reading


def _end(attempt: Attempt, event: str, detail: str, document: dict[str, Any]) -> None:
    """Say how ``attempt`` ended, from the event that ended it."""
    attempt.outcome = _ENDING_OUTCOME.get(event, event)
    if event in ENDED:
        error = document.get("error")
        attempt.reason = f"{error['code']}: {error['message']}" if error else ""
    else:
        attempt.reason = detail


def task_document(document: dict[str, Any], kind: bool = True) -> dict[str, Any]:
    """The broker's trace of a task, its subtasks' too, each with its attempts
    (``attempt_details``); ``kind`` marks the top one as a task's trace."""
    out: dict[str, Any] = {"kind": "task"} if kind else {}
    out.update(document)
    if "timeline" in document:
        out["attempt_details"] = [a.to_doc() for a in attempts_of(document).attempts]
    if "children" in document:
        out["children"] = [task_document(child, kind=False) for child in document["children"]]
    return out


# ------------------------------------------------------------------------- a task, printed


def _offset(at: float, base: float) -> str:
    return f"+{at - base:.3f} s"


def print_task(document: dict[str, Any], base: float | None = None, indent: int = 0) -> None:
    """Print a task's trace: a header, its timeline (offsets from ``base``, the traced
    task's or run's submission), its attempts, its result, then its subtasks."""
    pad = "  " * indent
    timeline = document.get("timeline") or []
    if base is None:
        base = float(timeline[0]["at"]) if timeline else 0.0
    header = f"{pad}task {document['task_id']}  {document['status']}"
    if document.get("capabilities"):
        header += f"  [{', '.join(document['capabilities'])}]"
    click.echo(header)
    if not timeline:
        # A subtask past the trace's depth, or no longer retained by the broker.
        return
    reading = attempts_of(document)
    width = max(len(e["event"]) for e in timeline)
    for index, event in enumerate(timeline):
        detail = event.get("detail") or ""
        if event["event"] == "dispatched":
            attempt = _attempt_at(reading, float(event["at"]))
            if attempt is not None:
                detail = f"attempt {attempt.number} to {attempt.who()}"
        note = reading.notes.get(index)
        line = f"{pad}  {_offset(float(event['at']), base):>10}  {event['event']:<{width}}"
        line += f"  {detail}" if detail else ""
        line += f"  ({note})" if note else ""
        click.echo(line.rstrip())
    for attempt in reading.attempts:
        outcome = attempt.outcome or "in progress"
        reason = f" ({attempt.reason})" if attempt.reason else ""
        ran = _span(attempt.dispatched_at, attempt.ended_at)
        took = f"; waited {attempt.to_doc()['queued_s'] or 0:.3f} s" + \
            (f", ran {ran:.3f} s" if ran is not None else "")
        click.echo(f"{pad}  attempt {attempt.number} on {attempt.who()}: {outcome}{reason}"
                   f"{took}")
    click.echo(f"{pad}  result: {_result_line(document, timeline)}")
    children = document.get("children") or []
    if children:
        click.echo(f"{pad}  subtasks:")
        for child in children:
            print_task(child, base, indent + 2)


def _attempt_at(reading: Reading, at: float) -> Attempt | None:
    """The attempt dispatched at ``at``."""
    return next((a for a in reading.attempts if a.dispatched_at == at), None)


def _result_line(document: dict[str, Any], timeline: list[dict[str, Any]]) -> str:
    status = document["status"]
    if status not in ENDED:
        return f"{status} (not finished)"
    line = status
    error = document.get("error")
    if error:
        line += f" ({error['code']}: {error['message']})"
    attempts = document.get("attempts")
    if attempts:
        line += f" after {attempts} attempt{'s' if attempts != 1 else ''}"
    took = _span(float(timeline[0]["at"]), float(timeline[-1]["at"]))
    if took is not None:
        line += f", {took:.3f} s from submission"
    return line


# ------------------------------------------------------------------------- a run


def run_document(details: RunDetails, traces: dict[str, dict[str, Any] | None]
                 ) -> dict[str, Any]:
    """A run's trace: its record's timeline with its steps' starts and ends merged in,
    and each step with its task's trace (None: not a task, or no longer retained)."""
    steps = []
    events: list[dict[str, Any]] = [
        {"at": h.at, "event": h.event, "detail": _history_detail(h)} for h in details.history]
    for step in details.steps:
        task = traces.get(step.task_id) if step.task_id else None
        timeline = (task or {}).get("timeline") or []
        started = float(timeline[0]["at"]) if timeline else None
        ended = task.get("finished_at") if task else None
        steps.append({"path": step.path, "status": step.status, "task_id": step.task_id,
                      "agent": step.agent, "error": step.error, "started_at": started,
                      "ended_at": ended, "duration_s": _span(started, ended),
                      "task": task_document(task, kind=False) if task else None})
        if started is not None:
            events.append({"at": started, "event": "step_started",
                           "detail": f"{step.path} (task {step.task_id})"})
        if ended is not None:
            events.append({"at": ended, "event": "step_ended",
                           "detail": f"{step.path} {step.status} "
                                     f"(took {_span(started, ended) or 0:.3f} s)"})
    events.sort(key=lambda e: e["at"])
    base = details.created_at
    for event in events:
        event["offset_s"] = round(event["at"] - base, 6)
    return {"kind": "run", "run_id": details.run_id, "workflow": details.workflow,
            "status": details.status.value, "created_at": details.created_at,
            "started_at": details.started_at, "finished_at": details.finished_at,
            "duration_s": _span(details.created_at, details.finished_at),
            "error": details.error.to_doc() if details.error is not None else None,
            "timeline": events, "steps": steps}


def _history_detail(entry: Any) -> str:
    """One line of what a run's history entry says besides its event."""
    parts = [f"by {entry.by}" if entry.by else "", entry.path,
             "" if entry.approved is None else ("approved" if entry.approved else "rejected"),
             repr(entry.comment) if entry.comment else "", entry.detail]
    return "  ".join(p for p in parts if p)


def print_run(document: dict[str, Any]) -> None:
    """Print a run's trace (:func:`run_document`): its timeline, then each step with its
    task's trace, offsets from the run's creation."""
    base = float(document["created_at"])
    click.echo(f"run {document['run_id']}  workflow {document['workflow']}  "
               f"{document['status']}")
    width = max((len(e["event"]) for e in document["timeline"]), default=0)
    for event in document["timeline"]:
        click.echo(f"  {_offset(float(event['at']), base):>10}  {event['event']:<{width}}  "
                   f"{event['detail']}".rstrip())
    error = document.get("error")
    took = document.get("duration_s")
    end = document["status"] + (f" ({error['code']}: {error['message']})" if error else "")
    click.echo(f"  result: {end}" + (f", {took:.3f} s from creation" if took is not None
                                     else " (not finished)"))
    if not document["steps"]:
        return
    click.echo("  steps:")
    for step in document["steps"]:
        error = f"  {step['error']}" if step["error"] else ""
        took = f"  {step['duration_s']:.3f} s" if step["duration_s"] is not None else ""
        click.echo(f"    {step['path']}  {step['status']}{took}{error}")
        if step["task"] is not None:
            print_task(step["task"], base, indent=3)
        elif step["task_id"]:
            click.echo(f"      task {step['task_id']}: no longer retained by the broker")
