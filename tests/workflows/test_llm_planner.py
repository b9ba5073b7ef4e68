"""The LLM planner, against the local fake OpenAI-compatible server (never the network):
a valid proposal becomes the plan; an invented capability, broken JSON or an error reply
fall back to the rules; file work never goes to the model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.fakes.llm_server import ErrorReply, FakeLLMServer, TextReply
from workflows.llm_planner import EXAMPLE, make_planner, parse_proposal
from workflows.planner import ProposingPlanner, RuleBasedPlanner

ONLINE = {"search", "synthesis", "security_audit", "code_generation", "code_review"}
HAIKU = {
    "workflow": {"workflow": "haiku", "root": {"kind": "pipeline", "name": "haiku", "steps": [
        {"kind": "task", "name": "draft", "capability": "code_generation"},
        {"kind": "task", "name": "check", "capability": "code_review"}]}},
    "input": {"specification": "a haiku about queues"},
    "summary": "draft a haiku, then review it",
}


@pytest.fixture
def llm(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeLLMServer]:
    with FakeLLMServer() as server:
        monkeypatch.setenv("ORCH_LLM_BASE_URL", server.url)
        monkeypatch.setenv("ORCH_LLM_MODEL", "fake-model")
        monkeypatch.setenv("ORCH_LLM_MAX_ATTEMPTS", "1")
        yield server


def test_without_an_llm_the_rules_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ORCH_LLM_BASE_URL", raising=False)
    assert isinstance(make_planner(), RuleBasedPlanner)


def test_a_valid_proposal_becomes_the_plan(llm: FakeLLMServer, tmp_path: Path) -> None:
    llm.push(TextReply("Here is the plan:\n```json\n" + json.dumps(HAIKU) + "\n```"))
    planner = make_planner()
    assert isinstance(planner, ProposingPlanner)
    planned = planner.plan("write a haiku about message queues", cwd=tmp_path,
                           online_capabilities=ONLINE)
    assert planned.intent == "proposed"
    assert planned.summary == "draft a haiku, then review it"
    assert planned.input == {"specification": "a haiku about queues"}
    # The model was told what is online and what the user asked.
    sent = llm.chat_requests[0].body["messages"][-1]["content"]
    assert "write a haiku about message queues" in sent and "code_generation" in sent


@pytest.mark.parametrize("reply", [
    TextReply(json.dumps({**HAIKU, "workflow": {"workflow": "x", "root": {
        "kind": "task", "name": "t", "capability": "teleportation"}}})),
    TextReply("I cannot help with that."),
    ErrorReply(400, {"error": {"message": "bad model"}}),
], ids=["invented-capability", "no-json", "error-reply"])
def test_a_refused_or_failed_proposal_falls_back_to_the_rules(
        llm: FakeLLMServer, tmp_path: Path, reply: object) -> None:
    llm.push(reply)  # type: ignore[arg-type]
    planned = make_planner().plan("Research vector databases", cwd=tmp_path,
                                  online_capabilities=ONLINE)
    assert planned.intent == "research"
    assert len(llm.chat_requests) == 1


def test_file_work_never_goes_to_the_model(llm: FakeLLMServer, tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text("import os\nos.system('ls')\n")
    planned = make_planner().plan("Analyze this codebase for security issues",
                                  cwd=tmp_path, online_capabilities=ONLINE)
    assert planned.intent == "security" and planned.files == 1
    assert llm.chat_requests == []


def test_parse_proposal_reads_fenced_and_bare_json() -> None:
    assert parse_proposal("```\n" + json.dumps(EXAMPLE) + "\n```") == EXAMPLE
    assert parse_proposal("sure: " + json.dumps(EXAMPLE) + " done") == EXAMPLE
    with pytest.raises(ValueError, match="no JSON object"):
        parse_proposal("nothing here")


def test_submit_plan_prints_the_proposed_plan(llm: FakeLLMServer, tmp_path: Path) -> None:
    llm.push(TextReply(json.dumps(HAIKU)))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ORCH_HOME": str(tmp_path / "home")}
    env["ORCH_BROKER"] = "tcp://127.0.0.1:1"  # nobody: the plan says capabilities unchecked
    done = subprocess.run([sys.executable, "-m", "cli", "submit", "--plan", "--json",
                           "write a haiku about message queues"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    assert document["intent"] == "proposed" and document["workflow"]["workflow"] == "haiku"
