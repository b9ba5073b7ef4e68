"""The agent pools' desired replica counts, kept in the state service (key ``pools/desired``)
so that they survive a broker restart, and so that anyone can read them (``state get``).

The engine (``broker/engine/nodes.py``) decides; this writes each new set of counts from a
thread of its own (a state write must not hold the broker's loop), latest value first: a
burst of scales costs one write. At start-up the broker reads the counts back before its
loop runs; nodes then report what runs, and the engine reconciles to the counts read.

Without a state service, or with ``--state-memory``, the counts live as long as the broker
(after a restart, the engine adopts what the nodes report running).
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Final

import zmq

from wire.codec import packb, unpackb
from wire.sockets import apply_common_options
from wire.state import (
    StateDone,
    StateErrorReply,
    StateGet,
    StateHello,
    StatePut,
    StateValue,
    StateWelcome,
    decode_state,
    encode_state,
)

logger = logging.getLogger(__name__)

#: The state key of the desired counts: ``{agent name: replicas}``.
DESIRED_KEY: Final = "pools/desired"
#: How long one request to the state service may take.
REQUEST_TIMEOUT_S: Final = 5.0
#: After a failed write, the next try (the thread waits on its condition meanwhile).
RETRY_S: Final = 1.0


def _valid(value: Any) -> dict[str, int]:
    """The counts in a stored value; anything malformed is dropped (anyone with state
    access may write the key)."""
    if not isinstance(value, dict):
        return {}
    return {name: count for name, count in value.items()
            if isinstance(name, str) and name and type(count) is int and 0 <= count <= 1024}


class SessionLost(RuntimeError):
    """The state service no longer knows this link's session (it expired while the link
    was idle: the link does not heartbeat, or the service restarted)."""


class StateLink:
    """A synchronous state-service session of the broker's process (its own key on a
    secure broker, which the state service lets do everything): HELLO, then GET and PUT
    one at a time. The broker does not import the SDK (its async client is for agents
    and clients); this is the few lines of the protocol it needs.

    Args:
        url: the state service's endpoint.
        security: the broker's :class:`broker.security.CurveServer`, or None.
    """

    def __init__(self, url: str, security: Any = None) -> None:
        self.url = url
        self.security = security
        self._ctx = zmq.Context.instance()
        self._sock: zmq.Socket[Any] | None = None
        self._req = 0

    def _ask(self, make: Any) -> Any:
        """Send ``make(req)`` and return the answer; reconnect first when needed.

        Raises:
            TimeoutError: no answer within :data:`REQUEST_TIMEOUT_S`.
            RuntimeError: the service answered with an error.
        """
        if self._sock is None:
            self._open()
        assert self._sock is not None
        self._req += 1
        req = self._req
        self._sock.send_multipart(encode_state(make(req)))
        while self._sock.poll(int(REQUEST_TIMEOUT_S * 1000)):
            reply = decode_state(self._sock.recv_multipart())
            if isinstance(reply, StateErrorReply) and reply.req == req:
                if reply.code == "no_session":
                    raise SessionLost(reply.message)
                raise RuntimeError(f"{reply.code}: {reply.message}")
            if getattr(reply, "req", None) == req:
                return reply
        self.close()  # a fresh socket (and session) next time
        raise TimeoutError(f"the state service at {self.url} did not answer within "
                           f"{REQUEST_TIMEOUT_S:g} s")

    def _open(self) -> None:
        sock = self._ctx.socket(zmq.DEALER)
        apply_common_options(sock, 1000)
        if self.security is not None:
            self.security.secure_client(sock)
        sock.connect(self.url)
        self._sock = sock
        welcome = self._ask(lambda req: StateHello(req, "broker-pools"))
        if not isinstance(welcome, StateWelcome):
            raise RuntimeError(f"the state service answered HELLO with {welcome!r:.80}")

    def _call(self, make: Any) -> Any:
        """:meth:`_ask`, with a new session when the old one expired (an idle link)."""
        try:
            return self._ask(make)
        except SessionLost:
            self.close()
            return self._ask(make)

    def get(self, key: str) -> Any:
        reply = self._call(lambda req: StateGet(req, key))
        assert isinstance(reply, StateValue)
        return None if reply.value is None else unpackb(reply.value)

    def put(self, key: str, value: Any) -> None:
        reply = self._call(lambda req: StatePut(req, key, packb(value)))
        assert isinstance(reply, StateDone)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None


class DesiredStore:
    """Reads and writes ``pools/desired`` in the state service, writes from a thread.

    Args:
        state_url: the state service's endpoint.
        security: the broker's CURVE settings, or None.
    """

    def __init__(self, state_url: str, security: Any = None) -> None:
        self._link = StateLink(state_url, security)
        self._pending: dict[str, int] | None = None
        self._closing = False
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._write_loop, name="pools-store",
                                        daemon=True)

    def load(self) -> dict[str, int]:
        """The counts stored by an earlier broker (empty when none or unreadable)."""
        try:
            return _valid(self._link.get(DESIRED_KEY))
        except Exception as e:  # noqa: BLE001 - start without them, and say so
            logger.warning("pools: cannot read %s from the state service (%s); the desired "
                           "counts start from what the nodes report", DESIRED_KEY, e)
            return {}

    def start(self) -> None:
        """Start writing (after :meth:`load`: the link then belongs to the thread)."""
        self._thread.start()

    def save(self, desired: dict[str, int]) -> None:
        """Write ``desired`` soon (called from the broker's loop: never blocks on I/O)."""
        with self._changed:
            self._pending = dict(desired)
            self._changed.notify()

    def close(self) -> None:
        """Write what is pending, then stop the thread and the link."""
        with self._changed:
            self._closing = True
            self._changed.notify()
        if self._thread.is_alive():
            self._thread.join(REQUEST_TIMEOUT_S * 2)
        self._link.close()

    def _write_loop(self) -> None:
        while True:
            with self._changed:
                while self._pending is None and not self._closing:
                    self._changed.wait()
                desired, self._pending = self._pending, None
                closing = self._closing
            if desired is not None and not self._write(desired) and not closing:
                with self._changed:  # try again later, unless newer counts came
                    if self._pending is None:
                        self._pending = desired
                    self._changed.wait(RETRY_S)
            if closing and self._pending is None:
                return

    def _write(self, desired: dict[str, int]) -> bool:
        try:
            self._link.put(DESIRED_KEY, desired)
            return True
        except Exception as e:  # noqa: BLE001 - the counts stay in memory; try again
            logger.warning("pools: cannot write %s to the state service: %s", DESIRED_KEY, e)
            return False
