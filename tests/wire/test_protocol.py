"""The wire protocol on its own: encode/decode round trips, decode errors, large payloads.

No sockets here: frames are built and decoded in memory.
"""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wire.errors import DecodeError, StateDecodeError
from wire.bus import BusEnvelope, decode_bus, encode_bus, encode_bus_probe
from wire.codec import packb
from wire.limits import INLINE_PAYLOAD_MAX, PROTOCOL_VERSION, SIGNATURE
from wire.nodes import NodePlan, NodeReport, Scale, ScaleReply
from wire.purge import Purge, PurgeReply
from wire.state import (
    decode_state, encode_state, Entry, LeaseGranted, LockAcquire, LockInfo, LockList,
    LockRelease, LockRenew, LockTable, MAX_KEY_BYTES, MAX_VALUE_BYTES, StateCommand,
    StateDelete, StateDone, StateErrorReply, StateEvents, StateGet, StateHello, StateInfo,
    StateInfoRequest, StateItems, StateList, StatePing, StatePut, StateUnwatch, StateValue,
    StateWatch, StateWelcome,
)
from wire.tasks import (
    Accepted, Ack, Assignment, Cancel, Command, decode, Direct, DIRECT_ASK, DIRECT_BROADCAST,
    DIRECT_NO_ACK, DirectItem, DirectVerdict, Disconnect, Dispatch, encode, Error, ErrorCode,
    Fetch, Heartbeat, Ping, Pong, Progress, Ready, ResultItem, Results, StatusReply, StatusRequest, Submit,
    TaskList, TaskQuery, TaskSpec, Welcome, Chunk, Read, Release, Withheld,
)

BIG = INLINE_PAYLOAD_MAX + 1

# ------------------------------------------------------------------ round trips

#: One instance of every message type, most with every field set to a non-default value.
EVERY_MESSAGE = [
    Ready("agent-1", "reviewer", ("code_review", "audit"), 8, running=("t-1", "t-2")),
    Ready("agent-2", "plain", (), 1),
    Welcome(0.25, 5, {"bus": "tcp://127.0.0.1:6000", "state": "tcp://127.0.0.1:6001"}, "b00t"),
    Welcome(1.0, 3, {}),
    Heartbeat(),
    Heartbeat(role="client"),
    Heartbeat(boot="0123456789ab"),
    Heartbeat(stats={"bus_dropped": 3, "mailbox_full": 0}),
    Progress(["t-1"], ["t-1", "t-2"]),
    Progress(),
    TaskQuery(4, ["failed", "timed_out"], 10),
    TaskQuery(5, None, 100, ["t-1", "t-2"]),
    TaskList(6, [{"task_id": "t-1", "status": "failed", "children": [], "attempts": 2}]),
    Disconnect("draining"),
    Disconnect(""),
    Ping(7, 1.5),
    Pong(7, True),
    Pong(8, False, "ping() raised ValueError: no model", (("t1", 12.5, 5.0), ("t2", 0.25, 60.0))),
    Submit([
        TaskSpec("t-1", b"\x81\xa4data\x01", ("echo",), None, 0, None, None, None),
        TaskSpec("t-2", b"", ("a", "b"), "alpha", -3, 1.5, 2, "t-1"),
        TaskSpec("t-3", b"", ("a",), None, 0, 2.0, None, None, 1.0, True),
    ]),
    Submit([]),
    Dispatch([
        Assignment("t-1", b"payload", 1, 2.5, ("echo",), None),
        Assignment("t-2", b"", 3, 0.0, (), "t-1"),
    ]),
    Results([
        ResultItem("t-1", "succeeded", b"\x90"),
        ResultItem("t-2", "failed", b"", "agent_error", "ValueError: boom", "alpha", 2, 1.25,
                   3.5, False),
        ResultItem("t-3", "succeeded", Withheld(64_000_000), agent="big", attempts=1),
    ]),
    Read(30, "t-3", 4_194_304, 4_194_304),
    Chunk(31, "t-3", 0, 64_000_000, b"\x00" * 100),
    Release(["t-1", "t-3"]),
    Release([]),
    Purge(32),
    Purge(33, 1_780_000_000.25),
    PurgeReply(34, 2, 1_000_000, 1, 3, 4, 5_000, 1_200, 1),
    NodeReport("node-a", "host-a", 2, 8 << 30, 0.25, ("reviewer", "mod:Echo"),
               {"reviewer": 2}, {"mod:Echo": "crash loop: 5 crashes in 60 s"}, {"reviewer": 3}),
    NodePlan({"reviewer": 3}, {"reviewer": 4}, 1.0, 3, 30.0),
    Scale(35, "reviewer", 5),
    ScaleReply(35, "reviewer", 5, {"node-a": 3, "node-b": 2}),
    Disconnect("drained", ["t-1", "t-2"]),
    Accepted(["t-1", "t-2"]),
    Accepted([]),
    Ack(["t-1"]),
    Cancel(["t-1", "t-3"]),
    Fetch(7, ["t-1", "t-2"], wait=True),
    Fetch(8, [], wait=False),
    StatusRequest(9),
    StatusRequest(10, {"agents": 2, "capability": ["echo"], "name": "alpha"}, 3.0),
    StatusReply(11, {"agents": [{"id": "a", "capabilities": ["x", "y"]}], "queue": {"n": 1}}),
    Error("not_found", "no task with id t-9", 12, ["t-9"]),
    Error("queue_full", "retry later", None, []),
    Direct([DirectItem("alpha", 1, b"\x81\xa1k\x01")]),
    Direct([DirectItem("alpha", 2, b"\xc0", None, DIRECT_ASK),
            DirectItem(b"client-1", 3, b"", 1, DIRECT_BROADCAST | DIRECT_ASK | DIRECT_NO_ACK,
                       ("agent_error", "boom"), b"agent-9")]),
    DirectVerdict([1, 2], [(3, "no_agent", "no live agent named 'x'")]),
]

#: One instance of every state service message type.
EVERY_STATE_MESSAGE = [
    StateHello(1, "worker-1"),
    StatePing(),
    StateGet(2, "config/a"),
    StatePut(3, "config/a", packb({"x": 1})),
    StatePut(4, "config/b", b"\xc0", expected=0, ttl_s=2.5, fence=("leader", 7)),
    StateDelete(5, "config/a"),
    StateDelete(6, "config/b", expected=3, fence=("leader", 8)),
    StateList(7),
    StateList(8, "config/", "config/a", 10, False),
    LockAcquire(9, "leader", 5.0),
    LockAcquire(10, "leader", 5.0, 0.0),
    LockRenew(11, "leader", 7),
    LockRenew(12, "leader", 7, 3.0),
    LockRelease(13, "leader", 7),
    StateWatch(14),
    StateWatch(15, "config/", 42),
    StateUnwatch(16, 14),
    LockList(17, "lead"),
    StateInfoRequest(18),
    StateWelcome(19, 0.5, 3, 99, "inst-1", [("leader", 7, 4.5)]),
    StateWelcome(20, 1.0, 3, 0, "inst-2"),
    StateValue(21, "config/a", 4, b"\x01"),
    StateValue(22, "missing", 0, None),
    StateDone(23, 5, False),
    StateDone(24),
    StateItems(25, 9, [Entry("a", 1, b"\x01"), Entry("b", 2, None)], True),
    LeaseGranted(26, "leader", 8, 5.0),
    StateEvents(14, [Entry("config/a", 10, b"\x02"), Entry("config/b", 11, None)], True),
    LockTable(27, [LockInfo("leader", 8, "worker-1", "s-1", 4.5, 2)]),
    StateInfo(28, {"keys": 3, "sessions": {"open": 1}}),
    StateErrorReply("conflict", "version 4, not 3", 29, 4, b"\x01"),
    StateErrorReply("bad_frame", "not a map"),
]


def _name(msg: Any) -> str:
    return type(msg).__name__


@pytest.mark.parametrize("msg", EVERY_MESSAGE, ids=_name)
def test_every_message_type_round_trips(msg: Any) -> None:
    # Given a message of each type
    # When it is encoded and the frames decoded again
    frames = encode(msg)
    decoded = decode(frames)
    # Then the same message comes back, with the signature in frame 0 and no extra frames
    assert decoded == msg
    assert type(decoded) is type(msg)
    assert frames[0] == SIGNATURE
    assert len(frames) == (4 if isinstance(msg, Chunk) else 3)


def test_round_trip_covers_every_message_class() -> None:
    # Given the Message union of the protocol
    from wire.tasks import Message

    # Then EVERY_MESSAGE has at least one instance of each member
    assert set(Message.__args__) == {type(m) for m in EVERY_MESSAGE}


@pytest.mark.parametrize("msg", EVERY_STATE_MESSAGE, ids=_name)
def test_every_state_message_type_round_trips(msg: Any) -> None:
    # Given a state service message of each type
    # When it is encoded and decoded with the state codec
    frames = encode_state(msg)
    # Then the same message comes back
    assert frames[0] == SIGNATURE and len(frames) == 3
    assert decode_state(frames) == msg


def test_state_round_trip_covers_every_state_message_class() -> None:
    from wire.state import StateMessage

    assert set(StateMessage.__args__) == {type(m) for m in EVERY_STATE_MESSAGE}


@pytest.mark.parametrize("msg", EVERY_MESSAGE, ids=_name)
def test_task_messages_are_unknown_to_the_state_codec(msg: Any) -> None:
    # Given a message of the task protocol
    # When the state service decodes it
    # Then it is refused as unknown_command (the command ranges do not overlap)
    with pytest.raises(StateDecodeError) as info:
        decode_state(encode(msg))
    assert info.value.code == "unknown_command"


@pytest.mark.parametrize("msg", EVERY_STATE_MESSAGE, ids=_name)
def test_state_messages_are_unknown_to_the_task_codec(msg: Any) -> None:
    with pytest.raises(DecodeError) as info:
        decode(encode_state(msg))
    assert info.value.code == "unknown_command"


def test_bus_message_and_probe_round_trip() -> None:
    # Given a bus message and a subscription probe
    frames = encode_bus("tasks.t-1", "agent-1", 7, {"state": "running", "n": [1, 2]})
    probe = encode_bus_probe("tasks.", "agent-1", 12345)
    # Then both decode to what was encoded
    assert decode_bus(frames) == BusEnvelope("tasks.t-1", "agent-1", 7,
                                             {"state": "running", "n": [1, 2]})
    assert decode_bus(probe) == BusEnvelope("tasks.", "agent-1", 0, None, 12345)


def test_frames_decode_from_zmq_frame_objects() -> None:
    # Given the frames of a message as zmq.Frame objects (what recv with copy=False gives)
    msg = Submit([TaskSpec("t-1", b"x" * BIG, ("echo",))])
    frames = [zmq.Frame(bytes(f)) for f in encode(msg)]
    # When they are decoded
    decoded = decode(frames)
    # Then the message is intact (the large payload is the frame's bytes)
    assert isinstance(decoded, Submit)
    assert bytes(decoded.tasks[0].payload) == b"x" * BIG


# ------------------------------------------------------------------ large payloads


def test_large_submit_payload_goes_as_its_own_frame() -> None:
    # Given a batch with one small and two large payloads
    small, large1, large2 = b"s" * 10, b"A" * BIG, bytes(range(256)) * 1000
    msg = Submit([TaskSpec("t-1", small), TaskSpec("t-2", large1, ("echo",)),
                  TaskSpec("t-3", large2)])
    # When it is encoded
    frames = encode(msg)
    # Then the large payloads are frames 3 and 4, referenced by index from the header
    assert len(frames) == 5
    assert frames[3] == large1 and frames[4] == large2
    header = msgpack.unpackb(frames[2])
    assert [item[1] for item in header] == [small, 0, 1]
    assert len(frames[2]) < 1000
    # And decode puts them back in place
    assert decode(frames) == msg


def test_payload_exactly_at_inline_limit_stays_inline() -> None:
    # Given payloads at and just above INLINE_PAYLOAD_MAX
    at_limit = b"x" * INLINE_PAYLOAD_MAX
    # Then only the one above the limit gets a frame of its own
    assert len(encode(Submit([TaskSpec("t", at_limit)]))) == 3
    assert len(encode(Submit([TaskSpec("t", at_limit + b"y")]))) == 4


@pytest.mark.parametrize(("msg", "large_count"), [
    (Dispatch([Assignment("t-1", b"small", 1, 1.0, ("x",)),
               Assignment("t-2", b"D" * (4 * INLINE_PAYLOAD_MAX), 2, 1.0, ())]), 1),
    (Results([ResultItem("t-1", "succeeded", b"R" * (2 * INLINE_PAYLOAD_MAX)),
              ResultItem("t-2", "succeeded", b"tiny")]), 1),
    (Submit([TaskSpec(f"t-{i}", bytes([i]) * BIG) for i in range(5)]), 5),
    (Direct([DirectItem("alpha", 1, b"small"), DirectItem("beta", 2, b"M" * BIG)]), 1),
], ids=["Dispatch", "Results", "Submit", "Direct"])
def test_large_payloads_in_every_batch_command_come_back_intact(msg: Any,
                                                                large_count: int) -> None:
    # Given a batch command with large payloads
    # When it is encoded
    frames = encode(msg)
    # Then each large payload has its own frame and decoding restores every item
    assert len(frames) == 3 + large_count
    assert all(len(f) > INLINE_PAYLOAD_MAX for f in frames[3:])
    assert decode(frames) == msg


def test_multi_megabyte_payload_round_trips() -> None:
    # Given a 5 MiB payload
    payload = bytes(range(251)) * (5 * 1024 * 1024 // 251)
    frames = encode(Results([ResultItem("t-1", "succeeded", payload)]))
    # Then it travels as a frame and comes back byte for byte
    assert frames[3] is payload or frames[3] == payload
    decoded = decode(frames)
    assert isinstance(decoded, Results)
    assert decoded.results[0].payload == payload


def test_zmq_frame_payload_is_sent_as_a_frame_even_when_small() -> None:
    # Given a payload held as a zmq.Frame (how the broker forwards large blobs)
    blob = zmq.Frame(b"tiny")
    frames = encode(Dispatch([Assignment("t-1", blob, 1, 1.0, ())]))
    # Then it is never inlined
    assert len(frames) == 4 and frames[3] is blob


# ------------------------------------------------------------------ decode errors


def _frames(command: int, header: Any, *blobs: bytes) -> list[bytes]:
    return [SIGNATURE, bytes((command,)), packb(header), *blobs]


@pytest.mark.parametrize("frames", [
    pytest.param([], id="no-frames"),
    pytest.param([SIGNATURE], id="one-frame"),
    pytest.param([SIGNATURE, bytes((Command.HEARTBEAT,))], id="two-frames"),
    pytest.param([b"", b"", b""], id="empty-frames"),
    pytest.param([b"HELLO", bytes((Command.HEARTBEAT,)), packb({})], id="wrong-signature"),
    pytest.param([b"orch1", bytes((Command.HEARTBEAT,)), packb({})], id="lowercase-signature"),
    pytest.param([SIGNATURE, b"", packb({})], id="empty-command"),
    pytest.param([SIGNATURE, b"\x02\x02", packb({})], id="two-byte-command"),
    pytest.param([SIGNATURE, bytes((Command.SUBMIT,)), b"\xc1"], id="msgpack-never-used-byte"),
    pytest.param([SIGNATURE, bytes((Command.SUBMIT,)), b"\xdd\xff\xff\xff\xff\x01"],
                 id="array32-huge-count-truncated"),
    pytest.param([SIGNATURE, bytes((Command.SUBMIT,)), packb([1, 2]) + b"\x00"],
                 id="trailing-bytes"),
    pytest.param(_frames(Command.SUBMIT, {"not": "an array"}), id="submit-map"),
    pytest.param(_frames(Command.SUBMIT, [["t-1", b""]]), id="submit-short-item"),
    pytest.param(_frames(Command.SUBMIT, [[1, b"", [], None, 0, None, None, None]]),
                 id="submit-int-id"),
    pytest.param(_frames(Command.SUBMIT, [["t", b"", [1], None, 0, None, None, None]]),
                 id="submit-int-capability"),
    pytest.param(_frames(Command.SUBMIT, [["t", b"", [], None, 0, -1.0, None, None]]),
                 id="submit-negative-timeout"),
    pytest.param(_frames(Command.SUBMIT, [["t", b"", [], None, 0, float("nan"), None, None]]),
                 id="submit-nan-timeout"),
    pytest.param(_frames(Command.SUBMIT, [["t", b"", [], None, 0, None, -1, None]]),
                 id="submit-negative-retries"),
    pytest.param(_frames(Command.SUBMIT, [["t", 0, [], None, 0, None, None, None]]),
                 id="submit-blob-index-without-frame"),
    pytest.param(_frames(Command.SUBMIT, [["t", -1, [], None, 0, None, None, None]], b"x"),
                 id="submit-negative-blob-index"),
    pytest.param(_frames(Command.SUBMIT, [["t", "text", [], None, 0, None, None, None]]),
                 id="submit-str-payload"),
    pytest.param(_frames(Command.RESULT, [["t", "succeeded"]]), id="result-short-item"),
    pytest.param(_frames(Command.RESULT, [["t", "failed", b"", "code", 5, None, 0, None, None]]),
                 id="result-int-message"),
    pytest.param(_frames(Command.TASK, [["t", b"", "1", 1.0, [], None]]), id="task-str-attempt"),
    pytest.param(_frames(Command.ACCEPTED, [1, 2]), id="accepted-int-ids"),
    pytest.param(_frames(Command.ACK, "t-1"), id="ack-string"),
    pytest.param(_frames(Command.READY, ["not", "a", "map"]), id="ready-array"),
    pytest.param(_frames(Command.READY, {"id": "a", "name": "n", "caps": [], "max": 0, "v": 1}),
                 id="ready-zero-max"),
    pytest.param(_frames(Command.READY, {"id": 1, "name": "n", "caps": [], "max": 1, "v": PROTOCOL_VERSION}),
                 id="ready-int-id"),
    pytest.param(_frames(Command.READY, {"id": "a", "name": "n", "caps": "x", "max": 1, "v": PROTOCOL_VERSION}),
                 id="ready-string-caps"),
    pytest.param(_frames(Command.WELCOME, {"live": 3}), id="welcome-missing-interval"),
    pytest.param(_frames(Command.WELCOME, {"ivl": "fast", "live": 3}), id="welcome-str-interval"),
    pytest.param(_frames(Command.CANCEL, {"ids": None}), id="cancel-nil-ids"),
    pytest.param(_frames(Command.FETCH, {"req": "1", "ids": []}), id="fetch-str-req"),
    pytest.param(_frames(Command.STATUS, {"req": None}), id="status-nil-req"),
    pytest.param(_frames(Command.STATUS, {"req": 1, "status": [1]}), id="status-reply-array"),
    pytest.param(_frames(Command.STATUS, {"req": 1, "until": 5}), id="status-int-until"),
    pytest.param(_frames(Command.STATUS, {"req": 1, "timeout_s": "x"}), id="status-str-timeout"),
    pytest.param(_frames(Command.ERROR, [1]), id="error-array"),
    pytest.param(_frames(Command.SUBMIT, [["t", b"", [], None, 0, None, None, None, None, 1]]),
                 id="submit-int-hold"),
    pytest.param(_frames(Command.RESULT, [["t", "succeeded", [-1], None, None, None, 0, None,
                                           None, None]]), id="result-negative-withheld"),
    pytest.param(_frames(Command.RESULT, [["t", "succeeded", [1, 2], None, None, None, 0,
                                           None, None, None]]), id="result-withheld-pair"),
    pytest.param(_frames(Command.READ, {"req": 1, "id": "t", "offset": 0}), id="read-no-length"),
    pytest.param(_frames(Command.READ, {"req": 1, "id": "t", "offset": -1, "length": 5}),
                 id="read-negative-offset"),
    pytest.param(_frames(Command.CHUNK, {"req": 1, "id": "t", "offset": 0, "total": 3}),
                 id="chunk-without-frame"),
    pytest.param(_frames(Command.RELEASE, {"ids": "t"}), id="release-string"),
])
def test_malformed_frames_raise_bad_frame(frames: list[bytes]) -> None:
    # Given frames that are not a valid message
    # When they are decoded
    # Then DecodeError says bad_frame
    with pytest.raises(DecodeError) as info:
        decode(frames)
    assert info.value.code == ErrorCode.BAD_FRAME.value == "bad_frame"


@pytest.mark.parametrize("frames", [
    pytest.param([b"ORCH2", bytes((Command.HEARTBEAT,)), packb({})], id="signature-ORCH2"),
    pytest.param([b"ORCH0", bytes((Command.STATUS,)), packb({"req": 1})], id="signature-ORCH0"),
    pytest.param([b"ORCH", bytes((Command.HEARTBEAT,)), packb({})], id="signature-ORCH"),
    pytest.param([b"ORCH12", bytes((Command.HEARTBEAT,)), packb({})], id="signature-ORCH12"),
    pytest.param(_frames(Command.READY, {"id": "a", "name": "n", "caps": [], "max": 1,
                                            "v": PROTOCOL_VERSION + 1}),
                 id="ready-newer-version"),
    pytest.param(_frames(Command.READY, {"id": "a", "name": "n", "caps": [], "max": 1}),
                 id="ready-no-version"),
])
def test_other_protocol_versions_raise_bad_version(frames: list[bytes]) -> None:
    # Given a peer speaking another protocol version
    # When its message is decoded
    # Then DecodeError says bad_version
    with pytest.raises(DecodeError) as info:
        decode(frames)
    assert info.value.code == "bad_version"


@pytest.mark.parametrize("command", sorted({*range(256)} - {c.value for c in Command}))
def test_unknown_commands_raise_unknown_command(command: int) -> None:
    # Given a valid signature and a command byte the protocol does not decode
    frames = [SIGNATURE, bytes((command,)), packb({})]
    # When it is decoded
    # Then DecodeError says unknown_command
    with pytest.raises(DecodeError) as info:
        decode(frames)
    assert info.value.code == "unknown_command"


def test_decode_error_is_a_protocol_error_with_message() -> None:
    # Given garbage in the header frame
    with pytest.raises(DecodeError) as info:
        decode([SIGNATURE, bytes((Command.SUBMIT,)), b"\xc1\xc1"])
    # Then the error names the command it failed on
    assert "SUBMIT" in str(info.value)


# ------------------------------------------------------------------ property: never crash

_msgpack_scalars = (st.none() | st.booleans() | st.integers(-(2 ** 63), 2 ** 64 - 1)
                    | st.floats(allow_nan=True) | st.text(max_size=8) | st.binary(max_size=16))
_msgpack_values = st.recursive(
    _msgpack_scalars,
    lambda inner: (st.lists(inner, max_size=9)
                   | st.dictionaries(st.text(max_size=6) | st.integers(-5, 5), inner, max_size=6)),
    max_leaves=12)
_header_keys = st.sampled_from(["id", "name", "caps", "max", "v", "running", "ivl", "live",
                                "endpoints", "reason", "ids", "req", "wait", "until",
                                "timeout_s", "status", "code", "message"])
_map_headers = st.dictionaries(_header_keys, _msgpack_values, max_size=7)
_batch_headers = st.lists(st.lists(_msgpack_values, min_size=5, max_size=10), max_size=4)
_command_bytes = st.sampled_from([bytes((c,)) for c in Command]) | st.binary(max_size=3)
_signatures = st.sampled_from([SIGNATURE, b"ORCH2", b"ORCH", b""]) | st.binary(max_size=6)

#: Frame lists that are mostly well-formed on the outside, so that the header decoders
#: (not only the signature check) see arbitrary input.
_structured = st.builds(
    lambda sig, cmd, header, blobs: [sig, cmd, header, *blobs],
    _signatures, _command_bytes,
    (_map_headers | _batch_headers | _msgpack_values).map(packb) | st.binary(max_size=40),
    st.lists(st.binary(max_size=8), max_size=3))
_arbitrary = st.lists(st.binary(max_size=40), max_size=6)


@settings(max_examples=300, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(frames=_structured | _arbitrary)
def test_decode_of_arbitrary_frames_only_raises_decode_error(frames: list[bytes]) -> None:
    # Given any list of frames
    # When it is decoded
    # Then it is a message or a DecodeError with a known code, never another exception
    try:
        msg = decode(frames)
    except DecodeError as e:
        assert e.code in {"bad_frame", "bad_version", "unknown_command"}
    else:
        # and whatever decodes encodes again without error
        encode(msg)


# ------------------------------------------------------------------ state codec errors


def _state(command: StateCommand, header: Any) -> list[bytes]:
    return [SIGNATURE, bytes((command,)), packb(header)]


@pytest.mark.parametrize(("frames", "code", "req"), [
    pytest.param([SIGNATURE], "bad_frame", None, id="one-frame"),
    pytest.param([b"ORCH2", bytes((StateCommand.GET,)), packb({"req": 1, "key": "k"})],
                 "bad_version", None, id="signature-ORCH2"),
    pytest.param(_state(StateCommand.HELLO, {"req": 1, "v": PROTOCOL_VERSION + 1}),
                 "bad_version", 1,
                 id="hello-newer-version"),
    pytest.param([SIGNATURE, bytes((Command.SUBMIT,)), packb([])], "unknown_command", None,
                 id="task-command"),
    pytest.param([SIGNATURE, bytes((StateCommand.GET,)), b"\xc1"], "bad_frame", None,
                 id="not-msgpack"),
    pytest.param(_state(StateCommand.GET, ["req", 1]), "bad_frame", None, id="header-array"),
    pytest.param(_state(StateCommand.GET, {"req": 3, "key": ""}), "bad_request", 3,
                 id="empty-key"),
    pytest.param(_state(StateCommand.GET, {"req": "3", "key": "k"}), "bad_request", None,
                 id="str-req"),
    pytest.param(_state(StateCommand.PUT, {"req": 4, "key": "k", "value": "not bin"}),
                 "bad_request", 4, id="put-str-value"),
    pytest.param(_state(StateCommand.PUT, {"req": 5, "key": "k", "value": b"v", "ttl_s": -1}),
                 "bad_request", 5, id="put-negative-ttl"),
    pytest.param(_state(StateCommand.PUT, {"req": 6, "key": "k" * (MAX_KEY_BYTES + 1),
                                           "value": b"v"}), "too_large", 6, id="key-too-long"),
    pytest.param(_state(StateCommand.PUT, {"req": 7, "key": "k",
                                           "value": b"v" * (MAX_VALUE_BYTES + 1)}),
                 "too_large", 7, id="value-too-large"),
    pytest.param(_state(StateCommand.ACQUIRE, {"req": 8, "name": "l", "ttl_s": 1e9}),
                 "bad_request", 8, id="lease-too-long"),
    pytest.param(_state(StateCommand.LIST, {"req": 9, "limit": 0}), "bad_request", 9,
                 id="list-zero-limit"),
    pytest.param(_state(StateCommand.DELETE, {"req": 10, "key": "k", "fence": ["l"]}),
                 "bad_request", 10, id="short-fence"),
])
def test_state_decode_errors_carry_code_and_req(frames: list[bytes], code: str,
                                                req: int | None) -> None:
    # Given a malformed state service request
    # When it is decoded
    # Then StateDecodeError carries the stable code, and the req when it could be read
    with pytest.raises(StateDecodeError) as info:
        decode_state(frames)
    assert info.value.code == code
    assert info.value.req == req


@pytest.mark.parametrize("frames", [
    pytest.param([b"topic"], id="one-frame"),
    pytest.param([b"topic", packb({"from": "a", "seq": 1}), b""], id="three-frames"),
    pytest.param([b"\xff\xfe", packb({"from": "a", "seq": 1})], id="topic-not-utf8"),
    pytest.param([b"t", packb(["from", "a"])], id="envelope-array"),
    pytest.param([b"t", packb({"from": 1, "seq": 1})], id="int-sender"),
    pytest.param([b"t", packb({"from": "a"})], id="no-seq"),
    pytest.param([b"t", packb({"from": "a", "probe": "x"})], id="str-probe"),
    pytest.param([b"t", b"\xc1"], id="garbage"),
])
def test_bad_bus_messages_raise_decode_error(frames: list[bytes]) -> None:
    with pytest.raises(DecodeError) as info:
        decode_bus(frames)
    assert info.value.code == "bad_frame"


_state_command_bytes = (st.sampled_from([bytes((c,)) for c in StateCommand])
                        | st.binary(max_size=2))
_state_structured = st.builds(
    lambda sig, cmd, header, blobs: [sig, cmd, header, *blobs],
    _signatures, _state_command_bytes,
    (_map_headers | st.dictionaries(
        st.sampled_from(["req", "key", "value", "expected", "ttl_s", "fence", "prefix", "after",
                         "limit", "values", "name", "wait_s", "token", "since", "watch", "v",
                         "ivl", "live", "version", "instance", "leases", "items", "more",
                         "events", "resync", "locks", "info", "code", "current", "existed"]),
        _msgpack_values, max_size=7) | _msgpack_values).map(packb) | st.binary(max_size=40),
    st.lists(st.binary(max_size=8), max_size=2))


@settings(max_examples=250, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(frames=_state_structured | _arbitrary)
def test_decode_state_of_arbitrary_frames_only_raises_state_decode_error(
        frames: list[bytes]) -> None:
    # Given any list of frames sent to the state service
    # When it is decoded
    # Then it is a state message or a StateDecodeError with a known code
    try:
        msg = decode_state(frames)
    except StateDecodeError as e:
        assert e.code in {"bad_frame", "bad_version", "unknown_command", "bad_request",
                          "too_large"}
        assert e.req is None or type(e.req) is int
    else:
        encode_state(msg)


@settings(max_examples=150, deadline=None, database=None)
@given(frames=st.lists(st.binary(max_size=30), max_size=4)
       | st.builds(lambda topic, env: [topic, packb(env)], st.binary(max_size=10),
                   _map_headers | st.dictionaries(st.sampled_from(["from", "seq", "probe",
                                                                    "data"]),
                                                  _msgpack_values, max_size=4)))
def test_decode_bus_of_arbitrary_frames_only_raises_decode_error(frames: list[bytes]) -> None:
    try:
        envelope = decode_bus(frames)
    except DecodeError as e:
        assert e.code == "bad_frame"
    else:
        assert isinstance(envelope, BusEnvelope)


def test_recv_frames_returns_whole_messages_one_at_a_time() -> None:
    """recv_frames ends a message where libzmq says it ends (frame ``.more``), whatever
    its frame count, and leaves the next message whole."""
    from wire.sockets import has_input, NOBLOCK, recv_frames, send_frames

    ctx = zmq.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    dealer = ctx.socket(zmq.DEALER)
    try:
        router.setsockopt(zmq.RCVTIMEO, 5000)  # a lost frame fails the test, not hangs it
        port = router.bind_to_random_port("tcp://127.0.0.1")
        dealer.setsockopt(zmq.ROUTING_ID, b"peer")
        dealer.connect(f"tcp://127.0.0.1:{port}")
        messages = [[b"one"], [b"", b"", b""], [b"a", b"b" * 100_000, b"c", b"d", b"e"]]
        for frames in messages:
            send_frames(dealer, frames, NOBLOCK)
        assert router.poll(5000)
        for frames in messages:
            assert recv_frames(router) == [b"peer", *frames]
        assert not has_input(router)
    finally:
        dealer.close(linger=0)
        router.close(linger=0)


@pytest.mark.parametrize("header", [
    {"before": 1.0},                                  # no req
    {"req": 1, "before": "yesterday"},                # not a number
    {"req": 1, "before": float("inf")},               # not finite
    {"req": 1, "purged": 1, "bytes": -1},             # a negative count
    {"req": 1, "purged": "1"},                        # a count that is no integer
])
def test_a_bad_purge_header_is_a_bad_frame(header: dict[str, Any]) -> None:
    with pytest.raises(DecodeError) as refused:
        decode([SIGNATURE, bytes((Command.PURGE,)), packb(header)])
    assert refused.value.code == "bad_frame"


@pytest.mark.parametrize("field, value", [
    (5, 7), (5, b"agent"), (6, None), (6, 1.5), (6, "2"), (7, "12"), (8, [1]), (8, b"1"),
    (9, "yes"), (9, 1),
])
def test_a_result_item_field_of_the_wrong_type_is_refused(field: int, value: Any) -> None:
    """What the broker copies into the journal and into clients' results (agent,
    attempts, queued_ms, run_ms, retryable) must have its type: found by fuzzing."""
    item: list[Any] = ["t-1", "succeeded", b"ok", None, None, None, 0, None, 1.5, None]
    assert isinstance(decode(encode(Results([ResultItem(*item)]))), Results)
    item[field] = value
    frames = encode(Results([ResultItem(*item)]))
    with pytest.raises(DecodeError, match="RESULT item's agent must be"):
        decode(frames)


def test_a_node_of_another_protocol_version_is_refused_naming_both() -> None:
    """A node supervisor of another release gets ``bad_version`` naming both versions
    (issue 16), as an agent's READY does."""
    frames = encode(NodeReport("n", "h", 1, 1, 0.0, (), version=PROTOCOL_VERSION + 1))
    with pytest.raises(DecodeError) as info:
        decode(frames)
    assert info.value.code == "bad_version"
    assert f"version {PROTOCOL_VERSION + 1}" in str(info.value)
    assert f"speaks version {PROTOCOL_VERSION}" in str(info.value)
