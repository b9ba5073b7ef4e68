"""The synthesizer's reports as typed records, and their renderings: Markdown, SARIF, terminal.

The synthesizer (:mod:`agents.synthesizer`) merges many agents' outputs into one of three
records: :class:`Report` (findings of analyses), :class:`ResearchReport` (research or
summaries with citations) and :class:`PatchReport` (refactoring patches). Each record's
``to_data()`` is the JSON the synthesizer returns as ``Result.data``; ``from_data`` rebuilds
the record from it, so the CLI renders what a workflow returned without the agent. The
renderings here are pure functions of the records: the same report gives the same text,
byte for byte (SARIF fingerprints included), which is what CI diffing and GitHub code
scanning's alert tracking need.

SARIF follows the 2.1.0 standard (the schema is vendored in ``agents/schemas/``) and the
conventions GitHub code scanning reads: ``tool.driver.rules[].properties.tags`` with
``external/cwe/cwe-N``, ``security-severity`` as a number in a string, paths relative to
``%SRCROOT%`` and ``partialFingerprints`` for tracking an alert across commits.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import quote

from agents.findings import Category, Finding, Severity, ranked

#: Findings the Markdown report lists one by one; the rest are counted ("and N more").
#: The JSON and SARIF forms always keep every finding.
MARKDOWN_MAX_FINDINGS: Final = 200
#: Lines of a patch the Markdown shows before it points at the full diff.
MARKDOWN_MAX_DIFF_LINES: Final = 2000
#: The status of a file an analysis read completely.
ANALYZED: Final = "analyzed"
#: ``$schema`` of the SARIF documents (the URI GitHub's own uploads use).
SARIF_SCHEMA_URI: Final = "https://json.schemastore.org/sarif-2.1.0.json"
SARIF_VERSION: Final = "2.1.0"
#: The base every artifact URI is relative to: the analysed tree's root.
SRCROOT: Final = "%SRCROOT%"
#: Name of the partial fingerprint, versioned: a change of the hash recipe gets a new name
#: instead of silently re-opening every alert.
FINGERPRINT_NAME: Final = "orchestratorFinding/v1"
BANDIT_DOCS: Final = "https://bandit.readthedocs.io/en/latest/"
BANDIT_PLUGINS_INDEX: Final = BANDIT_DOCS + "plugins/index.html"
#: SARIF ``level`` per severity: what code scanning shows as error / warning / note.
SARIF_LEVELS: Final = {Severity.CRITICAL: "error", Severity.HIGH: "error",
                       Severity.MEDIUM: "warning", Severity.LOW: "note", Severity.INFO: "note"}
#: GitHub's ``security-severity`` score per severity (critical > 9.0, high 7.0-8.9,
#: medium 4.0-6.9, low 0.1-3.9); info has none: it is not a vulnerability.
SECURITY_SEVERITY: Final = {Severity.CRITICAL: "9.5", Severity.HIGH: "8.0",
                            Severity.MEDIUM: "5.5", Severity.LOW: "2.0"}
#: SARIF ``precision`` per confidence.
PRECISION: Final = {Severity.CRITICAL: "very-high", Severity.HIGH: "high",
                    Severity.MEDIUM: "medium", Severity.LOW: "low", Severity.INFO: "low"}
#: Titles of the analyses a reviewer output names in ``analyses``.
ANALYSIS_TITLES: Final = {"security": "Security audit", "review": "Code review",
                          "performance": "Performance analysis"}
#: Code fence languages by file suffix, for readable snippets on GitHub.
FENCE_LANGUAGES: Final = {".py": "python", ".pyw": "python", ".js": "javascript",
                          ".ts": "typescript", ".go": "go", ".rs": "rust", ".java": "java",
                          ".sh": "bash", ".rb": "ruby", ".c": "c", ".h": "c", ".cpp": "cpp"}


class ReportError(ValueError):
    """Raised when report data is malformed (the message names the field)."""


# --- records -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FileStatus:
    """How an analysis went for one file: ``analyzed``, or why not (``unparseable``,
    ``time_limit``, ``memory_limit``) with a detail for people."""

    path: str
    status: str = ANALYZED
    detail: str = ""

    @property
    def analyzed(self) -> bool:
        """Whether the file was read completely."""
        return self.status == ANALYZED

    def to_dict(self) -> dict[str, Any]:
        """The JSON form."""
        return {"path": self.path, "status": self.status, "detail": self.detail}

    @classmethod
    def from_dict(cls, raw: Any) -> FileStatus:
        """A file status from its JSON form.

        Raises:
            ReportError: not a map with a ``path``.
        """
        if not isinstance(raw, Mapping) or not isinstance(raw.get("path"), str):
            raise ReportError(f"a file status needs a map with a 'path'; got {raw!r:.80}")
        return cls(raw["path"], str(raw.get("status") or ANALYZED), str(raw.get("detail") or ""))


@dataclass(frozen=True, slots=True)
class FailedItem:
    """A map item that failed (the reducer's ``failed`` task field): nothing of it is in
    the report, so the report says so."""

    index: int
    code: str
    error: str

    def to_dict(self) -> dict[str, Any]:
        """The JSON form."""
        return {"index": self.index, "code": self.code, "error": self.error}

    @classmethod
    def from_dict(cls, raw: Any) -> FailedItem:
        """A failed item from ``{"index", "code", "error"}``.

        Raises:
            ReportError: not such a map.
        """
        try:
            return cls(int(raw["index"]), str(raw.get("code") or "failed"),
                       str(raw.get("error") or ""))
        except (KeyError, TypeError, ValueError, AttributeError):
            raise ReportError("a failed item needs a map with an integer 'index'; "
                              f"got {raw!r:.80}") from None


@dataclass(frozen=True, slots=True)
class Summary:
    """The counts at the head of a findings report."""

    files: int
    analyzed: int
    findings: int
    by_severity: Mapping[str, int]
    by_category: Mapping[str, int]
    failed_items: int

    @property
    def not_analyzed(self) -> int:
        """Files no analysis could read completely."""
        return self.files - self.analyzed

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (``summary`` of the report data)."""
        return {"files": self.files, "analyzed": self.analyzed,
                "not_analyzed": self.not_analyzed, "findings": self.findings,
                "by_severity": dict(self.by_severity), "by_category": dict(self.by_category),
                "failed_items": self.failed_items}


def count_findings(findings: Iterable[Finding]) -> tuple[dict[str, int], dict[str, int]]:
    """Findings per severity (worst first) and per category, every name present (zeros
    included), so that consumers read a fixed shape."""
    findings = list(findings)
    severities = Counter(f.severity for f in findings)
    categories = Counter(f.category for f in findings)
    by_severity = {s.value: severities[s] for s in sorted(Severity, key=lambda s: -s.rank)}
    return by_severity, {c.value: categories[c] for c in Category}


@dataclass(frozen=True, slots=True)
class Report:
    """A merged findings report: what the synthesizer returns for analyses.

    Attributes:
        title: what was analysed, for people ("Security audit of pull request #12").
        findings: de-duplicated and ranked worst first.
        files: each analysed file's status, by path.
        failed: the map items that failed.
        analyses: which analyses ran (``security``, ``review``, ``performance``).
        change: the change reviewed, when a change was.
    """

    title: str
    findings: tuple[Finding, ...]
    files: tuple[FileStatus, ...] = ()
    failed: tuple[FailedItem, ...] = ()
    analyses: tuple[str, ...] = ()
    change: str | None = None

    @property
    def summary(self) -> Summary:
        """The counts, computed from the records."""
        by_severity, by_category = count_findings(self.findings)
        files = len(self.files) if self.files else len({f.path for f in self.findings})
        analyzed = sum(1 for f in self.files if f.analyzed) if self.files else files
        return Summary(files, analyzed, len(self.findings), by_severity, by_category,
                       len(self.failed))

    @property
    def not_analyzed(self) -> tuple[FileStatus, ...]:
        """The files no analysis could read completely."""
        return tuple(f for f in self.files if not f.analyzed)

    @property
    def approved(self) -> bool:
        """No finding high or critical, and nothing left unexamined: a report cannot
        vouch for files or items it never saw."""
        return (not any(f.severity.rank >= Severity.HIGH.rank for f in self.findings)
                and not self.failed and not self.not_analyzed)

    def to_data(self) -> dict[str, Any]:
        """The synthesizer's ``Result.data``: the record, its Markdown and its SARIF."""
        return {"kind": "report", "title": self.title, "summary": self.summary.to_dict(),
                "findings": [f.to_dict() for f in self.findings],
                "files": [f.to_dict() for f in self.files],
                "failed": [f.to_dict() for f in self.failed], "approved": self.approved,
                "analyses": list(self.analyses), "change": self.change,
                "markdown": render_markdown(self), "sarif": render_sarif(self)}

    @classmethod
    def from_data(cls, data: Any) -> Report:
        """The record back from :meth:`to_data`'s form (``markdown`` and ``sarif`` are
        renderings and are ignored).

        Raises:
            ReportError: the data is not a findings report (the message says why).
        """
        if not isinstance(data, Mapping) or data.get("kind") != "report":
            raise ReportError("not a findings report: expected a map with kind 'report'")
        try:
            findings = tuple(Finding.from_dict(f) for f in data.get("findings") or ())
        except ValueError as error:
            raise ReportError(str(error)) from None
        change = data.get("change")
        return cls(str(data.get("title") or "Report"), tuple(ranked(list(findings))),
                   tuple(FileStatus.from_dict(f) for f in data.get("files") or ()),
                   tuple(FailedItem.from_dict(f) for f in data.get("failed") or ()),
                   tuple(str(a) for a in data.get("analyses") or ()),
                   None if change is None else str(change))


@dataclass(frozen=True, slots=True)
class Citation:
    """A place in a document that backs a statement: path and 1-based line range."""

    path: str
    lines: tuple[int, int]

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (``{"path", "lines": [start, end]}``)."""
        return {"path": self.path, "lines": list(self.lines)}

    @classmethod
    def from_dict(cls, raw: Any) -> Citation:
        """A citation from its JSON form.

        Raises:
            ReportError: no ``path``, or ``lines`` not two integers.
        """
        try:
            start, end = (int(n) for n in raw.get("lines") or (0, 0))
            return cls(str(raw["path"]), (start, end))
        except (KeyError, TypeError, ValueError, AttributeError):
            raise ReportError("a citation needs {'path', 'lines': [start, end]}; "
                              f"got {raw!r:.80}") from None

    @property
    def label(self) -> str:
        """``path:start-end`` (``path`` alone when there are no lines)."""
        start, end = self.lines
        if start <= 0:
            return self.path
        return f"{self.path}:{start}" if end <= start else f"{self.path}:{start}-{end}"


@dataclass(frozen=True, slots=True)
class Section:
    """What one research item found about one aspect."""

    aspect: str
    query: str
    summary: str
    citations: tuple[Citation, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """The JSON form."""
        return {"aspect": self.aspect, "query": self.query, "summary": self.summary,
                "citations": [c.to_dict() for c in self.citations]}

    @classmethod
    def from_dict(cls, raw: Any) -> Section:
        """A section from its JSON form.

        Raises:
            ReportError: not a map.
        """
        if not isinstance(raw, Mapping):
            raise ReportError(f"a research section must be a map; got {raw!r:.80}")
        return cls(str(raw.get("aspect") or ""), str(raw.get("query") or ""),
                   str(raw.get("summary") or ""),
                   tuple(Citation.from_dict(c) for c in raw.get("citations") or ()))


@dataclass(frozen=True, slots=True)
class ResearchReport:
    """Research (or summaries) merged: one section per aspect, every citation once."""

    title: str
    summary: str
    sections: tuple[Section, ...]
    citations: tuple[Citation, ...]
    failed: tuple[FailedItem, ...] = ()

    def to_data(self) -> dict[str, Any]:
        """The synthesizer's ``Result.data`` for research."""
        return {"kind": "research", "title": self.title, "summary": self.summary,
                "sections": [s.to_dict() for s in self.sections],
                "citations": [c.to_dict() for c in self.citations],
                "failed": [f.to_dict() for f in self.failed],
                "markdown": render_markdown(self)}

    @classmethod
    def from_data(cls, data: Any) -> ResearchReport:
        """The record back from :meth:`to_data`'s form.

        Raises:
            ReportError: not a research report.
        """
        if not isinstance(data, Mapping) or data.get("kind") != "research":
            raise ReportError("not a research report: expected a map with kind 'research'")
        return cls(str(data.get("title") or "Research"), str(data.get("summary") or ""),
                   tuple(Section.from_dict(s) for s in data.get("sections") or ()),
                   tuple(Citation.from_dict(c) for c in data.get("citations") or ()),
                   tuple(FailedItem.from_dict(f) for f in data.get("failed") or ()))


@dataclass(frozen=True, slots=True)
class PatchFile:
    """A file a refactoring looked at, and whether its patch changes it."""

    path: str
    changed: bool

    def to_dict(self) -> dict[str, Any]:
        """The JSON form."""
        return {"path": self.path, "changed": self.changed}


@dataclass(frozen=True, slots=True)
class PatchReport:
    """Refactoring patches merged into one diff (``git apply`` / ``patch -p1``)."""

    diff: str
    files: tuple[PatchFile, ...]
    tools: tuple[str, ...] = ()
    failed: tuple[FailedItem, ...] = ()
    #: paths two items both patched: their hunks may not apply together
    conflicts: tuple[str, ...] = ()
    title: str = "Refactoring"

    def to_data(self) -> dict[str, Any]:
        """The synthesizer's ``Result.data`` for aggregated patches."""
        return {"kind": "patch", "title": self.title, "diff": self.diff,
                "files": [f.to_dict() for f in self.files], "tools": list(self.tools),
                "failed": [f.to_dict() for f in self.failed],
                "conflicts": list(self.conflicts), "markdown": render_markdown(self)}

    @classmethod
    def from_data(cls, data: Any) -> PatchReport:
        """The record back from :meth:`to_data`'s form.

        Raises:
            ReportError: not a patch.
        """
        if not isinstance(data, Mapping) or data.get("kind") != "patch":
            raise ReportError("not a patch: expected a map with kind 'patch'")
        files = []
        for raw in data.get("files") or ():
            if not isinstance(raw, Mapping) or not isinstance(raw.get("path"), str):
                raise ReportError(f"a patched file needs a map with a 'path'; got {raw!r:.80}")
            files.append(PatchFile(raw["path"], bool(raw.get("changed"))))
        return cls(str(data.get("diff") or ""), tuple(files),
                   tuple(str(t) for t in data.get("tools") or ()),
                   tuple(FailedItem.from_dict(f) for f in data.get("failed") or ()),
                   tuple(str(p) for p in data.get("conflicts") or ()),
                   str(data.get("title") or "Refactoring"))


AnyReport = Report | ResearchReport | PatchReport


def report_from_data(data: Any) -> AnyReport:
    """The record of any synthesizer output, by its ``kind``.

    Raises:
        ReportError: an unknown kind.
    """
    kind = data.get("kind") if isinstance(data, Mapping) else None
    if kind == "report":
        return Report.from_data(data)
    if kind == "research":
        return ResearchReport.from_data(data)
    if kind == "patch":
        return PatchReport.from_data(data)
    raise ReportError(f"not a synthesizer output: kind {kind!r}, expected report, research "
                      "or patch")


# --- Markdown ----------------------------------------------------------------------------


def render_markdown(report: AnyReport) -> str:
    """The report as Markdown: readable as plain text in a terminal and rendered on GitHub."""
    if isinstance(report, Report):
        return _findings_markdown(report)
    if isinstance(report, ResearchReport):
        return _research_markdown(report)
    return _patch_markdown(report)


def _cell(text: object) -> str:
    """Text safe inside a Markdown table cell (one line, no column breaks)."""
    return re.sub(r"\s+", " ", str(text)).replace("|", "\\|").strip()


def _inline_code(text: str) -> str:
    """``text`` as inline code, with a backtick run longer than any inside it."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    ticks = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{ticks}{pad}{text}{pad}{ticks}"


def _fenced(text: str, language: str = "") -> list[str]:
    """A fenced code block that no backtick run inside ``text`` can close early."""
    longest = max((len(run) for run in re.findall(r"`{3,}", text)), default=2)
    fence = "`" * (longest + 1)
    return [fence + language, text.rstrip("\n"), fence]


def _language(path: str) -> str:
    dot = path.rfind(".")
    return FENCE_LANGUAGES.get(path[dot:].lower(), "") if dot >= 0 else ""


def _place(finding: Finding) -> str:
    return f"{finding.path}:{finding.line}" if finding.line > 0 else finding.path


def _counts_line(summary: Summary) -> str:
    worst = [f"{n} {name}" for name, n in summary.by_severity.items() if n]
    return ", ".join(worst) if worst else "none"


def _findings_markdown(report: Report) -> str:
    summary = report.summary
    verdict = "approved" if report.approved else "not approved"
    head = (f"**{summary.findings} finding(s)** in {summary.files} file(s): "
            f"{_counts_line(summary)}. Verdict: **{verdict}**.")
    lines = [f"# {report.title}", "", head]
    if summary.not_analyzed or summary.failed_items:
        lines.append(f"Not analysed: {summary.not_analyzed} file(s); failed items: "
                     f"{summary.failed_items}.")
    lines += ["", "| Severity | Findings |", "| --- | ---: |"]
    lines += [f"| {name} | {n} |" for name, n in summary.by_severity.items()]
    categories = [(name, n) for name, n in summary.by_category.items() if n]
    if categories:
        lines += ["", "| Category | Findings |", "| --- | ---: |"]
        lines += [f"| {name} | {n} |" for name, n in categories]
    if report.findings:
        lines += ["", "## Findings"]
    for number, finding in enumerate(report.findings[:MARKDOWN_MAX_FINDINGS], 1):
        lines += ["", *_finding_markdown(number, finding)]
    hidden = len(report.findings) - MARKDOWN_MAX_FINDINGS
    if hidden > 0:
        lines += ["", (f"... and {hidden} more finding(s), not listed here: the JSON and "
                       "SARIF reports have every finding.")]
    if report.not_analyzed:
        lines += ["", "## Files not analysed", "", "| File | Status | Detail |",
                  "| --- | --- | --- |"]
        lines += [f"| {_cell(f.path)} | {_cell(f.status)} | {_cell(f.detail)} |"
                  for f in report.not_analyzed]
    lines += _failed_markdown(report.failed)
    return "\n".join(lines) + "\n"


def _finding_markdown(number: int, finding: Finding) -> list[str]:
    facts = [_inline_code(_place(finding)), f"confidence {finding.confidence.value}"]
    if finding.cwe is not None:
        facts.append(f"CWE-{finding.cwe}")
    if finding.tool:
        facts.append(finding.tool)
    lines = [f"### {number}. {finding.severity.value.upper()} {finding.rule} "
             f"{finding.name}".rstrip(),
             " · ".join(facts), "", finding.message or "(no message)"]
    if finding.code:
        lines += ["", *_fenced(finding.code, _language(finding.path))]
    if finding.suggestion:
        lines += ["", f"**Suggestion:** {finding.suggestion}"]
    also = finding.more.get("also_reported_as") if finding.more else None
    if also:
        lines += ["", f"Also reported as: {', '.join(str(a) for a in also)}."]
    return lines


def _failed_markdown(failed: Sequence[FailedItem]) -> list[str]:
    if not failed:
        return []
    lines = ["", "## Failed items", "", "Nothing of these items is in this report.", "",
             "| Item | Code | Error |", "| ---: | --- | --- |"]
    lines += [f"| {f.index} | {_cell(f.code)} | {_cell(f.error)} |" for f in failed]
    return lines


def _research_markdown(report: ResearchReport) -> str:
    numbers = {c: i for i, c in enumerate(report.citations, 1)}
    lines = [f"# {report.title}", "", report.summary or "(no summary)"]
    for section in report.sections:
        lines += ["", f"## {section.aspect or section.query or 'Findings'}"]
        if section.query and section.aspect:
            lines += ["", f"*Query: {section.query}*"]
        refs = "".join(f"[{numbers[c]}]" for c in section.citations if c in numbers)
        lines += ["", (section.summary or "(nothing found)") + (f" {refs}" if refs else "")]
    if report.citations:
        lines += ["", "## Sources", ""]
        lines += [f"{i}. {_inline_code(c.label)}" for c, i in numbers.items()]
    lines += _failed_markdown(report.failed)
    return "\n".join(lines) + "\n"


def _patch_markdown(report: PatchReport) -> str:
    changed = [f for f in report.files if f.changed]
    by = f" by {', '.join(report.tools)}" if report.tools else ""
    lines = [f"# {report.title}", "", f"{len(changed)} of {len(report.files)} file(s) changed{by}."]
    if changed:
        lines += ["", *(f"- {_inline_code(f.path)}" for f in changed)]
    if report.conflicts:
        paths = ", ".join(_inline_code(p) for p in report.conflicts)
        lines += ["", f"**Conflicts**: more than one item patched {paths}; apply with care."]
    if report.diff:
        diff_lines = report.diff.splitlines()
        shown = "\n".join(diff_lines[:MARKDOWN_MAX_DIFF_LINES])
        lines += ["", *_fenced(shown, "diff")]
        if len(diff_lines) > MARKDOWN_MAX_DIFF_LINES:
            more = len(diff_lines) - MARKDOWN_MAX_DIFF_LINES
            lines += ["", f"... and {more} more diff line(s): the JSON output has the whole diff."]
    lines += _failed_markdown(report.failed)
    return "\n".join(lines) + "\n"


# --- terminal summary --------------------------------------------------------------------


def render_summary(report: Report, top: int = 10) -> str:
    """A short plain-text summary for a terminal: counts by severity, then the ``top``
    worst findings as ``file:line  severity  rule  message``."""
    summary = report.summary
    verdict = "APPROVED" if report.approved else "NOT APPROVED"
    head = (f"{report.title}: {summary.findings} finding(s) in {summary.files} file(s) "
            f"- {verdict}")
    lines = [head, "  " + "  ".join(f"{name} {n}" for name, n in summary.by_severity.items())]
    if summary.not_analyzed:
        lines.append(f"  {summary.not_analyzed} file(s) not analysed: " + ", ".join(
            f"{f.path} ({f.status})" for f in report.not_analyzed[:top]))
    if summary.failed_items:
        lines.append(f"  {summary.failed_items} item(s) failed: " + ", ".join(
            f"#{f.index} {f.code}" for f in report.failed[:top]))
    shown = report.findings[:max(0, top)]
    if shown:
        width = max(len(_place(f)) for f in shown)
        lines.append("Top findings:")
        lines += [f"  {_place(f):<{width}}  {f.severity.value:<8}  {f.rule:<6}  "
                  f"{' '.join(f.message.split())}" for f in shown]
    if len(report.findings) > len(shown):
        lines.append(f"  and {len(report.findings) - len(shown)} more")
    return "\n".join(lines)


# --- SARIF -------------------------------------------------------------------------------


def render_sarif(report: Report, srcroot: str | None = None) -> dict[str, Any]:
    """The report as a SARIF 2.1.0 log: one run per tool (bandit's findings, then ours).

    Args:
        report: the findings report.
        srcroot: the analysed tree's root as a ``file://`` URI, when known: it becomes
            ``originalUriBaseIds["%SRCROOT%"]`` (GitHub needs none: it resolves relative
            paths against the repository).
    """
    tools = _tools(report)
    runs = [_sarif_run(report, tool, [f for f in report.findings if _tool_of(f) == tool],
                       srcroot) for tool in tools]
    return {"$schema": SARIF_SCHEMA_URI, "version": SARIF_VERSION, "runs": runs}


def _tool_of(finding: Finding) -> str:
    return "bandit" if finding.tool == "bandit" else "orchestrator"


def _tools(report: Report) -> list[str]:
    """bandit's run when bandit ran (a security analysis) or reported; ours always, as
    it carries the notifications about the analysis itself."""
    bandit = "security" in report.analyses or any(_tool_of(f) == "bandit"
                                                  for f in report.findings)
    return ["bandit", "orchestrator"] if bandit else ["orchestrator"]


def _driver(tool: str, rules: list[dict[str, Any]]) -> dict[str, Any]:
    if tool == "bandit":
        return {"name": "Bandit", "informationUri": "https://github.com/PyCQA/bandit",
                "rules": rules}
    return {"name": "orchestrator", "rules": rules}


def bandit_help_uri(rule: str, name: str) -> str:
    """The bandit documentation page of a test id: a plugin's own page (``b602_<name>``),
    the blacklist pages for B3xx (calls) and B4xx (imports), else the plugins index."""
    if not re.fullmatch(r"B\d{3}", rule):
        return BANDIT_PLUGINS_INDEX
    if rule.startswith("B3"):
        return BANDIT_DOCS + "blacklists/blacklist_calls.html"
    if rule.startswith("B4"):
        return BANDIT_DOCS + "blacklists/blacklist_imports.html"
    if re.fullmatch(r"[a-z0-9_]+", name) and name != "blacklist":
        return f"{BANDIT_DOCS}plugins/{rule.lower()}_{name}.html"
    return BANDIT_PLUGINS_INDEX


def _sarif_rule(tool: str, findings: list[Finding]) -> dict[str, Any]:
    """A rule descriptor from the rule's findings (the worst sets its default level)."""
    first = findings[0]
    worst = max((f.severity for f in findings), key=lambda s: s.rank)
    # bandit names every B3xx/B4xx test "blacklist": its message says more than that
    generic = first.name in ("", "blacklist")
    words = (first.message if generic else first.name.replace("_", " ")).strip() or first.rule
    tags = [first.category.value]
    cwes = sorted({f.cwe for f in findings if f.cwe is not None})
    tags += [f"external/cwe/cwe-{cwe}" for cwe in cwes]
    properties: dict[str, Any] = {"tags": tags, "precision": PRECISION[first.confidence]}
    if first.category is Category.SECURITY and worst in SECURITY_SEVERITY:
        properties["security-severity"] = SECURITY_SEVERITY[worst]
    rule: dict[str, Any] = {
        "id": first.rule, "name": _rule_name(first.name or first.rule),
        "shortDescription": {"text": words[:1].upper() + words[1:]},
        "fullDescription": {"text": first.message or words},
        "defaultConfiguration": {"level": SARIF_LEVELS[worst]},
        "properties": properties,
    }
    if tool == "bandit":
        rule["helpUri"] = bandit_help_uri(first.rule, first.name)
    if first.suggestion:
        rule["help"] = {"text": first.suggestion}
    return rule


def _rule_name(name: str) -> str:
    """SARIF rule names are identifier-like, PascalCase by convention
    (``subprocess_popen_with_shell_equals_true`` -> ``SubprocessPopenWithShellEqualsTrue``)."""
    parts = re.split(r"[^A-Za-z0-9]+", name)
    return "".join(p[:1].upper() + p[1:] for p in parts if p) or "Rule"


def fingerprint(finding: Finding, occurrence: int = 0) -> str:
    """A finding's partial fingerprint: its file, rule and the offending line's text (not
    its number, so that an edit above it keeps the alert), plus which occurrence of that
    same text and rule in the file it is."""
    text = " ".join(finding.code.split())
    digest = hashlib.sha256(f"{finding.path}\0{finding.rule}\0{text}".encode()).hexdigest()
    return f"{digest[:32]}:{occurrence}"


def _artifact(path: str) -> dict[str, Any]:
    return {"uri": quote(path, safe="/"), "uriBaseId": SRCROOT}


def _sarif_result(finding: Finding, rule_index: int, occurrence: int) -> dict[str, Any]:
    physical: dict[str, Any] = {"artifactLocation": _artifact(finding.path)}
    if finding.line > 0:
        region: dict[str, Any] = {"startLine": finding.line, "startColumn": finding.column + 1,
                                  "endLine": max(finding.end_line, finding.line)}
        if finding.code:
            region["snippet"] = {"text": finding.code}
        physical["region"] = region
    message = finding.message or finding.name or finding.rule
    if finding.suggestion:
        message = f"{message} Suggestion: {finding.suggestion}"
    properties: dict[str, Any] = {"severity": finding.severity.value,
                                  "confidence": finding.confidence.value,
                                  "category": finding.category.value}
    if finding.cwe is not None:
        properties["cwe"] = f"CWE-{finding.cwe}"
    if finding.more:
        properties["more"] = dict(finding.more)
    return {"ruleId": finding.rule, "ruleIndex": rule_index,
            "level": SARIF_LEVELS[finding.severity], "message": {"text": message},
            "locations": [{"physicalLocation": physical}],
            "partialFingerprints": {FINGERPRINT_NAME: fingerprint(finding, occurrence)},
            "properties": properties}


def _sarif_run(report: Report, tool: str, findings: list[Finding],
               srcroot: str | None) -> dict[str, Any]:
    by_rule: dict[str, list[Finding]] = {}
    for finding in findings:
        by_rule.setdefault(finding.rule, []).append(finding)
    rule_ids = sorted(by_rule)
    index = {rule: i for i, rule in enumerate(rule_ids)}
    seen: Counter[tuple[str, str, str]] = Counter()
    results = []
    # Occurrences count in file order, not in rank order: a severity change elsewhere in
    # the report must not renumber this finding's fingerprint.
    for finding in sorted(findings, key=lambda f: (f.path, f.line, f.column, f.rule)):
        token = (finding.path, finding.rule, " ".join(finding.code.split()))
        results.append(_sarif_result(finding, index[finding.rule], seen[token]))
        seen[token] += 1
    notifications = _notifications(report, include_failed=tool == "orchestrator")
    run: dict[str, Any] = {
        "tool": {"driver": _driver(tool, [_sarif_rule(tool, by_rule[r]) for r in rule_ids])},
        "invocations": [{"executionSuccessful": not notifications,
                         "toolExecutionNotifications": notifications}],
        "results": results,
        "columnKind": "unicodeCodePoints",
    }
    if srcroot:
        run["originalUriBaseIds"] = {SRCROOT: {"uri": srcroot.rstrip("/") + "/"}}
    if report.title:
        run["automationDetails"] = {"description": {"text": report.title}}
    return run


def _notifications(report: Report, include_failed: bool) -> list[dict[str, Any]]:
    """Tool execution notifications: every file not analysed (neither tool read it), and
    for our own run every failed map item."""
    out: list[dict[str, Any]] = []
    for status in report.not_analyzed:
        detail = f": {status.detail}" if status.detail else ""
        out.append({"level": "error",
                    "message": {"text": f"{status.path} was not analysed "
                                        f"({status.status}){detail}"},
                    "descriptor": {"id": status.status},
                    "locations": [{"physicalLocation": {
                        "artifactLocation": _artifact(status.path)}}]})
    if include_failed:
        for item in report.failed:
            out.append({"level": "error",
                        "message": {"text": f"item {item.index} failed ({item.code}): "
                                            f"{item.error or 'no detail'}"},
                        "descriptor": {"id": item.code}})
    return out


__all__ = [
    "ANALYZED",
    "MARKDOWN_MAX_FINDINGS",
    "AnyReport",
    "Citation",
    "FailedItem",
    "FileStatus",
    "PatchFile",
    "PatchReport",
    "Report",
    "ReportError",
    "ResearchReport",
    "Section",
    "Summary",
    "bandit_help_uri",
    "count_findings",
    "fingerprint",
    "render_markdown",
    "render_sarif",
    "render_summary",
    "report_from_data",
]
