"""A tiny agent that calls the configured LLM once per task, under the task's budget.

Run as a real process (``python -m agent_sdk run tests.fakes.llm_agents:BudgetedLLMAgent``);
``AGENT_NAME`` names it and its one capability (default ``llm-test``). A task's field
``on_error`` chooses how an :class:`~agent_sdk.llm.LLMError` leaves ``execute``:
``"result"`` (default) returns ``error.to_result()`` so the client sees the error's own
code (``budget_exceeded``); ``"raise"`` raises it, as a plain agent would.
"""

from __future__ import annotations

import os

from agent_sdk import BaseAgent, Result, Task
from agent_sdk.llm import LLM, LLMError, TokenBudget


class BudgetedLLMAgent(BaseAgent):
    """Asks the LLM the task's ``prompt``; reports the reply, its tokens and the
    budget's total after the call."""

    def __init__(self) -> None:
        name = os.environ.get("AGENT_NAME", "llm-test")
        super().__init__(name=name, capabilities=[name])
        llm = LLM.from_env()
        if llm is None:
            raise RuntimeError("BudgetedLLMAgent needs ORCH_LLM_BASE_URL")
        self.llm = llm
        self.llm.attach(self)

    async def execute(self, task: Task) -> Result:
        try:
            budget = TokenBudget.from_task(task, self.state)
            reply = await self.llm.chat([{"role": "user", "content": task.get("prompt", "hi")}],
                                        budget=budget)
        except LLMError as error:
            if task.get("on_error", "result") == "raise":
                raise
            return error.to_result()
        finally:
            await self.llm.publish_usage()
        return Result(data={"text": reply.text, "prompt_tokens": reply.prompt_tokens,
                            "completion_tokens": reply.completion_tokens,
                            "spent": None if budget is None else await budget.spent()})

    async def on_stop(self) -> None:
        await self.llm.aclose()
