"""Versions (docs/protocol.md, "Versions"): a peer of another protocol version is refused
with ``bad_version`` by the broker and the state service, in an ERROR it can read; the
journal and state.db carry a format version, older ones are read (and migrated), newer
ones refused with a one-line message and a non-zero exit.

Process tests talk to a real broker process (with its state service) over raw DEALER
sockets; every wait is a poll or a process wait with a deadline.
"""

from __future__ import annotations

import json
import sqlite3
import struct
import subprocess
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq

import broker.state.persistence as persistence
from broker import __version__
from broker.journal import JOURNAL_FORMAT, Journal, JournalFormatError
from broker.state.persistence import SCHEMA_VERSION, StateFormatError, StatePersistence
from wire.codec import packb
from wire.errors import DecodeError, StateDecodeError
from wire.limits import PROTOCOL_VERSION, SIGNATURE, SIGNATURE_PREFIX
from wire.state import StateCommand, StateErrorReply, StateGet, decode_state, encode_state
from wire.tasks import Command, Error, Heartbeat, StatusReply, StatusRequest, decode, encode
from tests.conftest import READY_TIMEOUT_S, kill, python_process, read_json_line
from tests.broker.test_journal_records import frame_bodies

#: Deadline of every reply and process exit a test waits for.
WAIT_S = 10.0
#: A version this release does not speak, and the frame 0 it would send.
OTHER_VERSION = PROTOCOL_VERSION + 1
OTHER_SIGNATURE = SIGNATURE_PREFIX + str(OTHER_VERSION).encode()
#: A record the way every journal format writes an accepted task.
ACCEPTED = ["A", "t-old", b"\x81\xa4data\x01", ["echo"], None, 0, 5.0, 2, None, b"client-1",
            1_000.0]
FINISHED = ["R", "t-old", "succeeded", b"\x81\xa4data\x02", None, None, "echo", 1, 0.5, 1.5,
            1_001.0]
_FRAME_HEADER = struct.Struct("<II")


def names_both_versions(message: str) -> bool:
    return (f"version {OTHER_VERSION}" in message and f"version {PROTOCOL_VERSION}" in message
            and "same Orchestrator release" in message)


# ------------------------------------------------------------------ a real broker process


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One broker process (with its state service) for the module's wire tests: its
    ready document (``endpoint``, ``state``)."""
    data_dir = tmp_path_factory.mktemp("versions-broker")
    proc = python_process("-m", "broker", "--bind", "127.0.0.1:0", "--data-dir", str(data_dir),
                          "--log-level", "WARNING", "--no-bus")
    try:
        yield read_json_line(proc)
    finally:
        kill(proc)


@pytest.fixture
def dealer() -> Iterator[zmq.Socket[bytes]]:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        yield sock
    finally:
        sock.close(linger=0)
        ctx.term()


def exchange(sock: zmq.Socket[bytes], frames: list[bytes]) -> list[bytes]:
    """Send ``frames`` and return the frames of the reply (within :data:`WAIT_S`)."""
    sock.send_multipart(frames)
    assert sock.poll(int(WAIT_S * 1000)), f"no reply to {frames!r} within {WAIT_S} s"
    return sock.recv_multipart()


@pytest.mark.parametrize("frames", [
    pytest.param([OTHER_SIGNATURE, bytes((Command.HEARTBEAT,)), packb({})], id="heartbeat"),
    pytest.param([OTHER_SIGNATURE, bytes((Command.SUBMIT,)),
                  packb([["t-1", b"x", ["echo"], None, 0, None, None, None]])], id="submit"),
    pytest.param([OTHER_SIGNATURE, bytes((Command.STATUS,)), packb({"req": 7})], id="status"),
    pytest.param([SIGNATURE, bytes((Command.READY,)),
                  packb({"id": "a", "name": "n", "caps": [], "max": 1, "v": OTHER_VERSION})],
                 id="ready-v"),
])
def test_broker_refuses_another_protocol_version_with_an_error_naming_both(
        broker: dict[str, Any], dealer: zmq.Socket[bytes], frames: list[bytes]) -> None:
    # Given a peer speaking another protocol version, on a raw DEALER
    dealer.connect(broker["endpoint"])
    # When it sends a message to the broker
    reply = exchange(dealer, frames)
    # Then the refusal reaches it as an ERROR frame of this version
    assert reply[:2] == [SIGNATURE, bytes((Command.ERROR,))]
    error = decode(reply)
    assert isinstance(error, Error) and error.code == "bad_version"
    # And its message names both versions and what to do
    assert names_both_versions(error.message), error.message
    # And the connection still works for a message of this version
    status = decode(exchange(dealer, encode(StatusRequest(8))))
    assert isinstance(status, StatusReply) and status.status["errors"]["bad_version"] >= 1


def test_broker_refuses_a_ready_without_a_version(
        broker: dict[str, Any], dealer: zmq.Socket[bytes]) -> None:
    dealer.connect(broker["endpoint"])
    error = decode(exchange(dealer, [SIGNATURE, bytes((Command.READY,)),
                                     packb({"id": "a", "name": "n", "caps": [], "max": 1})]))
    assert isinstance(error, Error) and error.code == "bad_version"
    assert 'READY has no "v"' in error.message and f"version {PROTOCOL_VERSION}" in error.message


@pytest.mark.parametrize(("frames", "req"), [
    pytest.param([OTHER_SIGNATURE, bytes((StateCommand.GET,)), packb({"req": 3, "key": "k"})],
                 None, id="signature"),
    pytest.param([SIGNATURE, bytes((StateCommand.HELLO,)),
                  packb({"req": 4, "name": "x", "v": OTHER_VERSION})], 4, id="hello-v"),
])
def test_state_service_refuses_another_protocol_version_with_an_error_naming_both(
        broker: dict[str, Any], dealer: zmq.Socket[bytes], frames: list[bytes],
        req: int | None) -> None:
    # Given a peer of another version connected to the state service
    dealer.connect(broker["state"])
    # When it sends a request
    reply = exchange(dealer, frames)
    # Then it gets the state service's ERROR, bad_version, naming both versions
    assert reply[:2] == [SIGNATURE, bytes((StateCommand.ERROR,))]
    error = decode_state(reply)
    assert isinstance(error, StateErrorReply) and error.code == "bad_version"
    assert error.req == req
    assert names_both_versions(error.message), error.message


# ------------------------------------------------------------------ codec: every version's ERROR


def test_signature_is_the_prefix_and_the_version() -> None:
    assert SIGNATURE == SIGNATURE_PREFIX + str(PROTOCOL_VERSION).encode()


def test_an_error_of_another_version_is_read() -> None:
    # Given the refusal a broker of another version sends (ERROR's layout never changes)
    frames = [OTHER_SIGNATURE, bytes((Command.ERROR,)),
              packb({"code": "bad_version", "message": "mismatch", "req": 5, "ids": ["t"]})]
    # When a peer of this version decodes it, then it reads the refusal
    assert decode(frames) == Error("bad_version", "mismatch", 5, ["t"])
    state = [OTHER_SIGNATURE, bytes((StateCommand.ERROR,)),
             packb({"code": "bad_version", "message": "mismatch", "req": 6})]
    assert decode_state(state) == StateErrorReply("bad_version", "mismatch", 6)


@pytest.mark.parametrize("frames", [
    pytest.param([OTHER_SIGNATURE, bytes((Command.ERROR,)), packb({})], id="no-code"),
    pytest.param([OTHER_SIGNATURE, bytes((Command.ERROR,)), b"\xc1"], id="not-msgpack"),
    pytest.param([OTHER_SIGNATURE, bytes((Command.ERROR,)), packb(["bad_version", "m"])],
                 id="array"),
    pytest.param([OTHER_SIGNATURE, bytes((Command.HEARTBEAT,)), packb({"code": "x",
                                                                       "message": "y"})],
                 id="not-error"),
])
def test_anything_else_of_another_version_is_bad_version(frames: list[bytes]) -> None:
    with pytest.raises(DecodeError) as info:
        decode(frames)
    assert info.value.code == "bad_version" and names_both_versions(str(info.value))
    state_frames = [frames[0], bytes((StateCommand.ERROR,)) if frames[1] == bytes(
        (Command.ERROR,)) else bytes((StateCommand.GET,)), frames[2]]
    with pytest.raises(StateDecodeError) as state_info:
        decode_state(state_frames)
    assert state_info.value.code == "bad_version"


def test_this_versions_messages_are_untouched() -> None:
    assert decode(encode(Heartbeat())) == Heartbeat()
    assert decode_state(encode_state(StateGet(1, "k"))) == StateGet(1, "k")
    assert decode(encode(Error("queue_full", "m", None, ["t"]))) == Error("queue_full", "m",
                                                                           None, ["t"])


# ------------------------------------------------------------------ journal formats


def old_frame(body: Any) -> bytes:
    data = msgpack.packb(body, use_bin_type=True)
    return _FRAME_HEADER.pack(len(data), zlib.crc32(data)) + data


OLD_FORMATS = {
    # format 1: one record per frame (the first journals)
    "format-1": lambda: old_frame(ACCEPTED) + old_frame(["A", "t-open", b"p", [], "agent-x", 3,
                                                         None, None, "t-old", b"c", 1_002.0])
    + old_frame(FINISHED),
    # format 2: one frame per commit, no header
    "format-2": lambda: old_frame([ACCEPTED]) + old_frame(
        [["A", "t-open", b"p", [], "agent-x", 3, None, None, "t-old", b"c", 1_002.0],
         FINISHED]),
    # a format 2 broker appending to a format 1 file (it could not read the old frames)
    "format-1-then-2": lambda: old_frame(ACCEPTED) + old_frame(
        [["A", "t-open", b"p", [], "agent-x", 3, None, None, "t-old", b"c", 1_002.0],
         FINISHED]),
}


@pytest.mark.parametrize("shape", sorted(OLD_FORMATS))
def test_older_journal_formats_replay_and_are_migrated(tmp_path: Path, shape: str) -> None:
    # Given a journal written the way an older broker wrote it
    path = tmp_path / Journal.FILE
    path.write_bytes(OLD_FORMATS[shape]())
    # When this broker opens it
    journal = Journal(tmp_path)
    replay = journal.open()
    journal.close()
    # Then every record replays
    assert replay.format < JOURNAL_FORMAT and replay.truncated_bytes == 0
    assert set(replay.accepted) == {"t-old", "t-open"} and set(replay.results) == {"t-old"}
    assert replay.accepted["t-open"].agent == "agent-x"
    assert replay.results["t-old"].status == "succeeded"
    # And the file now is this format: the header leads it, and it replays the same
    assert frame_bodies(path)[0][0] == ["J", JOURNAL_FORMAT, __version__]
    again = Journal(tmp_path)
    second = again.open()
    again.close()
    assert second.format == JOURNAL_FORMAT
    assert second.accepted == replay.accepted and second.results == replay.results


def read_like_format_2(path: Path) -> tuple[set[str], set[str]]:
    """The replay loop of a format 2 broker (before the header existed), as it was."""
    accepted: set[str] = set()
    results: set[str] = set()
    for batch in frame_bodies(path):
        for record in batch:
            kind = record[0] if type(record) is list and record else None
            if kind == "A" and len(record) == 11:
                accepted.add(record[1])
            elif kind == "R" and len(record) == 11:
                results.add(record[1])
    return accepted, results


def test_a_format_2_broker_still_reads_this_format(tmp_path: Path) -> None:
    # Given a journal written by this broker (header first)
    path = tmp_path / "old" / Journal.FILE
    path.parent.mkdir()
    path.write_bytes(OLD_FORMATS["format-2"]())
    journal = Journal(path.parent)
    journal.open()
    journal.close()
    assert frame_bodies(path)[0][0][0] == "J"
    # When a broker of the previous format reads it, then it skips the header only
    assert read_like_format_2(path) == ({"t-old", "t-open"}, {"t-old"})


@pytest.mark.parametrize(("header", "expected"), [
    pytest.param(["J", JOURNAL_FORMAT + 1, "9.9.9"], f"journal format {JOURNAL_FORMAT + 1}",
                 id="newer"),
    pytest.param(["J", "three"], "does not understand", id="not-a-number"),
    pytest.param(["J", 2], "does not understand", id="headers-start-at-3"),
])
def test_journal_of_an_unknown_format_is_refused_and_left_alone(
        tmp_path: Path, header: list[Any], expected: str) -> None:
    # Given a journal whose header names a format this broker does not read
    path = tmp_path / Journal.FILE
    data = old_frame([header, ACCEPTED]) + b"\x00\x01 bytes a newer format may hold"
    path.write_bytes(data)
    # When this broker opens it
    with pytest.raises(JournalFormatError) as info:
        Journal(tmp_path).open()
    # Then it is refused with one line that says what to do, and the file is untouched
    message = str(info.value)
    assert expected in message and "\n" not in message
    assert f"mv {path} {path}.unread" in message
    assert path.read_bytes() == data


# ------------------------------------------------------------------ state.db schemas


def make_state_db(path: Path, schema: int | None, meta: bool = True) -> None:
    db = sqlite3.connect(path)
    if meta:
        db.execute("CREATE TABLE meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL)")
        if schema is not None:
            db.execute("INSERT INTO meta VALUES ('schema', ?)", (schema,))
    else:
        db.execute("CREATE TABLE something (x)")
    db.commit()
    db.close()


@pytest.mark.parametrize(("schema", "meta", "expected"), [
    pytest.param(SCHEMA_VERSION + 1, True, f"state schema {SCHEMA_VERSION + 1}, newer",
                 id="newer"),
    pytest.param(0, True, "state schema 0, older", id="older-than-migrations"),
    pytest.param(None, False, "not a state database (no meta table)", id="foreign-db"),
])
def test_state_db_of_an_unknown_schema_is_refused_and_left_alone(
        tmp_path: Path, schema: int | None, meta: bool, expected: str) -> None:
    path = tmp_path / "state.db"
    make_state_db(path, schema, meta)
    data = path.read_bytes()
    with pytest.raises(StateFormatError) as info:
        StatePersistence(path).open()
    message = str(info.value)
    assert expected in message and "aside" in message and "\n" not in message
    assert path.read_bytes() == data


def test_a_file_that_is_not_sqlite_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    path.write_bytes(b"this is not a database, just sixteen bytes or more" * 20)
    with pytest.raises(StateFormatError, match="is not a state database"):
        StatePersistence(path).open()


def test_state_db_migrates_step_by_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a state.db of this schema holding a key
    path = tmp_path / "state.db"
    disk = StatePersistence(path)
    disk.open()
    db = disk._require()
    db.execute("INSERT INTO kv VALUES ('k', x'01', 1, NULL)")
    disk.close()
    # When a release with a next schema (and the step to it) opens it
    monkeypatch.setattr(persistence, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    monkeypatch.setattr(persistence, "_MIGRATIONS",
                        {SCHEMA_VERSION: "ALTER TABLE kv ADD COLUMN note TEXT;"})
    disk = StatePersistence(path)
    disk.open()
    db = disk._require()
    # Then the step ran, the schema number moved on, and the data is still there
    assert db.execute("SELECT value FROM meta WHERE name = 'schema'").fetchone() == (
        SCHEMA_VERSION + 1,)
    assert db.execute("SELECT key, note FROM kv").fetchall() == [("k", None)]
    disk.close()


# ------------------------------------------------------------------ refusals at start-up


def start_and_fail(*args: str) -> tuple[int, str]:
    """Run a process that must refuse to start; its exit code and stderr."""
    proc = python_process(*args, stderr=subprocess.PIPE)
    try:
        _, stderr = proc.communicate(timeout=READY_TIMEOUT_S)
    finally:
        kill(proc)
    return proc.returncode, stderr.decode()


def assert_one_line_error(stderr: str, expected: str) -> None:
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], stderr


def test_broker_with_a_newer_journal_exits_with_one_line(tmp_path: Path) -> None:
    # Given a data dir whose journal a newer broker wrote
    path = tmp_path / Journal.FILE
    path.write_bytes(old_frame([["J", JOURNAL_FORMAT + 1, "9.9.9"], ACCEPTED]))
    data = path.read_bytes()
    # When a broker starts on it
    code, stderr = start_and_fail("-m", "broker", "--bind", "127.0.0.1:0", "--data-dir",
                                  str(tmp_path), "--no-bus", "--no-state")
    # Then it exits non-zero with one line saying what to do, and leaves the file alone
    assert code != 0
    assert_one_line_error(stderr, f"journal format {JOURNAL_FORMAT + 1}")
    assert "move the file aside" in stderr and path.read_bytes() == data


@pytest.mark.parametrize("command", [
    pytest.param(("-m", "broker", "--no-bus"), id="broker"),
    pytest.param(("-m", "broker.state"), id="state-service-alone"),
])
def test_state_service_with_a_newer_state_db_exits_with_one_line(
        tmp_path: Path, command: tuple[str, ...]) -> None:
    make_state_db(tmp_path / "state.db", SCHEMA_VERSION + 1)
    code, stderr = start_and_fail(*command, "--bind", "127.0.0.1:0", "--data-dir", str(tmp_path))
    assert code != 0
    assert_one_line_error(stderr, f"state schema {SCHEMA_VERSION + 1}, newer")


def test_broker_over_an_old_journal_restores_its_tasks(tmp_path: Path) -> None:
    # Given a data dir holding a format 1 journal: one finished task, one open
    (tmp_path / Journal.FILE).write_bytes(OLD_FORMATS["format-1"]())
    # When a broker starts on it
    proc = python_process("-m", "broker", "--bind", "127.0.0.1:0", "--data-dir", str(tmp_path),
                          "--log-level", "WARNING", "--no-bus", "--no-state",
                          "--retention", str(10 ** 10))
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(read_json_line(proc)["endpoint"])
        status = decode(exchange(sock, encode(StatusRequest(1))))
    finally:
        sock.close(linger=0)
        ctx.term()
        kill(proc)
    # Then it restored both (and rewrote the journal in its own format)
    assert isinstance(status, StatusReply)
    assert status.status["tasks"]["restored_open"] == 1, json.dumps(status.status["tasks"])
    assert status.status["tasks"]["restored_results"] == 1
    assert frame_bodies(tmp_path / Journal.FILE)[0][0][:2] == ["J", JOURNAL_FORMAT]
