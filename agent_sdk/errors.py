"""Exceptions of the agent SDK; :class:`OrchestratorError` is the root of all of them."""

from __future__ import annotations


class OrchestratorError(Exception):
    """Raised for any failure the SDK reports on purpose."""


class BrokerUnavailable(OrchestratorError):
    """Raised when the broker did not answer within the deadline."""

    def __init__(self, url: str, waited_s: float) -> None:
        super().__init__(f"no answer from the broker at {url} within {waited_s:g} s; "
                         "is it running? (start it with `orchestrator start`)")
        self.url = url
        self.waited_s = waited_s


class WaitTimeout(OrchestratorError, TimeoutError):
    """Raised when a client's own wait deadline passes (the task itself may go on)."""


class TaskNotFound(OrchestratorError, LookupError):
    """Raised when the broker knows no task with the id (or its result is past retention)."""

    def __init__(self, task_id: str, message: str = "") -> None:
        super().__init__(message or f"no task with id {task_id!r}")
        self.task_id = task_id


class RequestRefused(OrchestratorError):
    """Raised when the broker answers a request with ERROR; carries the stable ``code``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


class PermanentFailure(OrchestratorError):
    """Raise it in ``execute`` for a failure that a retry cannot fix (bad input, say):
    the task fails at once instead of being retried."""
