"""Running a project's tests on a throwaway copy, and reading what failed.

The test command runs through :func:`agents.sandbox.run_command` (own session, memory
and CPU limits, no network, killed on timeout or cancellation). What failed is read from
pytest's JUnit XML report when pytest ran (exact test ids, files and lines), otherwise
from the output: unittest's ``FAIL:``/``ERROR:`` blocks, or pytest's short summary.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Final
from xml.etree import ElementTree

from agents.coding.inputs import SourceFile
from agents.sandbox import CommandRun, Limits, Workspace, run_command

#: Where pytest writes its report inside the copy (a dot directory: never collected).
REPORT_RELATIVE: Final = ".orch-report/junit.xml"
#: Most of a report read: a bigger one is not a test report worth parsing.
MAX_REPORT_BYTES: Final = 8 * 1024 * 1024
#: Characters of the command's output kept in the result.
OUTPUT_TAIL_CHARS: Final = 4000
#: Characters kept of one failure's message.
MAX_MESSAGE_CHARS: Final = 2000
#: Runners the agent knows how to read.
PYTEST: Final = "pytest"
UNITTEST: Final = "unittest"
OTHER: Final = "command"

_PYTEST_LOCATION: Final = re.compile(r"^(?P<file>[^\s:>][^:]*):(?P<line>\d+): (?P<exc>\S.*)?$")
_UNITTEST_HEADER: Final = re.compile(r"^(?P<kind>FAIL|ERROR): (?P<name>\S+) \((?P<where>[^)]*)\)")
_UNITTEST_FRAME: Final = re.compile(r'^\s*File "(?P<file>[^"]+)", line (?P<line>\d+)')
_UNITTEST_RAN: Final = re.compile(r"^Ran (?P<n>\d+) tests? in ", re.MULTILINE)
_UNITTEST_COUNTS: Final = re.compile(r"(failures|errors|skipped)=(\d+)")
_PYTEST_SUMMARY: Final = re.compile(r"^(?P<kind>FAILED|ERROR) (?P<test>\S+)(?: - (?P<msg>.*))?$",
                                    re.MULTILINE)
_PYTEST_COUNT: Final = re.compile(r"(\d+) (passed|failed|errors?|skipped)")


@dataclass(frozen=True, slots=True)
class TestFailure:
    """One failed (or erroring) test.

    Attributes:
        test: its id (``tests/test_x.py::test_y``, or unittest's ``module.Class.test``).
        file: the file of the failure (the innermost frame in the project), relative.
        line: its line, or None when unknown.
        assertion: the failing statement as written, then pytest's explanation of it
            (``assert mul(3, 1) == 3`` / ``assert 4 == 3``).
        message: the exception's message (``assert 4 == 3``, ``ZeroDivisionError: ...``).
        kind: ``failure`` (an assertion) or ``error`` (any other exception).
    """

    __test__ = False  # not a pytest test class, whatever its name

    test: str
    file: str
    line: int | None
    assertion: str
    message: str
    kind: str

    def to_dict(self) -> dict[str, Any]:
        """The record in the result's ``failures``."""
        return {"test": self.test, "file": self.file, "line": self.line,
                "assertion": self.assertion, "message": self.message, "kind": self.kind}


@dataclass(slots=True)
class Counts:
    """Tests by outcome."""

    passed: int = 0
    failed: int = 0
    errors: int = 0
    skipped: int = 0


@dataclass(frozen=True, slots=True)
class TestReport:
    """What a test run found.

    Attributes:
        command: the argv that ran.
        runner: ``pytest``, ``unittest`` or ``command`` (how the output was read).
        outcome: ``passed``, ``failed``, ``no_tests`` (none were found), ``timed_out``,
            ``memory_limit``, or ``error`` (the command failed without a test failing: a
            usage error, a crash).
        exit_code: the command's exit status.
        counts: tests by outcome.
        failures: the failed and erroring tests.
        output_tail: the end of its output (stdout, then stderr).
    """

    __test__ = False

    command: list[str]
    runner: str
    outcome: str
    exit_code: int
    counts: Counts
    failures: list[TestFailure] = field(default_factory=list)
    output_tail: str = ""

    def to_data(self) -> dict[str, Any]:
        """The result's ``data`` (``kind: test_run``)."""
        return {"kind": "test_run", "command": self.command, "runner": self.runner,
                "outcome": self.outcome, "timed_out": self.outcome == "timed_out",
                "exit_code": self.exit_code, "passed": self.counts.passed,
                "failed": self.counts.failed, "errors": self.counts.errors,
                "skipped": self.counts.skipped,
                "failures": [f.to_dict() for f in self.failures],
                "output_tail": self.output_tail}


def default_runner() -> str:
    """pytest when this interpreter has it, else unittest."""
    return PYTEST if importlib.util.find_spec("pytest") is not None else UNITTEST


def plan_command(command: list[str] | None, runner: str,
                 report: str = REPORT_RELATIVE) -> tuple[list[str], str]:
    """The argv to run and the runner whose output it gives.

    A given pytest command gets a JUnit report added (unless it asks for one itself), so
    its failures are read exactly; any other given command runs as it is. ``report`` is
    relative to the copy's root, where the command runs.
    """
    if command is None:
        if runner == PYTEST:
            return [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                    "-o", "junit_family=xunit1", f"--junitxml={report}"], PYTEST
        return [sys.executable, "-m", "unittest", "discover", "-v"], UNITTEST
    names = [PurePosixPath(arg).name for arg in command]
    module = command[command.index("-m") + 1] if "-m" in command[:-1] else None
    if module == PYTEST or (module is None and names[0] in ("pytest", "py.test")):
        if any(arg.startswith(("--junitxml", "--junit-xml")) for arg in command):
            return list(command), PYTEST
        return [*command, "-o", "junit_family=xunit1", f"--junitxml={report}"], PYTEST
    if module == UNITTEST:
        return list(command), UNITTEST
    return list(command), OTHER


async def run_tests(files: list[SourceFile], command: list[str] | None, *, runner: str,
                    limits: Limits) -> TestReport:
    """Lay ``files`` out in a throwaway copy, run the tests there, and read the outcome.

    Raises:
        FileNotFoundError: the command's program does not exist.
    """
    with Workspace([f.to_dict() for f in files], prefix="orch-coder-") as ws:
        argv, kind = plan_command(command, runner)
        run = await run_command(argv, cwd=ws.root, limits=limits)
        return read_outcome(argv, kind, run, ws.root, ws.root / REPORT_RELATIVE)


def read_outcome(argv: list[str], kind: str, run: CommandRun, root: Path,
                 report: Path) -> TestReport:
    """The report of a finished run (its JUnit file when there is one, else its output)."""
    output = run.stdout + (("\n" + run.stderr) if run.stderr else "")
    tail = output[-OUTPUT_TAIL_CHARS:]
    counts = Counts()
    failures: list[TestFailure] = []
    if kind == PYTEST and report.is_file() and report.stat().st_size <= MAX_REPORT_BYTES:
        counts, failures = parse_junit(report.read_bytes())
    elif kind in (PYTEST, OTHER) and _PYTEST_SUMMARY.search(output):
        counts, failures = parse_pytest_output(output)
    elif kind in (UNITTEST, OTHER):
        counts, failures = parse_unittest_output(run.stderr + "\n" + run.stdout, root)
    if run.timed_out:
        outcome = "timed_out"
    elif run.memory_exhausted:
        outcome = "memory_limit"
    elif failures or counts.failed or counts.errors:
        outcome = "failed"
    elif kind != OTHER and not (counts.passed or counts.skipped):
        outcome = "no_tests"
    elif run.returncode == 0:
        outcome = "passed"
    else:
        outcome = "error"
    return TestReport(argv, kind, outcome, run.returncode, counts, failures, tail)


# ------------------------------------------------------------------ JUnit (pytest)


def parse_junit(raw: bytes) -> tuple[Counts, list[TestFailure]]:
    """Counts and failures of a pytest JUnit report (``junit_family=xunit1`` gives each
    test's file; the failure's own file and line come from the traceback text)."""
    try:
        root = ElementTree.fromstring(raw)
    except ElementTree.ParseError:
        return Counts(), []
    counts = Counts()
    failures: list[TestFailure] = []
    suites = [root] if root.tag == "testsuite" else root.iter("testsuite")
    for suite in suites:
        tests = int(suite.get("tests", "0"))
        failed = int(suite.get("failures", "0"))
        errors = int(suite.get("errors", "0"))
        skipped = int(suite.get("skipped", "0"))
        counts.failed += failed
        counts.errors += errors
        counts.skipped += skipped
        counts.passed += max(tests - failed - errors - skipped, 0)
        for case in suite.iter("testcase"):
            for tag, kind in (("failure", "failure"), ("error", "error")):
                element = case.find(tag)
                if element is not None:
                    failures.append(_junit_failure(case, element, kind))
    return counts, failures


def _junit_failure(case: ElementTree.Element, element: ElementTree.Element,
                   kind: str) -> TestFailure:
    test_file = case.get("file", "")
    name = case.get("name", "")
    classname = case.get("classname", "")
    test = _node_id(test_file, classname, name)
    text = element.text or ""
    file, line, statement, explanation = _pytest_traceback(text)
    message = (element.get("message") or explanation or "").strip()
    if kind == "failure" and not message.startswith(("assert", "AssertionError")) \
            and "AssertionError" not in text:
        kind = "error"
    return TestFailure(test, file or test_file, line if file else _int(case.get("line")),
                       "\n".join(part for part in (statement, explanation) if part),
                       message[:MAX_MESSAGE_CHARS], kind)


def _node_id(test_file: str, classname: str, name: str) -> str:
    if not test_file:
        return f"{classname}::{name}" if classname else name
    module = test_file[:-3].replace("/", ".") if test_file.endswith(".py") else test_file
    parts = [test_file]
    if classname.startswith(module + "."):
        parts.extend(classname[len(module) + 1:].split("."))
    parts.append(name)
    return "::".join(parts)


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _pytest_traceback(text: str) -> tuple[str, int | None, str, str]:
    """``(file, line, statement, explanation)`` of pytest's long traceback text: the
    innermost frame in the project (a relative path), its ``>`` lines and ``E`` lines."""
    lines = text.splitlines()
    locations = [(i, m) for i, raw in enumerate(lines) if (m := _PYTEST_LOCATION.match(raw))]
    if not locations:
        return "", None, "", _explanation(lines)
    chosen = next((loc for loc in reversed(locations) if not os.path.isabs(loc[1]["file"])),
                  locations[-1])
    index, match = chosen
    previous = max((i for i, _ in locations if i < index), default=-1)
    block = lines[previous + 1:index]
    statement = "\n".join(raw[1:].strip() for raw in block if raw.startswith(">"))
    explanation = _explanation(block) or _explanation(lines)
    return match["file"], int(match["line"]), statement, explanation


def _explanation(lines: list[str]) -> str:
    marked = [raw[1:] for raw in lines if raw.startswith("E ") or raw == "E"]
    return textwrap.dedent("\n".join(marked)).strip()[:MAX_MESSAGE_CHARS]


# ------------------------------------------------------------------ output


def parse_pytest_output(output: str) -> tuple[Counts, list[TestFailure]]:
    """Counts and failures from pytest's short summary (no report was written)."""
    counts = Counts()
    summary = [raw for raw in output.splitlines() if " in " in raw and _PYTEST_COUNT.search(raw)]
    if summary:
        for number, word in _PYTEST_COUNT.findall(summary[-1]):
            attribute = {"passed": "passed", "failed": "failed", "skipped": "skipped"}.get(word,
                                                                                          "errors")
            setattr(counts, attribute, int(number))
    failures = []
    for match in _PYTEST_SUMMARY.finditer(output):
        test = match["test"]
        message = (match["msg"] or "").strip()
        failures.append(TestFailure(test, test.split("::", 1)[0], None,
                                    message if message.startswith("assert") else "",
                                    message[:MAX_MESSAGE_CHARS],
                                    "failure" if match["kind"] == "FAILED" else "error"))
    return counts, failures


def parse_unittest_output(output: str, root: Path) -> tuple[Counts, list[TestFailure]]:
    """Counts and failures from ``python -m unittest -v`` output."""
    lines = output.splitlines()
    failures = []
    for index, raw in enumerate(lines):
        header = _UNITTEST_HEADER.match(raw)
        if header is None:
            continue
        block: list[str] = []
        for following in lines[index + 2:]:
            if following.startswith(("=" * 20, "-" * 20)):
                break
            block.append(following)
        failures.append(_unittest_failure(header, block, root))
    counts = Counts()
    ran = _UNITTEST_RAN.search(output)
    if ran is not None:
        found = dict(_UNITTEST_COUNTS.findall(output[ran.end():]))
        counts.failed = int(found.get("failures", 0))
        counts.errors = int(found.get("errors", 0))
        counts.skipped = int(found.get("skipped", 0))
        counts.passed = max(int(ran["n"]) - counts.failed - counts.errors - counts.skipped, 0)
    return counts, failures


def _unittest_failure(header: re.Match[str], block: list[str], root: Path) -> TestFailure:
    where = header["where"]
    test = where if where.endswith("." + header["name"]) else f"{where}.{header['name']}"
    file, line, statement = "", None, ""
    frames = [(i, m) for i, raw in enumerate(block) if (m := _UNITTEST_FRAME.match(raw))]
    inside = [(i, m) for i, m in frames if _relative(m["file"], root) is not None]
    if inside or frames:
        index, match = (inside or frames)[-1]
        file = _relative(match["file"], root) or match["file"]
        line = int(match["line"])
        if index + 1 < len(block) and not _UNITTEST_FRAME.match(block[index + 1]):
            statement = block[index + 1].strip()
    message_lines = [raw for raw in block if raw and not raw.startswith(" ")
                     and not raw.startswith("Traceback")]
    message = "\n".join(message_lines).strip()
    kind = "failure" if header["kind"] == "FAIL" else "error"
    assertion = "\n".join(part for part in (statement, message) if part) \
        if kind == "failure" else statement
    return TestFailure(test, file, line, assertion, message[:MAX_MESSAGE_CHARS], kind)


def _relative(path: str, root: Path) -> str | None:
    """``path`` relative to the copy's root, or None when it lies outside."""
    for base in {str(root), os.path.realpath(root)}:
        if path.startswith(base + os.sep):
            return PurePosixPath(Path(path).relative_to(base)).as_posix()
    return None
