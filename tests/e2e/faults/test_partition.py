"""A network partition between an agent and the broker, made by a loopback TCP proxy with
a blackhole switch (tests/e2e/faults/proxy.py), in the middle of a stream of tasks."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Cluster
from tests.e2e.faults.checker import WireTap, check, read_log
from tests.e2e.faults.proxy import BlackholeProxy
from tests.e2e.faults.support import agents_by_name, collect, wait_status, wait_until

AGENTS = "tests.e2e.faults.agents"


@pytest.fixture
def proxy_for(cluster: Cluster) -> Iterator[list[BlackholeProxy]]:
    """Proxies a test starts (``proxy_for.append(BlackholeProxy(...))``), closed at the end."""
    proxies: list[BlackholeProxy] = []
    try:
        yield proxies
    finally:
        for proxy in proxies:
            proxy.close()


def test_partitioned_only_agent_completes_every_task_once_after_the_link_returns(
        cluster: Cluster, proxy_for: list[BlackholeProxy], tmp_path: Path) -> None:
    # Given the only agent, connected to the broker through a proxy
    broker = cluster.broker()
    proxy = BlackholeProxy("127.0.0.1", broker.port)
    proxy_for.append(proxy)
    log = tmp_path / "far.log"
    cluster.agent(proxy.url, f"{AGENTS}:CountingAgent", agent_name="far", agent_max="8",
                  echo_delay_s="0.05", exec_log=str(log))
    client = cluster.client(broker.url)
    tap = WireTap(client.client)
    # And a stream of tasks, some done before the partition, some running when it starts
    before = [client.submit(capabilities=["echo"], data=i, task_id=f"before-{i}", timeout=60)
              for i in range(40)]
    collect(before[:10], broker)
    # When the link is blackholed (no FIN, no RST: silence both ways)
    proxy.blackhole()
    during = [client.submit(capabilities=["echo"], data=i, task_id=f"during-{i}", timeout=60)
              for i in range(40)]
    # Then the broker declares the agent dead and keeps its tasks for later
    wait_status(client, lambda s: not s["agents"], what="the partitioned agent removed")
    assert not any(h.done() for h in during)
    # When the link returns
    proxy.heal()
    after = [client.submit(capabilities=["echo"], data=i, task_id=f"after-{i}", timeout=60)
             for i in range(40)]
    # Then the agent comes back by itself and every task completes, once for the client
    handles = before + during + after
    results = collect(handles, broker, timeout=45, client=client)
    assert all(r.ok and r.agent == "far" for r in results), results
    assert [r.data for r in results] == list(range(40)) * 3
    status = wait_status(client, lambda s: s["tasks"]["succeeded"] == 120, what="120 succeeded")
    assert list(agents_by_name(status)) == ["far"]
    report = check([h.id for h in handles], results, [log], deliveries=tap.snapshot(),
                   handle_ids=[h.id for h in handles])
    report.assert_valid("partition, single agent")
    print(f"[partition] proxy: {proxy.connections} connection(s), {proxy.resets} reset at "
          f"heal, {proxy.discarded_bytes} bytes discarded; broker: redispatched "
          f"{status['tasks']['redispatched']}, duplicate results "
          f"{status['tasks']['duplicate_results']}; re-executed {len(report.re_executed)}")
    assert proxy.discarded_bytes > 0 and proxy.resets >= 1


def test_partitioned_agent_tasks_finish_elsewhere_and_its_late_results_are_dropped(
        cluster: Cluster, proxy_for: list[BlackholeProxy], tmp_path: Path) -> None:
    # Given a far agent behind a proxy, running 4 tasks of 1.5 s
    broker = cluster.broker()
    proxy = BlackholeProxy("127.0.0.1", broker.port)
    proxy_for.append(proxy)
    far_log, near_log = tmp_path / "far.log", tmp_path / "near.log"
    far_done = tmp_path / "far-done.log"
    cluster.agent(proxy.url, f"{AGENTS}:CountingAgent", agent_name="far", agent_max="4",
                  echo_delay_s="1.5", exec_log=str(far_log), done_log=str(far_done))
    client = cluster.client(broker.url)
    tap = WireTap(client.client)
    held = [client.submit(capabilities=["echo"], data=i, task_id=f"held-{i}", timeout=60)
            for i in range(4)]
    wait_status(client, lambda s: s["tasks"]["running"] == 4, what="the far agent runs 4")
    # When the far agent is partitioned away while it runs them (it finishes them anyway,
    # and cannot report), and a near agent starts
    proxy.blackhole()
    cluster.agent(broker.url, f"{AGENTS}:CountingAgent", agent_name="near", agent_max="4",
                  echo_delay_s="0.05", exec_log=str(near_log))
    # And a stream of tasks goes on meanwhile
    stream = [client.submit(capabilities=["echo"], data=i, task_id=f"stream-{i}", timeout=60)
              for i in range(30)]
    # Then the held tasks run again on the near agent and complete during the partition
    results = collect(held + stream, broker, client=client)
    assert proxy.blackholed
    assert all(r.ok and r.agent == "near" for r in results), results
    assert [r.attempts for r in results[:4]] == [2] * 4
    wait_until(client, lambda: len(read_log(far_done)) == 4, what="the far agent finished")
    # When the link returns
    proxy.heal()
    # Then the far agent registers again, and its 4 late results are dropped as duplicates
    status = wait_status(client, lambda s: "far" in agents_by_name(s)
                         and s["tasks"]["duplicate_results"] >= 4,
                         what="the far agent back and its late results dropped")
    # And it takes work again; the client saw each task exactly once
    late = [client.submit(capabilities=["echo"], agent="far", data=i, task_id=f"late-{i}",
                          timeout=30, delay_s=0) for i in range(5)]
    late_results = collect(late, broker, client=client)
    assert all(r.ok and r.agent == "far" for r in late_results)
    handles = held + stream + late
    report = check([h.id for h in handles], results + late_results, [far_log, near_log],
                   deliveries=tap.snapshot(), handle_ids=[h.id for h in handles])
    report.assert_valid("partition, two agents")
    assert report.re_executed == {h.id for h in held}
    assert not report.redelivered
    print(f"[partition] duplicate results dropped by the broker: "
          f"{status['tasks']['duplicate_results']}")
