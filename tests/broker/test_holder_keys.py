"""On a --secure broker the journal records each attempt's holder by key (``K`` records):
after a restart a restored task takes a late result, or a claim in READY, only from an
agent of that key. A plaintext broker cannot tell agents apart and keeps taking any
registered agent's.

The engine runs on a fake clock with a real journal in a tmp dir; identities are scoped
as a secure broker's are (``wire.curve``: 20 base32 characters and ``~``)."""

from __future__ import annotations

from pathlib import Path

from broker.config import BrokerConfig
from broker.engine.engine import Engine
from broker.engine.holders import HolderKeys
from broker.journal import Durability, Journal
from tests.broker.support import RecordingForwarder, register, run_pass, submit
from wire.curve import SCOPE_KEY_CHARS, SCOPE_SEPARATOR
from wire.tasks import Cancel, Dispatch, ResultItem, Results

KEY_A = "a" * SCOPE_KEY_CHARS + SCOPE_SEPARATOR
KEY_B = "b" * SCOPE_KEY_CHARS + SCOPE_SEPARATOR
HOLDER = (KEY_A + "reviewer-1").encode()
SAME_KEY_NEW_ID = (KEY_A + "reviewer-2").encode()
OTHER_KEY = (KEY_B + "reviewer-1").encode()
CLIENT = (KEY_B + "client").encode()
TASK = KEY_B + "task-1"


class Broker:
    """An engine wired to a journal as broker/server.py wires it."""

    def __init__(self, data_dir: Path, now: float, secure: bool) -> None:
        self.journal = Journal(data_dir, Durability.BATCH)
        replay = self.journal.open()
        self.engine = Engine(BrokerConfig(bind="127.0.0.1:0", data_dir=data_dir),
                             self.journal, RecordingForwarder(), now, 0.0, "boot")
        if secure:
            self.engine.lifecycle.bind_holders_to_keys()
        self.engine.restore(replay, now)

    def step(self, now: float) -> dict[bytes, list[object]]:
        sent = run_pass(self.engine, now)
        self.journal.commit()
        return sent

    def answer(self, identity: bytes, now: float) -> None:
        self.engine.handle(identity, Results([ResultItem(TASK, "succeeded", b"\x01")]), now)
        self.step(now)

    def state(self) -> str:
        task = self.engine.tasks.get(TASK)
        if task is not None:
            return task.state.value
        finished = self.engine.ledger.finished.get(TASK)
        assert finished is not None and finished.result is not None
        return finished.result.status

    def compact(self) -> None:
        tasks = self.engine.tasks.values()
        self.journal.compact(((t.spec, t.client, t.submitted_at) for t in tasks), (),
                             HolderKeys.of_open(tasks))


def _dispatched_then_restarted(tmp_path: Path, secure: bool, compact: bool = False
                               ) -> Broker:
    broker = Broker(tmp_path, 1000.0, secure)
    register(broker.engine, HOLDER, ("review",), 1000.0)
    submit(broker.engine, CLIENT, 1000.0, TASK, capabilities=("review",))
    sent = broker.step(1000.0)
    assert any(isinstance(m, Dispatch) for m in sent[HOLDER])
    if compact:
        broker.compact()
    broker.journal.close()  # the broker dies with the attempt on HOLDER
    return Broker(tmp_path, 1010.0, secure)


def test_after_a_restart_another_keys_late_result_is_refused_and_the_holders_taken(
        tmp_path: Path) -> None:
    broker = _dispatched_then_restarted(tmp_path, secure=True)
    register(broker.engine, OTHER_KEY, ("review",), 1010.0)
    broker.answer(OTHER_KEY, 1010.1)
    assert broker.state() == "pending"
    assert broker.engine.ledger.counters["stale_results"] == 1
    # The holder's key answers, from a new connection (its agent restarted too).
    register(broker.engine, SAME_KEY_NEW_ID, ("review",), 1010.2)
    broker.answer(SAME_KEY_NEW_ID, 1010.3)
    assert broker.state() == "succeeded"


def test_after_a_restart_another_key_cannot_claim_the_attempt_in_ready(tmp_path: Path) -> None:
    broker = _dispatched_then_restarted(tmp_path, secure=True)
    register(broker.engine, OTHER_KEY, ("review",), 1010.0, running=(TASK,))
    sent = broker.step(1010.0)
    assert any(isinstance(m, Cancel) and TASK in m.task_ids for m in sent[OTHER_KEY])
    assert broker.state() == "pending"
    register(broker.engine, HOLDER, ("review",), 1010.1, running=(TASK,))
    assert broker.state() == "running"
    assert broker.engine.tasks[TASK].agent.identity == HOLDER  # type: ignore[union-attr]


def test_holder_keys_survive_a_compaction(tmp_path: Path) -> None:
    broker = _dispatched_then_restarted(tmp_path, secure=True, compact=True)
    register(broker.engine, OTHER_KEY, ("review",), 1010.0)
    broker.answer(OTHER_KEY, 1010.1)
    assert broker.state() == "pending"
    register(broker.engine, HOLDER, ("review",), 1010.2)
    broker.answer(HOLDER, 1010.3)
    assert broker.state() == "succeeded"


def test_a_task_that_never_reached_an_agent_takes_no_late_result_after_a_restart(
        tmp_path: Path) -> None:
    broker = Broker(tmp_path, 1000.0, secure=True)
    submit(broker.engine, CLIENT, 1000.0, TASK, capabilities=("review",))
    broker.step(1000.0)
    broker.journal.close()
    broker = Broker(tmp_path, 1010.0, secure=True)
    register(broker.engine, OTHER_KEY, ("review",), 1010.0)
    broker.engine.handle(OTHER_KEY, Results([ResultItem(TASK, "succeeded", b"\x01")]),
                         1010.0)
    assert broker.engine.tasks[TASK].result is None
    assert broker.engine.ledger.counters["stale_results"] == 1


def test_a_plaintext_broker_takes_any_registered_agents_late_result(tmp_path: Path) -> None:
    broker = _dispatched_then_restarted(tmp_path, secure=False)
    register(broker.engine, OTHER_KEY, ("review",), 1010.0)
    broker.answer(OTHER_KEY, 1010.1)
    assert broker.state() == "succeeded"
