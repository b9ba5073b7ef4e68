"""Whether a client has reached a broker yet: before it has, a refused connection is an
error at once (:class:`BrokerUnavailable` naming the address), not a silent wait."""

from __future__ import annotations

from collections.abc import Callable

import zmq

from agent_sdk.errors import BrokerUnavailable

#: A wait shorter than this that ends unanswered says nothing of whether a broker is
#: there (a connection and its handshake take a moment): it stays a plain wait timeout.
CONTACT_GRACE_S = 1.0



class Reach:
    """First contact with a broker, as the connection's socket monitor reports it.

    Until a ZMTP handshake with the peer has succeeded once, a connection attempt that
    fails (libzmq schedules a retry: nothing accepts connections there) calls
    ``on_refused`` with the error, and :meth:`check` raises it for every new request,
    until a later attempt succeeds. After the first contact a lost connection is a
    broker restart or a network fault: the client waits and submits again, as before.

    Args:
        url: the broker's address, named in the error.
        on_refused: fails whatever waits (requests, task handles).
    """

    def __init__(self, url: str, on_refused: Callable[[BrokerUnavailable], None]) -> None:
        self.url = url
        self.contacted = False
        self.refused: BrokerUnavailable | None = None
        self._on_refused = on_refused
        #: reads the monitor events already queued (set by the client once connected)
        self.poll: Callable[[], None] | None = None

    def event(self, event: int) -> None:
        """A socket-monitor event of the client's connection."""
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self.contacted = True
            self.refused = None
        elif event == zmq.EVENT_CONNECT_RETRIED and not self.contacted:
            self.refused = BrokerUnavailable(self.url, 0.0, refused=True)
            self._on_refused(self.refused)

    def check(self) -> None:
        """Raise :class:`BrokerUnavailable` if no broker was ever reached and the last
        connection attempt was refused."""
        if self.refused is not None:
            raise BrokerUnavailable(self.url, 0.0, refused=True)

    def timed_out(self, waited_s: float) -> BrokerUnavailable | None:
        """What a wait of ``waited_s`` that ended unanswered means: no broker reached yet
        (:class:`BrokerUnavailable`), or None (a broker was reached: the wait's own
        timeout, or one too short to tell)."""
        if self.poll is not None and not self.contacted:
            self.poll()
        if self.contacted or waited_s < CONTACT_GRACE_S:
            return None
        return BrokerUnavailable(self.url, waited_s)


__all__ = ["Reach"]
