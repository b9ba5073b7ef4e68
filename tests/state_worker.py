"""Worker processes for the state service tests: ``python -m tests.state_worker MODE ...``.

Every mode connects, prints ``{"event": "ready"}`` and then waits for a line on stdin
before it starts, so that a test can start several workers and release them together (a
barrier, not a sleep). It ends by printing one JSON line with what it saw.

Modes:
    update URL KEY N            N times ``update(KEY, +1)``
    lock URL NAME N FILE        N times: take NAME, append "begin"/"end" lines to FILE
                                and add 1 to NAME/count (read, then write) inside it
    hold URL NAME TTL           take NAME, print its token, hold it (renewing) until killed
    write URL PREFIX N          N changes under PREFIX (writes and deletes), print them
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

import orjson

from agent_sdk import BaseAgent, Result, StateClient, Task
from agent_sdk.loop import run as run_loop


def emit(document: dict[str, Any]) -> None:
    sys.stdout.write(orjson.dumps(document).decode() + "\n")
    sys.stdout.flush()


async def wait_for_go() -> None:
    emit({"event": "ready", "pid": os.getpid()})
    line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    if line.strip() != "go":
        raise SystemExit(f"expected 'go' on stdin, got {line!r}")


async def update(url: str, key: str, count: int) -> None:
    async with StateClient(url, name=f"updater-{os.getpid()}") as state:
        await wait_for_go()
        for _ in range(count):
            await state.update(key, lambda n: (n or 0) + 1)
        emit({"event": "done", "count": count})


async def lock(url: str, name: str, count: int, path: str) -> None:
    tokens = []
    me = os.getpid()
    async with StateClient(url, name=f"locker-{me}") as state:
        await wait_for_go()
        with open(path, "a", encoding="utf-8") as shared:
            for _ in range(count):
                async with state.lock(name, ttl=10, wait=30) as lease:
                    # Two separate appends with a read-modify-write of a shared counter
                    # (two round trips, not atomic by itself) between them: another
                    # holder at the same time would show up in the file or the count.
                    shared.write(f"begin {me} {lease.token}\n")
                    shared.flush()
                    count_so_far = await state.get(f"{name}/count", 0)
                    await state.set(f"{name}/count", count_so_far + 1, fence=lease)
                    shared.write(f"end {me} {lease.token}\n")
                    shared.flush()
                    tokens.append(lease.token)
        emit({"event": "done", "tokens": tokens})


async def hold(url: str, name: str, ttl_s: float) -> None:
    async with StateClient(url, name=f"holder-{os.getpid()}") as state:
        lease = await state.acquire(name, ttl=ttl_s, wait=10)
        emit({"event": "held", "token": lease.token})
        await lease.wait_lost()  # never, unless the service takes it away
        emit({"event": "lost", "token": lease.token})


async def write(url: str, prefix: str, count: int) -> None:
    changes = []
    async with StateClient(url, name=f"writer-{os.getpid()}") as state:
        await wait_for_go()
        for i in range(count):
            key = f"{prefix}{i % 7}"
            if i % 5 == 4:
                if await state.delete(key):
                    changes.append([key, None])
                    continue
            await state.set(key, {"i": i})
            changes.append([key, {"i": i}])
        emit({"event": "done", "changes": changes})


class CounterAgent(BaseAgent):
    """Counts its tasks in shared state with ``self.state.update`` and returns the count."""

    def __init__(self) -> None:
        super().__init__(name="counter", capabilities=["count"], max_concurrent=8)

    async def execute(self, task: Task) -> Result:
        value = await self.state.update(task.data["key"], lambda n: (n or 0) + 1)
        return Result(data=value)


def main(argv: list[str]) -> int:
    mode, url, *rest = argv
    if mode == "update":
        run_loop(update(url, rest[0], int(rest[1])))
    elif mode == "lock":
        run_loop(lock(url, rest[0], int(rest[1]), rest[2]))
    elif mode == "hold":
        run_loop(hold(url, rest[0], float(rest[1])))
    elif mode == "write":
        run_loop(write(url, rest[0], int(rest[1])))
    else:
        print(f"unknown mode {mode!r}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
