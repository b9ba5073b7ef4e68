"""`submit --timeout` is the whole task's deadline, with real processes: the CLI returns
at that deadline with timed_out, and the task is finished in the broker too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from tests.conftest import ROOT, Cluster


def test_cli_submit_timeout_ends_the_task_at_its_deadline(cluster: Cluster) -> None:
    # Given a broker with retries, and an agent far slower than the task's timeout
    broker = cluster.broker()  # the default: 3 retries
    cluster.agent(broker.url, echo_delay_s="30")
    env = {**os.environ, "ORCH_HOME": str(cluster.tmp_path / "home"),
           "PYTHONPATH": str(ROOT)}
    # When the CLI submits with --timeout 2 (and retries)
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "cli", "--broker", broker.url, "submit",
                           "slow", "-c", "echo", "--timeout", "2", "--retries", "3",
                           "--id", "slow-1", "--json"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    took = time.monotonic() - started
    # Then it returns at about 2 s (plus the CLI's own start-up), timed_out, one attempt
    document = json.loads(proc.stdout)
    assert document["status"] == "timed_out", proc.stdout + proc.stderr
    assert 2.0 <= took < 4.5, took
    # And the broker has finished the task too: it runs nowhere any more
    client = cluster.client(broker.url)
    [task] = [t for t in client.tasks() if t.get("task_id", t.get("id")) == "slow-1"]
    assert task.get("status", task.get("state")) == "timed_out", task
