"""ACCEPTED timing, driven step by step: a real broker socket and a real client DEALER,
with the broker's clock in the test's hands (a 2 ms delay cannot be tested reliably
against the wall clock on a loaded machine)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from broker.config import BrokerConfig
from wire.tasks import Accepted, Cancel, decode, encode, Submit, TaskSpec
from broker.server import ACCEPT_DELAY_S, Broker
from wire.sockets import has_input, recv_frames, send_frames


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def wired(tmp_path: Path) -> Iterator[tuple[Broker, Clock, zmq.Socket[Any]]]:
    clock = Clock()
    broker = Broker(BrokerConfig(bind="127.0.0.1:0", data_dir=tmp_path), clock=clock)
    endpoint = broker.bind()
    client = zmq.Context.instance().socket(zmq.DEALER)
    client.setsockopt(zmq.ROUTING_ID, b"client-1")
    client.connect(endpoint)
    try:
        yield broker, clock, client
    finally:
        client.close(linger=0)
        broker._close()


def submit(broker: Broker, client: zmq.Socket[Any], *task_ids: str) -> None:
    """Send a SUBMIT (for a capability no agent has, so the tasks stay open) and let the
    broker handle it in one pass."""
    specs = [TaskSpec(task_id, b"\x80", ("nobody-has-this",), None, 0, 60.0)
             for task_id in task_ids]
    send_frames(client, encode(Submit(specs)))
    router = broker._router
    assert router is not None
    assert router.poll(5000), "the SUBMIT did not reach the broker"
    broker._drain(router)
    broker._timers_dispatch_flush(broker.clock())


def accepted_ids(broker: Broker, client: zmq.Socket[Any], expected: bool) -> list[str]:
    """Run one broker pass at the current fake time; the ids ACCEPTED by it.

    When nothing is ``expected``, a short wait shows that nothing came; an ACCEPTED sent
    too early but arriving late would still be caught by the next call's exact check."""
    broker._timers_dispatch_flush(broker.clock())
    ids: list[str] = []
    while client.poll(5000 if expected and not ids else 100):
        msg = decode(recv_frames(client))
        if isinstance(msg, Accepted):
            ids.extend(msg.task_ids)
        if not has_input(client):
            break
    return ids


def test_each_submit_waits_its_own_accept_delay(wired: Any) -> None:
    broker, clock, client = wired
    submit(broker, client, "a")
    clock.now += ACCEPT_DELAY_S * 0.75
    submit(broker, client, "b")
    assert accepted_ids(broker, client, expected=False) == []

    clock.now += ACCEPT_DELAY_S * 0.5  # a's delay is over, b's is not
    assert accepted_ids(broker, client, expected=True) == ["a"]

    clock.now += ACCEPT_DELAY_S * 0.5  # now b's is
    assert accepted_ids(broker, client, expected=True) == ["b"]


def test_submits_due_together_are_confirmed_in_one_message(wired: Any) -> None:
    broker, clock, client = wired
    submit(broker, client, "a", "b")
    submit(broker, client, "c")
    clock.now += ACCEPT_DELAY_S * 1.01
    broker._timers_dispatch_flush(broker.clock())
    assert client.poll(5000)
    msg = decode(recv_frames(client))
    assert isinstance(msg, Accepted) and msg.task_ids == ["a", "b", "c"]


def test_the_poll_timeout_wakes_the_broker_for_the_oldest_owed_accepted(wired: Any) -> None:
    broker, clock, client = wired
    submit(broker, client, "a")
    clock.now += ACCEPT_DELAY_S / 2
    submit(broker, client, "b")
    # a is due in half the delay: the loop must not sleep longer than that
    assert broker._poll_timeout_ms() <= int(ACCEPT_DELAY_S / 2 * 1000) + 1


def test_a_submit_whose_tasks_all_ended_no_longer_wakes_the_broker(wired: Any) -> None:
    broker, clock, client = wired
    submit(broker, client, "a")
    assert broker._poll_timeout_ms() <= int(ACCEPT_DELAY_S * 1000) + 1
    # The task ends (cancelled) before its ACCEPTED is due: its RESULT said more, and
    # waking up for it would cost a pass in the middle of the next round trip.
    send_frames(client, encode(Cancel(["a"])))
    router = broker._router
    assert router is not None
    assert router.poll(5000), "the CANCEL did not reach the broker"
    broker._drain(router)
    broker._timers_dispatch_flush(broker.clock())
    assert "a" not in broker.tasks
    assert broker._poll_timeout_ms() > int(ACCEPT_DELAY_S * 1000) + 1
    assert not broker._accepted_due
