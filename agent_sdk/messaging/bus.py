"""The pub/sub bus: subscriptions, sequence tracking, probes and publishing.

See :mod:`agent_sdk.messaging` for the semantics; :class:`BusMessaging` is the part of a
:class:`~agent_sdk.messaging.Messenger` that keeps the bus's state, over the sockets of
:class:`agent_sdk.connection.BusSockets`.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterable
from typing import Any, Final

from wire.bus import (
    BUS_BROKER_SENDER, RESERVED_PREFIX_BYTES, RESERVED_PREFIXES, decode_bus, encode_bus,
    encode_bus_probe, topic_routes, PrefixSet,
)
from wire.errors import DecodeError
from wire.limits import MAX_FRAME_BYTES
from agent_sdk.connection import BusSockets
from agent_sdk.errors import BusUnavailable, ReservedTopic, TooLarge, WaitTimeout

logger = logging.getLogger(__name__)

#: Messages a subscription without a handler keeps until ``next``; beyond, dropped.
SUBSCRIPTION_QUEUE_SIZE: Final = 10_000
#: Async bus handler calls running at once. At the limit the SDK stops reading the bus:
#: messages then wait in ZeroMQ's bounded queues, and the forwarder drops for this
#: subscriber if that lasts, instead of this process growing without bound.
MAX_BUS_HANDLERS: Final = 1000
#: How long awaiting a subscription waits for its probe by default.
SUBSCRIBE_TIMEOUT_S: Final = 10.0
#: First and longest wait before a subscription probe is sent again: our own publisher
#: drops the first ones until the subscription has reached it.
PROBE_RETRY_MIN_S: Final = 0.02
PROBE_RETRY_MAX_S: Final = 0.5
#: ``publish`` lets the loop run once every this many calls, so that a publishing loop
#: does not starve heartbeats and the reading of the connection.
PUBLISH_YIELD_EVERY: Final = 256
#: (publisher, topic) sequence trackers and per-topic counters kept; the oldest go first
#: (a forgotten stream restarts its count without a false gap).
MAX_TRACKED_STREAMS: Final = 100_000
#: The largest jump in a stream's sequence numbers counted as lost messages (far more
#: than any socket queue holds); a bigger one is a new start.
MAX_COUNTED_GAP: Final = 1_000_000
#: A bad bus message is logged once per this many (all are counted).
LOG_EVERY_UNDECODABLE: Final = 1000


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


class Subscription:
    """One ``subscribe`` call: a topic prefix and a handler, or a queue of messages.

    Awaiting it waits until the subscription is confirmed (see :mod:`agent_sdk.messaging`)
    and returns it: ``sub = await agent.subscribe("news.")``.
    """

    def __init__(self, bus: BusMessaging, topic: str, handler: BusHandler | None,
                 queue_size: int) -> None:
        self.topic = topic
        self.handler = handler
        self.confirmed = False
        self.active = True
        #: messages delivered to it, and dropped because its queue was full
        self.received = 0
        self.dropped = 0
        self._bus = bus
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
            await self._bus.confirm(self.topic, timeout)
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
        self._bus.remove(self)

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
            self._bus.counters["bus_overflow"] += 1
        return None

    def __repr__(self) -> str:
        state = "confirmed" if self.confirmed else ("active" if self.active else "cancelled")
        return f"Subscription({self.topic!r}, {state}, received {self.received})"


class HeardByBroker:
    """Which of our event prefixes the broker's events socket has answered with a probe
    since they were subscribed, and who waits for that (``Subscription.confirm``)."""

    def __init__(self) -> None:
        self._heard: set[str] = set()
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}

    def forget(self, prefix: str) -> None:
        """``prefix`` was (un)subscribed afresh: wait for a new answer."""
        self._heard.discard(prefix)

    def clear(self) -> None:
        """New sockets: every prefix waits for a new answer."""
        self._heard.clear()

    def probe(self, probe_topic: str, subscribed: Iterable[str]) -> None:
        """The broker's probe on ``probe_topic`` arrived: each subscribed event prefix it
        starts with is heard (a message on that topic passed the broker's filter for
        us)."""
        for prefix in subscribed:
            if prefix in self._heard or not probe_topic.startswith(prefix):
                continue
            if not topic_routes(prefix)[1]:
                continue
            self._heard.add(prefix)
            for future in self._waiters.get(prefix, ()):
                if not future.done():
                    future.set_result(None)

    async def wait(self, prefix: str, timeout: float) -> None:
        """Return once the broker answered our subscription to ``prefix``.

        Raises:
            WaitTimeout: no answer within ``timeout`` seconds.
        """
        if prefix in self._heard:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters = self._waiters.setdefault(prefix, [])
        waiters.append(future)
        try:
            await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            raise WaitTimeout(f"subscription to {prefix!r} not confirmed by the broker's "
                              f"events socket within {timeout:g} s") from None
        finally:
            waiters.remove(future)
            if not waiters:
                self._waiters.pop(prefix, None)


class BusMessaging:
    """The bus state of one agent or client.

    Args:
        peer_id: returns this peer's routing id (the sender of what it publishes).
        endpoints: returns the broker's endpoints (``bus_out``, ``bus_in``), waiting for
            them if need be.
        counters: the messaging counters, shared with direct messages.
        spawn: runs a coroutine as a task the owner cancels at close.
        started: says whether waiting for the endpoints can succeed (see
            :class:`~agent_sdk.messaging.Messenger`).
    """

    def __init__(self, peer_id: Callable[[], str],
                 endpoints: Callable[[], Awaitable[dict[str, str]]], counters: Counter[str],
                 spawn: Callable[[Awaitable[Any]], None],
                 started: Callable[[], bool] | None = None) -> None:
        self._peer_id = peer_id
        self._endpoints = endpoints
        self._started = started
        self._spawn = spawn
        self.counters = counters
        #: the forwarder's frame limit (the broker's, once announced: WELCOME)
        self.max_frame_bytes = MAX_FRAME_BYTES
        self._urls: tuple[str, str] | None = None
        #: the broker's events socket (its own topics, published by it alone)
        self._events_url: str | None = None
        self._heard = HeardByBroker()
        #: some subscription on the forwarder (``""``, ``"t"``) also matches broker
        #: topics: only then can one arrive there (a SUB drops what none of its
        #: subscriptions match), so only then is the topic checked
        self._check_forged = False
        self._opening: asyncio.Task[None] | None = None
        self._sockets: BusSockets | None = None
        self._subscriptions: dict[str, list[Subscription]] = {}
        #: what subscribers want, as the forwarder told our publisher socket
        self._remote = PrefixSet()
        self._subscriber_waiters: list[tuple[bytes, asyncio.Future[None]]] = []
        self._probe_ids = itertools.count(1)
        self._probes: dict[int, asyncio.Future[None]] = {}
        self._seq_out: dict[str, int] = {}
        self._seq_in: dict[tuple[str, str], int] = {}
        #: handler calls running, and whether reading stopped because they are too many
        self._handling = 0
        self._paused = False
        self._published = 0

    # ------------------------------------------------------------ subscribing

    def subscribe(self, topic: str, handler: BusHandler | None = None, *,
                  queue_size: int = SUBSCRIPTION_QUEUE_SIZE) -> Subscription:
        """Subscribe; see :meth:`agent_sdk.messaging.Messenger.subscribe`."""
        subscription = Subscription(self, topic, handler, queue_size)
        subscribers = self._subscriptions.setdefault(topic, [])
        subscribers.append(subscription)
        if len(subscribers) == 1:
            self._check_forged |= topic_routes(topic) == (True, True)
            if self._sockets is not None:
                self._listen(self._sockets, topic)
        if self._sockets is None:
            self._request_open()
        return subscription

    def _listen(self, sockets: BusSockets, topic: str) -> None:
        """Subscribe the sockets that can carry ``topic``: broker topics come from the
        events socket only (the forwarder would carry forgeries too)."""
        shared, events = topic_routes(topic)
        if shared:
            sockets.subscribe(topic)
        if events:
            self._heard.forget(topic)
            sockets.subscribe_events(topic)

    def unsubscribe(self, subscription: Subscription | str) -> None:
        """Cancel a subscription, or every subscription to a topic prefix."""
        if isinstance(subscription, Subscription):
            self.remove(subscription)
            return
        for sub in list(self._subscriptions.get(subscription, ())):
            self.remove(sub)

    def remove(self, subscription: Subscription) -> None:
        """Cancel one subscription (again: nothing)."""
        subscribers = self._subscriptions.get(subscription.topic)
        if not subscription.active or subscribers is None:
            return
        subscription.active = False
        subscribers.remove(subscription)
        if subscribers:
            return
        del self._subscriptions[subscription.topic]
        if self._sockets is not None:
            shared, events = topic_routes(subscription.topic)
            if shared:
                self._sockets.unsubscribe(subscription.topic)
            if events:
                self._sockets.unsubscribe_events(subscription.topic)
        self._heard.forget(subscription.topic)
        self._check_forged = any(topic_routes(t) == (True, True) for t in self._subscriptions)
        # Streams no subscription covers any more start afresh if subscribed again: the
        # messages in between were not wanted, not lost.
        remaining = tuple(self._subscriptions)
        for key in [k for k in self._seq_in if not k[1].startswith(remaining)]:
            del self._seq_in[key]

    async def confirm(self, topic: str, timeout: float) -> None:
        """Return once every socket ``topic`` comes through hears the subscription: the
        broker's events socket answered it with a probe (broker topics), and a probe we
        published on the forwarder came back (other topics).

        Raises:
            WaitTimeout: not confirmed within ``timeout`` seconds.
            BusUnavailable: the broker runs no bus (or, for broker topics, no events
                socket).
        """
        await self._ensure_open()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        shared, events = topic_routes(topic)
        if events:
            sockets = self._sockets
            if sockets is not None and sockets.has_events:
                await self._heard.wait(topic, timeout)
            elif not shared:
                raise BusUnavailable(f"the broker announces no events socket: nothing "
                                     f"would arrive on {topic!r}")
        if shared:
            await self._confirm_shared(topic, max(0.0, deadline - loop.time()))

    async def _confirm_shared(self, topic: str, timeout: float) -> None:
        """Publish probes on ``topic`` until one comes back through the forwarder."""
        loop = asyncio.get_running_loop()
        token = next(self._probe_ids)
        future: asyncio.Future[None] = loop.create_future()
        self._probes[token] = future
        deadline = loop.time() + timeout
        retry_s = PROBE_RETRY_MIN_S
        try:
            while True:
                if self._sockets is not None:
                    self._sockets.publish(encode_bus_probe(topic, self._peer_id(), token))
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

    # ------------------------------------------------------------ publishing

    async def publish(self, topic: str, message: Any) -> None:
        """Publish; see :meth:`agent_sdk.messaging.Messenger.publish`.

        Raises:
            ReservedTopic: ``topic`` is one of the broker's (``agents.``, ``tasks.``).
        """
        if topic.startswith(RESERVED_PREFIXES):
            raise ReservedTopic(topic)
        sockets = self._sockets
        if sockets is None:
            await self._ensure_open()
            sockets = self._sockets
            assert sockets is not None
        seq_out = self._seq_out
        seq = seq_out.get(topic, 0) + 1
        if seq == 1 and len(seq_out) >= MAX_TRACKED_STREAMS:
            del seq_out[next(iter(seq_out))]
        seq_out[topic] = seq
        frames = encode_bus(topic, self._peer_id(), seq, message)
        if len(frames[1]) > self.max_frame_bytes:
            raise TooLarge(len(frames[1]), self.max_frame_bytes)
        sockets.publish(frames)
        self.counters["bus_published"] += 1
        self._published += 1
        if self._published % PUBLISH_YIELD_EVERY == 0:
            await asyncio.sleep(0)

    async def wait_for_subscribers(self, topic: str, timeout: float = SUBSCRIBE_TIMEOUT_S
                                   ) -> None:
        """Wait for a subscriber; see :meth:`agent_sdk.messaging.Messenger.wait_for_subscribers`.

        Raises:
            ReservedTopic: ``topic`` is one of the broker's: nobody could publish it.
        """
        if topic.startswith(RESERVED_PREFIXES):
            raise ReservedTopic(topic)
        await self._ensure_open()
        if self._sockets is not None:
            self._sockets.read_subscriptions()
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

    def _on_subscriptions(self, messages: list[bytes]) -> None:
        changed = False
        for message in messages:
            changed |= self._remote.apply(message)
        if changed and self._subscriber_waiters:
            for wanted, future in self._subscriber_waiters:
                if not future.done() and self._remote.matches(wanted):
                    future.set_result(None)

    # ------------------------------------------------------------ receiving

    def on_frames(self, frames: list[bytes], from_events: bool = False) -> None:
        """One message from the forwarder (or, ``from_events``, from the broker's events
        socket): a probe, or a message for our subscriptions. One function for both, as
        this runs per message."""
        if self._check_forged and not from_events and frames[0].startswith(
                RESERVED_PREFIX_BYTES):
            # A broker topic through the shared forwarder: somebody else published it
            # (the broker's events never take this way). Dropped before decoding.
            _count_forged(self.counters, frames[0])
            return
        try:
            envelope = decode_bus(frames)
        except DecodeError as e:
            undecodable = self.counters["bus_undecodable"] = \
                self.counters["bus_undecodable"] + 1
            if undecodable % LOG_EVERY_UNDECODABLE == 1:
                # Once per so many: a peer spraying garbage must not flood every log.
                logger.warning("dropped a bad bus message (%d so far): %s", undecodable, e)
            return
        topic, sender, seq, data, probe = envelope
        if probe is not None:
            if from_events:
                if sender == BUS_BROKER_SENDER:
                    self._heard.probe(topic, self._subscriptions)
            elif sender == self._peer_id():
                future = self._probes.get(probe)
                if future is not None and not future.done():
                    future.set_result(None)
            return
        # Counted here rather than in a helper: this runs per message.
        key = (sender, topic)
        seq_in = self._seq_in
        last = seq_in.get(key)
        if last is None:
            # The first message of a stream we see: a late joiner starts anywhere.
            if len(seq_in) >= MAX_TRACKED_STREAMS:
                del seq_in[next(iter(seq_in))]
        elif seq > last + 1:
            missed = seq - last - 1
            # A jump no queue could have dropped (a forged sequence number) starts the
            # stream anew instead of counting as loss: it would swell the counter at will.
            if missed <= MAX_COUNTED_GAP:
                self.counters["bus_gaps"] += missed
        seq_in[key] = seq
        self.counters["bus_received"] += 1
        message = BusMessage(topic, sender, seq, data)
        awaitables = self._deliver(message)
        if awaitables:
            self._handling += 1
            if self._handling >= MAX_BUS_HANDLERS:
                self._pause(True)
            self._spawn(self._finish_handlers(message, awaitables))

    def on_event_frames(self, frames: list[bytes]) -> None:
        """One message from the broker's events socket: its probe or one of its events."""
        self.on_frames(frames, True)

    def _deliver(self, message: BusMessage) -> list[Awaitable[Any]] | None:
        """Hand ``message`` to every matching subscription; returns what async handlers
        made of it."""
        awaitables = None
        for prefix, subscribers in self._subscriptions.items():
            if not message.topic.startswith(prefix):
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
        return awaitables

    async def _finish_handlers(self, message: BusMessage,
                               awaitables: list[Awaitable[Any]]) -> None:
        outcomes = await asyncio.gather(*awaitables, return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, Exception):
                self.counters["handler_errors"] += 1
                logger.error("bus handler failed on %r", message, exc_info=outcome)
        self._handling -= 1
        if self._paused and self._handling < MAX_BUS_HANDLERS // 2:
            self._pause(False)

    def _pause(self, paused: bool) -> None:
        self._paused = paused
        if self._sockets is not None:
            if paused:
                self._sockets.pause()
            else:
                self._sockets.resume()

    # ------------------------------------------------------------ the sockets

    def set_endpoints(self, endpoints: dict[str, str]) -> None:
        """Adopt the broker's endpoints; see :meth:`agent_sdk.messaging.Messenger.set_endpoints`."""
        bus_out, bus_in = endpoints.get("bus_out"), endpoints.get("bus_in")
        events = endpoints.get("events") or None
        if bus_out is None or bus_in is None or (
                self._urls == (bus_out, bus_in) and self._events_url == events):
            return
        self._urls = (bus_out, bus_in)
        self._events_url = events
        if self._sockets is not None:
            logger.info("bus endpoints changed to %s; reconnecting", self._urls)
            self._close_sockets()
            self._open_sockets()
        elif self._subscriptions and _loop_running():
            self._open_sockets()

    def _request_open(self) -> None:
        """Open the bus in the background, if a loop runs (otherwise the first
        :meth:`set_endpoints` or publish does it)."""
        if not _loop_running():
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

    async def _ensure_open(self) -> None:
        if self._sockets is not None:
            return
        if self._started is not None and not self._started():
            raise BusUnavailable("the bus is known once the agent registered, after on_start: "
                                 "subscribe() there without await, and await subscriptions "
                                 "or publish from tasks and handlers")
        self._request_open()
        assert self._opening is not None
        await asyncio.shield(self._opening)

    async def _open_when_known(self) -> None:
        if self._urls is None:
            endpoints = await self._endpoints()
            if not endpoints.get("bus_out") or not endpoints.get("bus_in"):
                raise BusUnavailable("the broker announces no bus (is it running with "
                                     "--no-bus?)")
            self._urls = (endpoints["bus_out"], endpoints["bus_in"])
            self._events_url = endpoints.get("events") or None
        if self._sockets is None:
            self._open_sockets()

    def _open_sockets(self) -> None:
        assert self._urls is not None
        routes = {topic: topic_routes(topic) for topic in self._subscriptions}
        shared: Iterable[str] = [topic for topic, (on_bus, _) in routes.items() if on_bus]
        events = [topic for topic, (_, on_events) in routes.items() if on_events]
        # New sockets: every event subscription waits for the broker's answer again.
        self._heard.clear()
        self._sockets = BusSockets(self._urls, shared, self.on_frames, self._on_subscriptions,
                                   self._events_url, events, self.on_event_frames)
        if self._paused:
            self._sockets.pause()

    def _close_sockets(self) -> None:
        if self._sockets is not None:
            self._sockets.close()
            self._sockets = None
        self._remote.clear()

    def close(self) -> None:
        """Stop opening the bus and close its sockets."""
        if self._opening is not None and not self._opening.done():
            self._opening.cancel()
        self._close_sockets()


def _count_forged(counters: Counter[str], topic: bytes) -> None:
    """Count (and log the first) broker topic that came through the shared forwarder."""
    if not counters["bus_forged"]:
        logger.warning("dropped a message on the broker's topic %r that came through the "
                       "shared bus (only the broker's events socket carries broker "
                       "topics); further ones are counted as bus_forged",
                       topic[:200].decode(errors="replace"))
    counters["bus_forged"] += 1


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


__all__ = [
    "BusHandler", "BusMessage", "BusMessaging", "SUBSCRIBE_TIMEOUT_S",
    "SUBSCRIPTION_QUEUE_SIZE", "Subscription",
]
