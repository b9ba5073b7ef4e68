"""Traces across processes: a 3-step workflow run in this process (the client, with
OpenTelemetry's in-memory exporter) against a broker and an agent process (exporting to a
shared JSON-lines file) is one trace: the run's ``invoke_workflow`` span, each step's
client span under it, and under each of those the broker's task span and the agent's
``invoke_agent`` span."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from agent_sdk import Client
from agent_sdk.loop import run as run_loop
from cli.processes import wait_until
from tests.conftest import Cluster
from tests.support import wait_status
from wire.tracing import init_tracing, shutdown_tracing
from workflows import SequentialPipeline, Step

TRACED_ENV = {"ORCH_OTEL_EXPORTER": "jsonl", "ORCH_OTEL_SAMPLE_RATIO": "1",
              # export each batch at once: the test waits for the file, not for exit
              "OTEL_BSP_SCHEDULE_DELAY": "50"}


@pytest.fixture
def memory() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    shutdown_tracing()
    init_tracing("test-client", exporter, env={"ORCH_OTEL_SAMPLE_RATIO": "1"})
    try:
        yield exporter
    finally:
        shutdown_tracing()


def file_spans(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_a_three_step_workflow_is_one_trace_across_processes(
        cluster: Cluster, tmp_path: Path, memory: InMemorySpanExporter,
        monkeypatch: pytest.MonkeyPatch) -> None:
    spans_file = tmp_path / "spans.jsonl"
    for key, value in {**TRACED_ENV, "ORCH_OTEL_FILE": str(spans_file)}.items():
        monkeypatch.setenv(key, value)  # the broker and agent processes inherit them
    broker = cluster.broker()
    cluster.agent(broker.url, agent_caps="alpha,beta,gamma")
    wait_status(cluster.client(broker.url), lambda s: len(s["agents"]) == 1, what="agent")

    async def run_three() -> Any:
        async with Client(broker.url) as client:
            pipeline = SequentialPipeline([Step(capability="alpha"), Step(capability="beta"),
                                           Step(capability="gamma")], name="three")
            return await pipeline.execute({"n": 1}, client=client)

    outcome = run_loop(run_three())
    assert outcome.ok, outcome

    ours = [span for span in memory.get_finished_spans()]
    roots = [s for s in ours if s.name == "invoke_workflow three"]
    assert len(roots) == 1
    trace_id = roots[0].context.trace_id
    steps = [s for s in ours if s.name.startswith("invoke_agent ")
             and s.parent is not None and s.parent.span_id == roots[0].context.span_id]
    assert sorted(s.name for s in steps) == ["invoke_agent alpha", "invoke_agent beta",
                                            "invoke_agent gamma"]
    assert all(s.context.trace_id == trace_id for s in steps)
    step_ids = {f"{s.context.span_id:016x}" for s in steps}
    trace_hex = f"{trace_id:032x}"

    def theirs() -> list[dict[str, Any]]:
        return [s for s in file_spans(spans_file) if s["trace_id"] == trace_hex]

    def complete() -> bool:
        spans = theirs()
        return (sum(s["name"] == "orchestrator.broker.task" for s in spans) == 3
                and sum(s["service"].startswith("agent ") for s in spans) == 3)

    assert wait_until(complete, 20), theirs()
    spans = theirs()
    broker_tasks = [s for s in spans if s["name"] == "orchestrator.broker.task"]
    executions = [s for s in spans if s["service"].startswith("agent ")]
    # Each step's client span is the parent of the broker's span and the agent's span.
    assert {s["parent_span_id"] for s in broker_tasks} == step_ids
    assert {s["parent_span_id"] for s in executions} == step_ids
    assert all(s["service"] == "orchestrator-broker" for s in broker_tasks)
    assert all(s["attributes"]["gen_ai.operation.name"] == "invoke_agent" for s in executions)
    # Under each broker task span: its queue wait and its one dispatch.
    task_ids = {s["span_id"] for s in broker_tasks}
    inner = [s for s in spans if s.get("parent_span_id") in task_ids]
    assert sorted(s["name"] for s in inner) == ["dispatch"] * 3 + ["queue_wait"] * 3


def test_without_tracing_nothing_is_added_to_the_wire() -> None:
    # The submit and task items keep their declared length; a traced one has one more.
    from wire.tasks import (
        Assignment, Dispatch, Submit, TaskSpec, decode, encode, trace_of, with_trace,
    )
    plain = TaskSpec("t1", b"\x80", ("echo",))
    traced = with_trace(plain, "00-" + "1" * 32 + "-" + "2" * 16 + "-01")
    plain_header = encode(Submit([plain]))[2]
    assert plain_header[1] == 0x9A  # an array of the 10 declared fields, no more
    # a traced item: the 55 characters of its traceparent and their 2-byte str header
    assert len(encode(Submit([traced]))[2]) - len(plain_header) == 57
    assert [trace_of(t) for t in decode(encode(Submit([plain, traced]))).tasks] == \
        [None, traced[10]]
    item = Assignment("t1", b"\x80", 1, 5.0, ("echo",), None)
    assert [trace_of(t) for t in decode(encode(Dispatch([item]))).tasks] == [None]
