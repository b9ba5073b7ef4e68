"""Whether a client has reached a broker yet: before it has, a refused connection is an
error at once (:class:`BrokerUnavailable` naming the address), not a silent wait."""

from __future__ import annotations

from collections.abc import Callable

import zmq

from agent_sdk.errors import BrokerUnavailable, OrchestratorError, Unauthorized

#: A wait shorter than this that ends unanswered says nothing of whether a broker is
#: there (a connection and its handshake take a moment): it stays a plain wait timeout.
CONTACT_GRACE_S = 1.0



_PLAINTEXT_TO_SECURE = (
    "{url} requires CURVE (the broker runs with --secure; {how}) and we spoke plaintext; "
    "give this process a key: ORCH_CURVE_KEY_FILE (its secret key file) and "
    "ORCH_CURVE_SERVER_KEY_FILE (the broker's keys/broker.key)")


def handshake_refusal(url: str, event: int, value: int,
                      public_key: str | None) -> Unauthorized | None:
    """What a failed handshake with ``url`` means, as an :class:`Unauthorized` whose
    message names the likely cause and the fix (None for other events).

    Args:
        url: the peer's address.
        event: the monitor event.
        value: its value (libzmq's reason, for a protocol failure).
        public_key: this side's CURVE public key; None when it speaks plaintext.
    """
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return Unauthorized(url, "unknown_key", (
            f"the broker at {url} refused our key {public_key} (not in its allow-list); on "
            f"the broker's machine run `orchestrator keys authorize --role client "
            f"-- '{public_key}'` (or --role agent), or use an authorized key (ORCH_CURVE_KEY_FILE)"))
    if event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL and public_key is not None:
        return Unauthorized(url, "wrong_server_key", (
            f"the CURVE handshake with {url} failed: the broker's public key we were given "
            f"(ORCH_CURVE_SERVER_KEY / ORCH_CURVE_SERVER_KEY_FILE) is most likely not this "
            f"broker's; copy keys/broker.key from its data dir"))
    if event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
        # Plaintext against a CURVE server: whichever side reads the other's greeting
        # first sees the mechanism mismatch; when the server does, it closes the
        # connection and this side sees only a failed handshake (measured: about half
        # the time between two processes).
        return Unauthorized(url, "plaintext_to_secure", _PLAINTEXT_TO_SECURE.format(
            url=url, how="it closed the connection during the handshake"))
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        if public_key is None:
            return Unauthorized(url, "plaintext_to_secure", _PLAINTEXT_TO_SECURE.format(
                url=url, how="it refused our plaintext handshake"))
        return Unauthorized(url, "curve_to_plaintext", (
            f"{url} speaks plaintext (the broker runs without --secure) and we spoke "
            f"CURVE; unset ORCH_CURVE_KEY_FILE and ORCH_CURVE_SERVER_KEY(_FILE), or start "
            f"the broker with --secure"))
    return None


class Reach:
    """First contact with a broker, as the connection's socket monitor reports it.

    Until a ZMTP handshake with the peer has succeeded once, a connection attempt that
    fails (libzmq schedules a retry: nothing accepts connections there) calls
    ``on_refused`` with the error, and :meth:`check` raises it for every new request,
    until a later attempt succeeds. After the first contact a lost connection is a
    broker restart or a network fault: the client waits and submits again, as before.

    A failed handshake (a secure broker refusing our key, a key or mechanism mismatch:
    :func:`handshake_refusal`) is an :class:`Unauthorized` error at once, before or after
    the first contact: libzmq does not reconnect after it, so waiting would be forever.

    Args:
        url: the broker's address, named in the error.
        on_refused: fails whatever waits (requests, task handles).

    Attributes:
        public_key: the connection's CURVE public key (None: plaintext), set by the
            client when it opens the connection.
    """

    def __init__(self, url: str, on_refused: Callable[[OrchestratorError], None]) -> None:
        self.url = url
        self.contacted = False
        self.refused: OrchestratorError | None = None
        self.public_key: str | None = None
        self._on_refused = on_refused
        #: reads the monitor events already queued (set by the client once connected)
        self.poll: Callable[[], None] | None = None

    def event(self, event: int, value: int = 0) -> None:
        """A socket-monitor event of the client's connection (and its value)."""
        refusal = handshake_refusal(self.url, event, value, self.public_key)
        if refusal is not None:
            if not isinstance(self.refused, Unauthorized):
                self.refused = refusal
                self._on_refused(refusal)
            return
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self.contacted = True
            self.refused = None
        elif event == zmq.EVENT_CONNECT_RETRIED and not self.contacted and \
                not isinstance(self.refused, Unauthorized):
            self.refused = BrokerUnavailable(self.url, 0.0, refused=True)
            self._on_refused(self.refused)

    def check(self) -> None:
        """Raise :class:`Unauthorized` if the handshake was refused; raise
        :class:`BrokerUnavailable` if no broker was ever reached and the last connection
        attempt was refused."""
        if isinstance(self.refused, Unauthorized):
            raise self.refused
        if self.refused is not None:
            raise BrokerUnavailable(self.url, 0.0, refused=True)

    def timed_out(self, waited_s: float) -> OrchestratorError | None:
        """What a wait of ``waited_s`` that ended unanswered means: no broker reached yet
        (:class:`BrokerUnavailable`), or None (a broker was reached: the wait's own
        timeout, or one too short to tell)."""
        if self.poll is not None and not self.contacted:
            self.poll()
        if isinstance(self.refused, Unauthorized):
            return self.refused
        if self.contacted or waited_s < CONTACT_GRACE_S:
            return None
        return BrokerUnavailable(self.url, waited_s)


__all__ = ["Reach", "handshake_refusal"]
