"""Agents for the fault-injection tests, run as real processes with ``python -m agent_sdk run``.

Every agent here is configured by environment variables (the ``cluster.agent`` fixture
upper-cases its keyword arguments into the environment):

``AGENT_NAME``, ``AGENT_CAPS`` (comma-separated), ``AGENT_MAX``
    name, capabilities and ``max_concurrent``.
``ECHO_DELAY_S``
    seconds each execution takes (the simulated workload); a task field ``delay_s``
    overrides it for that task.
``EXEC_LOG``
    a file each execution appends ``<task id>`` to when it starts: the checker counts
    executions across processes from it.
``DONE_LOG``
    a file each execution appends its task id to when its work is complete (after the
    delay, before it returns or raises).
``CANCEL_LOG``
    a file each execution appends its task id to when it is cancelled mid-work.
``SLOW_ATTEMPTS``
    only attempts 1..N of a task take the delay; later attempts take none.
``FAIL_ATTEMPTS``
    (FlakyAgent) attempts 1..N of every task raise; attempt N+1 succeeds.

How an agent here fails decides what the broker does with the task: ``RetryableError``
is a transient fault of the agent (retried by default, counted by its circuit breaker);
a plain exception (``RuntimeError``) is the task's own failure (retried only when the
task asked for retries, never counted against the agent by itself). A task field
``transient`` picks the first for the agents that take it.

Writes are small ``O_APPEND`` writes of one line, so several processes may share a file.
Sleeping here is the simulated work of a task, not test synchronisation.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from agent_sdk import BaseAgent, Result, RetryableError, Task


def append_line(env_var: str, line: str) -> None:
    """Append ``line`` to the file named by ``env_var`` (if set), in one write."""
    path = os.environ.get(env_var)
    if path:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, f"{line}\n".encode())
        finally:
            os.close(fd)


class CountingAgent(BaseAgent):
    """Logs each execution, works ``delay_s`` seconds, returns the task's data.

    Logs cancellation (CANCEL_LOG) and completion of the work (DONE_LOG), so a test can
    tell a task that was really stopped on the agent from one that ran to the end.
    """

    def __init__(self) -> None:
        super().__init__(name=os.environ.get("AGENT_NAME", "counting"),
                         capabilities=os.environ.get("AGENT_CAPS", "echo").split(","),
                         max_concurrent=int(os.environ.get("AGENT_MAX", "16")))
        self.delay_s = float(os.environ.get("ECHO_DELAY_S", "0"))
        slow = os.environ.get("SLOW_ATTEMPTS")
        self.slow_attempts = int(slow) if slow else None

    def outcome(self, task: Task) -> Any:
        """What the task returns once its work is done (subclasses raise instead)."""
        return Result(data=task.data, attempt=task.attempt)

    async def execute(self, task: Task) -> Result:
        append_line("EXEC_LOG", task.id)
        delay_s = float(task.fields.get("delay_s", self.delay_s))
        if self.slow_attempts is not None and task.attempt > self.slow_attempts:
            delay_s = 0.0
        try:
            if delay_s:
                await asyncio.sleep(delay_s)  # the simulated workload
        except asyncio.CancelledError:
            append_line("CANCEL_LOG", task.id)
            raise
        append_line("DONE_LOG", task.id)
        return self.outcome(task)


def failure(message: str, transient: bool) -> Exception:
    """The exception a task fails with: a transient fault of the agent
    (``RetryableError``), or the task's own failure (``RuntimeError``)."""
    return RetryableError(message) if transient else RuntimeError(message)


class RaisingAgent(CountingAgent):
    """``execute`` raises for every task, after its work (if any): ``RetryableError`` for
    tasks whose field ``transient`` is true, else ``RuntimeError``."""

    def outcome(self, task: Task) -> Any:
        raise failure(f"boom on {task.id} attempt {task.attempt}",
                      bool(task.fields.get("transient")))


class FlakyAgent(CountingAgent):
    """Attempts 1..FAIL_ATTEMPTS of every task raise; later attempts succeed. A flaky
    agent's failures are transient (``RetryableError``), except for tasks whose field
    ``transient`` is false (``RuntimeError``)."""

    def __init__(self) -> None:
        super().__init__()
        self.fail_attempts = int(os.environ.get("FAIL_ATTEMPTS", "1"))

    def error(self, task: Task, message: str) -> Exception:
        """What a failing attempt raises."""
        return failure(message, bool(task.fields.get("transient", True)))

    def outcome(self, task: Task) -> Any:
        if task.attempt <= self.fail_attempts:
            raise self.error(task, f"flaky failure on {task.id} attempt {task.attempt}")
        return super().outcome(task)


class SelectiveAgent(CountingAgent):
    """Fails tasks whose field ``fail`` is true with a transient fault of its own
    (``RetryableError``: what the circuit breaker counts); succeeds for the others."""

    def outcome(self, task: Task) -> Any:
        if task.fields.get("fail"):
            raise RetryableError(f"asked to fail: {task.id}")
        return super().outcome(task)


class PickyAgent(CountingAgent):
    """Refuses tasks whose field ``bad`` is true with ``ValueError`` (bad input: the
    task's own failure, which a retry would not mend); succeeds for the others."""

    def outcome(self, task: Task) -> Any:
        if task.fields.get("bad"):
            raise ValueError(f"bad input in {task.id}")
        return super().outcome(task)


class DeclaredFlakyAgent(FlakyAgent):
    """Attempts 1..FAIL_ATTEMPTS of every task raise ``ConnectionError``, a class the
    agent declares transient (``retry_on``); later attempts succeed."""

    retry_on = (ConnectionError,)

    def error(self, task: Task, message: str) -> Exception:
        return ConnectionError(message)
