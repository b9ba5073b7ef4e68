"""Administrator's requests to the broker, beside :class:`~agent_sdk.client.Client`
(whose class stays within the size rule): PURGE, issue 15.

``SyncClient.purge`` is the blocking form.
"""

from __future__ import annotations

from typing import Final

from agent_sdk.client import Client
from wire.purge import Purge, PurgeReply

#: How long a PURGE may take: the broker answers once it rewrote its journal, which for
#: a journal of hundreds of megabytes takes seconds.
PURGE_TIMEOUT_S: Final = 120.0


async def purge(client: Client, before: float | None = None,
                timeout: float = PURGE_TIMEOUT_S) -> PurgeReply:
    """Remove the payloads of the finished tasks that ended before ``before`` (wall-clock
    seconds; None: every finished task) from the broker's memory, its journal and its
    result store. Their records stay, their results with the error code ``purged``.
    Answered once the journal was rewritten.

    Args:
        client: a client of the broker (its request table carries the answer).
        before: only tasks that finished before then; None for all.
        timeout: how long to wait for the answer.

    Returns:
        What the broker purged (counts, bytes, the journal's size before and after).

    Raises:
        BrokerUnavailable: no answer within ``timeout``.
        RequestRefused: ``unauthorized`` (a secure broker, a key without the admin role)
            or ``storage_full`` (the journal could not be rewritten).
    """
    # The client's request table matches the answer (PurgeReply) to ``req``.
    reply: PurgeReply = await client._requests.ask(
        client._send_message, lambda req: Purge(req, before), timeout)
    return reply


__all__ = ["PURGE_TIMEOUT_S", "purge"]
