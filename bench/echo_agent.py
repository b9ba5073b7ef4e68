"""The benchmark's agent: returns the task's data unchanged."""

from __future__ import annotations

from agent_sdk import BaseAgent, Result, Task


class EchoAgent(BaseAgent):
    """An echo agent written as users write agents."""

    def __init__(self) -> None:
        super().__init__(name="echo", capabilities=["echo"])

    async def execute(self, task: Task) -> Result:
        return Result(data=task.data)
