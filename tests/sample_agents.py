"""Agents used by the tests, run as real processes with ``python -m agent_sdk run``.

Options come from environment variables so that one class serves many tests:
``ECHO_DELAY_S`` (seconds each task takes), ``EXEC_LOG`` (a file each execution is
appended to, to count executions across processes).
"""

from __future__ import annotations

import asyncio
import os

from agent_sdk import BaseAgent, Result, Task


def _log_execution(task: Task) -> None:
    path = os.environ.get("EXEC_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"{task.id}\n")


class EchoAgent(BaseAgent):
    """Returns the task's data; records its own peak concurrency in every result."""

    def __init__(self) -> None:
        super().__init__(name=os.environ.get("AGENT_NAME", "echo"),
                         capabilities=os.environ.get("AGENT_CAPS", "echo").split(","),
                         max_concurrent=int(os.environ.get("AGENT_MAX", "16")))
        self.delay_s = float(os.environ.get("ECHO_DELAY_S", "0"))
        self.active = 0
        self.peak = 0

    async def execute(self, task: Task) -> Result:
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            _log_execution(task)
            if self.delay_s:
                await asyncio.sleep(self.delay_s)  # the simulated workload, not a wait
            return Result(data=task.data, agent_id=self.agent_id, peak=self.peak)
        finally:
            self.active -= 1


class GroupCountingAgent(EchoAgent):
    """An echo agent that counts, per group named in the task's data (``{"group": G}``),
    how many of the group's tasks it runs at once: every result carries the group's
    count and the agent's total at the task's start (the peaks of overlapping runs are
    reached at some start)."""

    def __init__(self) -> None:
        super().__init__()
        self.by_group: dict[str, int] = {}

    async def execute(self, task: Task) -> Result:
        group = str(task.data["group"])
        self.by_group[group] = self.by_group.get(group, 0) + 1
        self.active += 1
        try:
            at_start = {"group": self.by_group[group], "total": self.active}
            if self.delay_s:
                await asyncio.sleep(self.delay_s)  # the simulated workload, not a wait
            return Result(data=at_start, agent_id=self.agent_id)
        finally:
            self.active -= 1
            self.by_group[group] -= 1


class SizedResultAgent(BaseAgent):
    """Returns ``task.data["size"]`` bytes (results over the broker's frame limit)."""

    def __init__(self) -> None:
        super().__init__(name="sized", capabilities=["sized"])

    async def execute(self, task: Task) -> Result:
        return Result(data=b"r" * int(task.data["size"]))


class FailingAgent(BaseAgent):
    """Raises in execute for every task whose data says so."""

    def __init__(self) -> None:
        super().__init__(name="failing", capabilities=["fail"])

    async def execute(self, task: Task) -> Result:
        if task.get("explode"):
            raise ValueError(f"exploded on {task.id}")
        return Result(data="fine")


class HealthProbeAgent(BaseAgent):
    """An agent whose health a test controls through files in ``HEALTH_DIR``:
    ``ping_hang`` (its ``ping()`` does not return while the file exists), ``ping_raise``
    (its ``ping()`` raises), and tasks with data ``"hang"`` that ignore cancellation
    until ``release`` exists (a hung ``execute``). Other tasks echo their data."""

    def __init__(self) -> None:
        super().__init__(name=os.environ.get("AGENT_NAME", "probe"),
                         capabilities=os.environ.get("AGENT_CAPS", "echo").split(","))
        self.control = os.environ["HEALTH_DIR"]

    def _flag(self, name: str) -> bool:
        return os.path.exists(os.path.join(self.control, name))

    async def ping(self) -> dict[str, object]:
        while self._flag("ping_hang"):
            await asyncio.sleep(0.02)  # the hang the test asked for, not a wait
        if self._flag("ping_raise"):
            raise RuntimeError("the model is not loaded")
        return await super().ping()

    async def execute(self, task: Task) -> Result:
        if task.data == "hang":
            while not self._flag("release"):
                try:
                    await asyncio.sleep(0.02)  # the hung execute under test, not a wait
                except asyncio.CancelledError:
                    continue  # deaf to the broker's cancel: the hang under test
            return Result(data="released")
        return Result(data=task.data, agent_id=self.agent_id)
