"""What a step produces (:class:`StepOutput`) and how a finished task is checkpointed.

A node's output is the same three parts as an agent's :class:`~agent_sdk.Result`: its
``data`` (what the next step of a pipeline gets), a ``confidence`` and named ``extras``
(``approved``, ``decision``, ``failed``...). A run's final output is the root's, and
``execute`` returns it as a ``Result``.

A finished task is checkpointed as one small map (an *entry*), keyed by the step's path:

    {"s": status, "t": task id, "a": agent,                 every entry
     "d": data, "c": confidence, "x": {extras}              a success, inline
     "e": [code, message]                                   a failure
     "ref": 1, "n": bytes}                                  a success kept by reference

A success whose entry would exceed :data:`INLINE_ENTRY_MAX_BYTES` is kept *by
reference*: the entry holds the task id only, and the result stays in the broker (held
until the run ends) to be fetched again with ``client.fetch(task_id)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

from agent_sdk import Result
from wire.tasks import TaskStatus

#: Entries up to this size are kept in the checkpoint itself; larger results by reference.
INLINE_ENTRY_MAX_BYTES: Final = 16 * 1024

SUCCEEDED: Final = TaskStatus.SUCCEEDED.value


@dataclass(frozen=True, slots=True)
class StepOutput:
    """A node's output: its data, confidence and extras (see the module docstring)."""

    data: Any = None
    confidence: float = 1.0
    extras: dict[str, Any] = field(default_factory=dict)

    def field(self, name: str) -> Any:
        """The extra ``name``, else the key ``name`` of a map ``data``, else None (so
        ``approved`` reads from ``Result(approved=True)`` and ``{"approved": True}``)."""
        if name in self.extras:
            return self.extras[name]
        if isinstance(self.data, dict):
            return self.data.get(name)
        return None

    def to_result(self, task_id: str = "") -> Result:
        """The output as an SDK ``Result`` (what ``execute`` returns)."""
        # "data" and "confidence" are the Result's own slots, not extras.
        extras = {k: v for k, v in self.extras.items() if k not in ("data", "confidence")}
        result = Result(self.data, self.confidence, **extras)
        result.task_id = task_id
        return result

    def to_doc(self) -> dict[str, Any]:
        """The output as stored in a run record."""
        doc: dict[str, Any] = {"data": self.data}
        if self.confidence != 1.0:
            doc["confidence"] = self.confidence
        if self.extras:
            doc["extras"] = dict(self.extras)
        return doc

    @classmethod
    def from_doc(cls, doc: Any) -> StepOutput:
        """Inverse of :meth:`to_doc` (anything else is taken as plain data)."""
        if not isinstance(doc, dict) or "data" not in doc:
            return cls(doc)
        extras = doc.get("extras")
        return cls(doc["data"], float(doc.get("confidence", 1.0)),
                   dict(extras) if isinstance(extras, dict) else {})

    @classmethod
    def from_result(cls, result: Result) -> StepOutput:
        """A task's output: its result's data, confidence and extras."""
        return cls(result.data, float(result.confidence), dict(result.extras))


def leaf_entry(result: Result) -> dict[str, Any]:
    """The checkpoint entry of a finished task (inline; see :func:`reference_entry`)."""
    entry: dict[str, Any] = {"s": result.status, "t": result.task_id}
    if result.agent:
        entry["a"] = result.agent
    if result.status == SUCCEEDED:
        entry["d"] = result.data
        if result.confidence != 1.0:
            entry["c"] = result.confidence
        if result.extras:
            entry["x"] = result.extras
    else:
        error = result.error
        entry["e"] = [error.code, error.message] if error is not None else \
            [result.status, f"the task ended {result.status}"]
    return entry


def reference_entry(entry: dict[str, Any], size: int) -> dict[str, Any]:
    """The by-reference form of a success's ``entry`` whose inline form is ``size``
    bytes."""
    slim: dict[str, Any] = {"s": entry["s"], "t": entry["t"], "ref": 1, "n": size}
    if "a" in entry:
        slim["a"] = entry["a"]
    return slim


def is_reference(entry: dict[str, Any]) -> bool:
    """Whether ``entry`` holds its result by reference."""
    return bool(entry.get("ref"))


def entry_ok(entry: dict[str, Any]) -> bool:
    """Whether the checkpointed task succeeded."""
    return entry.get("s") == SUCCEEDED


def entry_output(entry: dict[str, Any]) -> StepOutput:
    """The output of an inline success entry."""
    extras = entry.get("x")
    return StepOutput(entry.get("d"), float(entry.get("c", 1.0)),
                      dict(extras) if isinstance(extras, dict) else {})


def entry_error(entry: dict[str, Any]) -> tuple[str, str]:
    """``(code, message)`` of a failure entry."""
    error = entry.get("e")
    if isinstance(error, (list, tuple)) and len(error) == 2:
        return str(error[0]), str(error[1])
    status = str(entry.get("s", "failed"))
    return status, f"the task ended {status}"


__all__ = [
    "INLINE_ENTRY_MAX_BYTES", "StepOutput", "entry_error", "entry_ok", "entry_output",
    "is_reference", "leaf_entry", "reference_entry",
]
