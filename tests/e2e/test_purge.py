"""``orchestrator purge`` end to end: a real broker and agent, tasks carrying marker bytes,
then the data dir searched byte by byte (issue 15, data at rest).

The broker runs at DEBUG with a result store threshold small enough that one task's
result goes to the store, so the journal, a store file and the logs are all searched.
Waits are on answers (the CLI's exit, a result, a ready line), never on sleeps.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, BrokerProcess, Cluster

CLI_TIMEOUT_S = 60
#: A result at least this large goes to the result store (a file of its own).
STORE_THRESHOLD = 4096
EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_UNAUTHORIZED = 1, 2, 3, 5


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m cli ARGS`` (ORCH_HOME is the test's, from the autouse fixture)."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    full_env.pop("ORCH_BROKER", None)
    return subprocess.run([sys.executable, "-m", "cli", *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=CLI_TIMEOUT_S, check=False)


def files_holding(marker: bytes, *roots: Path) -> list[Path]:
    """Every file under ``roots`` whose bytes contain ``marker``."""
    found = []
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file() and marker in path.read_bytes():
                found.append(path)
    return found


def iso_after(wall: float) -> str:
    """An ISO time just after ``wall`` (a broker's ``finished_at``, rounded to 1 us)."""
    return datetime.fromtimestamp(wall + 2e-6, UTC).isoformat()


class Markers:
    """Recognizable bytes, new per test: what old and new tasks carry."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:10]
        self.old_in = f"old-input-{tag}"
        self.old_out = f"old-output-{tag}"
        self.new_in = f"new-input-{tag}"


@pytest.fixture
def broker(cluster: Cluster) -> Iterator[BrokerProcess]:
    broker = cluster.broker("--log-level", "DEBUG", "--result-store-threshold",
                            str(STORE_THRESHOLD))
    cluster.agent(broker.url)
    yield broker


def run_tasks(cluster: Cluster, broker: BrokerProcess, markers: Markers) -> float:
    """Two old tasks (one with a result large enough for the store), then one new task;
    returns a time between them (the broker's own finish times)."""
    client = cluster.client(broker.url)
    small = client.submit(capabilities=["echo"], task_id="old-small",
                          data={"secret": markers.old_in, "out": markers.old_out})
    large = client.submit(capabilities=["echo"], task_id="old-large",
                          data={"secret": markers.old_in, "pad": markers.old_out * 500})
    assert small.result(30).ok and large.result(30).ok
    finished = [float(t["finished_at"]) for t in client.tasks()
                if t["task_id"].startswith("old-")]
    assert len(finished) == 2
    assert client.submit(capabilities=["echo"], task_id="new",
                         data={"secret": markers.new_in}).result(30).ok
    return max(finished)


def test_purge_before_a_time_empties_the_old_tasks_everywhere_and_keeps_the_new(
        cluster: Cluster, broker: BrokerProcess, orch_home: Path) -> None:
    # Given two tasks finished before a cut (one with its result in the store) and one after
    markers = Markers()
    cut = run_tasks(cluster, broker, markers)
    roots = (broker.data_dir, orch_home)
    assert files_holding(markers.old_in.encode(), *roots)
    assert list((broker.data_dir / "results").glob("*.bin"))

    # When the tasks finished before the cut are purged
    outcome = cli("--broker", broker.url, "purge", "--before", iso_after(cut), "--json")

    # Then the CLI says what went
    assert outcome.returncode == 0, outcome.stderr
    report = json.loads(outcome.stdout)
    assert (report["purged"], report["store_files_removed"], report["open"]) == (2, 1, 0)
    assert report["bytes_freed"] > 500 * len(markers.old_out)
    assert report["journal_bytes_after"] < report["journal_bytes_before"]
    # ... the old payloads are in no file of the data dir (journal, store, logs), nor of
    # the agents' data dir; the new one's still are
    assert files_holding(markers.old_in.encode(), *roots) == []
    assert files_holding(markers.old_out.encode(), *roots) == []
    assert not list((broker.data_dir / "results").glob("*.bin"))
    assert files_holding(markers.new_in.encode(), *roots) == [broker.data_dir / "journal.log"]
    # ... `result` says the old task finished and was purged (exit 1), the new is whole
    purged = cli("--broker", broker.url, "result", "old-small")
    assert purged.returncode == EXIT_FAILED
    assert purged.stderr.startswith("old-small: purged: the task succeeded; its payloads "
                                    "were purged at ")
    assert purged.stdout == ""
    as_json = json.loads(cli("--broker", broker.url, "result", "old-small", "--json").stdout)
    assert (as_json["status"], as_json["error"]["code"], as_json["data"]) == \
        ("succeeded", "purged", None)
    kept = cli("--broker", broker.url, "result", "new", "--json")
    assert kept.returncode == 0 and json.loads(kept.stdout)["data"]["secret"] == markers.new_in
    listed = {t["task_id"]: t for t in json.loads(
        cli("--broker", broker.url, "tasks", "--json").stdout)}
    assert listed["old-large"]["status"] == "succeeded"
    assert listed["old-large"]["error"]["code"] == "purged"
    assert listed["new"]["error"] is None


def test_a_restart_after_purge_brings_no_payload_back(
        cluster: Cluster, broker: BrokerProcess, orch_home: Path) -> None:
    # Given every finished task purged (the text summary)
    markers = Markers()
    run_tasks(cluster, broker, markers)
    outcome = cli("--broker", broker.url, "purge")
    assert outcome.returncode == 0, outcome.stderr
    assert outcome.stdout.startswith("purged 3 task(s) finished: ")

    # When the broker is killed and started again on its data dir
    broker.sigkill()
    again = cluster.restart(broker)

    # Then the tasks are known, still purged, and no payload came back
    outcome = cli("--broker", again.url, "result", "new", "--json")
    assert outcome.returncode == EXIT_FAILED
    assert json.loads(outcome.stdout)["error"]["code"] == "purged"
    for marker in (markers.old_in, markers.old_out, markers.new_in):
        assert files_holding(marker.encode(), again.data_dir, orch_home) == []
    # ... and purging again finds them purged already
    report = json.loads(cli("--broker", again.url, "purge", "--json").stdout)
    assert (report["purged"], report["already_purged"]) == (0, 3)


def test_an_age_keeps_what_is_younger(cluster: Cluster, broker: BrokerProcess) -> None:
    # Given tasks that finished seconds ago
    markers = Markers()
    run_tasks(cluster, broker, markers)
    # When the tasks older than an hour are purged
    outcome = cli("--broker", broker.url, "purge", "--before", "1h", "--json")
    # Then none was, and every payload is still there
    assert outcome.returncode == 0, outcome.stderr
    assert json.loads(outcome.stdout)["purged"] == 0
    assert files_holding(markers.old_in.encode(), broker.data_dir)


def test_the_files_holding_payloads_are_private(cluster: Cluster, broker: BrokerProcess,
                                                orch_home: Path) -> None:
    # Given a broker (and an agent) that ran tasks, one into the result store, and a
    # purge (which rewrites the journal into a new file)
    run_tasks(cluster, broker, Markers())
    assert cli("--broker", broker.url, "purge", "--before", "1h").returncode == 0
    # Then the data dir and its directories are 0700, every file of payloads and logs 0600
    data = broker.data_dir
    for directory in (data, data / "results", data / "logs"):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory
    files = [data / "journal.log", *(data / "results").iterdir(), *(data / "logs").iterdir(),
             *(orch_home / "logs").iterdir()]
    assert any(path.suffix == ".bin" for path in files)
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


@pytest.mark.parametrize("before", ["yesterday", "nan", "7x", "-1d", "2026-13-01", ""])
@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_a_bad_date_is_a_usage_error_in_one_line(before: str, as_json: bool) -> None:
    outcome = cli("purge", "--before", before, *(["--json"] if as_json else []))
    assert outcome.returncode == EXIT_USAGE
    assert len(outcome.stderr.splitlines()) == 1
    assert outcome.stderr.startswith("error: Invalid value for '--before': ")
    if as_json:
        assert json.loads(outcome.stdout)["exit_code"] == EXIT_USAGE


def test_no_broker_exits_3_saying_purge_needs_it() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"tcp://127.0.0.1:{s.getsockname()[1]}"
        outcome = cli("--broker", url, "purge", "--json")
    assert outcome.returncode == EXIT_UNREACHABLE
    assert "purge works through the running broker" in outcome.stderr
    assert json.loads(outcome.stdout)["exit_code"] == EXIT_UNREACHABLE


def test_a_secure_broker_purges_for_the_admin_key_only(cluster: Cluster,
                                                       tmp_path: Path) -> None:
    from wire.curve import read_keys, write_key_pair

    # Given a secure broker, a task done with the local admin key, and a client key
    broker = cluster.broker("--secure")
    cluster.agent(broker.url, **key_env(broker, broker.data_dir / "keys" /
                                        "local-admin.key_secret"))
    home = ["--home", str(broker.data_dir), "--broker", broker.url]
    done = cli(*home, "submit", "x", "--capability", "echo", "--json")
    assert done.returncode == 0, done.stderr
    public, secret = write_key_pair(tmp_path / "k", "someone")
    assert cli(*home, "keys", "authorize", "--role", "client", "--",
               read_keys(public)["public"]).returncode == 0

    # When the client key purges, then the admin key
    refused = cli("--home", str(tmp_path / "elsewhere"), "--broker", broker.url, "purge",
                  "--json", env=key_env(broker, secret))
    accepted = cli(*home, "purge", "--json")

    # Then the client key is refused (exit 5, naming the role it lacks); the admin purges
    assert refused.returncode == EXIT_UNAUTHORIZED, refused.stderr
    assert "admin role" in refused.stderr
    assert accepted.returncode == 0, accepted.stderr
    assert json.loads(accepted.stdout)["purged"] == 1


def key_env(broker: BrokerProcess, secret: Path) -> dict[str, Any]:
    """The environment of a peer using the key ``secret`` with ``broker``."""
    return {"ORCH_CURVE_SERVER_KEY_FILE": str(broker.data_dir / "keys" / "broker.key"),
            "ORCH_CURVE_KEY_FILE": str(secret)}
