"""Consensus end to end: five voter processes with known answers and confidences.

Every voter offers ``judge`` and ``jury``; the fifth never finishes a ``jury`` task (it
announces it on the bus, and the test kills it there).
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent_sdk import BusMessage, Client
from tests.workflows.support import WAIT_S, exec_lines, module_cluster, run, start_agents
from workflows import ConsensusWorkflow, Step

#: (decision, confidence) of voters 1 to 5.
BALLOTS = [("yes", 0.9), ("yes", 0.8), ("yes", 0.7), ("no", 0.9), ("no", 0.95)]


@dataclass
class Env:
    url: str
    exec_dir: Path
    voters: list[tuple[subprocess.Popen[bytes], str]]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    with module_cluster(tmp_path_factory, "consensus") as (cluster, url, exec_dir):
        started = start_agents(cluster, url, *[
            {"EXEC_DIR": exec_dir, "AGENT_NAME": "voter", "AGENT_CAPS": "judge,jury",
             "AGENT_OP": "vote", "VOTE": vote, "VOTE_CONFIDENCE": confidence,
             **({"HANG_ON": "jury"} if index == 4 else {})}
            for index, (vote, confidence) in enumerate(BALLOTS)])
        yield Env(url, exec_dir, [(proc, info["agent_id"]) for proc, info in started])


def test_consensus_weighs_the_votes_of_distinct_instances(env: Env) -> None:
    # Given five voters: yes 0.9, 0.8, 0.7 and no 0.9, 0.95
    question = {"question": "ship it?"}

    async def scenario() -> tuple[Any, Any]:
        async with Client(env.url) as client:
            agreed = await ConsensusWorkflow([Step(capability="judge")] * 5,
                                             threshold=0.55).execute(question, client=client)
            split = await ConsensusWorkflow(Step(capability="judge"), threshold=0.6,
                                            voters=5).execute(question, client=client)
            return agreed, split

    # When they vote, at thresholds 0.55 and 0.6
    agreed, split = run(scenario())

    # Then "yes" wins with 2.4 of 4.25, a consensus at 0.55 but not at 0.6
    assert agreed.decision == "yes" and split.decision == "yes"
    assert agreed.confidence == pytest.approx(2.4 / 4.25)
    assert agreed.consensus is True and split.consensus is False
    assert agreed.missing == []
    # and each vote came from a different instance, the one its copy was pinned to
    voter_ids = sorted(agent_id for _, agent_id in env.voters)
    for result in (agreed, split):
        assert sorted(v["agent"] for v in result.votes) == voter_ids
        ran_on = {line["task"]: line["agent"]
                  for line in exec_lines(env.exec_dir, result.task_id) if line["event"] == "start"}
        assert ran_on == {v["task_id"]: v["agent"] for v in result.votes}


def test_a_voter_that_dies_is_left_out_and_reported(env: Env) -> None:
    # Given five voters of which the fifth hangs on this question
    victim_proc, victim_id = env.voters[4]

    async def scenario() -> Any:
        async with Client(env.url) as client:
            hanging: asyncio.Queue[BusMessage] = asyncio.Queue()
            await client.subscribe("test.hanging", hanging.put_nowait)
            vote = asyncio.create_task(ConsensusWorkflow(
                Step(capability="jury"), voters=5, threshold=0.5).execute("ship?", client=client))
            # When the fifth voter is killed in the middle of its vote
            message = await asyncio.wait_for(hanging.get(), WAIT_S)
            assert message.data["agent_id"] == victim_id
            victim_proc.kill()
            return await asyncio.wait_for(vote, WAIT_S)

    result = run(scenario())

    # Then the other four decide, and the dead one is reported with why
    assert result.decision == "yes"
    assert result.confidence == pytest.approx(2.4 / 3.3)
    assert sorted(v["agent"] for v in result.votes) == sorted(a for _, a in env.voters[:4])
    assert [m["agent"] for m in result.missing] == [victim_id]
    assert "agent left" in result.missing[0]["reason"]
