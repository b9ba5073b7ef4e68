"""Names in one place: run ids, step paths, the task id of every step, state keys, topics.

A step's *path* names one execution of a node inside a run: the node names from the root,
joined by ``/``, with ``[i]`` for item ``i`` of a map and ``@r`` for round ``r`` of a
review loop (``build/audit/map[17]``, ``draft/produce@2``). Node names never hold ``[``,
``]``, ``@``, ``#`` or ``/`` (model.py checks), so a path is unambiguous.

A step's broker task id is ``wf:<run id>:<path>``. It depends on nothing but the run and
the step's place, so a runner that takes a run over submits the very ids its predecessor
did: the broker's idempotent ids then attach it to a task still running (or hand back its
result) instead of running it again.

State service layout (runs.py and checkpoints.py describe the values)::

    wf/runs/<run>              the run record (runs.py)
    wf/ckpt/<run>/<seq>        checkpoint batches, seq zero-padded (checkpoints.py)
    wf/ctl/<run>/answer/<path> an approval's answer (written once, by approve)
    wf/ctl/<run>/cancel        a cancel request
    wf/ctl/<run>/resume        a resume request
    wf/blob/<run>/<what>/<n>   chunks of an input or output too large for the record
    lock wf/lease/<run>        the lease of the runner driving the run
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import Final

from workflows.errors import WorkflowInputError

RUNS_PREFIX: Final = "wf/runs/"
CHECKPOINTS_PREFIX: Final = "wf/ckpt/"
CONTROL_PREFIX: Final = "wf/ctl/"
BLOBS_PREFIX: Final = "wf/blob/"
LEASES_PREFIX: Final = "wf/lease/"
#: Each standing runner holds the lock ``RUNNERS_PREFIX + runner id`` while it serves,
#: so a client can tell whether any runner, on any machine, will drive its run.
RUNNERS_PREFIX: Final = "wf/runners/"
#: Bus topics of run events: ``workflow.<run id>``.
EVENTS_TOPIC_PREFIX: Final = "workflow."
#: The prefix of every task id a run submits.
TASK_ID_PREFIX: Final = "wf:"

MAX_RUN_ID_CHARS: Final = 64
_RUN_ID: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def new_run_id() -> str:
    """A fresh run id: 12 random hex digits after ``r`` (short enough to type)."""
    return f"r{uuid.uuid4().hex[:12]}"


def check_run_id(run_id: str) -> str:
    """``run_id`` if it can name a run, else :class:`WorkflowInputError`.

    Run ids become parts of state keys and task ids: 1 to 64 of ``A-Z a-z 0-9 _ . -``,
    starting with a letter or digit.
    """
    if not isinstance(run_id, str) or len(run_id) > MAX_RUN_ID_CHARS or \
            not _RUN_ID.fullmatch(run_id):
        raise WorkflowInputError(f"bad run id {run_id!r}: use 1 to {MAX_RUN_ID_CHARS} of "
                                 "A-Z a-z 0-9 _ . - (starting with a letter or digit)")
    return run_id


def run_key(run_id: str) -> str:
    """The state key of the run record."""
    return f"{RUNS_PREFIX}{run_id}"


def run_id_of_key(key: str) -> str | None:
    """The run id of a run record's key (None for any other key)."""
    if not key.startswith(RUNS_PREFIX):
        return None
    rest = key[len(RUNS_PREFIX):]
    return rest if rest and "/" not in rest else None


def checkpoint_prefix(run_id: str) -> str:
    """The prefix of a run's checkpoint batches."""
    return f"{CHECKPOINTS_PREFIX}{run_id}/"


def checkpoint_key(run_id: str, seq: int) -> str:
    """The key of checkpoint batch ``seq`` (zero-padded, so keys list in order)."""
    return f"{CHECKPOINTS_PREFIX}{run_id}/{seq:010d}"


def control_prefix(run_id: str) -> str:
    """The prefix of a run's control keys (answers, cancel and resume requests)."""
    return f"{CONTROL_PREFIX}{run_id}/"


def answer_key(run_id: str, path: str) -> str:
    """The key of the answer to the approval step at ``path``."""
    return f"{CONTROL_PREFIX}{run_id}/answer/{path}"


def cancel_key(run_id: str) -> str:
    """The key of a run's cancel request."""
    return f"{CONTROL_PREFIX}{run_id}/cancel"


def resume_key(run_id: str) -> str:
    """The key of a run's latest resume request."""
    return f"{CONTROL_PREFIX}{run_id}/resume"


def blob_prefix(run_id: str, what: str) -> str:
    """The prefix of the chunks of a large input or output (``what``)."""
    return f"{BLOBS_PREFIX}{run_id}/{what}/"


def lease_name(run_id: str) -> str:
    """The lock a runner holds while it drives the run."""
    return f"{LEASES_PREFIX}{run_id}"


def runner_presence(runner_id: str) -> str:
    """The lock a standing runner holds while it serves (see :data:`RUNNERS_PREFIX`)."""
    return f"{RUNNERS_PREFIX}{runner_id}"


def events_topic(run_id: str) -> str:
    """The bus topic of a run's progress events."""
    return f"{EVENTS_TOPIC_PREFIX}{run_id}"


def task_id(run_id: str, path: str) -> str:
    """The broker task id of the step at ``path`` (see the module docstring)."""
    return f"{TASK_ID_PREFIX}{run_id}:{path}"


@dataclass(frozen=True, slots=True)
class Scope:
    """Where a node runs: its path, and how its runner should report it.

    Attributes:
        path: the path of the node's execution (see the module docstring).
        quiet: inside a map item: no per-step events (a batch's progress event covers
            them), so that a 10,000-item map does not publish 20,000 messages.
        gate: the node is a review loop's reviewer: an approval that says no is the
            review's verdict, not the end of the run.
    """

    path: str
    quiet: bool = False
    gate: bool = False

    def child(self, name: str, *, gate: bool = False) -> Scope:
        """The scope of a child node called ``name``."""
        return Scope(f"{self.path}/{name}", self.quiet, gate)

    def item(self, index: int) -> Scope:
        """The scope of item ``index`` of a map over this scope's node."""
        return Scope(f"{self.path}[{index}]", True, False)

    def slot(self, index: int) -> Scope:
        """The scope of copy ``index`` of a node run several times side by side (a
        consensus's voters); reported like any step."""
        return Scope(f"{self.path}[{index}]", self.quiet, self.gate)

    def round(self, number: int) -> Scope:
        """The scope of round ``number`` (from 1) of this scope's node."""
        return Scope(f"{self.path}@{number}", self.quiet, self.gate)

    def mark(self, what: str) -> str:
        """A checkpoint path for a decision this node records (``vote#voters``)."""
        return f"{self.path}#{what}"


__all__ = [
    "BLOBS_PREFIX", "CHECKPOINTS_PREFIX", "CONTROL_PREFIX", "EVENTS_TOPIC_PREFIX",
    "LEASES_PREFIX", "MAX_RUN_ID_CHARS", "RUNS_PREFIX", "Scope", "TASK_ID_PREFIX",
    "answer_key", "blob_prefix", "cancel_key", "check_run_id", "checkpoint_key",
    "checkpoint_prefix", "control_prefix", "events_topic", "lease_name", "new_run_id",
    "resume_key", "run_id_of_key", "run_key", "task_id",
]
