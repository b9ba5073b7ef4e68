"""Helpers shared by the process-level tests: waiting on broker status with a deadline
(the one ``wait_status`` of the suite), raw peers, agents by name."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import zmq

from agent_sdk import SyncClient
from wire.tasks import decode, encode, StatusReply, StatusRequest

#: Default deadline of :func:`wait_status`: the machine is small and shared.
WAIT_TIMEOUT_S = 20.0


def wait_status(client: SyncClient, predicate: Callable[[dict[str, Any]], bool],
                timeout: float = WAIT_TIMEOUT_S, what: str = "condition") -> dict[str, Any]:
    """Poll the broker's status until ``predicate(status)`` holds; return that status.

    Each poll is a STATUS round trip to the broker (it blocks on the network, not on a
    sleep). Raises AssertionError with the last status when ``timeout`` passes first.
    """
    deadline = time.monotonic() + timeout
    status = client.status(timeout=timeout)
    while not predicate(status):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"{what} did not hold within {timeout:g} s; last status: "
                                 f"{status!r}")
        status = client.status(timeout=max(remaining, 0.1))
    return status


def wait_finished(client: SyncClient, task_id: str, timeout: float = WAIT_TIMEOUT_S) -> Any:
    """Poll FETCH for ``task_id`` (any client's task) until it has a terminal result."""
    deadline = time.monotonic() + timeout
    result = client.fetch(task_id, timeout=timeout)
    while not result.finished:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"task {task_id} not finished within {timeout:g} s: {result!r}")
        result = client.fetch(task_id, timeout=max(remaining, 0.1))
    return result


def agents_by_name(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The status document's agents, keyed by agent name (names must be unique)."""
    agents: dict[str, dict[str, Any]] = {}
    for agent in status["agents"]:
        assert agent["name"] not in agents, f"two agents named {agent['name']!r}"
        agents[agent["name"]] = agent
    return agents


def in_flight_of(status: dict[str, Any], name: str) -> int:
    """How many tasks the broker counts in flight on the agent called ``name`` (0 if gone)."""
    agent = agents_by_name(status).get(name)
    return 0 if agent is None else int(agent["in_flight"])


class RawPeer:
    """A bare DEALER socket speaking the wire protocol by hand (for fuzzing and for
    counting exactly what the broker sends). Use as a context manager."""

    def __init__(self, url: str, identity: bytes | None = None) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if identity is not None:
            self.sock.setsockopt(zmq.ROUTING_ID, identity)
        self.sock.connect(url)
        #: STATUS request ids of :meth:`sync`, far from the small ids fuzzers use
        self._req = 1 << 40

    def __enter__(self) -> RawPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()

    def send_frames(self, frames: list[bytes]) -> None:
        self.sock.send_multipart(frames)

    def send(self, msg: Any) -> None:
        self.send_frames(encode(msg))

    def recv(self, timeout: float) -> Any | None:
        """The next decoded message from the broker, or None when ``timeout`` passes."""
        if not self.sock.poll(int(timeout * 1000)):
            return None
        return decode(self.sock.recv_multipart())

    def sync(self, timeout: float = WAIT_TIMEOUT_S) -> tuple[dict[str, Any], list[Any]]:
        """Send STATUS on this connection and read until its reply.

        The broker handles one connection's messages in order, so the reply reflects
        everything sent before. Returns the status and every message received before it.
        """
        self._req += 1
        req = self._req
        self.send(StatusRequest(req))
        received: list[Any] = []
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no STATUS reply within {timeout:g} s "
                                     f"({len(received)} other messages received)")
            msg = self.recv(remaining)
            if isinstance(msg, StatusReply) and msg.req == req:
                return msg.status, received
            if msg is not None:
                received.append(msg)
