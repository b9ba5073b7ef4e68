"""The agent's upkeep of its connection with the broker: heartbeats, lease renewals of
running tasks, results sent again, and reconnecting when the broker falls silent.

:class:`BrokerLink` is the agent's collaborator for it, kept apart from
:class:`~agent_sdk.agent.BaseAgent` so that the agent class holds what agents override and
call.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from typing import TYPE_CHECKING

from wire.tasks import Heartbeat, Message, Ready

from agent_sdk.connection import (
    Backoff, DEFAULT_HEARTBEAT_INTERVAL_S, DEFAULT_HEARTBEAT_LIVENESS, Transport,
)
from agent_sdk.reach import handshake_refusal

if TYPE_CHECKING:
    from agent_sdk.agent import BaseAgent

logger = logging.getLogger("agent_sdk.agent")


class AgentState(enum.Enum):
    """The agent's connection with the broker."""

    __hash__ = object.__hash__  # identity, as members compare: C speed, not Enum's

    STARTING = "starting"
    REGISTERING = "registering"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"


class BrokerLink:
    """Keeps an agent's connection with the broker alive: READY, heartbeats, lease
    renewals, results sent again, and a new connection when the broker falls silent.

    Args:
        agent: the agent whose connection this is (its channel, runner and status).
    """

    def __init__(self, agent: BaseAgent) -> None:
        self.agent = agent
        #: the broker's heartbeat settings (its WELCOME tells them)
        self.interval_s = DEFAULT_HEARTBEAT_INTERVAL_S
        self.liveness = DEFAULT_HEARTBEAT_LIVENESS
        self.reconnects = Backoff()
        #: loop time after which the messaging counters are reported again
        self.next_stats = 0.0

    def link_event(self, event: int, value: int) -> None:
        """A monitor event of the agent's connection: a refused or failed handshake (a
        key the broker does not accept, a key or mechanism mismatch) is logged as
        ``unauthorized`` with its likely cause. The agent does not exit: libzmq gives up
        on that socket, and the silence check opens a new one with back-off (up to
        ``RECONNECT_MAX_S``), so a key authorized later is taken without a restart."""
        channel = self.agent._channel
        public_key = getattr(channel, "curve_public_key", None)
        refusal = handshake_refusal(self.agent.broker_url, event, value, public_key)
        if refusal is not None:
            logger.error("agent %s: %s; trying again in %.1f s", self.agent.agent_id, refusal,
                         self.reconnects.delay_s,
                         extra={"agent_id": self.agent.agent_id, "event": "unauthorized"})

    def welcomed(self, interval_s: float, liveness: int) -> None:
        """Registered: take the broker's settings, and reconnect promptly next time."""
        self.interval_s = interval_s
        self.liveness = liveness
        self.reconnects.reset()

    def register(self, silent_since: float) -> None:
        """Say READY (again); the broker's silence counts from ``silent_since``."""
        assert self.agent._channel is not None
        self.agent.status = AgentState.REGISTERING
        self.agent._channel.last_heard = silent_since
        self.agent._channel.send(Ready(self.agent.agent_id, self.agent.name, self.agent.capabilities,
                                 self.agent.max_concurrent, running=tuple(self.agent._task_runner.running)))

    async def heartbeat_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.interval_s / 2)
            channel = self.agent._channel
            if channel is None or channel.closed:
                return
            try:
                if self.agent.status is AgentState.READY or \
                        self.agent.status is AgentState.DRAINING:
                    self._renew_and_report(channel, loop.time())
                self._check_broker(channel, loop)
            except Exception:  # noqa: BLE001 - the agent's pulse must outlive one bad turn
                # Without this loop an agent renews no lease and never reconnects; one
                # failed turn (a counter a forged bus message pushed past 64 bits, say)
                # must not stop it.
                logger.exception("agent %s: heartbeat turn failed; carrying on",
                                 self.agent.agent_id)

    def _renew_and_report(self, channel: Transport[Message], now: float) -> None:
        """Renew running tasks' leases, resend overdue results, report the counters."""
        interval_s = self.interval_s
        expiry_s = interval_s * self.liveness
        self.agent._task_runner.renew_leases(now, interval_s)
        # Only while the broker is heard from: during a partition every resend would
        # queue in libzmq and arrive all at once when the link returns (the broker drops
        # them, but a long partition made thousands); after a reconnect the WELCOME sends
        # the unacknowledged results again anyway.
        heard = now - channel.last_heard <= expiry_s
        resent = self.agent._task_runner.resend_overdue(now, expiry_s) if heard else 0
        if resent:
            logger.info("agent %s: sending %d unacknowledged result(s) again", self.agent.agent_id,
                        resent)
        self.agent.messaging.expire(now)
        if now >= self.next_stats:
            # Messaging counters (losses) go to the broker for its status, at most once
            # per interval and only when they changed.
            stats = self.agent.messaging.stats_if_changed()
            if stats is not None:
                channel.send(Heartbeat(stats=stats))
                self.next_stats = now + interval_s

    def _check_broker(self, channel: Transport[Message], loop: asyncio.AbstractEventLoop) -> None:
        """Reconnect when the broker is silent past the expiry, else heartbeat if idle."""
        now = loop.time()
        expiry_s = self.interval_s * self.liveness
        if now - channel.last_heard > expiry_s:
            # Read what is waiting first: a stall of this process (not the broker's
            # silence) can leave the broker's messages unread past the expiry.
            channel.read_now()
            now = loop.time()
        if now - channel.last_heard > expiry_s:
            if self.reconnects.due(now) and self.agent.status is not AgentState.DRAINING:
                logger.warning("agent %s: broker silent for %.1f s; reconnecting",
                               self.agent.agent_id, now - channel.last_heard)
                self.reconnects.step(now)
                channel.reopen()
                self.register(now - expiry_s)  # keep counting silence from here
            return
        if now - channel.last_sent >= self.interval_s:
            channel.send(Heartbeat())
