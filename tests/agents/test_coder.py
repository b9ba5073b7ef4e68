"""The coder agent, end to end: a real broker, real coder processes, the real tools
(pytest, unittest, ruff, git, patch), and a fake OpenAI-compatible server for the LLM.

Every wait has a deadline and waits on something: a task's result, a FIFO the blocking
fixture test writes to, a pidfd that becomes readable when a process exits.
"""

from __future__ import annotations

import ast
import hashlib
import os
import select
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent_sdk import Result, SyncClient
from agents.coding import codegen, fixer, refactor, testrun
from tests.conftest import Cluster
from tests.fakes.llm_server import FakeLLMServer, TextReply
from tests.support import agents_by_name

CODER = "agents.coder:CoderAgent"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
#: Deadline of every task in these tests.
WAIT_S = 60.0
#: How soon a cancelled task's command must be gone (the brief's promise).
KILL_WITHIN_S = 1.0


def project_files(name: str) -> list[dict[str, str]]:
    """The files of a fixture project, as a task carries them."""
    root = FIXTURES / name
    return [{"path": p.relative_to(root).as_posix(), "content": p.read_text(encoding="utf-8")}
            for p in sorted(root.rglob("*")) if p.is_file() and "__pycache__" not in p.parts]


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (to prove a tree was not touched)."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and "__pycache__" not in p.parts}


def run_task(client: SyncClient, capability: str, data: Any, **options: Any) -> Result:
    handle = client.submit(capabilities=[capability], data=data, timeout=WAIT_S, **options)
    return handle.result(timeout=WAIT_S)


@pytest.fixture(scope="module")
def commands_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, SyncClient]]:
    """A broker and a coder allowed to run commands (no LLM), shared by a module's
    tests: ``(broker url, client)``."""
    tmp = tmp_path_factory.mktemp("coder")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ORCH_HOME", str(tmp / "home"))
        cluster = Cluster(tmp)
        try:
            url = cluster.broker().url
            cluster.agent(url, CODER, orch_allow_commands="1", orch_llm_base_url="")
            yield url, cluster.client(url)
        finally:
            cluster.close()


# ------------------------------------------------------------------ debugging


def test_debugging_names_the_failing_test_its_assertion_file_and_line(
        commands_cluster: tuple[str, SyncClient]) -> None:
    _, client = commands_cluster
    # Given the buggy project (mul adds), whose test_mul fails
    files = project_files("buggy_project")
    # When the coder debugs it
    result = run_task(client, "debugging", {"files": files, "request": "why does mul fail?"})
    # Then the one failing test is named, with its assertion and where it failed
    assert result.ok, result
    data = result.data
    assert data["kind"] == "test_run" and data["runner"] == "pytest", data
    assert (data["passed"], data["failed"], data["errors"]) == (2, 1, 0), data
    assert data["outcome"] == "failed" and data["request"] == "why does mul fail?"
    [failure] = data["failures"]
    assert failure["test"] == "tests/check_arith.py::test_mul"
    assert (failure["file"], failure["line"]) == ("tests/check_arith.py", 15)
    assert failure["assertion"].splitlines()[:2] == ["assert mul(3, 1) == 3", "assert 4 == 3"]
    assert "where 4 = mul(3, 1)" in failure["message"]
    assert "1 failed, 2 passed" in data["output_tail"]
    assert result.passed is False

    # And with the bug fixed, the same run passes (the failure came from the code)
    bug = '(wrong: the bug the tests find)."""\n    return a + b'
    fixed = [dict(f, content=f["content"].replace(bug, '."""\n    return a * b'))
             if f["path"] == "calc/arith.py" else f for f in files]
    assert "return a * b" in next(f["content"] for f in fixed if f["path"] == "calc/arith.py")
    ok = run_task(client, "debugging", {"files": fixed})
    assert ok.ok and ok.data["outcome"] == "passed", ok.data
    assert (ok.data["passed"], ok.data["failed"], ok.data["failures"]) == (3, 0, [])


UNITTEST_PROJECT = [
    {"path": "tests/__init__.py", "content": ""},
    {"path": "tests/test_units.py", "content": textwrap.dedent("""\
        import unittest

        def half(n):
            return n // 2

        class HalfTest(unittest.TestCase):
            def test_even(self):
                self.assertEqual(half(4), 2)

            def test_odd(self):
                self.assertEqual(half(3), 1.5)

            def test_crash(self):
                half(None)
        """)},
]


def test_debugging_runs_a_given_unittest_command_and_reads_its_output(
        commands_cluster: tuple[str, SyncClient]) -> None:
    _, client = commands_cluster
    # Given a unittest project and the task's own command (argv, no shell)
    command = [sys.executable, "-m", "unittest", "discover", "-v"]
    # When the coder runs it
    result = run_task(client, "debugging", {"files": UNITTEST_PROJECT, "command": command})
    # Then unittest's output is read: one failure, one error, each with file and line
    assert result.ok, result
    data = result.data
    assert data["runner"] == "unittest" and data["command"] == command
    assert (data["passed"], data["failed"], data["errors"]) == (1, 1, 1), data
    by_test = {f["test"]: f for f in data["failures"]}
    odd = by_test["tests.test_units.HalfTest.test_odd"]
    assert (odd["file"], odd["line"], odd["kind"]) == ("tests/test_units.py", 11, "failure")
    assert odd["assertion"].splitlines()[0] == "self.assertEqual(half(3), 1.5)"
    assert odd["message"] == "AssertionError: 1 != 1.5"
    crash = by_test["tests.test_units.HalfTest.test_crash"]
    assert (crash["file"], crash["line"], crash["kind"]) == ("tests/test_units.py", 4, "error")
    assert crash["message"].startswith("TypeError")


def test_debugging_reports_a_command_that_times_out(
        commands_cluster: tuple[str, SyncClient]) -> None:
    _, client = commands_cluster
    # Given a test that never ends, and a 2 s time limit
    files = [{"path": "test_forever.py",
              "content": "import signal\n\ndef test_forever():\n    signal.pause()\n"}]
    # When the coder runs it
    result = run_task(client, "debugging", {"files": files, "time_limit_s": 2})
    # Then the run is reported as timed out (and not as passed)
    assert result.ok, result
    assert result.data["outcome"] == "timed_out" and result.data["timed_out"] is True
    assert result.data["exit_code"] != 0


def test_bad_input_fails_without_retry(commands_cluster: tuple[str, SyncClient]) -> None:
    _, client = commands_cluster
    # Given files that try to leave the copy, and a shell string for a command
    escaping = {"files": [{"path": "../evil.py", "content": "x = 1\n"}]}
    shell = {"files": UNITTEST_PROJECT, "command": "pytest && rm -rf /"}
    # When they are submitted, Then each fails for good with one clear line
    for data, capability in ((escaping, "refactoring"), (shell, "debugging")):
        result = run_task(client, capability, data)
        assert not result.ok and result.error is not None, result
        assert result.error.code == "bad_request" and "\n" not in result.error.message
        assert result.attempts == 1, result


def open_fifo(directory: Path) -> tuple[Path, int]:
    """A FIFO anyone may write to, opened for reading without blocking on a writer."""
    fifo = directory / "pids"
    os.mkfifo(fifo)
    os.chmod(fifo, 0o666)
    # O_RDWR: the open returns at once and reads never see EOF before the writer comes.
    return fifo, os.open(fifo, os.O_RDWR | os.O_NONBLOCK)


def read_line(fd: int, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    data = b""
    while not data.endswith(b"\n"):
        left = deadline - time.monotonic()
        ready, _, _ = select.select([fd], [], [], max(left, 0))
        if not ready:
            raise AssertionError(f"nothing written to the FIFO within {timeout_s} s")
        data += os.read(fd, 4096)
    return data.decode()


def test_cancelled_debugging_task_kills_its_process_group(
        commands_cluster: tuple[str, SyncClient]) -> None:
    _, client = commands_cluster
    shared = Path(tempfile.mkdtemp(prefix="coder-fifo-", dir="/tmp"))
    shared.chmod(0o777)
    fifo, fd = open_fifo(shared)
    try:
        # Given a test that starts a child, reports both pids, and blocks forever
        blocking = textwrap.dedent(f"""\
            import os, subprocess, sys

            def test_blocks():
                child = subprocess.Popen([sys.executable, "-c", "import signal; signal.pause()"])
                with open({str(fifo)!r}, "w") as f:
                    f.write(f"{{os.getpid()}} {{child.pid}}\\n")
                child.wait()
            """)
        handle = client.submit(capabilities=["debugging"], timeout=WAIT_S,
                               data={"files": [{"path": "test_block.py", "content": blocking}]})
        pids = [int(p) for p in read_line(fd, WAIT_S).split()]
        watchers = [os.pidfd_open(pid) for pid in pids]
        try:
            # When the task is cancelled
            cancelled_at = time.monotonic()
            handle.cancel()
            # Then the test process and its child are gone within a second
            pending = list(watchers)
            while pending:
                left = cancelled_at + KILL_WITHIN_S - time.monotonic()
                ready, _, _ = select.select(pending, [], [], max(left, 0))
                if not ready:
                    raise AssertionError(f"processes {pids} outlived the cancel by "
                                         f"{KILL_WITHIN_S} s")
                pending = [w for w in pending if w not in ready]
            # And nothing of its process group is left running
            assert live_group_members(pids[0]) == []
            result = handle.result(timeout=WAIT_S)
            assert result.status == "cancelled", result
        finally:
            for watcher in watchers:
                os.close(watcher)
    finally:
        os.close(fd)
        shutil.rmtree(shared, ignore_errors=True)


def live_group_members(pgid: int) -> list[int]:
    """Processes of the group ``pgid`` that are not zombies (one scan of /proc)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        state, group = fields[0], int(fields[2])
        if group == pgid and state != "Z":
            members.append(int(entry.name))
    return members


# ------------------------------------------------------------------ refactoring


def apply_and_read(diff: str, source: Path, work: Path, tool: list[str]) -> dict[str, str]:
    """Copy ``source`` to ``work``, check and apply ``diff`` there with ``tool``."""
    shutil.copytree(source, work)
    check = [*tool, "--check"] if tool[0] == "git" else [*tool, "--dry-run"]
    subprocess.run(check, input=diff.encode(), cwd=work, check=True, capture_output=True)
    subprocess.run(tool, input=diff.encode(), cwd=work, check=True, capture_output=True)
    return {p.relative_to(work).as_posix(): p.read_text() for p in sorted(work.rglob("*"))
            if p.is_file()}


def test_refactoring_returns_a_diff_that_applies_and_leaves_the_input_alone(
        commands_cluster: tuple[str, SyncClient], tmp_path: Path) -> None:
    _, client = commands_cluster
    source = FIXTURES / "messy_project"
    before = tree_digest(source)
    # Given the messy project (tabs, unused imports, spacing), and what ruff itself
    # makes of a copy of it
    expected_dir = tmp_path / "expected"
    shutil.copytree(source, expected_dir)
    ruff = [sys.executable, "-m", "ruff"]
    subprocess.run([*ruff, "check", "--fix", "--isolated", "--no-cache", "--quiet", "."],
                   cwd=expected_dir, check=True)
    subprocess.run([*ruff, "format", "--isolated", "--no-cache", "--quiet", "."],
                   cwd=expected_dir, check=True)
    expected = {p.relative_to(expected_dir).as_posix(): p.read_text()
                for p in sorted(expected_dir.rglob("*")) if p.is_file()}
    # When the coder refactors it
    result = run_task(client, "refactoring", {"files": project_files("messy_project")})
    # Then the diff applies with git apply and with patch -p1, giving ruff's files
    assert result.ok, result
    data = result.data
    assert data["kind"] == "patch" and data["tool"] == "ruff", data
    assert data["diff"].startswith("diff --git a/")
    changed = {f["path"]: f["changed"] for f in data["files"]}
    assert changed == {"README.md": False, "shapes/__init__.py": True,
                       "shapes/clean.py": False, "shapes/geometry.py": True}
    for name, tool in (("git", ["git", "apply"]), ("patch", ["patch", "-p1"])):
        applied = apply_and_read(data["diff"], source, tmp_path / name, tool)
        assert applied == expected, name
    assert "import os" not in expected["shapes/geometry.py"]
    # And the project's own files are unchanged
    assert tree_digest(source) == before


def test_refactoring_falls_back_to_the_builtin_fixer(
        commands_cluster: tuple[str, SyncClient], tmp_path: Path) -> None:
    _, client = commands_cluster
    # Given messy files, one without a final newline and one that does not parse
    files = [*project_files("messy_project"),
             {"path": "nonl.py", "content": "import os\nx = 1   "},
             {"path": "broken.py", "content": "def f(:\n\tpass  \n"}]
    source = tmp_path / "source"
    for record in files:
        (source / record["path"]).parent.mkdir(parents=True, exist_ok=True)
        (source / record["path"]).write_text(record["content"])
    # When the coder refactors them with the builtin fixer
    result = run_task(client, "refactoring", {"files": files, "tool": "builtin"})
    # Then the diff applies and the fixes are there, the program otherwise the same
    assert result.ok, result
    data = result.data
    assert data["tool"] == "builtin"
    status = {f["path"]: f for f in data["files"]}
    assert status["broken.py"]["changed"] is False
    assert status["broken.py"]["detail"].startswith("unparseable")
    applied = apply_and_read(data["diff"], source, tmp_path / "git", ["git", "apply"])
    assert applied["nonl.py"] == "x = 1\n"
    geometry = applied["shapes/geometry.py"]
    assert "\t" not in geometry and not any(line.endswith(" ") for line in geometry.splitlines())
    assert "import os" not in geometry and "import json" in geometry and "sqrt" not in geometry
    original = ast.parse(next(f["content"] for f in files if f["path"] == "shapes/geometry.py"))
    original.body = [node for node in original.body
                     if not isinstance(node, (ast.Import, ast.ImportFrom))]
    fixed = ast.parse(geometry)
    fixed.body = [node for node in fixed.body if not isinstance(node, (ast.Import, ast.ImportFrom))]
    assert ast.dump(fixed) == ast.dump(original)
    # And a package's __init__ keeps its imports (they are its re-exports)
    assert status["shapes/__init__.py"]["changed"] is False


# ------------------------------------------------------------------ capabilities


def test_capabilities_follow_what_the_agent_can_serve(cluster: Cluster) -> None:
    # Given a coder started without commands allowed and without an LLM
    url = cluster.broker().url
    cluster.agent(url, CODER, orch_allow_commands="0", orch_llm_base_url="")
    client = cluster.client(url)
    # Then the broker lists it with refactoring only
    coder = agents_by_name(client.status())["coder"]
    assert coder["capabilities"] == ["refactoring"]
    # And a debugging task sent to it by name is refused, not run
    handle = client.submit(agent="coder", timeout=WAIT_S,
                           data={"files": UNITTEST_PROJECT, "request": "run the tests"})
    result = handle.result(timeout=WAIT_S)
    assert not result.ok and result.error is not None
    assert result.error.code == "unsupported" and "ORCH_ALLOW_COMMANDS" in result.error.message


# ------------------------------------------------------------------ code generation

LLM_REPLY = textwrap.dedent('''\
    ```python file=slug.py
    """Slugs for titles."""
    import re


    def slugify(title: str) -> str:
        """Lower-case words of ``title`` joined by hyphens."""
        return "-".join(re.findall(r"[a-z0-9]+", title.lower()))
    ```

    ```python file=test_slug.py
    from slug import slugify


    def test_words_are_joined() -> None:
        assert slugify("Hello, World!") == "hello-world"
    ```

    ```markdown file=README.md
    # slug

    ```python
    slugify("Hello, World!")  # "hello-world"
    ```
    ```
    ''')


def test_code_generation_with_an_llm_writes_code_tests_and_docs(cluster: Cluster) -> None:
    with FakeLLMServer() as server:
        server.push(TextReply(LLM_REPLY, prompt_tokens=120, completion_tokens=80))
        # Given a coder with an LLM configured (and commands allowed)
        url = cluster.broker().url
        cluster.agent(url, CODER, orch_llm_base_url=server.url, orch_allow_commands="1")
        client = cluster.client(url)
        coder = agents_by_name(client.status())["coder"]
        assert coder["capabilities"] == ["code_generation", "debugging", "refactoring"]
        # When it gets a researcher's output for a specification
        research = {"kind": "research", "specification": "a slugify function for titles",
                    "language": "python", "query": "slugify",
                    "summary": "Slugs keep lower-case letters and digits [docs/slugs.md:1-4].",
                    "citations": [{"path": "docs/slugs.md", "lines": [1, 4]}], "results": []}
        budget = {"scope": "build-1", "max_tokens": 150}
        result = run_task(client, "code_generation", research, llm_budget=budget)
        # Then the prompt carried the specification and the research summary
        assert result.ok, result
        [request] = server.chat_requests
        prompt = "\n".join(m["content"] for m in request.body["messages"])
        assert "a slugify function for titles" in prompt
        assert "Slugs keep lower-case letters" in prompt and "docs/slugs.md:1-4" in prompt
        # And the reply became code, tests and documentation, as data and as files
        assert result.ok, result
        data = result.data
        assert data["kind"] == "code" and data["language"] == "python"
        assert data["specification"] == "a slugify function for titles"
        assert [f["path"] for f in data["files"]] == ["slug.py", "test_slug.py", "README.md"]
        assert "def slugify" in data["code"] and "def test_words_are_joined" in data["tests"]
        assert data["documentation"].startswith("# slug") and "```python" in data["documentation"]
        assert data["usage"] == {"prompt_tokens": 120, "completion_tokens": 80}
        assert data["citations"] == research["citations"] and data["truncated"] is False
        assert result.code == data["code"] and result.tests == data["tests"]
        # And a second generation under the same (now spent) budget is refused unasked
        again = run_task(client, "code_generation", research, llm_budget=budget)
        assert not again.ok and again.error is not None
        assert again.error.code == "budget_exceeded", again
        assert len(server.chat_requests) == 1
        # And the generated files pass their own tests when the coder debugs them
        check = run_task(client, "debugging", {"files": data["files"]})
        assert check.ok and check.data["outcome"] == "passed", check.data
        assert check.data["passed"] == 1


# ------------------------------------------------------------------ units


def test_junit_and_output_parsers_read_real_pytest_output(tmp_path: Path) -> None:
    # Given the buggy project run by the real pytest with the agent's command
    shutil.copytree(FIXTURES / "buggy_project", tmp_path / "p")
    argv, kind = testrun.plan_command(None, testrun.PYTEST)
    run = subprocess.run(argv, cwd=tmp_path / "p", capture_output=True, text=True, timeout=60,
                         check=False)
    # Then the JUnit report and the short summary name the same failing test
    report = tmp_path / "p" / testrun.REPORT_RELATIVE
    counts, failures = testrun.parse_junit(report.read_bytes())
    summary_counts, summary = testrun.parse_pytest_output(run.stdout)
    assert kind == "pytest" and run.returncode == 1
    assert [f.test for f in failures] == [f.test for f in summary] == \
        ["tests/check_arith.py::test_mul"]
    assert (counts.passed, counts.failed) == (2, 1)
    assert (summary_counts.passed, summary_counts.failed) == (2, 1)


def test_a_given_pytest_command_gets_a_report_and_others_run_as_given() -> None:
    argv, kind = testrun.plan_command(["pytest", "-x"], testrun.PYTEST)
    assert kind == "pytest" and argv[:2] == ["pytest", "-x"]
    assert f"--junitxml={testrun.REPORT_RELATIVE}" in argv
    assert testrun.plan_command(["make", "test"], testrun.PYTEST) == (["make", "test"], "command")


def test_fixer_keeps_string_content_and_reexports() -> None:
    source = 'import os\ns = """a   \n\tb"""\n\tif_ = 1\n'
    # A tab-indented line at top level does not parse: the fixer leaves such files alone
    assert fixer.fix_source(source).detail.startswith("unparseable")
    source = 'import os\nimport sys\ns = """a   \n\tb"""\ndef f():\n\treturn sys   \n'
    fixed = fixer.fix_source(source).text
    assert fixed == 'import sys\ns = """a   \n\tb"""\ndef f():\n    return sys\n'
    init = "from .a import b\n"
    assert fixer.fix_source(init, is_package_init=True).text == init


def test_unified_diff_marks_a_missing_final_newline(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text("x = 1")
    diff = refactor.unified_diff("a.py", "x = 1", "x = 1\n")
    assert "\\ No newline at end of file" in diff
    subprocess.run(["git", "apply"], input=diff.encode(), cwd=tmp_path, check=True)
    assert (tmp_path / "a.py").read_text() == "x = 1\n"


def test_codegen_reads_names_from_fences_and_preceding_lines() -> None:
    reply = "**src/app.py**\n```python\nprint(1)\n```\n```python\ndef test_a(): pass\n"
    generated = codegen.parse_reply(reply, "python")
    assert [(f.path, f.role) for f in generated.files] == [("src/app.py", "code"),
                                                          ("test_main.py", "tests")]
    assert generated.truncated
    with pytest.raises(codegen.UnusableReply):
        codegen.parse_reply("I cannot do that.", "python")
