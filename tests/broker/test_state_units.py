"""The state service without the network: codec round trips, the store's rules driven by
a fake clock (versions, CAS, ttl, leases, sessions, fencing, watches), and persistence.

Time is a number the test advances; nothing here sleeps or opens a socket.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from broker.config import StateConfig, state_bind_for
from wire.errors import StateDecodeError
from broker.heartbeat import Liveness
from wire.codec import packb
from wire.limits import PROTOCOL_VERSION, SIGNATURE
from wire.state import (
    decode_state, encode_state, Entry, LeaseGranted, LockAcquire, LockInfo, LockList,
    LockRelease, LockRenew, LockTable, MAX_VALUE_BYTES, StateCommand, StateDelete, StateDone,
    StateErrorReply, StateEvents, StateGet, StateHello, StateInfo, StateInfoRequest,
    StateItems, StateList, StatePing, StatePut, StateUnwatch, StateValue, StateWatch,
    StateWelcome,
)
from wire.tasks import decode, encode
from wire.errors import DecodeError
from broker.state.persistence import StatePersistence
from broker.state.store import StateStore

INTERVAL_S = 1.0
LIVENESS = 3


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


def new_store(changelog_size: int = 1000) -> StateStore:
    return StateStore(Liveness(INTERVAL_S, LIVENESS), changelog_size)


def hello(store: StateStore, identity: bytes, now: float) -> StateWelcome:
    reply = store.handle(identity, StateHello(1, identity.decode()), now)
    assert isinstance(reply, StateWelcome)
    return reply


def put(store: StateStore, identity: bytes, key: str, value: Any, now: float, **kw: Any) -> Any:
    return store.handle(identity, StatePut(7, key, packb(value), **kw), now)


# ------------------------------------------------------------------ codec

EVERY_STATE_MESSAGE = [
    StateHello(1, "agent-a"),
    StatePing(),
    StateGet(2, "config/model"),
    StatePut(3, "k", b"\x01", None, None, None),
    StatePut(4, "k", b"\x81\xa1a\x01", 7, 2.5, ("lock", 9)),
    StateDelete(5, "k"),
    StateDelete(6, "k", 3, ("lock", 1)),
    StateList(7, "jobs/", "jobs/3", 50, False),
    StateList(8),
    LockAcquire(9, "leader", 10.0, 5.0),
    LockAcquire(10, "leader", 0.5, None),
    LockRenew(11, "leader", 4, 3.0),
    LockRenew(12, "leader", 4, None),
    LockRelease(13, "leader", 4),
    StateWatch(14, "jobs/", 120),
    StateWatch(15, "", None),
    StateUnwatch(16, 14),
    LockList(17, "l/"),
    StateInfoRequest(18),
    StateWelcome(19, 0.2, 3, 42, "abc", [("leader", 4, 10.0)]),
    StateValue(20, "k", 3, b"\x01"),
    StateValue(21, "missing", 0, None),
    StateDone(22, 5, False),
    StateItems(23, 9, [Entry("a", 1, b"\x01"), Entry("b", 2, None)], True),
    LeaseGranted(24, "leader", 5, 10.0),
    StateEvents(14, [Entry("jobs/1", 3, b"\x02"), Entry("jobs/1", 4, None)], True),
    LockTable(25, [LockInfo("leader", 5, "agent-a", "state-a-1", 9.5, 2)]),
    StateInfo(26, {"keys": 3, "requests": {"StateGet": 1}}),
    StateErrorReply("conflict", "key 'k' is at version 3", 27, 3, b"\x01"),
    StateErrorReply("bad_frame", "garbage", None, None, None),
]


@pytest.mark.parametrize("msg", EVERY_STATE_MESSAGE, ids=lambda m: type(m).__name__)
def test_every_state_message_survives_a_round_trip(msg: Any) -> None:
    assert decode_state(encode_state(msg)) == msg


def test_state_and_broker_codecs_refuse_each_others_commands() -> None:
    # The broker answers state commands with unknown_command, and the other way round.
    with pytest.raises(DecodeError) as broker_side:
        decode(encode_state(StateGet(1, "k")))
    assert broker_side.value.code == "unknown_command"
    from wire.tasks import Heartbeat

    with pytest.raises(StateDecodeError) as state_side:
        decode_state(encode(Heartbeat()))
    assert state_side.value.code == "unknown_command"


@pytest.mark.parametrize("frames, code, req", [
    ([SIGNATURE, bytes([StateCommand.GET])], "bad_frame", None),
    ([b"ORCH2", bytes([StateCommand.GET]), packb({"req": 1, "key": "k"})], "bad_version", None),
    ([b"HTTP/", bytes([StateCommand.GET]), packb({})], "bad_frame", None),
    ([SIGNATURE, b"\x42\x42", packb({})], "bad_frame", None),
    ([SIGNATURE, bytes([0x4F]), packb({"req": 1})], "unknown_command", None),
    ([SIGNATURE, bytes([StateCommand.GET]), b"\xc1"], "bad_frame", None),
    ([SIGNATURE, bytes([StateCommand.GET]), packb([1, 2])], "bad_frame", None),
    ([SIGNATURE, bytes([StateCommand.GET]), packb({"req": 2, "key": 5})], "bad_request", 2),
    ([SIGNATURE, bytes([StateCommand.GET]), packb({"req": 3, "key": ""})], "bad_request", 3),
    ([SIGNATURE, bytes([StateCommand.GET]), packb({"req": 4, "key": "x" * 2000})], "too_large", 4),
    ([SIGNATURE, bytes([StateCommand.PUT]), packb({"req": 5, "key": "k", "value": "text"})],
     "bad_request", 5),
    ([SIGNATURE, bytes([StateCommand.PUT]),
      packb({"req": 6, "key": "k", "value": b"x" * (MAX_VALUE_BYTES + 1)})], "too_large", 6),
    ([SIGNATURE, bytes([StateCommand.PUT]),
      packb({"req": 7, "key": "k", "value": b"", "expected": -1})], "bad_request", 7),
    ([SIGNATURE, bytes([StateCommand.PUT]),
      packb({"req": 8, "key": "k", "value": b"", "fence": ["l"]})], "bad_request", 8),
    ([SIGNATURE, bytes([StateCommand.ACQUIRE]), packb({"req": 9, "name": "l", "ttl_s": -1})],
     "bad_request", 9),
    ([SIGNATURE, bytes([StateCommand.ACQUIRE]),
      packb({"req": 10, "name": "l", "ttl_s": 1, "wait_s": float("nan")})], "bad_request", 10),
    ([SIGNATURE, bytes([StateCommand.LIST]), packb({"req": 11, "limit": 0})], "bad_request", 11),
    ([SIGNATURE, bytes([StateCommand.HELLO]), packb({"req": 12, "v": PROTOCOL_VERSION + 1})],
     "bad_version", 12),
    ([SIGNATURE, bytes([StateCommand.GET]), packb({"req": "one", "key": "k"})], "bad_request",
     None),
])
def test_bad_state_frames_get_stable_codes_and_keep_their_req(frames: list[bytes], code: str,
                                                              req: int | None) -> None:
    with pytest.raises(StateDecodeError) as caught:
        decode_state(frames)
    assert (caught.value.code, caught.value.req) == (code, req)


def test_random_frames_only_ever_raise_state_decode_errors() -> None:
    rng = random.Random(1234)
    values: list[Any] = [None, True, -1, 0, 3, 2.5, float("inf"), "", "k", b"", b"\x00" * 3,
                         [], ["l", 1], {"a": 1}]
    fields = ["req", "key", "value", "expected", "ttl_s", "fence", "name", "token", "wait_s",
              "prefix", "since", "limit", "after", "values", "watch", "v"]
    for _ in range(3000):
        header = {rng.choice(fields): rng.choice(values) for _ in range(rng.randrange(6))}
        frames = [SIGNATURE, bytes([rng.randrange(0x38, 0x60)]),
                  packb(header) if rng.random() < 0.95 else bytes(rng.randrange(256)
                                                                  for _ in range(5))]
        try:
            decode_state(frames)
        except StateDecodeError:
            pass


# ------------------------------------------------------------------ keys and versions


def test_versions_increase_on_every_write_and_never_come_back_after_delete() -> None:
    # Given a store with one session
    store = new_store()
    hello(store, b"a", 0.0)
    # When a key is written twice, another key once, and the first is deleted and re-created
    first = put(store, b"a", "k", 1, 0.0)
    second = put(store, b"a", "k", 2, 0.0)
    other = put(store, b"a", "other", "x", 0.0)
    deleted = store.handle(b"a", StateDelete(8, "k"), 0.0)
    recreated = put(store, b"a", "k", 3, 0.0)
    # Then every write got a higher version, and the re-created key starts above them all
    assert [first.version, second.version, other.version] == [1, 2, 3]
    assert deleted == StateDone(8, 4, True)
    assert recreated.version == 5
    assert store.handle(b"a", StateGet(9, "k"), 0.0) == StateValue(9, "k", 5, packb(3))
    assert store.handle(b"a", StateGet(10, "nope"), 0.0) == StateValue(10, "nope", 0, None)
    assert store.handle(b"a", StateDelete(11, "nope"), 0.0) == StateDone(11, 0, False)


def test_cas_writes_only_at_the_expected_version_and_conflicts_carry_the_current() -> None:
    store = new_store()
    hello(store, b"a", 0.0)
    # Given "k" does not exist: expected 0 creates it, a second create conflicts
    assert put(store, b"a", "k", "v1", 0.0, expected=0) == StateDone(7, 1)
    conflict = put(store, b"a", "k", "v2", 0.0, expected=0)
    assert isinstance(conflict, StateErrorReply)
    assert (conflict.code, conflict.current, conflict.value) == ("conflict", 1, packb("v1"))
    # When written at the right version it succeeds; at a stale one it conflicts
    assert put(store, b"a", "k", "v2", 0.0, expected=1) == StateDone(7, 2)
    stale = put(store, b"a", "k", "v3", 0.0, expected=1)
    assert isinstance(stale, StateErrorReply) and stale.current == 2
    # And a conditional delete follows the same rule
    refused = store.handle(b"a", StateDelete(8, "k", expected=1), 0.0)
    assert isinstance(refused, StateErrorReply) and refused.code == "conflict"
    assert store.handle(b"a", StateDelete(9, "k", expected=2), 0.0) == StateDone(9, 3, True)


def test_keys_with_a_ttl_expire_on_the_clock_and_a_plain_write_makes_them_permanent() -> None:
    clock = FakeClock()
    store = new_store()
    hello(store, b"a", clock())
    store.handle(b"a", StateWatch(3, "", None), clock())
    put(store, b"a", "temp", 1, clock(), ttl_s=5.0)
    put(store, b"a", "kept", 1, clock(), ttl_s=5.0)
    put(store, b"a", "kept", 2, clock())  # no ttl: permanent again
    store.take_outgoing()
    # When 4.9 s pass nothing expires; at 5 s "temp" is deleted, "kept" is not
    store.tick(clock.advance(4.9))
    assert store.keys.get("temp") is not None
    store.tick(clock.advance(0.1))
    assert store.keys.get("temp") is None and store.keys.get("kept") is not None
    # And the watcher sees the expiry as a deletion with a new version
    assert store.take_outgoing() == [(b"a", StateEvents(3, [Entry("temp", 4, None)]))]


def test_list_returns_keys_under_a_prefix_in_order_and_pages() -> None:
    store = new_store()
    hello(store, b"a", 0.0)
    for key in ["b/2", "a/1", "b/1", "b/10", "c", "b/3"]:
        put(store, b"a", key, key, 0.0)
    page = store.handle(b"a", StateList(3, "b/", None, 2, True), 0.0)
    assert isinstance(page, StateItems) and page.more
    assert [e.key for e in page.items] == ["b/1", "b/10"]
    rest = store.handle(b"a", StateList(4, "b/", "b/10", 10, False), 0.0)
    assert isinstance(rest, StateItems) and not rest.more
    assert rest.items == [Entry("b/2", 1, None), Entry("b/3", 6, None)]


# ------------------------------------------------------------------ sessions


def test_requests_without_a_session_are_refused_until_hello() -> None:
    store = new_store()
    refused = store.handle(b"x", StateGet(4, "k"), 0.0)
    assert isinstance(refused, StateErrorReply)
    assert (refused.code, refused.req) == ("no_session", 4)
    hello(store, b"x", 0.0)
    assert store.handle(b"x", StateGet(5, "k"), 0.0) == StateValue(5, "k", 0, None)


def test_a_silent_session_expires_after_interval_times_liveness() -> None:
    clock = FakeClock()
    store = new_store()
    hello(store, b"a", clock())
    # Given the client pings at 2.9 s: still alive at 5.8 s, expired after 5.9 s
    clock.advance(2.9)
    assert store.handle(b"a", StatePing(), clock()) == StatePing()
    store.expire_sessions(clock.advance(2.9))
    assert store.sessions.get(b"a") is not None
    store.expire_sessions(clock.advance(0.01 + INTERVAL_S * LIVENESS - 2.9))
    assert store.sessions.get(b"a") is None
    assert store.handle(b"a", StateGet(2, "k"), clock()).code == "no_session"  # type: ignore[union-attr]


# ------------------------------------------------------------------ locks


def acquire(store: StateStore, identity: bytes, req: int, now: float, ttl_s: float = 10.0,
            wait_s: float | None = 5.0, name: str = "L") -> Any:
    return store.handle(identity, LockAcquire(req, name, ttl_s, wait_s), now)


def test_waiters_get_the_lock_first_come_first_served_with_increasing_tokens() -> None:
    clock = FakeClock()
    store = new_store()
    for who in (b"a", b"b", b"c", b"d"):
        hello(store, who, clock())
    # Given "a" holds the lock and b, c, d wait in that order
    assert acquire(store, b"a", 10, clock()) == LeaseGranted(10, "L", 1, 10.0)
    assert acquire(store, b"b", 11, clock()) is None
    assert acquire(store, b"c", 12, clock()) is None
    assert acquire(store, b"d", 13, clock()) is None
    # When each holder releases, the next waiter gets it at once with the next token
    tokens = []
    for holder, (who, req) in zip((b"a", b"b", b"c"), ((b"b", 11), (b"c", 12), (b"d", 13))):
        token = tokens[-1] if tokens else 1
        assert store.handle(holder, LockRelease(20, "L", token), clock()) == StateDone(20)
        granted = store.take_outgoing()
        assert len(granted) == 1 and granted[0][0] == who
        lease = granted[0][1]
        assert isinstance(lease, LeaseGranted) and lease.req == req
        tokens.append(lease.token)
    assert tokens == [2, 3, 4]


def test_a_wait_times_out_with_lock_timeout_and_wait_zero_fails_at_once() -> None:
    clock = FakeClock()
    store = new_store()
    for who in (b"a", b"b"):
        hello(store, who, clock())
    acquire(store, b"a", 1, clock())
    refused = acquire(store, b"b", 2, clock(), wait_s=0)
    assert isinstance(refused, StateErrorReply) and refused.code == "lock_timeout"
    assert acquire(store, b"b", 3, clock(), wait_s=2.0) is None
    store.tick(clock.advance(1.99))
    assert store.take_outgoing() == []
    store.tick(clock.advance(0.01))
    [(who, error)] = store.take_outgoing()
    assert who == b"b" and isinstance(error, StateErrorReply)
    assert (error.code, error.req) == ("lock_timeout", 3)
    # The timed-out waiter is gone: a release leaves the lock free
    store.handle(b"a", LockRelease(4, "L", 1), clock())
    assert store.take_outgoing() == [] and "L" not in store.locks.leases


def test_an_unrenewed_lease_expires_at_its_ttl_and_a_renewed_one_does_not() -> None:
    clock = FakeClock()
    store = new_store()
    for who in (b"a", b"b"):
        hello(store, who, clock())
    acquire(store, b"a", 1, clock(), ttl_s=2.0)
    acquire(store, b"b", 2, clock(), wait_s=None)
    # Renewed at 1.5 s, the lease lasts until 3.5 s (sessions kept alive by the requests)
    clock.advance(1.5)
    assert store.handle(b"a", LockRenew(3, "L", 1, None), clock()) == LeaseGranted(3, "L", 1, 2.0)
    store.tick(clock.advance(1.9))
    assert store.take_outgoing() == []
    store.handle(b"b", StatePing(), clock())
    store.tick(clock.advance(0.1))
    [(who, lease)] = store.take_outgoing()
    assert who == b"b" and lease == LeaseGranted(2, "L", 2, 10.0)
    # The old holder can neither renew nor release any more
    for msg in (LockRenew(4, "L", 1, None), LockRelease(5, "L", 1)):
        refused = store.handle(b"a", msg, clock())
        assert isinstance(refused, StateErrorReply) and refused.code == "not_held"


def test_an_expired_session_releases_its_leases_to_waiters() -> None:
    clock = FakeClock()
    store = new_store()
    for who in (b"dead", b"waiter"):
        hello(store, who, clock())
    acquire(store, b"dead", 1, clock(), ttl_s=60.0)
    acquire(store, b"waiter", 2, clock(), wait_s=None)
    # The waiter keeps pinging; the holder goes silent for the session expiry
    for _ in range(int(INTERVAL_S * LIVENESS / 0.5) + 1):
        clock.advance(0.5)
        store.handle(b"waiter", StatePing(), clock())
        store.expire_sessions(clock())
    [(who, lease)] = store.take_outgoing()
    assert who == b"waiter" and isinstance(lease, LeaseGranted) and lease.token == 2


def test_fenced_writes_pass_only_with_the_current_lease() -> None:
    clock = FakeClock()
    store = new_store()
    for who in (b"a", b"b"):
        hello(store, who, clock())
    acquire(store, b"a", 1, clock(), ttl_s=1.0)
    # With the current token the write passes
    assert put(store, b"a", "data", 1, clock(), fence=("L", 1)).version == 1
    # After the lease expired, the same token is stale even though nobody holds the lock
    store.tick(clock.advance(1.0))
    stale = put(store, b"a", "data", 2, clock(), fence=("L", 1))
    assert isinstance(stale, StateErrorReply) and stale.code == "stale_token"
    # And once another session holds it, only the new token passes
    assert acquire(store, b"b", 2, clock()).token == 2
    assert put(store, b"b", "data", 3, clock(), fence=("L", 1)).code == "stale_token"
    assert put(store, b"b", "data", 3, clock(), fence=("L", 2)).version == 2
    deleted = store.handle(b"a", StateDelete(9, "data", fence=("L", 1)), clock())
    assert isinstance(deleted, StateErrorReply) and deleted.code == "stale_token"


def test_lock_table_lists_holders_waiters_and_time_left() -> None:
    clock = FakeClock()
    store = new_store()
    for who in (b"a", b"b"):
        hello(store, who, clock())
    acquire(store, b"a", 1, clock(), ttl_s=10.0, name="jobs/1")
    acquire(store, b"b", 2, clock(), name="jobs/1")
    acquire(store, b"b", 3, clock(), name="other")
    table = store.handle(b"a", LockList(4, "jobs/"), clock.advance(2.5))
    assert table == LockTable(4, [LockInfo("jobs/1", 1, "a", "a", 7.5, 1)])


# ------------------------------------------------------------------ watches


def test_watchers_get_changes_under_their_prefix_in_version_order() -> None:
    store = new_store()
    for who in (b"w", b"x"):
        hello(store, who, 0.0)
    store.handle(b"w", StateWatch(5, "jobs/", None), 0.0)
    store.handle(b"x", StateWatch(6, "", None), 0.0)
    put(store, b"x", "jobs/1", "a", 0.0)
    put(store, b"x", "other", "b", 0.0)
    put(store, b"x", "jobs/1", "c", 0.0)
    store.handle(b"x", StateDelete(9, "jobs/1"), 0.0)
    out = dict(store.take_outgoing())
    assert out[b"w"] == StateEvents(5, [Entry("jobs/1", 1, packb("a")),
                                        Entry("jobs/1", 3, packb("c")), Entry("jobs/1", 4, None)])
    assert [e.version for e in out[b"x"].events] == [1, 2, 3, 4]  # type: ignore[attr-defined]
    # After UNWATCH nothing more arrives
    assert store.handle(b"w", StateUnwatch(10, 5), 0.0) == StateDone(10, 4, True)
    put(store, b"x", "jobs/2", "d", 0.0)
    assert [who for who, _ in store.take_outgoing()] == [b"x"]


def test_a_watch_since_a_version_replays_exactly_or_says_resync() -> None:
    store = new_store(changelog_size=5)
    hello(store, b"a", 0.0)
    for i in range(4):
        put(store, b"a", f"k{i % 2}", i, 0.0)
    # Within the change log: exactly the missed changes, in order
    store.handle(b"a", StateWatch(3, "", 2), 0.0)
    [(_, events)] = store.take_outgoing()
    assert events == StateEvents(3, [Entry("k0", 3, packb(2)), Entry("k1", 4, packb(3))], False)
    # Beyond it: the current keys written since, flagged as a resync
    for i in range(10):
        put(store, b"a", "k2", i, 0.0)
    store.take_outgoing()
    store.handle(b"a", StateWatch(4, "k", 1), 0.0)
    [(_, resync)] = store.take_outgoing()
    assert isinstance(resync, StateEvents) and resync.resync
    assert [e.key for e in resync.events] == ["k0", "k1", "k2"]


def test_large_bursts_reach_watchers_in_frames_under_the_limit() -> None:
    from wire.state import MAX_EVENTS_BYTES, MAX_EVENTS_PER_MESSAGE

    store = new_store()
    hello(store, b"w", 0.0)
    store.handle(b"w", StateWatch(2, "", None), 0.0)
    # Given 40 writes of almost 1 MiB and 1,000 small ones in one pass
    big = b"x" * (MAX_VALUE_BYTES - 16)
    for i in range(40):
        store.handle(b"w", StatePut(3, f"big/{i}", big), 0.0)
    for i in range(1000):
        put(store, b"w", f"small/{i}", i, 0.0)
    # Then they leave in order, in messages within both limits
    messages = [msg for _, msg in store.take_outgoing()]
    assert len(messages) > 3
    for msg in messages:
        assert isinstance(msg, StateEvents)
        assert len(msg.events) <= MAX_EVENTS_PER_MESSAGE
        assert sum(len(e.value or b"") for e in msg.events) <= MAX_EVENTS_BYTES
    versions = [e.version for msg in messages for e in msg.events]  # type: ignore[attr-defined]
    assert versions == list(range(1, 1041))


# ------------------------------------------------------------------ persistence


def test_state_survives_a_reload_with_versions_fences_leases_and_ttls(tmp_path: Path) -> None:
    clock = FakeClock()
    wall = FakeClock(1_700_000_000.0)
    db = tmp_path / "state.db"
    store = new_store()
    disk = StatePersistence(db, wall)
    disk.open()
    disk.load(store, clock())
    hello(store, b"holder", clock())
    for i in range(20):
        put(store, b"holder", f"k{i % 5}", i, clock())
    put(store, b"holder", "short", 1, clock(), ttl_s=10.0)
    put(store, b"holder", "long", 1, clock(), ttl_s=1000.0)
    store.handle(b"holder", StateDelete(3, "k4"), clock())
    acquire(store, b"holder", 4, clock(), name="L")
    store.handle(b"holder", LockRelease(5, "L", 1), clock())
    acquire(store, b"holder", 6, clock(), name="L", ttl_s=30.0)
    # One commit for the whole pass, with a row per key, not per write
    written = disk.commit(store, clock())
    assert disk.commits == 1 and written == 5 + 2 + 1 + 1  # keys, ttl keys, fence, lease
    disk.close()
    before = {k: (r.value, r.version) for k, r in store.keys.records.items()}
    # When the process is gone for 60 s (wall) and a new one loads the file
    clock2 = FakeClock(5.0)
    wall.advance(60.0)
    restored = new_store()
    disk2 = StatePersistence(db, wall)
    disk2.open()
    disk2.load(restored, clock2())
    restored.tick(clock2())
    # Then keys and versions are back, except the key whose ttl passed meanwhile
    after = {k: (r.value, r.version) for k, r in restored.keys.records.items()}
    assert after == {k: v for k, v in before.items() if k != "short"}
    assert restored.keys.version == store.keys.version + 1  # the expiry is a new version
    long_left = restored.keys.records["long"].expires_at
    assert long_left is not None and long_left == pytest.approx(clock2() + 940.0)
    # And the lease is held by a placeholder session that only HELLO adopts
    assert restored.handle(b"holder", StateGet(7, "k0"), clock2()).code == "no_session"  # type: ignore[union-attr]
    assert hello(restored, b"holder", clock2()).leases == [("L", 2, 30.0)]
    # And the next grant of the lock continues the fencing counter
    restored.handle(b"holder", LockRelease(8, "L", 2), clock2())
    assert acquire(restored, b"holder", 9, clock2(), name="L").token == 3
    disk2.close()


def test_a_restored_lease_whose_holder_never_returns_expires(tmp_path: Path) -> None:
    clock = FakeClock()
    store = new_store()
    disk = StatePersistence(tmp_path / "state.db")
    disk.open()
    disk.load(store, clock())
    hello(store, b"gone", clock())
    acquire(store, b"gone", 1, clock(), ttl_s=60.0)
    disk.commit(store, clock())
    disk.close()
    restored = new_store()
    disk2 = StatePersistence(tmp_path / "state.db")
    disk2.open()
    disk2.load(restored, clock())
    hello(restored, b"other", clock())
    assert acquire(restored, b"other", 2, clock(), wait_s=None) is None
    for _ in range(LIVENESS * 2 + 1):
        clock.advance(INTERVAL_S / 2)
        restored.handle(b"other", StatePing(), clock())
        restored.expire_sessions(clock())
    [(who, lease)] = restored.take_outgoing()
    assert who == b"other" and isinstance(lease, LeaseGranted) and lease.token == 2
    disk2.close()


def test_state_config_derives_its_port_from_the_broker() -> None:
    assert state_bind_for("127.0.0.1:5555") == "127.0.0.1:5558"
    assert state_bind_for("0.0.0.0:0") == "0.0.0.0:0"
    assert StateConfig(heartbeat_interval_s=0.5, heartbeat_liveness=4).session_expiry_s == 2.0
