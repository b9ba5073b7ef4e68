"""The workflow runtime's pure parts, without a broker: tallies, counts, names, records,
and the Python patterns' conversion to definitions."""

from __future__ import annotations

import pytest

from agent_sdk import OrchestratorError
from tests.workflows.agents import Alpha
from workflows import (
    ConsensusWorkflow, DefinitionError, MapReduceWorkflow, ReviewLoop, SequentialPipeline, Step,
    Workflow, WorkflowInputError,
)
from workflows import Approval as ApprovalPattern
from workflows.consensus import live_instances, tally, Vote
from workflows.ids import check_run_id, Scope, task_id
from workflows.mapreduce import required_successes
from workflows.model import Approval, MapReduce, Pipeline, TaskStep
from workflows.outputs import StepOutput
from workflows.review import verdict
from workflows.runs import HistoryEntry, PendingApproval, RunError, RunRecord, RunStatus


def vote(decision: object, confidence: float, agent: str = "a") -> Vote:
    return Vote(agent, decision, confidence, f"t-{agent}")


def test_the_heaviest_vote_wins_with_its_share_of_the_weight() -> None:
    votes = [vote("yes", 0.9), vote("yes", 0.8), vote("no", 1.0)]
    decision, share, agreed = tally(votes, threshold=0.6)
    assert decision == "yes" and share == pytest.approx(1.7 / 2.7) and agreed is True
    assert tally(votes, threshold=0.7)[2] is False


def test_equal_weights_go_to_the_vote_seen_first_and_zero_confidences_count_alike() -> None:
    assert tally([vote("b", 0.5), vote("a", 0.5)], 0.5)[:2] == ("b", 0.5)
    assert tally([vote("a", 0.0), vote("b", 0.0), vote("b", 0.0)], 0.5)[:2] == (
        "b", pytest.approx(2 / 3))


def test_equal_maps_are_one_vote_whatever_their_key_order() -> None:
    decision, share, _ = tally([vote({"x": 1, "y": [1, 2]}, 1.0),
                                vote({"y": [1, 2], "x": 1}, 1.0), vote({"x": 2}, 1.0)], 0.5)
    assert decision == {"x": 1, "y": [1, 2]} and share == pytest.approx(2 / 3)


def test_live_instances_are_the_ready_matching_agents_least_busy_first() -> None:
    status = {"agents": [
        {"id": "j1", "name": "judge", "capabilities": ["vote"], "state": "ready",
         "circuit": "closed", "in_flight": 3, "max_concurrent": 4},
        {"id": "j2", "name": "judge", "capabilities": ["vote"], "state": "ready",
         "circuit": "closed", "in_flight": 0, "max_concurrent": 4},
        {"id": "j3", "name": "judge", "capabilities": ["vote"], "state": "dead",
         "circuit": "closed", "in_flight": 0, "max_concurrent": 4},
        {"id": "j4", "name": "judge", "capabilities": ["vote"], "state": "ready",
         "circuit": "open", "in_flight": 0, "max_concurrent": 4},
        {"id": "o1", "name": "other", "capabilities": ["other"], "state": "ready",
         "circuit": "closed", "in_flight": 0, "max_concurrent": 4}]}
    assert live_instances(status, TaskStep("v", capability="vote")) == ["j2", "j1"]
    assert live_instances(status, TaskStep("v", agent="judge")) == ["j2", "j1"]


@pytest.mark.parametrize("min_success,items,required", [
    (1.0, 100, 100), (0.95, 100, 95), (0.5, 3, 2), (1.0, 0, 0), (5.0, 10, 5), (2.0, 1, 2)])
def test_min_success_is_a_fraction_up_to_one_and_a_count_above(
        min_success: float, items: int, required: int) -> None:
    assert required_successes(min_success, items) == required


def test_a_review_approves_by_field_or_map_key_and_feeds_back_its_feedback() -> None:
    assert verdict(StepOutput("ok", extras={"approved": True})) == (True, None)
    assert verdict(StepOutput({"approved": False, "feedback": "more"})) == (False, "more")
    assert verdict(StepOutput("x", extras={"approved": False, "comment": "no"})) == (False, "no")
    assert verdict(StepOutput("fix the tests")) == (False, "fix the tests")


def test_paths_name_items_rounds_and_slots_and_derive_task_ids() -> None:
    root = Scope("build")
    assert root.child("audit").child("map").item(17).path == "build/audit/map[17]"
    assert root.child("draft").child("produce").round(2).path == "build/draft/produce@2"
    assert root.child("vote").mark("voters") == "build/vote#voters"
    assert root.child("audit").item(3).quiet and not root.child("audit").quiet
    assert task_id("r1", "build/audit/map[17]") == "wf:r1:build/audit/map[17]"


@pytest.mark.parametrize("bad", ["", "a/b", "-x", "x" * 65, "a b"])
def test_a_bad_run_id_is_refused_in_one_line(bad: str) -> None:
    with pytest.raises(WorkflowInputError) as caught:
        check_run_id(bad)
    assert "\n" not in str(caught.value)


def test_a_run_record_survives_its_stored_form() -> None:
    record = RunRecord("r1", "ship", {"workflow": "ship"}, RunStatus.WAITING_APPROVAL, 1.0,
                       input={"a": [1, 2]}, deadline_at=9.0, runner="me", takeovers=2,
                       pending=[PendingApproval("ship/ok", "Ship?", 2.0, ["x"])],
                       output=StepOutput([1], 0.5, {"failed": []}),
                       error=RunError("deadline", "late", "ship/a"))
    record.note("approval", by="ana", path="ship/ok", approved=True, comment="fine")
    again = RunRecord.from_doc(record.to_doc())
    assert again == record
    assert again.history == [HistoryEntry("approval", record.history[0].at, "ana", "ship/ok",
                                          True, "fine")]


def test_the_python_patterns_build_valid_definitions_that_round_trip() -> None:
    pipeline = SequentialPipeline([
        Alpha(), Step(capability="security audit", timeout_s=5, retries=1), Alpha,
        MapReduceWorkflow(Step(capability="scan"), Step(capability="merge"), max_parallel=4,
                          min_success=0.9),
        ReviewLoop(Step(capability="write"), ApprovalPattern("Good?"), max_rounds=2),
        ConsensusWorkflow([Step(capability="judge")] * 3, threshold=0.7)], name="build")
    workflow = pipeline.to_workflow(deadline_s=60)
    assert Workflow.from_dict(workflow.to_dict()) == workflow
    root = workflow.root
    assert isinstance(root, Pipeline) and workflow.deadline_s == 60
    assert [step.name for step in root.steps] == [
        "alpha", "security_audit", "alpha2", "map_reduce", "review_loop", "consensus"]
    assert root.steps[0] == TaskStep("alpha", agent="alpha")
    assert root.steps[1] == TaskStep("security_audit", capability="security audit",
                                     timeout_s=5, retries=1)
    mapped = root.steps[3]
    assert isinstance(mapped, MapReduce) and mapped.mapper.name == "map" and \
        mapped.max_parallel == 4 and mapped.min_success == 0.9
    assert root.steps[4].reviewer == Approval("review", "Good?")  # type: ignore[union-attr]
    assert root.steps[5].voters == 3  # type: ignore[union-attr]


def test_bad_python_workflows_are_refused_with_workflow_errors() -> None:
    with pytest.raises(WorkflowInputError):
        Step()
    with pytest.raises(WorkflowInputError):
        ConsensusWorkflow([Step(capability="a"), Step(capability="b")])
    with pytest.raises(WorkflowInputError):
        SequentialPipeline([42]).to_workflow()  # type: ignore[list-item]
    with pytest.raises(DefinitionError) as caught:
        MapReduceWorkflow(Step(capability="a"), max_parallel=0).to_workflow()
    assert isinstance(caught.value, OrchestratorError) and "max_parallel" in str(caught.value)


def test_a_share_exactly_at_the_threshold_is_consensus() -> None:
    # 0.7 + 0.6 + 0.2 of 2.5 is 0.6, which floats add up to 0.5999999999999999
    votes = [vote("yes", 0.7), vote("yes", 0.6), vote("yes", 0.2), vote("no", 0.1),
             vote("no", 0.9)]
    decision, share, agreed = tally(votes, threshold=0.6)
    assert decision == "yes" and share == pytest.approx(0.6) and agreed is True


def test_a_review_loop_whose_steps_share_a_name_is_refused() -> None:
    from workflows.model import DefinitionError, Workflow

    with pytest.raises(DefinitionError) as info:
        Workflow.from_dict({"steps": [{"kind": "review_loop", "name": "loop",
                                       "producer": {"capability": "write", "name": "x"},
                                       "reviewer": {"capability": "critique", "name": "x"}}]})
    assert info.value.path == ("steps", 0, "reviewer", "name")


def test_a_python_review_loop_whose_steps_share_a_name_is_refused() -> None:
    from workflows import ReviewLoop, Step
    from workflows.model import DefinitionError

    loop = ReviewLoop(Step(capability="write", name="x"), Step(capability="critique", name="x"))
    with pytest.raises(DefinitionError):
        loop.to_node()
