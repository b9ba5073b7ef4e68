"""The reviewer agent, as a real process behind a real broker: what it finds, and where.

The fixture codebase ``fixtures/planted`` holds each problem the reviewer must find, in
its plain form and in forms bandit does not follow (aliases, calls through variables,
``getattr``); ``fixtures/planted/EXPECTED.json`` says where (file, line, accepted rule
ids). ``fixtures/clean`` holds ten files that come near each pattern without being it:
none may produce a high finding.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent_sdk import SyncClient
from tests.workflows.support import module_cluster
from workflows.files import LastCommits, collect_changes

FIXTURES = Path(__file__).resolve().parent / "fixtures"
PLANTED = FIXTURES / "planted"
CLEAN = FIXTURES / "clean"
REVIEWER = "agents.reviewer:ReviewerAgent"
#: Deadline of a review of the fixture (about thirty small files).
RESULT_TIMEOUT_S = 60.0
ALL_CAPABILITIES = ["security_audit", "code_review", "performance_analysis"]
CAPABILITY = {"security": "security_audit", "review": "code_review",
              "performance": "performance_analysis"}


def carried(root: Path) -> list[dict[str, str]]:
    """The ``.py`` files under ``root`` as a task carries them (relative paths)."""
    return [{"path": p.relative_to(root).as_posix(), "content": p.read_text(encoding="utf-8")}
            for p in sorted(root.rglob("*.py"))]


def expected(analysis: str | None = None) -> list[dict[str, Any]]:
    """The planted problems (of one analysis, if given)."""
    planted = json.loads((PLANTED / "EXPECTED.json").read_text(encoding="utf-8"))["planted"]
    return [p for p in planted if analysis is None or p["analysis"] == analysis]


def missing(findings: list[dict[str, Any]], planted: list[dict[str, Any]]) -> list[str]:
    """The planted problems no finding reports at their file and line with their rule."""
    severity_rank = {"info": 0, "low": 1, "medium": 2, "high": 3, "critical": 4}
    out = []
    for item in planted:
        hits = [f for f in findings if f["path"] == item["file"] and f["line"] == item["line"]
                and f["rule"] in item["rules"]
                and severity_rank[f["severity"]] >= severity_rank[item.get("min_severity",
                                                                           "info")]]
        if not hits:
            out.append(f"{item['file']}:{item['line']} {item['what']}")
    return out


@pytest.fixture(scope="module")
def reviewer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SyncClient]:
    """A broker and one reviewer agent process for the module; a client on them."""
    with module_cluster(tmp_path_factory, "reviewer") as (cluster, url, _):
        cluster.agent(url, REVIEWER)
        client = cluster.client(url)
        client.wait_for_agents(1, capability="security_audit")
        yield client


def review(client: SyncClient, data: Any, capabilities: list[str], **fields: Any) -> Any:
    """Submit a review and return its (succeeded) result; ``data=None``: fields only."""
    if data is not None:
        fields["data"] = data
    result = client.submit(capabilities=capabilities, **fields).result(RESULT_TIMEOUT_S)
    assert result.ok, result.error
    return result


@pytest.mark.parametrize("analysis", ["security", "review", "performance"])
def test_every_planted_problem_is_found_at_its_line(reviewer: SyncClient,
                                                   analysis: str) -> None:
    # Given the planted codebase, canonical and non-canonical forms alike
    files = carried(PLANTED)
    # When the reviewer runs the analysis of one capability over it
    result = review(reviewer, {"files": files}, [CAPABILITY[analysis]])
    data = result.data
    # Then every problem planted for that analysis is reported at its file and line
    assert data["kind"] == "findings" and data["analyses"] == [analysis]
    assert missing(data["findings"], expected(analysis)) == []
    assert [f["status"] for f in data["files"]] == ["analyzed"] * len(files)
    assert {f["path"] for f in data["files"]} == {f["path"] for f in files}
    # and the result's summary agrees with its findings
    counts = {s: sum(1 for f in data["findings"] if f["severity"] == s) for s in data["counts"]}
    assert counts == data["counts"]
    assert data["approved"] is (counts["high"] + counts["critical"] == 0)
    assert result.approved is data["approved"]
    assert sum(len(v) for v in result.issues.values()) == len(data["findings"])
    assert len(result.suggestions) == len(set(result.suggestions)) > 0


def test_bandit_findings_carry_the_bandit_record(reviewer: SyncClient) -> None:
    # Given a file with a canonical shell=True call
    source = (PLANTED / "app" / "shell_canonical.py").read_text(encoding="utf-8")
    # When it is audited
    data = review(reviewer, {"files": [{"path": "x/shell.py", "content": source}]},
                  ["security_audit"]).data
    # Then bandit's B602 is reported with its test name, severity, confidence, CWE and line
    (b602,) = [f for f in data["findings"] if f["rule"] == "B602"]
    assert b602["tool"] == "bandit" and b602["name"] == "subprocess_popen_with_shell_equals_true"
    assert (b602["severity"], b602["confidence"], b602["cwe"]) == ("high", "high", 78)
    assert b602["path"] == "x/shell.py" and b602["line"] == 6
    assert b602["code"].startswith("return subprocess.call(")
    assert data["approved"] is False


def test_alias_findings_do_not_duplicate_bandit(reviewer: SyncClient) -> None:
    # Given a shell through a variable, which bandit reports as B604 on the same line
    source = "import subprocess\n\ndef f(c):\n    r = subprocess.run\n    r(c, shell=True)\n"
    # When it is audited
    data = review(reviewer, {"files": [{"path": "f.py", "content": source}]},
                  ["security_audit"]).data
    # Then the line has bandit's finding and not also ours
    on_line = sorted(f["rule"] for f in data["findings"] if f["line"] == 5)
    assert on_line == ["B604"]


def test_clean_files_produce_no_high_finding(reviewer: SyncClient) -> None:
    # Given ten files that come near each planted pattern without being it
    files = carried(CLEAN)
    assert len(files) == 10
    # When every analysis runs over them
    data = review(reviewer, {"files": files}, ALL_CAPABILITIES).data
    # Then nothing is high or critical, and the review approves them
    assert data["analyses"] == ["security", "review", "performance"]
    bad = [f"{f['path']}:{f['line']} {f['rule']}" for f in data["findings"]
           if f["severity"] in ("high", "critical")]
    assert bad == []
    assert data["approved"] is True
    assert all(f["status"] == "analyzed" for f in data["files"])


def test_code_review_and_performance_specifics(reviewer: SyncClient) -> None:
    # Given the planted codebase
    files = carried(PLANTED)
    # When a code review runs
    findings = review(reviewer, {"files": files}, ["code_review"]).data["findings"]
    rules = {(f["path"], f["rule"]) for f in findings}
    # Then it finds the complexity > 20 function (high), broad excepts, mutable defaults,
    # the unused import, and the eval bandit reports (medium and up only from bandit)
    complexity = [f for f in findings if f["rule"] == "R101" and f["path"] == "app/rules_engine.py"]
    assert complexity and complexity[0]["severity"] == "high"
    assert complexity[0]["more"]["complexity"] > 20
    assert {("app/handlers.py", "R103"), ("app/handlers.py", "R104"),
            ("app/handlers.py", "R105"), ("app/exec_input.py", "B307")} <= rules
    assert all(f["severity"] != "low" for f in findings if f["tool"] == "bandit")
    # When a performance analysis runs
    perf = review(reviewer, {"files": files}, ["performance_analysis"]).data["findings"]
    # Then the quadratic builds and the loop-invariant compiles are found, with fixes
    assert {(f["path"], f["rule"]) for f in perf} >= {
        ("app/report_build.py", "P101"), ("app/report_alias.py", "P101"),
        ("app/report_alias.py", "P102"), ("app/patterns.py", "P103")}
    assert all(f["suggestion"] for f in perf)
    assert {f["category"] for f in perf} == {"performance"}


def test_seed_form_and_unparseable_file(reviewer: SyncClient) -> None:
    # Given the seed's form: one snippet as the task's ``code`` field
    result = review(reviewer, None, ["code_review"], code="x = eval(input())\n")
    # Then it is reviewed as snippet.py
    assert result.data["files"] == [{"path": "snippet.py", "status": "analyzed", "detail": ""}]
    assert [f["rule"] for f in result.data["findings"]] == ["B307"]
    # Given a file that does not parse beside one that does
    files = [{"path": "broken.py", "content": "def f(:\n    pass\n"},
             {"path": "fine.py", "content": "import pickle\npickle.loads(b'')\n"},
             {"path": "README.md", "content": "# not python\n"}]
    data = review(reviewer, {"files": files}, ["security_audit"]).data
    # Then the broken file is unparseable with its syntax error and an info finding,
    # and the run completes for the others
    statuses = {f["path"]: (f["status"], f["detail"]) for f in data["files"]}
    assert statuses["broken.py"][0] == "unparseable" and "line 1" in statuses["broken.py"][1]
    assert statuses["fine.py"] == ("analyzed", "")
    assert statuses["README.md"][0] == "analyzed"
    info = [f for f in data["findings"] if f["path"] == "broken.py"]
    assert [(f["category"], f["severity"]) for f in info] == [("analysis", "info")]
    assert any(f["rule"] == "B301" and f["path"] == "fine.py" for f in data["findings"])


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t",
                    *args], check=True, capture_output=True)


def test_change_review_reports_only_changed_lines(reviewer: SyncClient,
                                                  tmp_path: Path) -> None:
    # Given a repository whose first commit has an eval and a branchy function, and whose
    # second commit adds a shell=True call and touches one line inside the function
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    engine = (PLANTED / "app" / "rules_engine.py").read_text(encoding="utf-8")
    old = ("import subprocess\n\n\ndef calc(expr):\n    return eval(expr)\n\n\n"
           "def tidy(path):\n    return path.strip()\n")
    (repo / "tool.py").write_text(old, encoding="utf-8")
    (repo / "engine.py").write_text(engine, encoding="utf-8")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "first")
    new = old.replace("    return path.strip()\n",
                      "    subprocess.call('rm ' + path, shell=True)\n    return path.strip()\n")
    (repo / "tool.py").write_text(new, encoding="utf-8")
    (repo / "engine.py").write_text(engine.replace('return "free"', 'return "gratis"'),
                                    encoding="utf-8")
    _git(repo, "commit", "-q", "-am", "second")
    change = collect_changes(repo, LastCommits(1))
    assert [f.path for f in change.files] == ["engine.py", "tool.py"]
    # When the change is reviewed
    data = review(reviewer, {"change": change.label,
                             "files": [f.to_dict() for f in change.files]},
                  ["security_audit", "code_review"]).data
    # Then the new shell call and the touched function are reported; the old eval and
    # the module's subprocess import warning, on unchanged lines, are not
    found = {(f["path"], f["line"], f["rule"]) for f in data["findings"]}
    assert ("tool.py", 9, "B602") in found
    assert any(p == "engine.py" and r == "R101" for p, _, r in found)
    assert not any(p == "tool.py" and line in (1, 5) for p, line, _ in found)
    changed = {f.path: f.changed_lines for f in change.files}
    for f in data["findings"]:
        assert any(a <= f["end_line"] and f["line"] <= b for a, b in changed[f["path"]]), f
    assert data["change"] == "the last commit"
