"""Pub/sub on the bus, with real processes: topics, prefixes, late joiners, broker events."""

from __future__ import annotations

import signal

import pytest

from agent_sdk import WaitTimeout
from tests.e2e.messaging.conftest import Messaging, wait_status

#: Messages per topic in the fan-out test.
COUNT = 1000
#: How long an agent may take to confirm its subscriptions or to receive a batch.
AGENT_WAIT_S = 20.0
#: Messages published right before the publisher closes (fewer than a subscription queues).
BURST = 9_000
PAD = b"x" * 1000


def test_three_subscribers_each_get_all_of_their_topic_and_nothing_else(
        messaging: Messaging) -> None:
    # Given three subscriber agents on three topics and a publisher agent, in processes of
    # their own, with every subscription confirmed
    topics = ["alpha", "beta", "gamma"]
    subscribers = {topic: messaging.agent("Subscriber", agent_name=f"sub-{topic}",
                                          sub_topic=topic) for topic in topics}
    publisher = messaging.agent("Publisher")
    client = messaging.client()
    for subscriber in subscribers.values():
        client.request(subscriber.agent_id, {"op": "ready"}, timeout=AGENT_WAIT_S)
    # When the publisher sends 1,000 messages on each topic, and on a fourth one nobody
    # subscribed to, interleaved
    reply = client.request(publisher.agent_id, {
        "op": "publish", "topics": [*topics, "delta"], "count": COUNT, "wait_for": topics},
        timeout=AGENT_WAIT_S)
    assert reply == {"published": 4 * COUNT}
    # Then each subscriber got all 1,000 of its topic, in order, numbered 1..1000, and no
    # message of another topic, and lost none
    for topic, subscriber in subscribers.items():
        seen = client.request(subscriber.agent_id, {
            "op": "received", "until": {topic: COUNT}, "timeout_s": AGENT_WAIT_S},
            timeout=AGENT_WAIT_S + 5)
        assert seen["counts"] == {topic: COUNT}, (topic, seen)
        assert seen["in_order"] == {topic: True}
        assert (seen["first"][topic], seen["last"][topic]) == (1, COUNT)
        assert seen["stats"].get("bus_gaps", 0) == 0
        assert seen["stats"].get("bus_overflow", 0) == 0


def test_late_joiner_gets_only_what_is_published_after_its_subscription(
        messaging: Messaging) -> None:
    # Given a subscriber on "news" and a publisher, and 300 messages already published
    early = messaging.agent("Subscriber", agent_name="early", sub_topic="news")
    publisher = messaging.agent("Publisher")
    client = messaging.client()
    client.request(early.agent_id, {"op": "ready"}, timeout=AGENT_WAIT_S)
    client.request(publisher.agent_id, {"op": "publish", "topics": ["news"], "count": 300,
                                        "wait_for": ["news"]}, timeout=AGENT_WAIT_S)
    # When a second subscriber joins, confirms its subscription (its own probe came back
    # through the forwarder), and 300 more messages are published
    late = messaging.agent("Subscriber", agent_name="late", sub_topic="news")
    assert client.request(late.agent_id, {"op": "ready"}, timeout=AGENT_WAIT_S) == \
        {"confirmed": ["news"]}
    client.request(publisher.agent_id, {"op": "publish", "topics": ["news"], "count": 300},
                   timeout=AGENT_WAIT_S)
    # Then the late joiner has exactly the second batch: no history. The publisher's
    # sequence numbers went on (301..600), and the first one it saw is its baseline: the
    # 300 messages from before it joined do not count as lost.
    late_seen = client.request(late.agent_id, {
        "op": "received", "until": {"news": 300}, "timeout_s": AGENT_WAIT_S},
        timeout=AGENT_WAIT_S + 5)
    assert late_seen["counts"] == {"news": 300}
    assert (late_seen["first"]["news"], late_seen["last"]["news"]) == (1, 300)
    assert late_seen["seqs"] == {"news": [301, 600]}
    assert late_seen["stats"].get("bus_gaps", 0) == 0
    # And the early subscriber has both batches
    early_seen = client.request(early.agent_id, {
        "op": "received", "until": {"news": 600}, "timeout_s": AGENT_WAIT_S},
        timeout=AGENT_WAIT_S + 5)
    assert early_seen["counts"] == {"news": 600}
    assert early_seen["stats"].get("bus_gaps", 0) == 0


def test_client_subscribes_by_prefix_and_unsubscribes(messaging: Messaging) -> None:
    # Given a client subscribed (confirmed) to the prefix "metrics." and to "end"
    client = messaging.client()
    metrics = client.subscribe("metrics.")
    end = client.subscribe("end")
    # When it publishes on topics that do and do not start with the prefix
    for topic, value in [("metrics.cpu", 1), ("metricsX", 2), ("metrics.mem", 3),
                         ("other", 4), ("end", 5)]:
        client.publish(topic, value)
    # Then the prefix subscription got exactly the two matching messages, in order, each
    # with its topic, publisher and per-topic sequence number
    first, second = metrics.next(5), metrics.next(5)
    assert [(m.topic, m.data, m.seq) for m in (first, second)] == \
        [("metrics.cpu", 1, 1), ("metrics.mem", 3, 1)]
    assert first.sender == client.client.client_id
    assert end.next(5).data == 5
    # When it unsubscribes and publishes on the prefix again, then on "end"
    metrics.unsubscribe()
    client.publish("metrics.cpu", 6)
    client.publish("end", 7)
    # Then "end" arrives (one publisher's messages keep their order to one subscriber) and
    # nothing more arrived for "metrics."
    assert end.next(5).data == 7
    with pytest.raises(WaitTimeout):
        metrics.next(0.2)


def test_messages_published_right_before_close_still_arrive(messaging: Messaging) -> None:
    # Given a subscriber, and a publisher that has seen its subscription
    subscriber = messaging.client()
    news = subscriber.subscribe("burst")
    publisher = messaging.client()
    publisher.wait_for_subscribers("burst")

    # When the publisher publishes a burst and closes at once (most of the burst is still
    # queued in its socket then)
    async def publish_and_close() -> None:
        for i in range(BURST):
            await publisher.client.publish("burst", [i, PAD])
        await publisher.client.close()

    publisher._call(publish_and_close())
    # Then every message arrives, in order
    assert [news.next(10).data[0] for _ in range(BURST)] == list(range(BURST))


def test_broker_publishes_agent_and_task_events(messaging: Messaging) -> None:
    # Given a client watching "agents." and "tasks."
    client = messaging.client()
    agents = client.subscribe("agents.")
    tasks = client.subscribe("tasks.")
    # When an agent registers
    replier = messaging.agent("Replier")
    # Then "agents.joined" says so
    joined = agents.next(10)
    assert joined.topic == "agents.joined" and joined.sender == "broker"
    assert joined.data == {"id": replier.agent_id, "name": "replier", "capabilities": ["reply"]}
    # When a task runs on it
    result = client.submit(capabilities=["reply"], data=1, task_id="watched-1").result(10)
    assert result.ok
    # Then tasks.<id> carries every state change, numbered 1, 2, 3...
    events = []
    while not events or events[-1].data["state"] != "succeeded":
        events.append(tasks.next(10))
    assert {e.topic for e in events} == {"tasks.watched-1"}
    assert [e.data["state"] for e in events] == ["pending", "dispatched", "succeeded"]
    assert [e.seq for e in events] == [1, 2, 3]
    assert events[1].data["agent"] == replier.agent_id and events[1].data["attempt"] == 1
    assert events[0].data["at"] <= events[1].data["at"] <= events[2].data["at"]
    # When the agent dies
    replier.proc.send_signal(signal.SIGKILL)
    # Then "agents.left" says so, with the reason
    left = agents.next(10)
    assert left.topic == "agents.left"
    assert left.data["id"] == replier.agent_id and left.data["reason"] in ("dead", "unreachable")


def test_task_events_are_published_only_while_somebody_subscribes(messaging: Messaging) -> None:
    # Given a broker with an agent, and nobody watching tasks
    messaging.agent("Replier")
    client = messaging.client()
    assert client.submit(capabilities=["reply"], data=1).result(10).ok
    before = client.status()["messaging"]["bus"]["events_published"]
    # When tasks run, then a client subscribes to one task's topic only
    for _ in range(5):
        assert client.submit(capabilities=["reply"], data=1).result(10).ok
    assert client.status()["messaging"]["bus"]["events_published"] == before
    watch = client.subscribe("tasks.mine")
    wait_status(client, lambda s: s["messaging"]["bus"]["subscribed_prefixes"] >= 1,
                what="the broker heard of the subscription")
    for _ in range(5):
        assert client.submit(capabilities=["reply"], data=1).result(10).ok
    assert client.submit(capabilities=["reply"], data=1, task_id="mine").result(10).ok
    # Then only the watched task's changes were published
    assert client.status()["messaging"]["bus"]["events_published"] == before + 3
    assert [watch.next(5).data["state"] for _ in range(3)] == \
        ["pending", "dispatched", "succeeded"]
