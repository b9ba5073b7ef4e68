"""A full disk under the broker's data dir (issue 11): when a journal write fails, the
broker refuses new tasks with ``storage_full``, keeps serving the tasks it holds, says so
in ``status``, and accepts new tasks again once a write succeeds; the journal it leaves
replays whole.

The disk is real: a tmpfs of :data:`MOUNT_KIB` KiB mounted as the data dir (root only;
the tests skip, saying why, where mounting is not permitted), filled up by a file.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.journal import Journal, JournalFailure
from tests.broker.support import make_engine, run_pass, submit
from tests.conftest import ROOT, Cluster
from wire.tasks import Accepted, Error, TaskSpec

#: The small filesystem's size: room for a broker's files, little more.
MOUNT_KIB = 512
#: A payload larger than a page, so that a task's journal record needs a new page of a
#: full tmpfs (a record that fits in the last page's free end would still be written).
PAYLOAD = "x" * 16_384
RESULT_TIMEOUT_S = 20.0
CLI_TIMEOUT_S = 60


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of :data:`MOUNT_KIB` KiB, unmounted after the test."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("a full disk is tested on a tmpfs, and mounting one needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={MOUNT_KIB}k", "tmpfs",
                              str(mount)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mount
    finally:
        # Lazy: a process of a failed test may still hold a file open there.
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(directory: Path) -> Path:
    """Write a file into ``directory`` until its filesystem has no page left."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    chunk = b"\0" * 65_536
    try:
        while True:
            os.write(fd, chunk)
    except OSError as e:
        assert e.errno == errno.ENOSPC, e
    finally:
        os.close(fd)
    return filler


def spec(task_id: str, payload: bytes = PAYLOAD.encode()) -> TaskSpec:
    return TaskSpec(task_id, payload, capabilities=("echo",), timeout_s=30.0)


def test_the_journal_holds_a_failed_write_and_writes_it_once_space_is_freed(
        small_fs: Path) -> None:
    # Given a journal with one committed record
    journal = Journal(small_fs)
    journal.open()
    journal.accepted(spec("first"), b"client", 1.0)
    journal.commit()
    size = journal.path.stat().st_size
    # When the disk is full and a commit fails (part of its frame may have gone in)
    filler = fill(small_fs)
    journal.accepted(spec("second"), b"client", 2.0)
    journal.commit()
    # Then nothing raised, the failure says why, and the file is cut back to whole frames
    assert isinstance(journal.failure, JournalFailure)
    assert journal.failure.errno == errno.ENOSPC
    assert "No space left on device" in journal.failure.message
    assert journal.path.stat().st_size == size == journal.size
    assert journal.retry() is not None and journal.dirty
    # When space is freed, the held frame is written by the next retry, before new ones
    filler.unlink()
    assert journal.retry() is None and journal.failure is None
    journal.accepted(spec("third"), b"client", 3.0)
    journal.commit()
    journal.close()
    # And the journal replays every record, in order
    replay = Journal(small_fs).open()
    assert list(replay.accepted) == ["first", "second", "third"]
    assert replay.truncated_bytes == 0


def test_the_engine_refuses_new_tasks_while_the_journal_fails(tmp_path: Path) -> None:
    # Given an engine with an open task, whose journal then fails to write
    engine = make_engine(tmp_path)
    journal = engine.ledger.journal
    submit(engine, b"client", 1000.0, "known")
    run_pass(engine, 1000.0)
    journal.failure = JournalFailure("cannot write the journal J: No space left on device",
                                     1.0, errno.ENOSPC)
    # When a SUBMIT brings the known task again and a new one
    submit(engine, b"client", 1001.0, "known", "new")
    sent = run_pass(engine, 1001.0)
    # Then the new one is refused with storage_full and why; the known one stays open
    assert [(m.code, m.task_ids) for m in sent[b"client"] if isinstance(m, Error)] == \
        [("storage_full", ["new"])]
    assert "No space left on device" in next(
        m.message for m in sent[b"client"] if isinstance(m, Error))
    assert "known" in engine.ledger.tasks and "new" not in engine.ledger.tasks
    storage = engine.status.document(1001.0)["storage"]  # type: ignore[typeddict-item]
    assert storage["state"] == "full" and storage["refused_tasks"] == 1
    # When a write succeeds again, the next SUBMIT is accepted
    journal.failure = None
    submit(engine, b"client", 1002.0, "new")
    accepted = run_pass(engine, 1003.0)[b"client"]
    assert any(isinstance(m, Accepted) and "new" in m.task_ids for m in accepted)
    storage = engine.status.document(1003.0)["storage"]  # type: ignore[typeddict-item]
    assert storage["state"] == "ok"


def cli_status(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "cli", "--broker", url, "status", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=CLI_TIMEOUT_S)


def test_a_full_disk_refuses_new_tasks_serves_the_held_ones_and_recovers(
        small_fs: Path, cluster: Cluster) -> None:
    # Given a broker whose data dir is on the small filesystem, an echo agent, a task
    # done and one waiting for a capability nobody offers
    broker = cluster.broker("--no-state", "--no-bus", data_dir=small_fs / "data")
    cluster.agent(broker.url)
    client = cluster.client(broker.url)
    assert client.submit(capabilities=["echo"], data="before", task_id="before",
                         timeout=30).result(timeout=RESULT_TIMEOUT_S).ok
    client.submit(capabilities=["nobody"], data="held", task_id="held",
                  timeout=600).wait_accepted(RESULT_TIMEOUT_S)

    # When the disk fills up: the first task's record cannot be written
    filler = fill(small_fs)
    first = client.submit(capabilities=["echo"], data=PAYLOAD, task_id="during",
                          timeout=30).result(timeout=RESULT_TIMEOUT_S)
    # Then that task, accepted before the broker knew, is still served; the next is
    # refused with storage_full, and says why
    assert first.ok and first.data == PAYLOAD
    refused = client.submit(capabilities=["echo"], data=PAYLOAD, task_id="refused",
                            timeout=30).result(timeout=RESULT_TIMEOUT_S)
    assert refused.status == "rejected" and refused.error is not None
    assert refused.error.code == "storage_full", refused.error
    assert "No space left on device" in refused.error.message
    # And what the broker holds is still served: a result, and the open task
    assert client.fetch("before").data == "before"
    assert client.fetch("held").status == "pending"
    # And status says so, in the document and in the table
    document = client.status()
    assert document["storage"]["state"] == "full", document["storage"]
    assert document["storage"]["refused_tasks"] == 1
    assert document["storage"]["data_dir"] == str(small_fs / "data")
    assert document["errors"]["storage_full"] == 1
    table = cli_status(broker.url)
    assert table.returncode == 0, table.stderr
    assert "FULL since" in table.stdout and "storage_full" in table.stdout
    as_json = cli_status(broker.url, "--json")
    assert json.loads(as_json.stdout)["storage"]["state"] == "full"

    # When space is freed, the next task is accepted at once and runs
    filler.unlink()
    after = client.submit(capabilities=["echo"], data="after", task_id="after",
                          timeout=30).result(timeout=RESULT_TIMEOUT_S)
    assert after.ok and after.data == "after"
    assert client.status()["storage"]["state"] == "ok"

    # And the journal holds every accepted task whole: a restart after a kill has them
    broker.sigkill()
    restarted = cluster.restart(broker)
    again = cluster.client(restarted.url)
    assert [again.fetch(task_id).status for task_id in ("before", "during", "after")] == \
        ["succeeded"] * 3
    assert again.fetch("held").status == "pending"
