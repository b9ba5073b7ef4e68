"""The patterns end to end: a real broker, real agent processes, ``execute`` in the test.

One broker and one set of agents serve the whole module (starting them is most of a
test's time); each test runs its own workflow run and reads only its own run's
executions from the agents' logs (task ids carry the run id).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent_sdk import BusMessage, Client
from tests.workflows.agents import Alpha, Beta, Gamma
from tests.workflows.support import (
    module_cluster,
    exec_lines, peak_concurrency, run, start_agents, starts, WAIT_S,
)
from workflows import (
    MapReduceWorkflow, NoAgentFor, ReviewLoop, RunFailed, SequentialPipeline, Step,
)
from workflows.api import run_workflow
from workflows.ids import events_topic, task_id
from workflows.yamlform import load_workflow_text

#: Simulated work of each map item in the timing test (seconds).
ITEM_SLEEP_S = 0.05
#: The map-reduce may take at most this share of the items' serial time.
MAX_SHARE_OF_SERIAL = 0.35


@dataclass
class Env:
    """The module's broker URL and the directory the agents log executions to."""

    url: str
    exec_dir: Path


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    with module_cluster(tmp_path_factory, "patterns") as (cluster, url, exec_dir):
        logged = {"EXEC_DIR": exec_dir}
        start_agents(cluster, url, logged, spec="tests.workflows.agents:Alpha")
        start_agents(cluster, url, logged, spec="tests.workflows.agents:Beta")
        start_agents(cluster, url, logged, spec="tests.workflows.agents:Gamma")
        square = {**logged, "AGENT_NAME": "squarer", "AGENT_CAPS": "square",
                  "AGENT_OP": "square", "AGENT_MAX": 2}
        start_agents(
            cluster, url, square, square, square, square,
            {**logged, "AGENT_NAME": "summer", "AGENT_CAPS": "sum", "AGENT_OP": "sum"},
            {**logged, "AGENT_NAME": "writer", "AGENT_CAPS": "write", "AGENT_OP": "produce"},
            {**logged, "AGENT_NAME": "critic", "AGENT_CAPS": "critique", "AGENT_OP": "review",
             "APPROVE_AT": 2})
        yield Env(url, exec_dir)


def test_a_pipeline_passes_each_result_to_the_next_step_in_order(env: Env) -> None:
    # Given three agents that each append their name, named by class and by instance
    pipeline = SequentialPipeline([Alpha(), Beta, Gamma()])

    # When the pipeline runs
    async def scenario() -> tuple[object, str]:
        async with Client(env.url) as client:
            result = await pipeline.execute(["start"], client=client)
            return result.data, result.task_id

    data, run_id = run(scenario())

    # Then each step got the previous step's data, in order, each step run once
    assert data == ["start", "alpha", "beta", "gamma"]
    lines = exec_lines(env.exec_dir, run_id)
    assert starts(lines) == {task_id(run_id, f"pipeline/{name}"): 1
                             for name in ("alpha", "beta", "gamma")}
    ended = {line["task"].rsplit("/", 1)[1]: line["at"] for line in lines if line["event"] == "end"}
    started = {line["task"].rsplit("/", 1)[1]: line["at"] for line in lines
               if line["event"] == "start"}
    assert ended["alpha"] <= started["beta"] and ended["beta"] <= started["gamma"]


def test_a_map_reduce_runs_items_in_parallel_and_keeps_their_order(env: Env) -> None:
    # Given 100 items whose mapping takes 50 ms each, and 4 mapper processes
    items = [{"value": i} for i in range(100)]
    workflow = MapReduceWorkflow(max_parallel=8)

    # When they are mapped and reduced
    async def scenario() -> tuple[dict[str, object], str, float]:
        async with Client(env.url) as client:
            began = time.monotonic()
            result = await workflow.execute(
                items, mapper=Step(capability="square", params={"sleep_s": ITEM_SLEEP_S}),
                reducer=Step(capability="sum"), client=client)
            return result.data, result.task_id, time.monotonic() - began

    data, run_id, elapsed = run(scenario())

    # Then the reducer got the results in item order, and the run took a fraction of
    # the serial time, spread over the four processes, with each item run once
    assert data["values"] == [i * i for i in range(100)]
    assert data["sum"] == sum(i * i for i in range(100))
    assert elapsed <= MAX_SHARE_OF_SERIAL * len(items) * ITEM_SLEEP_S, elapsed
    lines = exec_lines(env.exec_dir, run_id)
    counts = starts(lines)
    assert len(counts) == 101 and set(counts.values()) == {1}
    mappers = {line["agent"] for line in lines if "/map[" in line["task"]}
    assert len(mappers) == 4


def test_a_map_reduce_with_a_few_failed_items_still_reduces_and_reports_them(env: Env) -> None:
    # Given 100 items of which 3 fail for good, and min_success 0.95
    bad = {7, 42, 99}
    items = [{"value": i, "fail": i in bad} for i in range(100)]
    workflow = MapReduceWorkflow(Step(capability="square"), Step(capability="sum"),
                                 max_parallel=16, min_success=0.95)

    # When it runs
    async def scenario() -> tuple[dict[str, object], list[dict[str, object]]]:
        async with Client(env.url) as client:
            result = await workflow.execute(items, client=client)
            return result.data, result.failed

    data, failed = run(scenario())

    # Then the reducer ran over the 97 others, in order, and heard which failed and why
    assert data["values"] == [i * i for i in range(100) if i not in bad]
    assert [f["index"] for f in failed] == sorted(bad)
    assert all(f"item {f['index']} is refused" in str(f["error"]) for f in failed)
    assert data["failed"] == failed


def test_a_map_reduce_below_min_success_fails_naming_the_failed_items(env: Env) -> None:
    # Given 10 items of which 2 fail, and min_success 0.9 (9 needed)
    items = [{"value": i, "fail": i in (3, 5)} for i in range(10)]
    workflow = MapReduceWorkflow(Step(capability="square"), Step(capability="sum"),
                                 min_success=0.9)

    # When it runs, then the run fails at the map-reduce, naming both items
    async def scenario() -> None:
        async with Client(env.url) as client:
            await workflow.execute(items, client=client)

    with pytest.raises(RunFailed) as caught:
        run(scenario())
    assert caught.value.code == "min_success" and caught.value.path == "map_reduce"
    assert "[3]" in caught.value.reason and "[5]" in caught.value.reason


def test_max_parallel_is_never_exceeded_across_agent_processes(env: Env) -> None:
    # Given 12 slow items, 4 mapper processes with 8 slots between them, max_parallel 2
    items = [{"value": i} for i in range(12)]
    workflow = MapReduceWorkflow(Step(capability="square", params={"sleep_s": 0.03}),
                                 max_parallel=2)

    # When they are mapped
    async def scenario() -> tuple[object, str]:
        async with Client(env.url) as client:
            result = await workflow.execute(items, client=client)
            return result.data, result.task_id

    data, run_id = run(scenario())

    # Then no more than 2 ran at any moment (as the agents' own clocks saw it), and 2 did
    assert data == [i * i for i in range(12)]
    assert peak_concurrency(exec_lines(env.exec_dir, run_id)) == 2


def test_a_review_loop_approved_in_round_two_stops_there(env: Env) -> None:
    # Given a writer and a critic who approves from round 2 on
    loop = ReviewLoop(Step(capability="write"), Step(capability="critique"), max_rounds=3)

    # When the loop runs
    async def scenario() -> tuple[object, dict[str, object], str]:
        async with Client(env.url) as client:
            result = await loop.execute("spec", client=client)
            return result.data, dict(result.extras), result.task_id

    data, extras, run_id = run(scenario())

    # Then it stopped after round 2 with the second draft, which saw round 1's feedback
    assert data == "spec draft 2"
    assert extras["approved"] is True and extras["rounds"] == 2
    assert extras["feedback_seen"] == "round 1: needs work"
    assert sorted(starts(exec_lines(env.exec_dir, run_id))) == [
        task_id(run_id, f"review_loop/{step}@{n}")
        for step in ("produce", "review") for n in (1, 2)]


def test_patterns_compose_a_map_reduce_inside_a_pipeline(env: Env) -> None:
    # Given a pipeline whose middle step maps "beta" over the first step's list
    pipeline = SequentialPipeline([Alpha(), MapReduceWorkflow(Beta(), max_parallel=2), Gamma()])

    # When it runs
    async def scenario() -> object:
        async with Client(env.url) as client:
            return (await pipeline.execute("x", client=client)).data

    # Then the map's list (in item order) went on to the last step
    assert run(scenario()) == [["x", "beta"], ["alpha", "beta"], "gamma"]


def test_a_step_no_live_agent_offers_is_refused_before_the_run(env: Env) -> None:
    # Given a pipeline naming a capability nobody offers
    pipeline = SequentialPipeline([Alpha(), Step(capability="telepathy")])

    # When it is executed, then it is refused with what is missing and what is there
    async def scenario() -> None:
        async with Client(env.url) as client:
            await pipeline.execute("x", client=client)

    with pytest.raises(NoAgentFor) as caught:
        run(scenario())
    assert caught.value.missing == ["capability telepathy"]
    assert "capability square" in caught.value.available
    assert "\n" not in str(caught.value)


def test_a_map_reduce_given_no_list_fails_with_a_clear_error(env: Env) -> None:
    async def scenario() -> None:
        async with Client(env.url) as client:
            await MapReduceWorkflow(Step(capability="square")).execute("not a list",
                                                                        client=client)

    with pytest.raises(RunFailed) as caught:
        run(scenario())
    assert caught.value.code == "bad_input" and "needs a list" in str(caught.value)


def test_the_run_deadline_cancels_its_steps(env: Env) -> None:
    # Given a step that would take 30 s, in a run with a 1 s deadline
    pipeline = SequentialPipeline([Step(capability="square", params={"sleep_s": 30})])

    async def scenario() -> tuple[str, str]:
        async with Client(env.url) as client:
            began = time.monotonic()
            with pytest.raises(RunFailed) as caught:
                await pipeline.execute({"value": 1}, client=client, deadline_s=1.0,
                                       run_id="deadline-run")
            assert time.monotonic() - began < 10
            fetched = await client.fetch(task_id("deadline-run", "pipeline/square"))
            return caught.value.code, fetched.status

    # When it runs, then the run fails for its deadline and the step's task ended with it
    code, status = run(scenario())
    assert code == "deadline"
    assert status in ("cancelled", "timed_out")


def test_a_run_publishes_its_progress_on_the_bus(env: Env) -> None:
    # Given a subscriber to the run's topic
    pipeline = SequentialPipeline([Alpha(), Beta()])

    async def scenario() -> list[dict[str, object]]:
        async with Client(env.url) as client:
            events: asyncio.Queue[BusMessage] = asyncio.Queue()
            await client.subscribe(events_topic("events-run"), events.put_nowait)
            # When the run goes
            await pipeline.execute("x", client=client, run_id="events-run")
            seen = []
            while not seen or seen[-1]["event"] != "run_finished":
                seen.append((await asyncio.wait_for(events.get(), WAIT_S)).data)
            return seen

    seen = run(scenario())

    # Then its steps' starts and ends came in order, counting done of total
    assert [(e["event"], e.get("path")) for e in seen] == [
        ("run_started", None), ("step_started", "pipeline"),
        ("step_started", "pipeline/alpha"), ("step_finished", "pipeline/alpha"),
        ("step_started", "pipeline/beta"), ("step_finished", "pipeline/beta"),
        ("step_finished", "pipeline"), ("run_finished", None)]
    assert (seen[-1]["status"], seen[-1]["done"], seen[-1]["total"]) == ("succeeded", 2, 2)


YAML_TWIN = """\
workflow: twin
steps:
  - kind: map_reduce
    name: squares
    mapper: {capability: square}
    reducer: {capability: sum}
    max_parallel: 4
  - agent: alpha
  - agent: beta
"""


def test_a_workflow_from_yaml_gives_what_the_same_one_from_python_gives(env: Env) -> None:
    # Given the same workflow written in Python and in YAML: a map-reduce, then two
    # steps that tag its output
    python = SequentialPipeline([
        MapReduceWorkflow(Step(capability="square"), Step(capability="sum"), max_parallel=4),
        Alpha(), Beta()])
    from_yaml = load_workflow_text(YAML_TWIN)

    async def scenario() -> tuple[object, object]:
        async with Client(env.url) as client:
            by_python = await python.execute([1, 2, 3], client=client)
            record = await run_workflow(from_yaml, [1, 2, 3], client=client)
            assert record.output is not None, record
            return by_python.data, record.output.data

    by_python, by_yaml = run(scenario())
    # Then both give the same output, through the same steps
    assert by_python == by_yaml
    assert by_yaml[0]["sum"] == 14 and by_yaml[1:] == ["alpha", "beta"]  # type: ignore[index]
