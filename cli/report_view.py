"""How a run whose output is a findings report ends on the command line.

The quick start (``submit "Analyze this codebase for security issues"``) ends with the
synthesizer's report. The CLI then prints a summary (counts by severity, the top findings
with ``file:line``), writes the full report as Markdown, JSON and SARIF 2.1.0 to files it
names, and exits 4 when a finding reaches ``--fail-on`` (default high), so the command can
gate a CI job. With ``--json``, stdout is the whole report as one JSON document.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, NoReturn

import click
import orjson

from cli.common import EXIT_FINDINGS, EXIT_OK, DirPath, count, emit_json

#: `--fail-on` never exits 4.
NEVER: Final = "never"
#: The severity `--fail-on` takes when not given.
DEFAULT_FAIL_ON: Final = "high"
#: Findings the terminal summary lists.
SUMMARY_TOP: Final = 10
FAIL_ON_CHOICES: Final = ("info", "low", "medium", "high", "critical", NEVER)


@dataclass(frozen=True, slots=True)
class Presentation:
    """How to present a run's report.

    Attributes:
        fail_on: the severity at or above which the command exits 4 (``never``: it does
            not).
        report_dir: where the report files go (None: ``<data dir>/reports/<run id>``).
        home: the data dir.
    """

    fail_on: str = DEFAULT_FAIL_ON
    report_dir: Path | None = None
    home: Path | None = None


def fail_on_option() -> Any:
    """``--fail-on SEVERITY``, shared by the commands that can end with a report."""
    return click.option(
        "--fail-on", type=click.Choice(FAIL_ON_CHOICES, case_sensitive=False),
        default=DEFAULT_FAIL_ON, show_default=True,
        help="When the run ends with a findings report: exit 4 if a finding is this "
             "severe or worse (never: do not).")


def report_dir_option() -> Any:
    """``--report-dir DIR``: where the report files go."""
    return click.option(
        "--report-dir", type=DirPath(), default=None,
        help="Where a findings report's files (report.md, report.json, report.sarif) go. "
             "Default: the data dir's reports/RUN_ID.")


def is_report(data: Any) -> bool:
    """Whether a run's output is a synthesizer's findings report."""
    return isinstance(data, dict) and data.get("kind") == "report" and \
        isinstance(data.get("findings"), list)


def readable(data: Any) -> str | None:
    """The Markdown of a research or patch report (printed instead of its JSON), or
    None for any other output."""
    if isinstance(data, dict) and data.get("kind") in ("research", "patch") and \
            isinstance(data.get("markdown"), str):
        return str(data["markdown"])
    return None


def reaches(data: dict[str, Any], fail_on: str) -> list[dict[str, Any]]:
    """The findings at or above ``fail_on`` (none for ``never``)."""
    from agents.findings import Severity

    if fail_on == NEVER:
        return []
    bar = Severity.parse(fail_on).rank
    out = []
    for finding in data["findings"]:
        try:
            rank = Severity.parse(str(finding.get("severity", "info"))).rank
        except ValueError:
            continue
        if rank >= bar:
            out.append(finding)
    return out


def write_files(data: dict[str, Any], directory: Path) -> dict[str, str]:
    """Write the report as Markdown, JSON and SARIF into ``directory``.

    Returns:
        The paths written, by format.
    """
    from agents.report import Report, render_markdown, render_sarif

    directory.mkdir(parents=True, exist_ok=True)
    report = Report.from_data(data)
    markdown = data.get("markdown") or render_markdown(report)
    sarif = data.get("sarif") or render_sarif(report)
    body = {k: v for k, v in data.items() if k not in ("markdown", "sarif")}
    paths = {"markdown": directory / "report.md", "json": directory / "report.json",
             "sarif": directory / "report.sarif"}
    paths["markdown"].write_text(str(markdown), encoding="utf-8")
    paths["json"].write_bytes(orjson.dumps(body, option=orjson.OPT_INDENT_2))
    paths["sarif"].write_bytes(orjson.dumps(sarif, option=orjson.OPT_INDENT_2))
    return {kind: str(path) for kind, path in paths.items()}


def present_report(run_id: str, data: dict[str, Any], presentation: Presentation,
                   as_json: bool) -> NoReturn:
    """Print the summary (or, with ``as_json``, the whole report), write the files, and
    exit 0, or 4 when a finding reaches ``--fail-on``."""
    from agents.report import Report, render_summary

    directory = presentation.report_dir
    if directory is None:
        home = presentation.home or Path.cwd() / ".orchestrator"
        directory = home / "reports" / run_id
    try:
        written: dict[str, str] | None = write_files(data, directory)
        write_error = None
    except OSError as error:
        written, write_error = None, f"{directory}: {error.strerror or error}"
    gate = reaches(data, presentation.fail_on)
    code = EXIT_FINDINGS if gate else EXIT_OK
    if as_json:
        body = {k: v for k, v in data.items() if k not in ("markdown", "sarif")}
        emit_json({**body, "run_id": run_id, "report_files": written,
                   "fail_on": presentation.fail_on, "exit_code": code,
                   **({"write_error": write_error} if write_error else {})})
        sys.exit(code)
    click.echo(render_summary(Report.from_data(data), top=SUMMARY_TOP))
    if isinstance(data.get("overview"), str):
        click.echo(f"\nOverview (written by the LLM): {data['overview']}")
    if written is not None:
        click.echo("full report: " + ", ".join(written.values()))
    else:
        click.echo(f"warning: the report files could not be written ({write_error}); "
                   "--report-dir names another directory, --json prints the report",
                   err=True)
    if gate:
        click.echo(f"{len(gate)} finding(s) at or above {presentation.fail_on} "
                   f"(--fail-on): exit {EXIT_FINDINGS}", err=True)
    sys.exit(code)


def max_tokens_option() -> Any:
    """``--max-tokens N``: the LLM token budget of a task or a run."""
    from workflows.model import MAX_TOKEN_BUDGET

    return click.option(
        "--max-tokens", type=count(1, MAX_TOKEN_BUDGET), default=None,
        help="LLM token budget of the task or run, shared by all its agents: once spent, "
             "the next LLM call fails and the run ends budget_exceeded.")
