"""Dependable runs, with real processes: no held result outlives its run, a run whose
driver hits a bug ends ``failed``, a lost release is redone, a result that cannot be read
fails its step rather than the run, ``resume`` says when nobody would act on it, and a
broker killed mid-task does not run the task twice.

What the broker holds is read from its journal (``H`` records not followed by a ``U``),
copied while it runs: the journal is written before the broker answers what caused it,
so once a confirmed release returns, its ``U`` records are in the file.
"""

from __future__ import annotations

import asyncio
import itertools
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest

from agent_sdk import BusMessage, Client, SyncClient
from broker.journal import Journal
from tests.conftest import BrokerProcess, Cluster, python_process, read_json_line
from tests.support import wait_status as wait_broker_status
from tests.workflows.support import (
    exec_lines, mapping_client, run, start_agents, start_runner, starts, wait_record, WAIT_S,
)
from workflows import ids
from workflows.api import cancel_run, resume_run, submit_run
from workflows.runs import RunRecord, RunStatus, RunStore

#: Items the client process maps before it is killed.
MAPPED_ITEMS = 40
_copies = itertools.count()


def held_results(broker: BrokerProcess, run_id: str, tmp_path: Path) -> set[str]:
    """The run's task ids whose results the broker holds, from a copy of its journal."""
    copy = tmp_path / f"journal-copy-{next(_copies)}"
    copy.mkdir()
    shutil.copy(broker.data_dir / Journal.FILE, copy / Journal.FILE)
    journal = Journal(copy)
    try:
        replay = journal.open()
    finally:
        journal.close()
    prefix = ids.task_id(run_id, "")
    return {task_id for task_id in replay.held if task_id.startswith(prefix)}


def _killed_midway(cluster: Cluster, tmp_path: Path, run_id: str
                   ) -> tuple[BrokerProcess, Path]:
    """A broker, two mappers, and a client process mapping items in itself, killed once
    10 items are checkpointed; returns once its lease is gone and the tasks it left
    finished unheard (their results held by the broker, nobody checkpointing them)."""
    broker, exec_dir, client_proc = mapping_client(cluster, tmp_path, run_id, MAPPED_ITEMS,
                                                   sleep_s=0.1)

    async def checkpointed_then_let_go() -> None:
        async with Client(broker.url) as client:
            seen: set[str] = set()
            enough = asyncio.Event()

            def count(change: Any) -> None:
                batch = change.value if isinstance(change.value, dict) else {}
                seen.update(path for path in batch.get("entries", {}) if "[" in path)
                if len(seen) >= 10:
                    enough.set()

            await client.state.watch(ids.checkpoint_prefix(run_id), count, since=0)
            await asyncio.wait_for(enough.wait(), WAIT_S)
            client_proc.kill()
            client_proc.wait()
            # The dead client's session expires, and its lease with it.
            lease = await client.state.acquire(ids.lease_name(run_id), ttl=5, wait=WAIT_S)
            await lease.release()

    run(checkpointed_then_let_go())
    with SyncClient(broker.url) as sync:
        wait_broker_status(sync, lambda s: s["tasks"].get("in_flight", 1) == 0 and
                           s["tasks"].get("pending", 1) == 0, what="no open task")
    return broker, exec_dir


def test_cancelling_a_run_nobody_drives_releases_what_its_dead_runner_left_held(
        cluster: Cluster, tmp_path: Path) -> None:
    # Given a run whose client died midway, leaving results nobody checkpointed held
    run_id = "dead-cancel"
    broker, _ = _killed_midway(cluster, tmp_path, run_id)
    assert held_results(broker, run_id, tmp_path), "the dead client left nothing held"

    # When it is cancelled with no runner alive (the cancel ends it itself)
    cancelled = run(cancel_run(run_id, reason="no longer needed", broker=broker.url))

    # Then it ended cancelled and the broker holds no result of its tasks any more
    assert cancelled.status is RunStatus.CANCELLED and cancelled.ended
    assert held_results(broker, run_id, tmp_path) == set()
    record = run(_load(broker.url, run_id))
    assert getattr(record, "release_due", True) is False


def test_a_run_taken_over_and_completed_leaves_no_held_result(
        cluster: Cluster, tmp_path: Path) -> None:
    # Given a run whose client died midway, leaving results held
    run_id = "taken-over"
    broker, exec_dir = _killed_midway(cluster, tmp_path, run_id)
    assert held_results(broker, run_id, tmp_path)

    # When a standing runner takes it over and completes it
    start_runner(cluster, broker.url)
    record = run(_wait_settled(broker.url, run_id))

    # Then it succeeded with every item once, and nothing of it is held
    assert record.status is RunStatus.SUCCEEDED, record.error
    assert record.output is not None
    assert record.output.data == [i * i for i in range(MAPPED_ITEMS)]
    assert set(starts(exec_lines(exec_dir, run_id)).values()) == {1}
    assert held_results(broker, run_id, tmp_path) == set()


def test_a_release_lost_at_the_end_is_redone_by_the_next_runner_that_starts(
        cluster: Cluster, tmp_path: Path) -> None:
    # Given a run that ended (as a runner that died right after writing its end leaves
    # it: release still due) while the broker holds results of its tasks
    run_id = "lost-release"
    broker, _ = _killed_midway(cluster, tmp_path, run_id)
    assert held_results(broker, run_id, tmp_path)

    async def end_without_release() -> None:
        async with Client(broker.url) as client:
            store = RunStore(client.state)
            async with client.state.lock(ids.lease_name(run_id), ttl=5, wait=WAIT_S) as lease:
                record = await store.require(run_id)
                record.status = RunStatus.FAILED
                record.release_due = True
                await store.save(record, lease)

    run(end_without_release())

    # When a standing runner starts
    start_runner(cluster, broker.url)

    # Then it releases them, and says so in the record
    record = run(_wait_settled(broker.url, run_id))
    assert record.status is RunStatus.FAILED
    assert held_results(broker, run_id, tmp_path) == set()


def test_a_run_one_runner_drove_start_to_end_leaves_no_held_result(
        cluster: Cluster, tmp_path: Path) -> None:
    # Given a standing runner and a map of 30 items, each step held until checkpointed
    broker = cluster.broker()
    start_agents(cluster, broker.url, {"AGENT_NAME": "squarer", "AGENT_CAPS": "square",
                                       "AGENT_OP": "square", "AGENT_MAX": 8})
    start_runner(cluster, broker.url)
    definition = {"workflow": "squares", "root": {
        "kind": "map_reduce", "name": "all", "max_parallel": 8,
        "mapper": {"capability": "square"}}}

    # When the run is driven from its start to its success by that runner alone
    run_id = run(submit_run(definition, list(range(30)), broker=broker.url))
    record = run(_wait_settled(broker.url, run_id))

    # Then the broker holds none of its results once it ended
    assert record.status is RunStatus.SUCCEEDED and record.takeovers == 0
    assert record.output is not None and record.output.data == [i * i for i in range(30)]
    assert held_results(broker, run_id, tmp_path) == set()


#: A runner whose executor hits a bug on the result of any step named "explode".
BROKEN_RUNNER = """
import sys
from workflows.executor import Executor

original = Executor.leaf

async def broken(self, *args, **kwargs):
    entry = await original(self, *args, **kwargs)
    if "explode" in str(entry.get("t", "")):
        raise RuntimeError("the voter's output has no 'decision'\\nsee the agent")
    return entry

Executor.leaf = broken
from workflows.runner import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_bug_in_the_driver_ends_the_run_failed_and_cancels_its_open_steps(
        cluster: Cluster, tmp_path: Path) -> None:
    # Given a standing runner whose executor breaks on the ballots of the step
    # "explode", one voter that answers and one that never does
    broker = cluster.broker()
    exec_dir = tmp_path / "exec"
    exec_dir.mkdir()
    start_agents(cluster, broker.url,
                 {"EXEC_DIR": exec_dir, "AGENT_NAME": "judge", "AGENT_CAPS": "vote",
                  "AGENT_OP": "vote"},
                 {"EXEC_DIR": exec_dir, "AGENT_NAME": "judge", "AGENT_CAPS": "vote",
                  "HANG_ON": "vote"})
    proc = python_process("-c", BROKEN_RUNNER, "--broker", broker.url)
    cluster.procs.append(proc)
    assert read_json_line(proc)["event"] == "ready"
    definition = {"workflow": "fragile", "steps": [
        {"kind": "consensus", "name": "vote", "voters": 2, "threshold": 0.5,
         "voter": {"capability": "vote", "name": "explode"}}]}

    async def scenario() -> tuple[str, Any, str]:
        async with Client(broker.url) as client:
            hanging: asyncio.Queue[BusMessage] = asyncio.Queue()
            await client.subscribe("test.hanging", hanging.put_nowait)
            # When the run is driven: one ballot comes in and breaks the executor
            run_id = await submit_run(definition, "safe?", client=client)
            stuck = (await asyncio.wait_for(hanging.get(), WAIT_S)).data["task_id"]
            ended = await wait_record(client, run_id, lambda r: r.status.terminal
                                      and not getattr(r, "release_due", False), timeout=15)
            return run_id, ended, (await client.fetch(stuck)).status

    run_id, record, stuck_status = run(scenario())

    # Then the run ended failed with the bug's message on one line, its hanging
    # ballot was cancelled, and the broker holds nothing of it
    assert record.status is RunStatus.FAILED
    assert record.error is not None and record.error.code == "internal"
    assert record.error.message == \
        "RuntimeError: the voter's output has no 'decision' see the agent"
    assert stuck_status == "cancelled"
    assert held_results(broker, run_id, tmp_path) == set()


#: A runner with a bug outside the executor: it cannot read any run's input.
INPUTLESS_RUNNER = """
import sys
from workflows.runs import RunStore

async def broken(self, record):
    raise KeyError("input_chunks")

RunStore.input_of = broken
from workflows.runner import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_bug_before_the_executor_starts_ends_the_run_failed(cluster: Cluster) -> None:
    # Given a standing runner that fails to read any run's input
    broker = cluster.broker()
    proc = python_process("-c", INPUTLESS_RUNNER, "--broker", broker.url)
    cluster.procs.append(proc)
    assert read_json_line(proc)["event"] == "ready"

    # When a run is submitted to it
    run_id = run(submit_run({"workflow": "w", "steps": [{"capability": "any"}]}, 1,
                            broker=broker.url))

    # Then the run ends failed with the error's line, instead of staying "running"
    record = run(_wait_settled(broker.url, run_id))
    assert record.status is RunStatus.FAILED
    assert record.error is not None and record.error.code == "internal"
    assert record.error.message == "KeyError: 'input_chunks'"


def test_resume_says_when_no_runner_serves(cluster: Cluster) -> None:
    # Given a submitted run and no standing runner
    broker = cluster.broker()
    definition = {"workflow": "idle", "steps": [{"capability": "nobody"}]}

    async def scenario() -> Any:
        async with Client(broker.url) as client:
            run_id = await submit_run(definition, 1, client=client)
            return await resume_run(run_id, by="ops", client=client)

    # When a resume is asked for
    record = run(scenario())

    # Then it says nobody holds the run and nobody serves: the caller must drive it
    assert record.holder is None and record.runners == () and record.drive_here is True

    # and with a standing runner serving, it says which, and leaves the run to it
    _, info = start_runner(cluster, broker.url)

    async def again() -> Any:
        async with Client(broker.url) as client:
            run_id = await submit_run(definition, 1, client=client)
            return await resume_run(run_id, by="ops", client=client)

    served = run(again())
    assert served.runners == (info["runner_id"],) and served.drive_here is False


async def _load(url: str, run_id: str) -> Any:
    async with Client(url) as client:
        return await RunStore(client.state).require(run_id)


async def _wait_settled(url: str, run_id: str) -> Any:
    """The run's record once it has ended and its release is confirmed."""
    async with Client(url) as client:
        return await wait_record(client, run_id,
                                 lambda r: r.status.terminal and
                                 not getattr(r, "release_due", False))



def test_a_task_running_when_the_broker_is_killed_runs_once(
        cluster: Cluster, tmp_path: Path) -> None:
    # Given a task running on agent "a" (its work takes a while) and an idle agent "b"
    # of the same capability, with a broker whose heartbeat expiry is 3 s
    broker = cluster.broker("--heartbeat-liveness", "15")
    exec_dir = tmp_path / "exec"
    exec_dir.mkdir()
    work = {"EXEC_DIR": exec_dir, "AGENT_CAPS": "square", "AGENT_OP": "square",
            "AGENT_MAX": 1}
    ((agent_a, _),) = start_agents(cluster, broker.url, {**work, "AGENT_NAME": "a"})
    sync = cluster.client(broker.url)
    handle = sync.submit(capabilities=["square"], data={"value": 7}, task_id="once",
                         sleep_s=2.0)
    wait_broker_status(sync, lambda s: s["tasks"].get("running") == 1, what="running")
    start_agents(cluster, broker.url, {**work, "AGENT_NAME": "b"})

    # When the broker is killed, agent "a" is held still while the broker restarts on
    # the same data dir and "b" registers with it, and only then "a" goes on
    agent_a.send_signal(signal.SIGSTOP)
    try:
        broker.sigkill()
        broker = cluster.restart(broker)
        with SyncClient(broker.url) as watcher:
            watcher.wait_for_agents(1, name="b", timeout=WAIT_S)
    finally:
        agent_a.send_signal(signal.SIGCONT)

    # Then "a" claims the task back and finishes it: it ran once, on "a" only
    result = handle.result(timeout=WAIT_S)
    assert result.ok and result.data == 49
    lines = [line for line in exec_lines(exec_dir) if line["task"] == "once"]
    assert [line["event"] for line in lines] == ["start", "end"], lines


def run_with_a_lost_held_result(cluster: Cluster, run_id: str, item_path: str,
                                mapper: dict[str, Any]) -> RunRecord:
    """A map-reduce over ["small", "big"] whose item 1 has a held result in the broker's
    result store (results of 2,000 bytes and more go there) with its file lost, driven by a
    runner that attaches to that result; returns the settled run."""
    broker = cluster.broker("--result-store-threshold", "2000")
    start_agents(cluster, broker.url, {"AGENT_NAME": "tagger", "AGENT_CAPS": "tag",
                                       "AGENT_OP": "tag"})
    sync = cluster.client(broker.url)
    big = sync.submit(capabilities=["tag"], data="x" * 5000, hold=True,
                      task_id=ids.task_id(run_id, item_path))
    assert big.result(timeout=WAIT_S).ok
    stored = list((broker.data_dir / "results").glob("*.bin"))
    assert len(stored) == 1
    stored[0].unlink()
    definition = {"workflow": "big", "root": {
        "kind": "map_reduce", "name": "items", "min_success": 0.5, "mapper": mapper}}
    run(submit_run(definition, ["small", "big"], run_id=run_id, broker=broker.url))
    start_runner(cluster, broker.url)
    return run(_wait_settled(broker.url, run_id))


def test_an_unreadable_result_is_read_again_then_counts_as_its_items_failure(
        cluster: Cluster, tmp_path: Path) -> None:
    # Given the held result of item 1 of a run's map (its mapper a pipeline), lost from
    # the broker's result store, when a runner drives the run
    record = run_with_a_lost_held_result(
        cluster, "unreadable", "items/each[1]/t",
        {"kind": "pipeline", "name": "each", "steps": [{"capability": "tag", "name": "t"}]})

    # Then the run succeeded on the other item, the unreadable one counted as failed
    assert record.status is RunStatus.SUCCEEDED, record.error
    assert record.output is not None and record.output.data == [["small", "tagger"]]
    failed = record.output.extras["failed"]
    assert [(f["index"], f["code"]) for f in failed] == [(1, "result_unreadable")], failed


def test_an_unreadable_result_of_a_leaf_map_item_counts_as_its_failure(
        cluster: Cluster, tmp_path: Path) -> None:
    # Given the same with a leaf map (its mapper a task step, read on callbacks)
    record = run_with_a_lost_held_result(cluster, "unreadable-leaf", "items/t[1]",
                                         {"capability": "tag", "name": "t"})

    # Then the run succeeded on the other item, the unreadable one counted as failed
    assert record.status is RunStatus.SUCCEEDED, record.error
    assert record.output is not None
    failed = record.output.extras["failed"]
    assert [(f["index"], f["code"]) for f in failed] == [(1, "result_unreadable")], failed
