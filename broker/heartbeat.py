"""Liveness rules for peers, as pure functions of a clock reading.

The broker passes ``now`` from its injected clock, so expiry logic is testable by
advancing a fake clock instead of sleeping.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class Peer(Protocol):
    """What liveness needs to know about a peer."""

    #: clock reading of the last frame received from the peer
    last_seen: float
    #: clock reading of the last frame sent to the peer
    last_sent: float


@dataclass(frozen=True, slots=True)
class Liveness:
    """Heartbeat interval and how many intervals of silence mean death."""

    interval_s: float
    liveness: int

    @property
    def expiry_s(self) -> float:
        return self.interval_s * self.liveness

    def is_dead(self, peer: Peer, now: float) -> bool:
        """Any frame refreshes ``last_seen``; a peer silent past the expiry is dead."""
        return now - peer.last_seen > self.expiry_s

    def needs_heartbeat(self, peer: Peer, now: float) -> bool:
        """Heartbeats go only to peers we have not sent anything to for an interval:
        a busy peer already hears from us."""
        return now - peer.last_sent >= self.interval_s
