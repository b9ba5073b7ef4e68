"""Versioned keys: the single-writer key space of the state service (no sockets, no I/O).

Every write gets the next number of one service-wide sequence, and that number is the
key's version (zguide's Clone pattern). So a key's version increases on each of its
writes, no two writes share a version, and a key deleted and created again never comes
back at a version it had before: compare-and-set cannot be fooled by a delete and a
re-create in between (the ABA problem), with no tombstones kept.

Expiry is computed from the clock readings the caller passes in (``now``), so tests drive
it with a fake clock.
"""

from __future__ import annotations

import bisect
import builtins  # KeySpace.list hides the builtin inside the class
import heapq
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from broker.errors import VersionConflict
from wire.state import Entry


@dataclass(slots=True)
class Record:
    """A key's current value (msgpack bytes, never decoded here) and version."""

    value: bytes
    version: int
    #: clock reading at which the key is deleted; None: it is permanent
    expires_at: float | None = None


class KeySpace:
    """All keys, their versions, their expiry, and a log of recent changes.

    Args:
        changelog_size: how many recent changes are kept for exact replays to watchers
            that come back after a reconnect.
    """

    def __init__(self, changelog_size: int) -> None:
        self.records: dict[str, Record] = {}
        #: the last version issued (0: nothing was ever written)
        self.version = 0
        #: keys changed since :meth:`take_dirty` (for the persistence layer)
        self._dirty: set[str] = set()
        self._log: deque[Entry] = deque(maxlen=changelog_size)
        self._expiries: list[tuple[float, int, str]] = []
        self._sorted: list[str] | None = None

    def __len__(self) -> int:
        return len(self.records)

    # -------------------------------------------------------------- reading

    def get(self, key: str) -> Record | None:
        return self.records.get(key)

    def list(self, prefix: str, after: str | None, limit: int, max_bytes: int,
             values: bool, readable: Callable[[str], bool] | None = None
             ) -> tuple[list[Entry], bool]:
        """Keys under ``prefix`` after ``after``, in key order: at most ``limit`` of them
        and about ``max_bytes`` of values. Returns the entries and whether more remain.

        ``readable`` leaves keys out (the access rules of a secure service); they do not
        count towards ``limit``, so a page is never empty while more keys remain (the
        client stops at an empty page)."""
        keys = self._sorted_keys()
        start = bisect.bisect_left(keys, prefix)
        if after is not None and after >= prefix:
            start = max(start, bisect.bisect_right(keys, after))
        items: list[Entry] = []
        size = 0
        records = self.records
        for index in range(start, len(keys)):
            key = keys[index]
            if not key.startswith(prefix):
                return items, False
            if len(items) >= limit or size > max_bytes:
                return items, True
            if readable is not None and not readable(key):
                continue
            record = records[key]
            items.append(Entry(key, record.version, record.value if values else None))
            size += len(record.value) if values else 0
        return items, False

    def _sorted_keys(self) -> builtins.list[str]:
        # Sorted lazily: writes of new keys are far more frequent than listings.
        if self._sorted is None:
            self._sorted = sorted(self.records)
        return self._sorted

    # -------------------------------------------------------------- writing

    def check(self, key: str, expected: int | None) -> Record | None:
        """The key's record, after checking it is at version ``expected`` (0: absent).

        Raises:
            VersionConflict: the key is at another version.
        """
        record = self.records.get(key)
        if expected is not None:
            current = 0 if record is None else record.version
            if current != expected:
                raise VersionConflict(key, expected, current,
                                      None if record is None else record.value)
        return record

    def put(self, key: str, value: bytes, now: float, ttl_s: float | None = None) -> Entry:
        """Write ``key`` (a write without ``ttl_s`` makes it permanent); returns the
        change."""
        self.version += 1
        version = self.version
        record = self.records.get(key)
        expires_at = None if ttl_s is None else now + ttl_s
        if record is None:
            self.records[key] = Record(value, version, expires_at)
            self._sorted = None
        else:
            record.value = value
            record.version = version
            record.expires_at = expires_at
        if expires_at is not None:
            heapq.heappush(self._expiries, (expires_at, version, key))
        return self._changed(Entry(key, version, value))

    def delete(self, key: str) -> Entry | None:
        """Delete ``key``; returns the change (None when there was no such key)."""
        if self.records.pop(key, None) is None:
            return None
        self._sorted = None
        self.version += 1
        return self._changed(Entry(key, self.version, None))

    def _changed(self, change: Entry) -> Entry:
        self._log.append(change)
        self._dirty.add(change.key)
        return change

    # -------------------------------------------------------------- expiry

    def next_deadline(self) -> float | None:
        return self._expiries[0][0] if self._expiries else None

    def expire(self, now: float) -> builtins.list[Entry]:
        """Delete every key whose ttl has passed; returns the deletions."""
        expiries = self._expiries
        deleted = []
        while expiries and expiries[0][0] <= now:
            _, version, key = heapq.heappop(expiries)
            record = self.records.get(key)
            # The heap keeps an entry per ttl write; only the key's latest write counts.
            if record is not None and record.version == version:
                change = self.delete(key)
                if change is not None:
                    deleted.append(change)
        return deleted

    # -------------------------------------------------------------- watchers

    def replay(self, prefix: str, since: int) -> tuple[builtins.list[Entry], bool]:
        """Changes under ``prefix`` after version ``since``, in version order.

        Returns the changes and whether they are exact. When ``since`` is older than the
        change log reaches, they are instead the current keys written after ``since``
        (deletions in between are lost) and the second value is False.
        """
        if since >= self.version:
            return [], True
        log = self._log
        if log and log[0].version <= since + 1:
            return [c for c in log if c.version > since and c.key.startswith(prefix)], True
        current = [Entry(key, record.version, record.value)
                   for key, record in self.records.items()
                   if record.version > since and key.startswith(prefix)]
        current.sort(key=lambda entry: entry.version)
        return current, False

    # -------------------------------------------------------------- persistence

    def take_dirty(self) -> set[str]:
        """Keys changed since the last call (their current record says what to store)."""
        dirty, self._dirty = self._dirty, set()
        return dirty

    def load(self, rows: Iterable[tuple[str, bytes, int, float | None]], version: int) -> None:
        """Fill an empty key space from stored rows ``(key, value, version, expires_at)``
        and the last version issued."""
        for key, value, row_version, expires_at in rows:
            self.records[key] = Record(value, row_version, expires_at)
            if expires_at is not None:
                heapq.heappush(self._expiries, (expires_at, row_version, key))
        self.version = max([version, *(r.version for r in self.records.values())])
        self._sorted = None

    def __iter__(self) -> Iterator[str]:
        return iter(self.records)
