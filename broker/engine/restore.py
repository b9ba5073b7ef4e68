"""Rebuilding the engine's books from the journal at start-up."""

from __future__ import annotations

import logging

from broker.engine.holders import restored_holders
from broker.engine.ledger import Ledger
from broker.engine.lifecycle import Lifecycle
from broker.engine.model import TaskRecord
from broker.journal import AcceptedRecord, Replay

logger = logging.getLogger(__name__)


def restore(ledger: Ledger, lifecycle: Lifecycle, replay: Replay, now: float) -> None:
    """Open tasks go back to the queue; results still within retention are kept. On a
    broker that binds holders to keys (``Lifecycle.bind_holders_to_keys``, called before)
    an open task takes a late result only from its holders' keys."""
    key_bound = lifecycle.holder_keys is not None
    wall_now = now + ledger.wall_offset
    restored_results = 0
    for task_id, record in replay.results.items():
        accepted = replay.accepted.get(task_id)
        if accepted is None or (wall_now - record.wall > ledger.finished.max_age_s
                                and task_id not in replay.held):
            continue
        task = _task_from_journal(ledger, accepted, now, None, task_id in replay.held)
        task.attempts = record.attempts
        lifecycle.restore_finished(task, record.item(), record.wall - ledger.wall_offset)
        restored_results += 1
    reopened = 0
    for task_id, accepted in replay.accepted.items():
        if task_id in replay.results:
            continue
        task = _task_from_journal(ledger, accepted, now, replay.attempt_limits.get(task_id),
                                  task_id in replay.held)
        task.note(now, "restored", "the broker restarted; dispatching again unless the "
                                   "agent running it claims it first")
        task.restored = True
        task.holder_scopes = restored_holders(replay.holder_scopes.get(task_id), key_bound)
        ledger.tasks[task_id] = task
        ledger.quotas.accepted(task.client)
        lifecycle.hold_back(task, now)
        ledger.deadlines.add(task, task.timeout_s)
        reopened += 1
    if replay.records:
        logger.info("journal: %d open task(s) dispatched again, %d result(s) restored "
                    "(%d record(s), %d torn byte(s) dropped)", reopened, restored_results,
                    replay.records, replay.truncated_bytes)
    ledger.counters["restored_open"] = reopened
    ledger.counters["restored_results"] = restored_results


def _task_from_journal(ledger: Ledger, record: AcceptedRecord, now: float,
                       attempt_timeout_s: float | None = None,
                       hold: bool = False) -> TaskRecord:
    spec = record.spec(attempt_timeout_s, hold)
    task = TaskRecord(spec, ledger.requirements.get(spec.capabilities, spec.agent),
                      record.client, now, spec.timeout_s or ledger.config.default_timeout_s)
    # The task keeps the deadline it was accepted with (a restart does not extend it).
    task.submitted_at = record.wall - ledger.wall_offset
    task.deadline = task.expires_at = task.submitted_at + task.timeout_s
    return task
