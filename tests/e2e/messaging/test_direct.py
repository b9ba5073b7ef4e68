"""Direct messages through the broker, with real processes: request/reply by id and by
name, unknown and dead receivers, load balancing, broadcast, ordering, clients."""

from __future__ import annotations

import signal
import time
from collections import Counter

import pytest

from agent_sdk import MailboxFull, NoSuchAgent, RemoteError
from tests.e2e.messaging.conftest import Messaging, wait_status, wait_until

#: Messages in the ordering test.
ORDERED = 10_000
#: Deadline of one request in these tests.
REQUEST_S = 10.0


def test_request_reply_between_agents_by_id_and_by_name(messaging: Messaging) -> None:
    # Given a replier and an asker agent, each in a process of its own
    replier = messaging.agent("Replier")
    asker = messaging.agent("Asker")
    client = messaging.client()
    # When the asker requests the replier by its id, then by its name
    by_id = client.submit(capabilities=["ask"],
                          data={"request": replier.agent_id, "value": 1}).result(REQUEST_S)
    by_name = client.submit(capabilities=["ask"],
                            data={"request": "replier", "value": 2}).result(REQUEST_S)
    # Then each request got the replier's answer, which saw the asker as the sender and
    # the address as it was written
    assert by_id.data == {"echo": 1, "agent_id": replier.agent_id, "sender": asker.agent_id,
                          "to": replier.agent_id}
    assert by_name.data == {"echo": 2, "agent_id": replier.agent_id, "sender": asker.agent_id,
                            "to": "replier"}


def test_unknown_agent_fails_fast_with_no_agent(messaging: Messaging) -> None:
    # Given an asker agent and a client
    messaging.agent("Asker")
    client = messaging.client()
    # When the agent requests an agent that does not exist
    result = client.submit(capabilities=["ask"], data={"request": "nobody"}).result(REQUEST_S)
    # Then it gets no_agent at once (a broker round trip), not a timeout
    assert result.data["error"] == "no_agent" and result.data["type"] == "NoSuchAgent"
    assert result.data["elapsed_s"] < 2.0
    # And a client's send and request to nobody fail the same way
    started = time.monotonic()
    with pytest.raises(NoSuchAgent) as info:
        client.send("nobody", {"op": "echo"})
    assert info.value.code == "no_agent"
    with pytest.raises(NoSuchAgent):
        client.request("nobody", {"op": "echo"}, timeout=REQUEST_S)
    assert time.monotonic() - started < 2.0


def test_dead_agent_gets_no_agent(messaging: Messaging) -> None:
    # Given a replier that answers, by id
    replier = messaging.agent("Replier")
    client = messaging.client()
    assert client.request(replier.agent_id, {"op": "echo", "value": 1},
                          timeout=REQUEST_S)["echo"] == 1
    # When it is killed and the broker declared it dead
    replier.proc.send_signal(signal.SIGKILL)
    wait_status(client, lambda s: not s["agents"], what="the replier was removed")
    # Then messages to its id and to its name fail with no_agent
    with pytest.raises(NoSuchAgent):
        client.request(replier.agent_id, {"op": "echo"}, timeout=REQUEST_S)
    with pytest.raises(NoSuchAgent):
        client.send("replier", {"op": "echo"})


def test_stopped_agent_declared_dead_is_refused_even_while_connected(
        messaging: Messaging) -> None:
    # Given a replier whose process is stopped (its TCP connection stays up)
    replier = messaging.agent("Replier")
    client = messaging.client()
    replier.proc.send_signal(signal.SIGSTOP)
    try:
        # When the broker declared it dead (no heartbeats)
        wait_status(client, lambda s: not s["agents"], what="the stopped replier was removed")
        # Then a message to its id is refused with no_agent rather than queued for a peer
        # the broker considers gone
        with pytest.raises(NoSuchAgent):
            client.send(replier.agent_id, {"op": "note", "value": 1})
    finally:
        replier.proc.send_signal(signal.SIGCONT)


def test_name_balances_over_instances_and_broadcast_reaches_all(messaging: Messaging) -> None:
    # Given two instances of the agent name "replier"
    first = messaging.agent("Replier")
    second = messaging.agent("Replier")
    client = messaging.client()
    # When ten requests go to the name
    answered = Counter(client.request("replier", {"op": "echo"}, timeout=REQUEST_S)["agent_id"]
                       for _ in range(10))
    # Then the instances took turns
    assert answered == {first.agent_id: 5, second.agent_id: 5}
    # When a message is broadcast to the name
    client.send("replier", {"op": "note", "value": "to all"}, broadcast=True)
    # Then every instance got it (one sender's messages arrive in order, so the request
    # that follows sees it)
    for agent in (first, second):
        notes = client.request(agent.agent_id, {"op": "notes"}, timeout=REQUEST_S)
        assert notes == {"notes": ["to all"], "agent_id": agent.agent_id}


def test_ten_thousand_direct_messages_arrive_in_order(messaging: Messaging) -> None:
    # Given a sender agent and a receiver agent in separate processes
    receiver = messaging.agent("Replier")
    messaging.agent("Asker")
    client = messaging.client()
    # When the sender sends 0..9,999 as separate direct messages (without waiting for
    # each verdict) and then waits until the broker routed them all
    result = client.submit(capabilities=["ask"], data={
        "send_numbers": receiver.agent_id, "count": ORDERED}).result(60)
    assert result.data == {"sent": ORDERED}, result
    # Then the receiver got every one, once, in the order sent (the query travels the
    # same broker->receiver connection behind them, so it sees them all)
    collected = wait_until(
        lambda: client.request(receiver.agent_id, {"op": "collected"}, timeout=REQUEST_S),
        lambda c: c["count"] >= ORDERED, what="all messages arrived")
    assert collected == {"count": ORDERED, "in_order": True, "distinct": ORDERED}


def test_handler_errors_and_replies_reach_the_requester(messaging: Messaging) -> None:
    # Given a replier
    replier = messaging.agent("Replier")
    client = messaging.client()
    # When a request makes its handler raise
    with pytest.raises(RemoteError) as info:
        client.request(replier.agent_id, {"op": "fail"}, timeout=REQUEST_S)
    # Then the requester gets agent_error with the exception, and the replier goes on
    assert info.value.code == "agent_error" and "ValueError: asked to fail" in str(info.value)
    assert info.value.sender == replier.agent_id
    assert client.request(replier.agent_id, {"op": "echo", "value": 3},
                          timeout=REQUEST_S)["echo"] == 3


def test_agents_reach_clients_and_clients_reply(messaging: Messaging) -> None:
    # Given a client with a mailbox, and an asker agent
    client = messaging.client()
    client.ping()
    messaging.agent("Asker")
    client_id = client.client.client_id
    # When an agent sends numbers to the client by its client id
    assert client.submit(capabilities=["ask"], data={"send_numbers": client_id,
                                                     "count": 50}).result(REQUEST_S).ok
    # Then the client's mailbox has them in order
    assert [client.receive(5).data for _ in range(50)] == list(range(50))
    # When an agent asks the client a question
    handle = client.submit(capabilities=["ask"], data={"ask_client": client_id})
    question = client.receive(10)
    assert question.expects_reply and question.data == {"question": "name?"}
    client._call(client.client.reply(question, "a client"))
    # Then the agent gets the client's reply
    assert handle.result(REQUEST_S).data == {"answer": "a client"}


def test_full_mailbox_drops_counts_and_refuses_requests(messaging: Messaging) -> None:
    # Given an agent whose mailbox holds 5 messages and who never reads it
    hoarder = messaging.agent("Hoarder", mailbox_size="5")
    client = messaging.client()
    # When 20 messages reach it (the broker routes them all) and then a request
    for i in range(20):
        client.send(hoarder.agent_id, i)
    # Then the request is refused with mailbox_full (not left to time out)
    with pytest.raises(MailboxFull) as info:
        client.request(hoarder.agent_id, {"op": "echo"}, timeout=REQUEST_S)
    assert info.value.code == "mailbox_full"
    # And the broker's status shows the agent's losses (reported with its heartbeats)
    status = wait_status(client, lambda s: s["agents"] and s["agents"][0]["messaging"].get(
        "mailbox_dropped", 0) >= 16, what="the hoarder reported its drops")
    assert status["agents"][0]["messaging"]["mailbox_dropped"] == 16
    assert status["agents"][0]["messaging"]["direct_received"] == 21
