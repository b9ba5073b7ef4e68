"""Dead letters: tasks that used up their retries (failed, timed out) are listed with their
last error by ``SyncClient.tasks`` and by ``python -m cli tasks --failed --json``."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import Cluster
from tests.e2e.faults.checker import WireTap, check
from tests.e2e.faults.support import collect, run_cli

AGENTS = "tests.e2e.faults.agents"


def test_dead_letters_list_failed_and_timed_out_tasks_with_last_error(cluster: Cluster,
                                                                       tmp_path: Path) -> None:
    # Given an agent that always raises, one slower than the timeouts, and a healthy one
    broker = cluster.broker("--circuit-threshold", "1000")
    logs = [tmp_path / f"{n}.log" for n in ("doomed", "slow", "echo")]
    cluster.agent(broker.url, f"{AGENTS}:RaisingAgent", agent_name="doomed",
                  agent_caps="doomed", exec_log=str(logs[0]))
    cluster.agent(broker.url, f"{AGENTS}:CountingAgent", agent_name="slow", agent_caps="slow",
                  echo_delay_s="30", exec_log=str(logs[1]))
    cluster.agent(broker.url, f"{AGENTS}:CountingAgent", agent_name="echo", agent_caps="echo",
                  exec_log=str(logs[2]))
    client = cluster.client(broker.url)
    tap = WireTap(client.client)
    # When 3 tasks fail on every attempt (1 retry), 2 time out (no retry), 4 succeed
    failing = [client.submit(capabilities=["doomed"], data=i, task_id=f"dead-{i}", timeout=30,
                             retries=1) for i in range(3)]
    slow = [client.submit(capabilities=["slow"], data=i, task_id=f"late-{i}", timeout=0.5,
                          retries=0) for i in range(2)]
    fine = [client.submit(capabilities=["echo"], data=i, task_id=f"fine-{i}", timeout=30)
            for i in range(4)]
    handles = failing + slow + fine
    results = collect(handles, broker)
    assert [r.status for r in results] == ["failed"] * 3 + ["timed_out"] * 2 + ["succeeded"] * 4
    # Then the dead letters are exactly the failed and timed-out tasks, with last errors
    letters = client.tasks(["failed", "timed_out"])
    by_id = {t["task_id"]: t for t in letters}
    assert sorted(by_id) == sorted(h.id for h in failing + slow)
    for handle in failing:
        letter = by_id[handle.id]
        assert letter["status"] == "failed" and letter["attempts"] == 2, letter
        assert letter["error"]["code"] == "agent_error", letter
        assert f"boom on {handle.id} attempt 2" in letter["error"]["message"], letter
        assert letter["agent"] == "doomed" and letter["capabilities"] == ["doomed"]
        assert "retrying" in [e["event"] for e in letter["timeline"]], letter["timeline"]
    for handle in slow:
        letter = by_id[handle.id]
        assert letter["status"] == "timed_out" and letter["attempts"] == 1, letter
        assert letter["error"]["code"] == "timeout", letter
    # And filtering works per status; successes are not dead letters
    assert sorted(t["task_id"] for t in client.tasks(["timed_out"])) == ["late-0", "late-1"]
    assert {t["task_id"] for t in client.tasks(["succeeded"])} == {h.id for h in fine}
    # And the CLI lists the same dead letters as one JSON document
    done = run_cli("--broker", broker.url, "tasks", "--failed", "--json")
    assert done.returncode == 0, done.stderr
    listed = json.loads(done.stdout)
    assert sorted(t["task_id"] for t in listed) == sorted(by_id)
    assert {t["task_id"]: (t["status"], t["error"]["code"], t["attempts"]) for t in listed} == \
        {i: (t["status"], t["error"]["code"], t["attempts"]) for i, t in by_id.items()}
    report = check([h.id for h in handles], results, logs, deliveries=tap.snapshot(),
                   handle_ids=[h.id for h in handles])
    report.assert_valid("dead letters")
    assert not report.redelivered
