"""The quick start, typed as a user types it: ``./orchestrator.sh start`` (the default pool
of built-in agents, started from another working directory), then ``./orchestrator.sh
submit "Analyze this codebase for security issues"`` in a codebase with planted problems;
and ``./orchestrator.sh run`` the same way, with no daemon.

The codebase is the reviewer's fixture (``tests/agents/fixtures/planted``: problems at
known lines, in canonical and non-canonical forms, listed in its EXPECTED.json) with the
ten clean look-alikes of ``tests/agents/fixtures/clean`` beside it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from tests.conftest import ROOT

FIXTURES = ROOT / "tests" / "agents" / "fixtures"
SARIF_SCHEMA = ROOT / "agents" / "schemas" / "sarif-schema-2.1.0.json"
QUICK_START = "Analyze this codebase for security issues"
#: Generous: the whole pool starts, and a noisy machine runs the suite in parallel.
CLI_TIMEOUT_S = 120.0


def orchestrator(home: Path, cwd: Path, *args: str,
                 **extra_env: str) -> subprocess.CompletedProcess[str]:
    """``./orchestrator.sh ARGS`` in ``cwd``, as a user types it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ORCH_BROKER", "ORCH_LLM"))}
    env["ORCH_HOME"] = str(home)
    env.update(extra_env)
    return subprocess.run([str(ROOT / "orchestrator.sh"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=CLI_TIMEOUT_S)


@pytest.fixture
def codebase(tmp_path: Path) -> Path:
    """The planted problems and the clean look-alikes, in one project directory."""
    project = tmp_path / "project"
    shutil.copytree(FIXTURES / "planted", project, ignore=shutil.ignore_patterns("*.json"))
    shutil.copytree(FIXTURES / "clean", project / "clean")
    return project


def expected_security() -> list[dict[str, Any]]:
    manifest = json.loads((FIXTURES / "planted" / "EXPECTED.json").read_text())
    return [p for p in manifest["planted"] if p["analysis"] == "security"]


def check_report(report: dict[str, Any]) -> None:
    """Every planted security problem at its file and line; no clean file high."""
    findings = report["findings"]
    assert all(isinstance(f["path"], str) and f["line"] >= 1 for f in findings)
    for planted in expected_security():
        assert any(f["path"] == planted["file"] and f["line"] == planted["line"]
                   and f["rule"] in planted["rules"] for f in findings), planted
    clean_high = [f for f in findings if f["path"].startswith("clean/")
                  and f["severity"] in ("high", "critical")]
    assert not clean_high, clean_high


def check_files(files: dict[str, str]) -> None:
    """The three report files exist; the SARIF one validates against SARIF 2.1.0."""
    assert set(files) == {"markdown", "json", "sarif"}
    assert Path(files["markdown"]).read_text().startswith("#")
    check_report(json.loads(Path(files["json"]).read_text()))
    sarif = json.loads(Path(files["sarif"]).read_text())
    schema = json.loads(SARIF_SCHEMA.read_text())
    jsonschema.validators.validator_for(schema)(schema).validate(sarif)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Path]:
    """``start`` with the default pool, from a directory that is not the codebase."""
    home, elsewhere = tmp_path / "home", tmp_path / "elsewhere"
    elsewhere.mkdir()
    started = orchestrator(home, elsewhere, "start", "--bind", "127.0.0.1:0", "--json")
    try:
        assert started.returncode == 0, started.stderr
        agents = json.loads(started.stdout)["agents"]
        assert sorted(a.split("-")[0] for a in agents) == \
            ["coder", "researcher", "reviewer", "reviewer", "synthesizer"]
        yield home
    finally:
        orchestrator(home, elsewhere, "stop")


def test_submit_the_quick_start_sentence(daemon: Path, codebase: Path) -> None:
    # Typed as in the README: a summary, the report files named, exit 4 (high findings).
    done = orchestrator(daemon, codebase, "submit", QUICK_START)
    assert done.returncode == 4, done.stderr
    assert "high" in done.stdout and "app/shell_canonical.py:" in done.stdout
    assert "full report:" in done.stdout
    written = done.stdout.split("full report:", 1)[1].split("\n", 1)[0]
    paths = [p.strip() for p in written.split(",")]
    check_files(dict(zip(("markdown", "json", "sarif"), paths)))
    assert "at or above high" in done.stderr

    # --json: the whole report as one document; --fail-on never: exit 0.
    report_dir = codebase.parent / "reports"
    as_json = orchestrator(daemon, codebase, "submit", QUICK_START, "--json",
                           "--fail-on", "never", "--report-dir", str(report_dir))
    assert as_json.returncode == 0, as_json.stderr
    report = json.loads(as_json.stdout)
    check_report(report)
    assert report["summary"]["by_severity"]["high"] >= 1 and report["exit_code"] == 0
    check_files(report["report_files"])
    assert Path(report["report_files"]["sarif"]).parent == report_dir


def marked_processes(mark: str) -> list[int]:
    """Pids of the live processes whose environment holds ``ORCH_TEST_MARK=mark``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if f"ORCH_TEST_MARK={mark}".encode() in environ.split(b"\0") and state != "Z":
            found.append(int(entry.name))
    return found


def test_run_does_it_with_no_daemon(tmp_path: Path, codebase: Path) -> None:
    home, mark = tmp_path / "home", tmp_path.name
    # An LLM configured (nothing listens there: the audit sends it nothing): run says once,
    # before anything starts, where user code would go.
    done = orchestrator(home, codebase, "run", QUICK_START, "--json", ORCH_TEST_MARK=mark,
                        ORCH_LLM_BASE_URL="http://127.0.0.1:9/v1", ORCH_LLM_MODEL="m")
    assert done.returncode == 4, done.stderr
    assert done.stderr.count("user code will be sent to http://127.0.0.1:9/v1") == 1
    report = json.loads(done.stdout)
    check_report(report)
    check_files(report["report_files"])
    # Nothing is left running: no agent or analysis worker it started is alive (they
    # inherit its environment, so its mark).
    assert marked_processes(mark) == []


def test_run_says_at_once_what_no_builtin_agent_offers(tmp_path: Path) -> None:
    # Code generation needs an LLM; with none configured, a private run could only wait
    # until its deadline for an agent that will never come: it says so, before starting.
    done = orchestrator(tmp_path / "home", tmp_path, "run", "Build a REST API for todo items")
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "code_generation" in errors[0], done.stderr
    assert "ORCH_LLM_BASE_URL" in errors[0]
