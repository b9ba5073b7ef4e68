"""Agents for the workflow tests, run as real processes (``python -m agent_sdk run``).

One class, :class:`WorkAgent`, configured per process by environment variables:

- ``AGENT_NAME``, ``AGENT_CAPS`` (comma-separated), ``AGENT_MAX`` (max_concurrent);
- ``AGENT_OP``: what it does (a task's field ``op`` overrides it): ``tag`` appends its tag
  to the data (a list), ``square`` squares ``data["value"]`` (``data["fail"]`` makes it
  fail for good), ``sum`` reduces, ``vote`` answers ``VOTE`` with ``VOTE_CONFIDENCE``,
  ``produce`` writes a draft, ``review`` approves from round ``APPROVE_AT`` on,
  ``audit`` reports the files a task carries (path, digest, lines), ``merge`` flattens;
- ``TAG``: the tag of ``tag`` (default the agent name);
- ``HANG_ON``: a capability; tasks requiring it never finish (the agent publishes
  ``{"agent_id", "task_id"}`` on the bus topic ``test.hanging`` first, so that a test
  can kill it mid-task without sleeping);
- ``EXEC_DIR``: a directory; every execution appends ``{"event": "start"|"end",
  "task", "agent", "at"}`` (``at``: ``time.monotonic()``, one clock for every process of
  the machine) to ``<agent id>.jsonl`` there, so tests count executions per task id and
  measure concurrency across processes.

A task field ``sleep_s`` makes the execution take that long (the simulated work).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from agent_sdk import BaseAgent, PermanentFailure, Result, Task



class WorkAgent(BaseAgent):
    """The configurable test agent (see the module docstring)."""

    #: name and capability when the environment names none
    default_name = "work"

    def __init__(self) -> None:
        super().__init__(name=os.environ.get("AGENT_NAME", self.default_name),
                         capabilities=os.environ.get("AGENT_CAPS", self.default_name).split(","),
                         max_concurrent=int(os.environ.get("AGENT_MAX", "4")))
        self.op = os.environ.get("AGENT_OP", "tag")
        self.hang_on = os.environ.get("HANG_ON", "")
        exec_dir = os.environ.get("EXEC_DIR")
        self.log_path = Path(exec_dir) / f"{self.agent_id}.jsonl" if exec_dir else None

    def _log(self, event: str, task: Task) -> None:
        if self.log_path is None:
            return
        line = json.dumps({"event": event, "task": task.id, "agent": self.agent_id,
                           "at": time.monotonic()})
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(line + "\n")

    async def execute(self, task: Task) -> Result:
        self._log("start", task)
        try:
            if self.hang_on and self.hang_on in task.capabilities:
                # A new publisher's first messages go nowhere until the subscription
                # reaches it.
                await self.wait_for_subscribers("test.hanging")
                await self.publish("test.hanging", {"agent_id": self.agent_id,
                                                    "task_id": task.id})
                # Never set: the task hangs until the test kills this process (or the
                # broker cancels the task), with no timer standing in for either.
                await asyncio.Event().wait()
            sleep_s = float(task.get("sleep_s", 0) or 0)
            if sleep_s:
                await asyncio.sleep(sleep_s)  # the simulated work, not a wait
            return getattr(self, f"_{task.get('op', self.op)}")(task)
        finally:
            self._log("end", task)

    def _tag(self, task: Task) -> Result:
        data = task.data if isinstance(task.data, list) else [task.data]
        return Result(data=[*data, os.environ.get("TAG", self.name)], agent_id=self.agent_id)

    def _square(self, task: Task) -> Result:
        item: Any = task.data
        value = item["value"] if isinstance(item, dict) else item
        if isinstance(item, dict) and item.get("fail"):
            raise PermanentFailure(f"item {value} is refused")
        return Result(data=value * value, agent_id=self.agent_id)

    def _sum(self, task: Task) -> Result:
        values = list(task.data)
        return Result(data={"sum": sum(values), "values": values,
                            "failed": task.get("failed")}, agent_id=self.agent_id)

    def _vote(self, task: Task) -> Result:
        return Result(data={"voter": self.agent_id}, agent_id=self.agent_id,
                      decision=os.environ.get("VOTE", "yes"),
                      confidence=float(os.environ.get("VOTE_CONFIDENCE", "1.0")))

    def _produce(self, task: Task) -> Result:
        number = int(task.get("round", 1))
        return Result(data=f"{task.data} draft {number}", feedback_seen=task.get("feedback"),
                      agent_id=self.agent_id)

    def _audit(self, task: Task) -> Result:
        """What a file-reading step saw: each carried file's path, digest and line count,
        and whether that path exists where this agent runs (it must not need to)."""
        seen = [{"path": f["path"], "sha256": hashlib.sha256(f["content"].encode()).hexdigest(),
                 "lines": f["content"].count("\n"), "exists_here": Path(f["path"]).exists()}
                for f in task.data["files"]]
        return Result(data=seen, agent_id=self.agent_id)

    def _merge(self, task: Task) -> Result:
        return Result(data=[entry for batch in task.data for entry in batch],
                      cwd=os.getcwd(), agent_id=self.agent_id)

    def _review(self, task: Task) -> Result:
        number = int(task.get("round", 1))
        approved = number >= int(os.environ.get("APPROVE_AT", "2"))
        return Result(data={"reviewed": task.data}, approved=approved,
                      feedback=None if approved else f"round {number}: needs work",
                      agent_id=self.agent_id)


class Alpha(WorkAgent):
    """``tag`` as the agent "alpha" (the pipeline tests name agents by class)."""

    default_name = "alpha"


class Beta(WorkAgent):
    """``tag`` as the agent "beta"."""

    default_name = "beta"


class Gamma(WorkAgent):
    """``tag`` as the agent "gamma"."""

    default_name = "gamma"
