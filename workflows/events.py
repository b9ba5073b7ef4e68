"""A run's progress: the step counts, and the events published on the bus.

Events go to the topic ``workflow.<run id>`` (:func:`workflows.ids.events_topic`), each a
map ``{"run_id", "event", "at", "done", "total", ...}`` where ``event`` is one of
:data:`EVENT_KINDS` and steps add ``path`` and ``kind`` (``step_failed`` an ``error``).
Steps inside map items publish no event each: a map of task steps publishes a
``progress`` event (with the map-reduce's ``path``, its ``items`` and how many have
``settled``) at most every 250 ms while its items finish instead.

``done`` counts finished tasks and answered approvals; ``total`` is what the run is known
to need so far: a map-reduce adds its items once its input is known, a review loop a
round when it needs one. So ``total`` grows while a run goes, and equals ``done`` at the
end.

The bus loses messages to subscribers that lag and never waits for any: events are for
watching a run live. The run record and its checkpoints are what a run is.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Final

from agent_sdk import BusUnavailable, Client, OrchestratorError
from workflows import ids
from workflows.model import (
    Approval, Consensus, MapReduce, Node, Pipeline, ReviewLoop, TaskStep,
)

logger = logging.getLogger(__name__)

EVENT_KINDS: Final = frozenset({
    "run_started", "step_started", "step_finished", "step_failed", "progress",
    "approval_waiting", "approval_answered", "run_finished"})
#: Events queued for the bus before newer ones are dropped (a bus that cannot keep up).
MAX_QUEUED_EVENTS: Final = 10_000
#: How long closing waits for queued events to leave.
CLOSE_TIMEOUT_S: Final = 2.0


def planned_steps(node: Node) -> int:
    """Tasks (and approvals) ``node`` needs if every map has one item, every consensus
    one voter (unless it names how many) and every review loop one round."""
    if isinstance(node, (TaskStep, Approval)):
        return 1
    if isinstance(node, Pipeline):
        return sum(planned_steps(step) for step in node.steps)
    if isinstance(node, MapReduce):
        reducer = planned_steps(node.reducer) if node.reducer is not None else 0
        return planned_steps(node.mapper) + reducer
    if isinstance(node, Consensus):
        return node.voters or 1
    return planned_steps(node.producer) + planned_steps(node.reviewer)


class Progress:
    """Steps done and planned in a run (see the module docstring)."""

    __slots__ = ("done", "total")

    def __init__(self, done: int = 0, total: int = 0) -> None:
        self.done = done
        self.total = total

    def snapshot(self) -> tuple[int, int]:
        """``(done, total)`` now."""
        return self.done, max(self.total, self.done)


class RunEvents:
    """Publishes a run's events on the bus, in order, without ever holding up the run.

    Args:
        client: the broker connection (the bus's endpoints come from it).
        run_id: the run.
        progress: the counts each event carries.
    """

    def __init__(self, client: Client, run_id: str, progress: Progress) -> None:
        self.client = client
        self.run_id = run_id
        self.topic = ids.events_topic(run_id)
        self.progress = progress
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(MAX_QUEUED_EVENTS)
        self._enabled = True
        self._dropped = 0
        self._sender = asyncio.get_running_loop().create_task(
            self._send_loop(), name=f"events-{run_id}")

    def emit(self, event: str, **fields: Any) -> None:
        """Queue ``event`` for the bus (dropped, and counted, when the queue is full)."""
        if not self._enabled:
            return
        done, total = self.progress.snapshot()
        message = {"run_id": self.run_id, "event": event, "at": time.time(), "done": done,
                   "total": total, **fields}
        try:
            self._queue.put_nowait(message)
        except asyncio.QueueFull:
            self._dropped += 1

    async def close(self) -> None:
        """Send what is queued (for at most CLOSE_TIMEOUT_S), then stop."""
        if self._enabled and not self._sender.done():
            try:
                await asyncio.wait_for(self._queue.join(), CLOSE_TIMEOUT_S)
            except asyncio.TimeoutError:
                logger.warning("run %s: %d events not published at close", self.run_id,
                               self._queue.qsize())
        self._sender.cancel()
        await asyncio.gather(self._sender, return_exceptions=True)
        if self._dropped:
            logger.warning("run %s: %d events dropped (the bus did not keep up)", self.run_id,
                           self._dropped)

    async def _send_loop(self) -> None:
        while True:
            message = await self._queue.get()
            try:
                if self._enabled:
                    await self.client.publish(self.topic, message)
            except BusUnavailable:
                # A broker without a bus: the run goes on, unobserved.
                self._enabled = False
                logger.info("run %s: the broker runs no bus; no progress events", self.run_id)
            except OrchestratorError as e:
                logger.warning("run %s: event not published: %s", self.run_id, e)
            finally:
                self._queue.task_done()


__all__ = ["EVENT_KINDS", "Progress", "RunEvents", "planned_steps"]
