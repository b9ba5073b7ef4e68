"""Registration caps against a real broker: agents per remote address and in all, from raw
DEALER sockets; a READY past a cap gets ERROR too_many_agents and registers nothing."""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

from tests.conftest import Cluster
from tests.support import RawPeer, WAIT_TIMEOUT_S
from wire.tasks import Disconnect, Error, Ready, Welcome


def _register(peer: RawPeer, n: int) -> Any:
    """READY, then the broker's answer to it (STATUS on the same connection orders it)."""
    peer.send(Ready(f"agent-{n}", f"fake-{n}", ("echo",), 1))
    status, received = peer.sync()
    answers = [m for m in received if isinstance(m, (Welcome, Error))]
    assert len(answers) == 1, received
    return answers[0], status


def _peer(stack: ExitStack, port: int, source: str) -> RawPeer:
    # libzmq's "source;destination" endpoint picks the connection's local address
    return stack.enter_context(RawPeer(f"tcp://{source}:0;127.0.0.1:{port}"))


def test_agents_are_capped_per_address_and_in_all(cluster: Cluster) -> None:
    # Given a broker taking 3 agents per address and 5 in all
    broker = cluster.broker("--max-agents-per-address", "3", "--max-agents", "5")
    with ExitStack() as stack:
        local = [_peer(stack, broker.port, "127.0.0.1") for _ in range(4)]
        other = [_peer(stack, broker.port, "127.0.0.2") for _ in range(3)]
        # When 4 connections from one address register
        answers = [_register(peer, n)[0] for n, peer in enumerate(local)]
        # Then 3 are welcomed and the 4th is refused with too_many_agents
        assert [type(a) for a in answers] == [Welcome, Welcome, Welcome, Error]
        assert answers[3].code == "too_many_agents" and "127.0.0.1" in answers[3].message
        # When 3 from another address register, the total cap (5) refuses the third
        answers = [_register(peer, 10 + n)[0] for n, peer in enumerate(other)]
        assert [type(a) for a in answers] == [Welcome, Welcome, Error]
        assert answers[2].code == "too_many_agents"
        _, status = _register(local[0], 0)  # registering again is no new agent
        assert len(status["agents"]) == 5
        assert status["errors"].get("too_many_agents") == 2
        # When an agent leaves, its address has room again
        local[1].send(Disconnect("bye"))
        local[1].sync()  # handled before anything sent after this returns
        answer, status = _register(local[3], 3)
        assert isinstance(answer, Welcome)
        assert len(status["agents"]) == 5


def test_default_caps_take_hundreds_from_one_address(cluster: Cluster) -> None:
    broker = cluster.broker()
    with ExitStack() as stack:
        peers = [_peer(stack, broker.port, "127.0.0.1") for _ in range(200)]
        answers = [_register(peer, n)[0] for n, peer in enumerate(peers)]
        assert all(isinstance(a, Welcome) for a in answers)
        status, _ = peers[-1].sync(WAIT_TIMEOUT_S)
        assert len(status["agents"]) == 200
        assert "too_many_agents" not in status["errors"]
