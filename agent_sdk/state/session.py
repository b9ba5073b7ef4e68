"""One session with the state service: the connection, HELLO and WELCOME, heartbeats,
reconnects, and the requests in flight.

The session stays alive while the client sends (an idle one pings every interval); if
the client goes silent for ``interval x liveness``, the service ends the session and
releases its locks. A socket monitor reports when the TCP connection drops and when a
handshake with the service succeeds again: libzmq reconnects by itself after a restart
of the service, and the session must not tear that connection down (losing the
requests on it) just because the restart took longer than the heartbeat expiry.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Final, TYPE_CHECKING

from wire.state import (
    LeaseGranted, LockRelease, StateDone, StateErrorCode, StateErrorReply, StateEvents,
    StateHello, StateMessage, StatePing, StateWatch, StateWelcome,
)
from agent_sdk.reach import handshake_refusal
from agent_sdk.connection import (
    Backoff, Connection, DEFAULT_HEARTBEAT_INTERVAL_S, DEFAULT_HEARTBEAT_LIVENESS, STATE_CODEC,
)
from agent_sdk.errors import OrchestratorError, StateUnavailable, VersionMismatch
from agent_sdk.state.requests import error_for, Line, NoSession, Pending, Requests
from agent_sdk.state.values import ConnectionState

if TYPE_CHECKING:
    from agent_sdk.state.leases import Lease
    from agent_sdk.state.watches import Watch

logger = logging.getLogger(__name__)

#: How long a request waits for its reply (a lock acquire: ``wait`` plus this).
REQUEST_TIMEOUT_S: Final = 10.0
#: How errors name the peer of a session.
STATE_SERVICE: Final = "the state service"


class Session:
    """A connection and session with the state service, and the requests on it.

    Args:
        url: the service's endpoint, or an async function returning it (asked again
            when the service may have moved).
        name: shown as the holder in lock listings.
        request_timeout_s: how long a request waits for its reply by default.

    Attributes:
        url: the endpoint in use ("" until an async ``url`` answered).
        session_id: the routing id, the same across reconnects.
        state: the connection's state.
        instance: id of the service run the session belongs to (changes when it
            restarts).
        leases: the leases held, by lock name.
        watches: the live watches, by the id of the request that set them up.
    """

    def __init__(self, url: str | Callable[[], Awaitable[str]], name: str,
                 request_timeout_s: float = REQUEST_TIMEOUT_S) -> None:
        self._url_source = url
        self.url = url if isinstance(url, str) else ""
        self.name = name
        self.session_id = f"state-{name or 'client'}-{uuid.uuid4().hex[:12]}"
        self.request_timeout_s = request_timeout_s
        self.state = ConnectionState.CLOSED
        self.instance: str | None = None
        self.heartbeat_interval_s = DEFAULT_HEARTBEAT_INTERVAL_S
        self.heartbeat_liveness = DEFAULT_HEARTBEAT_LIVENESS
        self.leases: dict[str, Lease] = {}
        self.watches: dict[int, Watch] = {}
        self.closed = False
        #: the service's ERROR ``bad_version``: it refused this SDK's protocol version
        self.refusal: StateErrorReply | None = None
        self._conn: Connection[StateMessage] | None = None
        self._requests = Requests()
        self._line = Line()
        self._epoch = 0
        self._ready: asyncio.Event | None = None
        self._hello_task: asyncio.Task[None] | None = None
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._moved_check: asyncio.Task[None] | None = None
        self._reconnects = Backoff()

    # ------------------------------------------------------------------ requests

    async def call(self, make: Callable[[int], StateMessage], timeout: float | None = None,
                   acquire: bool = False) -> Any:
        """Send a request (opening the session first if need be) and return its reply.

        Args:
            make: builds the request from its request id.
            timeout: seconds to wait for the reply (default: ``request_timeout_s``).
            acquire: it is a lock acquire: a grant arriving after the caller gave up is
                given straight back.

        Raises:
            StateUnavailable: no reply in time, or the connection was lost meanwhile.
            StateError: the service refused it (a subclass says why).
        """
        loop = asyncio.get_running_loop()
        timeout = self.request_timeout_s if timeout is None else timeout
        deadline = loop.time() + timeout
        while True:
            ready = self._ready
            if self._line or ready is None or not ready.is_set():
                req, future = await self._send_in_line(make, deadline, timeout)
            else:
                req, future = self._requests.send(self._conn, make, self._epoch, deadline,
                                                  timeout)
            epoch = self._epoch
            try:
                return await future
            except NoSession:
                # Refused unapplied: open the session again (unless a newer one already
                # exists), then send it again.
                self._session_lost(epoch)
                continue
            except (asyncio.CancelledError, StateUnavailable):
                if acquire:
                    # Given up on, but the grant may still come: give the lock straight
                    # back then rather than hold it, unrenewed, for a whole ttl.
                    self._requests.abandoned_acquires.add(req)
                raise
            finally:
                self._requests.pop(req)

    async def _send_in_line(self, make: Callable[[int], StateMessage], deadline: float,
                            timeout: float) -> tuple[int, asyncio.Future[Any]]:
        """Wait for the session behind the requests that waited for it first (a
        :class:`Line`), then send: requests leave in the order they were made."""
        loop = asyncio.get_running_loop()
        try:
            async with self._line.turn(max(0.0, deadline - loop.time())):
                await self.ensure(max(0.0, deadline - loop.time()))
                return self._requests.send(self._conn, make, self._epoch, deadline, timeout)
        except TimeoutError:  # the front of the line not reached in time
            raise StateUnavailable(self.url, timeout) from None

    def watch_request(self, watch: Watch, req: int) -> StateWatch:
        """The request that sets ``watch`` up under id ``req`` (registered at once)."""
        # Registered under its req before sending: the events may arrive right after the
        # reply, in the same read, before the awaiting coroutine runs again.
        self.watches.pop(watch.id, None)
        watch.id = req
        self.watches[req] = watch
        return StateWatch(req, watch.prefix, watch.last_version)

    # ------------------------------------------------------------------ the session

    async def ensure(self, timeout: float | None = None) -> None:
        """Return once the session is open, opening it if need be.

        Raises:
            StateUnavailable: not open within ``timeout`` seconds, or closed.
            VersionMismatch: the service refused this SDK's protocol version.
        """
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        if self._ready is None:
            self._ready = asyncio.Event()
        while not self._ready.is_set():
            if self.refusal is not None:
                raise VersionMismatch(self.url, self.refusal.message, STATE_SERVICE)
            if self.closed:
                raise StateUnavailable(self.url, 0.0, "the state client is closed")
            if self._hello_task is None or self._hello_task.done():
                self._hello_task = loop.create_task(self._establish())
            task = self._hello_task
            remaining = None if deadline is None else max(0.0, deadline - loop.time())
            # asyncio.wait, not wait_for: a caller giving up must not cancel the HELLO
            # other callers wait for too.
            done, _ = await asyncio.wait((task,), timeout=remaining)
            if not done:
                raise StateUnavailable(self.url, timeout or 0.0)
            if task.cancelled():
                continue  # a reconnect replaced this HELLO with a new one
            task.result()

    async def _establish(self) -> None:
        """Connect if needed, say HELLO, adopt the WELCOME's settings, check leases, and
        set the watches up again."""
        loop = asyncio.get_running_loop()
        self.state = ConnectionState.CONNECTING
        if self._conn is None:
            if not isinstance(self._url_source, str):
                self.url = await self._url_source()
            self._conn = Connection(self.url, self.session_id.encode(), STATE_CODEC,
                                    self._on_message, monitor=True,
                                    on_event=self._on_link_event)
            self._conn.open()
            if self._heartbeat_task is None:
                self._heartbeat_task = loop.create_task(self._heartbeat_loop(),
                                                        name=f"{self.session_id}-heartbeat")
        req = self._requests.next_id()
        future: asyncio.Future[StateWelcome] = loop.create_future()
        # No deadline: a silent service makes the heartbeat loop reconnect, which
        # cancels this task, and whoever waits for the session starts a new one.
        self._requests.add(req, Pending(future, self._epoch))
        try:
            self._conn.send(StateHello(req, self.name))
            welcome = await future
        finally:
            self._requests.pop(req)
        self._on_welcome(welcome)

    def _on_link_event(self, event: int, value: int) -> None:
        """A refused or failed CURVE handshake fails every waiting request at once with
        :class:`Unauthorized` (rather than a timeout); the heartbeat loop keeps trying."""
        conn = self._conn
        refusal = handshake_refusal(self.url, event, value,
                                    None if conn is None else conn.curve_public_key)
        if refusal is not None:
            logger.error("state session: %s", refusal)
            self._requests.fail_all(refusal)

    async def _establish_logged(self) -> None:
        try:
            await self._establish()
        except OrchestratorError as e:
            # StateUnavailable, or BrokerUnavailable from asking the broker where the
            # service is; the heartbeat loop tries again.
            logger.warning("state session not restored yet: %s", e)

    def _start_establishing(self) -> None:
        """Say HELLO in the background, unless a HELLO is under way already."""
        if self._hello_task is None or self._hello_task.done():
            self._hello_task = asyncio.get_running_loop().create_task(self._establish_logged())

    def _on_welcome(self, welcome: StateWelcome) -> None:
        restarted = self.instance is not None and welcome.instance != self.instance
        self.instance = welcome.instance
        self.heartbeat_interval_s = welcome.heartbeat_interval_s
        self.heartbeat_liveness = welcome.heartbeat_liveness
        self._reconnects.reset()
        previous_epoch = self._epoch
        self._epoch += 1
        if restarted:
            # Requests sent before this HELLO reached the old run of the service or were
            # refused with no_session (and resent); one still waiting went down with it.
            self._requests.fail_sent_before(previous_epoch, StateUnavailable(
                self.url, 0.0, "the state service restarted before answering; the request "
                "may or may not have been applied"))
        held = {(name, token) for name, token, _ in welcome.leases}
        for lease in list(self.leases.values()):
            if (lease.name, lease.token) not in held:
                lease._mark_lost("the session ended on the service (expired or restarted)")
        for watch in list(self.watches.values()):
            if watch.active:
                self._send(self.watch_request(watch, self._requests.next_id()))
        self.state = ConnectionState.READY
        assert self._ready is not None
        self._ready.set()

    def _session_lost(self, epoch: int) -> None:
        if epoch == self._epoch and self._ready is not None and self._ready.is_set():
            self._ready.clear()
            self.state = ConnectionState.CONNECTING

    def _send(self, msg: StateMessage) -> None:
        if self._conn is not None:
            self._conn.send(msg)

    # ------------------------------------------------------------------ heartbeats

    async def _heartbeat_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while not self.closed:
            await asyncio.sleep(self.heartbeat_interval_s / 2)
            self._tick(loop.time())

    def _tick(self, now: float) -> None:
        """Expire requests, ping when idle, and reconnect when the service is silent."""
        self._requests.expire(now, self.url)
        if self.refusal is not None:
            return  # another protocol version: nothing to reconnect to
        conn = self._conn
        if conn is None:
            # Reconnecting failed so far (the service, or the broker that says where it
            # is, was unreachable): try again if a watch or a lease needs it.
            if (self.watches or self.leases) and self._reconnects.due(now) and (
                    self._hello_task is None or self._hello_task.done()):
                self._reconnects.step(now)
                self._hello_task = asyncio.get_running_loop().create_task(
                    self._establish_logged())
            return
        silence = now - conn.last_heard
        if silence > self.heartbeat_interval_s * self.heartbeat_liveness:
            if not self._reconnects.due(now):
                return
            self._reconnects.step(now)
            if conn.transport_up:
                # Connected as far as TCP knows, yet silent: a half-open connection (a
                # partition) that libzmq does not notice. Start over.
                logger.warning("state service at %s silent for %.1f s; reconnecting",
                               self.url, silence)
                self._reconnect()
            elif not isinstance(self._url_source, str) and (
                    self._moved_check is None or self._moved_check.done()):
                # Disconnected: libzmq keeps reconnecting on its own, and requests queued
                # meanwhile go out then. Only if the service moved (a new port after a
                # restart) must the connection change.
                self._moved_check = asyncio.get_running_loop().create_task(
                    self._follow_if_moved())
            return
        if self.state is ConnectionState.READY and \
                now - conn.last_sent >= self.heartbeat_interval_s:
            conn.send(StatePing())

    async def _follow_if_moved(self) -> None:
        assert not isinstance(self._url_source, str)
        try:
            url = await self._url_source()
        except OrchestratorError as e:
            logger.info("cannot ask where the state service is now: %s", e)
            return
        if url != self.url and not self.closed:
            logger.warning("the state service moved from %s to %s; reconnecting", self.url, url)
            self._reconnect()

    def _reconnect(self) -> None:
        """Drop the connection; the next HELLO makes a new one under the same routing id
        (asking where the service is again, in case it moved). What was in flight is
        lost."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self._requests.fail_all(StateUnavailable(self.url, 0.0, "the connection to the "
                                                 "state service was lost; the outcome is "
                                                 "unknown"))
        if self._hello_task is not None:
            self._hello_task.cancel()
            self._hello_task = None
        if self._ready is not None:
            self._ready.clear()
        self.state = ConnectionState.CONNECTING
        if self.watches or self.leases:
            # Something to restore: do not wait for the next request to say HELLO.
            self._start_establishing()

    # ------------------------------------------------------------------ input

    def _on_message(self, msg: StateMessage) -> None:
        match msg:
            case StateEvents(watch_id, events, resync):
                watch = self.watches.get(watch_id)
                if watch is not None and watch.active:
                    watch._deliver(events, resync)
            case StatePing():
                pass
            case StateErrorReply():
                self._on_error(msg)
            case StateDone(req, version) if req in self.watches:
                watch = self.watches[req]
                # From here on the watch has seen everything up to this version.
                if watch.last_version is None:
                    watch.last_version = version
                self._requests.resolve(req, msg)
            case LeaseGranted(req) if req in self._requests.abandoned_acquires:
                self._requests.abandoned_acquires.discard(req)
                self._send(LockRelease(self._requests.next_id(), msg.name, msg.token))
            case _:
                reply_to: int | None = getattr(msg, "req", None)
                if reply_to is None or not self._requests.resolve(reply_to, msg):
                    if logger.isEnabledFor(logging.DEBUG):
                        logger.debug("unexpected %s from the state service", type(msg).__name__)

    def _on_error(self, error: StateErrorReply) -> None:
        req = error.req
        if error.code == StateErrorCode.BAD_VERSION.value:
            self._version_refused(error)
            return
        if error.code == StateErrorCode.WATCH_OVERFLOW.value and req in self.watches:
            watch = self.watches[req]
            logger.warning("watch %r fell behind and is set up again from version %d",
                           watch.prefix, watch.last_version)
            self._send(self.watch_request(watch, self._requests.next_id()))
            return
        if req in self._requests.abandoned_acquires:
            self._requests.abandoned_acquires.discard(req)
            return
        pending = self._requests.get(req)
        if pending is None and error.code == StateErrorCode.NO_SESSION.value:
            # A PING found the session gone (the service restarted, or we were silent too
            # long): open it again now if watches, leases or requests depend on it (the
            # new WELCOME tells whether requests in flight were lost with a restart).
            self._session_lost(self._epoch)
            if self.watches or self.leases or self._requests:
                self._start_establishing()
            return
        if pending is None or pending.future.done():
            logger.warning("state service error %s: %s", error.code, error.message)
            return
        pending.future.set_exception(error_for(error, pending.request))

    def _version_refused(self, error: StateErrorReply) -> None:
        """The service speaks another protocol version (its refusal carries no ``req``):
        fail the HELLO and every request with :class:`VersionMismatch`, end the watches
        and leases, and say HELLO no more."""
        self.refusal = error
        self._requests.fail_all(VersionMismatch(self.url, error.message, STATE_SERVICE))
        for watch in list(self.watches.values()):
            watch._stop()
        self.watches.clear()
        for lease in list(self.leases.values()):
            lease._mark_lost(f"the state service refused this client: {error.message}")

    # ------------------------------------------------------------------ closing

    async def close(self) -> None:
        """Stop watches and heartbeats, fail what is in flight, close the connection
        (release held leases first: closing forgets them)."""
        self.closed = True
        for watch in list(self.watches.values()):
            watch._stop()
        self.watches.clear()
        tasks = [t for t in (self._heartbeat_task, self._hello_task, self._moved_check)
                 if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._requests.fail_all(StateUnavailable(self.url, 0.0, "the state client was closed"))
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self.state = ConnectionState.CLOSED


__all__ = ["REQUEST_TIMEOUT_S", "Session"]
