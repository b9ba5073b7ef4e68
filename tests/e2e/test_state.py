"""The state service with real processes: concurrent updates, mutual exclusion, a killed
lock holder, watches, a SIGKILLed service, bad input, agents and the CLI.

The service runs in the broker process the ``cluster`` fixture starts (or alone, for the
restart test); workers are ``tests/state_worker.py`` processes released together through
their stdin. Waits are replies and events with deadlines, never sleeps.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import zmq

from agent_sdk import (
    Change, Client, LockTimeout, StaleFencingToken, StateClient, StateError, VersionConflict,
)
from agent_sdk.loop import run as run_loop
from agent_sdk.state import ConnectionState
from wire.codec import packb
from wire.limits import SIGNATURE
from wire.state import (
    decode_state, MAX_VALUE_BYTES, StateCommand, StateErrorReply, StateInfo, StateWelcome,
)
from tests.conftest import ROOT, TEST_HEARTBEAT_S, TEST_LIVENESS, BrokerProcess, Cluster, read_json_line

T = TypeVar("T")

#: Deadline of every wait on a worker or an event.
WAIT_S = 30.0


def state_url(broker: BrokerProcess) -> str:
    """The state service the broker process runs (from its ready document)."""
    return str(json.loads((broker.data_dir / "broker.json").read_bytes())["state"])


def worker(cluster: Cluster, *args: str) -> subprocess.Popen[bytes]:
    """A ``tests.state_worker`` process, killed at teardown by the fixture. Modes that
    wait for "go" get a stdin pipe (see :func:`release`)."""
    barrier = args[0] != "hold"
    proc = subprocess.Popen([sys.executable, "-m", "tests.state_worker", *args], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdin=subprocess.PIPE if barrier else subprocess.DEVNULL,
                            stdout=subprocess.PIPE)
    cluster.procs.append(proc)
    return proc


def release(procs: list[subprocess.Popen[bytes]]) -> None:
    """Wait until every worker is connected, then let them all start at once."""
    for proc in procs:
        assert read_json_line(proc)["event"] == "ready"
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write(b"go\n")
        proc.stdin.close()  # the line stays readable in the pipe


async def in_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run a blocking call (reading a worker's output) without stopping the loop, so
    that heartbeats and watch events keep flowing meanwhile."""
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


async def until(predicate: Callable[[], Awaitable[bool]], what: str,
                timeout: float = WAIT_S) -> None:
    """Ask the service until ``predicate()`` holds (each ask is a round trip)."""
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout:g} s")


class Collector:
    """A watch handler that records changes and wakes a waiter when enough arrived."""

    def __init__(self) -> None:
        self.changes: list[Change] = []
        self._done: Callable[[], bool] = lambda: False
        self._reached = asyncio.Event()

    def __call__(self, change: Change) -> None:
        self.changes.append(change)
        if self._done():
            self._reached.set()

    async def _wait(self, done: Callable[[], bool], what: str, timeout: float) -> None:
        self._done = done
        self._reached.clear()
        if done():
            return
        try:
            await asyncio.wait_for(self._reached.wait(), timeout)
        except asyncio.TimeoutError:
            raise AssertionError(f"the watch saw {len(self.changes)} change(s), not {what}, "
                                 f"within {timeout:g} s") from None

    async def wait_for_version(self, version: int, timeout: float = WAIT_S) -> None:
        """Return once a change at ``version`` or later arrived."""
        await self._wait(lambda: bool(self.changes) and self.changes[-1].version >= version,
                         f"version {version}", timeout)

    async def wait_for_count(self, count: int, timeout: float = WAIT_S) -> None:
        """Return once ``count`` changes arrived."""
        await self._wait(lambda: len(self.changes) >= count, f"{count}", timeout)


# ------------------------------------------------------------------ the five


#: Broker options for the contended tests: six busy processes share two cores here, and a
#: worker starved for 3 x 0.2 s must not lose its session (and its lock) to the scheduler.
RELAXED_HEARTBEAT = ("--heartbeat-interval", "1.0")


def test_four_processes_updating_one_counter_lose_no_update(cluster: Cluster) -> None:
    url = state_url(cluster.broker(*RELAXED_HEARTBEAT))

    async def scenario() -> None:
        async with StateClient(url) as state:
            # Given a counter at 0 and a watch on it
            start = await state.set("counter", 0)
            seen = Collector()
            await state.watch("counter", seen)
            # When 4 processes each apply update(+1) 500 times, all at once
            workers = [worker(cluster, "update", url, "counter", "500") for _ in range(4)]
            await in_thread(release, workers)
            for proc in workers:
                assert (await in_thread(read_json_line, proc, WAIT_S))["event"] == "done"
            # Then the counter is exactly 2,000, after exactly 2,000 more versions
            final = await state.get_entry("counter")
            assert final.value == 2000
            assert final.version == start + 2000
            # And a watcher saw every one of those writes, in order, each adding 1
            await seen.wait_for_version(final.version)
            assert [c.value for c in seen.changes] == list(range(1, 2001))
            assert [c.version for c in seen.changes] == list(range(start + 1, start + 2001))

    run_loop(scenario())


def test_four_processes_taking_one_lock_never_overlap(cluster: Cluster, tmp_path: Path) -> None:
    url = state_url(cluster.broker(*RELAXED_HEARTBEAT))
    shared = tmp_path / "shared.log"
    # When 4 processes take the same lock 200 times each, writing a begin and an end line
    # and incrementing a counter by read-then-write inside it
    workers = [worker(cluster, "lock", url, "mutex", "200", str(shared)) for _ in range(4)]
    release(workers)
    tokens_by_worker = [read_json_line(proc, WAIT_S)["tokens"] for proc in workers]
    # Then the file is 800 begin/end pairs, never interleaved
    lines = shared.read_text().splitlines()
    assert len(lines) == 1600
    file_tokens = []
    for begin, end in zip(lines[0::2], lines[1::2]):
        kind_b, pid_b, token_b = begin.split()
        kind_e, pid_e, token_e = end.split()
        assert (kind_b, kind_e) == ("begin", "end"), (begin, end)
        assert (pid_b, token_b) == (pid_e, token_e), (begin, end)
        file_tokens.append(int(token_b))
    # And fencing tokens strictly increase, in the file and for every worker
    assert all(a < b for a, b in zip(file_tokens, file_tokens[1:]))
    for tokens in tokens_by_worker:
        assert len(tokens) == 200 and all(a < b for a, b in zip(tokens, tokens[1:]))
    # And no read-modify-write inside the lock was lost
    state_count = run_loop(_get(url, "mutex/count"))
    assert state_count == 800


async def _get(url: str, key: str) -> Any:
    async with StateClient(url) as state:
        return await state.get(key)


def test_writes_apply_in_the_order_made_while_the_session_opens(cluster: Cluster) -> None:
    # Given a state client whose session is not open yet, and writes waiting for it
    url = state_url(cluster.broker())

    async def scenario() -> Any:
        state = StateClient(url)
        try:
            waiting = [asyncio.create_task(state.set("order", i)) for i in range(20)]
            # When one more write is made the moment the session opens: connect() was
            # the first to wait for it, so it wakes before the waiting writes do
            await state.connect()
            assert state.state is ConnectionState.READY
            await state.set("order", "last")
            await asyncio.gather(*waiting)
            return await state.get("order")
        finally:
            await state.close()

    # Then it applies last, as it was made last
    assert run_loop(scenario()) == "last"


def test_a_killed_holders_lock_passes_on_within_ttl_and_its_token_goes_stale(
        cluster: Cluster) -> None:
    url = state_url(cluster.broker())
    ttl_s = 1.0

    async def scenario() -> None:
        # Given a process holding the lock "leader" with a 1 s lease (renewing it)
        holder = worker(cluster, "hold", url, "leader", str(ttl_s))
        held = await in_thread(read_json_line, holder, WAIT_S)
        dead_token = held["token"]
        async with StateClient(url, name="successor") as state:
            # And this client waiting for the same lock
            waiting = asyncio.ensure_future(state.acquire("leader", ttl=5, wait=WAIT_S))

            async def queued() -> bool:
                return any(lock.waiters == 1 for lock in await state.locks("leader"))

            await until(queued, "the successor queues for the lock")
            # When the holder is SIGKILLed
            holder.send_signal(signal.SIGKILL)
            killed_at = time.monotonic()
            lease = await asyncio.wait_for(waiting, WAIT_S)
            waited_s = time.monotonic() - killed_at
            # Then the lock passes on within ttl + one heartbeat interval, with a higher token
            assert waited_s <= ttl_s + TEST_HEARTBEAT_S, waited_s
            assert lease.token > dead_token
            # And a write fenced with the dead holder's token is refused, the new one's not
            with pytest.raises(StaleFencingToken):
                await state.set("leader/data", "from the dead", fence=("leader", dead_token))
            assert await state.set("leader/data", "from the living", fence=lease) > 0
            assert await state.get("leader/data") == "from the living"
            await lease.release()

    run_loop(scenario())


def test_a_watcher_sees_every_one_of_1000_changes_in_order(cluster: Cluster) -> None:
    url = state_url(cluster.broker())

    async def scenario() -> None:
        async with StateClient(url, name="watcher") as state:
            seen = Collector()
            await state.watch("w/", seen)
            # When another process makes 1,000 changes (writes and deletes) under "w/"
            writer = worker(cluster, "write", url, "w/", "1000")
            await in_thread(release, [writer])
            done = await in_thread(read_json_line, writer, WAIT_S)
            made = [tuple(change) for change in done["changes"]]
            assert len(made) == 1000
            await seen.wait_for_count(1000)
            # Then the watcher saw exactly those changes, in the same order
            assert [(c.key, None if c.deleted else c.value) for c in seen.changes] == made
            versions = [c.version for c in seen.changes]
            assert all(a < b for a, b in zip(versions, versions[1:]))

    run_loop(scenario())


def test_values_and_versions_survive_a_sigkill_of_the_service(cluster: Cluster,
                                                              tmp_path: Path) -> None:
    data_dir = tmp_path / "state"
    args = ("-m", "broker.state", "--data-dir", str(data_dir), "--heartbeat-interval",
            str(TEST_HEARTBEAT_S), "--heartbeat-liveness", str(TEST_LIVENESS),
            "--log-level", "WARNING")

    def start(port: int) -> tuple[subprocess.Popen[bytes], str]:
        proc = subprocess.Popen([sys.executable, *args, "--bind", f"127.0.0.1:{port}"],
                                cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                                stdout=subprocess.PIPE)
        cluster.procs.append(proc)
        return proc, read_json_line(proc)["state"]

    service, url = start(0)
    port = int(url.rsplit(":", 1)[1])

    async def scenario() -> None:
        async with StateClient(url, name="survivor") as survivor:
            # Given keys written many times, a deleted key, a ttl key and a used lock
            for i in range(300):
                await survivor.set(f"k/{i % 30}", {"i": i, "blob": b"\x00\x01" * (i % 7)})
            await survivor.delete("k/29")
            await survivor.set("k/ttl", "soon", ttl=3600)
            async with survivor.lock("L") as lease:
                old_token = lease.token
            seen = Collector()
            await survivor.watch("after/", seen)
            before = await survivor.list()
            # When the service is SIGKILLed right after the last acknowledged write, and
            # started again on the same port and data dir
            service.send_signal(signal.SIGKILL)
            await in_thread(service.wait, 10)
            _, url_again = await in_thread(start, port)
            assert url_again == url
            # Then a new client finds every value at the same version
            async with StateClient(url, name="reader") as reader:
                assert await reader.list() == before
                assert "k/29" not in [e.key for e in before]
                # And versions and fencing tokens continue above the old ones
                assert await reader.set("new", 1) > max(e.version for e in before)
                async with reader.lock("L") as lease:
                    assert lease.token > old_token
            # And the client connected across the crash carries on, watch included
            version = await survivor.set("after/x", "hello")
            await seen.wait_for_version(version)
            assert [(c.key, c.value) for c in seen.changes] == [("after/x", "hello")]

    run_loop(scenario())


# ------------------------------------------------------------------ more behaviour


def test_a_silent_holder_loses_its_lease_and_learns_it(cluster: Cluster) -> None:
    url = state_url(cluster.broker())

    async def scenario() -> None:
        holder = worker(cluster, "hold", url, "job", "30")
        token = (await in_thread(read_json_line, holder, WAIT_S))["token"]
        async with StateClient(url) as state:
            # When the holder stops (SIGSTOP: its connection stays open, it sends nothing)
            holder.send_signal(signal.SIGSTOP)
            try:
                # Then its session expires and the lock is free long before its 30 s ttl
                lease = await state.acquire("job", ttl=5, wait=TEST_HEARTBEAT_S * TEST_LIVENESS * 5)
                assert lease.token == token + 1
            finally:
                holder.send_signal(signal.SIGCONT)
            # And the holder, running again, finds out that its lease is lost
            lost = await in_thread(read_json_line, holder, WAIT_S)
            assert lost == {"event": "lost", "token": token}
            await lease.release()

    run_loop(scenario())


def test_lock_wait_times_out_with_a_clear_error_and_cas_conflicts_carry_the_version(
        cluster: Cluster) -> None:
    url = state_url(cluster.broker())

    async def scenario() -> None:
        async with StateClient(url, name="a") as a, StateClient(url, name="b") as b:
            async with a.lock("busy", ttl=10):
                started = time.monotonic()
                with pytest.raises(LockTimeout) as timeout:
                    await b.acquire("busy", wait=0.3)
                assert time.monotonic() - started >= 0.3
                assert timeout.value.name == "busy" and "busy" in str(timeout.value)
                with pytest.raises(LockTimeout):
                    await b.acquire("busy", wait=0)
            version = await a.set("cfg", {"v": 1})
            with pytest.raises(VersionConflict) as conflict:
                await b.cas("cfg", version - 1, {"v": 2})
            assert conflict.value.current_version == version
            assert conflict.value.current_value == {"v": 1}
            assert await b.cas("cfg", version, {"v": 2}) > version
            with pytest.raises(VersionConflict):
                await b.cas("fresh", 5, 1)
            assert await b.cas("fresh", 0, 1) > 0
            with pytest.raises(StateError) as too_large:
                await a.set("big", b"x" * MAX_VALUE_BYTES)
            assert too_large.value.code == "too_large"

    run_loop(scenario())


class RawState:
    """A bare DEALER speaking the state protocol by hand."""

    def __init__(self, url: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(url)

    def ask(self, frames: list[bytes], timeout_s: float = 5.0) -> Any:
        self.sock.send_multipart(frames)
        assert self.sock.poll(int(timeout_s * 1000)), f"no answer to {frames[:2]!r}"
        return decode_state(self.sock.recv_multipart())

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()


def _frames(command: int, header: Any) -> list[bytes]:
    return [SIGNATURE, bytes([command]), packb(header)]


def test_bad_input_gets_stable_error_codes_and_never_stops_the_service(cluster: Cluster) -> None:
    url = state_url(cluster.broker())
    raw = RawState(url)
    try:
        # Before HELLO: no session
        reply = raw.ask(_frames(StateCommand.GET, {"req": 1, "key": "k"}))
        assert (reply.code, reply.req) == ("no_session", 1)
        assert isinstance(raw.ask(_frames(StateCommand.HELLO, {"req": 2, "name": "raw"})),
                          StateWelcome)
        cases: list[tuple[list[bytes], str, int | None]] = [
            (_frames(0x4F, {"req": 3}), "unknown_command", None),
            (_frames(0x20, []), "unknown_command", None),
            (_frames(StateCommand.VALUE, {"req": 4, "key": "k", "version": 1, "value": None}),
             "unknown_command", 4),
            ([SIGNATURE, bytes([StateCommand.GET]), b"\xc1\xc1"], "bad_frame", None),
            ([SIGNATURE, bytes([StateCommand.GET])], "bad_frame", None),
            ([b"ORCH9", bytes([StateCommand.GET]), packb({"req": 5})], "bad_version", None),
            (_frames(StateCommand.GET, {"req": 6, "key": 42}), "bad_request", 6),
            (_frames(StateCommand.PUT, {"req": 7, "key": "k", "value": "not bin"}),
             "bad_request", 7),
            (_frames(StateCommand.PUT, {"req": 8, "key": "k",
                                        "value": b"x" * (MAX_VALUE_BYTES + 1)}), "too_large", 8),
            (_frames(StateCommand.ACQUIRE, {"req": 9, "name": "l", "ttl_s": 0}), "bad_request", 9),
            (_frames(StateCommand.RENEW, {"req": 10, "name": "l", "token": 1}), "not_held", 10),
            (_frames(StateCommand.LIST, {"req": 11, "limit": 10 ** 9}), "bad_request", 11),
            (_frames(StateCommand.PUT, {"req": 12, "key": "k", "value": b"\x01",
                                        "fence": ["l", 3]}), "stale_token", 12),
        ]
        for frames, code, req in cases:
            reply = raw.ask(frames)
            assert isinstance(reply, StateErrorReply), (frames, reply)
            assert (reply.code, reply.req) == (code, req), (frames, reply)
        # And random garbage: every message answered, the service still serving
        rng = random.Random(7)
        values: list[Any] = [None, -1, 0, 1.5, "", "k", b"", [1], {"a": None}, True]
        for i in range(300):
            header = {rng.choice(["req", "key", "value", "name", "ttl_s", "token", "prefix",
                                  "watch", "since", "fence", "expected", "limit"]):
                      rng.choice(values) for _ in range(rng.randrange(5))}
            header["req"] = 1000 + i
            command = rng.randrange(0x40, 0x4D)
            if command in (StateCommand.HELLO, StateCommand.PING):
                continue
            reply = raw.ask(_frames(command, header))
            assert getattr(reply, "req", None) == 1000 + i or isinstance(reply, StateErrorReply)
        info = raw.ask(_frames(StateCommand.INFO, {"req": 5000}))
        assert isinstance(info, StateInfo) and info.info["errors"]["bad_request"] >= 4
    finally:
        raw.close()


def test_agents_count_tasks_with_self_state_and_clients_read_it(cluster: Cluster) -> None:
    broker = cluster.broker()
    for _ in range(2):
        cluster.agent(broker.url, "tests.state_worker:CounterAgent")

    async def scenario() -> None:
        async with Client(broker.url) as client:
            await client.wait_for_agents(2, "count", timeout=WAIT_S)
            # When 40 tasks each add 1 to a shared counter from two agent processes
            handles = [client.submit(capabilities=["count"], data={"key": "agent/count"})
                       for _ in range(40)]
            results = [await h.result(timeout=WAIT_S) for h in handles]
            assert all(r.ok for r in results), [r.error for r in results if not r.ok]
            # Then every increment landed, and the client reaches the same state service
            # through the endpoint the broker announces
            assert sorted(r.data for r in results) == list(range(1, 41))
            assert await client.state.get("agent/count") == 40
            assert client.state.url == state_url(broker)

    run_loop(scenario())


def test_agent_state_used_before_registration_fails_fast_with_advice() -> None:
    from agent_sdk import StateUnavailable
    from tests.state_worker import CounterAgent

    # Given an agent that has not started (as inside on_start, before it registers)
    agent = CounterAgent()

    async def scenario() -> None:
        # Then self.state says why it cannot work yet, instead of waiting forever
        with pytest.raises(StateUnavailable, match="on_start"):
            await agent.state.get("k")
        await agent.state.close()

    run_loop(scenario())


def orchestrator(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ORCH_HOME": str(home), "PYTHONPATH": str(ROOT)}
    env.pop("ORCH_STATE", None)
    return subprocess.run([sys.executable, "-m", "cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=WAIT_S)


def test_cli_state_commands_print_one_json_document(cluster: Cluster, tmp_path: Path) -> None:
    broker = cluster.broker()
    home = tmp_path / "home"
    via_broker = ("--broker", broker.url, "state")
    # set (JSON value), get, list and del, finding the service through the broker
    put = orchestrator(home, *via_broker, "set", "cfg/a", '{"x": [1, 2]}', "--json")
    assert put.returncode == 0, put.stderr
    version = json.loads(put.stdout)["version"]
    got = orchestrator(home, *via_broker, "get", "cfg/a", "--json")
    assert json.loads(got.stdout) == {"key": "cfg/a", "value": {"x": [1, 2]},
                                      "version": version, "exists": True}
    plain = orchestrator(home, "state", "--state", state_url(broker), "set", "cfg/b", "hi there")
    assert plain.returncode == 0, plain.stderr
    listed = orchestrator(home, *via_broker, "list", "cfg/", "--values", "--json")
    assert [(e["key"], e["value"]) for e in json.loads(listed.stdout)] == [
        ("cfg/a", {"x": [1, 2]}), ("cfg/b", "hi there")]
    conflict = orchestrator(home, *via_broker, "set", "cfg/a", "1", "--expect-version", "0")
    assert conflict.returncode == 1 and "conflict" in conflict.stderr
    deleted = orchestrator(home, *via_broker, "del", "cfg/a", "--json")
    assert json.loads(deleted.stdout) == {"key": "cfg/a", "deleted": True}
    missing = orchestrator(home, *via_broker, "get", "cfg/a")
    assert missing.returncode == 1
    locks = orchestrator(home, *via_broker, "locks", "--json")
    assert locks.returncode == 0 and json.loads(locks.stdout) == []
    unreachable = orchestrator(home, "state", "--state", "tcp://127.0.0.1:1", "get", "x")
    assert unreachable.returncode == 3


def test_cli_locks_lists_a_held_lock(cluster: Cluster, tmp_path: Path) -> None:
    # A CLI process starts while the lease is held: on a loaded machine that can take
    # longer than the tests' 0.6 s session expiry, so this session gets a relaxed one.
    broker = cluster.broker(*RELAXED_HEARTBEAT)
    url = state_url(broker)

    async def scenario() -> None:
        async with StateClient(url, name="owner") as state:
            async with state.lock("deploy/prod", ttl=30) as lease:
                shown = await in_thread(orchestrator, tmp_path, "state", "--state", url,
                                        "locks", "--json")
                [row] = json.loads(shown.stdout)
                assert (row["name"], row["token"], row["holder"]) == ("deploy/prod",
                                                                      lease.token, "owner")
                assert 0 < row["expires_in_s"] <= 30

    run_loop(scenario())


def test_broker_without_state_announces_none(cluster: Cluster) -> None:
    broker = cluster.broker("--no-state")
    info = json.loads((broker.data_dir / "broker.json").read_bytes())
    assert "state" not in info

    async def scenario() -> None:
        async with Client(broker.url) as client:
            with pytest.raises(Exception) as missing:
                await client.state.get("k")
            assert "no state service" in str(missing.value)

    run_loop(scenario())
