"""Client sessions and their watches (no sockets, no I/O).

A session is a client connection's routing id. It opens with HELLO, stays alive while
the client sends anything (idle clients send PING every interval), and expires after
``interval x liveness`` of silence: its leases are released and its watches dropped.
Sessions are not persisted; after a restart, only the holders of restored leases get a
placeholder session (state ``RESTORED``) that their next HELLO adopts.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass, field

from broker.heartbeat import Liveness


class SessionState(enum.Enum):
    """Where a session stands."""

    #: said HELLO; every request is served
    ACTIVE = "active"
    #: restored from disk because it held a lease; only HELLO is accepted until then
    RESTORED = "restored"


@dataclass(slots=True)
class Session:
    """One client connection of the state service."""

    identity: bytes
    name: str
    state: SessionState
    #: clock readings of the last frame received from, and sent to, the client
    last_seen: float
    last_sent: float = 0.0
    #: watch id (the req of its WATCH) -> key prefix
    watches: dict[int, str] = field(default_factory=dict)
    #: on a secure service, the CURVE key that said HELLO (every later request of the
    #: routing id must come from it) and its role; "" in plaintext and for a session
    #: restored from disk until its HELLO
    key: str = ""
    role: str = ""

    @property
    def label(self) -> str:
        """The routing id as text, for listings."""
        return self.identity.decode("utf-8", "backslashreplace")


class SessionTable:
    """Sessions by routing id, with the index of watches by key prefix."""

    def __init__(self, liveness: Liveness) -> None:
        self.liveness = liveness
        self._sessions: dict[bytes, Session] = {}
        #: prefix -> watchers as (routing id, watch id)
        self._watch_index: dict[str, set[tuple[bytes, int]]] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self._sessions.values()))

    def get(self, identity: bytes) -> Session | None:
        return self._sessions.get(identity)

    def open(self, identity: bytes, name: str, now: float) -> Session:
        """HELLO: a fresh active session (an earlier one of the same routing id, which the
        client gave up on, loses its watches but keeps its leases for the new one)."""
        previous = self._sessions.get(identity)
        if previous is not None:
            self._drop_watches(previous)
        session = Session(identity, name, SessionState.ACTIVE, now)
        self._sessions[identity] = session
        return session

    def restore(self, identity: bytes, name: str, now: float) -> None:
        """A placeholder for the holder of a lease restored from disk."""
        if identity not in self._sessions:
            self._sessions[identity] = Session(identity, name, SessionState.RESTORED, now)

    def expired(self, now: float) -> list[Session]:
        """Remove and return every session silent past the expiry."""
        is_dead = self.liveness.is_dead
        dead = [s for s in self._sessions.values() if is_dead(s, now)]
        for session in dead:
            self._drop_watches(session)
            del self._sessions[session.identity]
        return dead

    # ------------------------------------------------------------------ watches

    def add_watch(self, session: Session, watch: int, prefix: str) -> None:
        self.remove_watch(session, watch)
        session.watches[watch] = prefix
        self._watch_index.setdefault(prefix, set()).add((session.identity, watch))

    def remove_watch(self, session: Session, watch: int) -> bool:
        prefix = session.watches.pop(watch, None)
        if prefix is None:
            return False
        watchers = self._watch_index[prefix]
        watchers.discard((session.identity, watch))
        if not watchers:
            del self._watch_index[prefix]
        return True

    def watchers_of(self, key: str) -> Iterator[tuple[bytes, int]]:
        """Every (routing id, watch id) whose prefix ``key`` starts with."""
        for prefix, watchers in self._watch_index.items():
            if key.startswith(prefix):
                yield from watchers

    @property
    def watch_count(self) -> int:
        return sum(len(w) for w in self._watch_index.values())

    def _drop_watches(self, session: Session) -> None:
        # Only the index forgets them: the caller still reads ``session.watches`` to drop
        # their queued events, and the session object itself is discarded.
        for watch, prefix in session.watches.items():
            watchers = self._watch_index.get(prefix)
            if watchers is not None:
                watchers.discard((session.identity, watch))
                if not watchers:
                    del self._watch_index[prefix]
