"""A queue checker in the style of Jepsen's: what went in, what came out, what ran.

Inputs, gathered by a fault test:

* ``submitted``: every task id the client submitted (and so expects one result for);
* ``results``: every result the client application got, duplicates included, as
  ``(task_id, status)`` pairs or objects with ``task_id`` and ``status`` (SDK results);
* ``deliveries`` (optional): every terminal result that reached the client on the wire,
  before the SDK dropped duplicates (see :class:`WireTap`);
* ``exec_logs``: the agents' execution logs (one task id per line, one line per
  execution start; see ``tests/e2e/faults/agents.py``).

Counts, per the guarantees of DESIGN.md:

* ``lost``: submitted, and no result came (must be 0);
* ``duplicated``: more than one result reached the application (must be 0);
* ``unexpected``: a result, a wire delivery or an execution for an id never submitted,
  or a result whose id does not match the handle it came from (must be 0);
* ``re_executed``: ran more than once on agents (allowed: execution is at-least-once);
* ``phantom``: succeeded without any logged execution (must be 0 when every agent that
  could run the task logs its executions);
* ``redelivered``: reached the client on the wire more than once (allowed: the SDK drops
  duplicates by task id; informative).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def read_log(path: Path | str) -> list[str]:
    """Task ids in an execution log, one per execution (missing file: none)."""
    path = Path(path)
    return path.read_text().split() if path.exists() else []


def _pair(result: Any) -> tuple[str, str]:
    if isinstance(result, tuple):
        return str(result[0]), str(result[1])
    return str(result.task_id), str(result.status)


@dataclass
class Report:
    """What the checker found; the sets hold task ids."""

    submitted: int
    received: int
    lost: set[str] = field(default_factory=set)
    duplicated: set[str] = field(default_factory=set)
    unexpected: set[str] = field(default_factory=set)
    re_executed: set[str] = field(default_factory=set)
    phantom: set[str] = field(default_factory=set)
    redelivered: set[str] = field(default_factory=set)
    executions: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    max_executions: int = 0

    def counts(self) -> dict[str, Any]:
        return {"submitted": self.submitted, "received": self.received,
                "lost": len(self.lost), "duplicated": len(self.duplicated),
                "unexpected": len(self.unexpected), "re_executed": len(self.re_executed),
                "phantom": len(self.phantom), "redelivered": len(self.redelivered),
                "executions": self.executions, "max_executions_per_task": self.max_executions,
                "statuses": dict(self.statuses)}

    def summary(self, name: str = "") -> str:
        counts = self.counts()
        head = f"[checker{' ' + name if name else ''}] "
        return head + " ".join(f"{k}={v}" for k, v in counts.items())

    @property
    def valid(self) -> bool:
        return not (self.lost or self.duplicated or self.unexpected)

    def assert_valid(self, name: str = "", *, phantoms_allowed: bool = False) -> None:
        """Print the counts and assert lost == duplicated == unexpected == 0."""
        print(self.summary(name))
        problems = {k: sorted(v)[:10] for k, v in (("lost", self.lost),
                                                   ("duplicated", self.duplicated),
                                                   ("unexpected", self.unexpected)) if v}
        if not phantoms_allowed and self.phantom:
            problems["phantom"] = sorted(self.phantom)[:10]
        assert not problems, f"checker {name}: {problems}; {self.counts()}"


def check(submitted: Iterable[str], results: Iterable[Any],
          exec_logs: Iterable[Path | str] = (), deliveries: Iterable[Any] | None = None,
          handle_ids: Iterable[str] | None = None) -> Report:
    """Compare what was submitted with what came back and what ran.

    Args:
        submitted: ids the client submitted.
        results: results the application got (``(id, status)`` pairs or SDK results).
        exec_logs: agents' execution logs.
        deliveries: terminal results seen on the wire (optional).
        handle_ids: for each result in ``results``, the id of the handle it came from
            (same order); a mismatch counts as unexpected.
    """
    wanted = list(submitted)
    wanted_set = set(wanted)
    pairs = [_pair(r) for r in results]
    report = Report(submitted=len(wanted_set), received=len(pairs))
    got = Counter(task_id for task_id, _ in pairs)
    report.statuses = Counter(status for _, status in pairs)
    report.lost = wanted_set - set(got)
    report.duplicated = {task_id for task_id, n in got.items() if n > 1}
    report.unexpected = set(got) - wanted_set
    if handle_ids is not None:
        for expected_id, (task_id, _) in zip(handle_ids, pairs, strict=True):
            if expected_id != task_id:
                report.unexpected.add(task_id)
    executions: Counter[str] = Counter()
    for log in exec_logs:
        executions.update(read_log(log))
    report.executions = sum(executions.values())
    report.max_executions = max(executions.values(), default=0)
    report.re_executed = {task_id for task_id, n in executions.items() if n > 1}
    report.unexpected |= set(executions) - wanted_set
    succeeded = {task_id for task_id, status in pairs if status == "succeeded"}
    report.phantom = succeeded - set(executions)
    if deliveries is not None:
        wire = Counter(_pair(d)[0] for d in deliveries)
        report.redelivered = {task_id for task_id, n in wire.items() if n > 1}
        report.unexpected |= set(wire) - wanted_set
    return report


class WireTap:
    """Records every terminal result that reaches a :class:`~agent_sdk.Client` on the
    wire, before the SDK drops duplicates (it wraps the client's result handler).

    ``ids`` restricts recording to these task ids (None: all).
    """

    TERMINAL = frozenset({"succeeded", "failed", "timed_out", "cancelled", "rejected"})

    def __init__(self, client: Any) -> None:
        self.items: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        inner = client._on_results

        def on_results(items: list[Any]) -> None:
            with self._lock:
                self.items.extend((item.task_id, item.status) for item in items
                                  if item.status in self.TERMINAL)
            inner(items)

        client._on_results = on_results

    def snapshot(self) -> list[tuple[str, str]]:
        with self._lock:
            return list(self.items)
