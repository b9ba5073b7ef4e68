"""The analysis worker: a long-lived child process of the reviewer agent.

Started by :class:`agents.analysis.pool.WorkerPool` as ``python -m agents.analysis.worker``
with :func:`agents.sandbox.child_setup` as its ``preexec_fn`` (a session of its own, a
memory limit, no network, ``nobody`` when the agent is root). It loads bandit's test set
once, says ``ready``, then analyses batches of files in the agent's workspace, one frame
per file (:mod:`agents.analysis.protocol`). It keeps no state between files but bandit's
test set, so one worker serves task after task.

A file that exhausts the memory limit raises ``MemoryError`` here: the worker reports the
file as ``memory_limit`` and exits, since a process that ran out of memory may be left in
any state; the pool starts a fresh one. A file that takes too long is the pool's to
notice: it kills the worker's process group.
"""

from __future__ import annotations

import ast
import os
import sys
from pathlib import Path
from typing import IO, Any

from agents.analysis import Analysis, FileStatus, performance, quality, security
from agents.analysis.protocol import EXIT_MEMORY, encode, read_blocking
from agents.analysis.source import Source
from agents.findings import Category, Finding, Severity


class FileAnalyzer:
    """Runs the asked analyses over one file; holds bandit's test set between files."""

    def __init__(self) -> None:
        self.bandit = security.BanditScanner()

    def analyze(self, root: Path, rel: str, analyses: frozenset[str]) -> dict[str, Any]:
        """The ``file`` frame of one file (without its batch)."""
        path = root / rel
        try:
            data = path.read_bytes()
        except OSError as error:
            return _unparseable(rel, f"unreadable: {error.strerror or error}", 0)
        try:
            tree = ast.parse(data, filename=rel)
        except SyntaxError as error:
            return _unparseable(rel, f"line {error.lineno}: {error.msg}", error.lineno or 0)
        except ValueError as error:  # null bytes, a bad encoding declaration
            return _unparseable(rel, str(error), 0)
        text = data.decode("utf-8", "replace")
        source = Source(rel, tree, text.splitlines(), text)
        findings: list[Finding] = []
        if Analysis.SECURITY in analyses or Analysis.REVIEW in analyses:
            bandit = self.bandit.scan(str(path), rel, data, tree, source.lines)
            found = security.merge(bandit, security.check(source, self.bandit.collected))
            if Analysis.SECURITY in analyses:
                findings.extend(found)
            else:
                # A review reports the security problems that matter, not every B101.
                findings.extend(security_worth_review(found))
        if Analysis.REVIEW in analyses:
            findings.extend(quality.check(source))
        if Analysis.PERFORMANCE in analyses:
            findings.extend(performance.check(source))
        return {"op": "file", "path": rel, "status": FileStatus.ANALYZED.value, "detail": "",
                "findings": [f.to_dict() for f in findings]}


def security_worth_review(findings: list[Finding]) -> list[Finding]:
    """The security findings a code review includes: medium and up."""
    return [f for f in findings if f.severity.rank >= Severity.MEDIUM.rank]


def _unparseable(rel: str, detail: str, line: int) -> dict[str, Any]:
    finding = Finding(category=Category.ANALYSIS, rule="A101", name="unparseable",
                      message=f"could not parse the file: {detail}", severity=Severity.INFO,
                      confidence=Severity.HIGH, path=rel, line=max(line, 1),
                      suggestion="Fix the syntax error so that the file can be analysed.")
    return {"op": "file", "path": rel, "status": FileStatus.UNPARSEABLE.value,
            "detail": detail, "findings": [finding.to_dict()]}


def _failed(rel: str, detail: str) -> dict[str, Any]:
    finding = Finding(category=Category.ANALYSIS, rule="A102", name="analysis_failed",
                      message=f"the analysis failed on this file: {detail}",
                      severity=Severity.INFO, confidence=Severity.HIGH, path=rel, line=1)
    return {"op": "file", "path": rel, "status": FileStatus.ANALYZED.value,
            "detail": f"analysis failed: {detail}", "findings": [finding.to_dict()]}


def serve(stdin: IO[bytes], stdout: IO[bytes]) -> int:
    """Answer batches until stdin closes; the process's exit status."""
    analyzer = FileAnalyzer()
    stdout.write(encode({"op": "ready", "pid": os.getpid()}))
    stdout.flush()
    while True:
        request = read_blocking(stdin)
        if request is None:
            return 0
        batch = request.get("batch")
        root = Path(str(request["root"]))
        analyses = frozenset(str(a) for a in request.get("analyses", ()))
        for rel in request.get("files", ()):
            try:
                frame = analyzer.analyze(root, str(rel), analyses)
            except MemoryError:
                frame = {"op": "file", "path": rel, "status": FileStatus.MEMORY_LIMIT.value,
                         "detail": "the analysis ran out of memory (MemoryError)",
                         "findings": [], "batch": batch}
                stdout.write(encode(frame))
                stdout.flush()
                return EXIT_MEMORY
            except RecursionError:
                frame = _unparseable(str(rel), "nested too deeply to analyse", 0)
            except Exception as error:  # noqa: BLE001 - one file's failure is reported
                # As bandit's manager does for a plugin that fails on a file: the file
                # is reported, the run goes on.
                frame = _failed(str(rel), f"{type(error).__name__}: {error}")
            frame["batch"] = batch
            stdout.write(encode(frame))
            stdout.flush()
        stdout.write(encode({"op": "done", "batch": batch}))
        stdout.flush()


def main() -> None:
    """Entry point: frames on stdin and stdout, nothing else on stdout."""
    stdout = sys.stdout.buffer
    # Anything a check prints must not corrupt the frames.
    sys.stdout = sys.stderr
    sys.exit(serve(sys.stdin.buffer, stdout))


if __name__ == "__main__":
    main()
