"""Merging and rendering of the synthesizer's reports, without processes.

The SARIF documents are validated against the official SARIF 2.1.0 schema (vendored in
``agents/schemas/``); the bandit findings of the realistic report come from running the
real bandit on a small file, so rule ids, names and CWEs are bandit's own.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agents.findings import Category, Finding, Severity
from agents.report import (
    FINGERPRINT_NAME,
    MARKDOWN_MAX_FINDINGS,
    FailedItem,
    FileStatus,
    PatchReport,
    Report,
    ReportError,
    ResearchReport,
    bandit_help_uri,
    render_markdown,
    render_sarif,
    render_summary,
    report_from_data,
)
from agents.synthesizer import (
    SynthesisError,
    deduplicate,
    merge_files,
    merge_findings,
    merge_patches,
    merge_research,
    synthesize,
)

ROOT = Path(__file__).resolve().parents[2]
SCHEMA_PATH = ROOT / "agents" / "schemas" / "sarif-schema-2.1.0.json"
#: Deadline of the real tools these tests run (bandit, git).
TOOL_TIMEOUT_S = 60.0

VULNERABLE = """\
import subprocess
import yaml


def run(cmd, text):
    subprocess.call(cmd, shell=True)
    data = yaml.load(text)
    return eval(text), data
"""


def finding(rule: str = "R101", path: str = "src/app.py", line: int = 1,
            severity: Severity = Severity.MEDIUM, confidence: Severity = Severity.HIGH,
            tool: str = "orchestrator", category: Category = Category.REVIEW,
            cwe: int | None = None, **more: Any) -> Finding:
    """A finding with defaults for whatever a test does not care about."""
    return Finding(category=category, rule=rule, name=more.pop("name", f"rule_{rule.lower()}"),
                   message=more.pop("message", f"{rule} at {path}:{line}"), severity=severity,
                   confidence=confidence, path=path, line=line, cwe=cwe, tool=tool,
                   code=more.pop("code", f"line_{line}()"),
                   suggestion=more.pop("suggestion", ""), more=more)


@functools.cache
def validator() -> jsonschema.protocols.Validator:
    """A validator of the official schema, of the draft the schema declares (draft-04);
    built once, as checking the schema itself is the slow part."""
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    cls = jsonschema.validators.validator_for(schema)
    assert cls is jsonschema.Draft4Validator
    cls.check_schema(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def assert_valid_sarif(document: dict[str, Any]) -> None:
    """Fail with every schema error of ``document``, listed."""
    errors = sorted(validator().iter_errors(document), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


def bandit_findings(tmp_path: Path) -> list[Finding]:
    """What the real bandit reports on :data:`VULNERABLE`, as findings (the mapping the
    reviewer does: test id, test name, severity, confidence, CWE, the line's text)."""
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    (src / "app.py").write_text(VULNERABLE, encoding="utf-8")
    done = subprocess.run([sys.executable, "-m", "bandit", "-q", "-f", "json", "src/app.py"],
                          cwd=tmp_path, capture_output=True, text=True,
                          timeout=TOOL_TIMEOUT_S, check=False)
    # bandit exits 1 when it finds issues: that is the point here
    assert done.returncode in (0, 1), done.stderr
    lines = VULNERABLE.splitlines()
    out = []
    for raw in json.loads(done.stdout)["results"]:
        out.append(Finding(
            category=Category.SECURITY, rule=raw["test_id"], name=raw["test_name"],
            message=raw["issue_text"], severity=Severity.parse(raw["issue_severity"]),
            confidence=Severity.parse(raw["issue_confidence"]), path="src/app.py",
            line=raw["line_number"], end_line=max(raw["line_range"]),
            column=raw["col_offset"], code=lines[raw["line_number"] - 1].strip(),
            cwe=(raw.get("issue_cwe") or {}).get("id"), tool="bandit",
            more={"more_info": raw["more_info"]}))
    assert {f.rule for f in out} >= {"B602", "B506", "B307"}, out
    return out


def realistic_report(tmp_path: Path) -> Report:
    """Two reviewer-shaped outputs: bandit's findings plus ours (one the same problem as
    bandit's B602), files not analysed, and a failed item."""
    bandit = bandit_findings(tmp_path)
    ours = [
        finding("S101", "src/app.py", 6, Severity.HIGH, Severity.MEDIUM,
                category=Category.SECURITY, cwe=78, name="shell_through_variable",
                code="subprocess.call(cmd, shell=True)"),
        finding("S103", "src/loader.py", 4, Severity.HIGH, Severity.HIGH,
                category=Category.SECURITY, cwe=502, name="pickle_through_alias",
                code="loader(blob)", suggestion="Use json for untrusted data."),
        finding("R101", "src/big.py", 10, Severity.HIGH, Severity.HIGH,
                name="cyclomatic_complexity", code="def handle(request):", complexity=23),
        finding("P101", "src/strings.py", 5, Severity.LOW, Severity.MEDIUM,
                category=Category.PERFORMANCE, name="string_concat_in_loop",
                code="out += part"),
    ]
    items = [
        {"kind": "findings", "analyses": ["security"], "change": None,
         "findings": [f.to_dict() for f in bandit + ours[:2]],
         "files": [{"path": "src/app.py", "status": "analyzed", "detail": ""},
                   {"path": "src/loader.py", "status": "analyzed", "detail": ""},
                   {"path": "src/broken.py", "status": "unparseable",
                    "detail": "invalid syntax (line 3)"}]},
        {"kind": "findings", "analyses": ["review", "performance"], "change": None,
         "findings": [f.to_dict() for f in ours[2:]],
         "files": [{"path": "src/big.py", "status": "analyzed", "detail": ""},
                   {"path": "src/strings.py", "status": "analyzed", "detail": ""},
                   {"path": "src/huge.py", "status": "time_limit",
                    "detail": "analysis took over 30 s"}]},
    ]
    failed = [FailedItem(2, "timed_out", "the task ran out of time")]
    return merge_findings(items, failed)


# --- de-duplication, ranking, counts ------------------------------------------------------


def test_same_key_from_two_items_is_one_finding_keeping_the_stronger() -> None:
    # Given the same rule at the same place from a security audit and a code review,
    # one more severe and the other carrying a suggestion
    weak = finding("B307", line=8, severity=Severity.MEDIUM, tool="bandit",
                   suggestion="Use ast.literal_eval.")
    strong = finding("B307", line=8, severity=Severity.HIGH, tool="bandit")
    # When merged
    merged = deduplicate([weak, strong])
    # Then one finding is left: the severer one, with the other's suggestion
    assert len(merged) == 1
    assert merged[0].severity is Severity.HIGH
    assert merged[0].suggestion == "Use ast.literal_eval."


def test_bandit_and_our_check_at_one_line_for_one_problem_merge() -> None:
    # Given bandit's B602 and our own S101 at the same line, both CWE-78, ours critical
    bandit = finding("B602", line=6, severity=Severity.HIGH, tool="bandit", cwe=78,
                     category=Category.SECURITY)
    ours = finding("S101", line=6, severity=Severity.CRITICAL, cwe=78,
                   category=Category.SECURITY, suggestion="Pass an argv list.")
    # When de-duplicated
    merged = deduplicate([ours, bandit])
    # Then bandit's id stays, with the worse severity, and it names ours
    assert [f.rule for f in merged] == ["B602"]
    assert merged[0].severity is Severity.CRITICAL
    assert merged[0].more["also_reported_as"] == ["S101"]
    assert merged[0].suggestion == "Pass an argv list."


def test_distinct_problems_stay_apart() -> None:
    # Given two bandit rules of one CWE at one line (B603, B607: bandit reports both),
    # our check of another weakness at that line, and our CWE-78 check one line below
    findings = [finding("B603", line=5, tool="bandit", cwe=78),
                finding("B607", line=5, tool="bandit", cwe=78),
                finding("S104", line=5, cwe=327),
                finding("S101", line=6, cwe=78),
                finding("S101", path="src/other.py", line=5, cwe=78)]
    # When de-duplicated, Then nothing is dropped
    assert sorted(f.key for f in deduplicate(findings)) == sorted(f.key for f in findings)


def test_same_as_names_the_bandit_rules_and_overrides_the_cwe() -> None:
    # Given our rule naming the bandit tests it duplicates, without a CWE
    bandit = finding("B105", line=3, tool="bandit")
    ours = finding("S110", line=3, same_as=["B105", "B106"])
    assert [f.rule for f in deduplicate([bandit, ours])] == ["B105"]
    # And an eval check inside a shell call: one CWE (bandit's CWE-78 is coarse), but
    # same_as says eval is another problem than the shell
    shell = finding("B602", line=4, tool="bandit", cwe=78)
    evil = finding("S101", line=4, cwe=78, same_as=["B307", "B102"])
    assert sorted(f.rule for f in deduplicate([shell, evil])) == ["B602", "S101"]


def test_ranked_by_severity_then_confidence_then_place() -> None:
    # Given findings in a scrambled order
    items = [{"kind": "findings", "analyses": ["review"], "findings": [f.to_dict() for f in [
        finding("R1", "b.py", 9, Severity.LOW, Severity.HIGH),
        finding("R2", "b.py", 2, Severity.HIGH, Severity.LOW),
        finding("R3", "a.py", 7, Severity.HIGH, Severity.HIGH),
        finding("R4", "a.py", 3, Severity.HIGH, Severity.HIGH),
        finding("R5", "c.py", 1, Severity.CRITICAL, Severity.LOW),
        finding("R6", "c.py", 1, Severity.INFO, Severity.HIGH),
    ]]}]
    # When merged
    report = merge_findings(items)
    # Then worst first, more confident first, then by file and line
    assert [f.rule for f in report.findings] == ["R5", "R4", "R3", "R2", "R1", "R6"]


def test_counts_per_severity_and_category_and_files() -> None:
    items = [{"kind": "findings", "analyses": ["security"], "findings": [
        finding("B1", "a.py", 1, Severity.HIGH, category=Category.SECURITY).to_dict(),
        finding("B2", "a.py", 2, Severity.HIGH, category=Category.SECURITY).to_dict(),
        finding("P1", "b.py", 1, Severity.LOW, category=Category.PERFORMANCE).to_dict()],
        "files": [{"path": "a.py", "status": "analyzed"}, {"path": "b.py", "status": "analyzed"},
                  {"path": "c.py", "status": "memory_limit", "detail": "over 512 MiB"}]}]
    data = merge_findings(items, [FailedItem(4, "agent_error", "boom")]).to_data()
    assert data["summary"] == {
        "files": 3, "analyzed": 2, "not_analyzed": 1, "findings": 3,
        "by_severity": {"critical": 0, "high": 2, "medium": 0, "low": 1, "info": 0},
        "by_category": {"security": 2, "review": 0, "performance": 1, "analysis": 0},
        "failed_items": 1}
    assert data["failed"] == [{"index": 4, "code": "agent_error", "error": "boom"}]
    assert data["approved"] is False


def test_approval_needs_no_high_finding_and_everything_examined() -> None:
    medium = [finding("R1", severity=Severity.MEDIUM).to_dict()]
    files = [{"path": "src/app.py", "status": "analyzed"}]
    assert merge_findings([{"kind": "findings", "findings": medium, "files": files}]).approved
    high = [finding("R1", severity=Severity.HIGH).to_dict()]
    assert not merge_findings([{"kind": "findings", "findings": high, "files": files}]).approved
    assert not merge_findings([{"kind": "findings", "findings": medium, "files": files}],
                              [FailedItem(1, "timed_out", "")]).approved
    unread = files + [{"path": "x.py", "status": "unparseable"}]
    assert not merge_findings([{"kind": "findings", "findings": medium,
                                "files": unread}]).approved


def test_a_file_any_item_could_not_analyse_is_reported_so() -> None:
    merged = merge_files([FileStatus("b.py"), FileStatus("a.py"),
                          FileStatus("a.py", "time_limit", "slow"), FileStatus("a.py")])
    assert merged == [FileStatus("a.py", "time_limit", "slow"), FileStatus("b.py")]


def test_title_names_the_analyses_and_the_change() -> None:
    one = merge_findings([{"kind": "findings", "analyses": ["security"], "findings": [],
                           "change": "pull request #12"}])
    assert one.title == "Security audit of pull request #12"
    two = merge_findings([{"kind": "findings", "analyses": ["review"], "findings": []},
                          {"kind": "findings", "analyses": ["performance"], "findings": []}])
    assert two.title == "Code analysis (review, performance)"


def test_malformed_input_is_one_clear_error() -> None:
    with pytest.raises(SynthesisError, match="item 1: a finding lacks the field 'path'"):
        synthesize([{"kind": "findings", "findings": []},
                    {"kind": "findings", "findings": [{"rule": "B1"}]}])
    with pytest.raises(SynthesisError, match="different kinds: findings, patch"):
        synthesize([{"kind": "findings"}, {"kind": "patch"}])
    with pytest.raises(SynthesisError, match="kind 'code'"):
        synthesize([{"kind": "code"}])
    with pytest.raises(SynthesisError, match="'failed' must be a list"):
        synthesize([], failed="everything")
    with pytest.raises(SynthesisError, match="item 0 is a str"):
        synthesize(["oops"])


def test_every_item_failed_gives_a_report_of_the_failures() -> None:
    failed = [{"index": 0, "code": "timed_out", "error": "slow"},
              {"index": 1, "code": "agent_lost", "error": "gone"}]
    report = synthesize([], failed)
    assert isinstance(report, Report)
    assert [f.index for f in report.failed] == [0, 1]
    assert not report.approved
    assert "| 1 | agent_lost | gone |" in render_markdown(report)
    assert isinstance(synthesize(None, failed, capability="aggregation"), PatchReport)


# --- Markdown and the terminal summary ----------------------------------------------------


def test_markdown_lists_the_table_then_the_findings_worst_first(tmp_path: Path) -> None:
    report = realistic_report(tmp_path)
    text = render_markdown(report)
    # The summary table by severity, with the counts of the report
    assert "| Severity | Findings |" in text
    for name, n in report.summary.by_severity.items():
        assert f"| {name} | {n} |" in text
    # The findings in rank order, each with its place, rule, message, line and suggestion
    headings = re.findall(r"^### (\d+)\. (\w+) (\S+)", text, re.MULTILINE)
    assert [rule for _, _, rule in headings] == [f.rule for f in report.findings]
    assert [sev.lower() for _, sev, _ in headings] == \
        [f.severity.value for f in report.findings]
    loader = text[text.index("S103"):]
    assert "`src/loader.py:4`" in loader and "loader(blob)" in loader
    assert "**Suggestion:** Use json for untrusted data." in loader
    # The files not analysed and the failed item
    assert "| src/broken.py | unparseable | invalid syntax (line 3) |" in text
    assert "| src/huge.py | time_limit | analysis took over 30 s |" in text
    assert "| 2 | timed_out | the task ran out of time |" in text


def test_markdown_is_capped_but_json_and_sarif_keep_everything() -> None:
    # Given more findings than the Markdown lists
    total = MARKDOWN_MAX_FINDINGS + 37
    items = [{"kind": "findings", "analyses": ["review"], "files": [],
              "findings": [finding("R101", "src/app.py", n).to_dict()
                           for n in range(1, total + 1)]}]
    data = merge_findings(items).to_data()
    # Then the Markdown lists the cap and counts the rest
    assert len(re.findall(r"^### ", data["markdown"], re.MULTILINE)) == MARKDOWN_MAX_FINDINGS
    assert "... and 37 more finding(s)" in data["markdown"]
    # And the JSON and SARIF have them all
    assert len(data["findings"]) == total
    assert sum(len(run["results"]) for run in data["sarif"]["runs"]) == total


def test_markdown_snippets_cannot_break_out_of_their_fence() -> None:
    tricky = finding("R1", code='doc = """```\n# not a heading"""', message="a | b")
    text = render_markdown(merge_findings([{"kind": "findings", "findings": [tricky.to_dict()]}]))
    fence = re.search(r"^(`{4,})python$", text, re.MULTILINE)
    assert fence is not None, text
    assert text.count(fence.group(1)) == 2


def test_terminal_summary_shows_counts_and_the_top_findings(tmp_path: Path) -> None:
    report = realistic_report(tmp_path)
    text = render_summary(report, top=3)
    lines = text.splitlines()
    assert lines[0].startswith(report.title) and "NOT APPROVED" in lines[0]
    assert "critical 0  high" in lines[1]
    top = [line for line in lines if re.match(r"\s+src/\S+:\d+\s", line)]
    assert len(top) == 3
    for line, f in zip(top, report.findings):
        assert line.split()[:3] == [f"{f.path}:{f.line}", f.severity.value, f.rule]
    assert lines[-1].strip() == f"and {len(report.findings) - 3} more"
    assert "src/broken.py (unparseable)" in text and "#2 timed_out" in text


def test_report_rebuilds_from_its_json(tmp_path: Path) -> None:
    report = realistic_report(tmp_path)
    data = json.loads(json.dumps(report.to_data()))
    again = Report.from_data(data)
    assert again == report
    assert render_markdown(again) == data["markdown"]
    assert report_from_data(data) == report
    with pytest.raises(ReportError, match="kind 'report'"):
        Report.from_data({"kind": "research"})


# --- SARIF --------------------------------------------------------------------------------


def test_sarif_of_a_realistic_report_validates_against_the_schema(tmp_path: Path) -> None:
    report = realistic_report(tmp_path)
    sarif = render_sarif(report, srcroot=tmp_path.as_uri())
    assert_valid_sarif(sarif)
    assert_valid_sarif(report.to_data()["sarif"])
    assert sarif["version"] == "2.1.0"
    assert [run["tool"]["driver"]["name"] for run in sarif["runs"]] == ["Bandit", "orchestrator"]


def test_the_schema_check_catches_a_broken_document(tmp_path: Path) -> None:
    # Given a valid document, When a level, a region and a required field are broken,
    # Then the validator reports each (the validation above is no formality)
    sarif = render_sarif(realistic_report(tmp_path))
    breakers: tuple[Callable[[dict[str, Any]], object], ...] = (
        lambda d: d["runs"][0]["results"][0].update(level="critical"),
        lambda d: d["runs"][0]["results"][0]["locations"][0]["physicalLocation"]
        ["region"].update(startLine=0),
        lambda d: d["runs"][1]["invocations"][0].pop("executionSuccessful"))
    for breaks in breakers:
        broken = copy.deepcopy(sarif)
        breaks(broken)
        assert list(validator().iter_errors(broken)), breaks


def test_sarif_rules_carry_help_cwe_tags_and_security_severity(tmp_path: Path) -> None:
    report = realistic_report(tmp_path)
    bandit_run, our_run = render_sarif(report)["runs"]
    rules = {r["id"]: r for r in bandit_run["tool"]["driver"]["rules"]}
    b602 = rules["B602"]
    assert b602["helpUri"] == ("https://bandit.readthedocs.io/en/latest/plugins/"
                               "b602_subprocess_popen_with_shell_equals_true.html")
    assert "external/cwe/cwe-78" in b602["properties"]["tags"]
    assert b602["properties"]["security-severity"] == "8.0"
    assert b602["defaultConfiguration"]["level"] == "error"
    # bandit names its blacklist tests "blacklist": the description is the message
    assert rules["B307"]["shortDescription"]["text"].startswith(
        "Use of possibly insecure function")
    # Every bandit help link is the page of bandit's own more_info link, at "latest"
    for f in report.findings:
        if f.tool == "bandit":
            theirs = re.sub(r"/en/[^/]+/", "/en/latest/", f.more["more_info"]).split("#")[0]
            assert rules[f.rule]["helpUri"] == theirs
    ours = {r["id"]: r for r in our_run["tool"]["driver"]["rules"]}
    assert "external/cwe/cwe-502" in ours["S103"]["properties"]["tags"]
    assert "security-severity" not in ours["R101"]["properties"]  # not a security rule
    assert ours["P101"]["defaultConfiguration"]["level"] == "note"


def test_sarif_results_levels_locations_and_rule_indexes(tmp_path: Path) -> None:
    report = realistic_report(tmp_path)
    by_key = {(f.path, f.line, f.rule): f for f in report.findings}
    levels = {"critical": "error", "high": "error", "medium": "warning", "low": "note",
              "info": "note"}
    results = 0
    for run in render_sarif(report)["runs"]:
        rules = run["tool"]["driver"]["rules"]
        for result in run["results"]:
            location = result["locations"][0]["physicalLocation"]
            region = location["region"]
            f = by_key[(location["artifactLocation"]["uri"], region["startLine"],
                        result["ruleId"])]
            assert location["artifactLocation"]["uriBaseId"] == "%SRCROOT%"
            assert rules[result["ruleIndex"]]["id"] == f.rule
            assert result["level"] == levels[f.severity.value]
            assert region["startColumn"] == f.column + 1
            assert region["endLine"] >= region["startLine"]
            assert region["snippet"]["text"] == f.code
            assert f.message in result["message"]["text"]
            results += 1
    # The merged B602/S101 is one result; every finding is one result
    assert results == len(report.findings)
    assert ("src/app.py", 6, "S101") not in by_key


def test_sarif_notifies_the_files_not_analysed_and_the_failed_items(tmp_path: Path) -> None:
    report = realistic_report(tmp_path)
    bandit_run, our_run = render_sarif(report)["runs"]
    for run in (bandit_run, our_run):
        invocation = run["invocations"][0]
        assert invocation["executionSuccessful"] is False
        uris = [n["locations"][0]["physicalLocation"]["artifactLocation"]["uri"]
                for n in invocation["toolExecutionNotifications"] if "locations" in n]
        assert uris == ["src/broken.py", "src/huge.py"]
    texts = [n["message"]["text"] for n in our_run["invocations"][0]["toolExecutionNotifications"]]
    assert any("item 2 failed (timed_out)" in t for t in texts)
    # A clean report's runs succeeded
    clean = merge_findings([{"kind": "findings", "analyses": ["security"], "findings": [],
                             "files": [{"path": "a.py", "status": "analyzed"}]}])
    sarif = render_sarif(clean)
    assert_valid_sarif(sarif)
    assert [r["invocations"][0]["executionSuccessful"] for r in sarif["runs"]] == [True, True]
    assert [r["results"] for r in sarif["runs"]] == [[], []]


def test_fingerprints_are_unique_and_survive_lines_moving(tmp_path: Path) -> None:
    # Given the same call twice in one file, and the report rendered twice
    twice = [finding("B307", "a.py", 3, tool="bandit", code="eval(x)"),
             finding("B307", "a.py", 9, tool="bandit", code="eval(x)"),
             finding("B307", "b.py", 3, tool="bandit", code="eval(x)")]
    report = merge_findings([{"kind": "findings", "findings": [f.to_dict() for f in twice]}])

    def prints(r: Report) -> list[str]:
        return [res["partialFingerprints"][FINGERPRINT_NAME]
                for run in render_sarif(r)["runs"] for res in run["results"]]

    first = prints(report)
    assert len(set(first)) == 3 and prints(report) == first
    # When code is inserted above (every line moves down by 5)
    moved = [Finding.from_dict({**f.to_dict(), "line": f.line + 5, "end_line": f.line + 5})
             for f in twice]
    report_moved = merge_findings([{"kind": "findings", "findings": [f.to_dict() for f in moved]}])
    # Then each finding keeps its fingerprint
    assert sorted(prints(report_moved)) == sorted(first)


def test_a_finding_of_a_whole_file_has_no_region() -> None:
    # Given a finding about a file as a whole (line 0: the analysis could not place it)
    whole = finding("A100", "src/broken.py", 0, Severity.MEDIUM, category=Category.ANALYSIS,
                    code="")
    sarif = render_sarif(merge_findings([{"kind": "findings", "findings": [whole.to_dict()]}]))
    # Then its result points at the file only, and the document is valid
    assert_valid_sarif(sarif)
    location = sarif["runs"][0]["results"][0]["locations"][0]["physicalLocation"]
    assert location == {"artifactLocation": {"uri": "src/broken.py", "uriBaseId": "%SRCROOT%"}}


def test_paths_become_uri_references() -> None:
    odd = finding("R1", "src/my module/ü.py", 2)
    sarif = render_sarif(merge_findings([{"kind": "findings", "findings": [odd.to_dict()]}]))
    assert_valid_sarif(sarif)
    uri = sarif["runs"][0]["results"][0]["locations"][0]["physicalLocation"][
        "artifactLocation"]["uri"]
    assert uri == "src/my%20module/%C3%BC.py"


_findings = st.builds(
    finding, rule=st.sampled_from(["B602", "B603", "B307", "S101", "R101"]),
    path=st.sampled_from(["a.py", "pkg/b.py"]), line=st.integers(0, 4),
    severity=st.sampled_from(list(Severity)), confidence=st.sampled_from(list(Severity)),
    tool=st.sampled_from(["bandit", "orchestrator"]),
    category=st.sampled_from(list(Category)), cwe=st.sampled_from([None, 78, 502]))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_findings, max_size=25))
def test_merging_any_findings_keeps_each_problem_once_and_valid_sarif(
        findings: list[Finding]) -> None:
    report = merge_findings([{"kind": "findings", "analyses": ["security"],
                              "findings": [f.to_dict() for f in findings]}])
    keys = [f.key for f in report.findings]
    # Each key once, and merging again changes nothing
    assert len(keys) == len(set(keys))
    assert sorted(f.key for f in deduplicate(report.findings)) == sorted(keys)
    # Every problem is still there: its key, or a bandit finding at its line naming it
    for f in findings:
        if f.key in set(keys):
            continue
        assert f.tool != "bandit"
        assert any(g.tool == "bandit" and (g.path, g.line) == (f.path, f.line)
                   and f.rule in g.more.get("also_reported_as", ()) for g in report.findings)
    # Ranked worst first, and the SARIF holds every finding and is valid
    ranks = [(-f.severity.rank, -f.confidence.rank) for f in report.findings]
    assert ranks == sorted(ranks)
    sarif = render_sarif(report)
    assert_valid_sarif(sarif)
    assert sum(len(run["results"]) for run in sarif["runs"]) == len(report.findings)


def test_bandit_help_uri_for_blacklists_and_unknown_ids() -> None:
    assert bandit_help_uri("B307", "blacklist").endswith("blacklists/blacklist_calls.html")
    assert bandit_help_uri("B404", "blacklist").endswith("blacklists/blacklist_imports.html")
    assert bandit_help_uri("X1", "x").endswith("plugins/index.html")


# --- research and patches -----------------------------------------------------------------


def test_research_sections_citations_and_summary() -> None:
    items = [
        {"kind": "research", "aspect": "performance", "query": "vector db latency",
         "topic": "vector databases", "summary": "HNSW indexes answer in milliseconds. More.",
         "citations": [{"path": "docs/hnsw.md", "lines": [3, 9]},
                       {"path": "docs/bench.md", "lines": [1, 4]}]},
        {"kind": "research", "aspect": "cost", "query": "vector db cost",
         "topic": "vector databases", "summary": "Memory dominates the cost.",
         "citations": [{"path": "docs/hnsw.md", "lines": [3, 9]}]},
    ]
    report = merge_research(items, [FailedItem(2, "timed_out", "slow")])
    data = report.to_data()
    assert data["title"] == "Research: vector databases"
    assert [s["aspect"] for s in data["sections"]] == ["performance", "cost"]
    assert data["sections"][1]["citations"] == [{"path": "docs/hnsw.md", "lines": [3, 9]}]
    assert data["citations"] == [{"path": "docs/hnsw.md", "lines": [3, 9]},
                                 {"path": "docs/bench.md", "lines": [1, 4]}]
    assert data["summary"].startswith("2 of 3 part(s) answered; 1 failed.")
    assert "performance: HNSW indexes answer in milliseconds." in data["summary"]
    text = data["markdown"]
    assert "## performance" in text and "Memory dominates the cost. [1]" in text
    assert "1. `docs/hnsw.md:3-9`" in text and "2. `docs/bench.md:1-4`" in text
    assert ResearchReport.from_data(json.loads(json.dumps(data))) == report


def test_parts_that_quoted_nothing_are_not_answers() -> None:
    # Given one part that quoted a sentence and one whose researcher found only code
    quoted = {"kind": "research", "aspect": "overview", "query": "vector databases",
              "topic": "vector databases", "summary_by": "extractive",
              "summary": "Vector databases index embeddings. [docs/s.md:3-3]",
              "citations": [{"path": "docs/s.md", "lines": [3, 3]}]}
    unanswered = {"kind": "research", "aspect": "cost", "query": "vector database cost",
                  "topic": "vector databases", "summary_by": "none",
                  "summary": "No passage of the 2 document(s) is about 'vector "
                             "databases': its words appear only in code, tables or "
                             "passages on other subjects (nearest: [docs/u.md:5-7]).",
                  "citations": [{"path": "docs/u.md", "lines": [5, 7]}]}
    # When merged: 1 of 2 answered, and only the answer makes the summary's points
    report = merge_research([quoted, unanswered])
    assert report.summary.startswith("1 of 2 part(s) answered. overview: Vector databases")
    assert "No passage" not in report.summary
    # ...while the part that found nothing keeps its section, saying so
    assert report.sections[1].summary.startswith("No passage")
    # When no part answered, the lead says the documents do not discuss it
    nothing = merge_research([unanswered])
    assert nothing.summary == ("0 of 1 part(s) answered. The documents do not discuss it: "
                               "each part below names the nearest mention.")


def test_summaries_without_aspects_are_sections_named_by_their_sources() -> None:
    # Given two summarization outputs: one with per-file summaries, one without
    items = [{"kind": "research", "summary": "README.md: Three calls. [README.md:1-4]",
              "citations": [{"path": "README.md", "lines": [1, 4]},
                            {"path": "docs/api.md", "lines": [2, 2]}],
              "summaries": [
                  {"path": "README.md", "kind": "text", "title": "Intro",
                   "summary": "Three calls.", "citations": [{"path": "README.md",
                                                             "lines": [1, 4]}]},
                  {"path": "docs/api.md", "kind": "text", "title": "API",
                   "summary": "Call start first.", "citations": [{"path": "docs/api.md",
                                                                  "lines": [2, 2]}]}]},
             {"kind": "research", "summary": "The guide.",
              "citations": [{"path": "GUIDE.md", "lines": [1, 20]}]}]
    # When merged
    report = synthesize(items, None)
    # Then a section per summarized document, named by its path
    assert isinstance(report, ResearchReport)
    assert [s.aspect for s in report.sections] == ["README.md", "docs/api.md", "GUIDE.md"]
    assert report.sections[1].summary == "Call start first."
    assert report.title == "Summary of 3 document(s)"
    assert report.summary.startswith("2 of 2 part(s) answered.")
    assert [c.path for c in report.citations] == ["README.md", "docs/api.md", "GUIDE.md"]


def _git(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=TOOL_TIMEOUT_S, check=True)


def test_patches_concatenate_into_one_diff_git_applies(tmp_path: Path) -> None:
    # Given a repository and one patch per batch, made by git itself
    repo = tmp_path / "repo"
    (repo / "src").mkdir(parents=True)
    _git(repo, "init", "-q")
    originals = {"src/a.py": "x = 1\ny = 2\n", "src/b.py": "def f():\n    return 1\n"}
    changed = {"src/a.py": "x = 1\ny = 3\n", "src/b.py": "def f():\n    return 2\n"}
    items = []
    for path, text in originals.items():
        (repo / path).write_text(text)
    _git(repo, "add", "-A")
    for path, original in originals.items():
        (repo / path).write_text(changed[path])
        diff = _git(repo, "diff", "--", path).stdout
        (repo / path).write_text(original)
        items.append({"kind": "patch", "diff": diff, "tool": "ruff",
                      "files": [{"path": path, "changed": True},
                                {"path": "src/c.py", "changed": False}]})
    # When aggregated
    report = synthesize(items, [], capability="aggregation")
    assert isinstance(report, PatchReport)
    data = report.to_data()
    # Then the one diff applies and makes both changes
    (tmp_path / "all.diff").write_text(data["diff"])
    _git(repo, "apply", str(tmp_path / "all.diff"))
    assert {p: (repo / p).read_text() for p in changed} == changed
    assert data["files"] == [{"path": "src/a.py", "changed": True},
                             {"path": "src/b.py", "changed": True},
                             {"path": "src/c.py", "changed": False}]
    assert data["conflicts"] == [] and data["tools"] == ["ruff"]
    assert "2 of 3 file(s) changed by ruff." in data["markdown"]
    assert "```diff" in data["markdown"]
    assert PatchReport.from_data(json.loads(json.dumps(data))) == report


def test_two_patches_of_one_file_are_a_conflict() -> None:
    item = {"kind": "patch", "diff": "", "files": [{"path": "a.py", "changed": True}]}
    report = merge_patches([item, item])
    assert report.conflicts == ("a.py",)
    assert "**Conflicts**" in render_markdown(report)
