"""Approval steps: the run waits, holding no agent, until a person answers.

When a run reaches an :class:`~workflows.model.Approval` that has no answer yet, the
step is recorded as pending in the run record (status ``waiting_approval``, the prompt
and the step's input as its subject) and waits. Other branches of the run go on; no task
is held for the approval. The answer is written by somebody else into the run's control
keys (:func:`workflows.api.approve_run`); the driver watching them hands it to the
waiting step, which checkpoints it. Since the pending approval and the answer are both
in the state service, the wait survives the broker, the runner and the client
restarting: whichever runner drives the run next finds the answer (or waits for it).

The output's data is the step's input, passed through (what was approved goes on to the
next step of a pipeline); its extras are the answer: ``approved``, ``comment``, ``by``,
``at``. A rejection ends the run as ``rejected``, except where the approval is a review
loop's reviewer: there it is the review's verdict, and its comment the feedback for the
next round.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final, TYPE_CHECKING

from wire.codec import packb
from workflows.errors import RunRejected, StepFailed
from workflows.ids import Scope
from workflows.model import Approval
from workflows.outputs import SUCCEEDED, StepOutput
from workflows.runs import Answer, PendingApproval

if TYPE_CHECKING:
    from workflows.executor import Executor

#: A pending approval shows its step's input up to this size (else only the prompt).
MAX_SUBJECT_BYTES: Final = 16 * 1024


class ApprovalDesk:
    """The answers to a run's approval steps, and the steps waiting for one.

    Args:
        answers: the answers given so far, by step path.
        on_waiting: records a step that starts waiting (the run record).
        on_answered: records an answer the run takes (the run record's history).
    """

    def __init__(self, answers: dict[str, Answer],
                 on_waiting: Callable[[PendingApproval], Awaitable[None]],
                 on_answered: Callable[[str, Answer], Awaitable[None]]) -> None:
        self.answers = dict(answers)
        self._on_waiting = on_waiting
        self._on_answered = on_answered
        self._waiting: dict[str, asyncio.Future[Answer]] = {}

    def deliver(self, path: str, answer: Answer) -> None:
        """An answer arrived (the first one for a step counts)."""
        self.answers.setdefault(path, answer)
        future = self._waiting.get(path)
        if future is not None and not future.done():
            future.set_result(self.answers[path])

    async def answer(self, path: str, prompt: str, subject: Any) -> Answer:
        """The answer to the approval at ``path``, waiting for it if need be."""
        answer = self.answers.get(path)
        if answer is None:
            future = self._waiting.get(path)
            if future is None:
                future = asyncio.get_running_loop().create_future()
                self._waiting[path] = future
            await self._on_waiting(PendingApproval(path, prompt, time.time(), _shown(subject)))
            answer = await future
        await self._on_answered(path, answer)
        return answer


def _shown(subject: Any) -> Any:
    """``subject`` if small enough to keep in the run record, else None."""
    try:
        return subject if len(packb(subject)) <= MAX_SUBJECT_BYTES else None
    except (TypeError, ValueError, OverflowError):
        return None


async def run_approval(ex: Executor, node: Approval, data: Any, scope: Scope) -> StepOutput:
    """Run an approval step (see the module docstring).

    Raises:
        RunRejected: it was rejected, and it is not a review loop's reviewer.
    """
    path = scope.path
    entry = ex.log.get(path)
    if entry is None:
        if path not in ex.approvals.answers:
            ex.events.emit("approval_waiting", path=path, prompt=node.prompt)
        answer = await ex.approvals.answer(path, node.prompt, data)
        ex.log.record(path, {"s": SUCCEEDED, "d": answer.to_doc()})
        ex.events.emit("approval_answered", path=path, approved=answer.approved,
                       by=answer.by, comment=answer.comment)
    else:
        checkpointed = Answer.from_doc(entry.get("d"))
        if checkpointed is None:
            raise StepFailed(path, "bad_checkpoint", "the checkpoint holds no answer")
        answer = checkpointed
    ex.progress.done += 1
    if not answer.approved and not scope.gate:
        why = f": {answer.comment}" if answer.comment else ""
        raise RunRejected(ex.run_id, f"rejected by {answer.by or 'someone'}{why}", path,
                          answer.comment, answer.by)
    return StepOutput(data, 1.0, answer.to_doc())


__all__ = ["ApprovalDesk", "MAX_SUBJECT_BYTES", "run_approval"]
