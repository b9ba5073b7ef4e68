"""Review loops: produce, review, revise with the review's feedback, until approved.

Round ``r`` runs the producer at ``<loop>/<producer>@r`` and the reviewer at
``<loop>/<reviewer>@r``:

- the producer gets the loop's input as its data in every round, and from round 2 on
  the task fields ``feedback`` (the last review's) and ``draft`` (its own last output);
  every round's tasks get ``round``;
- the reviewer gets the producer's output data;
- the review approves when its ``approved`` field (or the key of a map result) is true;
  its feedback is its ``feedback`` field, else its ``comment`` (an approval step's),
  else, when it does not approve, its data.

The loop ends at the first approval or after ``max_rounds`` rounds, whichever is first;
either way it succeeds. Its output data is the last draft's, with the extras
``approved``, ``rounds`` and ``feedback`` (the last review's).

The reviewer may be an :class:`~workflows.model.Approval`: a person then gates each
round, and a rejection's comment is the next round's feedback.
"""

from __future__ import annotations

from typing import Any, TYPE_CHECKING

from workflows.events import planned_steps
from workflows.ids import Scope
from workflows.model import ReviewLoop
from workflows.outputs import StepOutput

if TYPE_CHECKING:
    from workflows.executor import Executor


def verdict(review: StepOutput) -> tuple[bool, Any]:
    """``(approved, feedback)`` of a review's output (see the module docstring)."""
    approved = review.field("approved") is True
    for name in ("feedback", "comment"):
        feedback = review.field(name)
        if feedback is not None:
            return approved, feedback
    return approved, None if approved else review.data


async def run_review_loop(ex: Executor, node: ReviewLoop, data: Any, scope: Scope,
                          fields: dict[str, Any]) -> StepOutput:
    """Run a review loop (see the module docstring).

    Raises:
        StepFailed: the producer or the reviewer failed.
    """
    producer_scope = scope.child(node.producer.name)
    reviewer_scope = scope.child(node.reviewer.name, gate=True)
    per_round = planned_steps(node.producer) + planned_steps(node.reviewer)
    draft = StepOutput(data)
    approved = False
    feedback: Any = None
    rounds = 0
    for number in range(1, node.max_rounds + 1):
        rounds = number
        produce_fields = {**fields, "round": number}
        if number > 1:
            ex.progress.total += per_round
            produce_fields["feedback"] = feedback
            produce_fields["draft"] = draft.data
        draft = await ex.node(node.producer, data, producer_scope.round(number), produce_fields)
        review = await ex.node(node.reviewer, draft.data, reviewer_scope.round(number),
                               {"round": number})
        approved, feedback = verdict(review)
        if approved:
            break
    return StepOutput(draft.data, draft.confidence,
                      {**draft.extras, "approved": approved, "rounds": rounds,
                       "feedback": feedback})


__all__ = ["run_review_loop", "verdict"]
