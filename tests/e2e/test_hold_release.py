"""Held results (``submit(..., hold=True)``) end to end: a real broker with small retention
limits, real agents.

A held result stays in the broker whatever its retention limits (a workflow step's, until
its run has checkpointed it), small or large (in the result store), across a broker
restart too (the journal), until ``release`` names it; from then on retention applies to
it as to any other. Eviction pressure is other tasks' results; every wait is a deadline
on a round trip, never a sleep.
"""

from __future__ import annotations

import hashlib

import pytest

from agent_sdk import SyncClient, TaskNotFound
from agent_sdk.sync import SyncTaskHandle
from bench.large_results import blob
from tests.conftest import BrokerProcess, Cluster

RESULT_S = 60.0
#: Payload bytes of results kept in the broker's memory: a few of the small results below.
SMALL_RETENTION = "4096"
#: A small result's data: enough that a dozen of them exceed SMALL_RETENTION.
SMALL = "x" * 500
#: A large result (withheld, kept in the result store), and a store room for two of them.
LARGE = 2_000_000
STORE_BYTES = "5000000"
BIG_AGENT = "bench.large_results:BigAgent"


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def finished(handles: list[SyncTaskHandle]) -> None:
    for handle in handles:
        assert handle.result(RESULT_S).ok


def small_pressure(client: SyncClient, count: int = 40) -> None:
    """Results enough to push every unheld small result out of SMALL_RETENTION."""
    finished([client.submit(capabilities=["echo"], data=SMALL, timeout=RESULT_S)
              for _ in range(count)])


def large_pressure(client: SyncClient, count: int = 4) -> None:
    """Results enough to push every unheld large result out of STORE_BYTES, one after the
    other: run at once, the store would evict some before their client read them."""
    for n in range(count):
        finished([client.submit(capabilities=["big"], data={"seed": 100 + n, "size": LARGE},
                                timeout=RESULT_S)])


def gone(client: SyncClient, task_id: str) -> bool:
    try:
        client.fetch(task_id, timeout=RESULT_S)
    except TaskNotFound:
        return True
    return False


def test_a_held_result_outlives_retention_until_released(cluster: Cluster) -> None:
    broker = cluster.broker("--retention-bytes", SMALL_RETENTION)
    cluster.agent(broker.url)
    client = cluster.client(broker.url)
    held = client.submit(capabilities=["echo"], data="held " + SMALL, hold=True,
                         timeout=RESULT_S)
    plain = client.submit(capabilities=["echo"], data="plain " + SMALL, timeout=RESULT_S)
    finished([held, plain])
    # When other results push the oldest out of the retention limit
    small_pressure(client)
    # Then the plain result is gone and the held one is still there
    assert gone(client, plain.id)
    assert client.fetch(held.id, timeout=RESULT_S).data == "held " + SMALL
    # And once released, retention applies to it again
    client.release([held.id])
    small_pressure(client)
    assert gone(client, held.id)


def test_a_held_large_result_outlives_the_store_limit_until_released(cluster: Cluster) -> None:
    broker = cluster.broker("--result-store-bytes", STORE_BYTES)
    cluster.agent(broker.url, BIG_AGENT)
    client = cluster.client(broker.url)
    held = client.submit(capabilities=["big"], data={"seed": 1, "size": LARGE}, hold=True,
                         timeout=RESULT_S)
    plain = client.submit(capabilities=["big"], data={"seed": 2, "size": LARGE},
                          timeout=RESULT_S)
    finished([held, plain])
    large_pressure(client)
    assert gone(client, plain.id)
    # The held one is read whole, in chunks, from the store
    assert digest(client.fetch(held.id, timeout=RESULT_S).data) == digest(blob(1, LARGE))
    assert client.client._payloads.chunks_read > 0
    client.release([held.id])
    large_pressure(client)
    assert gone(client, held.id)


def restarted(cluster: Cluster, broker: BrokerProcess, client: SyncClient) -> BrokerProcess:
    """The broker killed (SIGKILL) and started again on its data dir, its agents back."""
    broker.sigkill()
    broker = cluster.restart(broker)
    client.wait_for_agents(1, capability="echo", timeout=RESULT_S)
    client.wait_for_agents(1, capability="big", timeout=RESULT_S)
    return broker


def test_held_results_survive_a_broker_restart(cluster: Cluster) -> None:
    broker = cluster.broker("--retention-bytes", SMALL_RETENTION,
                            "--result-store-bytes", STORE_BYTES)
    cluster.agent(broker.url)
    cluster.agent(broker.url, BIG_AGENT)
    client = cluster.client(broker.url)
    small = client.submit(capabilities=["echo"], data="held " + SMALL, hold=True,
                          timeout=RESULT_S)
    large = client.submit(capabilities=["big"], data={"seed": 3, "size": LARGE}, hold=True,
                          timeout=RESULT_S)
    plain = client.submit(capabilities=["echo"], data="plain " + SMALL, timeout=RESULT_S)
    finished([small, large, plain])
    # When the broker is killed and started again, and other results come
    broker = restarted(cluster, broker, client)
    small_pressure(client)
    large_pressure(client)
    # Then the held results are still there, whole, and the plain one is not
    assert gone(client, plain.id)
    assert client.fetch(small.id, timeout=RESULT_S).data == "held " + SMALL
    assert digest(client.fetch(large.id, timeout=RESULT_S).data) == digest(blob(3, LARGE))
    # And a release after the restart lets them go (and is journalled: a second
    # restart does not hold them again)
    client.release([small.id, large.id])
    # RELEASE has no answer; a STATUS round trip after it on the same connection comes
    # back only after the pass that handled it was committed to the journal
    client.status(timeout=RESULT_S)
    restarted(cluster, broker, client)
    small_pressure(client)
    large_pressure(client)
    assert gone(client, small.id) and gone(client, large.id)


@pytest.mark.parametrize("ids", [[], ["never-submitted"]])
def test_releasing_nothing_held_changes_nothing(cluster: Cluster, ids: list[str]) -> None:
    broker = cluster.broker()
    cluster.agent(broker.url)
    client = cluster.client(broker.url)
    client.release(ids)
    # The broker goes on serving
    assert client.submit(capabilities=["echo"], data=1, timeout=RESULT_S).result(RESULT_S).data == 1
