"""Routing with real processes: capabilities, spreading, least_loaded, credit, names.

Every test starts its own broker and agents (the ``cluster`` fixture) on 127.0.0.1.
EchoAgent puts its ``agent_id`` and its peak concurrency (``peak``) in every result.
"""

from __future__ import annotations

from collections import Counter

import pytest

from agent_sdk import Result, SyncClient
from tests.conftest import Cluster
from tests.support import agents_by_name, in_flight_of, wait_status

RESULT_TIMEOUT_S = 30.0


def results_of(handles: list, timeout: float = RESULT_TIMEOUT_S) -> list[Result]:
    return [h.result(timeout=timeout) for h in handles]


def agent_ids(client: SyncClient) -> dict[str, str]:
    """Agent name -> agent id, as the broker knows them."""
    return {name: a["id"] for name, a in agents_by_name(client.status()).items()}


def test_capability_routing_sends_tasks_only_to_capable_agent(cluster: Cluster) -> None:
    # Given an agent offering x and another offering y
    broker = cluster.broker()
    cluster.agent(broker.url, agent_name="ax", agent_caps="x")
    cluster.agent(broker.url, agent_name="ay", agent_caps="y")
    client = cluster.client(broker.url)
    client.wait_for_agents(2, timeout=10)
    ids = agent_ids(client)
    # When 60 tasks needing x and 20 needing y are submitted at once
    x_handles = [client.submit(capabilities=["x"], data=i, timeout=20) for i in range(60)]
    y_handles = [client.submit(capabilities="y", data=i, timeout=20) for i in range(20)]
    x_results, y_results = results_of(x_handles), results_of(y_handles)
    # Then every x task ran on the x agent and every y task on the y agent
    assert all(r.ok for r in x_results + y_results)
    assert {r.agent_id for r in x_results} == {ids["ax"]}
    assert {r.agent for r in x_results} == {"ax"}
    assert {r.agent_id for r in y_results} == {ids["ay"]}
    assert [r.data for r in x_results] == list(range(60))


def test_task_needing_two_capabilities_goes_to_agent_having_both(cluster: Cluster) -> None:
    # Given specialists for x and y and a generalist with both
    broker = cluster.broker()
    cluster.agent(broker.url, agent_name="ax", agent_caps="x")
    cluster.agent(broker.url, agent_name="ay", agent_caps="y")
    cluster.agent(broker.url, agent_name="axy", agent_caps="x,y")
    client = cluster.client(broker.url)
    client.wait_for_agents(3, timeout=10)
    ids = agent_ids(client)
    # When tasks need both x and y
    results = results_of([client.submit(capabilities=["x", "y"], data=i, timeout=20)
                          for i in range(30)])
    # Then only the generalist runs them
    assert all(r.ok for r in results)
    assert {r.agent_id for r in results} == {ids["axy"]}


@pytest.mark.parametrize("policy", ["capability", "least_loaded", "round_robin"])
def test_equal_agents_share_a_burst(cluster: Cluster, policy: str) -> None:
    # Given two equal echo agents (same capability, credit and task time: 10 ms a task, so
    # that the split follows credit, not which process the OS schedules more)
    broker = cluster.broker("--policy", policy)
    cluster.agent(broker.url, agent_name="e1", echo_delay_s="0.01")
    cluster.agent(broker.url, agent_name="e2", echo_delay_s="0.01")
    client = cluster.client(broker.url)
    client.wait_for_agents(2, capability="echo", timeout=10)
    ids = agent_ids(client)
    # When 1,000 tasks are submitted at once
    handles = [client.submit(capabilities=["echo"], data=i, timeout=60) for i in range(1000)]
    results = results_of(handles)
    # Then all succeed, and each agent ran between 35% and 65% of them
    assert all(r.ok for r in results)
    counts = Counter(r.agent_id for r in results)
    assert set(counts) == {ids["e1"], ids["e2"]}
    for agent_id, count in counts.items():
        assert 350 <= count <= 650, f"{agent_id} ran {count} of 1000: {dict(counts)}"
    # And the broker's books agree with what the client saw (not per agent: an agent that
    # registers again, e.g. after a scheduling stall on a busy machine, starts from 0)
    status = client.status()
    assert status["broker"]["policy"] == policy
    assert status["tasks"]["succeeded"] == 1000


def test_least_loaded_sends_new_task_to_idle_agent(cluster: Cluster) -> None:
    # Given a least_loaded broker, a slow agent "busy" (4 slots) and a fast agent "idle"
    broker = cluster.broker("--policy", "least_loaded")
    cluster.agent(broker.url, agent_name="busy", agent_max="4", echo_delay_s="60")
    cluster.agent(broker.url, agent_name="idle", agent_max="4")
    client = cluster.client(broker.url)
    client.wait_for_agents(2, capability="echo", timeout=10)
    ids = agent_ids(client)
    # And "busy" holds 2 long tasks sent to it by name (load 0.5, credit left: 2)
    for i in range(2):
        client.submit(capabilities=["echo"], agent="busy", data=f"block-{i}", timeout=90)
    wait_status(client, lambda s: in_flight_of(s, "busy") == 2, what="busy holds 2 tasks")
    # When new tasks arrive, one at a time, that either agent could take
    results = []
    for i in range(10):
        results.append(client.submit(capabilities=["echo"], data=i, timeout=20)
                       .result(timeout=RESULT_TIMEOUT_S))
    # Then every one goes to the idle agent, although "busy" still had credit
    assert all(r.ok for r in results)
    assert {r.agent_id for r in results} == {ids["idle"]}
    status = client.status()
    assert in_flight_of(status, "busy") == 2
    assert agents_by_name(status)["busy"]["done"] == 0


def test_least_loaded_compares_load_relative_to_credit(cluster: Cluster) -> None:
    # Given a least_loaded broker, agent "big" (max 10) with 2 tasks running (load 0.2)
    # and agent "small" (max 2) with 1 task running (load 0.5)
    broker = cluster.broker("--policy", "least_loaded")
    cluster.agent(broker.url, agent_name="big", agent_max="10", echo_delay_s="60")
    cluster.agent(broker.url, agent_name="small", agent_max="2", echo_delay_s="60")
    client = cluster.client(broker.url)
    client.wait_for_agents(2, capability="echo", timeout=10)
    for name, count in (("big", 2), ("small", 1)):
        for i in range(count):
            client.submit(capabilities=["echo"], agent=name, data=i, timeout=90)
    wait_status(client, lambda s: in_flight_of(s, "big") == 2 and in_flight_of(s, "small") == 1,
                what="big holds 2 and small holds 1")
    # When one more task arrives that either could take
    client.submit(capabilities=["echo"], data="next", timeout=90)
    # Then it goes to "big", the one with the lower in_flight / max_concurrent
    status = wait_status(client, lambda s: s["tasks"]["pending"] == 0
                         and in_flight_of(s, "big") + in_flight_of(s, "small") == 4,
                         what="the new task dispatched")
    assert in_flight_of(status, "big") == 3
    assert in_flight_of(status, "small") == 1


def test_credit_limits_concurrency_on_agent(cluster: Cluster) -> None:
    # Given an agent that runs at most 2 tasks at once, each taking 50 ms
    broker = cluster.broker()
    cluster.agent(broker.url, agent_name="narrow", agent_max="2", echo_delay_s="0.05")
    client = cluster.client(broker.url)
    client.wait_for_agents(1, timeout=10)
    # When 20 tasks are submitted at once
    results = results_of([client.submit(capabilities=["echo"], data=i, timeout=30)
                          for i in range(20)])
    # Then all succeed, it never had 3 at once, and it did run 2 at once
    assert all(r.ok for r in results)
    peaks = [r.peak for r in results]
    assert max(peaks) == 2, peaks
    status = client.status()
    assert status["tasks"]["succeeded"] == 20
    assert in_flight_of(status, "narrow") == 0


def test_agent_name_routing_goes_only_to_named_agent(cluster: Cluster) -> None:
    # Given two agents with the same capability, "alpha" and "beta"
    broker = cluster.broker()
    cluster.agent(broker.url, agent_name="alpha")
    cluster.agent(broker.url, agent_name="beta")
    client = cluster.client(broker.url)
    client.wait_for_agents(2, capability="echo", timeout=10)
    ids = agent_ids(client)
    # When 50 tasks name "beta" and 50 name "alpha" by its id, submitted interleaved
    beta = []
    alpha = []
    for i in range(50):
        beta.append(client.submit(capabilities=["echo"], agent="beta", data=i, timeout=20))
        alpha.append(client.submit(agent=ids["alpha"], data=i, timeout=20))
    beta_results, alpha_results = results_of(beta), results_of(alpha)
    # Then each went only to the agent it named
    assert all(r.ok for r in beta_results + alpha_results)
    assert {r.agent_id for r in beta_results} == {ids["beta"]}
    assert {r.agent for r in beta_results} == {"beta"}
    assert {r.agent_id for r in alpha_results} == {ids["alpha"]}


def test_agent_name_routing_waits_for_named_agent_even_if_others_idle(cluster: Cluster) -> None:
    # Given only agent "alpha"
    broker = cluster.broker()
    cluster.agent(broker.url, agent_name="alpha")
    client = cluster.client(broker.url)
    client.wait_for_agents(1, timeout=10)
    # When a task names "gamma", which is not there, with a short timeout
    result = client.submit(capabilities=["echo"], agent="gamma", data=1, timeout=0.5).result(
        timeout=RESULT_TIMEOUT_S)
    # Then alpha does not take it: it fails with no_agent
    assert result.status == "failed"
    assert result.error is not None and result.error.code == "no_agent"
    assert agents_by_name(client.status())["alpha"]["done"] == 0
