"""Tracing: spans, traceparent propagation, sampling, the broker's task spans, the jsonl
exporter shared by processes, and configuration errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from wire import tracing
from wire.tracing import (
    GEN_AI_AGENT_ID,
    ORCH_ATTEMPT,
    TracingConfig,
    TracingConfigError,
    child_span,
    context_from,
    current_traceparent,
    init_tracing,
    record_span,
    shutdown_tracing,
    start_root_span,
)
from broker.tracing import (
    DISPATCH_SPAN,
    QUEUE_WAIT_SPAN,
    TASK_SPAN,
    TaskSpans,
)
from wire.timeline import attempts_of

ROOT = Path(__file__).resolve().parents[2]
ON = {"ORCH_OTEL_SAMPLE_RATIO": "1"}


@pytest.fixture(autouse=True)
def fresh() -> Iterator[None]:
    shutdown_tracing()
    yield
    shutdown_tracing()


@pytest.fixture
def spans() -> InMemorySpanExporter:
    exporter = InMemorySpanExporter()
    assert init_tracing("test", exporter, env=ON) is not None
    return exporter


def by_name(exporter: InMemorySpanExporter) -> dict[str, list]:
    found: dict[str, list] = {}
    for span in exporter.get_finished_spans():
        found.setdefault(span.name, []).append(span)
    return found


def test_root_span_traceparent_round_trip(spans: InMemorySpanExporter) -> None:
    with start_root_span("invoke_workflow review") as root:
        traceparent = current_traceparent()
    assert traceparent is not None
    version, trace_id, span_id, flags = traceparent.split("-")
    assert (version, len(trace_id), len(span_id)) == ("00", 32, 16)
    assert int(flags, 16) & 1
    with child_span("invoke_agent coder", traceparent, {GEN_AI_AGENT_ID: "a1"}, "server"):
        inner = current_traceparent()
    assert inner is not None and inner != traceparent
    found = by_name(spans)
    child = found["invoke_agent coder"][0]
    assert child.context.trace_id == root.get_span_context().trace_id
    assert child.parent is not None and child.parent.span_id == root.get_span_context().span_id
    assert child.parent.is_remote
    assert found["invoke_workflow review"][0].parent is None
    # outside every span there is nothing to propagate
    assert current_traceparent() is None


def test_exception_marks_the_span(spans: InMemorySpanExporter) -> None:
    with pytest.raises(KeyError), start_root_span("root"):
        raise KeyError("x")
    (span,) = spans.get_finished_spans()
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes["error.type"] == "KeyError"


def test_client_inside_an_agent_span_continues_its_trace(spans: InMemorySpanExporter) -> None:
    with start_root_span("root"):
        traceparent = current_traceparent()
    with child_span("invoke_agent a", traceparent), start_root_span("submit"):
        pass
    found = by_name(spans)
    assert found["submit"][0].parent.span_id == found["invoke_agent a"][0].context.span_id


def test_unsampled_root_propagates_nothing() -> None:
    exporter = InMemorySpanExporter()
    init_tracing("test", exporter, env={"ORCH_OTEL_SAMPLE_RATIO": "0"})
    for _ in range(20):
        with start_root_span("root") as root:
            assert not root.is_recording()
            assert current_traceparent() is None
    assert exporter.get_finished_spans() == ()


def test_downstream_follows_the_parent_whatever_its_ratio() -> None:
    """A process with ratio 0 still records children of a sampled traceparent."""
    exporter = InMemorySpanExporter()
    init_tracing("agent", exporter, env={"ORCH_OTEL_SAMPLE_RATIO": "0"})
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    with child_span("invoke_agent x", parent) as span:
        assert span.is_recording()
    unsampled = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"
    with child_span("invoke_agent y", unsampled) as span:
        assert not span.is_recording()
    assert [s.name for s in exporter.get_finished_spans()] == ["invoke_agent x"]


def test_record_span_honours_times(spans: InMemorySpanExporter) -> None:
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    made = record_span("queue_wait", parent, 1700000000.25, 1700000001.75, {"k": "v"})
    failed = record_span("dispatch", made, 1700000001.0, 1700000002.0, error="timeout")
    assert made is not None and failed is not None
    first, second = spans.get_finished_spans()
    assert first.start_time == 1700000000_250000000
    assert first.end_time == 1700000001_750000000
    assert first.attributes["k"] == "v"
    assert first.parent.span_id == 0xb7ad6b7169203331
    assert first.context.trace_id == 0x0af7651916cd43dd8448eb211c80319c
    assert second.parent.span_id == first.context.span_id
    assert second.status.status_code is StatusCode.ERROR
    assert second.attributes["error.type"] == "timeout"


@pytest.mark.parametrize("bad", [
    None, "", "garbage", "00-xyz-abc-01", "00-" + "0" * 32 + "-b7ad6b7169203331-01",
    "00-0af7651916cd43dd8448eb211c80319c-" + "0" * 16 + "-01",
    "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", 42, b"00-aa-bb-01",
])
def test_malformed_traceparent_is_none(spans: InMemorySpanExporter, bad: object) -> None:
    assert context_from(bad) is None  # type: ignore[arg-type]
    with child_span("x", bad) as span:  # type: ignore[arg-type]
        assert not span.is_recording()
    assert record_span("x", bad, 1.0, 2.0) is None  # type: ignore[arg-type]
    assert spans.get_finished_spans() == ()


def test_tracing_off_everything_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("ORCH_OTEL_EXPORTER", "ORCH_OTEL_SAMPLE_RATIO", "OTEL_TRACES_SAMPLER"):
        monkeypatch.delenv(name, raising=False)
    assert not tracing.tracing_enabled()
    assert init_tracing("test") is None
    assert not tracing.tracing_enabled()
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    with start_root_span("root") as root, child_span("c", parent) as child, \
            tracing.chat_span("m") as chat:
        for span in (root, child, chat):
            assert not span.is_recording()
            span.set_attribute("a", 1)
        assert current_traceparent() is None
    assert record_span("x", parent, 1.0, 2.0) is None
    monkeypatch.setenv("ORCH_OTEL_EXPORTER", "none")
    assert init_tracing("test") is None


def test_chat_span_only_under_a_recording_span(spans: InMemorySpanExporter) -> None:
    with tracing.chat_span("m0") as orphan:
        assert not orphan.is_recording()
    with start_root_span("invoke_agent a"), \
            tracing.chat_span("llama", max_tokens=10,
                              server_url="http://127.0.0.1:8000/v1") as span:
        span.set_attribute(tracing.GEN_AI_USAGE_INPUT_TOKENS, 12)
    chat = by_name(spans)["chat llama"][0]
    assert chat.kind.name == "CLIENT"
    assert chat.attributes[tracing.GEN_AI_OPERATION_NAME] == "chat"
    assert chat.attributes[tracing.GEN_AI_REQUEST_MODEL] == "llama"
    assert chat.attributes[tracing.GEN_AI_REQUEST_MAX_TOKENS] == 10
    assert chat.attributes[tracing.SERVER_ADDRESS] == "127.0.0.1"
    assert chat.attributes[tracing.SERVER_PORT] == 8000
    assert chat.parent.span_id == by_name(spans)["invoke_agent a"][0].context.span_id


class FakeHandle:
    def __init__(self, result: object = None, error: Exception | None = None) -> None:
        self.result, self.error = result, error

    def result_nowait(self) -> object:
        if self.error is not None:
            raise self.error
        return self.result


def test_submit_span_and_its_outcome(spans: InMemorySpanExporter) -> None:
    from agent_sdk.task import Result

    ok = tracing.submit_span("t-1", ("code", "python"), None)
    failed = tracing.submit_span("t-2", ("code",), "coder")
    lost = tracing.submit_span("t-3", (), None)
    assert ok is not None and failed is not None and lost is not None
    assert tracing.parse_traceparent(ok.traceparent) == (ok.trace_id, ok.span_id, True)
    done = Result("x")
    done.attempts, done.agent = 2, "coder-1"
    tracing.end_submit_span(ok, FakeHandle(done))
    tracing.end_submit_span(failed, FakeHandle(Result.failure("agent_error", "boom")))
    tracing.end_submit_span(lost, FakeHandle(error=RuntimeError("gone")))
    found = by_name(spans)
    first = found["invoke_agent code python"][0]
    assert first.kind.name == "CLIENT" and first.parent is None
    assert first.attributes[tracing.ORCH_TASK_ID] == "t-1"
    assert first.attributes[GEN_AI_AGENT_ID] == "coder-1"
    assert first.attributes[ORCH_ATTEMPT] == 2
    assert first.status.status_code is StatusCode.UNSET
    second = found["invoke_agent coder"][0]
    assert second.attributes[tracing.GEN_AI_AGENT_NAME] == "coder"
    assert second.attributes["error.type"] == "agent_error"
    assert found["invoke_agent"][0].attributes["error.type"] == "RuntimeError"


def test_submit_span_inside_a_span_is_its_child(spans: InMemorySpanExporter) -> None:
    with tracing.start_root_span("invoke_workflow w") as root:
        child = tracing.submit_span("t-1", ("code",))
    assert child is not None and child.trace_id == root.get_span_context().trace_id
    assert child.parent_id == root.get_span_context().span_id
    tracing.end_submit_span(child, FakeHandle(error=RuntimeError("gone")))
    assert by_name(spans)["invoke_agent code"][0].parent.span_id == child.parent_id


def test_no_submit_span_inside_an_unsampled_trace() -> None:
    tracing.shutdown_tracing()
    init_tracing("test", InMemorySpanExporter(), env={"ORCH_OTEL_SAMPLE_RATIO": "0"})
    try:
        with tracing.start_root_span("invoke_workflow w"):
            assert tracing.current_traceparent() is None
            assert tracing.submit_span("t-1", ("code",)) is None
    finally:
        tracing.shutdown_tracing()


@pytest.mark.parametrize("bad", ["", "00-abc", "00-" + "0" * 32 + "-" + "1" * 16 + "-01",
                                 "ff-" + "1" * 32 + "-" + "1" * 16 + "-01",
                                 "00-" + "g" * 32 + "-" + "1" * 16 + "-01"])
def test_parse_traceparent_refuses_malformed_values(bad: str) -> None:
    assert tracing.parse_traceparent(bad) is None


def test_submit_span_unsampled_or_off() -> None:
    assert tracing.submit_span("t", ("c",)) is None  # off
    init_tracing("test", InMemorySpanExporter(), env={"ORCH_OTEL_SAMPLE_RATIO": "0"})
    assert tracing.submit_span("t", ("c",)) is None  # not sampled


def test_init_is_idempotent(spans: InMemorySpanExporter) -> None:
    first = tracing.tracer()
    assert init_tracing("other", InMemorySpanExporter()) is first


# ---------------------------------------------------------------- configuration

@pytest.mark.parametrize("env, fragment", [
    ({"ORCH_OTEL_EXPORTER": "zipkin"}, "'none', 'otlp', 'console', 'jsonl'"),
    ({"ORCH_OTEL_EXPORTER": "jsonl", "ORCH_OTEL_SAMPLE_RATIO": "nan"}, "from 0 to 1"),
    ({"ORCH_OTEL_EXPORTER": "jsonl", "ORCH_OTEL_SAMPLE_RATIO": "-0.1"}, "from 0 to 1"),
    ({"ORCH_OTEL_EXPORTER": "otlp", "ORCH_OTEL_SAMPLE_RATIO": "1.5"}, "ORCH_OTEL_SAMPLE_RATIO"),
    ({"ORCH_OTEL_EXPORTER": "otlp", "ORCH_OTEL_SAMPLE_RATIO": "lots"}, "'lots'"),
    ({"ORCH_OTEL_EXPORTER": "console", "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
      "OTEL_TRACES_SAMPLER_ARG": "2"}, "OTEL_TRACES_SAMPLER_ARG"),
    ({"ORCH_OTEL_EXPORTER": "console", "OTEL_TRACES_SAMPLER": "jaeger_remote"},
     "parentbased_traceidratio"),
])
def test_bad_configuration_is_a_clear_error(env: dict[str, str], fragment: str) -> None:
    with pytest.raises(TracingConfigError) as caught:
        TracingConfig.from_env(env)
    assert fragment in str(caught.value)
    assert isinstance(caught.value, ValueError)
    with pytest.raises(TracingConfigError):
        init_tracing("test", env=env)


def test_configuration_values(tmp_path: Path) -> None:
    assert not TracingConfig.from_env({}).enabled
    assert not TracingConfig.from_env({"ORCH_OTEL_EXPORTER": " None "}).enabled
    config = TracingConfig.from_env({"ORCH_OTEL_EXPORTER": "jsonl", "ORCH_HOME": "/x"})
    assert config.sample_ratio == tracing.DEFAULT_SAMPLE_RATIO
    assert config.file is not None
    config = TracingConfig.from_env({"ORCH_OTEL_EXPORTER": "JSONL",
                                     "ORCH_OTEL_FILE": str(tmp_path / "s.jsonl"),
                                     "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                                     "OTEL_TRACES_SAMPLER_ARG": "0.25"})
    assert (config.exporter, config.sample_ratio) == ("jsonl", 0.25)
    assert config.file == tmp_path / "s.jsonl"
    ours_first = TracingConfig.from_env({"ORCH_OTEL_EXPORTER": "otlp",
                                         "ORCH_OTEL_SAMPLE_RATIO": "0.5",
                                         "OTEL_TRACES_SAMPLER": "always_on"})
    assert ours_first.sample_ratio == 0.5


def test_default_file_is_under_orch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORCH_HOME", str(tmp_path))
    config = TracingConfig.from_env({"ORCH_OTEL_EXPORTER": "jsonl"})
    assert config.file == tmp_path / "traces" / "spans.jsonl"


# ---------------------------------------------------------------- the broker's task spans

def ns(wall_s: float) -> int:
    return round(wall_s * 1e6) * 1000


TP = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def test_task_spans_two_attempts_on_two_agents(spans: InMemorySpanExporter) -> None:
    t0 = 1700000000.0
    timeline = [
        (t0, "submitted", ""),
        (t0 + 0.5, "dispatched", "attempt 1 to agent-a"),
        (t0 + 2.0, "retrying", "attempt 1 failed (agent_error: boom); retry in 0.05 s"),
        (t0 + 2.1, "dispatched", "attempt 2 to agent-b"),
        (t0 + 2.2, "running", ""),
        (t0 + 3.0, "succeeded", ""),
    ]
    TaskSpans().task_ended(TP, "t-1", ["code"], timeline, "succeeded", None, 2)
    found = by_name(spans)
    (task,) = found[TASK_SPAN]
    (wait,) = found[QUEUE_WAIT_SPAN]
    first, second = sorted(found[DISPATCH_SPAN], key=lambda s: s.start_time)
    assert task.parent.span_id == 0xb7ad6b7169203331
    assert task.context.trace_id == 0x0af7651916cd43dd8448eb211c80319c
    assert (task.start_time, task.end_time) == (ns(t0), ns(t0 + 3.0))
    assert task.attributes["orchestrator.task.id"] == "t-1"
    assert tuple(task.attributes["orchestrator.capabilities"]) == ("code",)
    assert task.attributes["messaging.system"] == "zeromq"
    assert task.status.status_code is StatusCode.UNSET
    for child in (wait, first, second):
        assert child.parent.span_id == task.context.span_id
    assert (wait.start_time, wait.end_time) == (ns(t0), ns(t0 + 0.5))
    assert first.attributes[GEN_AI_AGENT_ID] == "agent-a"
    assert first.attributes[ORCH_ATTEMPT] == 1
    assert first.attributes["orchestrator.dispatch.outcome"] == "retrying"
    assert "boom" in first.attributes["orchestrator.dispatch.reason"]
    assert first.status.status_code is StatusCode.ERROR
    assert (first.start_time, first.end_time) == (ns(t0 + .5), ns(t0 + 2))
    assert second.attributes[GEN_AI_AGENT_ID] == "agent-b"
    assert second.attributes[ORCH_ATTEMPT] == 2
    assert second.attributes["orchestrator.dispatch.outcome"] == "succeeded"
    assert second.status.status_code is StatusCode.UNSET
    assert [e.name for e in second.events] == ["running"]
    assert second.end_time == ns(t0 + 3.0)


def test_task_spans_as_the_broker_writes_history_today(spans: InMemorySpanExporter) -> None:
    """Older details: ``attempt N`` with no agent, or a bare agent id; a second opinion
    names the agent; a task that timed out in its back-off has no open attempt."""
    t0 = 1700000000.0
    timeline = [
        {"at": t0, "event": "submitted", "detail": ""},
        {"at": t0 + 1, "event": "dispatched", "detail": "attempt 1"},
        {"at": t0 + 2, "event": "second_opinion",
         "detail": "failed on agent-a (agent_error: x); trying another agent once"},
        {"at": t0 + 3, "event": "dispatched", "detail": "attempt 2"},
        {"at": t0 + 4, "event": "retrying", "detail": "attempt 2 failed (timeout: slow)"},
        {"at": t0 + 3, "event": "dispatched", "detail": ""},
        {"at": t0 + 9, "event": "timed_out", "detail": ""},
    ]
    TaskSpans().task_ended(TP, "t-2", [], timeline, "timed_out", "timeout", 2)
    found = by_name(spans)
    first, second = sorted(found[DISPATCH_SPAN], key=lambda s: s.start_time)
    assert first.attributes[GEN_AI_AGENT_ID] == "agent-a"
    assert first.attributes["orchestrator.dispatch.outcome"] == "second_opinion"
    assert GEN_AI_AGENT_ID not in second.attributes
    assert second.attributes[ORCH_ATTEMPT] == 2
    assert second.end_time == ns(t0 + 4)
    (task,) = found[TASK_SPAN]
    assert task.status.status_code is StatusCode.ERROR
    assert task.attributes["error.type"] == "timeout"
    assert task.end_time == ns(t0 + 9)


def test_attempts_of_bare_agent_ids_and_reclaims() -> None:
    attempts = attempts_of([(1.0, "submitted", ""), (2.0, "dispatched", "attempt 1"),
                            (3.0, "requeued", "agent a-1 went silent"),
                            (3.5, "reclaimed", "a-1"), (3.5, "dispatched", "a-1"),
                            (4.0, "succeeded", "")])
    assert [(a.number, a.agent, a.outcome, a.reclaimed) for a in attempts] == [
        (1, None, "requeued", False), (2, "a-1", "succeeded", True)]
    assert (attempts[1].start, attempts[1].end) == (3.5, 4.0)


def test_task_spans_never_dispatched_and_bad_input(spans: InMemorySpanExporter) -> None:
    task_spans = TaskSpans()
    task_spans.task_ended(TP, "t-3", [], [(5.0, "submitted", ""), (6.0, "cancelled", "")],
                          "cancelled", "cancelled", 0)
    found = by_name(spans)
    assert found[QUEUE_WAIT_SPAN][0].end_time == 6_000_000_000
    assert DISPATCH_SPAN not in found
    spans.clear()
    task_spans.task_ended("nonsense", "t-4", [], [(5.0, "submitted", "")], "failed", None, 0)
    task_spans.task_ended(TP, "t-5", [], [], "failed", None, 0)
    task_spans.task_ended(TP, "t-6", [], [("x", "submitted")], "failed", None, 0)  # type: ignore[list-item]
    assert spans.get_finished_spans() == ()


# ---------------------------------------------------------------- jsonl, two processes

WRITER = """
import sys
from wire import tracing
tracing.init_tracing(sys.argv[1])
n = int(sys.argv[3])
if sys.argv[2] == "-":
    with tracing.start_root_span("root"):
        print(tracing.current_traceparent(), flush=True)
        for i in range(n):
            with tracing.start_root_span("a-child", {"i": i}):
                pass
else:
    for i in range(n):
        with tracing.child_span("b-child", sys.argv[2], {"i": i}, "server"):
            with tracing.start_root_span("b-grandchild"):
                pass
tracing.shutdown_tracing()
"""


def test_jsonl_from_two_processes(tmp_path: Path) -> None:
    path = tmp_path / "traces" / "spans.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ORCH_PURE_PYTHON": "1",
           "ORCH_OTEL_EXPORTER": "jsonl", "ORCH_OTEL_FILE": str(path),
           "ORCH_OTEL_SAMPLE_RATIO": "1"}
    n = 400
    first = subprocess.Popen([sys.executable, "-c", WRITER, "svc-a", "-", str(n)], cwd=ROOT,
                             env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout is not None
        traceparent = first.stdout.readline().strip()
        second = subprocess.run([sys.executable, "-c", WRITER, "svc-b", traceparent, str(n)],
                                cwd=ROOT, env=env, timeout=60, check=True)
        assert second.returncode == 0
        assert first.wait(timeout=60) == 0
    finally:
        if first.poll() is None:
            first.kill()
        first.wait()
        if first.stdout is not None:
            first.stdout.close()
    lines = path.read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line parses
    assert len(records) == 1 + n + 2 * n
    by_id = {r["span_id"]: r for r in records}
    assert len(by_id) == len(records)
    (root,) = [r for r in records if r["name"] == "root"]
    assert root["parent_span_id"] is None and root["service"] == "svc-a"
    assert traceparent.split("-")[2] == root["span_id"]
    for record in records:
        assert record["trace_id"] == root["trace_id"]
        assert record["start_ns"] <= record["end_ns"]
        assert set(record) >= {"name", "trace_id", "span_id", "parent_span_id", "start_ns",
                               "end_ns", "attributes", "service", "status"}
        if record is not root:
            assert record["parent_span_id"] in by_id  # every span links to one in the file
    for record in records:
        if record["name"] == "b-child":
            assert record["parent_span_id"] == root["span_id"]
            assert record["service"] == "svc-b" and record["kind"] == "server"
        elif record["name"] == "b-grandchild":
            assert by_id[record["parent_span_id"]]["name"] == "b-child"
        elif record["name"] == "a-child":
            assert record["parent_span_id"] == root["span_id"]


# ---------------------------------------------------------------- the LLM's chat span

def test_llm_call_gets_a_chat_span_with_usage(spans: InMemorySpanExporter) -> None:
    from agent_sdk.llm import LLM, LLMConfig
    from agent_sdk.loop import run
    from tests.fakes.llm_server import ErrorReply, FakeLLMServer, TextReply

    with FakeLLMServer() as server:
        server.push(TextReply("hi", prompt_tokens=12, completion_tokens=3),
                    TextReply("untraced", prompt_tokens=1, completion_tokens=1),
                    ErrorReply(400, "bad request"))
        cfg = LLMConfig(base_url=server.url, model="test-model", api_key="sk-test",
                        timeout_s=5.0, max_attempts=1, backoff_s=0.01)

        async def main() -> None:
            async with LLM(cfg) as llm:
                with child_span("invoke_agent coder", TP, kind="server"):
                    await llm.chat([{"role": "user", "content": "hello"}], max_tokens=50)
                await llm.chat([{"role": "user", "content": "no span current"}])
                with child_span("invoke_agent coder", TP, kind="server"), \
                        pytest.raises(Exception):  # noqa: B017 - any rejection
                    await llm.chat([{"role": "user", "content": "rejected"}])

        run(main())
    chats = by_name(spans)["chat test-model"]
    assert len(chats) == 2  # the call outside any span made none
    ok, rejected = sorted(chats, key=lambda s: s.start_time)
    assert ok.kind.name == "CLIENT"
    assert ok.attributes[tracing.GEN_AI_OPERATION_NAME] == "chat"
    assert ok.attributes[tracing.GEN_AI_REQUEST_MODEL] == "test-model"
    assert ok.attributes[tracing.GEN_AI_REQUEST_MAX_TOKENS] == 50
    assert ok.attributes[tracing.GEN_AI_USAGE_INPUT_TOKENS] == 12
    assert ok.attributes[tracing.GEN_AI_USAGE_OUTPUT_TOKENS] == 3
    assert ok.attributes[tracing.SERVER_ADDRESS] == "127.0.0.1"
    agent_spans = by_name(spans)["invoke_agent coder"]
    assert ok.parent.span_id in {s.context.span_id for s in agent_spans}
    assert rejected.status.status_code is StatusCode.ERROR
    assert rejected.attributes["error.type"]


def test_log_lines_inside_a_sampled_span_carry_its_trace_id(spans: InMemorySpanExporter) -> None:
    import logging

    from wire.logs import JsonLinesFormatter

    def line() -> dict[str, object]:
        record = logging.LogRecord("agent", logging.INFO, __file__, 1, "working", None, None)
        return json.loads(JsonLinesFormatter().format(record))

    assert "trace_id" not in line()
    with tracing.start_root_span("invoke_workflow w") as root:
        assert line()["trace_id"] == f"{root.get_span_context().trace_id:032x}"
    assert "trace_id" not in line()
