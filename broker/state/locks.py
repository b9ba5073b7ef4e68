"""Lock leases with fencing tokens (no sockets, no I/O).

A lease is granted to a session for ``ttl_s`` seconds and must be renewed before then.
Every grant of a lock name takes the next fencing token of that name, and the counters
are persisted, so a token is never issued twice, not even across restarts: whoever
stores data guarded by a token can refuse an older one. A lock held by nobody keeps its
counter.

Waiters queue per lock, first come first served; a released or expired lease goes to the
first waiter at once, in the same pass of the loop.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from dataclasses import dataclass, field

from broker.errors import NotHeld, StaleToken, StateRequestError


@dataclass(slots=True)
class Lease:
    """A held lock."""

    name: str
    token: int
    #: routing id of the holding session, and its name for listings
    session: bytes
    holder: str
    ttl_s: float
    expires_at: float


@dataclass(slots=True, eq=False)
class Waiter:
    """An ACQUIRE waiting for its lock."""

    session: bytes
    holder: str
    req: int
    name: str
    ttl_s: float
    #: clock reading at which the wait fails with ``lock_timeout``; None: no limit
    deadline: float | None
    since: float
    active: bool = True


@dataclass(slots=True)
class LockEvents:
    """What happened to waiters since the last :meth:`LockTable.take_events`."""

    granted: list[tuple[Waiter, Lease]] = field(default_factory=list)
    timed_out: list[Waiter] = field(default_factory=list)


class LockTable:
    """Every held lock, its waiters, and the fencing counters."""

    def __init__(self) -> None:
        self.leases: dict[str, Lease] = {}
        #: last token issued per lock name
        self.fences: dict[str, int] = {}
        self._waiters: dict[str, deque[Waiter]] = {}
        self._by_session: dict[bytes, set[str]] = {}
        self._timers: list[tuple[float, int, str | Waiter]] = []
        self._sequence = itertools.count()
        self._events = LockEvents()
        self._dirty_leases: set[str] = set()
        self._dirty_fences: set[str] = set()
        #: ACQUIREs that found the lock taken and queued (a plain count, for /metrics)
        self.waits = 0

    # ------------------------------------------------------------------ requests

    def acquire(self, session: bytes, holder: str, req: int, name: str, ttl_s: float,
                wait_s: float | None, now: float) -> Lease | None:
        """Grant ``name`` now (returns the lease) or queue the request (returns None; the
        grant or the timeout comes out of :meth:`take_events`).

        Raises:
            StateRequestError: ``lock_timeout`` when the lock is taken and ``wait_s`` is 0.
        """
        if name not in self.leases and not self._waiters.get(name):
            return self._grant(name, session, holder, ttl_s, now)
        if wait_s is not None and wait_s <= 0:
            raise StateRequestError(f"lock {name!r} is held by {self._holder_of(name)}",
                                    "lock_timeout")
        self.waits += 1
        waiter = Waiter(session, holder, req, name, ttl_s,
                        None if wait_s is None else now + wait_s, now)
        self._waiters.setdefault(name, deque()).append(waiter)
        if waiter.deadline is not None:
            self._push_timer(waiter.deadline, waiter)
        return None

    def renew(self, session: bytes, name: str, token: int, ttl_s: float | None,
              now: float) -> Lease:
        """Extend a held lease to ``ttl_s`` (default: its own ttl) from now.

        Raises:
            NotHeld: this session does not hold ``name`` under ``token``.
        """
        lease = self._held(session, name, token, now)
        if ttl_s is not None:
            lease.ttl_s = ttl_s
        lease.expires_at = now + lease.ttl_s
        self._push_timer(lease.expires_at, name)
        return lease

    def release(self, session: bytes, name: str, token: int, now: float) -> None:
        """Give a lease back; the next waiter gets the lock.

        Raises:
            NotHeld: this session does not hold ``name`` under ``token``.
        """
        self._held(session, name, token, now)
        self._end_lease(name, now)

    def check_fence(self, name: str, token: int, now: float, session: bytes | None = None
                    ) -> None:
        """Pass only if ``token`` is the current, unexpired lease of ``name``, held by
        ``session`` (None: by anyone, for callers outside a session).

        A token alone is no proof of holding the lease: listings show tokens, and a
        process that read one must not write as the holder.

        Raises:
            StaleToken: the token is not the current lease's.
            StateRequestError: ``stale_token`` too, when the token is current but another
                session holds the lease.
        """
        lease = self.leases.get(name)
        if lease is None or lease.token != token or lease.expires_at <= now:
            current = lease.token if lease is not None and lease.expires_at > now else None
            raise StaleToken(name, token, current)
        if session is not None and lease.session != session:
            raise StateRequestError(f"fencing token {token} of lock {name!r} belongs to the "
                                    f"session of {lease.holder!r}: only the holder of a lease "
                                    "may write with its token", "stale_token")

    def release_session(self, session: bytes, now: float) -> int:
        """Release every lease of ``session`` and drop its waiters (it expired); returns
        how many leases it held."""
        names = self._by_session.pop(session, set())
        for name in sorted(names):
            self._end_lease(name, now)
        for name, queue in list(self._waiters.items()):
            for waiter in queue:
                if waiter.session == session:
                    waiter.active = False
            self._compact(name)
        return len(names)

    def held_by(self, session: bytes) -> list[Lease]:
        return [self.leases[name] for name in sorted(self._by_session.get(session, ()))]

    def waiting(self, name: str) -> int:
        return sum(1 for w in self._waiters.get(name, ()) if w.active)

    def waiting_sessions(self) -> int:
        """Distinct sessions with an ACQUIRE waiting now. Safe from another thread (the
        metrics scrape): it only copies (``list`` of a dict's values or of a deque is one
        C call under the GIL) and reads ``active`` flags."""
        return len({waiter.session for queue in list(self._waiters.values())
                    for waiter in list(queue) if waiter.active})

    # ------------------------------------------------------------------ time

    def next_deadline(self) -> float | None:
        return self._timers[0][0] if self._timers else None

    def expire(self, now: float) -> int:
        """End leases past their expiry and fail waits past their deadline; returns how
        many leases expired."""
        timers = self._timers
        expired = 0
        while timers and timers[0][0] <= now:
            _, _, target = heapq.heappop(timers)
            if isinstance(target, Waiter):
                if target.active:
                    target.active = False
                    self._events.timed_out.append(target)
                    self._compact(target.name)
                continue
            lease = self.leases.get(target)
            # A renewal pushes a new timer and leaves the old one in the heap: only the
            # lease's current expiry counts.
            if lease is not None and lease.expires_at <= now:
                expired += 1
                self._end_lease(target, now)
        return expired

    def take_events(self) -> LockEvents | None:
        """Grants and timed-out waits since the last call (None: nothing happened, the
        common case on every pass of the loop)."""
        events = self._events
        if not events.granted and not events.timed_out:
            return None
        self._events = LockEvents()
        return events

    # ------------------------------------------------------------------ persistence

    def take_dirty(self) -> tuple[set[str], set[str]]:
        """Lock names whose lease, and whose fencing counter, changed since the last call."""
        leases, fences = self._dirty_leases, self._dirty_fences
        self._dirty_leases, self._dirty_fences = set(), set()
        return leases, fences

    def load(self, fences: dict[str, int], leases: list[tuple[str, bytes, str, int, float]],
             now: float) -> None:
        """Restore counters and leases after a restart. A restored lease runs its whole
        ttl again from ``now``: the holder may still be working, and a lease that lasts
        longer is safe where a shorter one is not."""
        self.fences.update(fences)
        for name, session, holder, token, ttl_s in leases:
            self.fences[name] = max(self.fences.get(name, 0), token)
            self._install(Lease(name, token, session, holder, ttl_s, now + ttl_s))

    # ------------------------------------------------------------------ internals

    def _holder_of(self, name: str) -> str:
        lease = self.leases.get(name)
        return "another session" if lease is None else repr(lease.holder)

    def _held(self, session: bytes, name: str, token: int, now: float) -> Lease:
        lease = self.leases.get(name)
        if (lease is None or lease.session != session or lease.token != token
                or lease.expires_at <= now):
            raise NotHeld(name, token)
        return lease

    def _grant(self, name: str, session: bytes, holder: str, ttl_s: float, now: float) -> Lease:
        token = self.fences.get(name, 0) + 1
        self.fences[name] = token
        self._dirty_fences.add(name)
        lease = Lease(name, token, session, holder, ttl_s, now + ttl_s)
        self._install(lease)
        return lease

    def _install(self, lease: Lease) -> None:
        self.leases[lease.name] = lease
        self._by_session.setdefault(lease.session, set()).add(lease.name)
        self._dirty_leases.add(lease.name)
        self._push_timer(lease.expires_at, lease.name)

    def _end_lease(self, name: str, now: float) -> None:
        lease = self.leases.pop(name, None)
        if lease is not None:
            names = self._by_session.get(lease.session)
            if names is not None:
                names.discard(name)
                if not names:
                    del self._by_session[lease.session]
            self._dirty_leases.add(name)
        queue = self._waiters.get(name)
        while queue:
            waiter = queue.popleft()
            if waiter.active:
                waiter.active = False
                granted = self._grant(name, waiter.session, waiter.holder, waiter.ttl_s, now)
                self._events.granted.append((waiter, granted))
                break
        self._compact(name)

    def _compact(self, name: str) -> None:
        queue = self._waiters.get(name)
        if queue is None:
            return
        while queue and not queue[0].active:
            queue.popleft()
        if not queue:
            del self._waiters[name]

    def _push_timer(self, when: float, target: str | Waiter) -> None:
        heapq.heappush(self._timers, (when, next(self._sequence), target))
