"""The broker's limits with real processes (docs/limits.md): an oversized message is
refused ``too_large`` by the SDK, which heard the broker's own limit, and the broker
survives a peer that sends one anyway; an oversized header is answered ``too_large``
undecoded; a client over its pending limit gets ``queue_full`` while another still
submits; a client at its in-flight limit waits, while another's tasks use the other
slots."""

from __future__ import annotations

import pytest
import zmq

from agent_sdk import TooLarge
from tests.conftest import Cluster
from tests.support import RawPeer, wait_status
from wire.codec import packb
from wire.limits import MAX_HEADER_BYTES, SIGNATURE
from wire.state import StateCommand, StateErrorReply, decode_state
from wire.tasks import Command, Error

#: the smallest frame limit a broker takes (wire.limits.MIN_MESSAGE_BYTES)
SMALL_LIMIT = 4 * 1024 * 1024
RESULT_TIMEOUT_S = 30.0


def test_an_oversized_message_is_refused_too_large_and_the_broker_stays_up(
        cluster: Cluster) -> None:
    # Given a broker whose frame limit is 4 MiB, below the SDK's default of 64 MiB
    broker = cluster.broker("--max-message-bytes", str(SMALL_LIMIT))
    cluster.agent(broker.url)
    client = cluster.client(broker.url)
    client.wait_for_agents(1)
    # When a client submits 5 MiB before it heard the broker's limit
    first = client.submit(capabilities=["echo"], data=b"x" * (5 * 1024 * 1024))
    # Then the task waits for the limit and ends rejected too_large, naming it (the
    # frame never left: the broker would have dropped the connection)
    result = first.result(timeout=RESULT_TIMEOUT_S)
    assert result.status == "rejected" and result.error is not None
    assert result.error.code == "too_large" and str(SMALL_LIMIT) in result.error.message
    # And once heard, an oversized submit is refused at once, in the call
    with pytest.raises(TooLarge) as refused:
        client.submit(capabilities=["echo"], data=b"y" * (SMALL_LIMIT + 1))
    assert refused.value.code == "too_large" and refused.value.limit == SMALL_LIMIT
    # When a peer bypasses the SDK and sends an oversized frame anyway
    with RawPeer(broker.url) as raw:
        raw.send_frames([SIGNATURE, bytes([Command.SUBMIT]), packb([]),
                         b"z" * (SMALL_LIMIT + 1)])
        # (libzmq drops that connection; a new one is served as usual)
    # Then the broker is still up and a normal task completes
    assert broker.proc.poll() is None
    ok = client.submit(capabilities=["echo"], data="after").result(timeout=RESULT_TIMEOUT_S)
    assert ok.ok and ok.data == "after"
    # And just under the limit still goes through
    big = client.submit(capabilities=["echo"], data=b"b" * (SMALL_LIMIT - 1024))
    assert big.result(timeout=RESULT_TIMEOUT_S).ok


def test_an_agent_refuses_a_result_over_the_broker_limit_it_was_told(
        cluster: Cluster) -> None:
    # Given a broker whose frame limit is 4 MiB and an agent that makes results of any size
    broker = cluster.broker("--max-message-bytes", str(SMALL_LIMIT))
    cluster.agent(broker.url, "tests.sample_agents:SizedResultAgent")
    client = cluster.client(broker.url)
    client.wait_for_agents(1, "sized")
    # When a task's result is 5 MiB
    big = client.submit(capabilities=["sized"], data={"size": 5 * 1024 * 1024},
                        retries=0).result(timeout=RESULT_TIMEOUT_S)
    # Then it fails too_large, naming the limit the broker announced (never sent whole)
    assert big.status == "failed" and big.error is not None
    assert big.error.code == "too_large" and str(SMALL_LIMIT) in big.error.message
    # And the agent carries on with results that fit
    small = client.submit(capabilities=["sized"], data={"size": 1024}).result(
        timeout=RESULT_TIMEOUT_S)
    assert small.ok and len(small.data) == 1024


def test_an_oversized_header_is_answered_too_large_and_nothing_else_happens(
        cluster: Cluster) -> None:
    broker = cluster.broker()
    cluster.agent(broker.url)
    client = cluster.client(broker.url)
    client.wait_for_agents(1)
    # When a raw peer sends a SUBMIT whose header is over the header limit
    with RawPeer(broker.url) as raw:
        raw.send_frames([SIGNATURE, bytes([Command.SUBMIT]),
                         packb(["h" * (MAX_HEADER_BYTES + 1)])])
        status, received = raw.sync()
    # Then it gets one ERROR too_large naming the limit, and no task was accepted
    refusals = [m for m in received if isinstance(m, Error)]
    assert [e.code for e in refusals] == ["too_large"]
    assert str(MAX_HEADER_BYTES) in refusals[0].message
    assert "max_header_bytes" in refusals[0].message
    assert status["tasks"]["submitted"] == 0
    # And the SDK refuses such a header itself (a task id bigger than the limit)
    with pytest.raises(TooLarge) as refused:
        client.submit(capabilities=["echo"], data=1, task_id="i" * (MAX_HEADER_BYTES + 1))
    assert refused.value.limit == MAX_HEADER_BYTES
    # And the broker goes on
    assert client.submit(capabilities=["echo"], data=2).result(timeout=RESULT_TIMEOUT_S).ok


def test_the_state_service_answers_an_oversized_header_too_large(cluster: Cluster) -> None:
    broker = cluster.broker()
    state_url = cluster.client(broker.url).status()["broker"]["endpoints"]["state"]
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.linger = 0
    try:
        sock.connect(state_url)
        # When a request's header is over the header limit
        sock.send_multipart([SIGNATURE, bytes([StateCommand.GET]),
                             packb({"req": 1, "key": "k" * (MAX_HEADER_BYTES + 1)})])
        # Then the answer is an ERROR too_large naming the limit, not a decode of it
        assert sock.poll(int(RESULT_TIMEOUT_S * 1000)), "no answer from the state service"
        reply = decode_state(sock.recv_multipart())
        assert isinstance(reply, StateErrorReply) and reply.code == "too_large"
        assert str(MAX_HEADER_BYTES) in reply.message
    finally:
        sock.close(linger=0)
        context.term()


def test_a_client_over_its_pending_limit_gets_queue_full_while_another_submits(
        cluster: Cluster) -> None:
    # Given a broker with no agents that lets a client have 3 unfinished tasks
    broker = cluster.broker("--max-pending-per-client", "3")
    greedy = cluster.client(broker.url)
    other = cluster.client(broker.url)
    # When the greedy client submits 5
    handles = [greedy.submit(capabilities=["echo"], data=i, timeout=60) for i in range(5)]
    # Then 3 are accepted and 2 end rejected queue_full, naming the limit
    for handle in handles[:3]:
        handle.wait_accepted(timeout=RESULT_TIMEOUT_S)
    for handle in handles[3:]:
        result = handle.result(timeout=RESULT_TIMEOUT_S)
        assert result.status == "rejected" and result.error is not None
        assert result.error.code == "queue_full"
        assert "max_pending_per_client" in result.error.message
    # And another client still gets its tasks accepted
    mine = [other.submit(capabilities=["echo"], data=i, timeout=60) for i in range(3)]
    for handle in mine:
        handle.wait_accepted(timeout=RESULT_TIMEOUT_S)
    status = wait_status(other, lambda s: s["queue"]["pending"] == 6, what="6 pending")
    assert status["limits"]["max_pending_per_client"] == 3


def test_a_client_at_its_in_flight_limit_waits_while_another_uses_the_other_slots(
        cluster: Cluster) -> None:
    # Given one agent with 4 slots and a limit of 2 tasks in flight per client
    broker = cluster.broker("--max-in-flight-per-client", "2")
    cluster.agent(broker.url, "tests.sample_agents:GroupCountingAgent", agent_max="4",
                  echo_delay_s="0.3")
    greedy = cluster.client(broker.url)
    other = cluster.client(broker.url)
    greedy.wait_for_agents(1)
    # When the greedy client submits 10 tasks, then the other client 4
    mine = [greedy.submit(capabilities=["echo"], data={"group": "greedy"}, timeout=120)
            for _ in range(10)]
    mine[0].wait_accepted(timeout=RESULT_TIMEOUT_S)
    theirs = [other.submit(capabilities=["echo"], data={"group": "other"}, timeout=120)
              for _ in range(4)]
    results = [h.result(timeout=120) for h in mine + theirs]
    # Then every task succeeded (the greedy client's waited, none was refused) ...
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    greedy_runs = [r.data for r in results[:10]]
    other_runs = [r.data for r in results[10:]]
    # ... the greedy client never had more than 2 running at once, and had 2
    assert max(run["group"] for run in greedy_runs) == 2
    assert max(run["group"] for run in other_runs) <= 2
    # ... and the other client's tasks ran beside them, in the slots left free
    assert max(run["total"] for run in other_runs) >= 3
