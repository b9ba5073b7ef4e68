"""The agent of the multi-host tests, run as a real process in a node's namespace.

``HostAgent`` echoes the task's data and says where it ran: the host name it sees
(``socket.gethostname()``, its node's own), the task's attempt, and the endpoints the SDK
derived from the broker's announcement. Configured like the other test agents, by
environment variables: ``AGENT_NAME``, ``AGENT_CAPS``, ``AGENT_MAX``, ``ECHO_DELAY_S``
(seconds each task takes; a task field ``delay_s`` overrides it), ``SLOW_ATTEMPTS``
(only attempts 1..N take the delay), ``EXEC_LOG`` and ``DONE_LOG`` (files each execution
appends its task id to when it starts, and when its work is done).

A task whose data is ``{"count": KEY}`` also increments the shared-state key ``KEY``
through ``self.state`` (the state service at the endpoint the SDK derived), and returns
the new value. Sleeping here is the simulated work of a task, not test synchronisation.
"""

from __future__ import annotations

import asyncio
import os
import socket

from agent_sdk import BaseAgent, Result, Task
from tests.e2e.faults.agents import append_line


class HostAgent(BaseAgent):
    def __init__(self) -> None:
        super().__init__(name=os.environ.get("AGENT_NAME", "host"),
                         capabilities=os.environ.get("AGENT_CAPS", "echo").split(","),
                         max_concurrent=int(os.environ.get("AGENT_MAX", "16")))
        self.delay_s = float(os.environ.get("ECHO_DELAY_S", "0"))
        slow = os.environ.get("SLOW_ATTEMPTS")
        self.slow_attempts = int(slow) if slow else None

    async def execute(self, task: Task) -> Result:
        append_line("EXEC_LOG", task.id)
        delay_s = float(task.fields.get("delay_s", self.delay_s))
        if self.slow_attempts is not None and task.attempt > self.slow_attempts:
            delay_s = 0.0
        if delay_s:
            await asyncio.sleep(delay_s)  # the simulated workload
        counted = None
        if isinstance(task.data, dict) and "count" in task.data:
            counted = await self.state.update(str(task.data["count"]),
                                              lambda value: (value or 0) + 1, default=0)
        append_line("DONE_LOG", task.id)
        return Result(data=task.data, host=socket.gethostname(), attempt=task.attempt,
                      endpoints=dict(self.endpoints), counted=counted)
