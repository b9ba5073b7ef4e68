"""The reviewer agent: security audit, code review and performance analysis of files.

``python -m agent_sdk run agents.reviewer:ReviewerAgent --broker URL``

Capabilities ``security_audit`` (bandit plus our ``S1xx`` checks), ``code_review``
(complexity, long functions, broad excepts, mutable defaults, unused names, and the
security findings of medium severity and up) and ``performance_analysis`` (``P1xx``). A
task asking for none of them by capability (the seed's ``Task(code=...)`` run directly)
gets all three.

Input (``task.data``): ``{"files": [{"path", "content"}...]}``, a change
``{"change": label, "files": [{"path", "content", "status", "changed_lines"}...]}``
(only findings on changed lines are reported, see :mod:`agents.analysis.changes`), or
``{"code": "..."}`` (one file, ``snippet.py``).

Output ``data``: ``{"kind": "findings", "analyses", "findings", "files", "change",
"approved", "counts"}`` (see :func:`build_data`), and the extras ``approved``, ``issues``
(severity -> findings) and ``suggestions`` (one line per distinct fix).

The files are written to a throwaway :class:`~agents.sandbox.Workspace`; long-lived worker
processes (:class:`~agents.analysis.pool.WorkerPool`) analyse them there, under a per-file
time limit and a memory limit. Cancelling a task kills the process group of the worker
doing it at once; a fresh worker replaces it.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from agent_sdk import BaseAgent, Result, Task
from agent_sdk.errors import OrchestratorError, PermanentFailure, RetryableError
from agents.analysis import CAPABILITY_ANALYSES, Analysis, FileStatus
from agents.analysis.changes import LineRanges, on_changed_lines, parse_ranges
from agents.analysis.pool import (
    DEFAULT_BATCH_FILES,
    FileOutcome,
    WorkerError,
    WorkerPool,
)
from agents.findings import Category, Finding, Severity, ranked
from agents.sandbox import SandboxError, Workspace, privilege_note

logger = logging.getLogger(__name__)

#: Bus topic of progress events: ``{"task", "worker", "files"}`` as a batch starts.
PROGRESS_TOPIC: Final = "reviewer.progress"
#: How long a progress event waits for a subscriber before it is dropped.
PROGRESS_SUBSCRIBER_WAIT_S: Final = 2.0
#: The seed's one-file form is analysed under this name.
SNIPPET_PATH: Final = "snippet.py"
#: Suffixes analysed as Python (and files whose first line is a python shebang).
PYTHON_SUFFIXES: Final = (".py", ".pyi", ".pyw")
#: Defaults of :class:`ReviewerConfig`: one worker (two reviewers share a 2-core machine).
DEFAULT_WORKERS: Final = 1
DEFAULT_FILE_TIMEOUT_S: Final = 60.0
DEFAULT_MEMORY_MB: Final = 1024
#: Order of the analyses in a result.
_ORDER: Final = (Analysis.SECURITY, Analysis.REVIEW, Analysis.PERFORMANCE)


def _env_number(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number, not {raw!r}") from None
    if value <= 0:
        raise ValueError(f"{name} must be above 0, not {raw!r}")
    return value


@dataclass(frozen=True, slots=True)
class ReviewerConfig:
    """The reviewer's tunables.

    Attributes:
        workers: analysis worker processes (and tasks at once); ``ORCH_REVIEWER_WORKERS``.
        file_timeout_s: most time one file's analysis may take; ``ORCH_ANALYSIS_TIMEOUT_S``.
        memory_mb: each worker's memory limit; ``ORCH_ANALYSIS_MEMORY_MB``.
        batch_files: most files sent to a worker at once; ``ORCH_ANALYSIS_BATCH_FILES``.
    """

    workers: int = DEFAULT_WORKERS
    file_timeout_s: float = DEFAULT_FILE_TIMEOUT_S
    memory_mb: int = DEFAULT_MEMORY_MB
    batch_files: int = DEFAULT_BATCH_FILES

    @classmethod
    def from_env(cls) -> ReviewerConfig:
        """The configuration from the environment, defaults where unset.

        Raises:
            ValueError: a variable that is not a positive number (naming it).
        """
        return cls(workers=int(_env_number("ORCH_REVIEWER_WORKERS", DEFAULT_WORKERS)),
                   file_timeout_s=_env_number("ORCH_ANALYSIS_TIMEOUT_S",
                                              DEFAULT_FILE_TIMEOUT_S),
                   memory_mb=int(_env_number("ORCH_ANALYSIS_MEMORY_MB", DEFAULT_MEMORY_MB)),
                   batch_files=int(_env_number("ORCH_ANALYSIS_BATCH_FILES",
                                               DEFAULT_BATCH_FILES)))


@dataclass(frozen=True, slots=True)
class CarriedFile:
    """A file a task carries: path, text, and its changed lines in a change review."""

    path: str
    content: str
    changed: LineRanges | None = None

    @property
    def is_python(self) -> bool:
        """Whether to analyse it: a Python suffix, or a python shebang."""
        if self.path.endswith(PYTHON_SUFFIXES):
            return True
        first = self.content.split("\n", 1)[0]
        return first.startswith("#!") and "python" in first


@dataclass(frozen=True, slots=True)
class ReviewRequest:
    """What a task asks the reviewer: files (maybe a change) and which analyses."""

    files: tuple[CarriedFile, ...]
    change: str | None
    analyses: tuple[Analysis, ...]

    @classmethod
    def from_task(cls, task: Task) -> ReviewRequest:
        """Read a task's input (see the module's doc).

        Raises:
            TypeError: the input is not a map, or a file record is malformed.
            ValueError: the input has neither ``files`` nor ``code``, or a path twice.
        """
        asked = [CAPABILITY_ANALYSES[c] for c in task.capabilities if c in CAPABILITY_ANALYSES]
        analyses = tuple(a for a in _ORDER if a in asked) or _ORDER
        data = task.data
        if isinstance(data, str):
            return cls((CarriedFile(SNIPPET_PATH, data),), None, analyses)
        if not isinstance(data, Mapping) and ("files" in task.fields or "code" in task.fields):
            data = task.fields  # the input came as fields beside other data
        if not isinstance(data, Mapping):
            raise TypeError(f"a review needs {{'files': [...]}} or {{'code': ...}}, not a "
                             f"{type(data).__name__}")
        change = data.get("change")
        if "files" in data:
            files = tuple(_carried(raw, i) for i, raw in enumerate(data["files"] or ()))
        elif isinstance(data.get("code"), str):
            files = (CarriedFile(SNIPPET_PATH, data["code"]),)
        else:
            raise ValueError("a review needs {'files': [{'path', 'content'}...]} or "
                             "{'code': '...'}")
        paths = [f.path for f in files]
        if len(set(paths)) != len(paths):
            raise ValueError("a review carries the same path twice")
        return cls(files, None if change is None else str(change), analyses)


def _carried(raw: Any, index: int) -> CarriedFile:
    if not isinstance(raw, Mapping) or not isinstance(raw.get("path"), str) or \
            not isinstance(raw.get("content", ""), str):
        raise TypeError(f"file {index} of the review is not {{'path': str, 'content': str}}")
    path = raw["path"]
    changed = raw.get("changed_lines")
    return CarriedFile(path, raw.get("content", ""),
                       None if changed is None else parse_ranges(changed, path))


class ReviewerAgent(BaseAgent):
    """Reviews code: security audit, code review, performance analysis (module doc).

    Args:
        config: the tunables; default :meth:`ReviewerConfig.from_env`.
        agent_id: this instance's id (default ``reviewer-<random>``).
    """

    def __init__(self, config: ReviewerConfig | None = None, *,
                 agent_id: str | None = None) -> None:
        self.config = config if config is not None else ReviewerConfig.from_env()
        super().__init__(name="reviewer", capabilities=list(CAPABILITY_ANALYSES),
                         max_concurrent=self.config.workers, agent_id=agent_id)
        self.pool = WorkerPool(self.config.workers, memory_mb=self.config.memory_mb,
                               file_timeout_s=self.config.file_timeout_s,
                               batch_files=self.config.batch_files)
        self._started: asyncio.Task[None] | None = None
        self._events: set[asyncio.Task[None]] = set()

    async def on_start(self) -> None:
        note = privilege_note()
        if note:
            logger.warning("reviewer: %s", note)
        await self._pool_ready()

    async def on_stop(self) -> None:
        await self.pool.close()

    async def _pool_ready(self) -> None:
        # Started once, by the first of on_start or a direct execute.
        if self._started is None:
            self._started = asyncio.ensure_future(self.pool.start())
        await asyncio.shield(self._started)

    async def execute(self, task: Task) -> Result:
        """Review the task's files; see the module's doc for input and output."""
        try:
            request = ReviewRequest.from_task(task)
        except (TypeError, ValueError) as error:
            raise PermanentFailure(str(error)) from None
        await self._pool_ready()
        python = [f for f in request.files if f.is_python]
        try:
            workspace = await asyncio.to_thread(
                Workspace, [{"path": f.path, "content": f.content} for f in python],
                prefix="orch-review-")
        except SandboxError as error:
            raise PermanentFailure(str(error)) from None
        try:
            outcomes = await self.pool.analyze(
                workspace.root, [f.path for f in python], [a.value for a in request.analyses],
                on_batch=lambda pid, files: self._progress(task.id, pid, len(files)))
        except WorkerError as error:
            raise RetryableError(str(error)) from None
        finally:
            await asyncio.to_thread(workspace.close)
        # Tens of thousands of findings take a while to rank: off the loop, so that
        # heartbeats go on meanwhile.
        return await asyncio.to_thread(_result, request, outcomes)

    def _progress(self, task_id: str, pid: int, count: int) -> None:
        """Tell the bus a batch started (tests and dashboards watch it); never fails."""
        if self._channel is None:
            return
        event = asyncio.ensure_future(self._publish_progress(
            {"task": task_id, "worker": pid, "files": count}))
        self._events.add(event)
        event.add_done_callback(self._events.discard)

    async def _publish_progress(self, event: dict[str, Any]) -> None:
        try:
            # Nobody listening: nothing to send. This also waits out a new bus
            # connection's first moments, when a publish would reach no one.
            await self.wait_for_subscribers(PROGRESS_TOPIC, PROGRESS_SUBSCRIBER_WAIT_S)
            await self.publish(PROGRESS_TOPIC, event)
        except OrchestratorError as error:  # WaitTimeout, BusUnavailable: no one to tell
            logger.debug("reviewer: progress not published: %s", error)


def _result(request: ReviewRequest, outcomes: Sequence[FileOutcome]) -> Result:
    data = build_data(request, outcomes)
    findings = [Finding.from_dict(f) for f in data["findings"]]
    return Result(data=data, approved=data["approved"], issues=issues_of(findings),
                  suggestions=suggestions_of(findings))


def build_data(request: ReviewRequest, outcomes: Sequence[FileOutcome]) -> dict[str, Any]:
    """A result's ``data`` from the files' outcomes (findings filtered to a change's
    lines, ranked worst first)."""
    by_path = {o.path: o for o in outcomes}
    files: list[dict[str, str]] = []
    findings: list[Finding] = []
    for carried in request.files:
        outcome = by_path.get(carried.path)
        if outcome is None:
            files.append({"path": carried.path, "status": FileStatus.ANALYZED.value,
                          "detail": "not Python: nothing to analyse"})
            continue
        files.append({"path": carried.path, "status": outcome.status.value,
                      "detail": outcome.detail})
        findings.extend(Finding.from_dict(f) for f in outcome.findings)
        if outcome.status in (FileStatus.TIME_LIMIT, FileStatus.MEMORY_LIMIT):
            findings.append(_limit_finding(outcome))
    changed = {f.path: f.changed for f in request.files if f.changed is not None}
    kept = ranked(_unique(on_changed_lines(findings, changed)))
    counts = {s.value: 0 for s in reversed(Severity)}
    for finding in kept:
        counts[finding.severity.value] += 1
    approved = counts[Severity.HIGH.value] == 0 and counts[Severity.CRITICAL.value] == 0
    return {"kind": "findings", "analyses": [a.value for a in request.analyses],
            "findings": [f.to_dict() for f in kept], "files": files,
            "change": request.change, "approved": approved, "counts": counts}


def _unique(findings: list[Finding]) -> list[Finding]:
    seen: set[tuple[str, int, str]] = set()
    out = []
    for finding in findings:
        if finding.key not in seen:
            seen.add(finding.key)
            out.append(finding)
    return out


def _limit_finding(outcome: FileOutcome) -> Finding:
    rule, name = ("A103", "time_limit") if outcome.status is FileStatus.TIME_LIMIT else \
        ("A104", "memory_limit")
    return Finding(category=Category.ANALYSIS, rule=rule, name=name,
                   message=f"the file was not analysed: {outcome.detail}",
                   severity=Severity.INFO, confidence=Severity.HIGH, path=outcome.path,
                   line=1, suggestion="Split the file, or raise the reviewer's limits "
                                      "(ORCH_ANALYSIS_TIMEOUT_S, ORCH_ANALYSIS_MEMORY_MB).")


def issues_of(findings: Sequence[Finding]) -> dict[str, list[dict[str, Any]]]:
    """The findings by severity, worst severity first (every severity present)."""
    issues: dict[str, list[dict[str, Any]]] = {s.value: [] for s in reversed(Severity)}
    for finding in findings:
        issues[finding.severity.value].append(finding.to_dict())
    return issues


def suggestions_of(findings: Sequence[Finding]) -> list[str]:
    """One line per distinct fix, in the order of the worst finding needing it."""
    return list(dict.fromkeys(f.suggestion for f in findings if f.suggestion))


__all__ = ["PROGRESS_TOPIC", "ReviewRequest", "ReviewerAgent", "ReviewerConfig",
           "build_data", "issues_of", "suggestions_of"]
