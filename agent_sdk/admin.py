"""Administrator's requests to the broker, beside :class:`~agent_sdk.client.Client`
(whose class stays within the size rule): PURGE (issue 15) and SCALE (issue 16).

``SyncClient.purge`` and ``SyncClient.scale`` are the blocking forms.
"""

from __future__ import annotations

from typing import Final

from agent_sdk.client import Client
from wire.nodes import MAX_REPLICAS, Scale, ScaleReply
from wire.purge import Purge, PurgeReply

#: How long a PURGE may take: the broker answers once it rewrote its journal, which for
#: a journal of hundreds of megabytes takes seconds.
PURGE_TIMEOUT_S: Final = 120.0
#: How long a SCALE may take (the broker answers at once, after planning).
SCALE_TIMEOUT_S: Final = 10.0


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


async def scale(client: Client, name: str, replicas: int,
                timeout: float = SCALE_TIMEOUT_S) -> ScaleReply:
    """Run ``replicas`` of agent ``name`` in total, over every node supervisor whose
    catalogue has it (the broker spreads them and tells the nodes; replicas beyond the
    count are drained: they finish or hand back their tasks, none is lost).

    Args:
        client: a client of the broker.
        name: a built-in agent's name (``reviewer``) or a ``module:Class`` a node lists.
        replicas: the desired total, 0 to :data:`~wire.nodes.MAX_REPLICAS`.
        timeout: how long to wait for the answer.

    Returns:
        The desired total and where the broker placed it (replicas by node id).

    Raises:
        ValueError: ``replicas`` out of range or ``name`` empty.
        BrokerUnavailable: no answer within ``timeout``.
        RequestRefused: ``no_node`` (no live node can run it) or ``unauthorized`` (a
            secure broker, a key without the admin role).
    """
    if not name or not 0 <= replicas <= MAX_REPLICAS:
        raise ValueError(f"replicas must be 0 to {MAX_REPLICAS} and the name non-empty")
    reply: ScaleReply = await client._requests.ask(
        client._send_message, lambda req: Scale(req, name, replicas), timeout)
    return reply


__all__ = ["PURGE_TIMEOUT_S", "SCALE_TIMEOUT_S", "purge", "scale"]
