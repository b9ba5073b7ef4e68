"""Registration on the engine: names and capabilities that could forge log lines or
break tables are refused, and what is logged of a peer is escaped."""

from __future__ import annotations

import logging

import pytest
import zmq

from tests.broker.support import make_engine, run_pass
from tests.conftest import Cluster
from wire.sockets import recv_frames, send_frames
from wire.tasks import Error, Ready, Welcome, decode, encode

START = 1000.0
PEER = b"peer-1"


@pytest.mark.parametrize("agent_id,name,capabilities", [
    ("a1", "evil\n2026-01-01 INFO broker: forged", ("echo",)),
    ("a1\r", "fine", ("echo",)),
    ("a1", "fine", ("ec\x1bho",)),
    ("a1", "", ("echo",)),
    ("a1", "x" * 300, ("echo",)),
    ("a1", "fine", ("",)),
])
def test_a_ready_with_a_bad_name_is_refused(agent_id: str, name: str,
                                            capabilities: tuple[str, ...]) -> None:
    engine = make_engine()
    engine.handle(PEER, Ready(agent_id, name, capabilities, 1), START)
    sent = run_pass(engine, START)[PEER]
    # Then the peer hears bad_request, is not welcomed, and no agent is registered
    assert [m.code for m in sent if isinstance(m, Error)] == ["bad_request"]
    assert not any(isinstance(m, Welcome) for m in sent)
    assert len(engine.ledger.agents) == 0


def test_a_printable_name_registers_and_is_logged_escaped(
        caplog: pytest.LogCaptureFixture) -> None:
    engine = make_engine()
    with caplog.at_level(logging.INFO, logger="broker.engine.agents"):
        engine.handle(PEER, Ready("a1", "reviewer é", ("code review",), 1), START)
    sent = run_pass(engine, START)[PEER]
    assert any(isinstance(m, Welcome) for m in sent)
    [line] = [r.getMessage() for r in caplog.records if "registered" in r.getMessage()]
    assert "'reviewer é'" in line and "\n" not in line


def test_a_real_broker_refuses_a_forged_name(
        cluster: Cluster) -> None:
    # Given a real broker
    broker = cluster.broker()
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    try:
        dealer.connect(broker.url)
        # When a peer registers with a newline in its name
        send_frames(dealer, encode(Ready("a1", "x\n2026-01-01 INFO forged line", ("echo",), 1)))
        assert dealer.poll(10_000), "the broker did not answer the READY"
        reply = decode(recv_frames(dealer))
    finally:
        dealer.close(linger=0)
    # Then it is refused with bad_request, and nobody is registered
    assert isinstance(reply, Error) and reply.code == "bad_request"
    status = cluster.client(broker.url).status()
    assert status["agents"] == [] and status["errors"].get("bad_request") == 1
