"""Faults with real processes: killed agents, a killed broker, missing capabilities,
garbage on the wire, exceptions in agents.

Waits are deadlines on network round trips (STATUS polls, result waits), never sleeps.
"""

from __future__ import annotations

import random
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import msgpack

from wire.errors import DecodeError
from wire.codec import packb
from wire.limits import INLINE_PAYLOAD_MAX, SIGNATURE
from wire.nodes import NodeReport, Scale
from wire.purge import Purge
from wire.tasks import (
    Accepted, Ack, Assignment, Cancel, Command, decode, Direct, DirectVerdict, Disconnect,
    Dispatch, encode, Error, Fetch, Heartbeat, Ping, Pong, Progress, Ready, ResultItem, Results,
    StatusReply, StatusRequest, Submit, TaskList, TaskQuery, TaskSpec, Welcome,
)
from tests.conftest import Cluster
from tests.support import RawPeer, in_flight_of, wait_finished, wait_status

RESULT_TIMEOUT_S = 30.0


def read_log(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


# ------------------------------------------------------------------ agent killed


def test_sigkilled_agent_tasks_complete_once_elsewhere(cluster: Cluster, tmp_path: Path) -> None:
    # Given a broker and a victim agent running up to 4 tasks of 0.5 s each
    broker = cluster.broker()
    victim_log, healthy_log = tmp_path / "victim.log", tmp_path / "healthy.log"
    victim = cluster.agent(broker.url, agent_name="victim", agent_max="4", echo_delay_s="0.5",
                           exec_log=str(victim_log))
    client = cluster.client(broker.url)
    client.wait_for_agents(1, name="victim", timeout=10)
    # And 6 tasks, of which the victim holds 4 and 2 wait in the queue
    handles = [client.submit(capabilities=["echo"], data=i, timeout=30) for i in range(6)]
    # (the broker counts a task in flight when it sends it; the victim's log shows that it
    # also started running it)
    wait_status(client, lambda s: in_flight_of(s, "victim") == 4 and s["tasks"]["pending"] == 2
                and len(read_log(victim_log)) == 4, what="the victim runs 4 tasks")
    # When the victim is SIGKILLed while it holds them, and a healthy agent starts after
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=10)
    cluster.agent(broker.url, agent_name="healthy", exec_log=str(healthy_log))
    # Then every task completes, each exactly once, on the healthy agent
    results = [h.result(timeout=RESULT_TIMEOUT_S) for h in handles]
    assert [r.task_id for r in results] == [h.id for h in handles]
    assert len({r.task_id for r in results}) == 6
    assert all(r.ok for r in results), results
    assert [r.data for r in results] == list(range(6))
    assert {r.agent for r in results} == {"healthy"}
    # And the 4 the victim held were dispatched a second time (attempt 2)
    assert sorted(r.attempts for r in results) == [1, 1, 2, 2, 2, 2]
    assert len(read_log(victim_log)) == 4
    assert sorted(read_log(healthy_log)) == sorted(h.id for h in handles)
    # And the broker counts the redispatch (not duplicate_results: an agent re-sends results
    # that stay unacknowledged for a liveness period, which a busy machine can cause)
    status = wait_status(client, lambda s: s["tasks"]["succeeded"] == 6, what="6 succeeded")
    assert status["tasks"]["redispatched"] == 4
    assert status["tasks"]["in_flight"] == 0 and status["tasks"]["pending"] == 0
    assert [a["name"] for a in status["agents"]] == ["healthy"]


def test_sigkilled_agent_results_reach_client_once_on_the_wire(cluster: Cluster) -> None:
    # Given a victim agent holding 4 tasks submitted by a raw client connection
    broker = cluster.broker()
    victim = cluster.agent(broker.url, agent_name="victim", agent_max="4", echo_delay_s="0.5")
    client = cluster.client(broker.url)
    ids = [f"raw-{i}" for i in range(4)]
    with RawPeer(broker.url, b"raw-client") as peer:
        peer.send(Submit([TaskSpec(i, packb({"data": i}), ("echo",), timeout_s=30.0)
                          for i in ids]))
        wait_status(client, lambda s: in_flight_of(s, "victim") == 4, what="victim holds 4")
        # When the victim is SIGKILLed and a healthy agent takes over
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=10)
        cluster.agent(broker.url, agent_name="healthy")
        wait_status(client, lambda s: s["tasks"]["succeeded"] == 4, what="4 succeeded")
        # Then the raw connection got exactly one RESULT item per task id, all succeeded
        _, received = peer.sync()
    items = [item for msg in received if isinstance(msg, Results) for item in msg.results]
    assert Counter(item.task_id for item in items) == Counter(ids)
    assert {item.status for item in items} == {"succeeded"}
    assert {item.agent for item in items} == {"healthy"}
    accepted = [i for msg in received if isinstance(msg, Accepted) for i in msg.task_ids]
    assert sorted(accepted) == sorted(ids)


def test_registering_agent_gets_welcome_before_tasks(cluster: Cluster) -> None:
    # Regression: the broker used to send TASK before WELCOME to an agent registering while
    # tasks waited; the agent ran them unregistered, then re-sent their results on WELCOME.
    # Given a broker with a task waiting for an echo agent
    broker = cluster.broker()
    client = cluster.client(broker.url)
    client.submit(capabilities=["echo"], data=1, timeout=10).wait_accepted(timeout=10)
    # When a (raw) agent registers
    with RawPeer(broker.url, b"raw-agent") as agent:
        agent.send(Ready("raw-agent", "raw", ("echo",), 4))
        first, second = agent.recv(timeout=10), agent.recv(timeout=10)
    # Then the broker answers READY with WELCOME first, and only then sends the task
    assert (type(first), type(second)) == (Welcome, Dispatch)


def _answer_ping(agent: RawPeer, msg: Any) -> None:
    if isinstance(msg, Ping):
        agent.send(Pong(msg.seq, True))


def _serve_raw(agent: RawPeer, until: Any, running: list[str], within: float) -> list[Any]:
    """Act as a live agent on ``agent`` (heartbeats, answers to health checks, and
    PROGRESS listing ``running``) until ``until(message)`` is true of a message from the
    broker; returns the messages."""
    seen: list[Any] = []
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        agent.send(Heartbeat())
        if running:
            agent.send(Progress(running=running))
        msg = agent.recv(timeout=0.1)
        while msg is not None:
            seen.append(msg)
            if until(msg):
                return seen
            _answer_ping(agent, msg)
            msg = agent.recv(timeout=0)
    raise AssertionError(f"the broker did not send what was awaited within {within:g} s; "
                         f"it sent {[type(m).__name__ for m in seen]}")


def test_a_lost_answer_to_cancel_frees_the_agent_slot_after_a_lease(cluster: Cluster) -> None:
    # Regression: a task copy the agent was told to cancel kept its slot until the agent
    # answered; an answer lost on the way (a partition, a reopened socket) took the slot
    # for good, and an agent with one slot got no work again.
    # Given a raw agent with one slot, running a task
    broker = cluster.broker()
    client = cluster.client(broker.url)
    with RawPeer(broker.url, b"raw-one-slot") as agent:
        agent.send(Ready("raw-one-slot", "raw", ("echo",), 1))
        first = client.submit(capabilities=["echo"], data=1, timeout=60, retries=0)
        got = _serve_raw(agent, lambda m: isinstance(m, Dispatch), [], within=10)
        assert [a.id for a in got[-1].tasks] == [first.id]
        agent.send(Progress(started=[first.id]))
        # When the task is cancelled and the agent keeps running it (listing it)
        first.cancel()
        assert first.result(timeout=RESULT_TIMEOUT_S).status == "cancelled"
        second = client.submit(capabilities=["echo"], data=2, timeout=60)
        # Then the slot stays taken for as long as the agent says it runs the old copy
        seen = _serve_raw(agent, lambda m: isinstance(m, Cancel), [first.id], within=10)
        lease_s = 0.2 * 3
        held = time.monotonic() + 3 * lease_s
        while time.monotonic() < held:
            agent.send(Heartbeat())
            agent.send(Progress(running=[first.id]))
            msg = agent.recv(timeout=0.1)
            assert not isinstance(msg, Dispatch), (msg, seen)
            _answer_ping(agent, msg)
        # And when the agent stops listing it but its answer never comes (it was lost),
        # the slot is freed after a lease period and the waiting task is dispatched
        got = _serve_raw(agent, lambda m: isinstance(m, Dispatch), [], within=10)
        assert [a.id for a in got[-1].tasks] == [second.id]
        status, _ = agent.sync()
        assert status["tasks"]["lost_answers"] == 1


# ------------------------------------------------------------------ broker killed


def test_agent_reregisters_after_broker_sigkill_and_restart(cluster: Cluster) -> None:
    # Given a broker, an agent, and a client that got a result
    broker = cluster.broker()
    cluster.agent(broker.url, agent_name="survivor")
    old_client = cluster.client(broker.url)
    assert old_client.submit(capabilities=["echo"], data="before", timeout=10).result(
        timeout=RESULT_TIMEOUT_S).ok
    # When the broker is SIGKILLed and started again on the same port
    broker.sigkill()
    restarted = cluster.restart(broker)
    assert restarted.url == broker.url
    # Then the agent registers again by itself
    client = cluster.client(restarted.url)
    status = client.wait_for_agents(1, capability="echo", name="survivor", timeout=15)
    assert [a["name"] for a in status["agents"]] == ["survivor"]
    # And new tasks complete, from a new client and from the one that was connected before
    new_results = [client.submit(capabilities=["echo"], data=i, timeout=10) for i in range(10)]
    assert [r.data for r in (h.result(timeout=RESULT_TIMEOUT_S) for h in new_results)] == \
        list(range(10))
    old = old_client.submit(capabilities=["echo"], data="after", timeout=10).result(
        timeout=RESULT_TIMEOUT_S)
    assert old.ok and old.data == "after" and old.agent == "survivor"
    assert restarted.proc.poll() is None


# ------------------------------------------------------------------ no agent (yet)


def test_task_for_unknown_capability_fails_no_agent(cluster: Cluster) -> None:
    # Given a broker with an echo agent only
    broker = cluster.broker()
    cluster.agent(broker.url)
    client = cluster.client(broker.url)
    # When a task needs a capability nobody has, with a 0.5 s timeout
    result = client.submit(capabilities=["nobody_has_this"], data=1, timeout=0.5).result(
        timeout=RESULT_TIMEOUT_S)
    # Then it fails with no_agent, naming the capability
    assert result.status == "failed"
    assert result.error is not None
    assert result.error.code == "no_agent"
    assert "nobody_has_this" in result.error.message
    assert client.status()["tasks"]["failed"] == 1


def test_task_waits_for_agent_that_registers_later(cluster: Cluster) -> None:
    # Given a broker with no agent offering "late"
    broker = cluster.broker()
    client = cluster.client(broker.url)
    # And a task needing "late" with a 15 s timeout, accepted by the broker
    handle = client.submit(capabilities=["late"], data={"n": 7}, timeout=15)
    handle.wait_accepted(timeout=10)
    assert not handle.done()
    assert client.status()["tasks"]["pending"] == 1
    # When an agent with capability "late" registers
    cluster.agent(broker.url, agent_name="latecomer", agent_caps="late")
    # Then the waiting task completes on it
    result = handle.result(timeout=RESULT_TIMEOUT_S)
    assert result.ok, result
    assert result.data == {"n": 7}
    assert result.agent == "latecomer"
    assert result.queued_ms is not None and result.queued_ms > 0


# ------------------------------------------------------------------ fuzz

#: Messages only the broker sends: the broker must refuse them with unknown_command.
BROKER_ONLY = [
    Welcome(1.0, 3, {}),
    TaskList(1, [{"task_id": "t-1"}]),
    DirectVerdict([1], [(2, "no_agent", "gone")]),
    Dispatch([Assignment("t-1", b"x", 1, 1.0, ("echo",))]),
    Accepted(["t-1"]),
    Ack(["t-1"]),
    StatusReply(5, {"x": 1}),
    Error("bad_frame", "no"),
]
#: What the broker handles; every other decodable message it refuses with unknown_command.
BROKER_ACCEPTS = (Submit, Results, Direct, Progress, Heartbeat, Ready, Fetch, StatusRequest,
                  TaskQuery, Cancel, Disconnect, Purge, NodeReport, Scale)
HEADER_KEYS = ["id", "name", "caps", "max", "v", "running", "ivl", "live", "endpoints", "reason",
               "ids", "req", "wait", "until", "timeout_s", "status", "code", "message"]
UNKNOWN_COMMANDS = sorted({*range(256)} - {c.value for c in Command}
                          | {Command.PROGRESS, Command.DIRECT})


def rand_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(10 if depth < 3 else 7)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.choice([0, 1, -1, 2 ** 31, -(2 ** 63), 2 ** 64 - 1, rng.randint(-9, 99)])
    if kind == 3:
        return rng.choice([0.0, -1.5, 1e308, float("inf"), float("-inf"), float("nan")])
    if kind == 4:
        return "".join(rng.choice("ab\u00e9\u4e2d\x00") for _ in range(rng.randrange(6)))
    if kind in (5, 6):
        return rng.randbytes(rng.randrange(12))
    if kind in (7, 8):
        return [rand_value(rng, depth + 1) for _ in range(rng.randrange(10))]
    return {rng.choice(HEADER_KEYS): rand_value(rng, depth + 1) for _ in range(rng.randrange(6))}


def near_miss_header(rng: random.Random, command: Command) -> Any:
    """A header almost right for ``command``: the right outer shape, wrong details."""
    if command in (Command.SUBMIT, Command.RESULT, Command.TASK):
        width = {Command.SUBMIT: 8, Command.RESULT: 9, Command.TASK: 6}[command]
        items = []
        for _ in range(rng.randrange(1, 4)):
            item = [f"fz-{rng.randrange(10 ** 6)}", b"", ["fuzz-nobody"], None, 0, None, None,
                    None, None][:width]
            for _ in range(rng.randrange(1, 3)):
                item[rng.randrange(width)] = rand_value(rng, 2)
            if rng.random() < 0.3:
                item = item[:rng.randrange(width + 2)] + [None] * rng.randrange(2)
            items.append(item)
        return items
    header = {k: rand_value(rng, 2) for k in rng.sample(HEADER_KEYS, rng.randrange(1, 7))}
    if rng.random() < 0.5:
        header["req"] = rng.randrange(1000)
    return header


def fuzz_frames(rng: random.Random) -> list[bytes]:
    """One random, mostly malformed message as a DEALER would send it."""
    kind = rng.randrange(13)
    command = rng.choice(list(Command))
    cmd = bytes((command,))
    if kind == 0:  # random frames of random bytes
        return [rng.randbytes(rng.randrange(40)) for _ in range(rng.randint(1, 6))]
    if kind == 1:  # empty frames
        return [b""] * rng.randint(1, 5)
    if kind == 2:  # another protocol version
        return [rng.choice([b"ORCH1", b"ORCH4"]), cmd, packb({})]
    if kind == 3:  # a wrong signature
        return [rng.choice([b"ORCH", b"ORCH10", b"orch1", b"ZMTP", rng.randbytes(5)]), cmd,
                packb({})]
    if kind == 4:  # a command byte nobody knows
        return [SIGNATURE, bytes((rng.choice(UNKNOWN_COMMANDS),)), packb({"req": 1})]
    if kind == 5:  # garbage where the msgpack header should be
        return [SIGNATURE, cmd, rng.choice([b"\xc1", b"\x92\x01", b"\xde\x00\x05"])
                + rng.randbytes(rng.randrange(20))]
    if kind in (6, 7):  # valid signature, header of the wrong shape
        return [SIGNATURE, cmd, packb(rand_value(rng))]
    if kind == 8:  # valid signature, header almost right
        frames = [SIGNATURE, cmd, packb(near_miss_header(rng, command))]
        return frames + [rng.randbytes(4) for _ in range(rng.randrange(2))]
    if kind == 9:  # huge item counts announced, little data sent
        header = rng.choice([b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff",
                             b"\xc6\xff\xff\xff\xff", b"\xdb\xff\xff\xff\xff",
                             b"\xdc\xff\xff", b"\x91\xdd\x7f\xff\xff\xff"])
        return [SIGNATURE, cmd, header + rng.randbytes(rng.randrange(16))]
    if kind == 10:  # the identity trick: frames as if sent through a ROUTER or by a REQ
        inner = encode(rng.choice([Heartbeat(), StatusRequest(1), Submit([])]))
        prefix = rng.choice([[b"victim-identity"], [b"victim-identity", b""], [b""]])
        return prefix + inner
    if kind == 11:  # a broker-only message sent to the broker
        return encode(rng.choice(BROKER_ONLY))
    # well-formed client and agent commands about tasks nobody knows
    return encode(rng.choice([
        Fetch(rng.randrange(1000), [f"nope-{rng.randrange(10 ** 6)}"]),
        Cancel([f"nope-{rng.randrange(10 ** 6)}"]),
        Results([ResultItem(f"nope-{rng.randrange(10 ** 6)}", "succeeded", b"\x80")]),
        Heartbeat(), Disconnect("fuzz"),
    ]))


def expected_errors(messages: list[list[bytes]]) -> tuple[Counter[str], int]:
    """The ERROR codes the broker should count for ``messages``, and how many messages
    may or may not add a bad_frame (STATUS with a malformed ``until``)."""
    expected: Counter[str] = Counter()
    maybe_bad = 0
    for frames in messages:
        try:
            msg = decode(frames)
        except DecodeError as e:
            expected[e.code] += 1
            continue
        assert not isinstance(msg, Ready), "the fuzz must not register an agent"
        if not isinstance(msg, BROKER_ACCEPTS):
            expected["unknown_command"] += 1
        elif isinstance(msg, Fetch) and msg.task_ids:
            expected["not_found"] += 1
        elif isinstance(msg, Scale) and msg.replicas:
            expected["no_node"] += 1  # the fuzzer is no node supervisor with it
        elif isinstance(msg, StatusRequest) and msg.until:
            maybe_bad += 1
    return expected, maybe_bad


def test_broker_survives_fuzzed_frames(cluster: Cluster) -> None:
    # Given a broker with an echo agent
    broker = cluster.broker()
    cluster.agent(broker.url, agent_name="steady")
    rng = random.Random(20240611)
    messages = []
    while len(messages) < 1000:
        frames = fuzz_frames(rng)
        try:
            if isinstance(decode(frames), Ready):
                continue  # a valid READY would register the fuzzer as an agent
        except DecodeError:
            pass
        messages.append(frames)
    # And a few big ones: many items with bad shapes, a burst of valid tasks for a
    # capability nobody has, and a FETCH of many unknown ids
    messages.append([SIGNATURE, bytes((Command.SUBMIT,)), packb([None] * 50_000)])
    messages.append([SIGNATURE, bytes((Command.SUBMIT,)),
                     packb([[f"fz-{i}", b"", ["x"], None, 0, None, None, None]
                            for i in range(5_000)] + [[1]])])
    messages.append(encode(Submit([TaskSpec(f"burst-{i}", b"\x80", ("fuzz-nobody",),
                                            timeout_s=0.2) for i in range(2_000)])))
    messages.append(encode(Fetch(3, [f"nope-{i}" for i in range(20_000)])))
    messages.append(encode(Submit([TaskSpec("big-blob", 7)]))[:3] + [b"x"] * 3)
    messages.append(encode(Submit([TaskSpec("blob", b"B" * (INLINE_PAYLOAD_MAX + 1),
                                            ("fuzz-nobody",), timeout_s=0.2)])))
    expected, maybe_bad = expected_errors(messages)
    assert expected["bad_frame"] > 100 and expected["unknown_command"] > 50
    assert expected["bad_version"] > 50
    # When they are all sent to the broker's socket from a raw DEALER
    with RawPeer(broker.url, b"fuzzer") as fuzzer:
        for frames in messages:
            fuzzer.send_frames(frames)
        status, replies = fuzzer.sync(timeout=20)
        # Then the broker is alive and answered on the same connection
        assert broker.proc.poll() is None
        # And it counted every refusal under its stable code
        errors = Counter(status["errors"])
        assert set(errors) <= {"bad_frame", "bad_version", "unknown_command", "not_found",
                               "no_node"}
        assert errors["no_node"] == expected["no_node"]
        assert errors["bad_version"] == expected["bad_version"]
        assert errors["unknown_command"] == expected["unknown_command"]
        assert errors["not_found"] == expected["not_found"]
        assert expected["bad_frame"] <= errors["bad_frame"] <= expected["bad_frame"] + maybe_bad
        refused = [m for m in replies if isinstance(m, Error)]
        assert Counter(m.code for m in refused) == errors
    # And a normal client still gets status and a task done, on the real agent
    client = cluster.client(broker.url)
    assert client.status()["agents"][0]["name"] == "steady"
    result = client.submit(capabilities=["echo"], data="still fine", timeout=10).result(
        timeout=RESULT_TIMEOUT_S)
    assert result.ok and result.data == "still fine" and result.agent == "steady"
    # And the burst for the missing capability ended as no_agent, not stuck
    for task_id in ("burst-0", "burst-1999", "blob"):
        ended = wait_finished(client, task_id, timeout=10)
        assert ended.status == "failed" and ended.error.code == "no_agent", ended
    assert client.status()["tasks"]["failed"] >= 2_001
    assert broker.proc.poll() is None


def test_garbage_from_a_peer_that_never_reads_does_not_disturb_others(cluster: Cluster) -> None:
    # Given a broker, an agent and a client with a task in progress
    broker = cluster.broker()
    cluster.agent(broker.url, agent_name="steady", echo_delay_s="0.2")
    client = cluster.client(broker.url)
    handle = client.submit(capabilities=["echo"], data="in progress", timeout=10)
    handle.wait_accepted(timeout=10)
    # When another connection sends 200 garbage messages and never reads the ERROR replies
    with RawPeer(broker.url) as peer:
        for i in range(200):
            peer.send_frames([b"garbage", msgpack.packb(i)])
        wait_status(client, lambda s: s["errors"].get("bad_frame") == 200,
                    what="the broker refused all 200")
    # Then the task in progress completes and the broker is still up
    assert handle.result(timeout=RESULT_TIMEOUT_S).data == "in progress"
    assert client.status()["errors"] == {"bad_frame": 200}
    assert broker.proc.poll() is None


def test_result_from_a_peer_never_given_the_task_is_ignored(cluster: Cluster) -> None:
    # Regression: the broker used to take a 'succeeded' RESULT for any task from any
    # connection (as "an earlier attempt answering"), even for a task never dispatched.
    # Given a task waiting for a capability no agent has (it was never dispatched)
    broker = cluster.broker()
    client = cluster.client(broker.url)
    handle = client.submit(capabilities=["nobody_has_this"], data=1, timeout=0.5)
    handle.wait_accepted(timeout=10)
    # When a connection that never registered sends a 'succeeded' RESULT for it
    with RawPeer(broker.url, b"forger") as forger:
        forger.send(Results([ResultItem(handle.id, "succeeded", packb({"data": "forged"}))]))
        forger.sync()
    # Then the broker ignores it: the task still ends as no_agent, with no forged data
    result = handle.result(timeout=RESULT_TIMEOUT_S)
    assert result.data != "forged"
    assert (result.status, result.error and result.error.code) == ("failed", "no_agent")


# ------------------------------------------------------------------ exception in execute


def test_exception_in_execute_fails_task_and_agent_keeps_serving(cluster: Cluster) -> None:
    # Given an agent whose execute raises ValueError for tasks that say "explode"
    broker = cluster.broker()
    cluster.agent(broker.url, spec="tests.sample_agents:FailingAgent")
    client = cluster.client(broker.url)
    client.wait_for_agents(1, capability="fail", timeout=10)
    # When such a task is submitted
    bad = client.submit(capabilities=["fail"], data={"explode": True}, timeout=10).result(
        timeout=RESULT_TIMEOUT_S)
    # Then it fails with agent_error, and the message names the exception type
    assert bad.status == "failed"
    assert bad.error is not None
    assert bad.error.code == "agent_error"
    assert "ValueError" in bad.error.message
    assert bad.error_type == "ValueError"
    # And the same agent then still serves a good task
    good = client.submit(capabilities=["fail"], data={"explode": False}, timeout=10).result(
        timeout=RESULT_TIMEOUT_S)
    assert good.ok and good.data == "fine"
    assert good.agent == bad.agent == "failing"
    # And the broker's books agree: one task failed (after bad.attempts attempts: the
    # broker may retry agent errors), one succeeded, and the agent is still registered
    status = client.status()
    assert (status["tasks"]["failed"], status["tasks"]["succeeded"]) == (1, 1)
    assert status["tasks"]["retried"] == bad.attempts - 1
    assert [a["name"] for a in status["agents"]] == ["failing"]


def test_exception_in_execute_without_retries_is_one_attempt(cluster: Cluster) -> None:
    # Given the failing agent
    broker = cluster.broker()
    cluster.agent(broker.url, spec="tests.sample_agents:FailingAgent")
    client = cluster.client(broker.url)
    client.wait_for_agents(1, capability="fail", timeout=10)
    # When a task that explodes allows no retries
    bad = client.submit(capabilities=["fail"], data={"explode": True}, retries=0,
                        timeout=10).result(timeout=RESULT_TIMEOUT_S)
    # Then it fails after exactly one attempt, with the exception in the message
    assert (bad.status, bad.error.code, bad.attempts) == ("failed", "agent_error", 1)
    assert bad.error.message.startswith("ValueError: exploded on ")
    # And a good task still runs there
    assert client.submit(capabilities=["fail"], data={}, timeout=10).result(
        timeout=RESULT_TIMEOUT_S).data == "fine"
    status = client.status()
    assert (status["tasks"]["failed"], status["tasks"]["succeeded"]) == (1, 1)
    assert status["tasks"]["retried"] == 0
