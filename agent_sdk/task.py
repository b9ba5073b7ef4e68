"""``Task`` and ``Result``: what an agent receives and returns, and a client gets back.

A task's payload travels as one msgpack map: ``{"data": data, **fields}``. ``task.data``
is the submitted data; every other field, and every key of ``data`` when it is a map,
reads as an attribute (``task.query``, ``task.code``). A result travels the same way:
``{"data": data, "confidence": c, **extras}``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from wire.codec import packb, unpackb
from wire.tasks import ErrorCode, TaskStatus

#: Marks "no data given" (``None`` is a valid value for data).
_MISSING: Final[Any] = object()

_SUCCEEDED: Final = TaskStatus.SUCCEEDED.value

#: Statuses after which a task never changes again.
TERMINAL_STATUSES: Final = frozenset(s.value for s in TaskStatus)


def encode_payload(data: Any = _MISSING, fields: dict[str, Any] | None = None) -> bytes:
    """The payload bytes for ``data`` and extra ``fields``."""
    if not fields:
        return packb({} if data is _MISSING else {"data": data})
    body = dict(fields)
    if data is not _MISSING:
        body["data"] = data
    return packb(body)


class Task:
    """A unit of work.

    Build one the way the rest of the code reads it: ``Task(data=item)``,
    ``Task(query="...")``, ``Task(specification=spec, language="python")``. Without
    ``data``, ``task.data`` is the map of the other fields.

    Attributes:
        id: the task id (the idempotency key).
        capabilities: capabilities the task requires.
        data: the payload data.
        fields: the payload's other fields.
        attempt: 1 for the first run, more when the broker dispatched it again.
        timeout_s: seconds left before the broker gives up on it.
        parent_id: the task that submitted this one as a subtask, if any.
    """

    __slots__ = ("id", "capabilities", "data", "fields", "attempt", "timeout_s", "parent_id")

    def __init__(self, data: Any = _MISSING, *, id: str = "", capabilities: tuple[str, ...] = (),
                 attempt: int = 1, timeout_s: float | None = None, parent_id: str | None = None,
                 **fields: Any) -> None:
        self.id = id
        self.capabilities = tuple(capabilities)
        self.fields = fields
        self.data = fields if data is _MISSING else data
        self.attempt = attempt
        self.timeout_s = timeout_s
        self.parent_id = parent_id

    @classmethod
    def from_wire(cls, task_id: str, payload: Any, attempt: int, timeout_s: float | None,
                  capabilities: tuple[str, ...], parent_id: str | None) -> Task:
        """Decode a task as an agent receives it (called once per task: kept lean)."""
        body = unpackb(payload) if payload else {}
        task = cls.__new__(cls)
        if type(body) is dict:
            data = body.pop("data", _MISSING)
            task.fields = body
            task.data = body if data is _MISSING else data
        else:
            task.fields = {}
            task.data = body
        task.id = task_id
        task.capabilities = capabilities
        task.attempt = attempt
        task.timeout_s = timeout_s
        task.parent_id = parent_id
        return task

    def to_payload(self) -> bytes:
        """The payload bytes of this task, as a client submits them."""
        return encode_payload(self.data if self.data is not self.fields else _MISSING, self.fields)

    def __getattr__(self, name: str) -> Any:
        # Only called when normal lookup fails: fields, then keys of a map payload.
        if name.startswith("__"):
            raise AttributeError(name)
        fields = object.__getattribute__(self, "fields")
        if name in fields:
            return fields[name]
        data = object.__getattribute__(self, "data")
        if type(data) is dict and name in data:
            return data[name]
        raise AttributeError(f"task {self.id or '(unsubmitted)'} has no field {name!r}")

    def get(self, name: str, default: Any = None) -> Any:
        """A payload field, or ``default``."""
        try:
            return getattr(self, name)
        except AttributeError:
            return default

    def __repr__(self) -> str:
        return f"Task(id={self.id!r}, capabilities={list(self.capabilities)!r}, data={self.data!r})"


@dataclass(frozen=True, slots=True)
class TaskError:
    """Why a task did not succeed: a stable ``code`` and a message for people."""

    code: str
    message: str

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class Result:
    """What ``execute`` returns, and what a client gets for a task.

    ``Result(data=..., confidence=0.9, code=..., approved=True)``: any extra keyword is
    kept and reads as an attribute. The broker adds ``status``, ``agent``, ``attempts``
    and timings on the way back to the client.
    """

    __slots__ = ("data", "confidence", "extras", "status", "error", "task_id", "agent",
                 "attempts", "queued_ms", "run_ms", "retryable")

    def __init__(self, data: Any = None, confidence: float = 1.0, **extras: Any) -> None:
        self.data = data
        self.confidence = confidence
        self.extras = extras
        self.status: str = _SUCCEEDED
        self.error: TaskError | None = None
        self.task_id: str = ""
        self.agent: str | None = None
        self.attempts: int = 0
        self.queued_ms: float | None = None
        self.run_ms: float | None = None
        #: for a failure: True a transient fault (retried), False never retried, None the
        #: task's own failure (retried only if the task asked for retries)
        self.retryable: bool | None = None

    @classmethod
    def failure(cls, code: str, message: str, status: str = TaskStatus.FAILED.value,
                retryable: bool | None = None, **extras: Any) -> Result:
        """A failed result with a stable error ``code``. ``retryable=True`` marks a
        transient fault of the agent (the broker retries it and counts it against the
        agent's circuit breaker, as for :class:`~agent_sdk.errors.RetryableError`);
        ``False`` tells the broker never to try again; None leaves it the task's own
        failure (see :class:`~agent_sdk.agent.BaseAgent`)."""
        result = cls(None, 0.0, **extras)
        result.status = status
        result.error = TaskError(code, message)
        result.retryable = retryable
        return result

    @property
    def ok(self) -> bool:
        """Whether the task succeeded."""
        return self.status == _SUCCEEDED

    @property
    def finished(self) -> bool:
        """Whether the task reached a terminal status (a FETCH may find it running)."""
        return self.status in TERMINAL_STATUSES

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        extras = object.__getattribute__(self, "extras")
        if name in extras:
            return extras[name]
        raise AttributeError(f"result has no field {name!r}")

    def to_payload(self) -> bytes:
        """The payload bytes of this result, as an agent sends them."""
        if not self.extras:
            return packb({"data": self.data, "confidence": self.confidence})
        body = dict(self.extras)
        body["data"] = self.data
        body["confidence"] = self.confidence
        return packb(body)

    @classmethod
    def from_wire(cls, task_id: str, status: str, payload: Any, error_code: str | None,
                  error_message: str | None, agent: str | None = None, attempts: int = 0,
                  queued_ms: float | None = None, run_ms: float | None = None) -> Result:
        """Decode a result as a client receives it (called once per task: kept lean)."""
        body: Any = {}
        if payload:
            try:
                body = unpackb(payload)
            except Exception as e:  # noqa: BLE001 - a broken payload is reported, not raised
                body = {}
                error_code = error_code or ErrorCode.BAD_FRAME.value
                error_message = error_message or f"result payload is not msgpack: {e}"
        result = cls.__new__(cls)
        if type(body) is dict:
            result.data = body.pop("data", None)
            result.confidence = body.pop("confidence", 1.0)
            result.extras = body
        else:
            result.data = body
            result.confidence = 1.0
            result.extras = {}
        result.task_id = task_id
        result.status = status
        result.error = TaskError(error_code, error_message or "") if error_code else None
        result.agent = agent
        result.attempts = attempts
        result.queued_ms = queued_ms
        result.run_ms = run_ms
        result.retryable = None
        return result

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly view (what ``--json`` prints)."""
        return {
            "task_id": self.task_id, "status": self.status, "data": self.data,
            "confidence": self.confidence, **self.extras,
            "error": None if self.error is None else {"code": self.error.code,
                                                      "message": self.error.message},
            "agent": self.agent, "attempts": self.attempts,
            "queued_ms": self.queued_ms, "run_ms": self.run_ms,
        }

    def __repr__(self) -> str:
        if self.error is not None:
            return f"Result(task_id={self.task_id!r}, status={self.status!r}, error={self.error})"
        return f"Result(task_id={self.task_id!r}, status={self.status!r}, data={self.data!r})"
