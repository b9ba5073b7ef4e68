"""Driving the task engine on a fake clock: no socket, no file, no thread."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from broker.config import BrokerConfig
from broker.engine.engine import Engine
from broker.engine.ledger import NoJournal
from wire.tasks import Message, Ping, Pong, Ready, Submit, TaskSpec, decode


class RecordingForwarder:
    """The engine's Forwarder: records direct messages instead of sending them."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, list[list[Any]]]] = []
        self.refuse: dict[bytes, str] = {}

    def forward(self, receiver: bytes, messages: list[list[Any]], backlog_limit: int
                ) -> str | None:
        if receiver in self.refuse:
            return self.refuse[receiver]
        self.sent.append((receiver, messages))
        return None


def make_engine(tmp_path: Path | None = None, now: float = 1000.0,
                **config: Any) -> Engine:
    """An engine with no journal, at clock reading ``now``."""
    config.setdefault("bind", "127.0.0.1:0")
    config.setdefault("durability", "none")
    if tmp_path is not None:
        config.setdefault("data_dir", tmp_path)
    return Engine(BrokerConfig(**config), NoJournal(), RecordingForwarder(), now, 0.0, "boot")


def run_pass(engine: Engine, now: float, answer_pings: bool = True) -> dict[bytes, list[Message]]:
    """One pass of the broker's loop after its drain: timers, dispatch, both flushes;
    what would be sent, decoded, per peer in order. With ``answer_pings``, registered
    agents answer the health checks sent to them at once, as live agents do."""
    engine.tick(now)
    engine.dispatch(now)
    sent: dict[bytes, list[Message]] = {}
    for identity, messages in engine.work_messages() + engine.other_messages(now):
        sent.setdefault(identity, []).extend(decode(frames) for frames in messages)
    if answer_pings:
        for identity, messages in sent.items():
            for msg in messages:
                if isinstance(msg, Ping) and engine.ledger.agents.get(identity) is not None:
                    engine.handle(identity, Pong(msg.seq, True), now)
    return sent


def register(engine: Engine, identity: bytes, capabilities: tuple[str, ...], now: float,
             max_concurrent: int = 4, running: tuple[str, ...] = ()) -> None:
    engine.handle(identity, Ready(identity.decode(), identity.decode(), capabilities,
                                  max_concurrent, running=running), now)


def submit(engine: Engine, client: bytes, now: float, *task_ids: str,
           capabilities: tuple[str, ...] = ("echo",), timeout_s: float | None = 60.0,
           max_retries: int | None = None) -> None:
    engine.handle(client, Submit([TaskSpec(task_id, b"\x80", capabilities, None, 0, timeout_s,
                                           max_retries) for task_id in task_ids]), now)
