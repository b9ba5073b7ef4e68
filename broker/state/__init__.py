"""The state service: versioned keys, compare-and-set, lock leases with fencing, watches.

- :mod:`broker.state.keyspace`: keys, versions, ttl expiry, the change log.
- :mod:`broker.state.locks`: leases, waiters, fencing counters.
- :mod:`broker.state.sessions`: client sessions and their watches.
- :mod:`broker.state.store`: the request handlers tying them together (no I/O).
- :mod:`broker.state.persistence`: SQLite in WAL mode, one transaction per loop pass.
- :mod:`broker.state.server`: the ROUTER socket loop.

Run it alone with ``python -m broker.state`` or ``orchestrator state serve``; the broker
process runs it in a thread unless told ``--no-state``.
"""

from __future__ import annotations

from broker.state.server import StateServer
from broker.state.store import StateStore

__all__ = ["StateServer", "StateStore"]
