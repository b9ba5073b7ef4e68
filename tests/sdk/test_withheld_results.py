"""Large results withheld by the broker: read in chunks by the client, windowed by the agent.

The broker sends ``Withheld(size)`` in place of a large result's payload (RESULT and
FETCH alike); the client reads it with READ requests of at most READ_CHUNK_BYTES, a few
results at a time, and delivers it whole. An agent sends large results only within a
window of unacknowledged bytes. Real broker and agent processes where the broker's part
matters; a bare ROUTER standing in for the broker where a test needs it to misbehave
(lose a result mid-read, stay silent); the runner alone, in process, for the window's
bookkeeping. Waits are deadlines on events and round trips, never sleeps.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
import zmq

from agent_sdk import BaseAgent, Client, Result, SyncClient, Task
from agent_sdk.client import TaskHandle
from agent_sdk.loop import run as run_loop
from agent_sdk.payloads import MAX_PARALLEL_READS, PayloadReader, ResultUnreadable
from agent_sdk.runner import LARGE_RESULT_BYTES, LARGE_WINDOW_BYTES, TaskRunner
from bench.large_results import blob
from tests.conftest import Cluster
from tests.support import RawPeer
from wire.codec import packb
from wire.limits import MAX_BATCH_ITEMS, READ_CHUNK_BYTES
from wire.sockets import recv_frames
from wire.tasks import (
    Accepted, Assignment, Chunk, Error, ErrorCode, Fetch, Heartbeat, Message, Read, Release,
    ResultItem, Results, Submit, TaskSpec, Withheld, decode, encode,
)

RESULT_S = 60.0
#: Far above the broker's default result store threshold (1 MiB): always withheld.
BIG = 20_000_000
BIG_AGENT = "bench.large_results:BigAgent"


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def expected(seed: int, size: int = BIG) -> str:
    return digest(blob(seed, size))


# ------------------------------------------------------------------ with the real broker


def test_a_large_result_arrives_whole_through_every_path(cluster: Cluster) -> None:
    broker = cluster.broker()
    cluster.agent(broker.url, BIG_AGENT)

    async def scenario() -> dict[str, tuple[str, int]]:
        seen: dict[str, tuple[str, int]] = {}
        async with Client(broker.url) as client, Client(broker.url) as other:
            reader = client._payloads
            handle = client.submit(capabilities=["big"], data={"seed": 1, "size": BIG},
                                   timeout=RESULT_S)
            result = await handle.result(timeout=RESULT_S)
            seen["result"] = (digest(result.data), reader.chunks_read)
            seen["result_nowait"] = (digest(handle.result_nowait().data), reader.chunks_read)
            fetched = await client.fetch(handle.id, timeout=RESULT_S)
            seen["fetch"] = (digest(fetched.data), reader.chunks_read)
            watched = await other.watch(handle.id).result(timeout=RESULT_S)
            seen["watch"] = (digest(watched.data), other._payloads.chunks_read)
        return seen

    seen = run_loop(scenario())
    chunks = -(-BIG // READ_CHUNK_BYTES)  # the chunks of one read: ceil(size / chunk)
    assert seen == {"result": (expected(1), chunks), "result_nowait": (expected(1), chunks),
                    "fetch": (expected(1), 2 * chunks), "watch": (expected(1), chunks)}

    # And the blocking client sees the same through its handles and fetch
    sync = cluster.client(broker.url)
    handle = sync.submit(capabilities=["big"], data={"seed": 2, "size": BIG}, timeout=RESULT_S)
    assert digest(handle.result(RESULT_S).data) == expected(2)
    assert digest(handle.result_nowait().data) == expected(2)
    assert digest(sync.fetch(handle.id, timeout=RESULT_S).data) == expected(2)
    assert digest(sync.watch(handle.id).result(RESULT_S).data) == expected(2)
    assert sync.client._payloads.chunks_read == 3 * chunks


def gate_reads(reader: PayloadReader, first_chunks_of: int
               ) -> tuple[asyncio.Event, asyncio.Event, list[tuple[str, int, int, int]]]:
    """Let each read's first chunk through, then hold the reads until ``go`` is set.

    Returns ``(go, held, log)``: ``held`` is set once the first chunks of
    ``first_chunks_of`` reads came back; ``log`` lists each chunk as (task id, offset,
    bytes, the payload's size) in the order they came.
    """
    go, held = asyncio.Event(), asyncio.Event()
    log: list[tuple[str, int, int, int]] = []
    firsts: set[str] = set()
    ask: Callable[[Callable[[int], Message], float], Awaitable[Any]] = reader._ask

    async def gated(make: Callable[[int], Message], timeout: float) -> Any:
        read = make(0)
        assert isinstance(read, Read)
        if read.offset > 0:
            await go.wait()
        chunk = await ask(make, timeout)
        log.append((chunk.task_id, chunk.offset, len(chunk.data), chunk.total))
        if chunk.offset == 0:
            firsts.add(chunk.task_id)
            if len(firsts) >= first_chunks_of:
                held.set()
        return chunk

    reader._ask = gated
    return go, held, log


def test_a_small_result_arrives_while_large_results_are_being_read(cluster: Cluster) -> None:
    broker = cluster.broker()
    cluster.agent(broker.url, BIG_AGENT)
    cluster.agent(broker.url)  # echo

    async def scenario() -> None:
        async with Client(broker.url) as client:
            reader = client._payloads
            go, held, log = gate_reads(reader, MAX_PARALLEL_READS)
            large = [client.submit(capabilities=["big"], data={"seed": n, "size": BIG},
                                   timeout=RESULT_S) for n in range(3)]
            # Given reads of large results under way: a first chunk of each came back,
            # and the rest of them waits
            await asyncio.wait_for(held.wait(), RESULT_S)
            assert reader.reading == MAX_PARALLEL_READS
            # When a small task is submitted then
            small = await client.submit(capabilities=["echo"], data="small",
                                        timeout=RESULT_S).result(timeout=RESULT_S)
            # Then its result arrives while the large ones are still being read
            assert small.ok and small.data == "small"
            assert not any(handle.done() for handle in large)
            assert reader.reading == MAX_PARALLEL_READS
            # And the large ones arrive whole once their reads go on, in chunks
            go.set()
            results = [await handle.result(timeout=RESULT_S) for handle in large]
            assert [digest(r.data) for r in results] == [expected(n) for n in range(3)]
            assert all(size <= READ_CHUNK_BYTES for _, _, size, _ in log)
            for handle in large:
                chunks = [(offset, size, total) for task_id, offset, size, total in log
                          if task_id == handle.id]
                assert [offset for offset, _, _ in chunks] == \
                    list(range(0, chunks[0][2], READ_CHUNK_BYTES))
                assert sum(size for _, size, _ in chunks) == chunks[0][2] > BIG

    run_loop(scenario())


def test_reading_an_unknown_task_fails_cleanly(cluster: Cluster) -> None:
    broker = cluster.broker()
    # On the wire: READ of an unknown id is answered with ERROR not_found naming the request
    with RawPeer(broker.url) as peer:
        peer.send(Read(7, "no-such-task", 0, 1024))
        _, before = peer.sync()  # the broker answers a peer's messages in order
    answer = next(msg for msg in before if not isinstance(msg, Heartbeat))
    assert isinstance(answer, Error)
    assert (answer.code, answer.req, answer.task_ids) == ("not_found", 7, ["no-such-task"])

    # In the SDK: a handle whose withheld result cannot be read fails, naming the task
    async def scenario() -> ResultUnreadable:
        async with Client(broker.url) as client:
            handle = TaskHandle("no-such-task", client)
            client._payloads.take(ResultItem("no-such-task", "succeeded", Withheld(BIG)),
                                  handle, None)
            with pytest.raises(ResultUnreadable) as failed:
                await handle.result(timeout=RESULT_S)
            with pytest.raises(ResultUnreadable):
                handle.result_nowait()
            return failed.value

    error = run_loop(scenario())
    assert error.code == "not_found" and error.task_id == "no-such-task"
    assert "no-such-task" in str(error) and "retention" in str(error)


class WindowAgent(BaseAgent):
    """Finishes its large tasks all at once (each waits until ``batch`` have arrived), and
    answers a ``report`` task with what its runner's window did: the most large-result
    bytes unacknowledged after any flush, and the most large results held back."""

    def __init__(self) -> None:
        super().__init__(name="window", capabilities=["window"], max_concurrent=16)
        self.arrived = 0
        self.all_here = asyncio.Event()
        self.peak_bytes = 0
        self.most_held = 0
        runner = self._task_runner
        flush = runner.flush

        def watched_flush() -> None:
            flush()
            # Counted from what is unacknowledged and no longer waiting (sent), not from
            # the runner's own count of it
            waiting = {item[0] for item in runner._large_waiting}
            sent = sum(len(item[2]) for task_id, item in runner.unacked.items()
                       if len(item[2]) >= LARGE_RESULT_BYTES and task_id not in waiting)
            self.peak_bytes = max(self.peak_bytes, sent)
            self.most_held = max(self.most_held, len(waiting))

        runner.flush = watched_flush  # type: ignore[method-assign]

    async def execute(self, task: Task) -> Result:
        if task.get("report"):
            return Result(data={"peak_bytes": self.peak_bytes, "most_held": self.most_held,
                                "window": self._task_runner.window_bytes})
        self.arrived += 1
        if self.arrived >= task.batch:
            self.all_here.set()
        await self.all_here.wait()
        return Result(data=blob(task.seed, task.size))


def test_an_agent_keeps_at_most_its_window_of_large_results_unacknowledged(
        cluster: Cluster) -> None:
    broker = cluster.broker()
    cluster.agent(broker.url, "tests.sdk.test_withheld_results:WindowAgent")
    client = cluster.client(broker.url)
    # Six results of 20 MB finish at once: 120 MB, far more than the 64 MiB window
    handles = [client.submit(capabilities=["window"], seed=n, size=BIG, batch=6,
                             timeout=RESULT_S) for n in range(6)]
    assert [digest(h.result(RESULT_S).data) for h in handles] == [expected(n) for n in range(6)]
    report = client.submit(capabilities=["window"], report=True,
                           timeout=RESULT_S).result(RESULT_S).data
    assert report["window"] == LARGE_WINDOW_BYTES
    assert 0 < report["peak_bytes"] <= LARGE_WINDOW_BYTES
    assert report["most_held"] >= 1  # the window did hold some back


# ------------------------------------------------------------------ the runner's window


class Recorder:
    """A transport that keeps what the runner sends."""

    closed = False
    last_heard = 0.0
    last_sent = 0.0

    def __init__(self) -> None:
        self.sent: list[Message] = []
        self.flush_requests = 0

    def open(self) -> None: ...
    def reopen(self) -> None: ...
    def close(self) -> None: ...
    def read_now(self) -> None: ...

    def send(self, msg: Message) -> None:
        self.sent.append(msg)

    def request_flush(self) -> None:
        self.flush_requests += 1

    def results(self) -> list[str]:
        """The ids of the results sent since the last call, in order."""
        ids = [item.task_id for msg in self.sent if isinstance(msg, Results)
               for item in msg.results]
        self.sent.clear()
        return ids


def test_the_window_holds_large_results_back_in_order_and_counts_each_once() -> None:
    size = 2 * LARGE_RESULT_BYTES

    async def execute(task: Task) -> Result:
        return Result(data=b"x" * (size if task.data == "large" else 10))

    async def scenario() -> None:
        runner = TaskRunner(execute)
        channel = runner.channel = Recorder()
        runner.window_bytes = 5 * LARGE_RESULT_BYTES  # room for two, not three
        one = len(Result(data=b"x" * size).to_payload())

        def finish(task_id: str, kind: str) -> None:
            runner.start(Assignment(task_id, packb({"data": kind}), 1, 10.0, (), None))

        # Given six large results and two small ones, finished at once
        finish("L1", "large")
        finish("s1", "small")
        for n in range(2, 7):
            finish(f"L{n}", "large")
        finish("s2", "small")
        runner.flush()
        # Then the small ones go, and as many large ones as the window holds, in order
        assert channel.results() == ["s1", "s2", "L1", "L2"]
        assert runner.large_in_flight_bytes == 2 * one
        # When everything unacknowledged is sent again (a reconnect, a duplicate
        # dispatch of one still waiting), the ones out count once and the others wait
        runner.resend_unacked()
        runner.start(Assignment("L5", packb({"data": "large"}), 2, 10.0, (), None))
        runner.flush()
        assert sorted(channel.results()) == ["L1", "L2", "s1", "s2"]
        assert runner.large_in_flight_bytes == 2 * one
        # When an acknowledgement comes, it asks for a flush, and the next goes
        requests = channel.flush_requests
        runner.ack(["s1", "s2", "L2"])
        assert channel.flush_requests == requests + 1
        runner.flush()
        assert channel.results() == ["L3"]
        runner.ack(["L1", "L3"])
        runner.flush()
        assert channel.results() == ["L4", "L5"]
        # And with a window smaller than one result, one still goes at a time
        runner.window_bytes = LARGE_RESULT_BYTES
        runner.ack(["L4", "L5"])
        runner.flush()
        assert channel.results() == ["L6"]
        assert runner.large_in_flight_bytes == one
        runner.ack(["L6"])
        assert runner.large_in_flight_bytes == 0 and not runner.unacked

    run_loop(scenario())


# ------------------------------------------------------------------ against a stand-in broker


def data_of(task_id: str, size: int) -> bytes:
    """The result data the stand-in broker keeps for ``task_id``: made from the id."""
    return blob(int(hashlib.sha256(task_id.encode()).hexdigest()[:8], 16), size)


class FakeBroker:
    """A ROUTER standing in for the broker, served from a thread.

    It answers SUBMIT (with ``answer_submits``) with ACCEPTED and a RESULT whose payload
    is withheld, FETCH with the same RESULT, READ as ``on_read`` says (by default: the
    range asked for), and pings with a boot id (``boots``, one per ping, the last one
    repeated); it records what it received.

    Args:
        size: the data size of every task's result.
        on_read: the answer to a READ (None: no answer), given the payloads.
        answer_submits: answer SUBMIT (else only record it).
        boots: the boot ids its ping answers say, in turn.
    """

    def __init__(self, size: int,
                 on_read: Callable[[Read, dict[str, bytes]], Message | None] | None = None,
                 answer_submits: bool = True, boots: tuple[str, ...] = ("first",)) -> None:
        self.size = size
        self.on_read = on_read or answer_read
        self.answer_submits = answer_submits
        self._boots = iter(boots)
        self._boot = boots[0]
        self.router = zmq.Context.instance().socket(zmq.ROUTER)
        self.router.bind("tcp://127.0.0.1:0")
        self.url = self.router.getsockopt_string(zmq.LAST_ENDPOINT)
        self.payloads: dict[str, bytes] = {}
        self._received: list[Message] = []
        self._arrived = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="fake-broker", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.router.close(linger=0)

    def received(self, kind: type | None = None) -> list[Any]:
        """What it received so far (of ``kind``), in order."""
        with self._arrived:
            return [msg for msg in self._received if kind is None or isinstance(msg, kind)]

    def wait_for(self, done: Callable[[list[Message]], bool], timeout: float = RESULT_S) -> None:
        """Block until ``done(received)`` holds (AssertionError after ``timeout``)."""
        with self._arrived:
            assert self._arrived.wait_for(lambda: done(self._received), timeout), \
                f"not received within {timeout:g} s: {self._received!r}"

    def _serve(self) -> None:
        while not self._stop.is_set():
            if not self.router.poll(50):
                continue  # a look at the stop flag now and then; nothing waits on this
            frames = recv_frames(self.router)
            msg = decode(frames[1:])
            for answer in self._answers(msg):
                self.router.send_multipart([frames[0], *encode(answer)])
            with self._arrived:
                self._received.append(msg)
                self._arrived.notify_all()

    def _answers(self, msg: Message) -> list[Message]:
        if isinstance(msg, Submit):
            for spec in msg.tasks:
                self.payloads.setdefault(spec.id, packb(
                    {"data": data_of(spec.id, self.size), "confidence": 1.0}))
            ids = [spec.id for spec in msg.tasks]
            return [Accepted(ids), self._results(ids)] if self.answer_submits else []
        if isinstance(msg, Fetch):
            known = [task_id for task_id in msg.task_ids if task_id in self.payloads]
            return [self._results(known)] if known else []
        if isinstance(msg, Read):
            answer = self.on_read(msg, self.payloads)
            return [answer] if answer is not None else []
        if isinstance(msg, Heartbeat):
            self._boot = next(self._boots, self._boot)
            return [Heartbeat(boot=self._boot)]
        return []

    def _results(self, ids: list[str]) -> Results:
        return Results([ResultItem(task_id, "succeeded", Withheld(len(self.payloads[task_id])),
                                   agent="fake", attempts=1) for task_id in ids])


def answer_read(read: Read, payloads: dict[str, bytes]) -> Message:
    payload = payloads.get(read.task_id)
    if payload is None:
        return Error("not_found", f"no result for {read.task_id}", read.req, [read.task_id])
    return Chunk(read.req, read.task_id, read.offset, len(payload),
                 payload[read.offset:read.offset + read.length])


@pytest.fixture
def fakes() -> Iterator[list[FakeBroker]]:
    started: list[FakeBroker] = []
    try:
        yield started
    finally:
        for fake in started:
            fake.close()


def test_a_result_gone_mid_read_fails_the_handle_and_fetch_naming_the_task(
        fakes: list[FakeBroker]) -> None:
    def gone_after_the_first_chunk(read: Read, payloads: dict[str, bytes]) -> Message:
        if read.offset == 0:
            return answer_read(read, payloads)
        return Error("not_found", "past retention", read.req, [read.task_id])

    fake = FakeBroker(10_000_000, gone_after_the_first_chunk)
    fakes.append(fake)

    async def scenario() -> tuple[ResultUnreadable, ResultUnreadable, Result]:
        async with Client(fake.url) as client:
            handle = client.submit(capabilities=["big"], data=1)
            with pytest.raises(ResultUnreadable) as failed:
                await handle.result(timeout=RESULT_S)
            with pytest.raises(ResultUnreadable) as fetched:
                await client.fetch(handle.id, timeout=RESULT_S)
            # The client goes on: once the payload can be read, it is delivered
            fake.on_read = answer_read
            return failed.value, fetched.value, await client.fetch(handle.id, timeout=RESULT_S)

    failed, fetched, after = run_loop(scenario())
    for error in (failed, fetched):
        assert error.code == ErrorCode.NOT_FOUND.value
        assert repr(error.task_id) in str(error) and "retention" in str(error)
    assert after.ok and after.data == data_of(failed.task_id, 10_000_000)


def test_an_unanswered_read_is_asked_again_then_fails_with_timeout(
        fakes: list[FakeBroker]) -> None:
    fake = FakeBroker(2_000_000, lambda read, payloads: None)
    fakes.append(fake)

    async def scenario() -> ResultUnreadable:
        async with Client(fake.url) as client:
            client._payloads.chunk_timeout_s = 0.2
            client._payloads.chunk_tries = 3
            handle = client.submit(capabilities=["big"], data=1)
            with pytest.raises(ResultUnreadable) as failed:
                await handle.result(timeout=RESULT_S)
            # Closing drops what the socket has not sent yet: wait for the stand-in first
            await asyncio.get_running_loop().run_in_executor(None, fake.wait_for, lambda got: sum(
                isinstance(m, Read) for m in got) >= 3)
            return failed.value

    error = run_loop(scenario())
    assert error.code == ErrorCode.TIMEOUT.value and repr(error.task_id) in str(error)
    reads = fake.received(Read)
    assert [(r.task_id, r.offset) for r in reads] == [(error.task_id, 0)] * 3


def test_many_large_results_are_read_a_few_at_a_time(fakes: list[FakeBroker]) -> None:
    size = 6_000_000  # two chunks each
    fake = FakeBroker(size)
    fakes.append(fake)

    async def scenario() -> tuple[list[Result], Result, tuple[int, int], int]:
        async with Client(fake.url) as client:
            reader = client._payloads
            go, both, peeked = asyncio.Event(), asyncio.Event(), asyncio.Event()
            asking = [0, 0]  # asks under way, the most at once
            ask, take = reader._ask, reader.take

            async def gated(make: Callable[[int], Message], timeout: float) -> Any:
                asking[0] += 1
                asking[1] = max(asking)
                if asking[0] >= MAX_PARALLEL_READS:
                    both.set()
                try:
                    await go.wait()
                    return await ask(make, timeout)
                finally:
                    asking[0] -= 1

            def noting(item: ResultItem, handle: TaskHandle | None, waiting: Any) -> None:
                take(item, handle, waiting)
                if waiting:
                    peeked.set()

            reader._ask = gated
            reader.take = noting  # type: ignore[method-assign]
            handles = [client.submit(capabilities=["big"], data=n) for n in range(12)]
            # Given reads that wait (the twelve results are in: two reads run)
            await asyncio.wait_for(both.wait(), RESULT_S)
            state = (reader.reading, reader.queued)
            # When a FETCH of a task being read is answered, it joins that read
            peek = asyncio.ensure_future(client.fetch(handles[0].id, timeout=RESULT_S))
            await asyncio.wait_for(peeked.wait(), RESULT_S)
            go.set()
            results = [await h.result(timeout=RESULT_S) for h in handles]
            return results, await peek, state, asking[1]

    results, peek, state, most = run_loop(scenario())
    # Then two payloads were read at once, and the others waited in line
    assert state == (MAX_PARALLEL_READS, 12 - MAX_PARALLEL_READS)
    assert most == MAX_PARALLEL_READS
    # And each arrived whole, each chunk read once and in order (the peek's too)
    assert [r.data for r in results] == [data_of(r.task_id, size) for r in results]
    assert peek.task_id == results[0].task_id and peek.data == results[0].data
    reads = fake.received(Read)
    assert len(reads) == 2 * 12
    for _, group in itertools.groupby(sorted(reads, key=lambda r: r.task_id),
                                      key=lambda r: r.task_id):
        assert [r.offset for r in group] == [0, READ_CHUNK_BYTES]


def test_a_held_submit_is_submitted_again_held(fakes: list[FakeBroker]) -> None:
    # Given a broker that never answers the task and says it restarted on its second ping
    fake = FakeBroker(10, answer_submits=False, boots=("first", "second"))
    fakes.append(fake)

    async def scenario() -> None:
        async with Client(fake.url) as client:
            client.submit(capabilities=["x"], data=1, hold=True)
            # When the client hears of the restart, it submits its open tasks again
            await asyncio.get_running_loop().run_in_executor(None, fake.wait_for, lambda got: sum(
                len(m.tasks) for m in got if isinstance(m, Submit)) >= 2)

    run_loop(scenario())
    # Then each time as held
    specs: list[TaskSpec] = [spec for msg in fake.received(Submit) for spec in msg.tasks]
    assert len(specs) >= 2 and all(spec.hold for spec in specs)


def test_release_goes_in_batches_after_the_submits_queued_before_it(
        fakes: list[FakeBroker]) -> None:
    fake = FakeBroker(10, answer_submits=False)
    fakes.append(fake)
    ids = [f"t{n}" for n in range(300)]

    async def scenario() -> list[str]:
        async with Client(fake.url) as client:
            first = client.submit(capabilities=["x"], data=1, hold=True)  # sent at once
            queued = client.submit(capabilities=["x"], data=2, hold=True)  # waits for a flush
            await client.release([first.id, queued.id, *ids])
            # Closing drops what the socket has not sent yet: wait for the stand-in first
            await asyncio.get_running_loop().run_in_executor(None, fake.wait_for, lambda got: sum(
                len(m.task_ids) for m in got if isinstance(m, Release)) >= len(ids) + 2)
            return [first.id, queued.id]

    held = run_loop(scenario())
    sent = [msg for msg in fake.received() if isinstance(msg, (Submit, Release))]
    # The queued submit left before the release that names it, and the release went in
    # batches of at most MAX_BATCH_ITEMS ids, in order
    assert [type(msg) for msg in sent] == [Submit, Submit, Release, Release, Release]
    assert [spec.id for msg in sent[:2] for spec in msg.tasks] == held
    assert [i for msg in sent[2:] for i in msg.task_ids] == [*held, *ids]
    assert all(len(msg.task_ids) <= MAX_BATCH_ITEMS for msg in sent[2:])


def test_the_sync_client_releases_too(fakes: list[FakeBroker]) -> None:
    fake = FakeBroker(10, answer_submits=False)
    fakes.append(fake)
    sync = SyncClient(fake.url)
    try:
        sync.release([])  # nothing to release: nothing sent
        sync.release(iter(["a", "b"]))
        # Closing drops what the socket has not sent yet: wait for the stand-in first
        fake.wait_for(lambda got: any(isinstance(m, Release) for m in got))
    finally:
        sync.close()
    assert [m.task_ids for m in fake.received(Release)] == [["a", "b"]]
