"""Live watches: :class:`Watch` hands every change under a prefix to its handler."""

from __future__ import annotations

import asyncio
import inspect
import logging
from typing import TYPE_CHECKING

from wire.state import Entry, StateUnwatch
from agent_sdk.errors import StateUnavailable
from agent_sdk.state.values import Change, decode_value, Handler

if TYPE_CHECKING:
    from agent_sdk.state.session import Session

logger = logging.getLogger(__name__)


class Watch:
    """A live watch: the handler gets every change under ``prefix`` in version order.

    Args:
        session: the session it is set up on (again after each reconnect).
        prefix: the key prefix watched.
        handler: called with each :class:`~agent_sdk.state.Change`; a coroutine
            function is awaited change by change, in a task of its own.
        since: deliver changes after this version (None: from when the watch starts).
    """

    def __init__(self, session: Session, prefix: str, handler: Handler,
                 since: int | None) -> None:
        self.prefix = prefix
        self.handler = handler
        #: version of the last change delivered, or the version the watch started at
        #: (None until the service confirmed the watch)
        self.last_version: int | None = since
        self.id = 0
        self.active = True
        self._session = session
        self._queue: asyncio.Queue[Change] | None = None
        self._consumer: asyncio.Task[None] | None = None
        if inspect.iscoroutinefunction(handler):
            self._queue = asyncio.Queue()
            self._consumer = asyncio.get_running_loop().create_task(
                self._consume(), name=f"watch-{prefix}")

    async def cancel(self) -> None:
        """Stop the watch (changes already received are still delivered)."""
        if not self.active:
            return
        self.active = False
        self._session.watches.pop(self.id, None)
        try:
            await self._session.call(lambda req: StateUnwatch(req, self.id))
        except StateUnavailable:
            pass  # the service forgets the watch with the session anyway
        if self._consumer is not None and self._queue is not None:
            await self._queue.join()
            self._consumer.cancel()

    def _stop(self) -> None:
        """End the watch here at once, without telling the service (at close, or when
        setting it up failed)."""
        self.active = False
        if self._consumer is not None:
            self._consumer.cancel()

    def _deliver(self, events: list[Entry], resync: bool) -> None:
        for key, version, value in events:
            if self.last_version is not None and version <= self.last_version:
                continue  # already delivered before a re-watch replayed it
            self.last_version = version
            change = Change(key, version, decode_value(value), value is None, resync)
            if self._queue is not None:
                self._queue.put_nowait(change)
                continue
            try:
                self.handler(change)
            except Exception:  # noqa: BLE001 - one bad change must not end the watch
                logger.exception("watch handler for %r failed on %s", self.prefix, key)

    async def _consume(self) -> None:
        assert self._queue is not None
        while True:
            change = await self._queue.get()
            try:
                await self.handler(change)  # type: ignore[misc]
            except Exception:  # noqa: BLE001 - one bad change must not end the watch
                logger.exception("watch handler for %r failed on %s", self.prefix, change.key)
            finally:
                self._queue.task_done()

    def __repr__(self) -> str:
        return f"Watch({self.prefix!r}, id={self.id}, last_version={self.last_version})"


__all__ = ["Watch"]
