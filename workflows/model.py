"""Workflow definitions as data: what a run executes, in one typed, serialisable form.

A definition is a tree of nodes. Python (``SequentialPipeline([...])``), YAML files and the
planner all build the same tree, and a run stores it (``to_dict``) in the state service,
so that any workflow runner can continue the run from its checkpoint.

The dict form (what YAML and the planner write) is one map per node, with ``kind``::

    {"kind": "task", "name": "audit", "capability": "security_audit", "timeout_s": 60}
    {"kind": "pipeline", "name": "build", "steps": [node, node, ...]}
    {"kind": "map_reduce", "name": "audit", "mapper": node, "reducer": node,
     "max_parallel": 8, "min_success": 0.95}
    {"kind": "consensus", "name": "vote", "voter": task-node, "voters": 5, "threshold": 0.6}
    {"kind": "review_loop", "name": "draft", "producer": node, "reviewer": node,
     "max_rounds": 3}
    {"kind": "approval", "name": "sign-off", "prompt": "Ship it?"}

``kind`` may be left out where ``capability`` or ``agent`` is given (a task). A workflow
is ``{"workflow": NAME, "deadline_s": S, "steps": [...]}`` (its root is a pipeline of the
steps) or ``{"workflow": NAME, "root": node}``. Names are unique among siblings; a node's
*path* (``build/audit/map``) names it in the run, and derives its tasks' ids.

What flows: a pipeline passes each step's result data to the next step as its input. A
map-reduce maps every element of its input (a list) and hands the reducer the map results'
data in item order. Consensus sends its input to ``voters`` distinct agent instances. A
review loop sends its input to the producer, the producer's output to the reviewer, and
the review back to the producer until the review approves.

Invalid definitions raise :class:`DefinitionError` with the path of the offending field
(``("steps", 2, "mapper", "capability")``), which the YAML loader turns into a line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Final, Union

from workflows.errors import WorkflowError

#: Where a field sits in a definition's dict form: keys and list indexes from the root.
FieldPath = tuple[Union[str, int], ...]

MAX_NAME_CHARS: Final = 64
#: Characters a node name may hold: it becomes part of task ids and state keys.
_NAME_CHARS: Final = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")


class DefinitionError(WorkflowError, ValueError):
    """A workflow definition that cannot run, and where it is wrong.

    Attributes:
        path: the offending field, from the root of the dict form.
        reason: what is wrong, in one line.
    """

    def __init__(self, path: FieldPath, reason: str) -> None:
        self.path = tuple(path)
        self.reason = reason
        super().__init__(f"{format_path(self.path)}: {reason}" if self.path else reason)


def format_path(path: FieldPath) -> str:
    """``("steps", 2, "mapper")`` as ``steps[2].mapper``."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


@dataclass(frozen=True)
class TaskStep:
    """One task, routed by capability or to an agent by name.

    Attributes:
        name: the step's name among its siblings.
        capability: the capability the task needs (or None with ``agent``).
        agent: the agent name (or id) the task must go to.
        timeout_s: the task's whole deadline (None: the run's remaining time).
        retries: retries forced after failures (None: the broker's policy).
        params: extra task fields sent with every task of this step.
    """

    name: str
    capability: str | None = None
    agent: str | None = None
    timeout_s: float | None = None
    retries: int | None = None
    params: dict[str, Any] = field(default_factory=dict)

    kind: ClassVar[str] = "task"


@dataclass(frozen=True)
class Pipeline:
    """Steps in order; each step's output is the next step's input."""

    name: str
    steps: tuple[Node, ...]

    kind: ClassVar[str] = "pipeline"


@dataclass(frozen=True)
class MapReduce:
    """``mapper`` over every item of the input, at most ``max_parallel`` at once, then
    ``reducer`` over the map results in item order (no reducer: the list is the output).

    Attributes:
        min_success: a count (int >= 1) or a fraction (0 < f <= 1) of items that must
            succeed for the reduce to run; the failed items are reported either way.
    """

    name: str
    mapper: Node
    reducer: Node | None = None
    max_parallel: int = 16
    min_success: float = 1.0

    kind: ClassVar[str] = "map_reduce"


@dataclass(frozen=True)
class Consensus:
    """The same input to ``voters`` distinct live instances of ``voter``'s target; votes
    are weighted by each result's confidence.

    Attributes:
        voters: how many instances vote (None: every live instance).
        threshold: the winner's share of the weight at which ``consensus`` is true.
    """

    name: str
    voter: TaskStep
    voters: int | None = None
    threshold: float = 0.6

    kind: ClassVar[str] = "consensus"


@dataclass(frozen=True)
class ReviewLoop:
    """Produce, review, revise with the review's feedback, until approved or
    ``max_rounds`` rounds ran. ``reviewer`` may be an :class:`Approval` (a human gate)."""

    name: str
    producer: Node
    reviewer: Node
    max_rounds: int = 3

    kind: ClassVar[str] = "review_loop"

    def __post_init__(self) -> None:
        # Built from Python as well as from the dict form (which says where): the step
        # names derive the task ids, so equal names would make one task of two steps.
        if self.producer.name == self.reviewer.name:
            raise DefinitionError(("reviewer", "name"), "the reviewer needs a name other "
                                  f"than the producer's ({self.producer.name!r})")


@dataclass(frozen=True)
class Approval:
    """A human decision: the run pauses (durably, holding no agent) until someone
    approves or rejects it; its output is its input, passed through, with the answer
    ``{"approved", "comment", "by", "at"}`` as the output's extras."""

    name: str
    prompt: str

    kind: ClassVar[str] = "approval"


Node = Union[TaskStep, Pipeline, MapReduce, Consensus, ReviewLoop, Approval]


#: The largest token budget a run may set (far beyond any real run; a typo stops here).
MAX_TOKEN_BUDGET: Final = 10 ** 12


@dataclass(frozen=True)
class Workflow:
    """A whole definition: its root node, the run's own deadline and its LLM token budget
    (``max_tokens``: shared by every step's agents; the run ends ``budget_exceeded``
    once spent)."""

    name: str
    root: Node
    deadline_s: float | None = None
    max_tokens: int | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"workflow": self.name, "root": node_to_dict(self.root)}
        if self.deadline_s is not None:
            out["deadline_s"] = self.deadline_s
        if self.max_tokens is not None:
            out["max_tokens"] = self.max_tokens
        return out

    @classmethod
    def from_dict(cls, data: Any) -> Workflow:
        """Validate and build a workflow from its dict form.

        Raises:
            DefinitionError: naming the offending field's path.
        """
        doc = _Fields(data, ())
        name = doc.name("workflow", default="workflow")
        deadline = doc.positive("deadline_s")
        if "root" in doc.data and "steps" in doc.data:
            raise DefinitionError(("steps",), "give either 'root' or 'steps', not both")
        if "root" in doc.data:
            root = node_from_dict(doc.data["root"], ("root",))
        elif "steps" in doc.data:
            root = Pipeline(name, _steps(doc.data["steps"], ("steps",)))
        else:
            raise DefinitionError((), "a workflow needs 'steps' (a list) or 'root' (a node)")
        max_tokens = doc.data.get("max_tokens")
        if max_tokens is not None and (isinstance(max_tokens, bool) or
                                       not isinstance(max_tokens, int) or
                                       not 1 <= max_tokens <= MAX_TOKEN_BUDGET):
            raise DefinitionError(("max_tokens",), f"must be a whole number of tokens from 1 "
                                                   f"to {MAX_TOKEN_BUDGET}")
        doc.done({"workflow", "deadline_s", "root", "steps", "max_tokens"})
        return cls(name, root, deadline, max_tokens)


def node_to_dict(node: Node) -> dict[str, Any]:
    """The dict form of ``node`` (inverse of :func:`node_from_dict`)."""
    out: dict[str, Any] = {"kind": node.kind, "name": node.name}
    if isinstance(node, TaskStep):
        for key in ("capability", "agent", "timeout_s", "retries"):
            if getattr(node, key) is not None:
                out[key] = getattr(node, key)
        if node.params:
            out["params"] = dict(node.params)
    elif isinstance(node, Pipeline):
        out["steps"] = [node_to_dict(step) for step in node.steps]
    elif isinstance(node, MapReduce):
        out["mapper"] = node_to_dict(node.mapper)
        if node.reducer is not None:
            out["reducer"] = node_to_dict(node.reducer)
        out["max_parallel"] = node.max_parallel
        out["min_success"] = node.min_success
    elif isinstance(node, Consensus):
        out["voter"] = node_to_dict(node.voter)
        if node.voters is not None:
            out["voters"] = node.voters
        out["threshold"] = node.threshold
    elif isinstance(node, ReviewLoop):
        out["producer"] = node_to_dict(node.producer)
        out["reviewer"] = node_to_dict(node.reviewer)
        out["max_rounds"] = node.max_rounds
    else:
        out["prompt"] = node.prompt
    return out


def node_from_dict(data: Any, path: FieldPath, default_name: str = "step") -> Node:
    """Validate and build one node (see the module docstring for the forms).

    Raises:
        DefinitionError: naming the offending field's path.
    """
    doc = _Fields(data, path)
    kind = doc.data.get("kind")
    if kind is None and ("capability" in doc.data or "agent" in doc.data):
        kind = "task"
    builder = _BUILDERS.get(kind) if isinstance(kind, str) else None
    if builder is None:
        if kind is None:
            raise DefinitionError(path, "needs 'capability' or 'agent' (a task), or 'kind' "
                                  f"(one of {', '.join(sorted(_BUILDERS))})")
        raise DefinitionError(path + ("kind",), f"unknown kind {kind!r}; expected one of "
                              f"{', '.join(sorted(_BUILDERS))}")
    return builder(doc, default_name)


def _task(doc: _Fields, default_name: str) -> TaskStep:
    name = doc.name("name", default=default_name)
    capability = doc.text("capability")
    agent = doc.text("agent")
    if capability is None and agent is None:
        raise DefinitionError(doc.path, "a task step needs 'capability' or 'agent'")
    params = doc.data.get("params", {})
    if not isinstance(params, dict) or not all(isinstance(k, str) for k in params):
        raise DefinitionError(doc.path + ("params",), "must be a map with string keys")
    retries = doc.count("retries", minimum=0)
    doc.done({"kind", "name", "capability", "agent", "timeout_s", "retries", "params"})
    return TaskStep(name, capability, agent, doc.positive("timeout_s"), retries, dict(params))


def _pipeline(doc: _Fields, default_name: str) -> Pipeline:
    name = doc.name("name", default=default_name)
    doc.done({"kind", "name", "steps"})
    return Pipeline(name, _steps(doc.data.get("steps"), doc.path + ("steps",)))


def _map_reduce(doc: _Fields, default_name: str) -> MapReduce:
    name = doc.name("name", default=default_name)
    mapper = doc.node("mapper", "map")
    reducer = doc.node("reducer", "reduce", required=False)
    max_parallel = doc.count("max_parallel", minimum=1)
    min_success = doc.data.get("min_success", 1.0)
    where = doc.path + ("min_success",)
    if isinstance(min_success, bool) or not isinstance(min_success, (int, float)) or \
            not _finite(min_success) or min_success <= 0 or \
            (isinstance(min_success, float) and 1.0 < min_success and
             not min_success.is_integer()):
        raise DefinitionError(where, "must be a count >= 1 or a fraction in (0, 1]")
    doc.done({"kind", "name", "mapper", "reducer", "max_parallel", "min_success"})
    return MapReduce(name, mapper, reducer, 16 if max_parallel is None else max_parallel,
                     float(min_success))


def _consensus(doc: _Fields, default_name: str) -> Consensus:
    name = doc.name("name", default=default_name)
    voter = doc.node("voter", "vote")
    if not isinstance(voter, TaskStep):
        raise DefinitionError(doc.path + ("voter",), "a voter must be a task step")
    threshold = doc.data.get("threshold", 0.6)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or \
            not 0 < threshold <= 1:
        raise DefinitionError(doc.path + ("threshold",), "must be a fraction in (0, 1]")
    voters = doc.count("voters", minimum=1)
    doc.done({"kind", "name", "voter", "voters", "threshold"})
    return Consensus(name, voter, voters, float(threshold))


def _review_loop(doc: _Fields, default_name: str) -> ReviewLoop:
    name = doc.name("name", default=default_name)
    producer = doc.node("producer", "produce")
    reviewer = doc.node("reviewer", "review")
    if producer.name == reviewer.name:
        # Their tasks' ids derive from their names: the reviewer would attach to the
        # producer's task and review nothing.
        raise DefinitionError(doc.path + ("reviewer", "name"),
                              f"the reviewer needs a name other than the producer's "
                              f"({producer.name!r})")
    max_rounds = doc.count("max_rounds", minimum=1)
    doc.done({"kind", "name", "producer", "reviewer", "max_rounds"})
    return ReviewLoop(name, producer, reviewer, 3 if max_rounds is None else max_rounds)


def _approval(doc: _Fields, default_name: str) -> Approval:
    name = doc.name("name", default=default_name)
    prompt = doc.text("prompt")
    doc.done({"kind", "name", "prompt"})
    return Approval(name, prompt or "Approve?")


_BUILDERS: Final[dict[str, Callable[[_Fields, str], Node]]] = {"task": _task, "pipeline": _pipeline, "map_reduce": _map_reduce,
                    "consensus": _consensus, "review_loop": _review_loop,
                    "approval": _approval}


def _steps(data: Any, path: FieldPath) -> tuple[Node, ...]:
    if not isinstance(data, list) or not data:
        raise DefinitionError(path, "must be a non-empty list of steps")
    steps: list[Node] = []
    seen: set[str] = set()
    for index, item in enumerate(data):
        step = node_from_dict(item, path + (index,), default_name=f"step{index + 1}")
        if step.name in seen:
            raise DefinitionError(path + (index, "name"),
                                  f"the name {step.name!r} is used twice in this list")
        seen.add(step.name)
        steps.append(step)
    return tuple(steps)


def _finite(value: float) -> bool:
    """Whether ``value`` is a finite number a float can hold (``math.isfinite`` raises
    OverflowError for an integer like 10**400, which YAML and JSON both allow)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


class _Fields:
    """One map of the dict form, read field by field with the path at hand."""

    def __init__(self, data: Any, path: FieldPath) -> None:
        if not isinstance(data, dict):
            raise DefinitionError(path, f"must be a map, not {type(data).__name__}")
        self.data: dict[str, Any] = data
        self.path = path

    def done(self, known: set[str]) -> None:
        for key in self.data:
            if key not in known:
                raise DefinitionError(self.path + (str(key),),
                                      f"unknown field; expected one of {', '.join(sorted(known))}")

    def name(self, key: str, default: str) -> str:
        value = self.data.get(key, default)
        if not isinstance(value, str) or not value or len(value) > MAX_NAME_CHARS or \
                not set(value) <= _NAME_CHARS:
            raise DefinitionError(self.path + (key,), "must be 1 to 64 of the characters "
                                  "a-z A-Z 0-9 _ - .")
        return value

    def text(self, key: str) -> str | None:
        value = self.data.get(key)
        if value is None:
            return None
        if not isinstance(value, str) or not value.strip() or \
                any(ord(c) < 32 for c in value if c not in "\n\t"):
            raise DefinitionError(self.path + (key,), "must be a non-empty string")
        return value

    def positive(self, key: str) -> float | None:
        value = self.data.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                not _finite(value) or value <= 0 or value > 10 ** 9:
            raise DefinitionError(self.path + (key,), "must be a positive number of seconds")
        return float(value)

    def count(self, key: str, minimum: int) -> int | None:
        value = self.data.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or \
                not minimum <= value <= 1_000_000:
            raise DefinitionError(self.path + (key,),
                                  f"must be a whole number from {minimum} to 1000000")
        return value

    def node(self, key: str, default_name: str, required: bool = True) -> Any:
        if key not in self.data:
            if required:
                raise DefinitionError(self.path + (key,), "is required")
            return None
        return node_from_dict(self.data[key], self.path + (key,), default_name)
