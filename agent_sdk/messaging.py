"""Agent messaging, for agents and clients alike: the pub/sub bus and direct messages.

:class:`Messenger` is the part :class:`~agent_sdk.agent.BaseAgent` and
:class:`~agent_sdk.client.Client` share; :class:`MessagingMixin` gives both the same
methods (``agent.publish``, ``client.request``, ...).

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
import inspect
import itertools
import logging
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Generator
from typing import Any, Final

import zmq

from wire.errors import DecodeError, TooLarge
from wire.bus import decode_bus, encode_bus, encode_bus_probe
from wire.codec import chunks, packb, unpackb
from wire.limits import MAX_FRAME_BYTES
from wire.tasks import (
    Direct, DIRECT_ASK, DIRECT_BROADCAST, DIRECT_NO_ACK, DirectItem, DirectVerdict, ErrorCode,
    Message,
)
from wire.bus import PrefixSet
from wire.sockets import apply_common_options, NOBLOCK, send_frames
from agent_sdk.errors import (
    BrokerUnavailable, BusUnavailable, MailboxFull, NoSuchAgent, RemoteError, RequestRefused,
    WaitTimeout,
)

logger = logging.getLogger(__name__)

#: Direct messages received and not yet taken by ``receive`` (or handler calls still
#: running); beyond it a message is dropped and counted, and a request is answered with
#: the error ``mailbox_full``.
MAILBOX_SIZE: Final = 10_000
#: Messages a subscription without a handler keeps until ``next``; beyond, dropped.
SUBSCRIPTION_QUEUE_SIZE: Final = 10_000
#: Async bus handler calls running at once. At the limit the SDK stops reading the bus:
#: messages then wait in ZeroMQ's bounded queues, and the forwarder drops for this
#: subscriber if that lasts, instead of this process growing without bound.
MAX_BUS_HANDLERS: Final = 1000
#: Queue bound of the bus sockets, in messages.
BUS_HWM: Final = 100_000
#: Bus messages handled per wake-up before the loop gets a turn.
BUS_DRAIN_BATCH: Final = 1000
#: How long ``send`` waits for the broker's verdict by default.
ACK_TIMEOUT_S: Final = 10.0
#: How long ``request`` waits for the reply by default.
REQUEST_TIMEOUT_S: Final = 30.0
#: How long awaiting a subscription waits for its probe by default.
SUBSCRIBE_TIMEOUT_S: Final = 10.0
#: First and longest wait before a subscription probe is sent again: our own publisher
#: drops the first ones until the subscription has reached it.
PROBE_RETRY_MIN_S: Final = 0.02
PROBE_RETRY_MAX_S: Final = 0.5
#: ``publish`` lets the loop run once every this many calls, so that a publishing loop
#: does not starve heartbeats and the reading of the connection.
PUBLISH_YIELD_EVERY: Final = 256
#: How long messages still queued in the publisher socket at ``close`` may take to leave
#: (libzmq sends them in the background while the process runs; 0 would discard them).
PUBLISH_LINGER_MS: Final = 2000
#: (publisher, topic) sequence trackers and per-topic counters kept; the oldest go first
#: (a forgotten stream restarts its count without a false gap).
MAX_TRACKED_STREAMS: Final = 100_000


class DirectMessage:
    """A direct message as received.

    Attributes:
        sender: the sender's routing id (agent id or client id): where a reply goes.
        data: the message (any msgpack value).
        id: the sender's id for it.
        to: the address it was sent to (an agent id or name, or a client id).
        expects_reply: it is a request; the sender awaits a reply.
        broadcast: it went to every instance of an agent name.
    """

    __slots__ = ("sender", "data", "id", "to", "expects_reply", "broadcast")

    def __init__(self, sender: str | bytes, data: Any, msg_id: int, to: str | bytes | None,
                 expects_reply: bool, broadcast: bool) -> None:
        self.sender = sender
        self.data = data
        self.id = msg_id
        self.to = to
        self.expects_reply = expects_reply
        self.broadcast = broadcast

    def __repr__(self) -> str:
        kind = "request" if self.expects_reply else "message"
        return f"DirectMessage({kind} {self.id} from {self.sender!r}: {self.data!r})"


class BusMessage:
    """A message received from the bus: ``topic``, ``sender`` (publisher id), ``seq``
    (its number among the publisher's messages on that topic) and ``data``."""

    __slots__ = ("topic", "sender", "seq", "data")

    def __init__(self, topic: str, sender: str, seq: int, data: Any) -> None:
        self.topic = topic
        self.sender = sender
        self.seq = seq
        self.data = data

    def __repr__(self) -> str:
        return f"BusMessage({self.topic!r} #{self.seq} from {self.sender!r}: {self.data!r})"


BusHandler = Callable[[BusMessage], Any]
DirectHandler = Callable[[DirectMessage], Any]


class Subscription:
    """One ``subscribe`` call: a topic prefix and a handler, or a queue of messages.

    Awaiting it waits until the subscription is confirmed (see the module docstring) and
    returns it: ``sub = await agent.subscribe("news.")``.
    """

    def __init__(self, messenger: Messenger, topic: str, handler: BusHandler | None,
                 queue_size: int) -> None:
        self.topic = topic
        self.handler = handler
        self.confirmed = False
        self.active = True
        #: messages delivered to it, and dropped because its queue was full
        self.received = 0
        self.dropped = 0
        self._messenger = messenger
        self._queue: asyncio.Queue[BusMessage] | None = (
            None if handler is not None else asyncio.Queue(queue_size))

    def __await__(self) -> Generator[Any, None, Subscription]:
        return self.confirm().__await__()

    async def confirm(self, timeout: float = SUBSCRIBE_TIMEOUT_S) -> Subscription:
        """Return once a probe published on the topic came back to this subscriber.

        Raises:
            WaitTimeout: no probe came back within ``timeout`` seconds.
            BusUnavailable: the broker runs no bus.
        """
        if not self.confirmed:
            await self._messenger._confirm(self.topic, timeout)
            self.confirmed = True
        return self

    async def next(self, timeout: float | None = None) -> BusMessage:
        """The next message (subscriptions without a handler only).

        Raises:
            WaitTimeout: none arrived within ``timeout`` seconds.
        """
        if self._queue is None:
            raise RuntimeError(f"subscription {self.topic!r} has a handler; its messages "
                               "go there")
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except asyncio.TimeoutError:
            raise WaitTimeout(f"no message on {self.topic!r} within {timeout:g} s") from None

    def __aiter__(self) -> AsyncIterator[BusMessage]:
        return self

    async def __anext__(self) -> BusMessage:
        return await self.next()

    async def unsubscribe(self) -> None:
        """Stop receiving; messages already queued stay readable."""
        self._messenger._remove(self)

    def _deliver(self, message: BusMessage) -> Any:
        """Hand over one message; returns the handler's awaitable, if it made one."""
        self.received += 1
        if self._queue is None:
            assert self.handler is not None
            return self.handler(message)
        try:
            self._queue.put_nowait(message)
        except asyncio.QueueFull:
            self.dropped += 1
            self._messenger.counters["bus_overflow"] += 1
        return None

    def __repr__(self) -> str:
        state = "confirmed" if self.confirmed else ("active" if self.active else "cancelled")
        return f"Subscription({self.topic!r}, {state}, received {self.received})"


class Messenger:
    """The messaging state of one agent or client.

    Args:
        peer_id: returns this peer's routing id (read when needed: an agent's id may be
            set after construction).
        send: sends a protocol message on the peer's broker connection.
        endpoints: returns the broker's endpoints (``bus_out``, ``bus_in``), waiting for
            them if need be.
        mailbox_size: bound of the direct-message mailbox.
        started: says whether waiting for the endpoints can succeed; an agent's cannot
            inside ``on_start``, which runs before it registers.
    """

    def __init__(self, peer_id: Callable[[], str], send: Callable[[Message], None],
                 endpoints: Callable[[], Awaitable[dict[str, str]]], *,
                 mailbox_size: int = MAILBOX_SIZE,
                 started: Callable[[], bool] | None = None) -> None:
        self._peer_id = peer_id
        self._send = send
        self._endpoints = endpoints
        self._started = started
        self.mailbox_size = mailbox_size
        self.counters: Counter[str] = Counter()
        # direct
        self._ids = itertools.count(1)
        #: items to send at the end of this loop iteration, in one DIRECT message
        self._outgoing: list[DirectItem] = []
        #: send() futures awaiting the broker's verdict: id -> (future, loop time sent)
        self._acks: dict[int, tuple[asyncio.Future[None], float]] = {}
        self._replies: dict[int, asyncio.Future[Any]] = {}
        self._mailbox: asyncio.Queue[DirectMessage] = asyncio.Queue(mailbox_size)
        self._handlers: list[DirectHandler] = []
        self._handling = 0
        #: running handler calls (a Task nobody references may be collected mid-flight)
        self._tasks: set[asyncio.Task[Any]] = set()
        # bus
        self._bus_urls: tuple[str, str] | None = None
        self._opening: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sub: zmq.Socket[Any] | None = None
        self._pub: zmq.Socket[Any] | None = None
        self._subscriptions: dict[str, list[Subscription]] = {}
        #: what subscribers want, as the forwarder told our publisher socket
        self._remote = PrefixSet()
        self._subscriber_waiters: list[tuple[bytes, asyncio.Future[None]]] = []
        self._probes: dict[int, asyncio.Future[None]] = {}
        self._seq_out: dict[str, int] = {}
        self._seq_in: dict[tuple[str, str], int] = {}
        self._bus_handling = 0
        self._bus_paused = False
        self._sub_read_scheduled = False
        self._pub_read_scheduled = False
        self._published = 0
        self._reported: dict[str, int] = {}

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
        return self._post(to, message, broadcast)[1]

    def _post(self, to: str | bytes, message: Any, broadcast: bool
              ) -> tuple[int, asyncio.Future[None]]:
        loop = asyncio.get_running_loop()
        msg_id = next(self._ids)
        self._queue(_new_item((to, msg_id, _encoded(message), None,
                               DIRECT_BROADCAST if broadcast else 0, None, None)))
        future: asyncio.Future[None] = loop.create_future()
        self._acks[msg_id] = (future, loop.time())
        self.counters["direct_sent"] += 1
        return msg_id, future

    def _queue(self, item: DirectItem) -> None:
        """Send ``item`` with the others of this loop iteration, in one message."""
        if not self._outgoing:
            asyncio.get_running_loop().call_soon(self._flush)
        self._outgoing.append(item)

    def _flush(self) -> None:
        if not self._outgoing:
            return
        items, self._outgoing = self._outgoing, []
        try:
            for part in chunks(items):
                self._send(Direct(part))
        except Exception as e:  # noqa: BLE001 - the senders hear why, through their futures
            logger.warning("direct messages not sent: %s", e)
            for item in items:
                entry = self._acks.pop(item[1], None)
                future = entry[0] if entry is not None else self._replies.pop(item[1], None)
                if future is not None and not future.done():
                    future.set_exception(e)

    async def send(self, to: str, message: Any, *, broadcast: bool = False,
                   timeout: float = ACK_TIMEOUT_S) -> None:
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
        msg_id, future = self._post(to, message, broadcast)
        timer = asyncio.get_running_loop().call_later(timeout, _time_out, future, to, timeout,
                                                      False)
        try:
            await future
        finally:
            timer.cancel()
            self._acks.pop(msg_id, None)

    async def request(self, to: str, message: Any, *, timeout: float = REQUEST_TIMEOUT_S) -> Any:
        """Send a request and return the reply's data.

        Raises:
            NoSuchAgent: no live agent or connected client answers to ``to``.
            MailboxFull: the receiver had no room for the request.
            RemoteError: the receiver's handler raised.
            WaitTimeout: no reply within ``timeout`` seconds.
        """
        loop = asyncio.get_running_loop()
        msg_id = next(self._ids)
        self._queue(_new_item((to, msg_id, _encoded(message), None, DIRECT_ASK | DIRECT_NO_ACK,
                               None, None)))
        future: asyncio.Future[Any] = loop.create_future()
        self._replies[msg_id] = future
        self.counters["direct_sent"] += 1
        # A timer rather than wait_for: requests are a hot path, and wait_for costs a Task.
        timer = loop.call_later(timeout, _time_out, future, to, timeout, True)
        try:
            return await future
        finally:
            timer.cancel()
            self._replies.pop(msg_id, None)

    async def reply(self, message: DirectMessage, data: Any) -> None:
        """Answer a request (``message.expects_reply``) with ``data``."""
        self._reply(message, _encoded(data), None)

    def _reply(self, message: DirectMessage, payload: bytes,
               error: tuple[str, str] | None) -> None:
        # No acknowledgement: the requester may be gone, and then nobody waits for it.
        self._queue(_new_item((message.sender, next(self._ids), payload, message.id,
                               DIRECT_NO_ACK, error, None)))

    # ------------------------------------------------------------ direct: receiving

    def on_message(self, handler: DirectHandler) -> DirectHandler:
        """Register a handler for direct messages (usable as a decorator). With handlers,
        messages go to them instead of the mailbox; the first non-None return value of
        the handlers answers a request (an ``async def`` handler's result counts)."""
        self._handlers.append(handler)
        return handler

    async def receive(self, timeout: float | None = None) -> DirectMessage:
        """The next direct message from the mailbox.

        Raises:
            WaitTimeout: none arrived within ``timeout`` seconds.
            RuntimeError: handlers are registered, so messages go to them.
        """
        if self._handlers:
            raise RuntimeError("direct messages go to the on_message handlers, not the mailbox")
        try:
            return await asyncio.wait_for(self._mailbox.get(), timeout)
        except asyncio.TimeoutError:
            raise WaitTimeout(f"no direct message within {timeout:g} s") from None

    def on_direct(self, msg: Direct) -> None:
        """A DIRECT batch from the broker: replies, and messages for us."""
        for item in msg.items:
            if item[3] is not None:
                self._on_reply(item)
            else:
                self._on_item(item)

    def _on_item(self, item: DirectItem) -> None:
        self.counters["direct_received"] += 1
        to, msg_id, payload, _, flags, _, sender = item
        if sender is None:
            sender = ""
        ask = bool(flags & DIRECT_ASK)
        try:
            data = unpackb(payload) if payload else None
        except Exception as e:  # noqa: BLE001 - a peer's bad payload must not hurt us
            self.counters["direct_undecodable"] += 1
            logger.warning("dropped a direct message from %r: payload is not msgpack: %s",
                           sender, e)
            if ask:
                self._reply(DirectMessage(sender, None, msg_id, to, True, False), b"",
                            (ErrorCode.BAD_FRAME.value, f"payload is not msgpack: {e}"))
            return
        message = DirectMessage(sender, data, msg_id, to, ask, bool(flags & DIRECT_BROADCAST))
        if self._handlers:
            if self._handling >= self.mailbox_size:
                self._overflow(message)
            else:
                self._call_handlers(message)
            return
        try:
            self._mailbox.put_nowait(message)
        except asyncio.QueueFull:
            self._overflow(message)

    def _on_reply(self, item: DirectItem) -> None:
        future = self._replies.pop(item[3], None)  # type: ignore[arg-type]
        if future is None or future.done():
            self.counters["late_replies"] += 1
            return
        error = item[5]
        if error is not None:
            future.set_exception(_refusal(error[0], error[1], item[6]))
            return
        try:
            future.set_result(unpackb(item[2]) if item[2] else None)
        except Exception as e:  # noqa: BLE001 - the requester hears about a bad reply
            future.set_exception(RequestRefused(ErrorCode.BAD_FRAME.value,
                                                f"reply is not msgpack: {e}"))

    def _overflow(self, message: DirectMessage) -> None:
        self.counters["mailbox_dropped"] += 1
        if message.expects_reply:
            self._reply(message, b"", (ErrorCode.MAILBOX_FULL.value,
                                       f"{self._peer_id()} has {self.mailbox_size} messages "
                                       "waiting; this one was dropped"))

    def _call_handlers(self, message: DirectMessage) -> None:
        answer: Any = None
        awaitables = []
        try:
            for handler in self._handlers:
                outcome = handler(message)
                if inspect.isawaitable(outcome):
                    awaitables.append(outcome)
                elif answer is None:
                    answer = outcome
        except Exception as e:  # noqa: BLE001 - a handler's error goes to the requester
            for pending in awaitables:
                _close_unawaited(pending)
            self._handler_failed(message, e)
            return
        if not awaitables:
            if message.expects_reply and answer is not None:
                self._reply(message, _encoded(answer), None)
            return
        self._handling += 1
        self._spawn(self._finish_handlers(message, awaitables, answer))

    async def _finish_handlers(self, message: DirectMessage, awaitables: list[Awaitable[Any]],
                               answer: Any) -> None:
        try:
            outcomes = await asyncio.gather(*awaitables)
        except Exception as e:  # noqa: BLE001 - a handler's error goes to the requester
            self._handler_failed(message, e)
            return
        finally:
            self._handling -= 1
        if message.expects_reply:
            for outcome in (answer, *outcomes):
                if outcome is not None:
                    self._reply(message, _encoded(outcome), None)
                    break

    def _handler_failed(self, message: DirectMessage, error: Exception) -> None:
        self.counters["handler_errors"] += 1
        logger.error("direct message handler failed on %r", message, exc_info=error)
        if message.expects_reply:
            self._reply(message, b"", (ErrorCode.AGENT_ERROR.value,
                                       f"{type(error).__name__}: {error}"))

    def on_verdict(self, verdict: DirectVerdict) -> None:
        """The broker's word on messages we sent."""
        acks = self._acks
        for msg_id in verdict.acks:
            entry = acks.pop(msg_id, None)
            if entry is not None and not entry[0].done():
                entry[0].set_result(None)
        for msg_id, code, text in verdict.errors:
            entry = acks.pop(msg_id, None)
            future = entry[0] if entry is not None else self._replies.pop(msg_id, None)
            if future is None or future.done():
                # A reply or an unacknowledged message that found nobody.
                self.counters["undelivered"] += 1
                logger.debug("direct message %d undelivered: %s: %s", msg_id, code, text)
                continue
            future.set_exception(_refusal(code, text, None))

    def expire(self, now: float) -> None:
        """Fail ``send_nowait`` futures the broker never answered (it went away); call
        now and then with the loop's time."""
        acks = self._acks
        while acks:
            msg_id, (future, sent_at) = next(iter(acks.items()))
            if now - sent_at < ACK_TIMEOUT_S:
                break
            del acks[msg_id]
            if not future.done():
                future.set_exception(BrokerUnavailable("the broker", ACK_TIMEOUT_S))

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
        subscription = Subscription(self, topic, handler, queue_size)
        subscribers = self._subscriptions.setdefault(topic, [])
        subscribers.append(subscription)
        if len(subscribers) == 1 and self._sub is not None:
            self._sub.setsockopt(zmq.SUBSCRIBE, topic.encode())
            self._schedule_sub_read()
        elif self._sub is None:
            self._request_bus()
        return subscription

    async def unsubscribe(self, subscription: Subscription | str) -> None:
        """Cancel a subscription, or every subscription to a topic prefix."""
        if isinstance(subscription, Subscription):
            self._remove(subscription)
            return
        for sub in list(self._subscriptions.get(subscription, ())):
            self._remove(sub)

    def _remove(self, subscription: Subscription) -> None:
        subscribers = self._subscriptions.get(subscription.topic)
        if not subscription.active or subscribers is None:
            return
        subscription.active = False
        subscribers.remove(subscription)
        if subscribers:
            return
        del self._subscriptions[subscription.topic]
        if self._sub is not None:
            self._sub.setsockopt(zmq.UNSUBSCRIBE, subscription.topic.encode())
        # Streams no subscription covers any more start afresh if subscribed again: the
        # messages in between were not wanted, not lost.
        remaining = tuple(self._subscriptions)
        for key in [k for k in self._seq_in if not k[1].startswith(remaining)]:
            del self._seq_in[key]

    async def publish(self, topic: str, message: Any) -> None:
        """Publish ``message`` on ``topic``. Never blocks on subscribers: a message nobody
        subscribed to goes nowhere, and a subscriber that lags loses messages (it counts
        them).

        Raises:
            TypeError: ``message`` is not msgpack-encodable.
            TooLarge: the encoded message exceeds the frame limit.
            BusUnavailable: the broker runs no bus.
        """
        pub = self._pub
        if pub is None:
            await self._bus_open()
            pub = self._pub
            assert pub is not None
        seq_out = self._seq_out
        seq = seq_out.get(topic, 0) + 1
        if seq == 1 and len(seq_out) >= MAX_TRACKED_STREAMS:
            del seq_out[next(iter(seq_out))]
        seq_out[topic] = seq
        frames = encode_bus(topic, self._peer_id(), seq, message)
        if len(frames[1]) > MAX_FRAME_BYTES:
            raise TooLarge(len(frames[1]), MAX_FRAME_BYTES)
        send_frames(pub, frames, NOBLOCK)
        self.counters["bus_published"] += 1
        # A send can swallow the edge that announces subscription changes: look again.
        if not self._pub_read_scheduled:
            self._schedule_pub_read()
        self._published += 1
        if self._published % PUBLISH_YIELD_EVERY == 0:
            await asyncio.sleep(0)

    async def wait_for_subscribers(self, topic: str, timeout: float = SUBSCRIBE_TIMEOUT_S
                                   ) -> None:
        """Return once some subscription matching ``topic`` has reached this publisher.

        Raises:
            WaitTimeout: none did within ``timeout`` seconds.
            BusUnavailable: the broker runs no bus.
        """
        await self._bus_open()
        self._read_subscriptions()
        wanted = topic.encode()
        if self._remote.matches(wanted):
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (wanted, future)
        self._subscriber_waiters.append(entry)
        try:
            await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            raise WaitTimeout(f"no subscriber for {topic!r} within {timeout:g} s") from None
        finally:
            if entry in self._subscriber_waiters:
                self._subscriber_waiters.remove(entry)

    def set_endpoints(self, endpoints: dict[str, str]) -> None:
        """The broker's endpoints as announced at registration: (re)connect the bus if it
        is in use and they changed (a broker restarted on other ports)."""
        urls = (endpoints.get("bus_out"), endpoints.get("bus_in"))
        if urls[0] is None or urls[1] is None:
            return
        if self._bus_urls == urls:
            return
        self._bus_urls = (urls[0], urls[1])
        if self._sub is not None:
            logger.info("bus endpoints changed to %s; reconnecting", urls)
            self._close_bus()
            self._open_bus()
        elif self._subscriptions and self._loop_running():
            self._open_bus()

    def _request_bus(self) -> None:
        """Open the bus in the background, if a loop runs (otherwise the first
        :meth:`set_endpoints` or publish does it)."""
        if not self._loop_running():
            return
        if self._opening is None:
            self._opening = asyncio.get_running_loop().create_task(self._open_when_known())
            self._opening.add_done_callback(self._opened)

    def _opened(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            self._opening = None
        elif task.exception() is not None:
            logger.warning("bus not available: %s", task.exception())
            self._opening = None

    async def _bus_open(self) -> None:
        if self._sub is not None:
            return
        if self._started is not None and not self._started():
            raise BusUnavailable("the bus is known once the agent registered, after on_start: "
                                 "subscribe() there without await, and await subscriptions "
                                 "or publish from tasks and handlers")
        self._request_bus()
        assert self._opening is not None
        await asyncio.shield(self._opening)

    async def _open_when_known(self) -> None:
        if self._bus_urls is None:
            endpoints = await self._endpoints()
            if not endpoints.get("bus_out") or not endpoints.get("bus_in"):
                raise BusUnavailable("the broker announces no bus (is it running with "
                                     "--no-bus?)")
            self._bus_urls = (endpoints["bus_out"], endpoints["bus_in"])
        if self._sub is None:
            self._open_bus()

    def _open_bus(self) -> None:
        assert self._bus_urls is not None
        loop = self._loop = asyncio.get_running_loop()
        ctx: zmq.Context[Any] = zmq.Context.instance()
        sub = ctx.socket(zmq.SUB)
        pub = ctx.socket(zmq.XPUB)
        for sock in (sub, pub):
            apply_common_options(sock, BUS_HWM)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RECONNECT_IVL, 100)
            sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        for topic in self._subscriptions:
            sub.setsockopt(zmq.SUBSCRIBE, topic.encode())
        sub.connect(self._bus_urls[0])
        pub.connect(self._bus_urls[1])
        self._sub, self._pub = sub, pub
        loop.add_reader(sub.getsockopt(zmq.FD), self._on_sub_readable)
        loop.add_reader(pub.getsockopt(zmq.FD), self._read_subscriptions)
        self._schedule_sub_read()
        self._schedule_pub_read()

    def _close_bus(self) -> None:
        loop = self._loop
        for sock in (self._sub, self._pub):
            if sock is None:
                continue
            if loop is not None and not loop.is_closed():
                fd: Any = sock.getsockopt(zmq.FD)
                loop.remove_reader(fd)
            sock.close(linger=PUBLISH_LINGER_MS if sock is self._pub else 0)
        self._sub = self._pub = None
        self._remote.clear()

    @staticmethod
    def _loop_running() -> bool:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return False
        return True

    async def _confirm(self, topic: str, timeout: float) -> None:
        await self._bus_open()
        loop = asyncio.get_running_loop()
        token = next(self._ids)
        future: asyncio.Future[None] = loop.create_future()
        self._probes[token] = future
        deadline = loop.time() + timeout
        retry_s = PROBE_RETRY_MIN_S
        try:
            while True:
                pub = self._pub
                if pub is not None:
                    send_frames(pub, encode_bus_probe(topic, self._peer_id(), token), NOBLOCK)
                    self._schedule_pub_read()
                left = deadline - loop.time()
                if left <= 0:
                    raise WaitTimeout(f"subscription to {topic!r} not confirmed within "
                                      f"{timeout:g} s (is the bus reachable?)")
                try:
                    await asyncio.wait_for(asyncio.shield(future), min(retry_s, left))
                    return
                except asyncio.TimeoutError:
                    retry_s = min(retry_s * 2, PROBE_RETRY_MAX_S)
        finally:
            self._probes.pop(token, None)

    def _schedule_sub_read(self) -> None:
        if not self._sub_read_scheduled and self._loop is not None:
            self._sub_read_scheduled = True
            self._loop.call_soon(self._on_sub_readable)

    def _schedule_pub_read(self) -> None:
        if not self._pub_read_scheduled and self._loop is not None:
            self._pub_read_scheduled = True
            self._loop.call_soon(self._read_subscriptions)

    def _read_subscriptions(self) -> None:
        """Take the (un)subscriptions the forwarder passed to our publisher socket."""
        self._pub_read_scheduled = False
        pub = self._pub
        if pub is None:
            return
        changed = False
        while True:
            try:
                message = pub.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            changed |= self._remote.apply(message)
        if changed and self._subscriber_waiters:
            for wanted, future in self._subscriber_waiters:
                if not future.done() and self._remote.matches(wanted):
                    future.set_result(None)

    def _on_sub_readable(self) -> None:
        self._sub_read_scheduled = False
        sub = self._sub
        if sub is None or self._bus_paused:
            return
        recv = sub.recv_multipart
        handle = self._on_bus_frames
        received = 0
        while received < BUS_DRAIN_BATCH:
            try:
                frames = recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            received += 1
            handle(frames)
            if self._bus_paused or self._sub is not sub:
                return
        self._schedule_sub_read()

    def _on_bus_frames(self, frames: list[bytes]) -> None:
        try:
            envelope = decode_bus(frames)
        except DecodeError as e:
            self.counters["bus_undecodable"] += 1
            logger.warning("dropped a bad bus message: %s", e)
            return
        topic, sender, seq, data, probe = envelope
        if probe is not None:
            if sender == self._peer_id():
                future = self._probes.get(probe)
                if future is not None and not future.done():
                    future.set_result(None)
            return
        key = (sender, topic)
        seq_in = self._seq_in
        last = seq_in.get(key)
        if last is None:
            # The first message of a stream we see: a late joiner starts anywhere.
            if len(seq_in) >= MAX_TRACKED_STREAMS:
                del seq_in[next(iter(seq_in))]
        elif seq > last + 1:
            self.counters["bus_gaps"] += seq - last - 1
        seq_in[key] = seq
        self.counters["bus_received"] += 1
        message = BusMessage(topic, sender, seq, data)
        awaitables = None
        for prefix, subscribers in self._subscriptions.items():
            if not topic.startswith(prefix):
                continue
            for subscription in subscribers:
                try:
                    outcome = subscription._deliver(message)
                except Exception:  # noqa: BLE001 - one handler's bug must not stop the bus
                    self.counters["handler_errors"] += 1
                    logger.exception("bus handler failed on %r", message)
                    continue
                if outcome is not None and inspect.isawaitable(outcome):
                    if awaitables is None:
                        awaitables = []
                    awaitables.append(outcome)
        if awaitables:
            self._bus_handling += 1
            if self._bus_handling >= MAX_BUS_HANDLERS:
                self._bus_paused = True
            self._spawn(self._finish_bus_handlers(message, awaitables))

    async def _finish_bus_handlers(self, message: BusMessage,
                                   awaitables: list[Awaitable[Any]]) -> None:
        outcomes = await asyncio.gather(*awaitables, return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, Exception):
                self.counters["handler_errors"] += 1
                logger.error("bus handler failed on %r", message, exc_info=outcome)
        self._bus_handling -= 1
        if self._bus_paused and self._bus_handling < MAX_BUS_HANDLERS // 2:
            self._bus_paused = False
            self._schedule_sub_read()

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
        self._flush()
        if self._opening is not None and not self._opening.done():
            self._opening.cancel()
        self._close_bus()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for future, _ in self._acks.values():
            future.cancel()
        self._acks.clear()
        for future in self._replies.values():
            future.cancel()
        self._replies.clear()


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


def _new_item(fields: tuple[Any, ...]) -> DirectItem:
    # tuple.__new__ skips the NamedTuple's Python-level __new__: this is per message.
    return tuple.__new__(DirectItem, fields)


def _time_out(future: asyncio.Future[Any], to: str, timeout: float, request: bool) -> None:
    """Timer callback: no reply (request) or no verdict (send) within ``timeout``."""
    if not future.done():
        future.set_exception(
            WaitTimeout(f"no reply from {to!r} within {timeout:g} s") if request
            else BrokerUnavailable(f"{to!r} via the broker", timeout))


def _encoded(message: Any) -> bytes:
    payload = packb(message)
    if len(payload) > MAX_FRAME_BYTES:
        raise TooLarge(len(payload), MAX_FRAME_BYTES)
    return payload


def _refusal(code: str, message: str, sender: str | bytes | None) -> RequestRefused:
    if code == ErrorCode.NO_AGENT.value:
        return NoSuchAgent(message)
    if code == ErrorCode.MAILBOX_FULL.value:
        return MailboxFull(message)
    if code == ErrorCode.AGENT_ERROR.value:
        return RemoteError(message, sender)
    return RequestRefused(code, message)


def _close_unawaited(awaitable: Awaitable[Any]) -> None:
    """Close a coroutine that will never run (no "never awaited" warning for it)."""
    if inspect.iscoroutine(awaitable):
        awaitable.close()
