"""Agents for the messaging tests, run as real processes (``python -m agent_sdk run``).

Options come from environment variables (``AGENT_NAME``, ``AGENT_CAPS``, ``AGENT_MAX``,
``SUB_TOPIC``, ``MAILBOX_SIZE``). Tests steer the agents and read what they saw with
direct requests: ``{"op": ...}`` maps answered by ``on_message`` handlers.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from typing import Any

from agent_sdk import BaseAgent, BusMessage, DirectMessage, RequestRefused, Result, Task


#: Direct messages an Asker sends before it waits for the broker's verdicts.
SEND_WINDOW = 1000


def _env_list(name: str, default: str) -> list[str]:
    return [item for item in os.environ.get(name, default).split(",") if item]


class Changes:
    """Lets a request wait until the agent's counters satisfy a condition, so that tests
    wait on events rather than poll: :meth:`changed` after each update, :meth:`until`
    to wait."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def changed(self) -> None:
        self._event.set()

    async def until(self, condition: Callable[[], bool], timeout_s: float) -> bool:
        """True once ``condition()`` holds, False if ``timeout_s`` passed first."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not condition():
            self._event.clear()
            left = deadline - loop.time()
            if left <= 0:
                return False
            try:
                await asyncio.wait_for(self._event.wait(), left)
            except asyncio.TimeoutError:
                return condition()
        return True


class Subscriber(BaseAgent):
    """Subscribes to ``SUB_TOPIC`` (comma-separated prefixes) from the start and records
    every bus message. Ops: ``ready`` (waits for the subscriptions' confirmation),
    ``subscribe`` (one more prefix, confirmed), ``received`` (what arrived, per topic;
    with ``until: {topic: n}`` once that many arrived, with ``until_lost: n`` once it
    counted that many lost, or after ``timeout_s``)."""

    def __init__(self) -> None:
        super().__init__(name=os.environ.get("AGENT_NAME", "subscriber"),
                         capabilities=_env_list("AGENT_CAPS", "subscribe"))
        self.topics = _env_list("SUB_TOPIC", "news")
        self.seen: dict[str, list[int]] = {}
        #: per topic: the bus sequence numbers of the first and the last message
        self.seqs: dict[str, list[int]] = {}
        self.payload_bytes = 0
        self.subscriptions: list[Any] = []
        self.changes = Changes()

    async def on_start(self) -> None:
        # Subscribing before registration is allowed: it takes effect once the broker has
        # told us where the bus is. Confirmation (awaiting it) waits for that too.
        self.subscriptions = [self.subscribe(topic, self.on_bus) for topic in self.topics]
        self.on_message(self.handle)

    def on_bus(self, message: BusMessage) -> None:
        self.seen.setdefault(message.topic, []).append(message.data["i"])
        seqs = self.seqs.setdefault(message.topic, [message.seq, message.seq])
        seqs[1] = message.seq
        self.payload_bytes += len(message.data.get("pad", b""))
        self.changes.changed()

    async def handle(self, message: DirectMessage) -> Any:
        op = message.data["op"]
        if op == "ready":
            for subscription in self.subscriptions:
                await subscription
            return {"confirmed": [s.topic for s in self.subscriptions]}
        if op == "subscribe":
            subscription = self.subscribe(message.data["topic"], self.on_bus)
            self.subscriptions.append(await subscription)
            return {"confirmed": subscription.topic}
        if op == "received":
            until = message.data.get("until") or {}
            lost = message.data.get("until_lost", 0)
            await self.changes.until(
                lambda: all(len(self.seen.get(topic, ())) >= count
                            for topic, count in until.items())
                and self.messaging.counters["bus_gaps"] >= lost,
                message.data.get("timeout_s", 0))
            return {"counts": {topic: len(items) for topic, items in self.seen.items()},
                    "in_order": {topic: items == sorted(items) for topic, items in
                                 self.seen.items()},
                    "first": {topic: items[0] for topic, items in self.seen.items()},
                    "last": {topic: items[-1] for topic, items in self.seen.items()},
                    "seqs": self.seqs,
                    "stats": self.messaging.stats()}
        raise ValueError(f"unknown op {op!r}")

    async def execute(self, task: Task) -> Result:
        return Result(data=self.messaging.stats())


class Publisher(BaseAgent):
    """Publishes on request. Ops: ``publish`` (``count`` messages on each of ``topics``,
    interleaved, after ``wait_for`` topics have subscribers), ``flood`` (bursts of
    ``burst`` messages of ``size`` bytes on ``topic`` until ``stop``), ``stop``,
    ``published`` (how many so far; with ``until: n`` once that many are out)."""

    def __init__(self) -> None:
        super().__init__(name=os.environ.get("AGENT_NAME", "publisher"),
                         capabilities=_env_list("AGENT_CAPS", "publish"))
        self.published = 0
        self.stop_flood = asyncio.Event()
        self.flooding: asyncio.Task[None] | None = None
        self.changes = Changes()

    async def on_start(self) -> None:
        self.on_message(self.handle)

    async def handle(self, message: DirectMessage) -> Any:
        request = message.data
        op = request["op"]
        if op == "publish":
            for topic in request.get("wait_for", ()):
                await self.wait_for_subscribers(topic)
            for i in range(1, request["count"] + 1):
                for topic in request["topics"]:
                    await self.publish(topic, {"i": i})
                    self.published += 1
            return {"published": self.published}
        if op == "flood":
            await self.wait_for_subscribers(request["topic"])
            self.stop_flood.clear()
            self.flooding = asyncio.ensure_future(self.flood(
                request["topic"], request["burst"], request["pause_s"], b"x" * request["size"]))
            return {"flooding": True}
        if op == "stop":
            self.stop_flood.set()
            if self.flooding is not None:
                await self.flooding
            return {"published": self.published}
        if op == "published":
            until = request.get("until", 0)
            await self.changes.until(lambda: self.published >= until,
                                     request.get("timeout_s", 0))
            return {"published": self.published}
        raise ValueError(f"unknown op {op!r}")

    async def flood(self, topic: str, burst: int, pause_s: float, pad: bytes) -> None:
        i = 0
        while not self.stop_flood.is_set():
            for _ in range(burst):
                i += 1
                await self.publish(topic, {"i": i, "pad": pad})
            self.published = i
            self.changes.changed()
            # Bursts at a bounded rate: the point is a full pipe to a stalled subscriber,
            # not a publisher that takes a whole core from the processes under test.
            try:
                await asyncio.wait_for(self.stop_flood.wait(), pause_s)
            except asyncio.TimeoutError:
                pass

    async def execute(self, task: Task) -> Result:
        return Result(data=self.published)


class Replier(BaseAgent):
    """Answers direct messages: ``echo`` returns what it got with this agent's id,
    ``fail`` raises, ``note`` is recorded (no reply), ``notes`` lists them, and plain
    integers are recorded in arrival order (``collected`` says whether they came in
    order)."""

    def __init__(self) -> None:
        super().__init__(name=os.environ.get("AGENT_NAME", "replier"),
                         capabilities=_env_list("AGENT_CAPS", "reply"))
        self.numbers: list[int] = []
        self.notes: list[Any] = []

    async def on_start(self) -> None:
        self.on_message(self.handle)

    def handle(self, message: DirectMessage) -> Any:
        data = message.data
        if type(data) is int:
            self.numbers.append(data)
            return None
        op = data["op"]
        if op == "echo":
            return {"echo": data.get("value"), "agent_id": self.agent_id,
                    "sender": message.sender, "to": message.to}
        if op == "fail":
            raise ValueError("asked to fail")
        if op == "note":
            self.notes.append(data.get("value"))
            return None
        if op == "notes":
            return {"notes": self.notes, "agent_id": self.agent_id}
        if op == "collected":
            numbers = self.numbers
            return {"count": len(numbers), "in_order": numbers == sorted(numbers),
                    "distinct": len(set(numbers))}
        raise ValueError(f"unknown op {op!r}")

    async def execute(self, task: Task) -> Result:
        return Result(data=self.agent_id)


class Asker(BaseAgent):
    """Talks to other peers when given a task: ``{"request": to, "value": v}`` returns the
    reply (or ``{"error": code, "elapsed_s": s}``); ``{"send_numbers": to, "count": n}``
    sends 0..n-1 as separate direct messages and returns once the broker routed all;
    ``{"ask_client": client_id}`` asks a client a question and returns its answer."""

    def __init__(self) -> None:
        super().__init__(name=os.environ.get("AGENT_NAME", "asker"),
                         capabilities=_env_list("AGENT_CAPS", "ask"))

    async def execute(self, task: Task) -> Result:
        data = task.data
        if "request" in data:
            started = time.monotonic()
            try:
                reply = await self.request(data["request"], {"op": "echo",
                                                             "value": data.get("value")},
                                           timeout=10)
            except RequestRefused as e:
                return Result(data={"error": e.code, "elapsed_s": time.monotonic() - started,
                                    "type": type(e).__name__})
            return Result(data=reply)
        if "send_numbers" in data:
            # In windows: the broker's verdicts on one window come back before the next
            # goes, so the agent's other traffic (heartbeats, leases) is never stuck
            # behind thousands of messages.
            sent = 0
            while sent < data["count"]:
                window = range(sent, min(sent + SEND_WINDOW, data["count"]))
                await asyncio.gather(*(self.send_nowait(data["send_numbers"], i)
                                       for i in window))
                sent += len(window)
            return Result(data={"sent": sent})
        if "ask_client" in data:
            answer = await self.request(data["ask_client"], {"question": "name?"}, timeout=10)
            return Result(data={"answer": answer})
        raise ValueError(f"unknown task {data!r}")


class Hoarder(BaseAgent):
    """Never reads its (small: ``MAILBOX_SIZE``) mailbox, so that it overflows."""

    mailbox_size = int(os.environ.get("MAILBOX_SIZE", "5"))

    def __init__(self) -> None:
        super().__init__(name=os.environ.get("AGENT_NAME", "hoarder"),
                         capabilities=_env_list("AGENT_CAPS", "hoard"))

    async def execute(self, task: Task) -> Result:
        return Result(data=self.messaging.stats())


class FanOut(BaseAgent):
    """Fans a task out: ``{"n": n, "capability": c}`` submits n subtasks ``data=i`` to
    agents with capability c, concurrently, and aggregates their results."""

    def __init__(self) -> None:
        super().__init__(name=os.environ.get("AGENT_NAME", "fanout"),
                         capabilities=_env_list("AGENT_CAPS", "fanout"))

    async def execute(self, task: Task) -> Result:
        n, capability = task.data["n"], task.data["capability"]
        results = await asyncio.gather(*(self.submit(capabilities=[capability], data=i)
                                         for i in range(n)))
        failed = [r.status for r in results if not r.ok]
        if failed:
            return Result.failure("subtask_failed", f"{len(failed)} subtask(s) failed: {failed}")
        return Result(data={
            "sum": sum(r.data["value"] for r in results),
            "parents": sorted({r.data["parent_id"] for r in results}),
            "child_ids": [r.task_id for r in results],
            "agents": sorted({r.data["agent_id"] for r in results}),
        })


class Squarer(BaseAgent):
    """Returns the square of the task's data, with the task's parent and this agent."""

    def __init__(self) -> None:
        super().__init__(name=os.environ.get("AGENT_NAME", "squarer"),
                         capabilities=_env_list("AGENT_CAPS", "square"),
                         max_concurrent=int(os.environ.get("AGENT_MAX", "16")))

    async def execute(self, task: Task) -> Result:
        return Result(data={"value": task.data * task.data, "parent_id": task.parent_id,
                            "agent_id": self.agent_id})


class Blocker(BaseAgent):
    """Runs every task until it is cancelled, counting starts and cancellations: any
    direct message gets them, after waiting (up to ``timeout_s``) until ``cancelled``
    reaches ``until`` if given."""

    def __init__(self) -> None:
        super().__init__(name=os.environ.get("AGENT_NAME", "blocker"),
                         capabilities=_env_list("AGENT_CAPS", "block"),
                         max_concurrent=int(os.environ.get("AGENT_MAX", "16")))
        self.started = 0
        self.cancelled = 0
        self.changes = Changes()

    async def on_start(self) -> None:
        self.on_message(self.handle)

    async def handle(self, message: DirectMessage) -> Any:
        until = message.data.get("until", 0)
        await self.changes.until(lambda: self.cancelled >= until,
                                 message.data.get("timeout_s", 0))
        return {"started": self.started, "cancelled": self.cancelled,
                "running": len(self._running)}

    async def execute(self, task: Task) -> Result:
        self.started += 1
        self.changes.changed()
        try:
            # Waits on a future nobody completes: only a cancel from the broker ends it.
            await asyncio.get_running_loop().create_future()
        except asyncio.CancelledError:
            self.cancelled += 1
            self.changes.changed()
            raise
        return Result(data="unreachable")
