"""The agent the live fuzz tests (``tests/e2e/test_fuzz_live.py``) run beside the broker:
a bus subscriber that takes whatever arrives on its topic and does nothing with it, so
that what the fuzz does to an agent is the SDK's doing, not a handler's."""

from __future__ import annotations

import os
from typing import Any

from agent_sdk import BaseAgent, BusMessage, Result, Task


class FuzzSubscriber(BaseAgent):
    """Subscribes to ``SUB_TOPIC`` (default ``fuzz``) and counts what arrives. A task
    answers once the subscription is confirmed, with the count (its messaging counters
    reach the broker's status with its heartbeats)."""

    def __init__(self) -> None:
        super().__init__(name=os.environ.get("AGENT_NAME", "fuzz-sub"),
                         capabilities=["fuzz-sub"])
        self.topic = os.environ.get("SUB_TOPIC", "fuzz")
        self.received = 0
        self.subscription: Any = None

    async def on_start(self) -> None:
        self.subscription = self.subscribe(self.topic, self.on_bus)

    def on_bus(self, message: BusMessage) -> None:
        self.received += 1

    async def execute(self, task: Task) -> Result:
        await self.subscription
        return Result(data={"received": self.received})
