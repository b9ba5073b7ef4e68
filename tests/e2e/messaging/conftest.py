"""Fixtures for the messaging tests: a real broker (with its bus) and agent processes from
``tests/messaging/agents.py``, all killed at teardown by the ``cluster`` fixture."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest

from agent_sdk import SyncClient
from tests.support import wait_status  # noqa: F401 - the tests here import it from here
from tests.conftest import Cluster, python_process, read_json_line

T = TypeVar("T")

#: Default deadline of :func:`wait_until`.
WAIT_S = 15.0


@dataclass
class AgentProcess:
    """An agent process that registered: its id, name and process."""

    agent_id: str
    name: str
    proc: subprocess.Popen[bytes]


@dataclass
class Messaging:
    """A broker with its bus, and helpers to start the test agents."""

    cluster: Cluster
    url: str

    def agent(self, cls: str, **env: str) -> AgentProcess:
        """Start ``tests.e2e.messaging.agents:<cls>`` and return once it registered."""
        proc = python_process("-m", "agent_sdk", "run", f"tests.e2e.messaging.agents:{cls}",
                              "--broker", self.url,
                              env={k.upper(): str(v) for k, v in env.items()})
        self.cluster.procs.append(proc)
        info = read_json_line(proc)
        return AgentProcess(info["agent_id"], info["name"], proc)

    def client(self, **options: Any) -> SyncClient:
        client = SyncClient(self.url, **options)
        self.cluster.clients.append(client)
        return client


@pytest.fixture
def messaging(cluster: Cluster) -> Iterator[Messaging]:
    broker = cluster.broker()
    yield Messaging(cluster, broker.url)


def wait_until(probe: Callable[[], T], accept: Callable[[T], bool], timeout: float = WAIT_S,
               what: str = "condition") -> T:
    """Call ``probe`` (a request or a status round trip: it blocks on the network, not on
    a sleep) until ``accept`` holds for its value; return that value.

    Raises:
        AssertionError: with the last value, when ``timeout`` passes first.
    """
    deadline = time.monotonic() + timeout
    value = probe()
    while not accept(value):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not hold within {timeout:g} s; last: {value!r}")
        value = probe()
    return value


def agent_named(status: dict[str, Any], name: str) -> dict[str, Any] | None:
    """The status entry of the agent called ``name``, or None."""
    return next((agent for agent in status["agents"] if agent["name"] == name), None)
