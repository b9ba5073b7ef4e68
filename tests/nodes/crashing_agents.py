"""An agent class that cannot be built: ``python -m agent_sdk run`` exits 2 with its
message on stderr. The node tests use it to make a crash loop."""

from __future__ import annotations

from agent_sdk import BaseAgent, Result, Task

#: On stderr (the node's agents.log) once per start: the tests count starts by it.
MARKER = "crashing-agent-refuses-to-start"


class CrashingAgent(BaseAgent):
    """Raises in ``__init__``, every time."""

    def __init__(self) -> None:
        raise ValueError(MARKER)

    async def execute(self, task: Task) -> Result:  # pragma: no cover - never built
        return Result(data=None)
