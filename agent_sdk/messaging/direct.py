"""Direct messages through the broker: sending, replies, the mailbox and the handlers.

See :mod:`agent_sdk.messaging` for the semantics; :class:`DirectMessaging` is the part of
a :class:`~agent_sdk.messaging.Messenger` that keeps their bookkeeping.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, Final

from wire.codec import chunks, packb, unpackb
from wire.limits import MAX_FRAME_BYTES
from wire.tasks import (
    Direct, DIRECT_ASK, DIRECT_BROADCAST, DIRECT_NO_ACK, DirectItem, DirectVerdict, ErrorCode,
    Message,
)
from agent_sdk.errors import (
    BrokerUnavailable, MailboxFull, NoSuchAgent, RemoteError, RequestRefused, TooLarge,
    WaitTimeout,
)

logger = logging.getLogger(__name__)

#: Direct messages received and not yet taken by ``receive`` (or handler calls still
#: running); beyond it a message is dropped and counted, and a request is answered with
#: the error ``mailbox_full``.
MAILBOX_SIZE: Final = 10_000
#: How long ``send`` waits for the broker's verdict by default.
ACK_TIMEOUT_S: Final = 10.0
#: How long ``request`` waits for the reply by default.
REQUEST_TIMEOUT_S: Final = 30.0


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


DirectHandler = Callable[[DirectMessage], Any]


class DirectMessaging:
    """The direct-message state of one agent or client.

    Args:
        peer_id: returns this peer's routing id.
        send: sends a protocol message on the peer's broker connection.
        counters: the messaging counters, shared with the bus.
        spawn: runs a coroutine as a task the owner cancels at close.
        mailbox_size: bound of the mailbox (and of handler calls running at once).
    """

    def __init__(self, peer_id: Callable[[], str], send: Callable[[Message], None],
                 counters: Counter[str], spawn: Callable[[Awaitable[Any]], None],
                 mailbox_size: int = MAILBOX_SIZE) -> None:
        self._peer_id = peer_id
        self._send = send
        self._spawn = spawn
        self.counters = counters
        self.mailbox_size = mailbox_size
        self._ids = itertools.count(1)
        #: items to send at the end of this loop iteration, in one DIRECT message
        self._outgoing: list[DirectItem] = []
        #: send() futures awaiting the broker's verdict: id -> (future, loop time sent)
        self._acks: dict[int, tuple[asyncio.Future[None], float]] = {}
        #: request() futures awaiting the reply, by message id
        self.replies: dict[int, asyncio.Future[Any]] = {}
        self._mailbox: asyncio.Queue[DirectMessage] = asyncio.Queue(mailbox_size)
        self._handlers: list[DirectHandler] = []
        self._handling = 0

    # ------------------------------------------------------------ sending

    def send_nowait(self, to: str, message: Any, *, broadcast: bool = False
                    ) -> asyncio.Future[None]:
        """Send a direct message now; the future resolves when the broker routed it.

        Raises:
            TypeError: ``message`` is not msgpack-encodable.
            TooLarge: the encoded message exceeds the frame limit.
        """
        return self._post(to, message, broadcast)[1]

    def _post(self, to: str | bytes, message: Any, broadcast: bool
              ) -> tuple[int, asyncio.Future[None]]:
        loop = asyncio.get_running_loop()
        msg_id = next(self._ids)
        self._queue(_new_item((to, msg_id, encoded(message), None,
                               DIRECT_BROADCAST if broadcast else 0, None, None)))
        future: asyncio.Future[None] = loop.create_future()
        self._acks[msg_id] = (future, loop.time())
        self.counters["direct_sent"] += 1
        return msg_id, future

    def _queue(self, item: DirectItem) -> None:
        """Send ``item`` with the others of this loop iteration, in one message."""
        if not self._outgoing:
            asyncio.get_running_loop().call_soon(self.flush)
        self._outgoing.append(item)

    def flush(self) -> None:
        """Send the items queued in this loop iteration now, in as few messages as fit."""
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
                future = entry[0] if entry is not None else self.replies.pop(item[1], None)
                if future is not None and not future.done():
                    future.set_exception(e)

    async def send(self, to: str, message: Any, *, broadcast: bool = False,
                   timeout: float = ACK_TIMEOUT_S) -> None:
        """Send a direct message; see :meth:`agent_sdk.messaging.Messenger.send`."""
        msg_id, future = self._post(to, message, broadcast)
        timer = asyncio.get_running_loop().call_later(timeout, _time_out, future, to, timeout,
                                                      False)
        try:
            await future
        finally:
            timer.cancel()
            self._acks.pop(msg_id, None)

    async def request(self, to: str, message: Any, *, timeout: float = REQUEST_TIMEOUT_S) -> Any:
        """Send a request and return the reply's data; see
        :meth:`agent_sdk.messaging.Messenger.request`."""
        loop = asyncio.get_running_loop()
        msg_id = next(self._ids)
        self._queue(_new_item((to, msg_id, encoded(message), None, DIRECT_ASK | DIRECT_NO_ACK,
                               None, None)))
        future: asyncio.Future[Any] = loop.create_future()
        self.replies[msg_id] = future
        self.counters["direct_sent"] += 1
        # A timer rather than wait_for: requests are a hot path, and wait_for costs a Task.
        timer = loop.call_later(timeout, _time_out, future, to, timeout, True)
        try:
            return await future
        finally:
            timer.cancel()
            self.replies.pop(msg_id, None)

    def reply(self, message: DirectMessage, payload: bytes,
              error: tuple[str, str] | None = None) -> None:
        """Queue the answer to a request: ``payload`` (msgpack) or ``error`` (code, text)."""
        # No acknowledgement: the requester may be gone, and then nobody waits for it.
        self._queue(_new_item((message.sender, next(self._ids), payload, message.id,
                               DIRECT_NO_ACK, error, None)))

    # ------------------------------------------------------------ receiving

    def on_message(self, handler: DirectHandler) -> DirectHandler:
        """Register a handler; see :meth:`agent_sdk.messaging.Messenger.on_message`."""
        self._handlers.append(handler)
        return handler

    async def receive(self, timeout: float | None = None) -> DirectMessage:
        """The next message of the mailbox; see :meth:`agent_sdk.messaging.Messenger.receive`."""
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
                self.reply(DirectMessage(sender, None, msg_id, to, True, False), b"",
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
        future = self.replies.pop(item[3], None)  # type: ignore[arg-type]
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
            self.reply(message, b"", (ErrorCode.MAILBOX_FULL.value,
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
                self.reply(message, encoded(answer))
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
                    self.reply(message, encoded(outcome))
                    break

    def _handler_failed(self, message: DirectMessage, error: Exception) -> None:
        self.counters["handler_errors"] += 1
        logger.error("direct message handler failed on %r", message, exc_info=error)
        if message.expects_reply:
            self.reply(message, b"", (ErrorCode.AGENT_ERROR.value,
                                      f"{type(error).__name__}: {error}"))

    # ------------------------------------------------------------ the broker's verdicts

    def on_verdict(self, verdict: DirectVerdict) -> None:
        """The broker's word on messages we sent."""
        acks = self._acks
        for msg_id in verdict.acks:
            entry = acks.pop(msg_id, None)
            if entry is not None and not entry[0].done():
                entry[0].set_result(None)
        for msg_id, code, text in verdict.errors:
            entry = acks.pop(msg_id, None)
            future = entry[0] if entry is not None else self.replies.pop(msg_id, None)
            if future is None or future.done():
                # A reply or an unacknowledged message that found nobody.
                self.counters["undelivered"] += 1
                logger.debug("direct message %d undelivered: %s: %s", msg_id, code, text)
                continue
            future.set_exception(_refusal(code, text, None))

    def expire(self, now: float) -> None:
        """Fail ``send_nowait`` futures the broker never answered (it went away).

        Args:
            now: the loop's time.
        """
        acks = self._acks
        while acks:
            msg_id, (future, sent_at) = next(iter(acks.items()))
            if now - sent_at < ACK_TIMEOUT_S:
                break
            del acks[msg_id]
            if not future.done():
                future.set_exception(BrokerUnavailable("the broker", ACK_TIMEOUT_S))

    def cancel_waiting(self, error: Exception | None = None) -> None:
        """Cancel what still waits for a verdict or a reply (at close), or fail it with
        ``error`` (the broker refused this SDK's protocol version)."""
        waiting = [future for future, _ in self._acks.values()]
        waiting.extend(self.replies.values())
        self._acks.clear()
        self.replies.clear()
        for future in waiting:
            if error is None:
                future.cancel()
            elif not future.done():
                future.set_exception(error)


def encoded(message: Any) -> bytes:
    """``message`` as msgpack, checked against the frame limit.

    Raises:
        TypeError: it is not msgpack-encodable.
        TooLarge: it encodes to more than ``MAX_FRAME_BYTES``.
    """
    payload = packb(message)
    if len(payload) > MAX_FRAME_BYTES:
        raise TooLarge(len(payload), MAX_FRAME_BYTES)
    return payload


def _new_item(fields: tuple[Any, ...]) -> DirectItem:
    # tuple.__new__ skips the NamedTuple's Python-level __new__: this is per message.
    return tuple.__new__(DirectItem, fields)


def _time_out(future: asyncio.Future[Any], to: str, timeout: float, request: bool) -> None:
    """Timer callback: no reply (request) or no verdict (send) within ``timeout``."""
    if not future.done():
        future.set_exception(
            WaitTimeout(f"no reply from {to!r} within {timeout:g} s") if request
            else BrokerUnavailable(f"{to!r} via the broker", timeout))


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


__all__ = [
    "ACK_TIMEOUT_S", "DirectHandler", "DirectMessage", "DirectMessaging", "MAILBOX_SIZE",
    "REQUEST_TIMEOUT_S", "encoded",
]
