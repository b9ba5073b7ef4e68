"""The YAML form: round trips for every node kind, errors that name the line and the field,
and no traceback whatever the text."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from workflows.model import Approval, Consensus, MapReduce, Pipeline, ReviewLoop, TaskStep, \
    Workflow
from workflows.yamlform import MAX_DEPTH, WorkflowFileError, dump_workflow, load_workflow, \
    load_workflow_file, load_workflow_text


def doc(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


def error_for(text: str) -> WorkflowFileError:
    with pytest.raises(WorkflowFileError) as caught:
        load_workflow_text(doc(text), filename="wf.yaml")
    return caught.value


EVERY_KIND = Workflow("everything", Pipeline("everything", (
    TaskStep("fetch", capability="search", timeout_s=30.0, retries=2,
             params={"depth": 3, "tags": ["a", "b"], "nested": {"x": None, "on": True}}),
    TaskStep("pinned", agent="researcher-1"),
    MapReduce("audit", TaskStep("scan", capability="security_audit"),
              TaskStep("merge", capability="synthesis"), max_parallel=4, min_success=0.95),
    MapReduce("counted", TaskStep("map", capability="echo"), None, min_success=3.0),
    Consensus("vote", TaskStep("voter", capability="classify"), voters=5, threshold=0.6),
    Consensus("everyone", TaskStep("voter", capability="classify")),
    ReviewLoop("draft", TaskStep("write", capability="code_generation"),
               TaskStep("check", capability="code_review"), max_rounds=2),
    ReviewLoop("gated", TaskStep("write", capability="code_generation"),
               Approval("human", "Ship it?")),
    Pipeline("inner", (Approval("sign-off", "Approve the release?\nIt is big."),
                       TaskStep("ship", capability="deploy"))),
)), deadline_s=600.0)


# --- round trips -------------------------------------------------------------------------


def test_every_node_kind_round_trips_through_yaml() -> None:
    # Given a workflow holding every kind of node, with every optional field
    # When it is written as YAML and read back
    text = dump_workflow(EVERY_KIND)
    # Then it is the same workflow, written in the steps: form people write
    assert load_workflow(text) == EVERY_KIND
    assert text.startswith("workflow: everything\ndeadline_s: 600.0\nsteps:\n")


@pytest.mark.parametrize("root", [
    TaskStep("only", capability="echo"),
    MapReduce("mr", TaskStep("m", capability="echo"), TaskStep("r", capability="sum")),
    Consensus("c", TaskStep("v", capability="vote"), voters=3, threshold=1.0),
    ReviewLoop("rl", TaskStep("p", capability="gen"), TaskStep("r", capability="rev")),
    Approval("a", "ok?"),
    Pipeline("other-name", (TaskStep("x", capability="echo"),)),
])
def test_a_root_of_each_kind_round_trips(root: Any) -> None:
    workflow = Workflow("wf", root)
    assert load_workflow(dump_workflow(workflow)) == workflow


def test_the_yaml_a_person_writes_gives_the_python_workflow() -> None:
    # Given the same map-reduce written in YAML and built in Python
    text = doc("""
        workflow: audit
        deadline_s: 120
        steps:
          - kind: map_reduce
            name: scan
            mapper: {capability: security_audit, timeout_s: 60}
            reducer: {capability: synthesis}
            max_parallel: 8
            min_success: 0.95
        """)
    python = Workflow("audit", Pipeline("audit", (
        MapReduce("scan", TaskStep("map", capability="security_audit", timeout_s=60.0),
                  TaskStep("reduce", capability="synthesis"), 8, 0.95),)), 120.0)
    # Then they are equal
    assert load_workflow(text) == python


def test_a_file_loads_by_path_and_by_name(tmp_path: Path) -> None:
    path = tmp_path / "flow.yaml"
    path.write_text(dump_workflow(EVERY_KIND))
    assert load_workflow(path) == EVERY_KIND
    assert load_workflow(str(path)) == EVERY_KIND
    assert load_workflow_file(path) == EVERY_KIND


def test_anchors_and_merge_keys_are_allowed() -> None:
    text = doc("""
        workflow: shared
        steps:
          - &scan {name: first, capability: security_audit, timeout_s: 5}
          - <<: *scan
            name: second
        """)
    workflow = load_workflow(text)
    assert isinstance(workflow.root, Pipeline)
    assert [s.name for s in workflow.root.steps] == ["first", "second"]


# --- errors name the line and the field --------------------------------------------------


def test_an_unknown_kind_names_its_line() -> None:
    error = error_for("""
        workflow: w
        steps:
          - capability: echo
          - kind: fan_out
            name: x
        """)
    assert (error.line, error.field) == (4, "steps[1].kind")
    assert str(error).startswith("wf.yaml:4: steps[1].kind: unknown kind 'fan_out'")


def test_a_missing_capability_names_the_step_that_lacks_it() -> None:
    error = error_for("""
        workflow: w
        steps:
          - kind: map_reduce
            name: audit
            mapper:
              timeout_s: 30
        """)
    # Then the line is the mapper's key: the field that is incomplete
    assert (error.line, error.field) == (5, "steps[0].mapper")


def test_an_empty_capability_names_its_own_line() -> None:
    error = error_for("""
        workflow: w
        steps:
          - name: a
            capability: echo
          - name: b
            capability: ""
        """)
    assert str(error) == "wf.yaml:6: steps[1].capability: must be a non-empty string"
    assert error.column == 5


@pytest.mark.parametrize("value", ["0", "-1", "1.5", "true", "lots", ".nan"])
def test_a_bad_min_success_names_its_line(value: str) -> None:
    error = error_for(f"""
        workflow: w
        steps:
          - kind: map_reduce
            mapper: {{capability: echo}}

            min_success: {value}
        """)
    assert (error.line, error.field) == (6, "steps[0].min_success")
    assert "count >= 1 or a fraction" in error.reason


def test_a_duplicate_step_name_names_the_second_one() -> None:
    error = error_for("""
        workflow: w
        steps:
          - name: same
            capability: a
          - capability: b
            name: same
        """)
    assert (error.line, error.field) == (6, "steps[1].name")
    assert "used twice" in str(error)


def test_an_unknown_field_names_the_key() -> None:
    error = error_for("""
        workflow: w
        steps:
          - kind: review_loop
            producer: {capability: gen}
            reviewer:
              capability: rev
              approve_when: always
        """)
    assert (error.line, error.column, error.field) == (7, 7, "steps[0].reviewer.approve_when")
    assert "unknown field" in error.reason


def test_a_key_written_twice_is_an_error_not_the_last_one_wins() -> None:
    error = error_for("""
        workflow: w
        steps:
          - capability: a
            capability: b
        """)
    assert error.line == 4
    assert "written twice" in error.reason


@pytest.mark.parametrize("text,line", [
    ("workflow: w\nsteps:\n  - capability: a\n   bad indent: here\n", 4),
    ("workflow: w\nsteps: [\n  {capability: a},\n", 4),
    ("workflow: w\nsteps:\n  - capability: a\n    name: b: c\n", 4),
    ("workflow: w\nsteps:\n  - capability: a\n  - x\n  y: 1\n", 5),
    ("workflow: 'unterminated\nsteps: []\n", 3),
    ("workflow: w\n\tsteps: []\n", 2),
])
def test_a_syntax_error_names_its_line(text: str, line: int) -> None:
    with pytest.raises(WorkflowFileError) as caught:
        load_workflow_text(text, filename="wf.yaml")
    assert caught.value.line == line
    assert str(caught.value).startswith(f"wf.yaml:{line}: YAML syntax: ")


@pytest.mark.parametrize("text,reason", [
    ("- capability: a\n- capability: b\n", "top level: must be a map, not list"),
    ("just text\n", "top level: must be a map, not str"),
    ("", "the file holds no workflow (it is empty)"),
    ("# only a comment\n", "the file holds no workflow (it is empty)"),
    ("workflow: w\n", "top level: a workflow needs 'steps' (a list) or 'root' (a node)"),
])
def test_a_document_that_is_not_a_workflow_map_says_so(text: str, reason: str) -> None:
    with pytest.raises(WorkflowFileError) as caught:
        load_workflow_text(text, filename="wf.yaml")
    assert str(caught.value) == f"wf.yaml:1: {reason}"


def test_errors_from_a_file_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yml"
    path.write_text("workflow: w\nsteps:\n  - kind: nope\n")
    with pytest.raises(WorkflowFileError) as caught:
        load_workflow(str(path))
    assert str(caught.value).startswith(f"{path}:3: steps[0].kind: unknown kind")


def test_a_missing_or_undecodable_file_is_one_error(tmp_path: Path) -> None:
    with pytest.raises(WorkflowFileError, match=r"missing\.yaml: cannot read"):
        load_workflow(tmp_path / "missing.yaml")
    path = tmp_path / "latin.yaml"
    path.write_bytes(b"workflow: w\nsteps:\n  - capability: caf\xe9\n")
    with pytest.raises(WorkflowFileError, match=r"latin\.yaml:3: not UTF-8 text"):
        load_workflow(path)


# --- hostile input -----------------------------------------------------------------------


@pytest.mark.parametrize("text,reason", [
    ("a: &x [*x]\n", "contains it"),
    ("a: &x {b: *x}\n", "contains it"),
    ("workflow: w\ndeadline_s: " + "9" * 400 + "\nsteps: []\n", "digits"),
    ("workflow: w\ndeadline_s: !!int abc\nsteps: []\n", "cannot read 'abc'"),
    ("workflow: w\ndeadline_s: 2001-02-30\nsteps: []\n", "out of range"),
    ("workflow: w\nsteps: [!!python/object:os.system {}]\n", "YAML syntax"),
    ("workflow: w\nsteps:\n  - {? [a, b] : c}\n", "YAML syntax"),
    ("x: \x00\n", "YAML syntax"),
    ("a: " + "[" * (MAX_DEPTH + 5) + "]" * (MAX_DEPTH + 5) + "\n", "nested"),
    ("a: " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
    ("---\nworkflow: a\n---\nworkflow: b\n", "single document"),
])
def test_hostile_documents_are_refused_with_one_error(text: str, reason: str) -> None:
    with pytest.raises(WorkflowFileError) as caught:
        load_workflow_text(text)
    assert reason in str(caught.value)
    assert "\n" not in str(caught.value)


def test_an_alias_bomb_is_refused_before_it_expands() -> None:
    # Given nine levels of aliases, each listing the one below ten times (10**9 nodes)
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)]
    with pytest.raises(WorkflowFileError, match="expands to more than"):
        load_workflow_text("\n".join(lines) + "\n")


def _check_only_workflow_file_errors(text: str) -> None:
    try:
        result = load_workflow_text(text)
    except WorkflowFileError as error:
        assert "\n" not in str(error)
        return
    assert isinstance(result, Workflow)


YAMLISH = st.text(alphabet=st.sampled_from(list("abkindstepcaptyworflmu_ :-[]{},&*!?|>'\"#%@\n\t 0123.\\")
                                            + ["\x00", "\u2028", "\ufeff", "é"]),
                  max_size=200)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(YAMLISH)
def test_random_yamlish_text_gives_a_workflow_or_one_error(text: str) -> None:
    _check_only_workflow_file_errors(text)


FIELDS = ["workflow", "steps", "root", "deadline_s", "kind", "name", "capability", "agent",
          "timeout_s", "retries", "params", "mapper", "reducer", "max_parallel",
          "min_success", "voter", "voters", "threshold", "producer", "reviewer",
          "max_rounds", "prompt", "task", "map_reduce", "pipeline", "consensus",
          "review_loop", "approval"]
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10 ** 30, 10 ** 30),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                    st.sampled_from(FIELDS))
STRUCTURES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) |
    st.dictionaries(st.sampled_from(FIELDS) | st.integers(0, 3), inner, max_size=5),
    max_leaves=25)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(STRUCTURES)
def test_random_structures_give_a_workflow_or_one_error(data: Any) -> None:
    # Given any structure over the workflow's own field names, written as YAML
    text = yaml.safe_dump(data, allow_unicode=True)
    # Then loading it ends in a workflow or a WorkflowFileError, and nothing else
    _check_only_workflow_file_errors(text)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 10_000), st.text(max_size=3))
def test_a_valid_file_with_a_random_edit_gives_a_workflow_or_one_error(position: int,
                                                                       insert: str) -> None:
    text = dump_workflow(EVERY_KIND)
    at = position % (len(text) + 1)
    _check_only_workflow_file_errors(text[:at] + insert + text[at:])


NAMES = st.text(alphabet="abcxyz019_-.", min_size=1, max_size=10)
TEXTS = st.text(min_size=1, max_size=20).filter(
    lambda s: s.strip() != "" and not any(ord(c) < 32 for c in s if c not in "\n\t"))


@settings(max_examples=200, deadline=None)
@given(NAMES, TEXTS, TEXTS, st.floats(0.01, 10 ** 6), st.integers(1, 100))
def test_random_valid_workflows_round_trip(name: str, capability: str, prompt: str,
                                           timeout: float, parallel: int) -> None:
    workflow = Workflow(name, Pipeline(name, (
        MapReduce("m", TaskStep("map", capability=capability, timeout_s=timeout),
                  TaskStep("reduce", capability=capability), parallel, 1.0),
        Approval("gate", prompt))))
    assert load_workflow(dump_workflow(workflow)) == workflow
