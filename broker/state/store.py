"""The state service's logic: one request in, one reply out, plus what it caused.

:class:`StateStore` owns the key space, the locks and the sessions. It knows the protocol
messages but no sockets and no clock: every call gets ``now`` from the caller's injected
clock. What a request causes for *other* sessions (a lock handed to a waiter, a wait that
timed out, changes for watchers) is queued and collected with :meth:`take_outgoing`.
The socket loop (``broker/state/server.py``) only moves frames, commits to disk, and
sends; tests drive this class directly with a fake clock.
"""

from __future__ import annotations

import logging
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any, Callable

from broker.errors import StateRequestError, VersionConflict
from broker.heartbeat import Liveness
from wire.limits import PROTOCOL_VERSION
from wire.state import (
    Entry, LeaseGranted, LockAcquire, LockInfo, LockList, LockRelease, LockRenew,
    LockTable as LockTableReply, MAX_EVENTS_BYTES, MAX_EVENTS_PER_MESSAGE, MAX_LIST_BYTES,
    StateDelete, StateDone, StateErrorCode, StateErrorReply, StateEvents, StateGet, StateHello,
    StateInfo, StateInfoRequest, StateItems, StateList, StateMessage, StatePing, StatePut,
    StateUnwatch, StateValue, StateWatch, StateWelcome,
)
from broker.state.access import ANONYMOUS, AccessRules, Coverage, FULL_ACCESS_ROLES, Op, Peer
from broker.state.keyspace import KeySpace
from broker.state.locks import Lease, LockTable, Waiter
from broker.state.sessions import Session, SessionState, SessionTable

logger = logging.getLogger(__name__)

#: Keys whose values the store mirrors in :attr:`StateStore.usage`: the agents' LLM token
#: usage (``agent_sdk.llm`` writes ``llm/usage/<agent name>/<agent id>``), which the
#: broker's ``/metrics`` reports.
USAGE_PREFIX = "llm/usage/"

#: Replies and pushes, each addressed to a routing id.
Outgoing = list[tuple[bytes, StateMessage]]

_PING = StatePing()


def _event_batches(changes: list[Entry]) -> Iterator[list[Entry]]:
    """``changes`` cut into EVENTS-sized lists: at most MAX_EVENTS_PER_MESSAGE changes
    and about MAX_EVENTS_BYTES of values each (a frame over the peer's limit would make
    it drop the connection)."""
    if len(changes) <= MAX_EVENTS_PER_MESSAGE and sum(
            len(c.value) for c in changes if c.value is not None) <= MAX_EVENTS_BYTES:
        yield changes
        return
    batch: list[Entry] = []
    size = 0
    for change in changes:
        weight = len(change.key) + (0 if change.value is None else len(change.value))
        if batch and (len(batch) >= MAX_EVENTS_PER_MESSAGE or size + weight > MAX_EVENTS_BYTES):
            yield batch
            batch, size = [], 0
        batch.append(change)
        size += weight
    yield batch


class StateStore:
    """Keys, locks, sessions and watches of one state service.

    Args:
        liveness: the heartbeat interval and liveness sessions are held to.
        changelog_size: recent changes kept for exact replays to returning watchers.
        instance: an id of this run of the service (changes on every restart).
    """

    def __init__(self, liveness: Liveness, changelog_size: int = 65_536,
                 instance: str | None = None) -> None:
        self.liveness = liveness
        self.keys = KeySpace(changelog_size)
        self.locks = LockTable()
        self.sessions = SessionTable(liveness)
        self.instance = instance or uuid.uuid4().hex[:16]
        #: requests served, by message type
        self.counters: Counter[str] = Counter()
        #: sessions opened and expired, leases and keys expired
        self.lifecycle: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self._events: dict[tuple[bytes, int], list[Entry]] = {}
        self._resync: set[tuple[bytes, int]] = set()
        #: key -> value (msgpack bytes) of every key under USAGE_PREFIX, kept by every
        #: change so that the metrics thread reads these few keys without walking the
        #: key space (whose sorted index only the loop may build); that thread copies it
        #: with ``dict()``, one C call under the GIL
        self.usage: dict[str, bytes] = {}
        #: a hook adding the server's own fields (endpoint, disk) to INFO replies
        self.extra_info: Callable[[], dict[str, Any]] = dict
        #: the key prefix rules of a secure service (None: plaintext, nothing checked)
        self.access: AccessRules | None = None

    # ------------------------------------------------------------------ requests

    def handle(self, identity: bytes, msg: StateMessage, now: float,
               peer: Peer = ANONYMOUS) -> StateMessage | None:
        """Serve one request from ``identity`` (sent with ``peer``'s key and role on a
        secure service); returns its reply (None: the reply comes later, as for a lock
        that is waited for)."""
        if type(msg) is StateHello:
            return self._hello(identity, msg, now, peer)
        req = getattr(msg, "req", None)
        session = self._session_of(identity, peer, req)
        if isinstance(session, StateErrorReply):
            return session
        access = self.access
        session.last_seen = now
        self.counters[type(msg).__name__] += 1
        try:
            coverage = Coverage.ALL if access is None else access.check_request(peer.role, msg)
            match msg:
                case StateGet(req, key):
                    record = self.keys.get(key)
                    if record is None:
                        return StateValue(req, key, 0, None)
                    return StateValue(req, key, record.version, record.value)
                case StatePut():
                    return self._put(identity, msg, now)
                case StatePing():
                    return _PING
                case StateDelete():
                    return self._delete(identity, msg, now)
                case StateList(req, prefix, after, limit, values):
                    items, more = self.keys.list(prefix, after, limit, MAX_LIST_BYTES, values,
                                                 self._readable(peer.role, coverage))
                    return StateItems(req, self.keys.version, items, more)
                case LockAcquire(req, name, ttl_s, wait_s):
                    lease = self.locks.acquire(identity, session.name, req, name, ttl_s, wait_s,
                                               now)
                    return None if lease is None else LeaseGranted(req, name, lease.token, ttl_s)
                case LockRenew(req, name, token, ttl_s):
                    lease = self.locks.renew(identity, name, token, ttl_s, now)
                    return LeaseGranted(req, name, lease.token, lease.ttl_s)
                case LockRelease(req, name, token):
                    self.locks.release(identity, name, token, now)
                    return StateDone(req)
                case StateWatch():
                    return self._watch(session, msg, self._readable(peer.role, coverage))
                case StateUnwatch(req, watch):
                    existed = self.sessions.remove_watch(session, watch)
                    self._events.pop((identity, watch), None)
                    return StateDone(req, self.keys.version, existed)
                case LockList(req, prefix):
                    return LockTableReply(req, self.lock_table(
                        prefix, now, identity, None if access is None else peer.role))
                case StateInfoRequest(req):
                    return StateInfo(req, self.info())
        except VersionConflict as e:
            self.errors[e.code] += 1
            return StateErrorReply(e.code, str(e), req, e.current, e.value)
        except StateRequestError as e:
            return self.error(e.code, str(e), req)
        return self.error(StateErrorCode.UNKNOWN_COMMAND,
                          f"{type(msg).__name__} is not a request the state service accepts", req)

    def _session_of(self, identity: bytes, peer: Peer, req: int | None
                    ) -> Session | StateErrorReply:
        """The active session of ``identity`` if ``peer`` may use it, else the refusal."""
        session = self.sessions.get(identity)
        if session is None or session.state is not SessionState.ACTIVE:
            # Not a session we serve: the client must say HELLO first (and then set its
            # watches up again); it resends the request after that, so nothing is lost.
            return self.error(StateErrorCode.NO_SESSION,
                              "no session for this connection (new, expired, or the service "
                              "restarted): send HELLO", req)
        if self.access is not None and session.key != peer.key:
            # ROUTER_HANDOVER lets any connection take a routing id over: without this, a
            # key that learnt a session id would act as that session (and its leases).
            return self.error(StateErrorCode.UNAUTHORIZED,
                              "this session belongs to another key: open a session of your "
                              "own (HELLO under another routing id)", req)
        return session

    def error(self, code: str | StateErrorCode, message: str, req: int | None = None
              ) -> StateErrorReply:
        """An ERROR reply, counted under its code."""
        code = code.value if isinstance(code, StateErrorCode) else code
        self.errors[code] += 1
        return StateErrorReply(code, message, req)

    def _readable(self, role: str, coverage: Coverage) -> Callable[[str], bool] | None:
        """What a listing or watch of ``role`` may show (None: everything)."""
        access = self.access
        if access is None or coverage is Coverage.ALL:
            return None
        return lambda key: access.allows(role, Op.READ, key)

    def _hello(self, identity: bytes, msg: StateHello, now: float, peer: Peer
               ) -> StateWelcome | StateErrorReply:
        previous = self.sessions.get(identity)
        if (self.access is not None and previous is not None and previous.key
                and previous.key != peer.key):
            # The routing id's session (and its leases) belong to another key. A session
            # restored from disk has no key yet: its first HELLO claims it.
            return self.error(StateErrorCode.UNAUTHORIZED,
                              "this session id belongs to another key: choose another",
                              msg.req)
        session = self.sessions.open(identity, msg.name or (previous.name if previous else ""),
                                     now)
        session.key, session.role = peer
        if previous is not None:
            for watch in previous.watches:
                self._events.pop((identity, watch), None)
        self.lifecycle["sessions_opened"] += 1
        held = [(lease.name, lease.token, lease.ttl_s) for lease in self.locks.held_by(identity)]
        if held:
            for name, _, _ in held:
                self.locks.leases[name].holder = session.name
            logger.info("session %s (%s) resumed %d lease(s)", session.label, session.name,
                        len(held))
        return StateWelcome(msg.req, self.liveness.interval_s, self.liveness.liveness,
                            self.keys.version, self.instance, held)

    def _put(self, identity: bytes, msg: StatePut, now: float) -> StateDone:
        if msg.fence is not None:
            self.locks.check_fence(msg.fence[0], msg.fence[1], now, identity)
        self.keys.check(msg.key, msg.expected)
        change = self.keys.put(msg.key, msg.value, now, msg.ttl_s)
        self._notify(change)
        return StateDone(msg.req, change.version)

    def _delete(self, identity: bytes, msg: StateDelete, now: float) -> StateDone:
        if msg.fence is not None:
            self.locks.check_fence(msg.fence[0], msg.fence[1], now, identity)
        self.keys.check(msg.key, msg.expected)
        change = self.keys.delete(msg.key)
        if change is None:
            return StateDone(msg.req, 0, False)
        self._notify(change)
        return StateDone(msg.req, change.version, True)

    def _watch(self, session: Session, msg: StateWatch,
               readable: Callable[[str], bool] | None) -> StateDone:
        self.sessions.add_watch(session, msg.req, msg.prefix)
        if msg.since is not None:
            replay, exact = self.keys.replay(msg.prefix, msg.since)
            if readable is not None:
                replay = [change for change in replay if readable(change.key)]
            if replay:
                self._events.setdefault((session.identity, msg.req), []).extend(replay)
            if not exact:
                self._resync.add((session.identity, msg.req))
        return StateDone(msg.req, self.keys.version)

    def _notify(self, change: Entry) -> None:
        """Queue ``change`` for every watch whose prefix covers its key."""
        if change.key.startswith(USAGE_PREFIX):
            self._mirror_usage(change)
        events = self._events
        access = self.access
        for target in self.sessions.watchers_of(change.key):
            if access is not None and not self._may_see(target[0], change.key):
                continue
            queue = events.get(target)
            if queue is None:
                events[target] = [change]
            else:
                queue.append(change)

    def _may_see(self, identity: bytes, key: str) -> bool:
        """Whether the watcher ``identity`` may read ``key`` (secure service only)."""
        session = self.sessions.get(identity)
        assert self.access is not None
        return session is not None and self.access.allows(session.role, Op.READ, key)

    def _mirror_usage(self, change: Entry) -> None:
        if change.value is None:
            self.usage.pop(change.key, None)
        else:
            self.usage[change.key] = change.value

    def mirror_loaded_usage(self) -> None:
        """Fill :attr:`usage` from the key space (after a load from disk)."""
        records = self.keys.records
        self.usage = {key: records[key].value for key in records
                      if key.startswith(USAGE_PREFIX)}

    # ------------------------------------------------------------------ time

    def tick(self, now: float) -> None:
        """Expire what is due by now: leases, waits, keys with a ttl (cheap: heap tops)."""
        expired = self.locks.expire(now)
        if expired:
            self.lifecycle["leases_expired"] += expired
        for change in self.keys.expire(now):
            self.lifecycle["keys_expired"] += 1
            self._notify(change)

    def expire_sessions(self, now: float) -> None:
        """End sessions silent past the expiry: their leases go (to the next waiters),
        their waits and watches are dropped. Looks at every session, so the loop calls
        it on its regular tick rather than on every pass."""
        for session in self.sessions.expired(now):
            released = self.locks.release_session(session.identity, now)
            for watch in session.watches:
                self._events.pop((session.identity, watch), None)
            self.lifecycle["sessions_expired"] += 1
            logger.info("session %s (%s) expired after %.2f s of silence; %d lease(s) released",
                        session.label, session.name, now - session.last_seen, released)

    def next_deadline(self) -> float | None:
        """The earliest lease expiry, wait deadline or key expiry (sessions are checked
        on the loop's regular tick instead)."""
        deadlines = [d for d in (self.locks.next_deadline(), self.keys.next_deadline())
                     if d is not None]
        return min(deadlines) if deadlines else None

    # ------------------------------------------------------------------ output

    def take_outgoing(self) -> Outgoing:
        """Messages for other sessions caused since the last call: granted leases, failed
        waits, and watch events (one EVENTS message per watch and batch)."""
        out: Outgoing = []
        events = self.locks.take_events()
        if events is not None:
            for waiter, lease in events.granted:
                out.append((waiter.session, LeaseGranted(waiter.req, lease.name, lease.token,
                                                         lease.ttl_s)))
            for waiter in events.timed_out:
                out.append((waiter.session, self._lock_timeout(waiter)))
        if self._events:
            pending, self._events = self._events, {}
            resync, self._resync = self._resync, set()
            for (identity, watch), changes in pending.items():
                first = (identity, watch) in resync
                for part in _event_batches(changes):
                    out.append((identity, StateEvents(watch, part, first)))
                    first = False
        return out

    def _lock_timeout(self, waiter: Waiter) -> StateErrorReply:
        return self.error(StateErrorCode.LOCK_TIMEOUT,
                          f"lock {waiter.name!r} stayed held for {waiter.deadline - waiter.since:g} s"
                          if waiter.deadline is not None else f"lock {waiter.name!r} timed out",
                          waiter.req)

    # ------------------------------------------------------------------ views

    def lock_table(self, prefix: str, now: float, viewer: bytes | None = None,
                   role: str | None = None) -> list[LockInfo]:
        """Held locks under ``prefix``, by name.

        Args:
            viewer: the asking session.
            role: its role on a secure service (None: plaintext, everything shown). It
                sees only the locks whose names it may read, and the token and session
                id only of its own leases, unless it has full access: a token is the
                holder's, and a session id is what a hijacker would need.
        """
        access = self.access
        hide = role is not None and role not in FULL_ACCESS_ROLES
        rows = []
        for name in sorted(self.locks.leases):
            if not name.startswith(prefix):
                continue
            if role is not None and access is not None and not access.allows(role, Op.READ, name):
                continue
            lease: Lease = self.locks.leases[name]
            own = not hide or lease.session == viewer
            rows.append(LockInfo(name, lease.token if own else None, lease.holder,
                                 lease.session.decode("utf-8", "backslashreplace") if own else "",
                                 round(max(0.0, lease.expires_at - now), 3),
                                 self.locks.waiting(name)))
        return rows

    def info(self) -> dict[str, Any]:
        """Counters for INFO and logs."""
        return {
            "protocol": PROTOCOL_VERSION, "instance": self.instance,
            "keys": len(self.keys), "version": self.keys.version,
            "sessions": len(self.sessions), "watches": self.sessions.watch_count,
            "locks_held": len(self.locks.leases),
            "requests": dict(self.counters), "lifecycle": dict(self.lifecycle),
            "errors": dict(self.errors),
            **self.extra_info(),
        }

    # ------------------------------------------------------------------ restore

    def restore_leases(self, leases: list[tuple[str, bytes, str, int, float]],
                       fences: dict[str, int], now: float) -> None:
        """Leases and fencing counters from disk: every holder gets a placeholder
        session, which its HELLO adopts, or which expires like any silent session."""
        self.locks.load(fences, leases, now)
        for _, session, holder, _, _ in leases:
            self.sessions.restore(session, holder, now)
