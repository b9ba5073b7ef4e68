"""A workflow run's LLM token budget (``max_tokens``): every step's agents share it through
the state service; once it is spent the next LLM call is refused and the run ends
``budget_exceeded``. Real broker, state service and agent processes; the LLM is the local
fake server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from agent_sdk import Client
from tests.conftest import ROOT, Cluster, read_json_line
from tests.fakes.llm_server import FakeLLMServer, TextReply
from tests.workflows.support import run
from workflows import Workflow
from workflows.model import Pipeline, TaskStep
from workflows.api import run_workflow
from workflows.runs import RunStatus

AGENT = "tests.fakes.llm_agents:BudgetedLLMAgent"
#: Tokens each call costs: the fake's usage counts.
PROMPT, COMPLETION = 20, 10


@pytest.fixture
def server() -> Iterator[FakeLLMServer]:
    with FakeLLMServer(default=TextReply("fine", PROMPT, COMPLETION)) as fake:
        yield fake


def four_calls(max_tokens: int | None) -> Workflow:
    """llm-a, llm-b, llm-a, llm-b: four LLM calls of 30 tokens on two agents."""
    steps = tuple(TaskStep(f"call-{i}", capability=("llm-a", "llm-b")[i % 2])
                  for i in range(4))
    return Workflow("budgeted", Pipeline("budgeted", steps), max_tokens=max_tokens)


def test_a_run_ends_budget_exceeded_once_its_tokens_are_spent(
        cluster: Cluster, server: FakeLLMServer) -> None:
    broker = cluster.broker()
    procs = [cluster.agent(broker.url, AGENT, wait=False, agent_name=name,
                           orch_llm_base_url=server.url, orch_llm_model="fake")
             for name in ("llm-a", "llm-b")]
    for proc in procs:
        read_json_line(proc)

    async def scenario() -> tuple[RunStatus, str | None, int, RunStatus]:
        async with Client(broker.url) as client:
            # 70 tokens: two calls (60), a third that starts under the cap (90), then none.
            capped = await run_workflow(four_calls(70), {"prompt": "hi"}, client=client)
            spent = (await client.state.get(f"llm/budget/run:{capped.run_id}"))["spent"]
            ample = await run_workflow(four_calls(10_000), {"prompt": "hi"}, client=client)
            error = capped.error.code if capped.error is not None else None
            return capped.status, error, spent, ample.status

    status, code, spent, ample = run(scenario())
    assert status is RunStatus.BUDGET_EXCEEDED, code
    assert spent == 3 * (PROMPT + COMPLETION)
    # The fourth call never reached the model: 3 calls for the capped run, 4 for the other.
    assert len(server.chat_requests) == 3 + 4
    assert ample is RunStatus.SUCCEEDED

    # `status` shows the tokens per agent and the budgets (the agents publish their usage
    # at the end of each task)
    shown = subprocess.run([sys.executable, "-m", "cli", "--broker", broker.url, "status",
                            "--json"], capture_output=True, text=True, timeout=60,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert shown.returncode == 0, shown.stderr
    llm = json.loads(shown.stdout)["llm"]
    assert llm["total"]["calls"] == 7
    assert llm["total"]["total_tokens"] == 7 * (PROMPT + COMPLETION)
    assert sorted(a["agent"] for a in llm["agents"]) == ["llm-a", "llm-b"]
    assert any(b["spent"] == spent and b["max_tokens"] == 70 for b in llm["budgets"])
