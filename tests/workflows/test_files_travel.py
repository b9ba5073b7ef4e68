"""Files travel with the work: a plan over a directory carries the files' contents in its
tasks, so agents started in another working directory (another machine, in effect) audit
them without reading a path of the client's machine."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent_sdk import Client
from tests.conftest import ROOT, Cluster
from tests.workflows.support import run, start_agents
from workflows.api import run_workflow
from workflows.outputs import StepOutput
from workflows.planner import plan
from workflows.runs import RunStatus


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A small project outside the agents' working directory (the repository root)."""
    root = tmp_path / "project"
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "travel_one.py").write_text("import os\nos.system(input())\n")
    (root / "pkg" / "travel_two.py").write_text("x = 1\n" * 40)
    (root / "README.txt").write_text("not code\n")
    return root


@pytest.fixture
def cluster_url(tmp_path: Path) -> Iterator[tuple[Cluster, str]]:
    cluster = Cluster(tmp_path)
    try:
        yield cluster, cluster.broker().url
    finally:
        cluster.close()


def test_a_planned_audit_carries_file_contents_to_agents_elsewhere(
        project: Path, cluster_url: tuple[Cluster, str]) -> None:
    cluster, url = cluster_url
    # Given agents for the plan's capabilities, running in the repository root
    start_agents(cluster, url,
                 {"AGENT_NAME": "auditor", "AGENT_CAPS": "security_audit", "AGENT_OP": "audit"},
                 {"AGENT_NAME": "merger", "AGENT_CAPS": "synthesis", "AGENT_OP": "merge"})
    # And the quick start's sentence planned over a project elsewhere
    planned = plan("Analyze this codebase for security issues", cwd=project,
                   online_capabilities={"security_audit", "synthesis"})
    assert not planned.missing

    async def scenario() -> StepOutput:
        async with Client(url) as client:
            record = await run_workflow(planned.workflow, planned.input, client=client)
            assert record.status is RunStatus.SUCCEEDED, record
            assert record.output is not None
            return record.output

    output = run(scenario())
    # Then every Python file was audited from its carried content, by relative path, and
    # none of those paths exists where the agents run
    seen = {entry["path"]: entry for entry in output.data}
    assert set(seen) == {"pkg/travel_one.py", "pkg/travel_two.py"}
    for path, entry in seen.items():
        content = (project / path).read_bytes()
        assert entry["sha256"] == hashlib.sha256(content).hexdigest()
        assert entry["exists_here"] is False
    assert not (ROOT / "pkg" / "travel_one.py").exists()
    assert output.extras["cwd"] == str(ROOT)
