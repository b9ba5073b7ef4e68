"""Workflows (pipelines, map-reduce, consensus, review loops, approvals) run through the
broker: every step is a task routed by capability or agent name, so a workflow spreads
over agent processes on any machine and inherits their retries, deadlines and traces.

- The patterns, as the seed writes them (:mod:`workflows.patterns`):
  :class:`SequentialPipeline`, :class:`MapReduceWorkflow`, :class:`ConsensusWorkflow`,
  :class:`ReviewLoop`, :class:`Approval`, with :class:`Step` for a step by capability;
  ``await pattern.execute(input, broker=url)`` runs one in this process.
- Definitions as data (:mod:`workflows.model`): :class:`Workflow` and its nodes, the same
  tree the YAML loader and the planner build.
- Durable runs (:mod:`workflows.api`): :func:`submit_run`, :func:`run_status`,
  :func:`list_runs`, :func:`wait_run`, :func:`cancel_run`, :func:`resume_run`,
  :func:`approve` / :func:`approve_run`; a standing runner drives submitted runs and takes
  over runs whose runner died (``python -m workflows.runner``, :mod:`workflows.runner`).
- Errors: :class:`WorkflowError` and its subclasses (:mod:`workflows.errors`), every one an
  :class:`agent_sdk.OrchestratorError`.

The package reaches the broker only through :mod:`agent_sdk`.
"""

from __future__ import annotations

from workflows.api import (
    ApprovalRecord, CancelRecord, ResumeRecord, RunDetails, RunProgress, RunSummary,
    StepCheckpoint, approve, approve_run, cancel_run, drive_run, list_runs, live_runners,
    resume_run,
    run_status, submit_run, wait_run,
)
from workflows.errors import (
    AlreadyAnswered, NoAgentFor, RunCancelled, RunEnded, RunFailed, RunNotFound, RunRejected,
    RunStateError, StepFailed, WorkflowError, WorkflowInputError,
)
from workflows.model import DefinitionError, Workflow
from workflows.outputs import StepOutput
from workflows.patterns import (
    Approval, ConsensusWorkflow, MapReduceWorkflow, Pattern, ReviewLoop, SequentialPipeline,
    Step, execute_workflow,
)
from workflows.runs import RunStatus

__all__ = [
    # patterns
    "Approval", "ConsensusWorkflow", "MapReduceWorkflow", "Pattern", "ReviewLoop",
    "SequentialPipeline", "Step", "execute_workflow",
    # definitions
    "DefinitionError", "Workflow",
    # durable runs
    "ApprovalRecord", "CancelRecord", "ResumeRecord", "RunDetails", "RunProgress", "RunStatus",
    "RunSummary", "StepCheckpoint", "StepOutput", "approve", "approve_run", "cancel_run",
    "drive_run", "list_runs", "live_runners", "resume_run", "run_status", "submit_run", "wait_run",
    # errors
    "AlreadyAnswered", "NoAgentFor", "RunCancelled", "RunEnded", "RunFailed", "RunNotFound",
    "RunRejected", "RunStateError", "StepFailed", "WorkflowError", "WorkflowInputError",
]
