"""Identities bound to keys and clients kept apart, on a secure broker (issue 15).

Real processes on free ports: a ``--secure`` broker, agents and CLI clients each with a
key of their own; every wait has a deadline.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from agent_sdk import SyncClient
from broker.security import authorize, authorized_path, revoke
from cli.processes import wait_until
from tests.conftest import Cluster, python_process
from tests.e2e.test_secure import EXIT_UNAUTHORIZED, cli, key_env, new_key, secure  # noqa: F401
from wire.curve import ClientKeys, apply_client, key_scope, read_keys
from wire.tasks import Error, StatusRequest, decode, encode

EXIT_NOT_FOUND = 1


def _client_env(broker: Any, keys: Path, tmp_path: Path, name: str) -> dict[str, str]:
    """A new client key, authorized as ``client``: the environment that uses it."""
    public, secret = new_key(tmp_path / name, name)
    authorize(authorized_path(broker.data_dir), public, "client")
    return key_env(keys / "broker.key", secret)


def _run(broker: Any, env: dict[str, str], tmp_path: Path, *args: str) -> Any:
    """``orchestrator COMMAND --json ARGS`` against the broker, from a data dir of no
    broker (``--json`` before the arguments, so that ARGS may hold ``--``)."""
    return cli("--home", str(tmp_path / "elsewhere"), "--broker", broker.url, args[0],
               "--json", *args[1:], env=env)


def _agent_env(broker: Any, keys: Path, tmp_path: Path, name: str,
               **grant: list[str]) -> dict[str, str]:
    public, secret = new_key(tmp_path / name, name)
    authorize(authorized_path(broker.data_dir), public, "agent", **grant)  # type: ignore[arg-type]
    return key_env(keys / "broker.key", secret)


@contextlib.contextmanager
def raw_dealer(broker: Any, keys: Path, key_dir: Path, role: str,
               routing_id: bytes) -> Iterator[tuple[zmq.Socket[Any], str]]:
    """A raw CURVE DEALER of a fresh key authorised with ``role``, connected to the
    broker under ``routing_id`` (which the SDK would never pick); (socket, its public
    key). Closed, with its context, at the end."""
    public, secret = new_key(key_dir, key_dir.name)
    authorize(authorized_path(broker.data_dir), public, role)
    server = read_keys(keys / "broker.key")["public"]
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    try:
        apply_client(sock, ClientKeys(server, public, read_keys(secret)["secret"]))
        sock.setsockopt(zmq.ROUTING_ID, routing_id)
        sock.setsockopt(zmq.RCVTIMEO, 10_000)
        sock.connect(broker.url)
        yield sock, public
    finally:
        sock.close(linger=0)
        ctx.term()


def test_a_client_cannot_see_fetch_trace_or_cancel_another_clients_task(
        cluster: Cluster, secure: Any, tmp_path: Path) -> None:
    broker, keys = secure
    cluster.agent(broker.url, **_agent_env(broker, keys, tmp_path, "agent"), echo_delay_s="30")
    alice = _client_env(broker, keys, tmp_path, "alice")
    bob = _client_env(broker, keys, tmp_path, "bob")
    # Given Alice's task, running
    submitted = _run(broker, alice, tmp_path, "submit", "secret plans", "-c", "echo",
                     "--id", "plans", "--no-wait")
    assert submitted.returncode == 0, submitted.stderr
    task_id = json.loads(submitted.stdout)["task_id"]
    assert task_id.endswith("~plans"), task_id  # scoped to Alice's key
    # (a scope is [a-z2-7]: the id pastes into a shell as it is, never read as an option)
    assert re.fullmatch(r"[a-z2-7]{20}~plans", task_id), task_id
    # Then Bob can neither fetch, trace nor list it, by its full id or its short one
    for ref in (task_id, "plans"):
        fetched = _run(broker, bob, tmp_path, "result", "--timeout", "5", ref)
        assert fetched.returncode == EXIT_NOT_FOUND, fetched.stdout + fetched.stderr
        assert "secret plans" not in fetched.stdout
        traced = _run(broker, bob, tmp_path, "trace", ref)
        assert traced.returncode == EXIT_NOT_FOUND, traced.stdout + traced.stderr
    listed = _run(broker, bob, tmp_path, "tasks")
    assert listed.returncode == 0, listed.stderr
    assert task_id not in listed.stdout
    # And Bob's cancel does not touch it
    assert _run(broker, bob, tmp_path, "cancel", task_id).returncode in (
        0, EXIT_NOT_FOUND)
    mine = _run(broker, alice, tmp_path, "tasks")
    assert [t["status"] for t in json.loads(mine.stdout)
            if t["task_id"] == task_id] == ["running"]
    # And submitting Alice's id makes a task of Bob's own, not Alice's result
    again = _run(broker, bob, tmp_path, "submit", "mine", "-c", "echo", "--id", task_id,
                 "--no-wait")
    assert again.returncode == 0, again.stderr
    bobs_id = json.loads(again.stdout)["task_id"]
    assert bobs_id != task_id and bobs_id.endswith(task_id)
    # While Alice sees her own
    traced = _run(broker, alice, tmp_path, "trace", "plans")
    assert traced.returncode == 0, traced.stderr


def test_a_raw_client_cannot_submit_outside_its_scope(secure: Any, tmp_path: Path) -> None:
    broker, keys = secure
    # A routing id outside its key's scope: every message refused
    with raw_dealer(broker, keys, tmp_path / "raw", "client", b"pretender") as (sock, _):
        sock.send_multipart(encode(StatusRequest(7)))
        reply = decode(sock.recv_multipart())
        assert isinstance(reply, Error) and reply.code == "unauthorized", reply
        assert reply.req == 7 and "scope" in reply.message


def test_an_agent_key_registers_only_under_its_names(cluster: Cluster, secure: Any,
                                                     tmp_path: Path) -> None:
    broker, keys = secure
    env = _agent_env(broker, keys, tmp_path, "bound", names=["reviewer"])
    # An agent of another name with that key: refused, says why, keeps trying
    log = tmp_path / "impostor.log"
    with log.open("wb") as stderr:
        impostor = python_process("-m", "agent_sdk", "run", "tests.sample_agents:EchoAgent",
                                  "--broker", broker.url, env=env, stderr=stderr)
    cluster.procs.append(impostor)
    assert wait_until(lambda: "may register as reviewer" in log.read_text(), 15), \
        log.read_text()
    assert impostor.poll() is None
    # The name it is bound to registers
    cluster.agent(broker.url, agent_name="reviewer", agent_caps="echo", **env)
    # And a capability outside its grant is refused
    env_caps = _agent_env(broker, keys, tmp_path, "capped", capabilities=["echo"])
    log = tmp_path / "capped.log"
    with log.open("wb") as stderr:
        capped = python_process("-m", "agent_sdk", "run", "tests.sample_agents:EchoAgent",
                                "--broker", broker.url,
                                env={**env_caps, "AGENT_CAPS": "echo,shell"}, stderr=stderr)
    cluster.procs.append(capped)
    assert wait_until(lambda: "capabilities shell" in log.read_text(), 15), log.read_text()


def test_another_key_presenting_a_live_agents_routing_id_gets_none_of_its_tasks(
        cluster: Cluster, secure: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    broker, keys = secure
    real_public, real_secret = new_key(tmp_path / "real", "real")
    authorize(authorized_path(broker.data_dir), real_public, "agent")
    cluster.agent(broker.url, **key_env(keys / "broker.key", real_secret))
    for name, value in _client_env(broker, keys, tmp_path, "client").items():
        monkeypatch.setenv(name, value)
    client = cluster.client(broker.url)
    # (the agent's routing id: its key's scope and its agent id)
    routing_id = key_scope(real_public) + client.status()["agents"][0]["id"]
    # Given a thief with an agent key of its own, connecting with the live agent's id
    with raw_dealer(broker, keys, tmp_path / "thief", "agent",
                    routing_id.encode()) as (thief, _):
        # When 20 tasks run
        handles = [client.submit(f"t{i}", capabilities=["echo"]) for i in range(20)]
        results = [handle.result(timeout=30) for handle in handles]
        # Then the real agent ran them all, and the thief received nothing
        assert all(r.ok for r in results), results
        assert not thief.poll(0), thief.recv_multipart()


def test_a_revoked_agent_key_loses_its_registration_and_its_tasks_finish_elsewhere(
        cluster: Cluster, secure: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    broker, keys = secure
    doomed_public, doomed_secret = new_key(tmp_path / "doomed", "doomed")
    authorize(authorized_path(broker.data_dir), doomed_public, "agent")
    doomed_env = key_env(keys / "broker.key", doomed_secret)
    cluster.agent(broker.url, agent_name="doomed", echo_delay_s="60", **doomed_env)
    for name, value in _client_env(broker, keys, tmp_path, "client").items():
        monkeypatch.setenv(name, value)
    client = cluster.client(broker.url)
    # Given tasks running on the agent whose key is then revoked
    handles = [client.submit(f"t{i}", capabilities=["echo"], timeout=60) for i in range(3)]
    assert wait_until(lambda: len(client.tasks(statuses=["running"])) == 3, 15)
    revoke(authorized_path(broker.data_dir), doomed_public)
    # Then its registration goes
    assert wait_until(lambda: not client.status()["agents"], 15), client.status()["agents"]
    # And its tasks finish on another agent
    cluster.agent(broker.url, agent_name="good", **_agent_env(broker, keys, tmp_path, "good"))
    results = [handle.result(timeout=30) for handle in handles]
    assert all(r.ok for r in results), results
    assert {r.agent for r in results} == {"good"}


def test_a_client_key_may_not_register_as_an_agent_nor_message_clients(
        cluster: Cluster, secure: Any, tmp_path: Path) -> None:
    broker, keys = secure
    env = _client_env(broker, keys, tmp_path, "client")
    log = tmp_path / "agent.log"
    with log.open("wb") as stderr:
        agent = python_process("-m", "agent_sdk", "run", "tests.sample_agents:EchoAgent",
                               "--broker", broker.url, env=env, stderr=stderr)
    cluster.procs.append(agent)
    assert wait_until(lambda: "may not register as an agent" in log.read_text(), 15), \
        log.read_text()
    assert key_scope(read_keys(Path(env["ORCH_CURVE_KEY_FILE"]))["public"])
    assert os.environ.get("ORCH_CURVE_KEY_FILE") is None  # nothing leaked into this process


def test_refused_peers_are_announced_on_the_bus(cluster: Cluster, secure: Any, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    broker, keys = secure
    for name, value in key_env(keys / "broker.key", keys / "local-admin.key_secret").items():
        monkeypatch.setenv(name, value)
    admin = cluster.client(broker.url)
    refused = admin.subscribe("agents.refused")
    # A known key presenting a routing id outside its scope: refused, and announced
    with raw_dealer(broker, keys, tmp_path / "raw", "client", b"pretender") as (sock, _):
        sock.send_multipart(encode(StatusRequest(1)))
        event = refused.next(timeout=10).data
        assert event["peer"] == "pretender" and "scope" in event["reason"], event
    # And an unknown key's handshake: announced within a heartbeat interval
    stranger, stranger_secret = new_key(tmp_path / "stranger", "stranger")
    unknown = cli("--home", str(tmp_path / "elsewhere"), "--broker", broker.url, "status",
                  env=key_env(keys / "broker.key", stranger_secret))
    assert unknown.returncode == EXIT_UNAUTHORIZED
    event = refused.next(timeout=10).data
    assert event["peer"].startswith(stranger) and "not authorized" in event["reason"], event
