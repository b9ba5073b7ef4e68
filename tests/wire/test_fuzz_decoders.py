"""Fuzzing every decoder of ``wire/`` (issue 15, security): whatever a peer or a file
hands them, they answer with a message or with the error their module documents, never
with a stray ``TypeError``, ``KeyError``, ``OverflowError``, ``RecursionError``...

A stray exception is a crash or a dropped connection in the broker, the state service or
an SDK loop, and whoever can reach a socket can send the frames that raise it. So each
decoder gets three kinds of input: random bytes, random msgpack structures of plausible
shape (the right signature and command, a header that is a map or a batch), and valid
messages mutated (truncated, bytes flipped, elements added, dropped or replaced with
hostile values: huge and negative integers, nan, infinities, wrong types, deep nesting).
Valid messages also round-trip where that is cheap to state.

Examples per test: :data:`CI_EXAMPLES` by default; ``ORCH_FUZZ_LONG=1`` runs
:data:`LONG_EXAMPLES` (a soak before a release), ``ORCH_FUZZ_EXAMPLES=N`` N. No example database and no deadline:
the machine is shared and a slow example is not a failure.
"""

from __future__ import annotations

import json
import math
import os
import random
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.wire.test_protocol import EVERY_MESSAGE, EVERY_STATE_MESSAGE
from wire.bus import BusEnvelope, PrefixSet, decode_bus, encode_bus, encode_bus_probe
from wire.codec import check_signature, command_byte, foreign_error_header, packb
from wire.curve import KeyFileError, local_client_keys, parse_key, read_keys, read_public_key
from wire.documents import StatusUntil
from wire.errors import DecodeError, StateDecodeError
from wire.limits import SIGNATURE
from wire.purge import Purge, PurgeReply
from wire.state import (
    Entry, LockAcquire, StateCommand, StateDelete, StateGet, StateItems, StatePut,
    decode_state, encode_state,
)
from wire.tasks import (
    MAX_STAT_VALUE, Assignment, Command, Direct, DirectItem, Dispatch, Heartbeat,
    ResultItem, Results, Submit, TaskSpec, Withheld, decode, encode,
)
from wire.timeline import attempts_of, timeline_entries
from wire.tracing import context_from, parse_traceparent

#: Examples per property in a normal run, and with ``ORCH_FUZZ_LONG=1``;
#: ``ORCH_FUZZ_EXAMPLES=N`` sets the number itself.
CI_EXAMPLES = 200
LONG_EXAMPLES = 20_000
LONG = os.environ.get("ORCH_FUZZ_LONG") == "1"
EXAMPLES = int(os.environ.get("ORCH_FUZZ_EXAMPLES") or (LONG_EXAMPLES if LONG else CI_EXAMPLES))

#: The settings of every property here (a settings object, not a loaded profile, so
#: that the rest of the suite keeps its own).
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))

#: Error codes each codec may refuse with (docs/protocol.md).
TASK_CODES = {"bad_frame", "bad_version", "unknown_command"}
STATE_CODES = TASK_CODES | {"bad_request", "too_large"}
#: What the broker's span builder catches around the timeline reading (broker/tracing.py):
#: the timeline's documented failures.
TIMELINE_ERRORS = (ValueError, TypeError, KeyError, IndexError)

# ------------------------------------------------------------------ hostile values

#: Values that break naive code: the edges of msgpack's integers, non-finite floats,
#: empty and odd strings, a long string, containers where scalars belong.
HOSTILE: list[Any] = [
    None, True, False, 0, -1, 1, -(2 ** 63), 2 ** 63 - 1, 2 ** 64 - 1, 2 ** 31, -(2 ** 31),
    0.0, -0.0, 1e-300, 1e308, -1e308, math.inf, -math.inf, math.nan, "", " ", "\x00",
    "\n\r\x1b[2J", "\u202e", "x" * 5000, "9" * 5000, b"", b"\xff" * 17, [], {}, [[]], {"": None},
    [None] * 12, {"req": 1}, [1, 2, 3], "t-1", "echo",
]

_scalars = (st.none() | st.booleans() | st.integers(-(2 ** 63), 2 ** 64 - 1)
            | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
            | st.binary(max_size=24) | st.sampled_from(HOSTILE))
#: Any msgpack value of moderate size (arrays, maps with string or integer keys).
values = st.recursive(
    _scalars,
    lambda inner: (st.lists(inner, max_size=8)
                   | st.dictionaries(st.text(max_size=8) | st.integers(-3, 3), inner,
                                     max_size=6)),
    max_leaves=16)

#: Every header key any command uses: maps keyed with them reach the field checks.
HEADER_KEYS = sorted({
    "id", "name", "caps", "max", "v", "running", "ivl", "live", "endpoints", "boot",
    "reason", "ids", "req", "wait", "until", "timeout_s", "status", "code", "message",
    "role", "stats", "started", "tasks", "limit", "seq", "deadline_s", "ok", "detail",
    "offset", "length", "total", "acks", "errs", "key", "value", "expected", "ttl_s",
    "fence", "prefix", "after", "values", "wait_s", "token", "since", "watch", "version",
    "instance", "leases", "items", "more", "events", "resync", "locks", "info", "current",
    "existed", "from", "probe", "data", "agents", "capability", "capabilities", "before",
    "purged", "bytes", "held", "open", "already",
})
map_headers = st.dictionaries(st.sampled_from(HEADER_KEYS), values, max_size=8)
batch_headers = st.lists(st.lists(values, min_size=5, max_size=12), max_size=4)


def deep(depth: int, array: bool) -> bytes:
    """A msgpack value nested ``depth`` levels (arrays or maps of one element), written
    byte by byte: packb refuses depths the unpacker must still survive."""
    opener = b"\x91" if array else b"\x81\xa1k"
    return opener * depth + b"\xc0"


#: Raw headers no encoder writes: deep nesting, truncated containers that announce huge
#: sizes, undefined bytes, invalid UTF-8 in a str, ext types, trailing bytes.
RAW_HEADERS = [
    deep(100, True), deep(1000, True), deep(1025, True), deep(2000, True),
    deep(1000, False), deep(1100, False), b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff\x01",
    b"\xdb\xff\xff\xff\xff", b"\xc6\xff\xff\xff\xff", b"\xc1", b"\xa2\xff\xfe",
    b"\x81\xa3req\xa2\xff\xfe", b"\xd4\x01\x00", b"\xc7\x00\xff", b"\x90\x90", b"",
    b"\x81\x80\x01", b"\x81\x90\x01", b"\xcb" + b"\x7f\xf8" + b"\x00" * 6,
]


# ------------------------------------------------------------------ mutations


def _mutate_value(value: Any, rnd: random.Random, depth: int = 0) -> Any:
    """``value`` with one node somewhere inside replaced, added or removed."""
    if isinstance(value, list) and value and rnd.random() < 0.7 and depth < 6:
        i = rnd.randrange(len(value))
        copy = list(value)
        roll = rnd.random()
        if roll < 0.6:
            copy[i] = _mutate_value(copy[i], rnd, depth + 1)
        elif roll < 0.75:
            del copy[i]
        elif roll < 0.9:
            copy.insert(i, rnd.choice(HOSTILE))
        else:
            copy.extend(rnd.choice(HOSTILE) for _ in range(rnd.randint(1, 3)))
        return copy
    if isinstance(value, dict) and value and rnd.random() < 0.7 and depth < 6:
        copy_map = dict(value)
        key = rnd.choice(list(copy_map))
        roll = rnd.random()
        if roll < 0.6:
            copy_map[key] = _mutate_value(copy_map[key], rnd, depth + 1)
        elif roll < 0.8:
            del copy_map[key]
        else:
            copy_map[rnd.choice(HEADER_KEYS)] = rnd.choice(HOSTILE)
        return copy_map
    return rnd.choice(HOSTILE)


def mutate(frames: list[Any], rnd: random.Random) -> list[Any]:
    """Valid ``frames`` (signature, command, header, blobs) broken in one or a few ways."""
    frames = [bytes(f) for f in frames]
    for _ in range(rnd.randint(1, 3)):
        roll = rnd.random()
        if roll < 0.45 and len(frames) > 2:
            try:
                header = msgpack.unpackb(frames[2], raw=False, strict_map_key=False)
                frames[2] = packb(_mutate_value(header, rnd))
            except (ValueError, TypeError):  # not msgpack (any more), or a map key a
                # dict cannot hold: replace the header with a few random bytes
                frames[2] = bytes(rnd.getrandbits(8) for _ in range(rnd.randint(0, 8)))
        elif roll < 0.6 and len(frames) > 2 and frames[2]:
            cut = rnd.randrange(len(frames[2]))
            frames[2] = frames[2][:cut]
        elif roll < 0.7 and len(frames) > 2 and frames[2]:
            at = rnd.randrange(len(frames[2]))
            header = bytearray(frames[2])
            header[at] = rnd.getrandbits(8)
            frames[2] = bytes(header)
        elif roll < 0.78:
            frames = frames[:rnd.randrange(len(frames) + 1)]
        elif roll < 0.86:
            frames.extend(rnd.choice([b"", b"\x00", b"blob" * 10, packb(0)])
                          for _ in range(rnd.randint(1, 3)))
        elif roll < 0.92 and len(frames) > 1:
            frames[1] = bytes((rnd.getrandbits(8),)) if rnd.random() < 0.8 else b"\x01\x02"
        elif roll < 0.96 and len(frames) > 2:
            frames[2] = rnd.choice(RAW_HEADERS)
        elif frames:
            frames[0] = rnd.choice([b"ORCH4", b"ORCH6", b"ORCH", b"orch5", b"", b"ORCH5\x00",
                                    b"ORCH99999999999999999999"])
    return frames


#: The valid messages mutated: every task and state message type, and bus messages.
_TASK_MESSAGES: list[Any] = [*EVERY_MESSAGE, Purge(1, 1.5e9), Purge(2),
                             PurgeReply(3, 1, 2, 3, 4, 5, 6, 7, 8)]
_STATE_MESSAGES: list[Any] = list(EVERY_STATE_MESSAGE)
VALID_TASK_FRAMES = [encode(m) for m in _TASK_MESSAGES]
VALID_STATE_FRAMES = [encode_state(m) for m in _STATE_MESSAGES]
VALID_BUS_FRAMES = [encode_bus("tasks.t-1", "agent-1", 7, {"i": 1, "n": [1.5, None]}),
                    encode_bus_probe("tasks.", "agent-1", 99), encode_bus("", "", 0, None)]

mutated_task_frames = st.builds(mutate, st.sampled_from(VALID_TASK_FRAMES + VALID_STATE_FRAMES),
                                st.randoms(use_true_random=False))
mutated_state_frames = st.builds(mutate, st.sampled_from(VALID_STATE_FRAMES + VALID_TASK_FRAMES),
                                 st.randoms(use_true_random=False))

_signatures = st.sampled_from([SIGNATURE, b"ORCH3", b"ORCH4", b"ORCH", b""]) \
    | st.binary(max_size=8)
_headers = ((map_headers | batch_headers | values).map(packb)
            | st.sampled_from(RAW_HEADERS) | st.binary(max_size=48))
_blobs = st.lists(st.binary(max_size=12), max_size=3)


def structured(commands: list[int]) -> st.SearchStrategy[list[bytes]]:
    """Frames with a plausible outside: a signature, a command byte (mostly of
    ``commands``), a header, maybe blobs."""
    command = st.sampled_from([bytes((c,)) for c in commands]) | st.binary(max_size=2)
    return st.builds(lambda sig, cmd, header, blobs: [sig, cmd, header, *blobs],
                     _signatures, command, _headers, _blobs)


arbitrary_frames = st.lists(st.binary(max_size=64), max_size=7)
task_frames = structured([int(c) for c in Command]) | mutated_task_frames | arbitrary_frames
state_frames = (structured([int(c) for c in StateCommand]) | mutated_state_frames
                | arbitrary_frames)


# ------------------------------------------------------------------ the task codec


@FUZZ
@given(frames=task_frames)
def test_task_decode_only_raises_decode_error(frames: list[bytes]) -> None:
    # Given any frames a peer of the broker (or the broker, to a client) can send
    # When they are decoded
    try:
        msg = decode(frames)
    except DecodeError as e:
        # Then a refusal is a DecodeError with a stable code and a message saying why
        assert e.code in TASK_CODES, e.code
        assert str(e)
    else:
        # Or a message, which encodes again (the broker forwards what it decoded)
        encode(msg)


def _outcome(decoder: Any, encoder: Any, frames: list[Any]) -> Any:
    """What ``decoder`` makes of ``frames``, comparable: the message encoded again (nan
    is not equal to itself, its encoding is), or the refusal."""
    try:
        msg = decoder(frames)
    except DecodeError as e:
        return (type(e), e.code)
    return [bytes(f) for f in encoder(msg)]


@FUZZ
@given(frames=task_frames | state_frames)
def test_frames_seen_through_memoryviews_decode_the_same(frames: list[bytes]) -> None:
    # Given any frames, and the same frames as memoryviews (how the broker's receive loop
    # hands over a large frame: a view of libzmq's buffer, not a copy)
    views = [memoryview(f) for f in frames]
    # Then each codec reads both alike: the same message, or the same refusal
    for decoder, encoder in ((decode, encode), (decode_state, encode_state)):
        assert _outcome(decoder, encoder, views) == _outcome(decoder, encoder, frames)


@FUZZ
@given(frames=task_frames)
def test_envelope_checks_only_raise_decode_error(frames: list[bytes]) -> None:
    # Given any frames, When the shared envelope checks read them
    # Then they accept or raise DecodeError; foreign_error_header never raises
    for check in (check_signature, command_byte):
        try:
            check(frames)
        except DecodeError as e:
            assert e.code in {"bad_frame", "bad_version"}
    header = foreign_error_header(frames, Command.ERROR)
    assert header is None or (type(header["code"]) is str and type(header["message"]) is str)


_task_ids = st.text(max_size=12)
_caps = st.lists(st.text(max_size=6), max_size=3).map(tuple)
_payloads = st.binary(max_size=64) | st.sampled_from([b"x" * 20_000])
_opt_str = st.none() | st.text(max_size=10)
_positive = st.floats(min_value=1e-6, max_value=1e9)
_int64 = st.integers(-(2 ** 63), 2 ** 63 - 1)
_uint = st.integers(0, 2 ** 63 - 1)

task_specs = st.builds(TaskSpec, _task_ids, _payloads, _caps, _opt_str, _int64,
                       st.none() | _positive, st.none() | _uint, _opt_str,
                       st.none() | _positive, st.booleans())
assignments = st.builds(Assignment, _task_ids, _payloads, _uint,
                        st.floats(allow_nan=False), _caps, _opt_str)


def _result_item(tid: str, status: str, payload: Any, error: tuple[str, str] | None,
                 agent: str | None, attempts: int, queued_ms: float | None,
                 run_ms: float | None, retryable: bool | None) -> ResultItem:
    """A RESULT item: an error has both its code and its message, or neither."""
    code, message = error if error is not None else (None, None)
    return ResultItem(tid, status, payload, code, message, agent, attempts, queued_ms, run_ms,
                      retryable)


result_items = st.builds(
    _result_item, _task_ids, st.text(max_size=10), _payloads | st.builds(Withheld, _uint),
    st.none() | st.tuples(st.text(max_size=8), st.text(max_size=20)), _opt_str, _uint,
    st.none() | st.floats(allow_nan=False), st.none() | st.floats(allow_nan=False),
    st.none() | st.booleans())
direct_items = st.builds(DirectItem, st.none() | st.text(max_size=8) | st.binary(max_size=8),
                         _int64, _payloads, st.none() | _int64, st.integers(0, 7),
                         st.none() | st.tuples(st.text(max_size=8), st.text(max_size=8)),
                         st.none() | st.text(max_size=8) | st.binary(max_size=8))
batch_messages = (st.lists(task_specs, max_size=4).map(Submit)
                  | st.lists(assignments, max_size=4).map(Dispatch)
                  | st.lists(result_items, max_size=4).map(Results)
                  | st.lists(direct_items, max_size=4).map(Direct))


@FUZZ
@given(msg=batch_messages)
def test_batch_messages_round_trip(msg: Any) -> None:
    # Given a valid batch (SUBMIT, TASK, RESULT, DIRECT) with any field values the
    # protocol allows, large payloads included
    # When it is encoded and decoded
    # Then the same message comes back
    assert decode(encode(msg)) == msg


@FUZZ
@given(stats=st.dictionaries(st.text(max_size=12), st.integers(0, 2 ** 200), max_size=5))
def test_heartbeat_counters_always_encode(stats: dict[str, int]) -> None:
    # Given an agent's messaging counters, grown by whatever peers sent (a forged bus
    # sequence number adds up to 2^64 to bus_gaps at a time)
    # When its HEARTBEAT is encoded, Then it is, each counter capped at MAX_STAT_VALUE
    decoded = decode(encode(Heartbeat(stats=stats)))
    assert isinstance(decoded, Heartbeat)
    assert decoded.stats == {name: min(count, MAX_STAT_VALUE) for name, count in stats.items()}


# ------------------------------------------------------------------ the state codec


@FUZZ
@given(frames=state_frames)
def test_state_decode_only_raises_state_decode_error(frames: list[bytes]) -> None:
    # Given any frames a client of the state service (or the service) can send
    # When they are decoded
    try:
        msg = decode_state(frames)
    except StateDecodeError as e:
        # Then a refusal carries a stable code, a message and the req when it was read
        assert e.code in STATE_CODES, e.code
        assert e.req is None or type(e.req) is int
        assert str(e)
    else:
        encode_state(msg)


_keys = st.text(min_size=1, max_size=40)
state_messages = (
    st.builds(StateGet, _int64, _keys)
    | st.builds(StatePut, _int64, _keys, st.binary(max_size=64), st.none() | _uint,
                st.none() | _positive, st.none() | st.tuples(_keys, _int64))
    | st.builds(StateDelete, _int64, _keys, st.none() | _uint,
                st.none() | st.tuples(_keys, _int64))
    | st.builds(LockAcquire, _int64, _keys, st.floats(min_value=1e-3, max_value=3600),
                st.none() | st.floats(min_value=0, max_value=1e6))
    | st.builds(StateItems, _int64, _uint,
                st.lists(st.builds(Entry, st.text(max_size=10), _uint,
                                   st.none() | st.binary(max_size=10)), max_size=4),
                st.booleans()))


@FUZZ
@given(msg=state_messages)
def test_state_messages_round_trip(msg: Any) -> None:
    assert decode_state(encode_state(msg)) == msg


# ------------------------------------------------------------------ the bus


bus_frames = (
    st.lists(st.binary(max_size=32), max_size=4)
    | st.builds(lambda topic, envelope: [topic, packb(envelope)], st.binary(max_size=12),
                map_headers | values)
    | st.builds(lambda topic, raw: [topic, raw], st.binary(max_size=12),
                st.sampled_from(RAW_HEADERS))
    | st.builds(mutate, st.sampled_from(VALID_BUS_FRAMES), st.randoms(use_true_random=False))
    | st.builds(lambda frames, rnd: [frames[0], packb(_mutate_value(
        msgpack.unpackb(frames[1], raw=False), rnd))], st.sampled_from(VALID_BUS_FRAMES),
        st.randoms(use_true_random=False)))


@FUZZ
@given(frames=bus_frames)
def test_bus_decode_only_raises_decode_error(frames: list[bytes]) -> None:
    # Given any frames a publisher can put on the bus
    # When a subscriber decodes them
    try:
        envelope = decode_bus(frames)
    except DecodeError as e:
        # Then a bad message is a DecodeError (the SDK counts and drops it)
        assert e.code == "bad_frame"
    else:
        assert type(envelope) is BusEnvelope and type(envelope.topic) is str


@FUZZ
@given(topic=st.text(max_size=20), sender=st.text(max_size=10), seq=_int64, data=values)
def test_bus_messages_round_trip(topic: str, sender: str, seq: int, data: Any) -> None:
    envelope = decode_bus(encode_bus(topic, sender, seq, data))
    assert (envelope.topic, envelope.sender, envelope.seq) == (topic, sender, seq)
    # (nan != nan: compare the encoding, which is what the bus moves)
    assert packb(envelope.data) == packb(msgpack.unpackb(packb(data), raw=False,
                                                        strict_map_key=False))


@FUZZ
@given(messages=st.lists(st.binary(max_size=4) | st.builds(
    lambda op, prefix: bytes((op,)) + prefix, st.integers(0, 2), st.binary(max_size=3)),
    max_size=30))
def test_prefix_set_applies_any_subscription_stream(messages: list[bytes]) -> None:
    # Given any stream of messages an XPUB hears (subscriptions, unsubscriptions, noise)
    prefixes = PrefixSet()
    model: Counter[bytes] = Counter()
    for message in messages:
        # When each is applied, Then it never raises and the set follows the counts
        before = set(model)
        changed = prefixes.apply(message)
        if message and message[0] == 1:
            model[bytes(message[1:])] += 1
        elif message and message[0] == 0 and model[bytes(message[1:])] > 0:
            model[bytes(message[1:])] -= 1
        model += Counter()  # drop zero counts
        assert changed == (set(model) != before)
        assert set(prefixes) == set(model)


# ------------------------------------------------------------------ documents


@FUZZ
@given(document=map_headers | st.dictionaries(
    st.sampled_from(["agents", "capability", "capabilities", "name"]), values, max_size=4))
def test_status_until_only_raises_value_error(document: dict[str, Any]) -> None:
    # Given any ``until`` map a client can put in a STATUS request
    # (the broker hands it over as decode leaves it: arrays as lists)
    plain_document = msgpack.unpackb(packb(document), raw=False, strict_map_key=False)
    # When it is read, Then it is a StatusUntil or the documented ValueError
    try:
        until = StatusUntil.from_map(plain_document)
    except ValueError:
        return
    assert type(until.agents) is int and all(type(c) is str for c in until.capabilities)


_timeline_entries = st.lists(
    st.tuples(st.floats() | st.integers(-(2 ** 63), 2 ** 64 - 1) | st.text(max_size=4),
              st.sampled_from(["submitted", "dispatched", "reclaimed", "running", "retrying",
                               "requeued", "second_opinion", "succeeded", "failed"])
              | st.text(max_size=6),
              st.sampled_from(["attempt 1 on a-1", "attempt 99999999999999999999 to x",
                               "failed on a-2", "a-3", "", "attempt " + "9" * 5000])
              | st.text(max_size=12)).map(list)
    | st.dictionaries(st.sampled_from(["at", "event", "detail"]), _scalars, max_size=3)
    | _scalars, max_size=8)


@FUZZ
@given(timeline=_timeline_entries)
def test_timeline_reading_only_raises_its_documented_errors(timeline: list[Any]) -> None:
    # Given any timeline a TASKS reply can carry (as msgpack decodes it)
    timeline = msgpack.unpackb(packb(timeline), raw=False, strict_map_key=False,
                               use_list=False)
    # When it is read as attempts, Then it is read or raises what its callers catch
    try:
        attempts_of(timeline_entries(timeline))
    except TIMELINE_ERRORS:
        pass


@FUZZ
@given(text=st.text(max_size=80) | st.sampled_from([
    "00-" + "a" * 32 + "-" + "b" * 16 + "-01", "ff-" + "a" * 32 + "-" + "b" * 16 + "-01",
    "00-" + "0" * 32 + "-" + "b" * 16 + "-01", "00-" + "g" * 32 + "-" + "b" * 16 + "-01",
    "00-" + "١" * 32 + "-" + "b" * 16 + "-01", "00-" + " 1" * 16 + "-" + "b" * 16 + "-01",
    "-" * 3, "00-" + "a" * 32 + "-" + "b" * 16 + "-0x"]))
def test_traceparent_parsing_never_raises(text: str) -> None:
    # Given any traceparent string a SUBMIT item can carry
    # When it is parsed, Then it is a (trace id, span id, sampled) or None
    parsed = parse_traceparent(text)
    assert parsed is None or (parsed[0] > 0 and parsed[1] > 0)
    context_from(text)


# ------------------------------------------------------------------ key files


_key_texts = st.text(max_size=80) | st.sampled_from([
    "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7", 'public-key = "' + "x" * 40 + '"',
    'secret-key = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"', "\x00", "/", "", "."])


@FUZZ
@given(text=_key_texts)
def test_key_text_only_raises_key_file_error(text: str) -> None:
    # Given any text given as a CURVE key or a key file name
    # When it is read, Then it is a key or KeyFileError
    for read in (parse_key, read_public_key):
        try:
            read(text)
        except KeyFileError:
            pass


@FUZZ
@given(content=st.binary(max_size=200) | _key_texts.map(str.encode))
def test_key_file_only_raises_key_file_error(content: bytes) -> None:
    # Given a key file with any bytes in it
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "k.key"
        path.write_bytes(content)
        path.chmod(0o600)
        # When it is read, Then it yields keys or KeyFileError
        try:
            keys = read_keys(path)
        except KeyFileError:
            return
        assert keys and set(keys) <= {"public", "secret"}


_broker_json = (
    st.binary(max_size=100)
    | values.map(lambda v: json.dumps(v, default=repr).encode())
    | st.dictionaries(st.sampled_from(["endpoint", "bus_out", "bus_in", "state",
                                       "curve_public_key"]), values, max_size=5).map(
        lambda v: json.dumps(v, default=repr).encode())
    | st.sampled_from([b"[" * 5000, b'{"a":' * 3000, b"1e999999", b"\xff\xfe{}",
                       b'"\\ud800"', b"NaN"]))


@FUZZ
@given(content=_broker_json)
def test_broker_json_only_gives_keys_none_or_key_file_error(content: bytes) -> None:
    # Given a data dir whose broker.json holds anything (a torn write, another tool's file)
    with tempfile.TemporaryDirectory() as directory:
        home = Path(directory)
        (home / "broker.json").write_bytes(content)
        # When a client looks for the local admin key, Then it finds none or says why
        try:
            local_client_keys(home, "")
        except KeyFileError:
            pass


def test_the_hostile_raw_headers_reach_every_codec() -> None:
    # A smoke check of the table itself: each raw header is refused by the task and state
    # codecs with their own error (and what they decode, if anything, re-encodes).
    for header in RAW_HEADERS:
        for command in (Command.SUBMIT, Command.STATUS, Command.READY):
            with pytest.raises(DecodeError):
                decode([SIGNATURE, bytes((command,)), header])
        with pytest.raises(StateDecodeError):
            decode_state([SIGNATURE, bytes((StateCommand.PUT,)), header])
