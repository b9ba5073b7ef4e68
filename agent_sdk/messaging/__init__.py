"""Agent messaging, for agents and clients alike: the pub/sub bus and direct messages.

:class:`Messenger` is the part :class:`~agent_sdk.agent.BaseAgent` and
:class:`~agent_sdk.client.Client` share; :class:`MessagingMixin` gives both the same
methods (``agent.publish``, ``client.request``, ...). The bookkeeping lives in
:mod:`agent_sdk.messaging.direct` and :mod:`agent_sdk.messaging.bus`, the bus sockets in
:mod:`agent_sdk.connection`.

**Pub/sub.** ``await publish(topic, data)`` sends on the bus; ``subscribe(prefix,
handler)`` receives every message whose topic starts with ``prefix`` (ZeroMQ's prefix
matching: ``"tasks."`` gets ``"tasks.t-1"``; ``""`` gets everything). Handlers run in
arrival order; a handler that returns an awaitable (an ``async def``) runs concurrently
with the other handlers of the same message, as with ``asyncio.gather``. Without a
handler, messages queue in the subscription: ``await sub.next()`` or ``async for``.

*Slow joiners*: a subscription takes a moment to reach the forwarder (and from there
the publishers); what is published meanwhile is not delivered to it, and a new
subscriber never gets earlier messages. ``await subscribe(...)`` returns once the
subscription provably works: the subscriber publishes a probe on the topic and waits
until the probe comes back to it. On the publishing side, ``await
wait_for_subscribers(topic)`` returns once a subscription matching ``topic`` has reached
this publisher (before that, its messages on ``topic`` go nowhere).

*Broker events* (``agents.*``, ``tasks.*``) come from the broker's own events socket,
never from the shared forwarder: a subscription under those prefixes listens there, one
like ``""`` that spans both listens on both, and a message on those topics arriving
through the forwarder is somebody else's forgery, dropped and counted
(``stats()["bus_forged"]``). ``publish`` refuses those prefixes
(:class:`~agent_sdk.errors.ReservedTopic`). The events socket confirms a subscription
by answering it with a probe of the broker's.

*Losses*: the forwarder never waits for a slow subscriber: once ``hwm`` messages queue
for it, it drops (for that subscriber only). Every bus message carries a sequence number
per (publisher, topic), so a subscriber counts what it missed (``stats()["bus_gaps"]``);
agents report their counters to the broker, which shows them per agent in ``status``.

**Direct messages** go through the broker to an agent id, an agent name (one live
instance, in turn; every instance with ``broadcast=True``) or a client id:
``await send(to, data)`` returns once the broker handed the message to the receiver's
connection and raises :class:`~agent_sdk.errors.NoSuchAgent` when there is no such
receiver; ``await request(to, data)`` returns the reply. Messages from one sender to one
receiver arrive in the order sent. Received messages go to ``on_message`` handlers when
there are any (a handler's non-None return value answers a request), else to a bounded
mailbox read with ``await receive()``. A full mailbox drops and counts what does not fit
and answers a request with the error ``mailbox_full``.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from wire.tasks import Direct, DirectVerdict, Message
from agent_sdk.messaging.bus import (
    BusHandler, BusMessage, BusMessaging, SUBSCRIBE_TIMEOUT_S, SUBSCRIPTION_QUEUE_SIZE,
    Subscription,
)
from agent_sdk.messaging.direct import (
    ACK_TIMEOUT_S, DirectHandler, DirectMessage, DirectMessaging, encoded, MAILBOX_SIZE,
    REQUEST_TIMEOUT_S,
)


class Messenger:
    """The messaging state of one agent or client: direct messages and the bus.

    The calls that wait return their part's coroutine rather than await it: one
    coroutine per publish or request instead of two (they are hot paths).

    Args:
        peer_id: returns this peer's routing id (read when needed: an agent's id may be
            set after construction).
        send: sends a protocol message on the peer's broker connection.
        endpoints: returns the broker's endpoints (``bus_out``, ``bus_in``), waiting for
            them if need be.
        mailbox_size: bound of the direct-message mailbox.
        started: says whether waiting for the endpoints can succeed; an agent's cannot
            inside ``on_start``, which runs before it registers.

    Attributes:
        counters: the messaging counters (see the module docstring), shared by both.
        direct: the direct messages' bookkeeping.
        bus: the bus's bookkeeping and sockets.
    """

    def __init__(self, peer_id: Callable[[], str], send: Callable[[Message], None],
                 endpoints: Callable[[], Awaitable[dict[str, str]]], *,
                 mailbox_size: int = MAILBOX_SIZE,
                 started: Callable[[], bool] | None = None) -> None:
        self.counters: Counter[str] = Counter()
        #: running handler calls (a Task nobody references may be collected mid-flight)
        self._tasks: set[asyncio.Task[Any]] = set()
        self.direct = DirectMessaging(peer_id, send, self.counters, self._spawn, mailbox_size)
        self.bus = BusMessaging(peer_id, endpoints, self.counters, self._spawn, started)
        self._reported: dict[str, int] = {}

    @property
    def mailbox_size(self) -> int:
        """Bound of the direct-message mailbox."""
        return self.direct.mailbox_size

    # ------------------------------------------------------------ direct: sending

    def send_nowait(self, to: str, message: Any, *, broadcast: bool = False
                    ) -> asyncio.Future[None]:
        """Send a direct message now; the future resolves when the broker routed it.

        Await the futures (``asyncio.gather``): the one of a message nobody received
        holds :class:`NoSuchAgent` (or :class:`MailboxFull`).

        Raises:
            TypeError: ``message`` is not msgpack-encodable.
            TooLarge: the encoded message exceeds the frame limit.
        """
        return self.direct.send_nowait(to, message, broadcast=broadcast)

    def send(self, to: str, message: Any, *, broadcast: bool = False,
             timeout: float = ACK_TIMEOUT_S) -> Coroutine[Any, Any, None]:
        """Send a direct message; return once the broker handed it to the receiver's
        connection (every live instance's, with ``broadcast``).

        Args:
            to: an agent id, an agent name (one live instance, in turn) or a client id.
            message: any msgpack-encodable value.
            broadcast: to every live instance of the agent name ``to``.
            timeout: how long to wait for the broker's answer.

        Raises:
            NoSuchAgent: no live agent or connected client answers to ``to``.
            MailboxFull: the broker holds too many messages for a receiver that lags.
            BrokerUnavailable: the broker did not answer within ``timeout``.
        """
        return self.direct.send(to, message, broadcast=broadcast, timeout=timeout)

    def request(self, to: str, message: Any, *, timeout: float = REQUEST_TIMEOUT_S
                ) -> Coroutine[Any, Any, Any]:
        """Send a request and return the reply's data.

        Raises:
            NoSuchAgent: no live agent or connected client answers to ``to``.
            MailboxFull: the receiver had no room for the request.
            RemoteError: the receiver's handler raised.
            WaitTimeout: no reply within ``timeout`` seconds.
        """
        return self.direct.request(to, message, timeout=timeout)

    async def reply(self, message: DirectMessage, data: Any) -> None:
        """Answer a request (``message.expects_reply``) with ``data``."""
        self.direct.reply(message, encoded(data))

    def _flush(self) -> None:
        """Send the direct messages queued in this loop iteration now (they leave at its
        end anyway)."""
        self.direct.flush()

    @property
    def _replies(self) -> dict[int, asyncio.Future[Any]]:
        """The requests awaiting their reply, by message id (for tests of the bookkeeping)."""
        return self.direct.replies

    # ------------------------------------------------------------ direct: receiving

    def on_message(self, handler: DirectHandler) -> DirectHandler:
        """Register a handler for direct messages (usable as a decorator). With handlers,
        messages go to them instead of the mailbox; the first non-None return value of
        the handlers answers a request (an ``async def`` handler's result counts)."""
        return self.direct.on_message(handler)

    def receive(self, timeout: float | None = None) -> Coroutine[Any, Any, DirectMessage]:
        """The next direct message from the mailbox.

        Raises:
            WaitTimeout: none arrived within ``timeout`` seconds.
            RuntimeError: handlers are registered, so messages go to them.
        """
        return self.direct.receive(timeout)

    def on_direct(self, msg: Direct) -> None:
        """A DIRECT batch from the broker: replies, and messages for us."""
        self.direct.on_direct(msg)

    def on_verdict(self, verdict: DirectVerdict) -> None:
        """The broker's word on messages we sent."""
        self.direct.on_verdict(verdict)

    def expire(self, now: float) -> None:
        """Fail ``send_nowait`` futures the broker never answered (it went away); call
        now and then with the loop's time."""
        self.direct.expire(now)

    # ------------------------------------------------------------ bus

    def subscribe(self, topic: str, handler: BusHandler | None = None, *,
                  queue_size: int = SUBSCRIPTION_QUEUE_SIZE) -> Subscription:
        """Receive bus messages whose topic starts with ``topic``.

        Takes effect at once (the bus connection opens in the background); await the
        result to wait until the subscription is confirmed.

        Args:
            topic: the topic prefix ("" for everything).
            handler: called with each :class:`BusMessage`; without one, messages queue
                in the subscription (``await sub.next()``).
            queue_size: bound of that queue.
        """
        return self.bus.subscribe(topic, handler, queue_size=queue_size)

    async def unsubscribe(self, subscription: Subscription | str) -> None:
        """Cancel a subscription, or every subscription to a topic prefix."""
        self.bus.unsubscribe(subscription)

    def publish(self, topic: str, message: Any) -> Coroutine[Any, Any, None]:
        """Publish ``message`` on ``topic``. Never blocks on subscribers: a message nobody
        subscribed to goes nowhere, and a subscriber that lags loses messages (it counts
        them).

        Raises:
            TypeError: ``message`` is not msgpack-encodable.
            TooLarge: the encoded message exceeds the frame limit.
            BusUnavailable: the broker runs no bus.
        """
        return self.bus.publish(topic, message)

    def wait_for_subscribers(self, topic: str, timeout: float = SUBSCRIBE_TIMEOUT_S
                             ) -> Coroutine[Any, Any, None]:
        """Return once some subscription matching ``topic`` has reached this publisher.

        Raises:
            WaitTimeout: none did within ``timeout`` seconds.
            BusUnavailable: the broker runs no bus.
        """
        return self.bus.wait_for_subscribers(topic, timeout)

    def set_endpoints(self, endpoints: dict[str, str]) -> None:
        """The broker's endpoints as announced at registration: (re)connect the bus if it
        is in use and they changed (a broker restarted on other ports)."""
        self.bus.set_endpoints(endpoints)

    def _on_bus_frames(self, frames: list[bytes]) -> None:
        """Handle one bus message as if it had arrived (for tests of the bookkeeping)."""
        self.bus.on_frames(frames)

    # ------------------------------------------------------------ lifecycle

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def stats(self) -> dict[str, int]:
        """The messaging counters (see the module docstring for what they mean)."""
        return dict(self.counters)

    def report_again(self) -> None:
        """Make the next :meth:`stats_if_changed` report (a new broker knows nothing)."""
        self._reported = {}

    def stats_if_changed(self) -> dict[str, int] | None:
        """The counters if they changed since the last call, else None (for reports)."""
        if self.counters == self._reported:
            return None
        self._reported = dict(self.counters)
        return dict(self._reported)

    async def close(self) -> None:
        """Send what is queued, close the bus sockets, stop handler calls still running
        and fail what still waits for an answer."""
        self.direct.flush()
        self.bus.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.direct.cancel_waiting()


class MessagingMixin:
    """The messaging methods of agents and clients; they delegate to ``self.messaging``
    (see :mod:`agent_sdk.messaging` for the semantics)."""

    messaging: Messenger

    async def publish(self, topic: str, message: Any) -> None:
        """Publish ``message`` on ``topic`` (see :meth:`Messenger.publish`)."""
        await self.messaging.publish(topic, message)

    def subscribe(self, topic: str, handler: BusHandler | None = None, *,
                  queue_size: int = SUBSCRIPTION_QUEUE_SIZE) -> Subscription:
        """Receive bus messages whose topic starts with ``topic``; await the result to
        wait for confirmation (see :meth:`Messenger.subscribe`)."""
        return self.messaging.subscribe(topic, handler, queue_size=queue_size)

    async def unsubscribe(self, subscription: Subscription | str) -> None:
        """Cancel a subscription, or all of a topic prefix."""
        await self.messaging.unsubscribe(subscription)

    async def wait_for_subscribers(self, topic: str, timeout: float = SUBSCRIBE_TIMEOUT_S
                                   ) -> None:
        """Return once a subscription matching ``topic`` reached this publisher."""
        await self.messaging.wait_for_subscribers(topic, timeout)

    async def send(self, to: str, message: Any, *, broadcast: bool = False,
                   timeout: float = ACK_TIMEOUT_S) -> None:
        """Send a direct message (see :meth:`Messenger.send`)."""
        await self.messaging.send(to, message, broadcast=broadcast, timeout=timeout)

    def send_nowait(self, to: str, message: Any, *, broadcast: bool = False
                    ) -> asyncio.Future[None]:
        """Send a direct message now; await the returned future for the verdict."""
        return self.messaging.send_nowait(to, message, broadcast=broadcast)

    async def request(self, to: str, message: Any, *, timeout: float = REQUEST_TIMEOUT_S) -> Any:
        """Send a request and return the reply (see :meth:`Messenger.request`)."""
        return await self.messaging.request(to, message, timeout=timeout)

    async def reply(self, message: DirectMessage, data: Any) -> None:
        """Answer a request received with :meth:`receive`."""
        await self.messaging.reply(message, data)

    async def receive(self, timeout: float | None = None) -> DirectMessage:
        """The next direct message from the mailbox."""
        return await self.messaging.receive(timeout)

    def on_message(self, handler: DirectHandler) -> DirectHandler:
        """Register a direct-message handler (usable as a decorator)."""
        return self.messaging.on_message(handler)


__all__ = [
    "ACK_TIMEOUT_S", "BusHandler", "BusMessage", "DirectHandler", "DirectMessage",
    "MAILBOX_SIZE", "Messenger", "MessagingMixin", "REQUEST_TIMEOUT_S", "SUBSCRIBE_TIMEOUT_S",
    "SUBSCRIPTION_QUEUE_SIZE", "Subscription",
]
