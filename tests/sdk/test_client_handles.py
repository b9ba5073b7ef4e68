"""TaskHandle: results kept on the handle, done callbacks, awaiting, with a real broker.

Waits are deadlines on round trips (results, events set by callbacks), never sleeps.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import zmq

from agent_sdk import Client
from agent_sdk.client import TaskHandle
from agent_sdk.errors import WaitTimeout
from agent_sdk.loop import run as run_loop
from wire.errors import TooLarge
from wire.limits import MAX_FRAME_BYTES
from wire.tasks import decode, Submit
from wire.sockets import recv_frames
from tests.conftest import Cluster

RESULT_S = 30.0


def test_done_callbacks_run_once_in_order_when_the_result_arrives(cluster: Cluster) -> None:
    broker = cluster.broker()
    cluster.agent(broker.url)

    async def scenario() -> tuple[list[tuple[str, Any]], Any, Any]:
        async with Client(broker.url) as client:
            calls: list[tuple[str, Any]] = []
            both = asyncio.Event()
            handle = client.submit(capabilities=["echo"], data="hello", timeout=RESULT_S)
            # Before the result: not done, and result_nowait says so
            with pytest.raises(asyncio.InvalidStateError):
                handle.result_nowait()

            def first(h: TaskHandle) -> None:
                calls.append(("first", h.result_nowait().data))

            def second(h: TaskHandle) -> None:
                calls.append(("second", h is handle))
                both.set()

            handle.add_done_callback(first)
            handle.add_done_callback(second)
            await asyncio.wait_for(both.wait(), RESULT_S)
            awaited = await handle.result(timeout=RESULT_S)
            # A callback added after the result is in runs too, soon, on the loop
            late = asyncio.Event()
            handle.add_done_callback(lambda h: late.set())
            assert not late.is_set()
            await asyncio.wait_for(late.wait(), RESULT_S)
            return calls, awaited, await handle
    calls, awaited, again = run_loop(scenario())
    assert calls == [("first", "hello"), ("second", True)]
    assert awaited.ok and awaited.data == "hello"
    assert again is awaited


def test_an_exception_in_a_callback_is_reported_and_the_client_goes_on(
        cluster: Cluster) -> None:
    broker = cluster.broker()
    cluster.agent(broker.url)

    async def scenario() -> tuple[list[dict[str, Any]], list[str], Any]:
        loop = asyncio.get_running_loop()
        reported: list[dict[str, Any]] = []
        loop.set_exception_handler(lambda _, context: reported.append(context))
        async with Client(broker.url) as client:
            ran: list[str] = []
            after = asyncio.Event()
            handle = client.submit(capabilities=["echo"], data=1, timeout=RESULT_S)

            def broken(_: TaskHandle) -> None:
                ran.append("broken")
                raise ValueError("callback bug")

            def fine(_: TaskHandle) -> None:
                ran.append("fine")
                after.set()

            handle.add_done_callback(broken)
            handle.add_done_callback(fine)
            await asyncio.wait_for(after.wait(), RESULT_S)
            # The client still serves: the next task completes
            following = await client.submit(capabilities=["echo"], data=2,
                                            timeout=RESULT_S).result(timeout=RESULT_S)
            return reported, ran, following
    reported, ran, following = run_loop(scenario())
    assert ran == ["broken", "fine"]
    assert len(reported) == 1 and isinstance(reported[0]["exception"], ValueError)
    assert "callback" in reported[0]["message"]
    assert following.ok and following.data == 2


def test_many_awaiters_of_one_handle_get_the_same_result_whatever_the_others_do(cluster: Cluster) -> None:
    broker = cluster.broker()

    async def scenario() -> list[Any]:
        async with Client(broker.url) as client:
            # No agent offers the capability yet: the task cannot finish (and make the
            # cancelled waiter below return instead) until the agent starts at the end
            handle = client.submit(capabilities=["echo-later"], data=[1, 2], timeout=RESULT_S)
            # One waiter times out first; that must not spoil the others
            with pytest.raises(WaitTimeout):
                await handle.result(timeout=0.0)
            # Nor must one that is cancelled
            waiting = asyncio.Event()

            async def wait_for_result() -> Any:
                waiting.set()  # set, then straight into handle.result() in the same step
                return await handle.result()

            cancelled = asyncio.ensure_future(wait_for_result())
            await asyncio.wait_for(waiting.wait(), RESULT_S)
            cancelled.cancel()
            with pytest.raises(asyncio.CancelledError):
                await cancelled
            await asyncio.to_thread(cluster.agent, broker.url, agent_caps="echo-later")
            return await asyncio.gather(*(handle.result(timeout=RESULT_S) for _ in range(3)))
    results = run_loop(scenario())
    assert [r.data for r in results] == [[1, 2]] * 3
    assert results[0] is results[1] is results[2]


def test_sync_handle_callback_runs_on_the_client_thread(cluster: Cluster) -> None:
    broker = cluster.broker()
    cluster.agent(broker.url)
    client = cluster.client(broker.url)
    arrived = threading.Event()
    seen: list[Any] = []

    def note(handle: Any) -> None:
        seen.append((handle.id, handle.result_nowait().data, threading.current_thread().name))
        arrived.set()

    handle = client.submit(capabilities=["echo"], data="sync", timeout=RESULT_S)
    handle.add_done_callback(note)
    assert arrived.wait(RESULT_S)
    assert seen == [(handle.id, "sync", "orchestrator-client")]
    assert handle.done() and handle.result_nowait().data == "sync"


@pytest.fixture
def fake_broker() -> Iterator[zmq.Socket[Any]]:
    """A bare ROUTER standing in for the broker: the test reads what the client sends."""
    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.bind("tcp://127.0.0.1:0")
    try:
        yield router
    finally:
        router.close(linger=0)


def next_submit(router: zmq.Socket[Any], timeout_ms: int) -> Submit | None:
    """The next SUBMIT the client sent (its pings are skipped), or None after the wait."""
    while router.poll(timeout_ms):
        msg = decode(recv_frames(router)[1:])
        if isinstance(msg, Submit):
            return msg
    return None


def test_a_lone_task_leaves_at_once_and_tasks_behind_it_go_in_one_batch(
        fake_broker: zmq.Socket[Any]) -> None:
    url = fake_broker.getsockopt_string(zmq.LAST_ENDPOINT)

    async def scenario() -> tuple[list[str], list[str], list[str]]:
        async with Client(url) as client:
            lone = client.submit(capabilities=["echo"], data=1)
            # No await since: with nothing else in flight, submit sent it itself (the
            # blocking wait below holds the loop, so no flush could have run).
            first = next_submit(fake_broker, 5000)
            assert first is not None, "a lone task waited for the loop's flush"
            second = client.submit(capabilities=["echo"], data=2)
            third = client.submit(capabilities=["echo"], data=3)
            # With a task in flight, tasks wait for the flush and leave together.
            batch = await asyncio.get_running_loop().run_in_executor(
                None, next_submit, fake_broker, 5000)
            assert batch is not None, "the batched tasks were never flushed"
            return ([spec.id for spec in first.tasks], [spec.id for spec in batch.tasks],
                    [lone.id, second.id, third.id])
    first_ids, batch_ids, handle_ids = run_loop(scenario())
    assert first_ids == handle_ids[:1]
    assert batch_ids == handle_ids[1:]


def test_an_oversized_payload_is_refused_by_submit_and_leaves_nothing_behind(
        fake_broker: zmq.Socket[Any]) -> None:
    url = fake_broker.getsockopt_string(zmq.LAST_ENDPOINT)

    async def scenario() -> list[str]:
        async with Client(url) as client:
            with pytest.raises(TooLarge) as refused:
                client.submit(capabilities=["echo"], data=b"x" * (MAX_FRAME_BYTES + 1))
            assert refused.value.code == "too_large"
            # No handle waits for it: the next task is alone in flight and leaves at once.
            after = client.submit(capabilities=["echo"], data="small")
            sent = next_submit(fake_broker, 5000)
            assert sent is not None
            return [spec.id for spec in sent.tasks] + [after.id]
    ids = run_loop(scenario())
    assert ids[0] == ids[1]
