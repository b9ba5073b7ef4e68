"""With an LLM configured, a findings report opens with an overview the LLM wrote from the
worst findings (secrets in their code masked before they are sent); a failed call leaves
the report without it. A real broker and synthesizer process; the local fake LLM server."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from agent_sdk import SyncClient
from agents.findings import Category, Severity
from tests.agents.test_report import finding
from tests.agents.test_synthesizer import RESULT_TIMEOUT_S, reviewer_output
from tests.conftest import Cluster
from tests.fakes.llm_server import ErrorReply, FakeLLMServer, TextReply

AGENT = "agents.synthesizer:SynthesizerAgent"
OVERVIEW = "Fix the shell call in src/app.py:6 first; then move the password out of code."


@pytest.fixture
def setup(cluster: Cluster) -> Iterator[tuple[SyncClient, FakeLLMServer]]:
    with FakeLLMServer(default=TextReply(OVERVIEW)) as server:
        url = cluster.broker().url
        cluster.agent(url, AGENT, orch_llm_base_url=server.url, orch_llm_model="fake",
                      orch_llm_max_attempts="1")
        yield cluster.client(url), server


def audit() -> dict[str, object]:
    shell = finding("B602", "src/app.py", 6, Severity.HIGH, Severity.HIGH, tool="bandit",
                    category=Category.SECURITY, cwe=78, code="subprocess.call(cmd, shell=True)")
    secret = finding("B105", "src/config.py", 2, Severity.LOW, Severity.MEDIUM, tool="bandit",
                     category=Category.SECURITY, cwe=259,
                     code='db_password = "hunter2-correct-horse"')
    return reviewer_output(["security"], [shell, secret],
                           [{"path": "src/app.py", "status": "analyzed", "detail": ""},
                            {"path": "src/config.py", "status": "analyzed", "detail": ""}])


def test_the_llm_writes_an_overview_of_the_worst_findings(
        setup: tuple[SyncClient, FakeLLMServer]) -> None:
    client, server = setup
    result = client.submit(data=[audit()], capabilities=["synthesis"]).result(RESULT_TIMEOUT_S)
    assert result.ok, result.error
    assert result.data["overview"] == OVERVIEW
    assert result.data["markdown"].startswith("# ")
    assert f"## Overview\n\n{OVERVIEW}" in result.data["markdown"]
    sent = server.chat_requests[0].body["messages"][-1]["content"]
    assert "src/app.py:6" in sent and "src/config.py:2" in sent
    assert "hunter2-correct-horse" not in sent  # the secret the audit found is masked


def test_a_failed_llm_call_leaves_the_report_without_an_overview(
        setup: tuple[SyncClient, FakeLLMServer]) -> None:
    client, server = setup
    server.push(ErrorReply(400, {"error": {"message": "model not found"}}))
    result = client.submit(data=[audit()], capabilities=["synthesis"]).result(RESULT_TIMEOUT_S)
    assert result.ok, result.error
    assert "overview" not in result.data and "## Overview" not in result.data["markdown"]
    assert result.data["summary"]["findings"] == 2
