"""The synthesizer agent: merges many agents' results into one report.

It is the reducer of the planner's map-reduces (``synthesis`` after analyses, summaries
and research; ``aggregation`` after refactorings): its task data is the list of the
succeeded items' result ``data`` in item order, and the task field ``failed`` lists the
items that did not succeed (``[{"index", "code", "error"}]``). Which report it writes
follows from what the items are (their ``kind``):

- ``findings`` (reviewer outputs) -> ``{"kind": "report", ...}``: findings de-duplicated
  (the same file, line and rule once; and the same problem reported by bandit and by our
  own check at one line once, bandit's id kept), ranked worst first, counted, with the
  files no analysis could read and the failed items, as Markdown and SARIF too;
- ``research`` (researcher outputs) -> ``{"kind": "research", ...}``: a section per aspect
  with its citations, and a merged summary;
- ``patch`` (coder refactorings) -> ``{"kind": "patch", ...}``: the diffs concatenated.

The merging is pure (:func:`merge_findings`, :func:`merge_research`, :func:`merge_patches`
over typed records); the rendering is :mod:`agents.report`'s. Everything a later step or
the CLI needs is in ``Result.data``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any, Final

from agent_sdk import BaseAgent, PermanentFailure, Result, Task
from agents.findings import Finding, ranked
from agents.report import (
    ANALYSIS_TITLES,
    AnyReport,
    Citation,
    FailedItem,
    FileStatus,
    PatchFile,
    PatchReport,
    Report,
    ReportError,
    ResearchReport,
    Section,
)

logger = logging.getLogger(__name__)

#: Findings (the worst) the LLM's overview of a report is written from.
OVERVIEW_FINDINGS: Final = 20
#: Most tokens the LLM may write for that overview.
OVERVIEW_MAX_TOKENS: Final = 400
#: The tool whose rule id wins when it and our own check report one problem.
CANONICAL_TOOL: Final = "bandit"
#: Characters of an item's summary that the merged summary quotes.
SUMMARY_SENTENCE_CHARS: Final = 300
#: Sections the merged summary of research quotes; the Markdown has them all.
SUMMARY_MAX_POINTS: Final = 12


class SynthesisError(ValueError):
    """Raised when the items cannot be merged (the message names the item and field)."""


class BadInput(PermanentFailure):
    """Raised by the agent for items it cannot merge: the task fails at once with the
    code ``bad_input`` (the same items would fail again on any retry)."""

    code = "bad_input"


# --- findings ----------------------------------------------------------------------------


def _stronger(kept: Finding, other: Finding) -> Finding:
    """Of two reports of one problem, the more severe (then more confident); fields only
    the other has (a suggestion, the line's code, a CWE) are carried over."""
    first, second = (kept, other) if (kept.severity.rank, kept.confidence.rank) >= \
        (other.severity.rank, other.confidence.rank) else (other, kept)
    # One rule id is one tool's; should two tools still claim it, bandit's claim holds,
    # so that the cross-tool step never folds a bandit result into another.
    tool = second.tool if second.tool == CANONICAL_TOOL else first.tool
    return replace(first, suggestion=first.suggestion or second.suggestion,
                   code=first.code or second.code, tool=tool,
                   cwe=first.cwe if first.cwe is not None else second.cwe)


def _same_problem(canonical: Finding, other: Finding) -> bool:
    """Whether ``other`` (our own check) reports what ``canonical`` (bandit) reports at
    the same line.

    A finding may name the bandit tests it duplicates in ``more["same_as"]`` (an id or a
    list of ids): that is authoritative. Without it, the same weakness (CWE) at the same
    line is taken for the same problem; bandit's CWEs are coarse (eval and a shell call
    are both CWE-78), so a rule that can say ``same_as`` should.
    """
    if canonical.path != other.path or canonical.line != other.line:
        return False
    named = other.more.get("same_as")
    if named is not None:
        return canonical.rule in ({named} if isinstance(named, str) else set(named))
    return canonical.cwe is not None and canonical.cwe == other.cwe


def deduplicate(findings: Iterable[Finding]) -> list[Finding]:
    """Each problem once.

    Findings of one key (file, line, rule), from several items or analyses, merge into
    the stronger one. A finding of another tool at the line of a bandit finding for the
    same problem is dropped, and the bandit finding keeps the worse severity and notes
    the dropped rule in ``more["also_reported_as"]``. Two bandit findings are never
    merged with each other: bandit's own results stay as ``bandit -r`` reports them.

    Returns:
        The unique findings in the order first seen.
    """
    by_key: dict[tuple[str, int, str], Finding] = {}
    for finding in findings:
        prior = by_key.get(finding.key)
        by_key[finding.key] = finding if prior is None else _stronger(prior, finding)
    canonical_at: dict[tuple[str, int], list[tuple[str, int, str]]] = {}
    for key, finding in by_key.items():
        if finding.tool == CANONICAL_TOOL:
            canonical_at.setdefault((finding.path, finding.line), []).append(key)
    for key, finding in list(by_key.items()):
        if finding.tool == CANONICAL_TOOL:
            continue
        for canonical_key in canonical_at.get((finding.path, finding.line), ()):
            canonical = by_key[canonical_key]
            if not _same_problem(canonical, finding):
                continue
            also = [*canonical.more.get("also_reported_as", ()), finding.rule]
            worse = max(canonical.severity, finding.severity, key=lambda s: s.rank)
            by_key[canonical_key] = replace(
                canonical, severity=worse, suggestion=canonical.suggestion or finding.suggestion,
                more={**canonical.more, "also_reported_as": also})
            del by_key[key]
            break
    return list(by_key.values())


def merge_files(statuses: Iterable[FileStatus]) -> list[FileStatus]:
    """One status per path, by path: a file any item could not analyse is reported so
    (another analysis having read it does not make the report complete)."""
    merged: dict[str, FileStatus] = {}
    for status in statuses:
        prior = merged.get(status.path)
        if prior is None or (prior.analyzed and not status.analyzed):
            merged[status.path] = status
    return [merged[path] for path in sorted(merged)]


def _title(analyses: Sequence[str], change: str | None) -> str:
    names = [ANALYSIS_TITLES.get(a, a) for a in analyses]
    if len(names) == 1:
        title = names[0]
    elif names:
        title = f"Code analysis ({', '.join(analyses)})"
    else:
        title = "Analysis report"
    return f"{title} of {change}" if change else title


def merge_findings(items: Sequence[Mapping[str, Any]], failed: Sequence[FailedItem] = (),
                   title: str | None = None) -> Report:
    """Merge reviewer outputs into one findings report.

    Args:
        items: reviewer outputs (``{"kind": "findings", "findings", "files", ...}``).
        failed: the map items that failed.
        title: the report's title (default: from the analyses and the change).

    Raises:
        SynthesisError: an item's finding or file status is malformed.
    """
    findings: list[Finding] = []
    files: list[FileStatus] = []
    analyses: dict[str, None] = {}
    change: str | None = None
    for index, item in enumerate(items):
        try:
            findings += [Finding.from_dict(raw) for raw in item.get("findings") or ()]
            files += [FileStatus.from_dict(raw) for raw in item.get("files") or ()]
        except ValueError as error:
            raise SynthesisError(f"item {index}: {error}") from None
        analyses.update(dict.fromkeys(str(a) for a in item.get("analyses") or ()))
        if change is None and item.get("change"):
            change = str(item["change"])
    merged = tuple(ranked(deduplicate(findings)))
    return Report(title or _title(list(analyses), change), merged, tuple(merge_files(files)),
                  tuple(failed), tuple(analyses), change)


# --- research ----------------------------------------------------------------------------


def _first_sentence(text: str) -> str:
    text = " ".join(text.split())
    for end in (". ", "! ", "? "):
        cut = text.find(end)
        if 0 < cut < SUMMARY_SENTENCE_CHARS:
            return text[:cut + 1]
    return text if len(text) <= SUMMARY_SENTENCE_CHARS else \
        text[:SUMMARY_SENTENCE_CHARS].rsplit(" ", 1)[0] + "..."


def _cited(raw: Any, index: int) -> tuple[Citation, ...]:
    try:
        return tuple(dict.fromkeys(Citation.from_dict(c) for c in raw or ()))
    except ReportError as error:
        raise SynthesisError(f"item {index}: {error}") from None


def _sections(item: Mapping[str, Any], index: int) -> list[Section]:
    """An item's sections: its aspect; for a summary of documents (no aspect, no
    query), one per summarized file when the item has them, else one named by the
    documents it cites."""
    cited = _cited(item.get("citations"), index)
    query = str(item.get("query") or "")
    aspect = str(item.get("aspect") or "")
    if aspect or query:
        return [Section(aspect, query, str(item.get("summary") or ""), cited)]
    per_file = item.get("summaries")
    if isinstance(per_file, list) and per_file and all(isinstance(f, Mapping)
                                                      for f in per_file):
        return [Section(str(f.get("path") or f"Item {index}"), "", str(f.get("summary") or ""),
                        _cited(f.get("citations"), index)) for f in per_file]
    paths = list(dict.fromkeys(c.path for c in cited))
    name = ", ".join(paths[:3]) + (" ..." if len(paths) > 3 else "") or f"Item {index}"
    return [Section(name, "", str(item.get("summary") or ""), cited)]


def merge_research(items: Sequence[Mapping[str, Any]], failed: Sequence[FailedItem] = (),
                   title: str | None = None) -> ResearchReport:
    """Merge researcher outputs: a section per aspect (or per summarized document),
    every citation once in first-cited order, and a summary made of each section's
    first sentence (the first :data:`SUMMARY_MAX_POINTS` of them).

    Raises:
        SynthesisError: an item's citations are malformed.
    """
    sections: list[Section] = []
    citations: dict[Citation, None] = {}
    topics: dict[str, None] = {}
    answered = 0
    #: sections whose item quoted something: the summary's points come from these
    quoted: list[Section] = []
    for index, item in enumerate(items):
        citations.update(dict.fromkeys(_cited(item.get("citations"), index)))
        if item.get("topic"):
            topics[str(item["topic"])] = None
        mine = _sections(item, index)
        for section in mine:
            citations.update(dict.fromkeys(section.citations))
        # A researcher that found nothing to quote says so (summary_by "none"): its
        # part is in the report, but it did not answer.
        if item.get("summary_by") != "none":
            answered += any(section.summary for section in mine)
            quoted += mine
        sections += mine
    topic = ", ".join(topics)
    if title is None:
        title = f"Research: {topic}" if topic else f"Summary of {len(sections)} document(s)"
    lead = (f"{answered} of {len(items) + len(failed)} part(s) answered"
            + (f"; {len(failed)} failed" if failed else "") + ".")
    if items and not answered:
        lead += (" The documents do not discuss it: each part below names the nearest "
                 "mention.")
    # Aspects often find the same best passage: say each sentence once.
    points, said = [], set()
    for section in quoted:
        sentence = _first_sentence(section.summary) if section.summary else ""
        if sentence and " ".join(sentence.lower().split()) not in said:
            said.add(" ".join(sentence.lower().split()))
            points.append(f"{section.aspect}: {sentence}")
    if len(points) > SUMMARY_MAX_POINTS:
        points = [*points[:SUMMARY_MAX_POINTS],
                  f"(and {len(points) - SUMMARY_MAX_POINTS} more section(s) below)"]
    return ResearchReport(title, " ".join([lead, *points]), tuple(sections), tuple(citations),
                          tuple(failed))


# --- patches -----------------------------------------------------------------------------


def merge_patches(items: Sequence[Mapping[str, Any]], failed: Sequence[FailedItem] = (),
                  title: str | None = None) -> PatchReport:
    """Concatenate refactoring diffs (each item patches its own batch of files) and list
    the files; a path patched by two items is reported as a conflict.

    Raises:
        SynthesisError: an item's diff or files are malformed.
    """
    diffs: list[str] = []
    files: dict[str, PatchFile] = {}
    tools: dict[str, None] = {}
    patched_by: dict[str, int] = {}
    conflicts: dict[str, None] = {}
    for index, item in enumerate(items):
        diff = item.get("diff") or ""
        if not isinstance(diff, str):
            raise SynthesisError(f"item {index}: 'diff' must be text")
        if diff:
            diffs.append(diff if diff.endswith("\n") else diff + "\n")
        if item.get("tool"):
            tools[str(item["tool"])] = None
        for raw in item.get("files") or ():
            if not isinstance(raw, Mapping) or not isinstance(raw.get("path"), str):
                raise SynthesisError(f"item {index}: a file needs a map with a 'path'")
            path, changed = raw["path"], bool(raw.get("changed"))
            prior = files.get(path)
            files[path] = PatchFile(path, changed or (prior is not None and prior.changed))
            if changed and patched_by.setdefault(path, index) != index:
                conflicts[path] = None
    return PatchReport("".join(diffs), tuple(files[p] for p in sorted(files)), tuple(tools),
                       tuple(failed), tuple(conflicts), title or "Refactoring")


# --- dispatch ----------------------------------------------------------------------------


def parse_failed(raw: Any) -> list[FailedItem]:
    """The task field ``failed`` as records (absent or None: none failed).

    Raises:
        SynthesisError: not a list of ``{"index", "code", "error"}``.
    """
    if raw is None:
        return []
    if not isinstance(raw, (list, tuple)):
        raise SynthesisError(f"'failed' must be a list of items; got {type(raw).__name__}")
    try:
        return [FailedItem.from_dict(item) for item in raw]
    except ReportError as error:
        raise SynthesisError(str(error)) from None


def _items(data: Any) -> list[Mapping[str, Any]]:
    """The results to merge: a list of maps (one map alone, from a pipeline, is a list
    of one; None, when every item failed, is none)."""
    if data is None:
        return []
    if isinstance(data, Mapping):
        return [data]
    if not isinstance(data, (list, tuple)):
        raise SynthesisError(f"synthesis takes a list of results' data; got "
                             f"{type(data).__name__}")
    for index, item in enumerate(data):
        if not isinstance(item, Mapping):
            raise SynthesisError(f"item {index} is a {type(item).__name__}, not a result's "
                                 "data map")
    return list(data)


#: A merge: the items, the failed items and a title to the report.
Merger = Callable[[Sequence[Mapping[str, Any]], Sequence[FailedItem], "str | None"], AnyReport]

_MERGERS: Final[dict[str, Merger]] = {"findings": merge_findings, "report": merge_findings,
                   "research": merge_research, "patch": merge_patches}


def synthesize(data: Any, failed: Any = None, capability: str = "synthesis",
               title: str | None = None) -> AnyReport:
    """The report of a reducer task: the items' kind picks the merge.

    Args:
        data: the task data (the items' result data).
        failed: the task field ``failed``.
        capability: the capability the task asked for; with no item to tell the kind
            (every item failed), ``aggregation`` gives an empty patch and anything else
            an empty findings report, which lists the failures.
        title: the report's title, when the task names one.

    Raises:
        SynthesisError: malformed items, items of different kinds, or a kind it cannot
            merge.
    """
    items = _items(data)
    failures = parse_failed(failed)
    kinds = list(dict.fromkeys(str(item.get("kind", "")) for item in items))
    if not kinds:
        kind = "patch" if capability == "aggregation" else "findings"
    elif len(kinds) > 1:
        raise SynthesisError(f"cannot merge items of different kinds: {', '.join(kinds)}")
    else:
        kind = kinds[0]
    merge: Merger | None = _MERGERS.get(kind)
    if merge is None:
        raise SynthesisError(f"cannot merge items of kind {kind!r}; expected findings, "
                             "research or patch")
    return merge(items, failures, title)


class SynthesizerAgent(BaseAgent):
    """Merges results into one report (capabilities ``synthesis`` and ``aggregation``).

    The merge runs in a worker thread: a report of many thousand findings takes a
    noticeable time to rank and render, and the agent's heartbeats must go on meanwhile.
    """

    def __init__(self) -> None:
        super().__init__(name="synthesizer", capabilities=["synthesis", "aggregation"])
        # With an LLM, a findings report opens with a short overview written from its
        # worst findings; without, the report is the same minus that paragraph.
        from agent_sdk.llm import LLM

        self.llm = LLM.from_env()
        if self.llm is not None:
            self.llm.attach(self)

    async def execute(self, task: Task) -> Result:
        """Merge the task's items; malformed input fails for good (a retry cannot fix it)."""
        capability = "aggregation" if "aggregation" in task.capabilities else "synthesis"
        title = task.fields.get("title")
        try:
            report = await asyncio.to_thread(synthesize, task.data, task.fields.get("failed"),
                                             capability, title if isinstance(title, str)
                                             else None)
            data = await asyncio.to_thread(report.to_data)
        except SynthesisError as error:
            raise BadInput(str(error)) from None
        if isinstance(report, Report):
            summary = report.summary
            logger.info("report %r: %d finding(s), %d file(s), %d failed item(s)",
                        report.title, summary.findings, summary.files, summary.failed_items)
            if self.llm is not None and report.findings:
                await self._add_overview(report, data, task)
            return Result(data=data, approved=report.approved,
                          counts=dict(summary.by_severity))
        return Result(data=data)

    async def _add_overview(self, report: Report, data: dict[str, Any], task: Task) -> None:
        """Ask the LLM for an overview of the worst findings (what matters, what to fix
        first) and put it in ``data["overview"]`` and under the Markdown's title. A failed
        call leaves the report without it: the overview is never worth the report."""
        from agent_sdk.llm import LLMError, TokenBudget

        assert self.llm is not None
        top = ranked(list(report.findings))[:OVERVIEW_FINDINGS]
        listing = "\n".join(f"- {f.severity.value} {f.rule} {f.path}:{f.line}: {f.message}"
                             f" | {f.code}" for f in top)
        messages = [
            {"role": "system", "content": "You are a senior security engineer. Write a short "
             "overview (3 to 5 sentences, plain text) of an audit for the developers who "
             "own the code: the most important risks and what to fix first. Cite places as "
             "file:line. Do not invent findings."},
            {"role": "user", "content": f"{report.summary.findings} finding(s) in "
             f"{report.summary.files} file(s). The worst:\n{listing}"}]
        try:
            budget = TokenBudget.from_task(task, self.state)
            reply = await self.llm.chat(messages, max_tokens=OVERVIEW_MAX_TOKENS, budget=budget)
        except LLMError as error:
            logger.warning("report %r: no overview from the LLM: %s", report.title, error)
            return
        finally:
            await self.llm.publish_usage()
        overview = reply.text.strip()
        if not overview:
            return
        data["overview"] = overview
        markdown = str(data.get("markdown", ""))
        title, _, rest = markdown.partition("\n")
        data["markdown"] = f"{title}\n\n## Overview\n\n{overview}\n{rest}"

    async def on_stop(self) -> None:
        if self.llm is not None:
            await self.llm.aclose()
