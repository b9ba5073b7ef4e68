"""The state service of a secure broker (issue 15): key prefix rules per role, fenced
writes only from the lease's holder, lock listings that hide other sessions' tokens.

Real processes on free ports; keys come from ORCH_CURVE_* (set before each client is
made: a client reads them when it connects). Every wait has a deadline, no sleeps.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent_sdk import (
    Client,
    StaleFencingToken,
    StateAccessDenied,
    StateClient,
    Unauthorized,
)
from agent_sdk.loop import run as run_loop
from broker.security import authorize, authorized_path
from tests.conftest import Cluster
from tests.e2e.test_secure import EXIT_UNAUTHORIZED, cli, key_env, new_key
from workflows import ids
from workflows.api import as_workflow, run_workflow
from workflows.runs import RunStatus

#: Deadline of every request and task in these tests.
WAIT_S = 20.0


@dataclass
class SecureState:
    """A secure broker with an agent key and a client key in its allow-list."""

    url: str
    state: str
    home: Path
    agent: dict[str, str]
    client: dict[str, str]
    admin: dict[str, str]
    #: a data dir of no broker, so that the CLI takes its keys from the environment only
    elsewhere: Path

    def cli_state(self, env: dict[str, str], *args: str) -> Any:
        return cli("--home", str(self.elsewhere), "state", "--state", self.state, *args,
                   env=env)


@pytest.fixture
def secure(cluster: Cluster, tmp_path: Path) -> SecureState:
    return start_secure(cluster, tmp_path)


def start_secure(cluster: Cluster, tmp_path: Path) -> SecureState:
    """A secure broker, an agent key and a client key authorized."""
    broker = cluster.broker("--secure")
    keys = broker.data_dir / "keys"
    agent_public, agent_secret = new_key(tmp_path / "agent-keys", "agent")
    client_public, client_secret = new_key(tmp_path / "client-keys", "client")
    authorize(authorized_path(broker.data_dir), agent_public, "agent")
    authorize(authorized_path(broker.data_dir), client_public, "client")
    info = json.loads((broker.data_dir / "broker.json").read_text())
    return SecureState(broker.url, info["state"], broker.data_dir,
                       key_env(keys / "broker.key", agent_secret),
                       key_env(keys / "broker.key", client_secret),
                       key_env(keys / "broker.key", keys / "local-admin.key_secret"),
                       tmp_path / "elsewhere")


def use_keys(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    """Make the clients created from now on in this process connect with ``env``'s key."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)


def test_an_agent_key_cannot_write_outside_its_prefixes(
        secure: SecureState, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given an agent key: the CLI refuses to write a workflow run with it (exit 5)
    refused = secure.cli_state(secure.agent, "set", ids.run_key("r1"), '{"x": 1}', "--json")
    assert refused.returncode == EXIT_UNAUTHORIZED, refused.stderr
    assert refused.stderr.startswith("error: unauthorized: role agent may not write")
    assert "'wf/'" in refused.stderr
    assert json.loads(refused.stdout)["reason"] == "access_denied"
    # nor read one, nor the usage counters of agents as a client
    assert secure.cli_state(secure.agent, "get", ids.run_key("r1")).returncode == \
        EXIT_UNAUTHORIZED
    forged = secure.cli_state(secure.client, "set", "llm/usage/coder/a1", "{}")
    assert forged.returncode == EXIT_UNAUTHORIZED and "role client" in forged.stderr
    # But the shared space is the agent's to write
    assert secure.cli_state(secure.agent, "set", "stats/reviewed", "1").returncode == 0
    # And from the SDK: the refusal is StateAccessDenied, an Unauthorized
    use_keys(monkeypatch, secure.agent)

    async def scenario() -> None:
        async with StateClient(secure.state, name="agent", request_timeout_s=WAIT_S) as state:
            assert await state.update("llm/budget/b1", lambda n: (n or 0) + 1) == 1
            with pytest.raises(StateAccessDenied) as denied:
                await state.set(ids.checkpoint_key("r1", 1), [])
            assert isinstance(denied.value, Unauthorized)
            assert denied.value.code == "unauthorized"
            with pytest.raises(StateAccessDenied):
                await state.acquire(ids.lease_name("r1"), wait=0)
            with pytest.raises(StateAccessDenied):
                await state.list("wf/")
            # a listing of everything leaves out what the role may not read
            keys = [entry.key for entry in await state.list("")]
            assert "stats/reviewed" in keys and not any(k.startswith("wf/") for k in keys)

    run_loop(scenario())


def test_a_client_key_does_what_the_state_command_and_workflows_need(
        cluster: Cluster, secure: SecureState, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a client key: every `state` command works, in the shared space and on runs
    for args in (("set", "jobs/1", '{"n": 1}'), ("get", "jobs/1"), ("list", "jobs/"),
                 ("set", ids.cancel_key("r0"), "{}"), ("list", "wf/"), ("locks",),
                 ("del", "jobs/1")):
        done = secure.cli_state(secure.client, *args, "--json")
        assert done.returncode == 0, (args, done.stderr)
    # And a workflow driven in a process with the client key runs to its end (lease,
    # fenced record and checkpoints under wf/), its step on an agent with an agent key
    cluster.agent(secure.url, "tests.sample_agents:EchoAgent", True, **secure.agent)
    use_keys(monkeypatch, secure.client)
    workflow = as_workflow({"workflow": "secure", "steps": [{"capability": "echo"}]})

    async def scenario() -> Any:
        async with Client(secure.url) as client:
            return await asyncio.wait_for(run_workflow(workflow, {"n": 2}, client=client),
                                          WAIT_S * 2)

    record = run_loop(scenario())
    assert record.status is RunStatus.SUCCEEDED, record
    shown = secure.cli_state(secure.client, "get", ids.run_key(record.run_id), "--json")
    assert json.loads(shown.stdout)["value"]["status"] == "succeeded"


@pytest.mark.parametrize("mode", ["plaintext", "secure"])
def test_a_non_holders_fenced_write_is_refused(cluster: Cluster, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch,
                                               mode: str) -> None:
    if mode == "secure":
        setup = start_secure(cluster, tmp_path)
        url, holder_keys, other_keys = setup.state, setup.client, setup.agent
    else:
        broker = cluster.broker()
        url = json.loads((broker.data_dir / "broker.json").read_text())["state"]
        holder_keys = other_keys = {}

    async def scenario() -> None:
        use_keys(monkeypatch, holder_keys)
        async with StateClient(url, name="holder", request_timeout_s=WAIT_S) as holder:
            # connected (with the holder's key) before the environment changes
            await holder.ping(WAIT_S)
            use_keys(monkeypatch, other_keys)
            async with StateClient(url, name="other", request_timeout_s=WAIT_S) as other:
                async with holder.lock("repo/x", ttl=30) as lease:
                    # Given the lease's token, known to the other session (as a listing
                    # shows it in plaintext)
                    fence = ("repo/x", lease.token)
                    # When the other session writes with it: refused
                    with pytest.raises(StaleFencingToken) as stale:
                        await other.set("repo/x/head", "theirs", fence=fence)
                    assert "only the holder" in str(stale.value)
                    with pytest.raises(StaleFencingToken):
                        await other.delete("repo/x/head", fence=fence)
                    # And the holder's own fenced write passes
                    assert await holder.set("repo/x/head", "mine", fence=lease) > 0
                assert await other.get("repo/x/head") == "mine"

    run_loop(scenario())


def test_locks_hides_other_sessions_tokens_but_not_from_an_admin(
        secure: SecureState, monkeypatch: pytest.MonkeyPatch) -> None:
    use_keys(monkeypatch, secure.agent)

    async def scenario() -> None:
        async with StateClient(secure.state, name="owner", request_timeout_s=WAIT_S) as state:
            async with state.lock("deploy/prod", ttl=30) as lease:
                # The holder sees its own token
                [own] = await state.locks("deploy/")
                assert own.token == lease.token
                # Another key sees the lock, its holder and time left, not the token
                # (the CLI runs in a thread: the holder's loop keeps renewing its lease)
                other = await asyncio.to_thread(secure.cli_state, secure.client, "locks",
                                                "--json")
                assert other.returncode == 0, other.stderr
                [row] = json.loads(other.stdout)
                assert (row["name"], row["holder"], row["token"], row["session"]) == \
                    ("deploy/prod", "owner", None, "")
                assert 0 < row["expires_in_s"] <= 30
                table = await asyncio.to_thread(secure.cli_state, secure.client, "locks")
                [line] = [ln for ln in table.stdout.splitlines() if "deploy/prod" in ln]
                cells = [cell.strip() for cell in line.split("│") if cell.strip()]
                assert cells[:4] == ["deploy/prod", "-", "owner", "-"], table.stdout
                # An admin sees everything
                admin = await asyncio.to_thread(secure.cli_state, secure.admin, "locks",
                                                "--json")
                [row] = json.loads(admin.stdout)
                assert row["token"] == lease.token and row["session"]

    run_loop(scenario())
