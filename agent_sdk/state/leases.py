"""Held locks: :class:`Lease`, renewed in the background, and fencing guards."""

from __future__ import annotations

import asyncio
import logging
from typing import Final, TYPE_CHECKING

from wire.state import Fence, LockRelease, LockRenew
from agent_sdk.errors import LeaseLost, StateError, StateUnavailable

if TYPE_CHECKING:
    from agent_sdk.state.session import Session
    from agent_sdk.state.values import FenceLike

logger = logging.getLogger(__name__)

#: A held lease is renewed when this share of its ttl has passed.
RENEW_AT: Final = 1 / 3


class Lease:
    """A held lock. Renewed in the background while held; ``token`` is its fencing token.

    Pass the lease as ``fence=`` to a write and the service refuses the write once the
    lease is no longer the lock's current one.

    Args:
        session: the session that holds it.
        name: the lock's name.
        token: the fencing token the service granted.
        ttl_s: seconds the lease lasts unless renewed.
    """

    def __init__(self, session: Session, name: str, token: int, ttl_s: float) -> None:
        self.name = name
        self.token = token
        self.ttl_s = ttl_s
        self._session = session
        self._lost = asyncio.Event()
        self._released = False
        self._renewer: asyncio.Task[None] | None = None
        #: loop time after which this side can no longer assume the lease is held
        self.valid_until = asyncio.get_running_loop().time() + ttl_s

    @property
    def fence(self) -> Fence:
        """The ``(lock name, token)`` pair a guarded write carries."""
        return (self.name, self.token)

    @property
    def lost(self) -> bool:
        """True once the lease is known (or must be assumed) to be gone."""
        if not self._lost.is_set() and asyncio.get_running_loop().time() >= self.valid_until:
            self._mark_lost("its ttl passed without a confirmed renewal")
        return self._lost.is_set()

    @property
    def held(self) -> bool:
        """Neither released nor lost."""
        return not self._released and not self.lost

    async def wait_lost(self) -> None:
        """Return when the lease is lost (never, if it is released first)."""
        await self._lost.wait()

    async def renew(self, ttl: float | None = None) -> None:
        """Extend the lease to ``ttl`` (default: its own) from now.

        Raises:
            LeaseLost: the service no longer counts it as held.
        """
        sent_at = asyncio.get_running_loop().time()
        try:
            reply = await self._session.call(
                lambda req: LockRenew(req, self.name, self.token, ttl))
        except LeaseLost:
            self._mark_lost("the service says it is not held")
            raise
        self.ttl_s = reply.ttl_s
        self.valid_until = sent_at + reply.ttl_s

    async def release(self) -> None:
        """Give the lock back (the next waiter gets it at once). Releasing a lease that
        was lost, or twice, does nothing."""
        if self._released:
            return
        self._released = True
        self._stop_renewing()
        self._forget()
        if self._lost.is_set():
            return
        try:
            await self._session.call(lambda req: LockRelease(req, self.name, self.token))
        except LeaseLost:
            logger.warning("lease %d of lock %r had already expired when released", self.token,
                           self.name)
        except StateUnavailable as e:
            # The lease then ends at its ttl; nothing more can be done from here.
            logger.warning("could not release lock %r (%s); it expires in its ttl", self.name, e)

    def _forget(self) -> None:
        # Only this lease: the same client may hold a newer lease of the same lock.
        if self._session.leases.get(self.name) is self:
            del self._session.leases[self.name]

    def _start_renewing(self) -> None:
        self._renewer = asyncio.get_running_loop().create_task(
            self._renew_loop(), name=f"renew-{self.name}")

    def _stop_renewing(self) -> None:
        if self._renewer is not None and self._renewer is not asyncio.current_task():
            self._renewer.cancel()
        self._renewer = None

    async def _renew_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._released and not self._lost.is_set():
            await asyncio.sleep(self.ttl_s * RENEW_AT)
            if self._released or self.lost:
                return
            try:
                await self.renew()
            except LeaseLost:
                return
            except (StateUnavailable, StateError) as e:
                # Try again next period; the lease may still be valid on the service.
                logger.warning("renewing lock %r failed: %s (%.1f s of lease left)", self.name,
                               e, self.valid_until - loop.time())

    def _mark_lost(self, why: str) -> None:
        if not self._lost.is_set():
            self._lost.set()
            self._forget()
            if not self._released:
                logger.warning("lease %d of lock %r lost: %s", self.token, self.name, why)
        self._stop_renewing()

    async def __aenter__(self) -> Lease:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.release()

    def __repr__(self) -> str:
        state = "released" if self._released else ("lost" if self._lost.is_set() else "held")
        return f"Lease({self.name!r}, token={self.token}, {state})"


def fence_of(fence: FenceLike | None) -> Fence | None:
    """The wire form of a fencing guard (None: no guard)."""
    if fence is None:
        return None
    if isinstance(fence, Lease):
        return fence.fence
    name, token = fence
    return (str(name), int(token))


__all__ = ["Lease", "RENEW_AT", "fence_of"]
