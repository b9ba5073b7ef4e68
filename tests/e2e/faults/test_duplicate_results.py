"""Why a client can get the same task's RESULT more than once on the wire.

Delivery to a client is at-least-once; the SDK drops a second RESULT for a task by id
(``agent_sdk.handles.deliver_results`` pops the handle on the first). The broker sends a
task's RESULT once when it ends (``Lifecycle.finish``, or ``Lifecycle.result_written``
for a large payload), and once more for every SUBMIT of its id and every FETCH of it it
gets after that (``ClientDesk.submit`` / ``ClientDesk.fetch``: idempotent by task id).
The client sends those on its own to recover (``Recovery.on_boot`` in agent_sdk/client.py when the broker's boot
id changed, ``overdue_work`` every 5 s for a task without an answer). When such a re-ask
crosses the RESULT on the wire (sent after the broker ended the task, before the client
read its RESULT) the broker answers it with the RESULT again: the duplicate of the fault
runs (a broker SIGKILL and restart with tasks in flight). That one is by design.

A large result is different: while the result store writes its payload, the task is
already finished in the broker's books and its RESULT waits for the write. A re-ask in
that window used to be answered at once (before the result was even journalled), and
the RESULT went again once written: a duplicate that was a bug. Such a re-ask now waits
for the write like the RESULT itself (the asker is a watcher).

Each test holds one step of the race still, with no sleep: the client's asyncio loop
(so that a RESULT waits unread in its socket), or the result store's writer thread (a
FIFO where it writes its temporary file: ``open`` blocks until the test reads it).
"""

from __future__ import annotations

import asyncio
import os
import select
import time
from pathlib import Path
from typing import Any

import zmq

from agent_sdk import Client
from broker.results import ResultStore, key_of
from tests.conftest import BrokerProcess, Cluster
from tests.e2e.faults.checker import WireTap, check
from tests.e2e.faults.support import NOBODY, RESULT_S, WAIT_S, collect, wait_status
from wire.tasks import Heartbeat

AGENTS = "tests.e2e.faults.agents"


def _remaining_ms(deadline: float, what: str) -> int:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise AssertionError(f"{what}: not within the deadline")
    return int(remaining * 1000) + 1


def wait_connection(client: Client, up: bool, deadline: float) -> None:
    """Handle the client connection's monitor events until libzmq reports it up (a
    handshake with a broker) or down, blocking the client's loop meanwhile."""
    channel: Any = client._channel
    monitor = channel._monitor.sock
    channel.read_events()
    while channel.transport_up != up:
        monitor.poll(_remaining_ms(deadline, f"the client's connection {'up' if up else 'down'}"))
        channel.read_events()


def wait_input(client: Client, deadline: float) -> None:
    """Block until a message from the broker waits in the client's socket (unread)."""
    sock = client._channel._sock  # type: ignore[union-attr]
    while not sock.poll(_remaining_ms(deadline, "a message for the client"), zmq.POLLIN):
        pass


def terminal(tap: WireTap, task_id: str) -> int:
    """How many terminal RESULT items for ``task_id`` reached the client on the wire."""
    return sum(1 for seen, _ in tap.snapshot() if seen == task_id)


def test_resubmit_after_a_broker_restart_crossing_the_result_is_a_duplicate_the_sdk_drops(
        cluster: Cluster, tmp_path: Path) -> None:
    # Given a journaled broker, and a client that knows its boot id and has one task
    # waiting there (no agent offers its capability yet)
    broker = cluster.broker()
    log = tmp_path / "later.log"
    facts: dict[str, Any] = {}

    async def scenario() -> tuple[Any, list[tuple[str, str]], int]:
        async with Client(broker.url) as client:
            probe = client.submit(capabilities=[NOBODY], task_id="boot-probe", timeout=60)
            deadline = time.monotonic() + WAIT_S
            while client._recovery.boot is None:
                assert time.monotonic() < deadline, "the client never learned the boot id"
                await client.status()
            await probe.cancel()
            assert (await probe.result(timeout=WAIT_S)).status == "cancelled"
            old_boot = client._recovery.boot
            tap = WireTap(client)
            handle = client.submit(capabilities=["later"], data=7, task_id="crossing",
                                   timeout=60)
            delivered: list[Any] = []
            handle.add_done_callback(delivered.append)
            await handle.wait_accepted(WAIT_S)
            await client.status()
            # (from here until the task's result is in, the client's loop is held: what
            # the broker sends waits unread in its socket, and it pings nobody)
            deadline = time.monotonic() + 3 * WAIT_S
            # When the broker is SIGKILLed (the client reads what the old one sent)
            broker.sigkill()
            wait_connection(client, False, deadline)
            client._channel.read_now()  # type: ignore[union-attr]
            # And started again on the same port (the task comes back from the journal)
            restarted = cluster.restart(broker)
            facts["restarted"] = restarted
            # And the client pings it (as its ping loop does), the reply with the new
            # boot id arriving first in its socket
            client._channel.send(Heartbeat(role="client"))  # type: ignore[union-attr]
            wait_input(client, deadline)
            # And the task ends on the restarted broker before the client read that
            # reply: its RESULT waits behind the reply
            cluster.agent(restarted.url, f"{AGENTS}:CountingAgent", agent_name="later",
                          agent_caps="later", exec_log=str(log))
            observer = cluster.client(restarted.url)
            wait_status(observer, lambda s: s["tasks"]["succeeded"] == 1,
                        what="the restored task succeeded")
            assert client._recovery.boot == old_boot and not handle.done()
            # Then the client reads the new boot id first and submits its open task
            # again (Recovery.on_boot), then reads the RESULT
            while not handle.done():
                client._channel.read_now()  # type: ignore[union-attr]
                if not handle.done():
                    wait_input(client, deadline)
            assert client._recovery.boot != old_boot
            result = await handle.result(timeout=RESULT_S)
            # And the broker answers that SUBMIT of a finished id with its RESULT again
            # (the STATUS goes after the SUBMIT: its reply comes after that RESULT)
            await client.status()
            return result, tap.snapshot(), len(delivered)

    result, deliveries, delivered = asyncio.run(scenario())
    # Then the RESULT reached the client twice on the wire, and the application once
    assert result.ok and result.data == 7 and result.attempts == 1, result
    assert deliveries == [("crossing", "succeeded")] * 2, deliveries
    assert delivered == 1
    report = check(["crossing"], [result], [log], deliveries=deliveries,
                   handle_ids=["crossing"])
    report.assert_valid("resubmit after restart crossing the result")
    assert report.redelivered == {"crossing"} and not report.re_executed
    status = wait_status(cluster.client(facts["restarted"].url),
                         lambda s: s["tasks"]["succeeded"] == 1, what="1 succeeded")
    assert status["tasks"]["submitted"] == 0  # the resubmit ran nothing again


def hold_result_store(broker: BrokerProcess, task_id: str) -> Path:
    """Make the broker's result store block on ``task_id``'s payload: a FIFO where it
    writes its temporary file (its ``open`` waits for a reader). Returns the FIFO.

    Its file's final name is taken by a directory, so that the write then fails: the
    broker journals that result whole and sends its payload inline, as after a disk
    error. (A stored file would be the FIFO itself, which nobody may read again.)"""
    directory = broker.data_dir / ResultStore.DIRECTORY
    fifo = directory / f"{key_of(task_id)}.tmp"
    os.mkfifo(fifo)
    (directory / f"{key_of(task_id)}.bin").mkdir()
    return fifo


def release_result_store(fifo: Path, size_at_least: int, timeout: float = WAIT_S) -> int:
    """Read what the store writes into ``fifo`` until it closes it; returns the bytes."""
    deadline = time.monotonic() + timeout
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # the writer's open returns now
    read = 0
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"the result store wrote {read} bytes, not all")
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                continue
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            read += len(chunk)
    finally:
        os.close(fd)
    assert read >= size_at_least
    return read


def test_a_large_result_asked_for_again_while_it_is_written_leaves_once(
        cluster: Cluster, tmp_path: Path) -> None:
    # Given a broker that keeps payloads of 1 KiB and more in its result store, whose
    # write of one task's payload is held, and an agent
    broker = cluster.broker("--result-store-threshold", "1024")
    big = "x" * 8192
    fifo = hold_result_store(broker, "big")
    log = tmp_path / "echo.log"
    cluster.agent(broker.url, f"{AGENTS}:CountingAgent", exec_log=str(log))
    client, other, observer = (cluster.client(broker.url) for _ in range(3))
    tap, other_tap = WireTap(client.client), WireTap(other.client)
    # When the client's task ends with a large result (its RESULT waits for the write)
    handle = client.submit(capabilities=["echo"], data=big, task_id="big", timeout=60)
    wait_status(observer, lambda s: s["tasks"]["succeeded"] == 1, what="the task ended")
    # And, while the store writes it, the client asks for it again (FETCH wait, as its
    # recovery does) and another client submits the same id
    assert client.watch("big").id == "big"
    other_handle = other.submit(capabilities=["echo"], data=big, task_id="big", timeout=60)
    client.status()
    other.status()
    # Then neither hears of the result before it is written
    assert terminal(tap, "big") == 0 and terminal(other_tap, "big") == 0
    assert not handle.done() and not other_handle.done()
    # When the store is done with it (its write fails: the result goes inline)
    release_result_store(fifo, len(big))
    # Then each gets the RESULT once
    [result] = collect([handle], broker, client=client)
    [other_result] = collect([other_handle], broker, client=other)
    assert result.ok and result.data == big and other_result.data == big
    client.status()
    other.status()
    assert tap.snapshot() == [("big", "succeeded")]
    assert other_tap.snapshot() == [("big", "succeeded")]
    report = check(["big"], [result], [log], deliveries=tap.snapshot(), handle_ids=["big"])
    report.assert_valid("large result asked for while written")
    assert not report.redelivered


def test_a_client_that_submitted_and_watches_a_task_gets_its_result_once(
        cluster: Cluster, tmp_path: Path) -> None:
    # Given a client's task waiting for an agent, which the client also watches (FETCH
    # wait: the broker records it as a watcher of its own task)
    broker = cluster.broker()
    client = cluster.client(broker.url)
    tap = WireTap(client.client)
    handle = client.submit(capabilities=["later"], data=1, task_id="watched", timeout=60)
    handle.wait_accepted(WAIT_S)
    assert client.watch("watched").id == "watched"
    client.status()
    # When the task ends
    log = tmp_path / "later.log"
    cluster.agent(broker.url, f"{AGENTS}:CountingAgent", agent_name="later",
                  agent_caps="later", exec_log=str(log))
    [result] = collect([handle], broker, client=client)
    # Then its RESULT reached the client once: the submitter is not told twice
    client.status()
    assert result.ok and result.data == 1
    assert tap.snapshot() == [("watched", "succeeded")]
