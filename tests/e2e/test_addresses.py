"""Addresses for other machines (issue 16): a broker bound to every interface announces
endpoints peers can reach. ``--advertise HOST`` names the host in what it announces; without
it a peer replaces 0.0.0.0 by the host it used to reach the broker. Binding a non-loopback
address says which ports a firewall must open.

Across real network namespaces: tests/multihost. Here, on one machine, 127.0.0.3 stands
for "another address of the broker's machine" (all of 127/8 is loopback on Linux)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import Cluster
from tests.e2e.test_secure import cli
from wire.sockets import reachable_endpoint, reachable_endpoints, with_host


def test_an_unspecified_host_becomes_the_host_used_to_reach_the_broker() -> None:
    via = "tcp://10.1.2.3:5555"
    assert reachable_endpoint("tcp://0.0.0.0:5556", via) == "tcp://10.1.2.3:5556"
    assert reachable_endpoint("tcp://[::]:5556", via) == "tcp://10.1.2.3:5556"
    assert reachable_endpoint("tcp://*:5556", via) == "tcp://10.1.2.3:5556"
    assert reachable_endpoint("tcp://192.168.0.9:5556", via) == "tcp://192.168.0.9:5556"
    assert reachable_endpoint("not an endpoint", via) == "not an endpoint"
    assert reachable_endpoint("tcp://0.0.0.0:5556", "bogus") == "tcp://0.0.0.0:5556"
    assert reachable_endpoints({"state": "tcp://0.0.0.0:5558", "metrics": "http://x"},
                               "tcp://broker.lan:5555") == {
        "state": "tcp://broker.lan:5558", "metrics": "http://x"}
    assert with_host("tcp://0.0.0.0:5557", "broker.lan") == "tcp://broker.lan:5557"


def test_advertise_names_the_host_in_every_announced_endpoint(
        cluster: Cluster, capfd: pytest.CaptureFixture[str]) -> None:
    broker = cluster.broker("--bind", "0.0.0.0:0", "--advertise", "127.0.0.3",
                            "--metrics-bind", "127.0.0.1:0")
    port = broker.port
    client = cluster.client(f"tcp://127.0.0.1:{port}")
    endpoints = client.status(10.0)["broker"]["endpoints"]
    for name in ("bus_out", "bus_in", "state", "events"):
        assert endpoints[name].startswith("tcp://127.0.0.3:"), (name, endpoints)
    # The metrics port stays on loopback unless bound elsewhere: announced as it is.
    assert endpoints["metrics"].startswith("http://127.0.0.1:") or \
        "127.0.0.1" in endpoints["metrics"]
    # The advertised state endpoint works for a client.
    _state_round_trip(cluster.tmp_path, f"tcp://127.0.0.1:{port}")
    # Printed before the ready line, so on stderr by now (the broker inherits it).
    (line,) = [line for line in capfd.readouterr().err.splitlines() if "open TCP" in line]
    assert f"{port} (tasks)" in line and "(state)" in line and "(bus_out)" in line


def test_without_advertise_a_client_reaches_state_through_the_host_it_used(
        cluster: Cluster) -> None:
    broker = cluster.broker("--bind", "0.0.0.0:0")
    client = cluster.client(f"tcp://127.0.0.3:{broker.port}")
    assert client.status(10.0)["broker"]["endpoints"]["state"].startswith("tcp://0.0.0.0:")
    _state_round_trip(cluster.tmp_path, f"tcp://127.0.0.3:{broker.port}")


def _state_round_trip(tmp_path: Path, url: str) -> None:
    """``state set`` then ``state get`` through the CLI against ``url``, from a data dir
    of no broker: the state service's address comes from the broker's announcement."""
    home = ("--home", str(tmp_path / "cli-home"), "--broker", url)
    written = cli(*home, "state", "set", "addresses/probe", "42", "--json")
    assert written.returncode == 0, written.stderr
    read = cli(*home, "state", "get", "addresses/probe", "--json")
    assert read.returncode == 0, read.stderr
    assert json.loads(read.stdout)["value"] == 42
