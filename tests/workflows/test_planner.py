"""The planner, and the files that travel with its plans.

Every test runs on a real git repository made in a temporary directory with the real
``git`` binary: a small project on ``main``, a ``feature`` branch two commits ahead, a
pull request ref, ignored, binary, oversized and vendored files beside the sources.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from workflows import planner as planner_module
from workflows.files import DEFAULT_MAX_FILE_BYTES, ChangedFile, FilesError, GitError, LastCommits, \
    PullRequest, PullRequestNotFetched, RevisionNotFound, RevisionRange, SinceRevision, \
    SourceFile, collect_changes, collect_files, default_branch, pack_batches
from workflows.model import MapReduce, Pipeline, TaskStep, Workflow
from workflows.planner import InvalidPlan, Plan, PlanError, ProposingPlanner, \
    RuleBasedPlanner, Unplannable, extract_topic, plan, research_aspects, validate_proposal

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs the git binary")

#: Isolated from the machine's git configuration, so the repository is the same anywhere.
GIT_ENV = {"GIT_AUTHOR_NAME": "Test", "GIT_AUTHOR_EMAIL": "test@example.com",
           "GIT_COMMITTER_NAME": "Test", "GIT_COMMITTER_EMAIL": "test@example.com",
           "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1"}

APP_V1 = "".join(f"line{i} = {i}\n" for i in range(1, 11))
#: Lines 3 and 4 changed, line 11 added.
APP_V2 = APP_V1.replace("line3 = 3\nline4 = 4\n", "line3 = 'three'\nline4 = 'four'\n") + \
    "line11 = 11\n"
DB_V1 = "import sqlite3\nQUERY = 'SELECT 1'\n"
DB_V2 = "import sqlite3\nQUERY = 'SELECT * FROM users WHERE name = %s' % name\n"
ONLINE = frozenset({"security_audit", "code_review", "performance_analysis", "search",
                    "document_analysis", "summarization", "synthesis", "aggregation"})


def git(repo: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True,
                          env={**os.environ, **GIT_ENV}, timeout=30)
    return done.stdout


def write(root: Path, files: dict[str, str | bytes]) -> None:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)


def make_project(root: Path) -> Path:
    """The repository every test reads: see the module docstring."""
    root.mkdir(parents=True, exist_ok=True)
    git(root, "init", "-q", "-b", "main")
    write(root, {
        "src/app.py": APP_V1, "src/db.py": DB_V1,
        "src/util/helpers.py": "def helper():\n    return 1\n",
        "lib/parse.py": "def parse(text):\n    return eval(text)\n",
        "lib/old.py": "OLD = True\n",
        "docs/guide.md": "# Guide\n\nHow to use it.\n", "docs/api.rst": "API\n===\n",
        "README.md": "# Project\n", ".gitignore": "local_secrets.py\nbuild/\n",
    })
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "first")
    git(root, "checkout", "-q", "-b", "feature")
    write(root, {"src/app.py": APP_V2, "src/new.py": "A = 1\nB = 2\nC = 3\n"})
    (root / "lib/old.py").unlink()
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "second")
    write(root, {"src/db.py": DB_V2})
    git(root, "commit", "-q", "-am", "third")
    git(root, "update-ref", "refs/pull/7/head", "feature")
    # Beside the sources, untracked: ignored, binary, oversized and vendored files.
    write(root, {
        "src/local_secrets.py": "PASSWORD = 'hunter2'\n", "build/gen.py": "GENERATED = 1\n",
        "src/blob.py": b"\x00\x01binary\x00",
        "src/huge.py": "x = 1\n" * (DEFAULT_MAX_FILE_BYTES // 6 + 10),
        "node_modules/pkg/index.py": "vendored = 1\n",
        ".venv/pyvenv.cfg": "home = /usr\n", ".venv/lib/site.py": "venv = 1\n",
        "envs/py/pyvenv.cfg": "home = /usr\n", "envs/py/mod.py": "venv = 2\n",
    })
    return root


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_project(tmp_path_factory.mktemp("planner") / "project")


@pytest.fixture()
def scratch(tmp_path: Path) -> Iterator[Path]:
    """A fresh copy of the project for a test that edits the work tree."""
    yield make_project(tmp_path / "project")


def shape(p: Plan) -> tuple[str, str, str | None, str | None]:
    """(intent, root kind, mapper or first capability, reducer or last capability)."""
    root = p.workflow.root
    if isinstance(root, MapReduce):
        assert isinstance(root.mapper, TaskStep)
        reducer = root.reducer.capability if isinstance(root.reducer, TaskStep) else None
        return p.intent, root.kind, root.mapper.capability, reducer
    if isinstance(root, Pipeline):
        caps = [s.capability for s in root.steps if isinstance(s, TaskStep)]
        return p.intent, root.kind, caps[0], caps[-1]
    assert isinstance(root, TaskStep)
    return p.intent, root.kind, root.capability, None


def item_paths(p: Plan) -> list[str]:
    return [f["path"] for item in p.input for f in item["files"]]


# --- representative phrasings ------------------------------------------------------------

SECURITY = ("security", "map_reduce", "security_audit", "synthesis")
REVIEW = ("review", "map_reduce", "code_review", "synthesis")
RESEARCH = ("research", "map_reduce", "search", "synthesis")
BUILD = ("build", "pipeline", "search", "code_review")


@pytest.mark.parametrize("text,expected,target", [
    ("Analyze this codebase for security issues", SECURITY, {"path": "."}),
    ("audit ./src for vulnerabilities", SECURITY, {"path": "src"}),
    ("scan the project for security problems", SECURITY, {"path": "."}),
    ("find injection bugs in lib/", SECURITY, {"path": "lib"}),
    ("Review pull request #7", REVIEW, {"change": "pull request #7"}),
    ("review PR 7", REVIEW, {"change": "pull request #7"}),
    ("review the changes since main", REVIEW,
     {"change": "the changes since main (uncommitted work included)"}),
    ("code review of my last 2 commits", REVIEW, {"change": "the last 2 commits"}),
    ("review main..feature", REVIEW, {"change": "main..feature"}),
    ("Research vector databases", RESEARCH, {"topic": "vector databases"}),
    ("investigate Rust async runtimes", RESEARCH, {"topic": "Rust async runtimes"}),
    ("what is known about CRDTs?", RESEARCH, {"topic": "CRDTs"}),
    ("Build a REST API", BUILD, {"specification": "Build a REST API", "language": "python"}),
    ("Create a user authentication module", BUILD,
     {"specification": "Create a user authentication module", "language": "python"}),
    ("implement a CSV parser", BUILD,
     {"specification": "implement a CSV parser", "language": "python"}),
    ("review this code for performance",
     ("performance", "map_reduce", "performance_analysis", "synthesis"), {"path": "."}),
    ("summarize the docs in ./docs",
     ("summarize", "map_reduce", "summarization", "synthesis"), {"path": "docs"}),
    ("refactor the helpers in src/util",
     ("refactor", "map_reduce", "refactoring", "aggregation"), {"path": "src/util"}),
    ("debug the failing tests in lib", ("debug", "task", "debugging", None), {"path": "lib"}),
])
def test_representative_phrasings_give_the_expected_plans(
        project: Path, text: str, expected: tuple[str, ...], target: dict[str, Any]) -> None:
    # When the text is planned in the project
    p = plan(text, cwd=project, online_capabilities=ONLINE | {"code_generation", "refactoring",
                                                               "debugging"})
    # Then the plan has the expected shape, capabilities and target
    assert shape(p) == expected
    assert {k: p.target[k] for k in target} == target
    assert p.missing == ()


# Phrasings in no word list and no other test: inflections, typos, synonyms, odd word order.
HELD_OUT = [
    ("Are there any exploitable weaknesses lurking in src/?", "security"),
    ("Scrutinise the repository for vulnerabilites please", "security"),
    ("hunting for secuirty holes in lib", "security"),
    ("could an attacker abuse anything under lib/", "security"),
    ("Could you look over pull request number 7?", "review"),
    ("give my latest commit a once-over", "review"),
    ("critique the diff between main and HEAD", "review"),
    ("Why is the code in src so sluggish?", "performance"),
    ("locate the bottlenecks slowing down src/util", "performance"),
    ("tl;dr the notes under docs", "summarize"),
    ("what's the landscape of WebAssembly runtimes", "research"),
    ("I'd love to understand how Raft elections work", "research"),
    ("Compare Postgres versus MySQL for analytics workloads", "research"),
    ("Write me a tiny URL shortener service in Go", "build"),
    ("put together a markdown-to-html converter", "build"),
    ("Developing a websocket chat backend for our team", "build"),
]


@pytest.mark.parametrize("text,intent", HELD_OUT)
def test_held_out_phrasings_map_to_the_right_intent(project: Path, text: str,
                                                    intent: str) -> None:
    # Given a phrasing that appears nowhere in the planner's source
    source = Path(planner_module.__file__).read_text().lower()
    assert text.lower() not in source
    # When it is planned
    p = plan(text, cwd=project)
    # Then it is read as the intended request
    assert p.intent == intent
    Workflow.from_dict(p.to_dict()["workflow"])


def test_targets_are_read_from_the_text(project: Path) -> None:
    assert plan("Compare Postgres versus MySQL", cwd=project).target == \
        {"topic": "Postgres versus MySQL"}
    p = plan("Write me a tiny URL shortener service in Go", cwd=project)
    assert p.target["language"] == "go"
    assert p.input["query"].startswith("tiny URL shortener service in Go")
    change = plan("review my last commit", cwd=project)
    assert change.target["change"] == "the last commit"
    assert [f["path"] for item in change.input for f in item["files"]] == ["src/db.py"]


def test_research_derives_four_aspects_or_a_comparison(project: Path) -> None:
    single = plan("Research vector databases", cwd=project)
    assert [item["aspect"] for item in single.input] == \
        ["overview", "trade-offs", "alternatives", "practices"]
    assert all(item["topic"] == "vector databases" for item in single.input)
    assert research_aspects("Kafka vs RabbitMQ", comparison=True) == [
        ("overview-1", "Kafka: overview and key concepts"),
        ("overview-2", "RabbitMQ: overview and key concepts"),
        ("trade-offs", "Kafka versus RabbitMQ: trade-offs and differences"),
        ("choice", "when to choose Kafka or RabbitMQ")]
    assert extract_topic("Could you please tell me about the history of Lisp?") == \
        "history of Lisp"


@pytest.mark.parametrize("text", ["Research cache eviction in ./src",
                                  "research cache eviction using the files in src"])
def test_research_in_a_directory_takes_it_as_the_corpus(project: Path, text: str) -> None:
    p = plan(text, cwd=project)
    assert p.intent == "research" and p.files > 0
    assert all(item["topic"] == "cache eviction" and item["documents"] for item in p.input)


def test_the_same_text_gives_the_same_plan(project: Path) -> None:
    first = plan("audit ./src for vulnerabilities", cwd=project).to_dict()
    assert plan("audit ./src for vulnerabilities", cwd=project).to_dict() == first
    assert RuleBasedPlanner().plan("audit ./src for vulnerabilities", cwd=project).to_dict() \
        == first


# --- what cannot be planned, and what is missing ------------------------------------------

WORDS = st.sampled_from(["audit", "review", "PR", "#7", "since", "main", "./src", "lib/",
                         "research", "build", "a", "the", "security", "slow", "docs",
                         "summarize", "last", "3", "commits", "..", "main..HEAD", "?", "~",
                         "./nope", "x" * 300, "\x00", "what", "is", "fix", "tests"])


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.lists(WORDS | st.text(max_size=8), max_size=8))
def test_any_text_gives_a_plan_or_one_plan_error(project: Path, words: list[str]) -> None:
    text = " ".join(words)
    try:
        p = plan(text, cwd=project)
    except PlanError as error:
        assert "\n" not in str(error)
        return
    assert Workflow.from_dict(p.to_dict()["workflow"]) == p.workflow



@pytest.mark.parametrize("text", ["hello there", "make me a sandwich", "asdf qwerty", "",
                                  "thanks!", "the weather in Paris"])
def test_unplannable_text_lists_what_the_agents_online_can_do(project: Path, text: str) -> None:
    with pytest.raises(Unplannable) as caught:
        plan(text, cwd=project, online_capabilities={"search", "code_review"})
    message = str(caught.value)
    assert "the agents online can do: code_review, search" in message
    assert "--capability" in message
    assert "\n" not in message


def test_unplannable_without_agents_or_knowledge_of_them(project: Path) -> None:
    with pytest.raises(Unplannable, match="no agent is online"):
        plan("hello", cwd=project, online_capabilities=[])
    with pytest.raises(Unplannable, match="the planner knows security"):
        plan("hello", cwd=project)


def test_missing_capabilities_are_flagged(project: Path) -> None:
    # Given agents online that cannot generate code (no LLM configured)
    online = {"search", "code_review", "synthesis"}
    # When a build is planned
    p = plan("Build a REST API", cwd=project, online_capabilities=online)
    # Then the plan says what it lacks, in its data and in its description
    assert p.missing == ("code_generation",)
    assert p.to_dict()["missing"] == ["code_generation"]
    assert "missing: code_generation (no agent online offers it)" in p.describe()
    # And without knowing what is online, nothing is flagged
    assert plan("Build a REST API", cwd=project).missing == ()


def test_research_uses_document_analysis_where_search_is_not_online(project: Path) -> None:
    p = plan("Research vector databases", cwd=project,
             online_capabilities={"document_analysis", "synthesis"})
    assert shape(p)[2] == "document_analysis"
    assert p.missing == ()


@pytest.mark.parametrize("text,message", [
    ("audit ./nope for vulnerabilities", "no such file or directory: ./nope"),
    ("audit " + "x" * 5000, "the planner reads at most 4000"),
    ("review PR 99", "git fetch origin pull/99/head:pr/99"),
    ("review the changes since nowhere-branch", "no revision 'nowhere-branch'"),
    ("research", "research what?"),
])
def test_a_target_that_is_not_there_is_a_one_line_error(project: Path, text: str,
                                                        message: str) -> None:
    with pytest.raises(PlanError) as caught:
        plan(text, cwd=project)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


# --- files travel with the plan -----------------------------------------------------------


def test_a_plan_carries_relative_paths_and_contents(project: Path) -> None:
    # When the whole project is audited
    p = plan("Analyze this codebase for security issues", cwd=project)
    files = {f["path"]: f["content"] for item in p.input for f in item["files"]}
    # Then the sources travel with their contents under paths relative to the project
    assert sorted(files) == ["lib/parse.py", "src/app.py", "src/db.py", "src/new.py",
                             "src/util/helpers.py"]
    assert files["src/app.py"] == APP_V2
    assert files["lib/parse.py"] == (project / "lib/parse.py").read_text()
    # And ignored, vendored and venv files stay home; binary and oversized ones are reported
    assert {s.path: s.reason.split(",")[0] for s in p.skipped} == {
        "src/blob.py": "binary", "src/huge.py": f"{(project / 'src/huge.py').stat().st_size} bytes"}
    assert "over the 1048576-byte limit" in dict((s.path, s.reason) for s in p.skipped)[
        "src/huge.py"]
    # And no absolute path of this machine is in what travels
    assert str(project) not in json.dumps(p.to_dict())
    assert (p.files, p.batches) == (5, 1)


def test_a_named_directory_or_path_option_prefixes_paths_from_the_cwd(project: Path) -> None:
    named = plan("audit ./src for vulnerabilities", cwd=project)
    assert item_paths(named) == ["src/app.py", "src/db.py", "src/new.py", "src/util/helpers.py"]
    option = plan("audit this for vulnerabilities", cwd=project, path="src/util")
    assert item_paths(option) == ["src/util/helpers.py"]
    # A directory outside the cwd travels under its own name, never an absolute path
    outside = plan("audit it for vulnerabilities", cwd=project / "docs", path=project / "lib")
    assert item_paths(outside) == ["lib/parse.py"]


def test_a_summary_of_docs_reads_documents_and_a_named_file(project: Path) -> None:
    docs = plan("summarize the docs in ./docs", cwd=project)
    assert item_paths(docs) == ["docs/api.rst", "docs/guide.md"]
    readme = plan("Give me the gist of README.md", cwd=project)
    assert item_paths(readme) == ["README.md"]


def test_collect_files_respects_gitignore_and_skips_vendored_dirs(project: Path) -> None:
    found = collect_files(project, suffixes=(".py",))
    assert found.used_git
    paths = [f.path for f in found.files]
    assert "src/local_secrets.py" not in paths and "build/gen.py" not in paths
    assert not any(p.startswith(("node_modules/", ".venv/", "envs/")) for p in paths)
    # Without git, ignored files are read, but vendored and venv directories still are not
    walked = [f.path for f in collect_files(project, suffixes=(".py",), use_git=False).files]
    assert "src/local_secrets.py" in walked and "build/gen.py" in walked
    assert not any(p.startswith(("node_modules/", ".venv/", "envs/", ".git/")) for p in walked)
    # A directory the repository ignores, named on purpose, is walked (not found empty)
    ignored = collect_files(project / "build", suffixes=(".py",))
    assert not ignored.used_git and [f.path for f in ignored.files] == ["gen.py"]


def test_collect_files_reports_what_it_leaves_out(tmp_path: Path) -> None:
    write(tmp_path, {"ok.txt": "fine\n", "latin.txt": b"caf\xe9\n", "nul.txt": b"a\x00b",
                     "big.txt": "x" * 101})
    found = collect_files(tmp_path, max_file_bytes=100)
    assert [f.path for f in found.files] == ["ok.txt"]
    assert {s.path: s.reason for s in found.skipped} == {
        "latin.txt": "not UTF-8 text", "nul.txt": "binary",
        "big.txt": "101 bytes, over the 100-byte limit"}
    assert not found.used_git


def test_a_tree_too_big_to_carry_is_refused(tmp_path: Path) -> None:
    write(tmp_path, {f"d{i}/f{j}.txt": "x\n" for i in range(3) for j in range(4)})
    assert len(collect_files(tmp_path, max_files=12).files) == 12
    with pytest.raises(FilesError, match="more than 11 files under"):
        collect_files(tmp_path, max_files=11)


def test_batches_hold_many_small_files_and_a_big_file_alone() -> None:
    def sized(name: str, size: int) -> SourceFile:
        return SourceFile(name, "x" * size, size)

    files = [sized(f"s{i}", 10) for i in range(7)] + [sized("big", 500)] + \
        [sized(f"t{i}", 40) for i in range(3)]
    batches = pack_batches(files, max_batch_bytes=100, max_batch_files=3)
    assert [[f.path for f in b] for b in batches] == [
        ["s0", "s1", "s2"], ["s3", "s4", "s5"], ["big"], ["s6", "t0", "t1"], ["t2"]]
    assert all(sum(f.size_bytes for f in b) <= 100 for b in batches if len(b) > 1)
    with pytest.raises(ValueError):
        pack_batches(files, max_batch_bytes=0)


# --- changes from git ---------------------------------------------------------------------


def test_a_range_gives_changed_files_contents_and_line_ranges(project: Path) -> None:
    change = collect_changes(project, RevisionRange("main..feature"))
    by_path = {f.path: f for f in change.files}
    assert sorted(by_path) == ["src/app.py", "src/db.py", "src/new.py"]
    assert by_path["src/app.py"] == ChangedFile("src/app.py", "modified", APP_V2,
                                                ((3, 4), (11, 11)), len(APP_V2.encode()))
    assert by_path["src/new.py"].status == "added"
    assert by_path["src/new.py"].changed_lines == ((1, 3),)
    assert by_path["src/db.py"].changed_lines == ((2, 2),)
    assert change.deleted == ("lib/old.py",)
    assert change.head == git(project, "rev-parse", "feature").strip()


def test_a_pull_request_ref_is_measured_from_where_it_forked(project: Path) -> None:
    change = collect_changes(project, PullRequest(7))
    assert change.label == "pull request #7"
    assert change.base == git(project, "rev-parse", "main").strip()
    assert [f.path for f in change.files] == ["src/app.py", "src/db.py", "src/new.py"]


def test_a_pull_request_not_fetched_names_the_fetch_command(project: Path) -> None:
    with pytest.raises(PullRequestNotFetched) as caught:
        collect_changes(project, PullRequest(99))
    assert str(caught.value) == ("pull request #99 is not in this repository; fetch it first: "
                                 "git fetch origin pull/99/head:pr/99")


def test_a_locally_fetched_pr_branch_is_found(scratch: Path) -> None:
    git(scratch, "branch", "pr/12", "feature")
    assert [f.path for f in collect_changes(scratch, PullRequest(12)).files] == \
        ["src/app.py", "src/db.py", "src/new.py"]


def test_last_commits_and_the_whole_history(project: Path) -> None:
    last = collect_changes(project, LastCommits(1))
    assert [(f.path, f.changed_lines) for f in last.files] == [("src/db.py", ((2, 2),))]
    # Asking for more commits than the branch has measures from the empty tree
    everything = collect_changes(project, LastCommits(50))
    assert "lib/parse.py" in [f.path for f in everything.files]
    assert everything.deleted == ()


def test_since_a_branch_includes_uncommitted_and_untracked_work(scratch: Path) -> None:
    # Given an uncommitted edit and a new untracked file on the feature branch
    (scratch / "src/util/helpers.py").write_text("def helper():\n    return 2\n")
    (scratch / "src/extra.py").write_text("E = 1\nF = 2\n")
    # When the changes since main are collected with the work tree
    change = collect_changes(scratch, SinceRevision("main"), suffixes=(".py",))
    by_path = {f.path: f for f in change.files}
    # Then commits, the edit and the untracked file are all there, vendored files are not
    assert sorted(by_path) == ["src/app.py", "src/db.py", "src/extra.py", "src/new.py",
                               "src/util/helpers.py"]
    assert by_path["src/util/helpers.py"].changed_lines == ((2, 2),)
    assert by_path["src/extra.py"] == ChangedFile("src/extra.py", "untracked", "E = 1\nF = 2\n",
                                                  ((1, 2),), 12)
    assert {s.path for s in change.skipped} == {"src/blob.py", "src/huge.py"}
    assert change.head is None
    # And without the work tree, only the commits count
    committed = collect_changes(scratch, SinceRevision("main", include_worktree=False))
    assert sorted(f.path for f in committed.files) == ["src/app.py", "src/db.py", "src/new.py"]


def test_odd_file_names_survive_the_diff(scratch: Path) -> None:
    write(scratch, {'src/we ird "name".py': "x = 1\n", "src/tab\there.py": "y = 2\n"})
    git(scratch, "add", "-A", "src")
    git(scratch, "commit", "-q", "-m", "odd names")
    change = collect_changes(scratch, LastCommits(1))
    assert [(f.path, f.changed_lines) for f in change.files] == [
        ("src/tab\there.py", ((1, 1),)), ('src/we ird "name".py', ((1, 1),))]


def test_change_errors_are_one_line(project: Path, tmp_path: Path) -> None:
    with pytest.raises(RevisionNotFound, match="no revision 'nope'"):
        collect_changes(project, RevisionRange("nope..HEAD"))
    with pytest.raises(RevisionNotFound):
        collect_changes(project, SinceRevision("--output=/tmp/x"))
    with pytest.raises(GitError, match="not a git repository"):
        collect_changes(tmp_path, LastCommits(1))
    assert default_branch(project) == "main"


def test_a_change_review_carries_changed_lines(project: Path) -> None:
    p = plan("Review pull request #7", cwd=project)
    files = {f["path"]: f for item in p.input for f in item["files"]}
    assert files["src/app.py"]["changed_lines"] == [[3, 4], [11, 11]]
    assert files["src/app.py"]["content"] == APP_V2
    assert all(item["change"] == "pull request #7" for item in p.input)
    assert p.target["deleted"] == ["lib/old.py"]
    assert "security_audit" in shape(plan("audit PR 7 for injection flaws", cwd=project))


# --- plans as data ------------------------------------------------------------------------


@pytest.mark.parametrize("text", [
    "Analyze this codebase for security issues", "Review pull request #7",
    "Research vector databases", "Build a REST API", "summarize the docs in ./docs",
    "debug the failing tests in lib", "Compare Kafka vs RabbitMQ"])
def test_a_plan_round_trips_through_its_dict(project: Path, text: str) -> None:
    p = plan(text, cwd=project)
    data = json.loads(json.dumps(p.to_dict()))
    assert Workflow.from_dict(data["workflow"]) == p.workflow
    assert data["input"] == p.input
    assert "input" not in p.to_dict(include_input=False)
    assert data["capabilities"] == list(p.capabilities)


def test_describe_shows_steps_capabilities_and_files(project: Path) -> None:
    text = plan("audit ./src for vulnerabilities", cwd=project,
                online_capabilities={"security_audit"}).describe()
    lines = text.splitlines()
    assert lines[0] == "security audit of src: 4 file(s) in 1 batch(es) of up to 256 KiB"
    assert "  audit: map-reduce, up to 1 at once, min_success 0.9" in lines
    assert "    map: scan: capability security_audit, timeout 300 s" in lines
    assert "    reduce: synthesize: capability synthesis, timeout 300 s" in lines
    assert "skipped 2 file(s): src/blob.py (binary), src/huge.py" in text
    assert "missing: synthesis (no agent online offers it)" in lines
    assert lines[-1].startswith("why: read as security")


# --- proposals (an LLM's plans) -----------------------------------------------------------

PROPOSAL = {"workflow": {"workflow": "llm", "steps": [{"capability": "search"},
                                                       {"capability": "synthesis"}]},
            "input": {"query": "vector databases"}, "summary": "search, then synthesize"}


def test_a_valid_proposal_becomes_a_plan() -> None:
    p = validate_proposal(PROPOSAL, online_capabilities={"search", "synthesis"})
    assert (p.intent, p.summary, p.capabilities) == ("proposed", "search, then synthesize",
                                                     ("search", "synthesis"))


@pytest.mark.parametrize("proposal,message", [
    ([], "invalid plan: must be a map, not list"),
    ({"workflow": {"workflow": "x", "steps": [{"kind": "magic"}]}},
     "invalid plan: workflow.steps[0].kind: unknown kind 'magic'"),
    ({**PROPOSAL, "input": {"x": float("nan")}}, "invalid plan: input.x: must be a finite"),
    ({**PROPOSAL, "input": {"x": {1, 2}}}, "invalid plan: input.x: must be JSON data, not set"),
    ({**PROPOSAL, "extra": 1}, "invalid plan: extra: unknown field"),
    ({"workflow": {"workflow": "x", "steps": [{"capability": "teleport"}]}},
     "invalid plan: workflow.root.steps[0].capability: no agent online offers 'teleport'"),
    ({"workflow": {"workflow": "x", "steps": [{"agent": "ghost"}]}},
     "invalid plan: workflow.root.steps[0].agent: no agent 'ghost' is online"),
])
def test_an_invalid_proposal_names_its_field(proposal: Any, message: str) -> None:
    with pytest.raises(InvalidPlan) as caught:
        validate_proposal(proposal, online_capabilities={"search", "synthesis"})
    assert str(caught.value).startswith(message)


def test_a_proposing_planner_falls_back_on_a_bad_proposal(project: Path) -> None:
    def propose(text: str, online: tuple[str, ...]) -> Any:
        return {"workflow": {"workflow": "x", "steps": [{"capability": "teleport"}]}}

    planner = ProposingPlanner(propose)
    p = planner.plan("Research vector databases", cwd=project, online_capabilities=ONLINE)
    assert p.intent == "research"
    good = ProposingPlanner(lambda text, online: PROPOSAL)
    assert good.plan("hello", cwd=project, online_capabilities=ONLINE).intent == "proposed"
    # Plans that carry the client's files are never left to the model
    assert good.plan("audit ./src for vulnerabilities", cwd=project).intent == "security"


def test_a_change_with_no_file_to_review_says_so_and_what_to_ask_instead(
        tmp_path: Path) -> None:
    # Given a git repository on main, with nothing since main
    write(tmp_path, {"app.py": "x = 1\n"})
    git(tmp_path, "init", "-q", "-b", "main")
    git(tmp_path, "add", "app.py")
    git(tmp_path, "commit", "-qm", "one")
    # When the changes since main are asked for a review
    with pytest.raises(PlanError) as caught:
        plan("Review the changes since main", cwd=tmp_path)
    # Then the error says there is nothing to review, and what to ask instead
    message = str(caught.value)
    assert message.startswith("nothing to review in the changes since main "
                              "(uncommitted work included): no "), message
    assert "review my last 3 commits" in message and "\n" not in message
