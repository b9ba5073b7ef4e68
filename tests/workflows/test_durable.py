"""Durable runs with real processes: approvals across a broker restart, rejection, a
client killed in the middle of a map-reduce and its run taken over, cancel.

Each test has its own broker, agents and standing runner (``python -m workflows.runner``);
the test's own clients live only for the call they make, so what continues a run is the
runner. Waits are state watches, bus messages and ready lines with deadlines.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from agent_sdk import BusMessage, Change, Client, SyncClient
from tests.conftest import BrokerProcess, Cluster
from tests.support import wait_status as wait_broker_status
from tests.workflows.support import (
    exec_lines, mapping_client, run, start_agents, start_runner, starts, wait_record,
    wait_status, WAIT_S,
)
from workflows import ids
from workflows.api import (
    approve_run, cancel_run, list_runs, resume_run, run_status, submit_run, wait_run,
)
from workflows.errors import RunStateError
from workflows.runs import RunStatus

#: Items the client process maps in the takeover tests.
MAPPED_ITEMS = 60
#: A pipeline with a human sign-off between its two steps.
SIGN_OFF = {"workflow": "ship", "steps": [
    {"agent": "alpha"}, {"kind": "approval", "name": "sign-off", "prompt": "Ship it?"},
    {"agent": "beta"}]}


def _tag_agents(cluster: Cluster, url: str, exec_dir: Path) -> None:
    start_agents(cluster, url, {"EXEC_DIR": exec_dir}, spec="tests.workflows.agents:Alpha")
    start_agents(cluster, url, {"EXEC_DIR": exec_dir}, spec="tests.workflows.agents:Beta")


def test_an_approval_waits_survives_a_broker_restart_and_continues_when_approved(
        cluster: Cluster, tmp_path: Path) -> None:
    # Given a broker, two agents and a standing runner, and a run submitted by a client
    # that is gone once it submitted
    broker = cluster.broker()
    exec_dir = tmp_path / "exec"
    exec_dir.mkdir()
    _tag_agents(cluster, broker.url, exec_dir)
    _, runner = start_runner(cluster, broker.url)
    run_id = run(submit_run(SIGN_OFF, ["start"], broker=broker.url, submitted_by="ci"))

    async def waiting() -> Any:
        async with Client(broker.url) as client:
            return await wait_status(client, run_id, RunStatus.WAITING_APPROVAL)

    # When it reaches the approval, then it waits there, showing what is to be approved
    record = run(waiting())
    assert [(p.path, p.prompt, p.subject) for p in record.pending] == [
        ("ship/sign-off", "Ship it?", ["start", "alpha"])]

    # When a resume is asked for, the runner holding it drives it again from its
    # checkpoints, and it waits again
    resumed = run(resume_run(run_id, by="dan", broker=broker.url))
    assert resumed.holder == runner["runner_id"]

    async def waiting_again() -> Any:
        async with Client(broker.url) as client:
            return await wait_record(client, run_id, lambda r: r.pending and any(
                h.event == "resume" and h.by == "dan" for h in r.history))

    assert run(waiting_again()).status is RunStatus.WAITING_APPROVAL

    # When the broker (and its state service) is killed and restarted meanwhile
    broker.sigkill()
    broker = cluster.restart(broker)
    assert run(run_status(run_id, broker=broker.url)).status is RunStatus.WAITING_APPROVAL
    assert not any("/beta" in task for task in starts(exec_lines(exec_dir, run_id)))

    # and somebody approves it, from a client that then goes away
    answer = run(approve_run(run_id, True, "looks good", "ana", broker=broker.url))
    assert (answer.path, answer.approved, answer.by) == ("ship/sign-off", True, "ana")

    # Then the runner continues it to the end, and the history says who approved
    details = run(wait_run(run_id, broker=broker.url, timeout=WAIT_S))
    assert details.status is RunStatus.SUCCEEDED, details.error
    assert details.output is not None
    assert details.output.data == ["start", "alpha", "beta"]
    approvals = [h for h in details.history if h.event == "approval"]
    assert [(h.path, h.approved, h.by, h.comment) for h in approvals] == [
        ("ship/sign-off", True, "ana", "looks good")]
    assert approvals[0].at >= record.pending[0].since
    assert set(starts(exec_lines(exec_dir, run_id)).values()) == {1}
    listed = run(list_runs(broker=broker.url))
    assert [(r.run_id, r.workflow, r.status) for r in listed] == [
        (run_id, "ship", RunStatus.SUCCEEDED)]


def test_a_rejected_approval_ends_the_run_as_rejected_with_the_comment(
        cluster: Cluster, tmp_path: Path) -> None:
    # Given a run waiting for its sign-off
    broker = cluster.broker()
    exec_dir = tmp_path / "exec"
    exec_dir.mkdir()
    _tag_agents(cluster, broker.url, exec_dir)
    start_runner(cluster, broker.url)
    run_id = run(submit_run(SIGN_OFF, ["start"], broker=broker.url))

    async def waiting() -> None:
        async with Client(broker.url) as client:
            await wait_status(client, run_id, RunStatus.WAITING_APPROVAL)

    run(waiting())

    # When it is rejected
    run(approve_run(run_id, False, "not this week", "ben", broker=broker.url))

    # Then it ends rejected, with the comment, and the step after never ran
    details = run(wait_run(run_id, broker=broker.url, timeout=WAIT_S))
    assert details.status is RunStatus.REJECTED
    assert details.error is not None and details.error.code == "rejected"
    assert "not this week" in details.error.message and details.error.path == "ship/sign-off"
    assert not any("/beta" in task for task in starts(exec_lines(exec_dir, run_id)))
    # and it cannot be answered again, nor resumed
    with pytest.raises(RunStateError):
        run(approve_run(run_id, True, broker=broker.url))
    with pytest.raises(RunStateError):
        run(resume_run(run_id, broker=broker.url))


def _mapping_client(cluster: Cluster, tmp_path: Path, run_id: str
                    ) -> tuple[BrokerProcess, Path, subprocess.Popen[bytes]]:
    """60 items of 50 ms each, 4 at a time (:func:`mapping_client`)."""
    return mapping_client(cluster, tmp_path, run_id, MAPPED_ITEMS)


def _kill_after_checkpoints(url: str, run_id: str, items: int,
                            client_proc: subprocess.Popen[bytes]) -> None:
    """Kill the client process once ``items`` map items are checkpointed (a watch on the
    checkpoint batches from the start)."""
    async def checkpointed() -> None:
        async with Client(url) as client:
            seen: set[str] = set()
            enough = asyncio.Event()

            def count(change: Change) -> None:
                batch = change.value if isinstance(change.value, dict) else {}
                seen.update(path for path in batch.get("entries", {}) if "[" in path)
                if len(seen) >= items:
                    enough.set()

            await client.state.watch(ids.checkpoint_prefix(run_id), count, since=0)
            await asyncio.wait_for(enough.wait(), WAIT_S)

    run(checkpointed())
    client_proc.kill()
    client_proc.wait()


def _completed_once_each(url: str, run_id: str, exec_dir: Path) -> None:
    """The run completes, in item order, after one takeover, and no item ran twice."""
    details = run(wait_run(run_id, broker=url, timeout=WAIT_S))
    assert details.status is RunStatus.SUCCEEDED, details.error
    assert details.output is not None
    assert details.output.data == [i * i for i in range(MAPPED_ITEMS)]
    assert details.takeovers == 1 and [h.event for h in details.history].count("takeover") == 1
    counts = starts(exec_lines(exec_dir, run_id))
    assert len(counts) == MAPPED_ITEMS and set(counts.values()) == {1}, counts.most_common(3)


def test_a_run_whose_client_died_midway_is_taken_over_and_no_step_runs_twice(
        cluster: Cluster, tmp_path: Path) -> None:
    # Given a standing runner, and a client process mapping items in itself
    run_id = "resume-run"
    broker, exec_dir, client_proc = _mapping_client(cluster, tmp_path, run_id)
    start_runner(cluster, broker.url)

    # When the client is killed once 20 items are checkpointed, tasks still running
    _kill_after_checkpoints(broker.url, run_id, 20, client_proc)

    # Then the runner takes the run over and completes it, attached to the tasks the
    # client left running instead of running them again
    _completed_once_each(broker.url, run_id, exec_dir)


def test_a_taken_over_run_finds_its_held_results_after_a_broker_restart(
        cluster: Cluster, tmp_path: Path) -> None:
    # Given a client process mapping items in itself, and no runner yet
    run_id = "held-run"
    broker, exec_dir, client_proc = _mapping_client(cluster, tmp_path, run_id)

    # When the client is killed midway, the tasks it left finish unheard
    _kill_after_checkpoints(broker.url, run_id, 20, client_proc)

    async def let_go() -> None:
        """Return once the dead client's lease is gone (its session expired)."""
        async with Client(broker.url) as client:
            lease = await client.state.acquire(ids.lease_name(run_id), ttl=5, wait=WAIT_S)
            await lease.release()

    run(let_go())
    with SyncClient(broker.url) as sync:
        wait_broker_status(sync, lambda s: s["tasks"].get("in_flight", 1) == 0 and
                    s["tasks"].get("pending", 1) == 0, what="no open task")
    # and the broker restarts keeping finished results for an instant only (held ones
    # excepted: those of the steps nobody checkpointed), and only then a runner starts
    broker.sigkill()
    broker = cluster.restart(dataclasses.replace(
        broker, args=(*broker.args, "--retention", "0.01")))
    start_runner(cluster, broker.url)

    # Then the runner completes the run, reading the unheard results the broker held
    _completed_once_each(broker.url, run_id, exec_dir)


def test_cancelling_a_run_cancels_every_running_step(cluster: Cluster, tmp_path: Path) -> None:
    # Given a run mapping 6 items that never finish, 3 at a time, on a standing runner
    broker = cluster.broker()
    exec_dir = tmp_path / "exec"
    exec_dir.mkdir()
    start_agents(cluster, broker.url, {"EXEC_DIR": exec_dir, "AGENT_NAME": "slow",
                                       "AGENT_CAPS": "slow", "HANG_ON": "slow", "AGENT_MAX": 4})
    start_runner(cluster, broker.url)
    definition = {"workflow": "forever", "root": {
        "kind": "map_reduce", "name": "all", "max_parallel": 3,
        "mapper": {"capability": "slow"}}}

    async def scenario() -> tuple[str, list[str], Any]:
        async with Client(broker.url) as client:
            hanging: asyncio.Queue[BusMessage] = asyncio.Queue()
            await client.subscribe("test.hanging", hanging.put_nowait)
            run_id = await submit_run(definition, list(range(6)), client=client)
            running = [(await asyncio.wait_for(hanging.get(), WAIT_S)).data["task_id"]
                       for _ in range(3)]
            # When the run is cancelled while its three steps run
            cancelled = await cancel_run(run_id, reason="changed my mind", by="cy",
                                         client=client)
            statuses = [(await client.fetch(task)).status for task in running]
            return run_id, statuses, cancelled

    run_id, statuses, cancelled = run(scenario())

    # Then the run ended cancelled, every running step was cancelled, no other started
    assert cancelled.status is RunStatus.CANCELLED and cancelled.ended
    assert statuses == ["cancelled"] * 3
    details = run(run_status(run_id, broker=broker.url))
    assert details.error is not None and "changed my mind" in details.error.message
    assert len(starts(exec_lines(exec_dir, run_id))) == 3


def test_the_runner_prints_one_json_ready_line(cluster: Cluster) -> None:
    broker = cluster.broker()
    proc, info = start_runner(cluster, broker.url)
    assert info["broker"] == broker.url and info["pid"] == proc.pid
    assert json.loads(json.dumps(info))["event"] == "ready"
