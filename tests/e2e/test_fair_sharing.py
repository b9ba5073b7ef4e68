"""Fair sharing between clients, with real processes: a client with 10,000 queued tasks
and another submitting one task at a time; the second's tasks wait for a free slot, not
for the backlog (which would take over 8 minutes here)."""

from __future__ import annotations

from tests.conftest import Cluster

#: each task takes this long on the one agent, which runs two at a time
TASK_S = 0.1
BACKLOG = 10_000


def test_a_backlog_does_not_starve_another_clients_single_tasks(cluster: Cluster) -> None:
    broker = cluster.broker()
    cluster.agent(broker.url, echo_delay_s=str(TASK_S), agent_max="2")
    bulk = cluster.client(broker.url)
    bulk.wait_for_agents(1)
    handles = [bulk.submit(capabilities=["echo"], data=i, timeout=3600)
               for i in range(BACKLOG)]
    handles[-1].wait_accepted(timeout=60)  # the whole backlog is in the broker
    interactive = cluster.client(broker.url)
    waits = []
    for n in range(5):
        result = interactive.submit(capabilities=["echo"], data=f"mine-{n}",
                                    timeout=60).result(timeout=60)
        assert result.ok and result.data == f"mine-{n}"
        waits.append(result.queued_ms)
    # Each waited for one of the two slots to free (a task takes TASK_S), never behind
    # the 10,000 (4,999 tasks per slot ahead of it); a wide margin for a loaded machine.
    assert all(wait is not None and wait < 20 * TASK_S * 1000 for wait in waits), waits
    assert bulk.status()["queue"]["pending"] > BACKLOG - 200
