"""The README's Python snippets run as written, against a real broker.

The fenced ``python`` blocks are read from README.md: the agent file, the client script
and the state agent are written to files and run as a newcomer would run them (only the
broker's address is replaced by the test broker's); the messaging example is executed
for its definitions (it needs agents the README does not show).
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, Cluster, kill, read_json_line
from tests.support import wait_status

README = ROOT / "README.md"
#: The address the snippets name.
README_URL = "tcp://127.0.0.1:5555"


def python_blocks() -> list[str]:
    """The README's fenced ``python`` blocks, in order."""
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), re.S | re.M)


def block(marker: str) -> str:
    """The one python block that contains ``marker``."""
    found = [code for code in python_blocks() if marker in code]
    assert len(found) == 1, f"expected one python block with {marker!r} in README.md"
    return found[0]


def write_snippet(tmp_path: Path, marker: str, url: str) -> Path:
    """Write the block that starts with ``# <marker>`` to ``tmp_path/<marker>``, aimed at
    ``url``."""
    code = block(f"# {marker}\n")
    assert code.startswith(f"# {marker}\n")
    path = tmp_path / marker
    path.write_text(code.replace(README_URL, url))
    return path


def env(tmp_path: Path) -> dict[str, str]:
    """The environment of a snippet: the project importable, the snippets' dir too."""
    return {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}


def start(cluster: Cluster, tmp_path: Path, *args: str) -> subprocess.Popen[bytes]:
    """Run ``python ARGS`` in ``tmp_path``; killed at teardown."""
    proc = subprocess.Popen([sys.executable, *args], cwd=tmp_path, env=env(tmp_path),
                            stdout=subprocess.PIPE)
    cluster.procs.append(proc)
    return proc


def wait_for_agent(cluster: Cluster, url: str, name: str, timeout: float = 20.0) -> None:
    """Return once an agent named ``name`` is registered with the broker at ``url`` (each
    poll is a STATUS round trip, not a sleep)."""
    wait_status(cluster.client(url),
                lambda status: any(agent.get("name") == name for agent in status["agents"]),
                timeout, f"agent {name!r} registered")


def test_the_agent_file_and_the_client_script(cluster: Cluster, tmp_path: Path) -> None:
    url = cluster.broker().url
    agent = write_snippet(tmp_path, "review_agent.py", url)
    script = write_snippet(tmp_path, "submit_review.py", url)
    start(cluster, tmp_path, agent.name)
    wait_for_agent(cluster, url, "reviewer")
    run = subprocess.run([sys.executable, script.name], cwd=tmp_path, env=env(tmp_path),
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    # What the README says it prints.
    assert run.stdout == "succeeded ['eval(x)'] False\n"
    assert "prints `succeeded ['eval(x)']\nFalse`" in README.read_text()


def test_the_state_agent(cluster: Cluster, tmp_path: Path) -> None:
    url = cluster.broker().url
    write_snippet(tmp_path, "state_agent.py", url)
    proc = start(cluster, tmp_path, "-m", "agent_sdk", "run", "state_agent:ReviewAgent",
                 "--broker", url)
    read_json_line(proc)  # registered
    client = cluster.client(url)
    for reviewed in (1, 2):
        result = client.submit(capabilities=["code_review"],
                               data={"repo": "demo", "sha": f"sha{reviewed}"}).result(30)
        assert result.ok, result.error
        assert result.data == {"rules": 0, "reviewed": reviewed}
    kill(proc)


def test_the_messaging_example_defines_its_agent() -> None:
    namespace: dict[str, object] = {"__name__": "readme_messaging"}
    exec(compile(block("class Planner(BaseAgent)"), "README.md", "exec"), namespace)
    planner = namespace["Planner"]()  # type: ignore[operator]
    assert planner.capabilities == ("plan",)


def test_the_health_agent_runs_and_reports_its_health(cluster: Cluster,
                                                       tmp_path: Path) -> None:
    url = cluster.broker().url
    write_snippet(tmp_path, "health_agent.py", url)
    proc = start(cluster, tmp_path, "-m", "agent_sdk", "run", "health_agent:Summarizer",
                 "--broker", url)
    read_json_line(proc)  # registered: on_start loaded the model
    client = cluster.client(url)
    status = wait_status(client, lambda s: any(a["name"] == "summarizer"
                                               and a["health"] == "healthy"
                                               for a in s["agents"]), what="healthy")
    assert client.submit(capabilities=["summarize"], data="a text").result(30).ok
    # Before on_start, the hook reports the problem the README names.
    namespace: dict[str, object] = {"__name__": "readme_health"}
    exec(compile(block("# health_agent.py"), "README.md", "exec"), namespace)
    verdict = asyncio.run(namespace["Summarizer"]().ping())  # type: ignore[operator]
    assert verdict == {"ok": False, "detail": "the model is not loaded"}
    assert status["agents"]
    kill(proc)


@pytest.mark.parametrize("code", python_blocks(), ids=lambda code: code.split("\n")[0][:40])
def test_every_python_block_compiles(code: str) -> None:
    compile(code, "README.md", "exec")
