"""The executor: runs a workflow's nodes, each step a broker task, from its checkpoints on.

One :class:`Executor` serves one runner's turn at one run. It walks the definition
(:mod:`workflows.model`) from the root with the run's input; every node's execution has
a path (:class:`workflows.ids.Scope`). Before a task runs, the executor looks its path up
in the checkpoints: a step an earlier runner finished is not run again, its checkpointed
result is used. A step an earlier runner started but did not checkpoint is submitted
again under the same task id, which attaches to the broker's task instead of starting a
second one. So a takeover replays the tree quickly up to where the work stands.

Semantics (also in model.py's docstring): a pipeline passes each step's output data to
the next step; the patterns are in :mod:`workflows.mapreduce`, :mod:`workflows.consensus`,
:mod:`workflows.review` and :mod:`workflows.approval`. ``fields`` are extra task fields
a node hands down to the tasks that receive its input (a reducer's ``failed``, a
producer's ``feedback``).

Steps with side effects: the workflow layer never runs a step again on purpose (a
checkpointed step is skipped, an uncheckpointed one is attached to by its task id), but
a task itself is at least once on agents, as every broker task is: an agent that dies
mid-task, or a broker restart while it runs, has the broker dispatch it again. An agent
whose work has side effects should make them idempotent by the task id, which is stable
for a step across runners and retries (``wf:<run>:<path>``).

The executor holds no lease and writes no run record: the driver (:mod:`workflows.driver`)
around it does, and stops it from outside (cancel, deadline, lease lost).
"""

from __future__ import annotations

from typing import Any

from agent_sdk import Client
from workflows.approval import ApprovalDesk, run_approval
from workflows.checkpoints import CheckpointLog
from workflows.consensus import run_consensus
from workflows.errors import StepFailed, WorkflowInputError
from workflows.events import Progress, RunEvents
from workflows.ids import Scope
from workflows.mapreduce import run_map_reduce
from workflows.model import (
    Approval, Consensus, MapReduce, Node, Pipeline, ReviewLoop, TaskStep,
)
from workflows.outputs import (
    entry_error, entry_ok, entry_output, is_reference, leaf_entry, StepOutput,
)
from workflows.review import run_review_loop
from workflows.tasks import check_params, StepTasks


class Executor:
    """Runs nodes for one run (see the module docstring).

    Args:
        run_id: the run.
        tasks: submits the run's tasks.
        log: the run's checkpoints.
        events: publishes the run's events.
        progress: the run's step counts.
        approvals: answers approval steps.
    """

    def __init__(self, run_id: str, tasks: StepTasks, log: CheckpointLog, events: RunEvents,
                 progress: Progress, approvals: ApprovalDesk) -> None:
        self.run_id = run_id
        self.tasks = tasks
        self.log = log
        self.events = events
        self.progress = progress
        self.approvals = approvals

    @property
    def client(self) -> Client:
        """The broker connection."""
        return self.tasks.client

    async def run(self, root: Node, data: Any) -> StepOutput:
        """Run the workflow whose root is ``root`` on ``data``; returns the root's output.

        Raises:
            StepFailed: a step failed and nothing absorbed it.
            RunRejected: an approval step was rejected.
        """
        return await self.node(root, data, Scope(root.name), {})

    async def node(self, node: Node, data: Any, scope: Scope,
                   fields: dict[str, Any]) -> StepOutput:
        """Run one node on ``data`` at ``scope``; returns its output."""
        if isinstance(node, TaskStep):
            return await self.task(node, data, scope, fields)
        if isinstance(node, Approval):
            return await run_approval(self, node, data, scope)
        if not scope.quiet:
            self.events.emit("step_started", path=scope.path, kind=node.kind)
        try:
            output = await self._composite(node, data, scope, fields)
        except StepFailed as e:
            if not scope.quiet:
                self.events.emit("step_failed", path=scope.path, kind=node.kind,
                                 error={"code": e.code, "message": e.reason})
            raise
        if not scope.quiet:
            self.events.emit("step_finished", path=scope.path, kind=node.kind)
        return output

    async def _composite(self, node: Node, data: Any, scope: Scope,
                         fields: dict[str, Any]) -> StepOutput:
        if isinstance(node, Pipeline):
            return await self.pipeline(node, data, scope, fields)
        if isinstance(node, MapReduce):
            return await run_map_reduce(self, node, data, scope, fields)
        if isinstance(node, Consensus):
            return await run_consensus(self, node, data, scope, fields)
        if isinstance(node, ReviewLoop):
            return await run_review_loop(self, node, data, scope, fields)
        raise StepFailed(scope.path, "bad_definition", f"unknown node {node!r}")

    async def pipeline(self, node: Pipeline, data: Any, scope: Scope,
                       fields: dict[str, Any]) -> StepOutput:
        """Each step's output data is the next step's input; the last step's output is
        the pipeline's. ``fields`` go to the first step only: they describe the
        pipeline's input."""
        output = StepOutput(data)
        for index, step in enumerate(node.steps):
            output = await self.node(step, output.data, scope.child(step.name),
                                     fields if index == 0 else {})
        return output

    async def task(self, step: TaskStep, data: Any, scope: Scope, fields: dict[str, Any],
                   pin: str | None = None) -> StepOutput:
        """Run one task step; returns its result's output.

        Raises:
            StepFailed: the task did not succeed.
        """
        entry = await self.leaf(step, data, scope, fields, pin)
        if not entry_ok(entry):
            code, message = entry_error(entry)
            raise StepFailed(scope.path, code, message, entry.get("t"))
        return entry_output(entry)

    async def leaf(self, step: TaskStep, data: Any, scope: Scope, fields: dict[str, Any],
                   pin: str | None = None) -> dict[str, Any]:
        """The checkpoint entry of the task step at ``scope``: the checkpointed one, else
        the result of its task (submitted, or attached to under its id), checkpointed.

        Raises:
            StepFailed: the task could not be submitted (deadline passed, bad params).
        """
        path = scope.path
        entry = self.log.get(path)
        if entry is not None and not is_reference(entry):
            self.progress.done += 1
            return entry
        try:
            check_params(step, path)
        except WorkflowInputError as e:
            raise StepFailed(path, "bad_definition", str(e)) from None
        if not scope.quiet and entry is None:
            self.events.emit("step_started", path=path, kind=step.kind)
        result = await self.tasks.run(path, step, data, fields, pin)
        fresh = leaf_entry(result)
        if entry is None or not result.ok:
            # A result kept by reference and read back is checkpointed already; one that
            # had to run again (the broker lost it) is checkpointed as any other.
            self.log.record(path, fresh, result.task_id)
        self.progress.done += 1
        if not scope.quiet:
            if result.ok:
                self.events.emit("step_finished", path=path, kind=step.kind)
            else:
                code, message = entry_error(fresh)
                self.events.emit("step_failed", path=path, kind=step.kind,
                                 error={"code": code, "message": message})
        return fresh


__all__ = ["Executor"]
