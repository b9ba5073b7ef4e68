"""CURVE and ZAP (issue 15, first part): a secure broker, its allow-list, refused peers.

Real processes on free ports; every wait has a deadline (``wait_until``, ready lines).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from agent_sdk import SyncClient, SyncStateClient, Unauthorized
from broker.security import authorize, authorized_path, prepare_secure_home
from cli.processes import wait_until
from tests.conftest import ROOT, Cluster, kill, python_process, read_json_line
from wire.curve import read_keys, write_key_pair

#: A refused client must exit within this (issue 15).
REFUSAL_DEADLINE_S = 10.0
EXIT_UNAUTHORIZED = 5


def cli(*args: str, env: dict[str, str] | None = None,
        timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run ``python -m cli ARGS``; the environment's ORCH_CURVE_* are dropped first."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("ORCH_CURVE_")}
    full_env.update({"PYTHONPATH": str(ROOT), **(env or {})})
    return subprocess.run([sys.executable, "-m", "cli", *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def key_env(server_key_file: Path, secret_file: Path) -> dict[str, str]:
    return {"ORCH_CURVE_SERVER_KEY_FILE": str(server_key_file),
            "ORCH_CURVE_KEY_FILE": str(secret_file)}


def new_key(directory: Path, name: str) -> tuple[str, Path]:
    """A fresh key pair in ``directory``: (public key, secret file)."""
    public_path, secret_path = write_key_pair(directory, name)
    return read_keys(public_path)["public"], secret_path


def status(url: str, env: dict[str, str], home: Path) -> subprocess.CompletedProcess[str]:
    """``status --json`` against ``url`` from a data dir of no broker (keys from env)."""
    return cli("--home", str(home), "--broker", url, "status", "--json", env=env)


@pytest.fixture
def secure(cluster: Cluster) -> Any:
    broker = cluster.broker("--secure")
    return broker, broker.data_dir / "keys"


def test_a_task_runs_end_to_end_with_authorized_keys(cluster: Cluster, secure: Any,
                                                     tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a secure broker, an agent key and a client key in its allow-list
    broker, keys = secure
    info = json.loads((broker.data_dir / "broker.json").read_text())
    assert len(info["curve_public_key"]) == 40
    agent_public, agent_secret = new_key(tmp_path / "agent-keys", "agent")
    client_public, client_secret = new_key(tmp_path / "client-keys", "client")
    authorize(authorized_path(broker.data_dir), agent_public, "agent")
    authorize(authorized_path(broker.data_dir), client_public, "client")
    # When the agent and the client connect with them (the agent registers)
    cluster.agent(broker.url, **key_env(keys / "broker.key", agent_secret))
    for name, value in key_env(keys / "broker.key", client_secret).items():
        monkeypatch.setenv(name, value)
    client = cluster.client(broker.url)
    # Then a task runs end to end
    result = client.submit("hi", capabilities=["echo"]).result(timeout=15)
    assert result.ok, result
    # And the secure bus carries a client's messages (the subscription is confirmed
    # through the forwarder, whose XSUB and XPUB are CURVE servers) and the state
    # service answers over CURVE
    subscription = client.subscribe("news.")
    client.publish("news.today", {"n": 1})
    assert subscription.next(timeout=10).data == {"n": 1}
    state = SyncStateClient(info["state"], request_timeout_s=10)
    try:
        state.set("secure.k", 1)
        assert state.get("secure.k") == 1
    finally:
        state.close()


@pytest.mark.parametrize("case", ["unknown_key", "wrong_server_key", "plaintext"])
def test_a_refused_client_exits_5_with_the_reason(secure: Any, tmp_path: Path,
                                                  case: str) -> None:
    broker, keys = secure
    stranger_public, stranger_secret = new_key(tmp_path / "k", "stranger")
    local_secret = keys / "local-admin.key_secret"
    env = {"unknown_key": key_env(keys / "broker.key", stranger_secret),
           "wrong_server_key": key_env(tmp_path / "k" / "stranger.key", local_secret),
           "plaintext": {}}[case]
    expected = {"unknown_key": f"refused our key {stranger_public}",
                "wrong_server_key": "is most likely not this broker's",
                "plaintext": "requires CURVE"}[case]
    started = time.monotonic()
    outcome = status(broker.url, env, tmp_path / "elsewhere")
    elapsed = time.monotonic() - started
    assert outcome.returncode == EXIT_UNAUTHORIZED, outcome.stderr
    assert elapsed < REFUSAL_DEADLINE_S
    assert outcome.stderr.startswith("error: unauthorized: ")
    assert expected in outcome.stderr
    assert json.loads(outcome.stdout)["exit_code"] == EXIT_UNAUTHORIZED


def test_authorize_and_revoke_take_effect_without_a_restart(
        secure: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    broker, keys = secure
    home = str(broker.data_dir)
    public, secret = new_key(tmp_path / "k", "late")
    env = key_env(keys / "broker.key", secret)
    # Given a key the broker does not know: refused
    assert status(broker.url, env, tmp_path / "elsewhere").returncode == EXIT_UNAUTHORIZED
    # When it is authorized while the broker runs: accepted
    # ("--": a Z85 key may start with "-")
    added = cli("--home", home, "keys", "authorize", "--role", "client", "--json", "--",
                public)
    assert added.returncode == 0, added.stderr
    assert status(broker.url, env, tmp_path / "elsewhere").returncode == 0
    # And a connection made now, before the revoke...
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    held = SyncClient(broker.url)
    try:
        held.ping(5)
        # When it is revoked: a new connection with the key is refused
        removed = cli("--home", home, "keys", "revoke", str(tmp_path / "k" / "late.key"),
                      "--json")
        assert removed.returncode == 0, removed.stderr
        assert json.loads(removed.stdout)["revoked"] is True
        refused = status(broker.url, env, tmp_path / "elsewhere")
        assert refused.returncode == EXIT_UNAUTHORIZED, refused.stderr
        # ...stays connected (libzmq cannot drop one peer of a bound socket), but the
        # broker refuses its messages from its next look at the allow-list on
        assert wait_until(lambda: _refused(held), 10)
    finally:
        held.close()


def _refused(client: SyncClient) -> bool:
    """Whether the broker refuses ``client``'s requests as ``unauthorized``."""
    try:
        client.ping(5)
    except Unauthorized as e:
        assert "revoked" in str(e)
        return True
    return False


def test_an_unauthorized_agent_retries_and_registers_once_authorized(
        cluster: Cluster, secure: Any, tmp_path: Path) -> None:
    broker, keys = secure
    public, secret = new_key(tmp_path / "k", "agent")
    log = tmp_path / "agent.log"
    with log.open("wb") as stderr:
        agent = python_process("-m", "agent_sdk", "run", "tests.sample_agents:EchoAgent",
                               "--broker", broker.url,
                               env=key_env(keys / "broker.key", secret), stderr=stderr)
    cluster.procs.append(agent)
    # Then it says why it is refused, and does not exit
    assert wait_until(lambda: "unauthorized" in log.read_text(), 10), log.read_text()
    assert agent.poll() is None
    # When its key is authorized, it registers without a restart
    authorize(authorized_path(broker.data_dir), public, "agent")
    registered = read_json_line(agent, timeout=15)
    assert registered["agent_id"]


def test_a_secret_key_open_to_others_is_refused_at_start(tmp_path: Path) -> None:
    home = tmp_path / "home"
    prepare_secure_home(home)
    (home / "keys" / "broker.key_secret").chmod(0o644)
    proc = subprocess.run([sys.executable, "-m", "broker", "--secure", "--bind", "127.0.0.1:0",
                           "--data-dir", str(home)], cwd=ROOT, capture_output=True, text=True,
                          timeout=30, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    assert f"chmod 600 {home / 'keys' / 'broker.key_secret'}" in lines[0]


def test_a_data_dir_open_to_others_is_refused_by_start_secure(tmp_path: Path) -> None:
    home = tmp_path / "open"
    home.mkdir(mode=0o755)
    home.chmod(0o755)
    outcome = cli("--home", str(home), "start", "--secure", "--no-agents", "--json")
    assert outcome.returncode == 2
    assert f"chmod 700 {home}" in outcome.stderr
    assert json.loads(outcome.stdout)["exit_code"] == 2


def test_keys_cli(tmp_path: Path) -> None:
    home = str(tmp_path / "home")
    made = cli("--home", home, "keys", "generate", "--name", "a1", "--role", "agent", "--json")
    assert made.returncode == 0, made.stderr
    document = json.loads(made.stdout)
    assert document["authorized"] == "agent"
    assert os.stat(document["secret_file"]).st_mode & 0o777 == 0o600
    listed = json.loads(cli("--home", home, "keys", "list", "--json").stdout)
    assert [k["public_key"] for k in listed["keys"]] == [document["public_key"]]
    assert listed["keys"][0]["role"] == "agent"
    # a malformed key: usage error, one line
    bad = cli("--home", home, "keys", "authorize", "not-a-key", "--role", "agent", "--json")
    assert bad.returncode == 2
    assert len(bad.stderr.strip().splitlines()) == 1
    assert json.loads(bad.stdout)["exit_code"] == 2
    # revoking twice: the second finds nothing (exit 1)
    assert cli("--home", home, "keys", "revoke", document["public_file"]).returncode == 0
    again = cli("--home", home, "keys", "revoke", "--", document["public_key"])
    assert again.returncode == 1
    assert json.loads(cli("--home", home, "keys", "list", "--json").stdout)["keys"] == []


@pytest.mark.parametrize("secure_flag", [False, True])
def test_a_non_loopback_bind_without_secure_warns(tmp_path: Path, secure_flag: bool) -> None:
    args = ["-m", "broker", "--bind", "0.0.0.0:0", "--data-dir", str(tmp_path / "d"),
            "--no-metrics", "--log-level", "WARNING"] + ["--secure"] * secure_flag
    with (tmp_path / "err").open("wb") as stderr:
        proc = python_process(*args, stderr=stderr)
    try:
        read_json_line(proc)
    finally:
        kill(proc)
    warnings = [line for line in (tmp_path / "err").read_text().splitlines()
                if line.startswith("warning: listening without --secure")]
    if secure_flag:
        assert warnings == []
    else:
        assert len(warnings) == 1
        assert "anyone who can reach them can submit, run" in warnings[0]
