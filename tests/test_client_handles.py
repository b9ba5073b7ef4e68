"""TaskHandle: results kept on the handle, done callbacks, awaiting, with a real broker.

Waits are deadlines on round trips (results, events set by callbacks), never sleeps.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from agent_sdk import Client
from agent_sdk.client import TaskHandle
from agent_sdk.errors import WaitTimeout
from agent_sdk.loop import run as run_loop
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
    cluster.agent(broker.url)

    async def scenario() -> list[Any]:
        async with Client(broker.url) as client:
            handle = client.submit(capabilities=["echo"], data=[1, 2], timeout=RESULT_S)
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
