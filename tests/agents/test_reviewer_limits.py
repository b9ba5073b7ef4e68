"""The reviewer's limits, on a real broker and real agent and worker processes.

A file that runs past the per-file time limit and one that exhausts the memory limit
are reported as such, between files that are analysed normally: the run completes. A
cancelled audit kills the worker doing it (its whole process group) within a second,
and a fresh worker serves the next task.
"""

from __future__ import annotations

import os
import select
import time
from pathlib import Path

from tests.agents.test_reviewer import REVIEWER
from tests.conftest import Cluster

#: A file bandit needs several seconds for (15,000 shell calls, each a finding).
SLOW_SOURCE = "import subprocess\n\n\ndef run(cmd):\n" + \
    "    subprocess.call(cmd, shell=True)\n" * 15_000
#: A file whose syntax tree alone is far over 250 MiB (1.5 million list elements).
HOG_SOURCE = "DATA = [" + "0," * 1_500_000 + "]\n"
#: How soon a cancelled audit's worker must be dead.
KILL_DEADLINE_S = 1.0
RESULT_TIMEOUT_S = 60.0


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name, or None when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return raw.rsplit(")", 1)[1].split()


def _children(pid: int) -> set[int]:
    """Live (not zombie) child processes of ``pid``."""
    out = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(int(entry))
            if fields is not None and fields[1] == str(pid) and fields[0] != "Z":
                out.add(int(entry))
    return out


def _group_members(pgid: int) -> set[int]:
    """Processes (zombies included) whose process group is ``pgid``."""
    out = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(int(entry))
            if fields is not None and fields[2] == str(pgid):
                out.add(int(entry))
    return out


def test_time_and_memory_limits_are_reported_and_the_run_completes(
        cluster: Cluster) -> None:
    # Given a reviewer whose files may take 2 s and whose workers may use 250 MiB
    url = cluster.broker().url
    cluster.agent(url, REVIEWER, ORCH_ANALYSIS_TIMEOUT_S="2", ORCH_ANALYSIS_MEMORY_MB="250")
    client = cluster.client(url)
    files = [{"path": "a.py", "content": "x = 1\n"},
             {"path": "slow.py", "content": SLOW_SOURCE},
             {"path": "b.py", "content": "value = eval(input())\n"},
             {"path": "hog.py", "content": HOG_SOURCE},
             {"path": "c.py", "content": "import pickle\npickle.loads(b'')\n"}]
    # When the five files are audited as one task (one batch on one worker)
    result = client.submit(capabilities=["security_audit"], data={"files": files}).result(
        RESULT_TIMEOUT_S)
    # Then the slow file hit the time limit, the big one the memory limit, and the
    # files after each were still analysed, by fresh workers
    assert result.ok, result.error
    statuses = {f["path"]: f["status"] for f in result.data["files"]}
    assert statuses == {"a.py": "analyzed", "slow.py": "time_limit", "b.py": "analyzed",
                        "hog.py": "memory_limit", "c.py": "analyzed"}
    rules = {(f["path"], f["rule"]) for f in result.data["findings"]}
    assert {("b.py", "B307"), ("c.py", "B301"), ("slow.py", "A103"),
            ("hog.py", "A104")} <= rules
    assert not any(p == "slow.py" and r.startswith("B") for p, r in rules)


def test_a_cancelled_audit_leaves_no_tool_process_behind(cluster: Cluster) -> None:
    # Given a reviewer with generous limits, and a watch on its progress events
    url = cluster.broker().url
    agent = cluster.agent(url, REVIEWER, ORCH_ANALYSIS_TIMEOUT_S="120")
    client = cluster.client(url)
    progress = client.subscribe("reviewer.progress")
    # When an audit of a slow file starts on a worker
    slow = SLOW_SOURCE + "    subprocess.call(cmd, shell=True)\n" * 25_000
    handle = client.submit(capabilities=["security_audit"],
                           data={"files": [{"path": "slow.py", "content": slow}]})
    event = progress.next(timeout=RESULT_TIMEOUT_S)
    worker = int(event.data["worker"])
    assert event.data["task"] == handle.id
    assert worker in _children(agent.pid)
    pidfd = os.pidfd_open(worker)
    try:
        # and is cancelled
        cancelled_at = time.monotonic()
        handle.cancel()
        # Then the worker is dead within a second of the cancel
        readable, _, _ = select.select([pidfd], [], [], KILL_DEADLINE_S)
        assert readable, f"worker {worker} still alive {KILL_DEADLINE_S} s after the cancel"
        assert time.monotonic() - cancelled_at <= KILL_DEADLINE_S
    finally:
        os.close(pidfd)
    assert handle.result(RESULT_TIMEOUT_S).status == "cancelled"
    # and a fresh worker serves the next audit
    result = client.submit(capabilities=["security_audit"],
                           data={"files": [{"path": "e.py", "content": "eval(input())\n"}]}
                           ).result(RESULT_TIMEOUT_S)
    assert result.ok and [f["rule"] for f in result.data["findings"]] == ["B307"]
    fresh = int(progress.next(timeout=RESULT_TIMEOUT_S).data["worker"])
    assert fresh != worker and _children(agent.pid) == {fresh}
    # and nothing of the killed worker's process group is left, not even a zombie
    assert _group_members(worker) == set()
