"""Shared state for agents and clients: versioned keys, compare-and-set, locks, watches.

::

    # inside an agent (the broker told it where the state service is)
    await self.state.set("config/model", {"name": "small"})
    count = await self.state.update("stats/reviews", lambda n: (n or 0) + 1)
    async with self.state.lock("repo/main", ttl=10, wait=5) as lease:
        await self.state.set("repo/main/head", sha, fence=lease)   # refused once stale
    await self.state.watch("jobs/", on_change)

    # from a client: the endpoint comes from the broker's status (or pass it)
    async with Client(url) as client:
        await client.state.get("stats/reviews")

Values are anything msgpack encodes. Every key has a version (the service-wide number of
its last write); :meth:`StateClient.cas` writes only at an expected version and
:meth:`StateClient.update` retries a local function until its write lands, so no update
is lost between processes.

Each :class:`StateClient` has one DEALER connection and one session with the service.
The session stays alive while the client sends (an idle one pings every interval); if
the client goes silent (it died, or its loop is stuck) for ``interval x liveness``, the
service ends the session and releases its locks.

The parts: :mod:`~agent_sdk.state.client` (the calls), :mod:`~agent_sdk.state.session`
(connection, session, heartbeats, reconnects), :mod:`~agent_sdk.state.requests` (the
requests in flight, refusals as exceptions), :mod:`~agent_sdk.state.leases` and
:mod:`~agent_sdk.state.watches`, :mod:`~agent_sdk.state.values`. The blocking
:class:`~agent_sdk.sync.SyncStateClient` is in :mod:`agent_sdk.sync`.
"""

from __future__ import annotations

from wire.limits import DEFAULT_STATE_URL
from agent_sdk.state.client import StateClient
from agent_sdk.state.leases import Lease
from agent_sdk.state.session import REQUEST_TIMEOUT_S
from agent_sdk.state.values import (
    Change, ConnectionState, decode_value, encode_value, endpoint_from, FenceLike, Handler,
    Versioned,
)
from agent_sdk.state.watches import Watch

__all__ = [
    "Change", "ConnectionState", "DEFAULT_STATE_URL", "FenceLike", "Handler", "Lease",
    "REQUEST_TIMEOUT_S", "StateClient", "Versioned", "Watch", "decode_value", "encode_value",
    "endpoint_from",
]
