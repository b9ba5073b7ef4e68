"""Per-client bounds: how many unfinished tasks a client may have, and how many of them
may hold an agent slot at once.

Both are counted where a task's state changes (``lifecycle.py``) and read where
tasks are accepted (``clients.py``) and taken from the queue (``pending.py``), so that
neither check walks a client's tasks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from wire.documents import LimitsDocument

if TYPE_CHECKING:
    from broker.config import BrokerConfig
    from broker.engine.model import TaskRecord


def size_limits(config: BrokerConfig) -> dict[str, int]:
    """The size limits the broker announces (WELCOME, a client HEARTBEAT's answer): the
    SDK refuses a bigger send itself, before libzmq would drop the connection for it."""
    return {"max_message_bytes": config.max_message_bytes,
            "max_header_bytes": config.max_header_bytes}


def limits_document(config: BrokerConfig) -> LimitsDocument:
    """Every limit of the broker, for STATUS (docs/limits.md)."""
    return {"max_message_bytes": config.max_message_bytes,
            "max_header_bytes": config.max_header_bytes,
            "max_pending": config.max_pending,
            "max_pending_per_client": config.max_pending_per_client,
            "max_in_flight_per_client": config.max_in_flight_per_client}


class ClientQuotas:
    """A client's unfinished tasks (``max_pending_per_client``) and its tasks on agents
    (``max_in_flight_per_client``), by client identity.

    Args:
        max_open: unfinished tasks one client may have; more are refused ``queue_full``.
        max_in_flight: tasks of one client dispatched or running at once; more wait in
            the queue. 0: no limit, and then nothing is counted.
    """

    __slots__ = ("max_open", "max_in_flight", "open", "running")

    def __init__(self, max_open: int, max_in_flight: int = 0) -> None:
        self.max_open = max_open
        self.max_in_flight = max_in_flight
        #: client -> its accepted, unfinished tasks (clients with none are not kept)
        self.open: dict[bytes, int] = {}
        #: client -> its tasks holding an agent slot (kept only with an in-flight limit)
        self.running: dict[bytes, int] = {}

    def accepted(self, client: bytes, count: int = 1) -> None:
        """``client`` has ``count`` more unfinished tasks (restored from the journal;
        ``clients.py`` counts a SUBMIT's inline)."""
        self.open[client] = self.open.get(client, 0) + count

    def finished(self, client: bytes) -> None:
        """One of ``client``'s tasks ended (``lifecycle.py`` does the same inline)."""
        count = self.open.get(client, 0)
        if count > 1:
            self.open[client] = count - 1
        else:
            self.open.pop(client, None)

    def on_agent(self, task: TaskRecord) -> None:
        """``task`` took an agent slot (dispatched, or reclaimed by the agent running it);
        :meth:`off_agent` gives it back when ``task.release_agent()`` runs."""
        running = self.running
        running[task.client] = running.get(task.client, 0) + 1
        task.quota = self

    def off_agent(self, client: bytes) -> None:
        """A task of ``client`` left its agent (answered, requeued, cancelled...)."""
        running = self.running
        count = running.get(client, 0)
        if count > 1:
            running[client] = count - 1
        else:
            running.pop(client, None)

    def room(self, client: bytes) -> int:
        """How many more of ``client``'s tasks may go to agents now (call only with an
        in-flight limit)."""
        return self.max_in_flight - self.running.get(client, 0)

