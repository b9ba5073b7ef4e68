"""The synthesizer agent end to end: a real broker, a real synthesizer process, a client.

The items are built the way the built-in agents build them (reviewer outputs from
:class:`agents.findings.Finding`, researcher and coder outputs per the shared contracts),
so these tests need none of those agents running.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from agent_sdk import SyncClient
from agents.findings import Category, Finding, Severity
from agents.report import Report, render_markdown
from tests.agents.test_report import assert_valid_sarif, finding
from tests.conftest import Cluster

AGENT = "agents.synthesizer:SynthesizerAgent"
#: Deadline of every task these tests wait for.
RESULT_TIMEOUT_S = 20.0


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SyncClient]:
    """A client of a broker with one synthesizer agent registered, shared by the module
    (starting processes is the slow part; every test submits its own tasks)."""
    tmp = tmp_path_factory.mktemp("synthesizer")
    with pytest.MonkeyPatch.context() as patch:
        # The processes get a data dir of their own, as the function-scoped fixtures do.
        patch.setenv("ORCH_HOME", str(tmp / "home"))
        cluster = Cluster(tmp)
        try:
            url = cluster.broker().url
            cluster.agent(url, AGENT)  # returns once the agent printed its registration
            sync = cluster.client(url)
            sync.wait_for_agents(1, capability="synthesis", timeout=RESULT_TIMEOUT_S)
            yield sync
        finally:
            cluster.close()


def reviewer_output(analyses: list[str], findings: list[Finding],
                    files: list[dict[str, str]], change: str | None = None) -> dict[str, Any]:
    """A reviewer's ``Result.data`` as the shared contract shapes it."""
    counts = {s.value: sum(1 for f in findings if f.severity is s) for s in Severity}
    return {"kind": "findings", "analyses": analyses,
            "findings": [f.to_dict() for f in findings], "files": files, "change": change,
            "approved": not any(f.severity.rank >= Severity.HIGH.rank for f in findings),
            "counts": counts}


def test_synthesis_merges_two_reviewer_outputs(client: SyncClient) -> None:
    # Given a security audit and a code review of two batches: bandit's B602 and our S101
    # at one line for one problem, the same B307 reported by both, a file not parsed,
    # and a third batch that failed
    b602 = finding("B602", "src/app.py", 6, Severity.HIGH, Severity.HIGH, tool="bandit",
                   category=Category.SECURITY, cwe=78,
                   name="subprocess_popen_with_shell_equals_true",
                   code="subprocess.call(cmd, shell=True)")
    s101 = finding("S101", "src/app.py", 6, Severity.HIGH, Severity.MEDIUM,
                   category=Category.SECURITY, cwe=78, name="shell_through_variable")
    b307 = finding("B307", "src/app.py", 8, Severity.MEDIUM, Severity.HIGH, tool="bandit",
                   category=Category.SECURITY, cwe=78, name="blacklist", code="eval(text)",
                   suggestion="Use ast.literal_eval for literals.")
    b105 = finding("B105", "src/config.py", 2, Severity.LOW, Severity.MEDIUM, tool="bandit",
                   category=Category.SECURITY, cwe=259, name="hardcoded_password_string",
                   code='password = "hunter2"')
    r101 = finding("R101", "src/big.py", 10, Severity.HIGH, Severity.HIGH,
                   name="cyclomatic_complexity", code="def handle(request):")
    audit = reviewer_output(["security"], [b602, s101, b307, b105],
                            [{"path": "src/app.py", "status": "analyzed", "detail": ""},
                             {"path": "src/config.py", "status": "analyzed", "detail": ""},
                             {"path": "src/broken.py", "status": "unparseable",
                              "detail": "invalid syntax (line 3)"}])
    review = reviewer_output(["review"], [r101, b307],
                             [{"path": "src/big.py", "status": "analyzed", "detail": ""},
                              {"path": "src/app.py", "status": "analyzed", "detail": ""}])
    failed = [{"index": 2, "code": "timed_out", "error": "the task ran out of time"}]

    # When the synthesizer agent gets them as a reduce step does
    result = client.submit(capabilities=["synthesis"], data=[audit, review],
                           failed=failed).result(timeout=RESULT_TIMEOUT_S)

    # Then one report, each problem once, worst first
    assert result.ok, result
    assert result.agent is not None and result.agent.startswith("synthesizer")
    data = result.data
    assert data["kind"] == "report"
    assert data["title"] == "Code analysis (security, review)"
    keys = [(f["path"], f["line"], f["rule"]) for f in data["findings"]]
    assert keys == [("src/app.py", 6, "B602"), ("src/big.py", 10, "R101"),
                    ("src/app.py", 8, "B307"), ("src/config.py", 2, "B105")]
    assert data["findings"][0]["more"] == {"also_reported_as": ["S101"]}
    assert data["findings"][2]["suggestion"] == "Use ast.literal_eval for literals."
    # And counted, with the unread file and the failed item listed
    assert data["summary"] == {
        "files": 4, "analyzed": 3, "not_analyzed": 1, "findings": 4,
        "by_severity": {"critical": 0, "high": 2, "medium": 1, "low": 1, "info": 0},
        "by_category": {"security": 3, "review": 1, "performance": 0, "analysis": 0},
        "failed_items": 1}
    assert data["files"] == [
        {"path": "src/app.py", "status": "analyzed", "detail": ""},
        {"path": "src/big.py", "status": "analyzed", "detail": ""},
        {"path": "src/broken.py", "status": "unparseable", "detail": "invalid syntax (line 3)"},
        {"path": "src/config.py", "status": "analyzed", "detail": ""}]
    assert data["failed"] == failed
    assert data["approved"] is False and result.approved is False
    assert result.counts == data["summary"]["by_severity"]
    # And its Markdown and SARIF are the renderings of that report, the SARIF valid
    report = Report.from_data(json.loads(json.dumps(data)))
    assert data["markdown"] == render_markdown(report)
    assert "`src/app.py:6`" in data["markdown"]
    assert_valid_sarif(data["sarif"])
    runs = {run["tool"]["driver"]["name"]: run for run in data["sarif"]["runs"]}
    assert sorted(r["ruleId"] for r in runs["Bandit"]["results"]) == ["B105", "B307", "B602"]
    assert [r["ruleId"] for r in runs["orchestrator"]["results"]] == ["R101"]
    assert runs["orchestrator"]["invocations"][0]["executionSuccessful"] is False


def test_aggregation_concatenates_patches(client: SyncClient) -> None:
    items: list[dict[str, Any]] = [{"kind": "patch", "tool": "black",
              "diff": "--- a/a.py\n+++ b/a.py\n@@ -1 +1 @@\n-x=1\n+x = 1\n",
              "files": [{"path": "a.py", "changed": True}]},
             {"kind": "patch", "tool": "black",
              "diff": "--- a/b.py\n+++ b/b.py\n@@ -1 +1 @@\n-y=2\n+y = 2\n",
              "files": [{"path": "b.py", "changed": True}, {"path": "c.py", "changed": False}]}]
    result = client.submit(capabilities=["aggregation"], data=items,
                           failed=[]).result(timeout=RESULT_TIMEOUT_S)
    assert result.ok, result
    assert result.data["kind"] == "patch"
    assert result.data["diff"] == items[0]["diff"] + items[1]["diff"]
    assert [f["path"] for f in result.data["files"] if f["changed"]] == ["a.py", "b.py"]


def test_research_synthesis_has_a_section_per_aspect(client: SyncClient) -> None:
    items = [{"kind": "research", "aspect": aspect, "query": f"{aspect} of sqlite",
              "topic": "sqlite", "summary": f"About {aspect}.", "results": [],
              "citations": [{"path": f"docs/{aspect}.md", "lines": [1, 5]}],
              "corpus": {"documents": 2, "source": "task"}}
             for aspect in ("overview", "performance")]
    result = client.submit(capabilities=["synthesis"], data=items,
                           failed=[{"index": 2, "code": "agent_lost", "error": "gone"}]
                           ).result(timeout=RESULT_TIMEOUT_S)
    assert result.ok, result
    data = result.data
    assert data["kind"] == "research" and data["title"] == "Research: sqlite"
    assert [s["aspect"] for s in data["sections"]] == ["overview", "performance"]
    assert [c["path"] for c in data["citations"]] == ["docs/overview.md", "docs/performance.md"]
    assert data["summary"].startswith("2 of 3 part(s) answered; 1 failed.")
    assert "## Failed items" in data["markdown"]


def test_malformed_items_fail_at_once_with_a_clear_error(client: SyncClient) -> None:
    result = client.submit(capabilities=["synthesis"],
                           data=[{"kind": "findings", "findings": [{"rule": "B1"}]}],
                           retries=3).result(timeout=RESULT_TIMEOUT_S)
    assert result.status == "failed"
    assert result.error is not None and result.error.code == "bad_input"
    assert "item 0: a finding lacks the field 'path'" in result.error.message
    assert result.attempts == 1  # a permanent failure: the retries are not spent on it

