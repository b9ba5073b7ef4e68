"""Exceptions of the workflow runtime; :class:`WorkflowError` is the root of all of them.

Every one is an :class:`agent_sdk.OrchestratorError`, so a caller that catches the SDK's
root catches these too. Each carries the data a caller needs (the run id, the step's
path, the error code), and its message is one line.
"""

from __future__ import annotations

from agent_sdk import OrchestratorError


class WorkflowError(OrchestratorError):
    """Raised for any failure the workflow runtime reports on purpose."""


class WorkflowInputError(WorkflowError, ValueError):
    """Raised when a workflow's input (or a step's input) cannot be used: a map-reduce
    given something other than a list, an input too large to keep in a run record, a
    malformed run id."""


class NoAgentFor(WorkflowError, LookupError):
    """Raised when a step names an agent (or capability) that no live agent offers, when
    a workflow is started from Python (a definition run from a file waits instead).

    Attributes:
        missing: the names and capabilities nobody offers, as ``agent NAME`` or
            ``capability CAP``.
        available: what the live agents offer, the same way.
    """

    def __init__(self, missing: list[str], available: list[str]) -> None:
        offered = ", ".join(available) if available else "no agent is live"
        super().__init__(f"no live agent for {', '.join(missing)} (live: {offered})")
        self.missing = missing
        self.available = available


class StepFailed(WorkflowError):
    """Raised inside a run when a step failed and nothing absorbs the failure (a
    map-reduce below its ``min_success`` absorbs none either).

    Attributes:
        path: the step's place in the workflow (``build/audit/map[3]``).
        code: the stable error code (the task's, or the runtime's own).
        task_id: the broker task that failed, if a task did.
    """

    def __init__(self, path: str, code: str, message: str, task_id: str | None = None) -> None:
        super().__init__(f"step {path} failed ({code}): {message}")
        self.path = path
        self.code = code
        self.reason = message
        self.task_id = task_id


class RunEnded(WorkflowError):
    """Raised by ``execute`` (and the API's waits) when a run ended otherwise than
    succeeded; the subclasses say how.

    Attributes:
        run_id: the run.
        status: its final status (``failed``, ``cancelled``, ``rejected``).
        code: the error code (``step_failed``, ``deadline``, ``cancelled``, ...).
        path: the step where it ended, if one did.
    """

    def __init__(self, run_id: str, status: str, code: str, message: str,
                 path: str | None = None) -> None:
        where = f" at {path}" if path else ""
        super().__init__(f"run {run_id} {status}{where} ({code}): {message}")
        self.run_id = run_id
        self.status = status
        self.code = code
        self.reason = message
        self.path = path


class RunFailed(RunEnded):
    """Raised when a run failed: a step failed, its deadline passed, its input was bad."""


class RunCancelled(RunEnded):
    """Raised when a run was cancelled (``cancel_run`` or ``workflow cancel``)."""


class RunRejected(RunEnded):
    """Raised when a human rejected an approval step of a run; ``comment`` is theirs."""

    def __init__(self, run_id: str, message: str, path: str | None = None,
                 comment: str = "", by: str = "") -> None:
        super().__init__(run_id, "rejected", "rejected", message, path)
        self.comment = comment
        self.by = by


class RunNotFound(WorkflowError, LookupError):
    """Raised when the state service holds no run with the id."""

    def __init__(self, run_id: str) -> None:
        super().__init__(f"no workflow run {run_id!r}")
        self.run_id = run_id


class RunStateError(WorkflowError):
    """Raised when a run's status does not allow the operation: approving a run that
    waits for no approval, resuming a run that already ended.

    Attributes:
        run_id: the run.
        status: its status when the operation was refused.
    """

    def __init__(self, run_id: str, status: str, message: str) -> None:
        super().__init__(f"run {run_id} is {status}: {message}")
        self.run_id = run_id
        self.status = status


class AlreadyAnswered(RunStateError):
    """Raised when an approval step was answered already (by ``by`` at ``at``)."""

    def __init__(self, run_id: str, status: str, path: str, by: str, at: float,
                 approved: bool) -> None:
        verdict = "approved" if approved else "rejected"
        super().__init__(run_id, status, f"the approval {path} was already {verdict} by "
                         f"{by or 'someone'}")
        self.path = path
        self.by = by
        self.at = at
        self.approved = approved


__all__ = [
    "AlreadyAnswered", "NoAgentFor", "RunCancelled", "RunEnded", "RunFailed", "RunNotFound",
    "RunRejected", "RunStateError", "StepFailed", "WorkflowError", "WorkflowInputError",
]
