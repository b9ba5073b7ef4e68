"""PURGE on a fake clock: finished tasks forget their payloads in memory, the journal is
rewritten without them (and a restart replays the purged records, not the payloads),
open and held tasks are untouched, a secure broker wants the admin role, and a rewrite
that fails is an error, not a success.

The engine runs with a real journal in a tmp dir, its rewrite wired as
``broker/server.py`` wires it (``Broker._compact_journal``)."""

from __future__ import annotations

import itertools
import stat
from pathlib import Path
from typing import Any

from broker.config import BrokerConfig
from broker.engine.engine import Engine
from broker.engine.restore import restore
from broker.journal import Durability, Journal
from tests.broker.support import RecordingForwarder, make_engine, register, run_pass
from wire.purge import Purge, PurgeReply
from wire.tasks import Error, Fetch, ResultItem, Results, Submit, TaskSpec

CLIENT = b"client-1"
AGENT = b"agent-1"
#: Payloads large enough that the journal shrinks once they went (a purged result's
#: message is longer than a tiny payload).
SECRET_IN = b"secret-input-8c1f" + b"." * 1000
SECRET_OUT = b"secret-output-77ad" + b"." * 1000


class JournalledEngine:
    """An engine over a real journal, rewritten on PURGE as the server rewrites it."""

    def __init__(self, data_dir: Path, now: float = 1000.0, **config: Any) -> None:
        self.config = BrokerConfig(bind="127.0.0.1:0", data_dir=data_dir, **config)
        self.journal = Journal(data_dir, Durability.BATCH)
        replay = self.journal.open()
        self.engine = Engine(self.config, self.journal, RecordingForwarder(), now, 0.0, "boot")
        restore(self.engine.ledger, self.engine.lifecycle, replay, now)
        self.engine.purge.attach(lambda: "", self.rewrite, lambda: self.journal.size)

    def rewrite(self) -> bool:
        retained = [t for t in self.engine.retained() if t.result is not None]
        return self.journal.compact(
            ((t.spec, t.client, t.submitted_at)
             for t in itertools.chain(self.engine.tasks.values(), retained)),
            ((t.result, t.finished_at) for t in retained))

    def step(self, now: float) -> dict[bytes, list[Any]]:
        sent = run_pass(self.engine, now)
        self.journal.commit()
        return sent


def run_task(engine: Engine, task_id: str, now: float, hold: bool = False,
             status: str = "succeeded", error: tuple[str, str] | None = None) -> None:
    """Submit ``task_id`` with the secret input; the agent answers with the secret output."""
    engine.handle(CLIENT, Submit([TaskSpec(task_id, SECRET_IN + task_id.encode(), ("echo",),
                                           timeout_s=60.0, hold=hold)]), now)
    run_pass(engine, now)
    code, message = error if error is not None else (None, None)
    engine.handle(AGENT, Results([ResultItem(task_id, status, SECRET_OUT, code, message)]), now)


def purge(engine: Engine, now: float, before: float | None = None, req: int = 7) -> Any:
    """PURGE and its one answer (a PurgeReply or an Error)."""
    engine.handle(CLIENT, Purge(req, before), now)
    answers = [m for m in run_pass(engine, now).get(CLIENT, [])
               if isinstance(m, (PurgeReply, Error))]
    assert len(answers) == 1, answers
    return answers[0]


def fetched(engine: Engine, task_id: str, now: float) -> ResultItem:
    engine.handle(CLIENT, Fetch(1, [task_id]), now)
    results = [item for m in run_pass(engine, now).get(CLIENT, []) if isinstance(m, Results)
               for item in m.results]
    assert len(results) == 1, results
    return results[0]


def test_purge_forgets_old_payloads_keeps_the_records_and_the_journal_forgets_too(
        tmp_path: Path) -> None:
    # Given a journalled engine with a task finished at 1001 and one at 1003
    broker = JournalledEngine(tmp_path)
    engine = broker.engine
    register(engine, AGENT, ("echo",), 1000.0)
    run_task(engine, "old", 1001.0)
    run_task(engine, "new", 1003.0)
    broker.step(1003.0)
    assert SECRET_OUT in (tmp_path / "journal.log").read_bytes()

    # When the tasks that finished before 1002 are purged
    reply = purge(engine, 1004.0, before=1002.0)

    # Then the old one's payloads went, its record stayed, the new one is whole
    assert isinstance(reply, PurgeReply)
    assert (reply.purged, reply.already, reply.held, reply.open) == (1, 0, 0, 0)
    assert reply.bytes == len(SECRET_IN) + len(b"old") + len(SECRET_OUT)
    assert reply.journal_after < reply.journal_before
    old = fetched(engine, "old", 1005.0)
    assert (old.status, old.payload, old.error_code) == ("succeeded", b"", "purged")
    assert old.error_message is not None and "succeeded" in old.error_message
    assert fetched(engine, "new", 1005.0).payload == SECRET_OUT
    assert engine.ledger.finished.get("old").spec.payload == b""  # type: ignore[union-attr]
    # ... and the journal holds the new task's payloads only, in a 0600 file
    journal = (tmp_path / "journal.log").read_bytes()
    assert SECRET_IN + b"old" not in journal and SECRET_IN + b"new" in journal
    assert journal.count(SECRET_OUT) == 1
    assert stat.S_IMODE((tmp_path / "journal.log").stat().st_mode) == 0o600

    # When the broker restarts on that journal
    broker.journal.close()
    again = JournalledEngine(tmp_path, now=1010.0)

    # Then the purged task is still purged, the other still whole
    old = fetched(again.engine, "old", 1010.0)
    assert (old.status, old.payload, old.error_code) == ("succeeded", b"", "purged")
    assert fetched(again.engine, "new", 1010.0).payload == SECRET_OUT
    # ... and purging everything now counts the old one as purged already
    reply = purge(again.engine, 1011.0)
    assert (reply.purged, reply.already) == (1, 1)
    assert SECRET_OUT not in (tmp_path / "journal.log").read_bytes()
    again.journal.close()


def test_a_failed_task_loses_its_error_message_but_keeps_its_status(tmp_path: Path) -> None:
    # Given a task that failed with an error message quoting its input
    engine = make_engine(tmp_path)
    register(engine, AGENT, ("echo",), 1000.0)
    run_task(engine, "bad", 1001.0, status="failed",
             error=("agent_error", "ValueError: cannot parse secret-input-8c1f"))

    # When everything is purged
    reply = purge(engine, 1002.0)

    # Then the status and the code it failed with are said, the message is gone
    assert reply.purged == 1
    item = fetched(engine, "bad", 1003.0)
    assert (item.status, item.error_code) == ("failed", "purged")
    assert item.error_message is not None and "agent_error" in item.error_message
    assert "secret" not in item.error_message


def test_open_and_held_tasks_keep_their_payloads(tmp_path: Path) -> None:
    # Given an open task (no agent answers it) and a finished task held for a run
    engine = make_engine(tmp_path)
    register(engine, AGENT, ("echo",), 1000.0)
    run_task(engine, "held", 1001.0, hold=True)
    engine.handle(CLIENT, Submit([TaskSpec("open", SECRET_IN, ("echo",), timeout_s=60.0)]),
                  1002.0)
    run_pass(engine, 1002.0)

    # When everything is purged
    reply = purge(engine, 1003.0)

    # Then nothing was: the counts say why
    assert (reply.purged, reply.held, reply.open) == (0, 1, 1)
    assert fetched(engine, "held", 1004.0).payload == SECRET_OUT
    assert engine.tasks["open"].spec.payload == SECRET_IN


def test_a_secure_broker_purges_only_for_the_admin_role(tmp_path: Path) -> None:
    # Given a secure broker with a finished task
    engine = make_engine(tmp_path, secure=True)
    register(engine, AGENT, ("echo",), 1000.0)
    run_task(engine, "t", 1001.0)

    # When a client key purges, then an admin key
    engine.purge.peer_role = lambda: "client"
    refused = purge(engine, 1002.0, req=3)
    engine.purge.peer_role = lambda: "admin"
    accepted = purge(engine, 1003.0)

    # Then the first is refused (unauthorized, naming the role), the second purges
    assert isinstance(refused, Error)
    assert (refused.code, refused.req) == ("unauthorized", 3)
    assert "admin" in refused.message and "client" in refused.message
    assert isinstance(accepted, PurgeReply) and accepted.purged == 1


def test_a_rewrite_that_fails_is_an_error_and_the_next_purge_rewrites(tmp_path: Path) -> None:
    # Given a finished task and a journal whose rewrite fails
    engine = make_engine(tmp_path)
    register(engine, AGENT, ("echo",), 1000.0)
    run_task(engine, "t", 1001.0)
    engine.purge.attach(lambda: "", lambda: False, lambda: 0)

    # When it is purged
    error = purge(engine, 1002.0, req=4)

    # Then the client hears storage_full, not a success
    assert isinstance(error, Error)
    assert (error.code, error.req) == ("storage_full", 4)
    # ... and a later purge with a working rewrite succeeds (nothing new to purge)
    rewrites: list[float] = []

    def rewrite() -> bool:
        rewrites.append(1003.0)
        return True

    engine.purge.attach(lambda: "", rewrite, lambda: 0)
    reply = purge(engine, 1003.0)
    assert (reply.purged, reply.already, len(rewrites)) == (0, 1, 1)
