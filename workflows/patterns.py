"""The workflow patterns as Python objects, written the way the seed writes them::

    pipeline = SequentialPipeline([ResearchAgent(), CodeAgent(), ReviewAgent()])
    result = await pipeline.execute("Build a REST API", broker="tcp://127.0.0.1:5555")

    audit = MapReduceWorkflow(max_parallel=8, min_success=0.95)
    report = await audit.execute(files, mapper=Step(capability="security_audit"),
                                 reducer=Step(capability="synthesis"), client=client)

    vote = await ConsensusWorkflow([Step(capability="judge")] * 5, threshold=0.6).execute(
        question, client=client)
    vote.decision, vote.confidence, vote.consensus

A step is an agent class or instance (routed to that agent's *name*), a :class:`Step`
(routed by capability or agent name, with ``timeout_s``, ``retries`` and extra task
fields), or another pattern (they compose: a pipeline step may be a map-reduce). Each
pattern converts to a node of :mod:`workflows.model` (``to_node``, ``to_workflow``), so a
workflow from Python and the same workflow from YAML run through the same executor.

``execute(input, client=... | broker=...)`` runs the workflow in the calling process as a
durable run (:func:`workflows.api.run_workflow`): if the process dies, a standing runner
takes the run over. Before it starts, every agent name and capability the workflow uses
is checked against the live agents (:class:`~workflows.errors.NoAgentFor` names what is
missing; ``check_agents=False`` skips it and lets steps wait for their agents). It
returns the run's output as a :class:`~agent_sdk.Result` (``task_id`` is the run id), or
raises :class:`~workflows.errors.RunFailed`, ``RunCancelled`` or ``RunRejected``.
"""

from __future__ import annotations

import abc
import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any, cast, Union

from agent_sdk import BaseAgent, Client, Result
from agent_sdk.status import live_agents, offered_capabilities
from workflows import model
from workflows.api import as_workflow, connected, raise_for, run_workflow
from workflows.errors import NoAgentFor, WorkflowInputError
from workflows.model import MAX_NAME_CHARS, Node, TaskStep, Workflow
from workflows.outputs import StepOutput
from workflows.runs import RunStore


@dataclasses.dataclass(frozen=True)
class Step:
    """A step routed by capability (or to an agent by name, or both).

    Attributes:
        capability: the capability the task needs.
        agent: the agent name (or id) the task must go to.
        timeout_s: the task's whole deadline (capped by the run's).
        retries: retries after failures (None: the broker's policy).
        params: extra task fields.
        name: the step's name in the workflow (default: from the agent or capability).
    """

    capability: str | None = None
    agent: str | None = None
    timeout_s: float | None = None
    retries: int | None = None
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    name: str | None = None

    def __post_init__(self) -> None:
        if self.capability is None and self.agent is None:
            raise WorkflowInputError("a Step needs capability= or agent=")

    def to_node(self, name: str | None = None) -> TaskStep:
        """The model's task step (named ``name`` unless the step names itself)."""
        label = self.name or name or node_name(self.agent or self.capability or "step")
        return TaskStep(label, self.capability, self.agent, self.timeout_s, self.retries,
                        dict(self.params))


class Pattern(abc.ABC):
    """What every pattern shares: conversion to the model, and ``execute``."""

    name: str

    @abc.abstractmethod
    def to_node(self, name: str | None = None) -> Node:
        """The pattern as a node of :mod:`workflows.model` (named ``name``, default the
        pattern's own name)."""

    def to_workflow(self, deadline_s: float | None = None) -> Workflow:
        """The pattern as a whole workflow, validated (``deadline_s``: the run's deadline).

        Raises:
            DefinitionError: naming the offending field.
        """
        return as_workflow(Workflow(self.name, self.to_node()), deadline_s)

    async def execute(self, input: Any = None, *, client: Client | None = None,
                      broker: str | None = None, run_id: str | None = None,
                      deadline_s: float | None = None, check_agents: bool = True) -> Result:
        """Run the workflow on ``input`` in this process; see the module docstring."""
        return await execute_workflow(self.to_workflow(deadline_s), input, client=client,
                                      broker=broker, run_id=run_id, check_agents=check_agents)


#: What may stand for a step.
StepLike = Union[type[BaseAgent], BaseAgent, Step, Pattern, TaskStep, model.Pipeline,
                 model.MapReduce, model.Consensus, model.ReviewLoop, model.Approval]

_BAD_NAME_CHARS = re.compile(r"[^A-Za-z0-9_.-]+")


def node_name(text: str) -> str:
    """``text`` made a valid node name (other characters become ``_``, cut to 64)."""
    cleaned = _BAD_NAME_CHARS.sub("_", text).strip("_") or "step"
    return cleaned[:MAX_NAME_CHARS]


def as_node(item: Any, name: str | None = None) -> Node:
    """The node for a step-like ``item``, named ``name`` unless it names itself (a
    :class:`Step` or pattern given a name) or, without ``name``, after its agent.

    Raises:
        WorkflowInputError: ``item`` cannot be a step.
    """
    if isinstance(item, (Step, Pattern)):
        return item.to_node(name)
    if isinstance(item, (TaskStep, model.Pipeline, model.MapReduce, model.Consensus,
                         model.ReviewLoop, model.Approval)):
        return dataclasses.replace(item, name=name) if name else item
    if isinstance(item, type) and issubclass(item, BaseAgent):
        try:
            # Built only to read its name, as `python -m agent_sdk run` builds it.
            item = cast(Callable[[], BaseAgent], item)()
        except TypeError as e:
            raise WorkflowInputError(f"{item.__name__} needs constructor arguments; pass an "
                                     f"instance instead: {e}") from e
    if isinstance(item, BaseAgent):
        return TaskStep(name or node_name(item.name), agent=item.name)
    raise WorkflowInputError(f"cannot use {item!r} as a workflow step: give an agent class "
                             "or instance, a Step, or a workflow pattern")


def unique(nodes: Sequence[Node]) -> tuple[Node, ...]:
    """``nodes`` with repeated names made unique (``review``, ``review2``, ...)."""
    seen: dict[str, int] = {}
    out = []
    for node in nodes:
        count = seen.get(node.name, 0) + 1
        seen[node.name] = count
        if count > 1:
            node = dataclasses.replace(node, name=f"{node.name[:MAX_NAME_CHARS - 4]}{count}")
        out.append(node)
    return tuple(out)


class SequentialPipeline(Pattern):
    """Steps in sequence; each step's result data is the next step's input.

    Args:
        agents: the steps, in order.
        name: the workflow's name.
    """

    def __init__(self, agents: Sequence[StepLike], *, name: str = "pipeline") -> None:
        if not agents:
            raise WorkflowInputError("a SequentialPipeline needs at least one step")
        self.agents = list(agents)
        self.name = name

    def to_node(self, name: str | None = None) -> Node:
        return model.Pipeline(name or self.name, unique([as_node(a) for a in self.agents]))


class MapReduceWorkflow(Pattern):
    """The mapper over every item in parallel (at most ``max_parallel`` at once), then
    the reducer over the results in item order.

    Args:
        mapper: the step run per item (or give it to :meth:`execute`).
        reducer: the step over the results (None: the list of results is the output).
        max_parallel: most items in flight.
        min_success: a fraction (0 < f <= 1) or a count (> 1) of items that must succeed
            for the reduce to run; failed items are reported either way.
        name: the workflow's name.
    """

    def __init__(self, mapper: StepLike | None = None, reducer: StepLike | None = None, *,
                 max_parallel: int = 16, min_success: float = 1.0,
                 name: str = "map_reduce") -> None:
        self.mapper = mapper
        self.reducer = reducer
        self.max_parallel = max_parallel
        self.min_success = min_success
        self.name = name

    def to_node(self, name: str | None = None) -> Node:
        if self.mapper is None:
            raise WorkflowInputError("a MapReduceWorkflow needs a mapper")
        reducer = as_node(self.reducer, "reduce") if self.reducer is not None else None
        return model.MapReduce(name or self.name, as_node(self.mapper, "map"), reducer,
                               self.max_parallel, float(self.min_success))

    async def execute(self, input: Any = None, mapper: StepLike | None = None,
                      reducer: StepLike | None = None, **options: Any) -> Result:
        """Map ``input`` (the items, a list) with ``mapper`` and reduce with ``reducer``
        (each defaulting to the constructor's); other options as :meth:`Pattern.execute`."""
        chosen = self
        if mapper is not None or reducer is not None:
            chosen = MapReduceWorkflow(mapper or self.mapper, reducer or self.reducer,
                                       max_parallel=self.max_parallel,
                                       min_success=self.min_success, name=self.name)
        return await Pattern.execute(chosen, input, **options)


class ConsensusWorkflow(Pattern):
    """Distinct live agent instances vote on the same input, weighted by confidence.

    Args:
        agents: the voter, once per vote wanted (``[JudgeAgent()] * 5``: five distinct
            instances called "judge"), or once (with ``voters``, or every live instance).
        threshold: the winner's share of the weight at which ``consensus`` is true.
        voters: how many instances vote (default: as many as ``agents`` lists, or every
            live one for a single voter).
        name: the workflow's name.
    """

    def __init__(self, agents: Sequence[StepLike] | StepLike, threshold: float = 0.6, *,
                 voters: int | None = None, name: str = "consensus") -> None:
        listed = list(agents) if isinstance(agents, (list, tuple)) else [agents]
        if not listed:
            raise WorkflowInputError("a ConsensusWorkflow needs a voter")
        nodes = [as_node(a, "vote") for a in listed]
        targets = {(n.capability, n.agent) for n in nodes if isinstance(n, TaskStep)}
        if len(targets) != 1 or not all(isinstance(n, TaskStep) for n in nodes):
            raise WorkflowInputError("consensus voters must be task steps of one agent name "
                                     "or capability (distinct instances of it vote)")
        first = nodes[0]
        assert isinstance(first, TaskStep)
        self.voter = first
        self.voters = voters if voters is not None else (
            len(listed) if isinstance(agents, (list, tuple)) and len(listed) > 1 else None)
        self.threshold = threshold
        self.name = name

    def to_node(self, name: str | None = None) -> Node:
        return model.Consensus(name or self.name, self.voter, self.voters, self.threshold)


class ReviewLoop(Pattern):
    """Produce, review, revise with the review's feedback, until approved or
    ``max_rounds`` rounds ran (the reviewer may be an :class:`Approval`).

    Args:
        producer: makes (and revises) the draft.
        reviewer: judges it: ``approved`` and ``feedback`` in its result.
        max_rounds: most rounds.
        name: the workflow's name.
    """

    def __init__(self, producer: StepLike, reviewer: StepLike, max_rounds: int = 3, *,
                 name: str = "review_loop") -> None:
        self.producer = producer
        self.reviewer = reviewer
        self.max_rounds = max_rounds
        self.name = name

    def to_node(self, name: str | None = None) -> Node:
        return model.ReviewLoop(name or self.name, as_node(self.producer, "produce"),
                                as_node(self.reviewer, "review"), self.max_rounds)


class Approval(Pattern):
    """A human decision: the run waits (durably, holding no agent) for an answer given
    with ``orchestrator workflow approve RUN_ID`` or :func:`workflows.api.approve_run`.

    Args:
        prompt: the question shown.
        name: the step's name.
    """

    def __init__(self, prompt: str = "Approve?", *, name: str = "approval") -> None:
        self.prompt = prompt
        self.name = name

    def to_node(self, name: str | None = None) -> Node:
        return model.Approval(name or self.name, self.prompt)


async def execute_workflow(workflow: Workflow, data: Any = None, *,
                           client: Client | None = None, broker: str | None = None,
                           run_id: str | None = None, check_agents: bool = True) -> Result:
    """Run ``workflow`` on ``data`` in this process; see the module docstring."""
    async with connected(client, broker) as c:
        if check_agents:
            await check_live_agents(c, workflow.root)
        record = await run_workflow(workflow, data, client=c, run_id=run_id)
        raise_for(record)
        output = await RunStore(c.state).output_of(record)
    return (output or StepOutput()).to_result(record.run_id)


def task_steps(node: Node) -> list[TaskStep]:
    """Every task step of ``node``'s tree."""
    if isinstance(node, TaskStep):
        return [node]
    if isinstance(node, model.Pipeline):
        return [step for child in node.steps for step in task_steps(child)]
    if isinstance(node, model.MapReduce):
        return task_steps(node.mapper) + (task_steps(node.reducer) if node.reducer else [])
    if isinstance(node, model.Consensus):
        return [node.voter]
    if isinstance(node, model.ReviewLoop):
        return task_steps(node.producer) + task_steps(node.reviewer)
    return []


async def check_live_agents(client: Client, root: Node) -> None:
    """Check that a live agent offers every agent name and capability ``root`` uses.

    Raises:
        NoAgentFor: naming what is missing and what the live agents offer.
    """
    status = await client.status()
    agents = live_agents(status)
    names = {str(a.get("name")) for a in agents} | {str(a.get("id")) for a in agents}
    capabilities = offered_capabilities(status)
    missing = []
    for step in task_steps(root):
        if step.agent is not None and step.agent not in names:
            missing.append(f"agent {step.agent}")
        if step.capability is not None and step.capability not in capabilities:
            missing.append(f"capability {step.capability}")
    if missing:
        available = sorted({f"agent {a.get('name')}" for a in agents}) + \
            sorted(f"capability {c}" for c in capabilities)
        raise NoAgentFor(list(dict.fromkeys(missing)), available)


__all__ = [
    "Approval", "ConsensusWorkflow", "MapReduceWorkflow", "Pattern", "ReviewLoop",
    "SequentialPipeline", "Step", "StepLike", "as_node", "check_live_agents",
    "execute_workflow", "node_name", "task_steps",
]
