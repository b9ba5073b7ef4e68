"""Broker crashes: SIGKILL with 10,000 tasks in flight, and what durability ``none`` and
``batch`` each keep. The client must get every result exactly once either way."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from agent_sdk import Client
from broker.journal import Journal
from tests.conftest import Cluster
from tests.e2e.faults.checker import WireTap, check, read_log
from tests.e2e.faults.support import (
    NOBODY, WAIT_S, collect, learn_boot, restart_logged, wait_status,
)

AGENTS = "tests.e2e.faults.agents"

#: Tasks in the big crash test, and how many results arrive before the kill.
BIG = 10_000
KILL_AFTER = 1_000
#: The whole big test must end within this (the client waits this long in all).
BIG_DEADLINE_S = 90.0


async def explain_missing(client: Client, missing: list[Any], logs: list[Path]) -> str:
    """What the broker and the agents know of tasks the client never got a result for."""
    runs: dict[str, int] = {}
    for log in logs:
        for task_id in read_log(log):
            runs[task_id] = runs.get(task_id, 0) + 1
    lines = [f"{len(missing)} task(s) without a result, e.g. {[h.id for h in missing[:5]]}"]
    for handle in missing[:5]:
        try:
            fetched = await client.fetch(handle.id, timeout=5)
            known = (f"broker: {fetched.status}, attempts {fetched.attempts}, agent "
                     f"{fetched.agent}")
        except Exception as e:  # noqa: BLE001 - a diagnostic, whatever it finds
            known = f"broker: {type(e).__name__}: {e}"
        lines.append(f"  {handle.id}: accepted={handle.accepted}; ran {runs.get(handle.id, 0)}"
                     f" time(s) on agents; {known}")
    try:
        status = await client.status(timeout=5)
        lines.append(f"  broker tasks: {status['tasks']}")
        lines.append(f"  agents: {[(a['name'], a['in_flight']) for a in status['agents']]}")
        lines.append(f"  client boot {client._recovery.boot!r}, broker boot {status['broker']['boot']!r}")
    except Exception as e:  # noqa: BLE001
        lines.append(f"  status: {type(e).__name__}: {e}")
    return "\n".join(lines)


def test_broker_sigkill_with_10000_tasks_in_flight(cluster: Cluster, tmp_path: Path) -> None:
    # Given a broker (durability batch) and 2 agents running up to 100 tasks of 50 ms each
    broker = cluster.broker()
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    for name, log in zip(("a", "b"), logs):
        cluster.agent(broker.url, f"{AGENTS}:CountingAgent", agent_name=name, agent_max="100",
                      echo_delay_s="0.05", exec_log=str(log))
    facts: dict[str, Any] = {}

    async def scenario() -> tuple[list[str], list[Any], list[tuple[str, str]]]:
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        async with Client(broker.url) as client:
            # (the client learns the broker's boot id while it holds a task open: see
            # support.learn_boot)
            probe = client.submit(capabilities=[NOBODY], task_id="boot-probe", timeout=60)
            while client._recovery.boot is None:
                await client.status()
            await probe.cancel()
            assert (await probe.result(timeout=WAIT_S)).status == "cancelled"
            tap = WireTap(client)
            # And one client that submits 10,000 tasks at once
            handles = [client.submit(capabilities=["echo"], data=i, task_id=f"k-{i}",
                                     timeout=120) for i in range(BIG)]
            arrived = 0
            enough = asyncio.Event()

            def on_result(_: Any) -> None:
                nonlocal arrived
                arrived += 1
                if arrived >= KILL_AFTER:
                    enough.set()

            for handle in handles:
                handle.add_done_callback(on_result)
            await asyncio.wait_for(enough.wait(), 30)
            status = await client.status()
            facts["before_kill"] = dict(status["tasks"])
            # When, with some results in, the broker is SIGKILLed
            await loop.run_in_executor(None, broker.sigkill)
            facts["results_at_kill"] = arrived
            # And started again on the same port and data dir
            restarted = await loop.run_in_executor(None, cluster.restart, broker)
            facts["restarted"] = restarted
            facts["down_s"] = round(time.monotonic() - started, 3)
            # Then every task completes for the client (it notices the new boot id and
            # submits again what is open; the broker answers each id once)
            remaining = BIG_DEADLINE_S - (time.monotonic() - started)
            futures = [asyncio.ensure_future(h.result()) for h in handles]
            await asyncio.wait(futures, timeout=remaining)
            missing = [h for h in handles if not h.done()]
            if missing:
                for future in futures:
                    future.cancel()
                raise AssertionError(await explain_missing(client, missing, logs))
            results = [future.result() for future in futures]
            facts["elapsed_s"] = round(time.monotonic() - started, 3)
            status = await client.status()
            facts["after"] = dict(status["tasks"])
            facts["boot_seen"] = client._recovery.boot == status["broker"]["boot"]
            return [h.id for h in handles], results, tap.snapshot()

    ids, results, deliveries = asyncio.run(scenario())
    before, after = facts["before_kill"], facts["after"]
    print(f"[broker crash] results at kill {facts['results_at_kill']}; broker before the "
          f"kill: pending {before['pending']}, in flight {before['in_flight']}, succeeded "
          f"{before['succeeded']}; restarted broker restored {after['restored_open']} open, "
          f"{after['restored_results']} results; all done in {facts['elapsed_s']} s")
    # (the kill really hit a busy broker: thousands queued, many running on agents)
    assert before["pending"] >= 1_000 and before["in_flight"] >= 50, before
    assert after["restored_open"] >= BIG - before["succeeded"] - 2 * KILL_AFTER
    assert facts["boot_seen"], "the client did not learn the restarted broker's boot id"
    assert all(r.ok for r in results)
    assert [r.data for r in results] == list(range(BIG))
    report = check(ids, results, logs, deliveries=deliveries, handle_ids=ids)
    report.assert_valid("broker sigkill 10k")
    print(f"[broker crash] tasks run twice on agents: {len(report.re_executed)}; results "
          f"delivered twice on the wire (dropped by the SDK): {len(report.redelivered)}")
    assert facts["restarted"].proc.poll() is None


@pytest.mark.parametrize("durability", ["none", "batch"])
def test_durability_after_broker_sigkill(cluster: Cluster, tmp_path: Path,
                                         durability: str) -> None:
    # Given a broker with this durability, an agent running 4 tasks of 5 s, and 20 more
    # tasks accepted and waiting for a capability no agent offers yet
    broker = cluster.broker("--durability", durability)
    slow_log, later_log = tmp_path / "slow.log", tmp_path / "later.log"
    cluster.agent(broker.url, f"{AGENTS}:CountingAgent", agent_name="slow", agent_max="4",
                  echo_delay_s="5", exec_log=str(slow_log))
    client = cluster.client(broker.url)
    old_boot = learn_boot(client)
    tap = WireTap(client.client)
    running = [client.submit(capabilities=["echo"], data=i, task_id=f"run-{i}", timeout=30)
               for i in range(4)]
    waiting = [client.submit(capabilities=["later"], data=i, task_id=f"wait-{i}", timeout=30)
               for i in range(20)]
    handles = running + waiting
    wait_status(client, lambda s: s["tasks"]["running"] == 4 and s["tasks"]["pending"] == 20,
                what="4 running, 20 pending")
    for handle in handles:
        handle.wait_accepted(timeout=WAIT_S)
    # When the broker is SIGKILLed and started again
    broker.sigkill()
    restarted = restart_logged(cluster, broker, tmp_path / "restarted.log")
    observer = cluster.client(restarted.url)
    status = observer.status()
    assert status["broker"]["boot"] != old_boot
    assert status["broker"]["durability"] == durability
    journal = broker.data_dir / Journal.FILE
    if durability == "none":
        # Then without a journal the broker lost every open task
        assert status["tasks"]["restored_open"] == 0
        assert not journal.exists()
    else:
        # Then with one it restored all 24
        assert status["tasks"]["restored_open"] == 24
    # When an agent for the waiting tasks arrives
    cluster.agent(restarted.url, f"{AGENTS}:CountingAgent", agent_name="later",
                  agent_caps="later", exec_log=str(later_log))
    # Then the client still gets every result exactly once: in ``none`` mode because it
    # submitted them all again on seeing the new boot id, in ``batch`` mode from the
    # journal (its resubmits were duplicates)
    results = collect(handles, restarted)
    assert all(r.ok for r in results), results
    assert [r.data for r in results] == list(range(4)) + list(range(20))
    status = wait_status(observer, lambda s: s["tasks"]["succeeded"] == 24, what="24 succeeded")
    if durability == "none":
        # (every one of them reached the restarted broker as a submit of the client)
        assert status["tasks"]["submitted"] >= 24
    assert client.client._recovery.boot == status["broker"]["boot"]
    report = check([h.id for h in handles], results, [slow_log, later_log],
                   deliveries=tap.snapshot(), handle_ids=[h.id for h in handles])
    report.assert_valid(f"durability {durability}")
    print(f"[durability {durability}] tasks run twice: {len(report.re_executed)}")


# Regression test for an accounting bug these tests found (fixed in
# Broker._handle_submit while they were written): status tasks.submitted counted idempotent
# resubmits of a task id the broker already held (they are counted as "resubmitted"), so
# after a restart every journal-restored task the client sent again was counted twice.
def test_idempotent_resubmit_is_not_counted_as_a_new_submit(cluster: Cluster) -> None:
    # Given a task waiting in the broker
    broker = cluster.broker()
    first, second = cluster.client(broker.url), cluster.client(broker.url)
    first.submit(capabilities=[NOBODY], task_id="same", timeout=30).wait_accepted(WAIT_S)
    # When another client submits the same task id (as a client does after a restart)
    second.submit(capabilities=[NOBODY], task_id="same", timeout=30).wait_accepted(WAIT_S)
    # Then the broker holds one task, and counts one submit
    status = first.status()
    assert status["tasks"]["pending"] == 1
    assert status["tasks"]["submitted"] == 1, status["tasks"]
