"""The agent's side of the broker's health checks: answer each PING with a PONG.

The answer is given from the agent's event loop once its ``ping()`` hook has returned,
so that a loop blocked by a synchronous ``execute``, or a hook that hangs, leaves the
PING unanswered and the broker sees the agent UNRESPONSIVE. One hook call runs at a
time: PINGs that arrive meanwhile are answered by the call under way (the broker only
needs the newest answered).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from wire.tasks import Message, Ping, Pong

logger = logging.getLogger(__name__)

#: The longest problem description sent to the broker (it shows in ``status``).
MAX_DETAIL_CHARS = 300


def verdict(report: Any) -> tuple[bool, str | None]:
    """Whether a ``ping()`` hook's return value says the agent is fit, and why not.

    The hook returns a mapping with ``"ok"`` (false: a problem, described by ``"detail"``
    or ``"problem"``), a bool, or None (fit). Anything else counts as fit: the hook
    answered, which is what a liveness-minded hook means.
    """
    if report is False:
        return False, "its ping() hook returned False"
    if isinstance(report, dict) and "ok" in report and not report["ok"]:
        detail = report.get("detail") or report.get("problem") or "its ping() hook reported ok: false"
        return False, str(detail)[:MAX_DETAIL_CHARS]
    return True, None


class HealthResponder:
    """Answers PINGs with the hook's verdict and the ages of the running tasks.

    Args:
        hook: the agent's ``ping()``.
        running: ``(task id, seconds run, seconds allowed)`` of the running tasks.
        send: sends a message to the broker (a no-op once disconnected).
    """

    def __init__(self, hook: Callable[[], Awaitable[Any]],
                 running: Callable[[], tuple[tuple[str, float, float], ...]],
                 send: Callable[[Message], None]) -> None:
        self.hook = hook
        self.running = running
        self.send = send
        #: the newest PING's sequence number: the one the next answer names
        self.latest = 0
        self._check: asyncio.Task[None] | None = None

    def on_ping(self, msg: Ping) -> None:
        self.latest = msg.seq
        if self._check is None:
            self._check = asyncio.get_running_loop().create_task(self._answer())

    async def _answer(self) -> None:
        try:
            try:
                ok, detail = verdict(await self.hook())
            except Exception as e:  # noqa: BLE001 - the hook's failure is the verdict
                ok, detail = False, f"ping() raised {type(e).__name__}: {e}"[:MAX_DETAIL_CHARS]
                logger.warning("health check: %s", detail)
        finally:
            self._check = None
        self.send(Pong(self.latest, ok, detail, self.running()))

    def close(self) -> None:
        """Stop a hook call under way (the agent stops)."""
        if self._check is not None:
            self._check.cancel()
            self._check = None
