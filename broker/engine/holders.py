"""Who may answer for an attempt after a restart, on a ``--secure`` broker.

In one broker's life an attempt's holder is known by its routing id (``TaskRecord.holders``),
which a secure broker binds to the sender's key. A restart forgets routing ids, so the
journal records each attempt's holder by its key's scope (``K`` records): the restored task
then takes a late result, or a claim in READY, only from an agent of one of those keys.
A plaintext broker records nothing and cannot tell agents apart: there any registered
agent may answer for a restored task (``TaskRecord.held_by``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from broker.engine.ledger import JournalSink
from broker.engine.model import AgentRecord, TaskRecord
from wire.curve import scope_in


class HolderKeys:
    """Journals the key scope of each attempt's agent (dispatch and reclaim call it)."""

    def __init__(self, journal: JournalSink) -> None:
        self.journal = journal

    def held(self, task: TaskRecord, agent: AgentRecord) -> None:
        scope = scope_in(agent.identity.decode("utf-8", "replace"))
        if scope is not None:
            self.journal.held_by_key(task.spec.id, scope)

    @staticmethod
    def of_open(tasks: Iterable[TaskRecord]) -> Iterator[tuple[str, str]]:
        """(task id, scope) of every holder of the open ``tasks``, for a compaction."""
        for task in tasks:
            scopes = set(task.holder_scopes or ())
            for identity in [*(task.holders or ()), *([task.agent.identity] if task.agent
                                                        else [])]:
                scope = scope_in(identity.decode("utf-8", "replace"))
                if scope is not None:
                    scopes.add(scope)
            task_id = task.spec.id
            yield from ((task_id, scope) for scope in sorted(scopes))


def restored_holders(scopes: set[str] | None, key_bound: bool) -> frozenset[str] | None:
    """The holder scopes a restored task keeps: the journal's, on a broker that binds
    holders to keys (none recorded: it never reached an agent, and no agent may answer
    for it); None on a plaintext broker (any registered agent may)."""
    if not key_bound:
        return None
    return frozenset(scopes) if scopes else frozenset()
