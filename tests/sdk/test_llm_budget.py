"""Token budgets shared by agents, and usage published for ``status``: two real agent
processes on a real broker and state service, calling the fake LLM server."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from agent_sdk import Change, StateClient, SyncStateClient
from agent_sdk.llm import LLM, LLMConfig, aread_usage, read_usage
from agent_sdk.loop import run
from tests.conftest import BrokerProcess, Cluster, read_json_line
from tests.fakes.llm_server import FakeLLMServer, TextReply

AGENT = "tests.fakes.llm_agents:BudgetedLLMAgent"
#: Deadline of every task result.
RESULT_S = 20.0
#: Tokens each call costs: the fake's usage counts.
PROMPT, COMPLETION = 20, 10
CALL = PROMPT + COMPLETION


@pytest.fixture
def server() -> Iterator[FakeLLMServer]:
    with FakeLLMServer(default=TextReply("fine", PROMPT, COMPLETION)) as fake:
        yield fake


def start_two_agents(cluster: Cluster, broker: BrokerProcess,
                     server: FakeLLMServer) -> list[dict[str, Any]]:
    """Agents ``llm-a`` and ``llm-b`` (each its own capability), started together;
    returns their registration lines."""
    procs: list[subprocess.Popen[bytes]] = [
        cluster.agent(broker.url, AGENT, wait=False, agent_name=name,
                      orch_llm_base_url=server.url, orch_llm_model="fake")
        for name in ("llm-a", "llm-b")]
    return [read_json_line(proc) for proc in procs]


def state_client(broker: BrokerProcess) -> SyncStateClient:
    """A blocking client of the state service the broker runs."""
    url = str(json.loads((broker.data_dir / "broker.json").read_bytes())["state"])
    client = SyncStateClient(url)
    client.connect(RESULT_S)
    return client


def test_a_spent_budget_shared_by_two_agents_stops_both(cluster: Cluster,
                                                        server: FakeLLMServer) -> None:
    # Given a broker with its state service, and two LLM agents on the fake server
    broker = cluster.broker()
    start_two_agents(cluster, broker, server)
    client = cluster.client(broker.url)
    budget = {"scope": "run-42", "max_tokens": 100}

    # When tasks of one run alternate between the agents, each call costing 30 tokens
    spent = []
    for i, agent in enumerate(["llm-a", "llm-b", "llm-a", "llm-b"]):
        result = client.submit(capabilities=[agent], data={"prompt": f"step {i}"},
                               llm_budget=budget).result(RESULT_S)
        assert result.ok, result
        spent.append(result.data["spent"])

    # Then both charged the one shared total: 30, 60, 90, then 120 (the fourth call
    # started at 90 < 100, and a call under way finishes)
    assert spent == [CALL, 2 * CALL, 3 * CALL, 4 * CALL]

    # When each agent asks once more under the spent budget
    refused = client.submit(capabilities=["llm-b"], data={"prompt": "more"},
                            llm_budget=budget).result(RESULT_S)
    raised = client.submit(capabilities=["llm-a"], data={"prompt": "more", "on_error": "raise"},
                           llm_budget=budget).result(RESULT_S)

    # Then both fail at once, not retried: the returned one with the budget's own code,
    # the raised one as a permanent agent error naming it
    assert not refused.ok and refused.error is not None
    assert refused.error.code == "budget_exceeded", refused.error
    assert "token budget 'run-42' is spent: 120 of 100" in refused.error.message
    assert refused.attempts == 1
    assert not raised.ok and raised.error is not None
    assert raised.error.message.startswith("BudgetExceeded: token budget 'run-42'"), raised.error
    assert raised.attempts == 1
    # ...and no request reached the LLM after the budget was spent
    assert len(server.chat_requests) == 4

    # And a task with another budget (or none) is not affected
    other = client.submit(capabilities=["llm-a"], data={"prompt": "x"},
                          llm_budget={"scope": "run-43", "max_tokens": 100}).result(RESULT_S)
    assert other.ok and other.data["spent"] == CALL

    # And the state service holds the totals, per budget and per agent, for `status`
    state = state_client(broker)
    try:
        assert state.get("llm/budget/run-42") == {"spent": 4 * CALL, "calls": 4,
                                                  "max_tokens": 100}
        usage = read_usage(state)
    finally:
        state.close()
    by_agent = {record["agent"]: record for record in usage["agents"]}
    assert set(by_agent) == {"llm-a", "llm-b"}
    assert by_agent["llm-a"]["calls"] == 3 and by_agent["llm-b"]["calls"] == 2
    assert by_agent["llm-a"]["total_tokens"] == 3 * CALL
    assert by_agent["llm-a"]["prompt_tokens"] == 3 * PROMPT
    assert by_agent["llm-b"]["model"] == "fake" and by_agent["llm-b"]["endpoint"] == server.url
    assert usage["total"] == {"prompt_tokens": 5 * PROMPT, "completion_tokens": 5 * COMPLETION,
                              "total_tokens": 5 * CALL, "calls": 5}
    assert sorted((b["scope"], b["spent"]) for b in usage["budgets"]) == [
        ("run-42", 4 * CALL), ("run-43", CALL)]


def test_concurrent_calls_lose_no_tokens_from_the_shared_total(cluster: Cluster,
                                                               server: FakeLLMServer) -> None:
    # Given two agents and a budget of exactly 30 calls' worth
    broker = cluster.broker()
    start_two_agents(cluster, broker, server)
    client = cluster.client(broker.url)
    budget = {"scope": "burst", "max_tokens": 30 * CALL}

    # When 30 tasks are submitted at once, half to each agent (all in flight together:
    # every check sees less than the cap, and every charge races the others)
    handles = [client.submit(capabilities=["llm-a" if i % 2 else "llm-b"],
                             data={"prompt": f"p{i}"}, llm_budget=budget)
               for i in range(30)]
    results = [handle.result(RESULT_S) for handle in handles]

    # Then all succeed and each call is in the total exactly once (compare-and-set
    # loses no update between the two processes)
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    assert len(server.chat_requests) == 30
    state = state_client(broker)
    try:
        assert state.get("llm/budget/burst") == {"spent": 30 * CALL, "calls": 30,
                                                 "max_tokens": 30 * CALL}
    finally:
        state.close()

    # And the next call, to either agent, finds the budget spent
    for agent in ("llm-a", "llm-b"):
        refused = client.submit(capabilities=[agent], data={"prompt": "one more"},
                                llm_budget=budget).result(RESULT_S)
        assert refused.error is not None and refused.error.code == "budget_exceeded"
    assert len(server.chat_requests) == 30


@dataclass
class Owner:
    """What ``LLM.attach`` needs of an agent: a name, an id and a state client."""

    name: str
    agent_id: str
    state: StateClient


def test_usage_is_published_at_most_once_per_interval(cluster: Cluster,
                                                      server: FakeLLMServer) -> None:
    # Given an LLM attached to an agent identity, publishing at most every 0.5 s
    broker = cluster.broker()
    url = str(json.loads((broker.data_dir / "broker.json").read_bytes())["state"])
    interval_s = 0.5
    key = "llm/usage/writer/writer-1"

    async def scenario() -> tuple[list[Change], int]:
        seen: list[Change] = []
        done, marker = asyncio.Event(), asyncio.Event()

        def on_change(change: Change) -> None:
            seen.append(change)
            if change.key == "llm/marker":
                marker.set()
            if change.key == key and change.value["calls"] == 3:
                done.set()

        # (built before the state session: importing openai may take a while)
        llm = LLM(LLMConfig(server.url, "fake", usage_interval_s=interval_s))
        async with StateClient(url) as state:
            await state.watch("llm/", on_change)
            async with llm:
                llm.attach(Owner("writer", "writer-1", state))
                # When three calls finish in quick succession, and nobody publishes
                for _ in range(3):
                    await llm.chat([{"role": "user", "content": "hi"}])
                # Then the last total arrives by itself, after the interval
                await asyncio.wait_for(done.wait(), RESULT_S)
                writes_before_close = len(seen)
                assert await aread_usage(state) == {
                    "agents": [seen[-1].value], "budgets": [],
                    "total": {"prompt_tokens": 3 * PROMPT,
                              "completion_tokens": 3 * COMPLETION,
                              "total_tokens": 3 * CALL, "calls": 3}}
            # ...and closing the LLM writes the final totals once more
            await state.set("llm/marker", 1)  # a write after close's: every change is in
            await asyncio.wait_for(marker.wait(), RESULT_S)
        return seen, writes_before_close

    seen, writes_before_close = run(scenario())
    # ...in two writes: the first call's at once, the rest together an interval later
    assert writes_before_close == 2
    assert [change.key for change in seen] == [key, key, key, "llm/marker"]
    assert seen[0].value["calls"] == 1
    # (stamped when each write was made, so the watch's delivery time does not count)
    assert seen[1].value["updated_at"] - seen[0].value["updated_at"] >= interval_s * 0.95
    assert seen[2].value["calls"] == 3
    record = seen[1].value
    assert (record["agent"], record["agent_id"], record["total_tokens"]) == \
        ("writer", "writer-1", 3 * CALL)
