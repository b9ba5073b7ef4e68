"""OpenTelemetry spans for clients, workflows and agents, with near-zero cost when off.

::

    init_tracing("orchestrator-client")          # None (and every helper a no-op) when off
    with start_root_span("invoke_workflow review", {GEN_AI_OPERATION_NAME: "invoke_workflow"}):
        header_traceparent = current_traceparent()   # str only for a sampled, recording span
    ...
    # in the agent, for a task whose message carried a traceparent:
    with child_span(f"invoke_agent {name}", traceparent, attrs, kind="server") as span:
        ...                                       # LLM calls inside get a ``chat`` child span
    shutdown_tracing()                            # flushes the exporter (also at exit)

Configuration, read once from the environment:

- ``ORCH_OTEL_EXPORTER``: unset, ``""`` or ``none`` (off), ``otlp`` (OTLP/HTTP, set up by
  the standard ``OTEL_EXPORTER_OTLP_*`` variables), ``console`` (one JSON line per span on
  stderr) or ``jsonl`` (one compact JSON object per span appended to ``ORCH_OTEL_FILE``,
  default ``$ORCH_HOME/traces/spans.jsonl``; several processes may share the file).
- ``ORCH_OTEL_SAMPLE_RATIO``: the fraction of root spans (traces) kept, 0..1; else the
  standard ``OTEL_TRACES_SAMPLER`` / ``OTEL_TRACES_SAMPLER_ARG``; default
  :data:`DEFAULT_SAMPLE_RATIO`.

Sampling is parent-based: only a root span (a client call, a workflow run) decides, on
its trace id; every downstream span follows its parent. Downstream processes (the
broker, agents) never start roots: they make spans only for a message that carries a
``traceparent``, and :func:`current_traceparent` gives one only for a sampled span, so a
trace that was not sampled costs nothing past its root.

The helpers use this module's own provider, never OpenTelemetry's global one (which can
be set once per process): :func:`shutdown_tracing` resets everything, so tests can
:func:`init_tracing` again with another exporter. Attribute names follow the
OpenTelemetry GenAI semantic conventions where they apply (``gen_ai.*``), plus ours
(``orchestrator.*``).

This module imports nothing of ours but :mod:`wire.home` (lazily), and OpenTelemetry only
when tracing is on, so the broker shares it (the broker never imports ``agent_sdk``).
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import random
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, cast

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
    from opentelemetry.trace import Span, SpanKind, Tracer

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------- configuration

ENV_EXPORTER: Final = "ORCH_OTEL_EXPORTER"
ENV_FILE: Final = "ORCH_OTEL_FILE"
ENV_SAMPLE_RATIO: Final = "ORCH_OTEL_SAMPLE_RATIO"
#: The standard OpenTelemetry sampler variables, read when ENV_SAMPLE_RATIO is unset.
ENV_OTEL_SAMPLER: Final = "OTEL_TRACES_SAMPLER"
ENV_OTEL_SAMPLER_ARG: Final = "OTEL_TRACES_SAMPLER_ARG"

EXPORTER_NONE: Final = "none"
EXPORTER_OTLP: Final = "otlp"
EXPORTER_CONSOLE: Final = "console"
EXPORTER_JSONL: Final = "jsonl"
EXPORTERS: Final = (EXPORTER_NONE, EXPORTER_OTLP, EXPORTER_CONSOLE, EXPORTER_JSONL)

#: Fraction of traces kept when nothing says otherwise. The overhead target: with
#: tracing on at the default, throughput stays >= 0.9 of untraced. A traced task costs
#: about 160 us of CPU in all (its client, broker and agent spans, built and exported by
#: the OpenTelemetry SDK) against ~35 us for a whole untraced task on this 2-core
#: machine (bench/observability.py): at 0.01 the throughput kept 0.78-0.92 of untraced
#: (median 0.885), at 0.001 it stays within the noise. A new trace that is not sampled
#: costs a random draw (no span is built, no traceparent sent).
#: ORCH_OTEL_SAMPLE_RATIO=1 traces every task (a few tasks, debugging, tests).
DEFAULT_SAMPLE_RATIO: Final = 0.001
#: OTEL_TRACES_SAMPLER values we honour, and the ratio each stands for (None: the arg).
_OTEL_SAMPLERS: Final[dict[str, float | None]] = {
    "always_on": 1.0, "parentbased_always_on": 1.0,
    "always_off": 0.0, "parentbased_always_off": 0.0,
    "traceidratio": None, "parentbased_traceidratio": None,
}
#: The spans file, under the data dir, when ORCH_OTEL_FILE is unset.
DEFAULT_FILE: Final = Path("traces") / "spans.jsonl"
#: The instrumentation scope name of our spans.
SCOPE: Final = "orchestrator"

# ---------------------------------------------------------------- attribute names

#: GenAI semantic conventions.
GEN_AI_OPERATION_NAME: Final = "gen_ai.operation.name"
GEN_AI_AGENT_NAME: Final = "gen_ai.agent.name"
GEN_AI_AGENT_ID: Final = "gen_ai.agent.id"
GEN_AI_PROVIDER_NAME: Final = "gen_ai.provider.name"
GEN_AI_REQUEST_MODEL: Final = "gen_ai.request.model"
GEN_AI_REQUEST_MAX_TOKENS: Final = "gen_ai.request.max_tokens"
GEN_AI_REQUEST_TEMPERATURE: Final = "gen_ai.request.temperature"
GEN_AI_RESPONSE_MODEL: Final = "gen_ai.response.model"
GEN_AI_RESPONSE_ID: Final = "gen_ai.response.id"
GEN_AI_RESPONSE_FINISH_REASONS: Final = "gen_ai.response.finish_reasons"
GEN_AI_USAGE_INPUT_TOKENS: Final = "gen_ai.usage.input_tokens"
GEN_AI_USAGE_OUTPUT_TOKENS: Final = "gen_ai.usage.output_tokens"
#: gen_ai.operation.name values.
OP_INVOKE_AGENT: Final = "invoke_agent"
OP_INVOKE_WORKFLOW: Final = "invoke_workflow"
OP_CHAT: Final = "chat"
#: General conventions.
ERROR_TYPE: Final = "error.type"
SERVER_ADDRESS: Final = "server.address"
SERVER_PORT: Final = "server.port"
MESSAGING_SYSTEM: Final = "messaging.system"
MESSAGING_SYSTEM_ZEROMQ: Final = "zeromq"
SERVICE_NAME: Final = "service.name"
#: Ours.
ORCH_TASK_ID: Final = "orchestrator.task.id"
ORCH_ATTEMPT: Final = "orchestrator.attempt"
ORCH_CAPABILITIES: Final = "orchestrator.capabilities"
ORCH_TASK_STATUS: Final = "orchestrator.task.status"
ORCH_WORKFLOW_NAME: Final = "orchestrator.workflow.name"
ORCH_RUN_ID: Final = "orchestrator.run.id"

#: The W3C header name.
TRACEPARENT: Final = "traceparent"


class TracingConfigError(ValueError):
    """A tracing variable of the environment has a value we do not accept."""


@dataclass(frozen=True, slots=True)
class TracingConfig:
    """What the environment asks for; ``exporter`` is one of :data:`EXPORTERS`."""

    exporter: str
    sample_ratio: float
    file: Path | None

    @property
    def enabled(self) -> bool:
        return self.exporter != EXPORTER_NONE

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> TracingConfig:
        """Read the configuration; the ratio and file are checked only when tracing is on.

        Raises:
            TracingConfigError: an unknown exporter, or a ratio that is not a number
                in 0..1, naming the variable and what it accepts.
        """
        if env is None:
            env = os.environ
        exporter = env.get(ENV_EXPORTER, "").strip().lower() or EXPORTER_NONE
        if exporter not in EXPORTERS:
            raise TracingConfigError(
                f"{ENV_EXPORTER}={env.get(ENV_EXPORTER)!r} is not an exporter we know; use "
                f"one of {', '.join(repr(e) for e in EXPORTERS)} (or leave it unset: off)")
        if exporter == EXPORTER_NONE:
            return cls(exporter, 0.0, None)
        file: Path | None = None
        if exporter == EXPORTER_JSONL:
            named = env.get(ENV_FILE, "").strip()
            if named:
                file = Path(named).absolute()
            else:
                from wire.home import home_dir
                file = home_dir() / DEFAULT_FILE
        return cls(exporter, _sample_ratio(env), file)


def _sample_ratio(env: Mapping[str, str]) -> float:
    raw = env.get(ENV_SAMPLE_RATIO, "").strip()
    name = ENV_SAMPLE_RATIO
    if not raw:
        sampler = env.get(ENV_OTEL_SAMPLER, "").strip().lower()
        if not sampler:
            return DEFAULT_SAMPLE_RATIO
        if sampler not in _OTEL_SAMPLERS:
            raise TracingConfigError(
                f"{ENV_OTEL_SAMPLER}={sampler!r} is not supported here; use one of "
                f"{', '.join(sorted(_OTEL_SAMPLERS))}, or set {ENV_SAMPLE_RATIO}")
        fixed = _OTEL_SAMPLERS[sampler]
        if fixed is not None:
            return fixed
        raw = env.get(ENV_OTEL_SAMPLER_ARG, "").strip()
        name = ENV_OTEL_SAMPLER_ARG
        if not raw:
            return 1.0  # the OpenTelemetry default of a ratio sampler without its arg
    try:
        ratio = float(raw)
    except ValueError:
        ratio = math.nan
    if not 0.0 <= ratio <= 1.0:  # False for nan as well
        raise TracingConfigError(f"{name}={raw!r} must be a number from 0 to 1 (the fraction "
                                 "of traces kept, e.g. 0.1)")
    return ratio


# ---------------------------------------------------------------- no-op span

class _NoopSpan:
    """Stands for a span when tracing is off: every method does nothing."""

    __slots__ = ()

    def is_recording(self) -> bool:
        return False

    def set_attribute(self, key: str, value: Any) -> None:
        pass

    def set_attributes(self, attributes: Mapping[str, Any]) -> None:
        pass

    def add_event(self, name: str, attributes: Mapping[str, Any] | None = None,
                  timestamp: int | None = None) -> None:
        pass

    def record_exception(self, exception: BaseException, *args: Any, **kwargs: Any) -> None:
        pass

    def set_status(self, *args: Any, **kwargs: Any) -> None:
        pass

    def update_name(self, name: str) -> None:
        pass

    def end(self, end_time: int | None = None) -> None:
        pass


class _NoopScope:
    """A reusable, reentrant ``with`` that yields :data:`NOOP_SPAN`."""

    __slots__ = ()

    def __enter__(self) -> _NoopSpan:
        return NOOP_SPAN

    def __exit__(self, *exc: object) -> None:
        return None


NOOP_SPAN: Final = _NoopSpan()
_NOOP_SCOPE: Final = _NoopScope()

# ---------------------------------------------------------------- process state

#: The live tracer and its provider (None: off, or not initialised in this process).
_tracer: Tracer | None = None
_provider: TracerProvider | None = None
#: tracing_enabled()'s cached answer (None: not computed yet).
_enabled: bool | None = None
_lock = threading.Lock()
#: the span processor spans end in, and the resource they carry (set by init_tracing):
#: spans known after the fact go straight to it (:func:`emit_span`)
_processor: Any = None
_resource: Any = None
#: spans made current by this module's scopes and not yet left: while none is, no span
#: can be current, and a submit skips looking for one (the common, untraced case)
_open_scopes = 0
#: the fraction of new traces kept (set by init_tracing)
_root_ratio = 0.0
_random = random.random
_random_bits = random.getrandbits
_atexit_registered = False


def tracing_enabled() -> bool:
    """True when this process traces: :func:`init_tracing` made a tracer, or (before it
    is called) the environment turns tracing on. Cached: a global read after the first."""
    global _enabled
    enabled = _enabled
    if enabled is None:
        enabled = _enabled = _tracer is not None or TracingConfig.from_env().enabled
    return enabled


def init_tracing(service_name: str, exporter: SpanExporter | None = None, *,
                 env: Mapping[str, str] | None = None) -> Tracer | None:
    """Set up this process's tracer, once; later calls return the same one.

    Args:
        service_name: ``service.name`` of every span of this process.
        exporter: export to this (tests: an ``InMemorySpanExporter``, synchronously
            through a ``SimpleSpanProcessor``) instead of what the environment names;
            tracing is then on whatever ``ORCH_OTEL_EXPORTER`` says.
        env: read instead of ``os.environ`` (tests).

    Returns:
        The tracer, or None when tracing is off (every helper is then a no-op).

    Raises:
        TracingConfigError: the environment's tracing settings are invalid.
    """
    global _tracer, _provider, _enabled, _atexit_registered
    with _lock:
        if _tracer is not None:
            return _tracer
        config = TracingConfig.from_env(env)
        if exporter is None and not config.enabled:
            _enabled = False
            return None
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            SimpleSpanProcessor,
        )
        from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased

        global _root_ratio
        _root_ratio = config.sample_ratio if config.enabled else _sample_ratio(
            os.environ if env is None else env)
        # Roots are decided before a span is made (_root_sampled): building an unsampled
        # root span costs ~10 us, far more than the decision, and a client makes one per
        # submit. What reaches the SDK as a root was chosen already; children follow
        # their parent.
        provider = TracerProvider(
            resource=Resource.create({SERVICE_NAME: service_name}),
            sampler=ParentBased(ALWAYS_ON))
        global _processor, _resource
        _processor = SimpleSpanProcessor(exporter) if exporter is not None \
            else BatchSpanProcessor(_exporter_of(config))
        provider.add_span_processor(_processor)
        _resource = provider.resource
        _load_api()
        _provider = provider
        _tracer = provider.get_tracer(SCOPE)
        _enabled = True
        if not _atexit_registered:
            atexit.register(shutdown_tracing)
            _atexit_registered = True
        return _tracer


def _exporter_of(config: TracingConfig) -> SpanExporter:
    if config.exporter == EXPORTER_OTLP:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter,
        )
        return OTLPSpanExporter()
    if config.exporter == EXPORTER_CONSOLE:
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter
        return ConsoleSpanExporter(out=sys.stderr,
                                   formatter=lambda span: span.to_json(indent=None) + "\n")
    assert config.file is not None
    return cast("SpanExporter", JsonlSpanExporter(config.file))


def shutdown_tracing() -> None:
    """Flush and close the exporter, and forget the tracer (helpers turn no-ops; a later
    :func:`init_tracing` starts afresh). Agents call it on stop; it also runs at exit.
    Safe to call any number of times."""
    global _tracer, _provider, _enabled, _processor
    with _lock:
        provider = _provider
        _tracer = _provider = _processor = None
        _enabled = None
    if provider is not None:
        provider.shutdown()


def tracer() -> Tracer | None:
    """This process's tracer, None when tracing is off."""
    return _tracer


# ---------------------------------------------------------------- propagation

#: OpenTelemetry API functions, bound on first use (importing them costs when off).
_attach: Any = None
_detach: Any = None
_get_current_span: Any = None
_set_span_in_context: Any = None
_propagator: Any = None


def _load_api() -> None:
    global _attach, _detach, _get_current_span, _set_span_in_context, _propagator
    from opentelemetry.context import attach, detach
    from opentelemetry.trace import get_current_span, set_span_in_context
    from opentelemetry.trace.propagation.tracecontext import (
        TraceContextTextMapPropagator,
    )
    _attach, _detach = attach, detach
    _get_current_span, _set_span_in_context = get_current_span, set_span_in_context
    _propagator = TraceContextTextMapPropagator()


def traceparent_of(span: Any) -> str | None:
    """The W3C ``traceparent`` of ``span`` if it is recording and sampled, else None."""
    if not span.is_recording():
        return None
    ctx = span.get_span_context()
    flags = ctx.trace_flags
    if not flags & 1:
        return None
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{flags:02x}"


def current_traceparent() -> str | None:
    """The active span's ``traceparent`` to put in a message header, or None (tracing
    off, no span, or a span that is not sampled: nothing downstream traces then)."""
    if _tracer is None:
        return None
    return traceparent_of(_get_current_span())


def current_trace_id() -> str | None:
    """The trace id (32 hex digits) of the current sampled span, for log lines; None
    when tracing is off or no sampled span is current (a global read when off)."""
    if _tracer is None or not _open_scopes:
        return None
    context = _get_current_span().get_span_context()
    if not context.is_valid or not context.trace_flags & 1:
        return None
    return f"{context.trace_id:032x}"


def context_from(traceparent: str | None) -> Context | None:
    """The context whose (remote) parent is ``traceparent``; None for None, or for a
    malformed value. Never raises."""
    if not traceparent or not isinstance(traceparent, str):
        return None
    try:
        if _propagator is None:
            _load_api()
        ctx = _propagator.extract({TRACEPARENT: traceparent})
        if not _get_current_span(ctx).get_span_context().is_valid:
            return None
        return cast("Context", ctx)
    except Exception:  # noqa: BLE001 - a header from the wire must never break the caller
        return None


# ---------------------------------------------------------------- spans

_KINDS: dict[str, SpanKind] = {}


def _kind(kind: str | SpanKind) -> SpanKind:
    if not isinstance(kind, str):
        return kind
    if not _KINDS:
        from opentelemetry.trace import SpanKind
        _KINDS.update({k.name.lower(): k for k in SpanKind})
    try:
        return _KINDS[kind.lower()]
    except KeyError:
        raise ValueError(f"span kind {kind!r}: use one of {', '.join(_KINDS)}") from None


class _Scope:
    """``with``: start ``span`` and make it current; on the way out record an exception
    (status ERROR, ``error.type``), restore the context and end the span."""

    __slots__ = ("_token", "span")

    def __init__(self, span: Span) -> None:
        self.span = span
        self._token: Any = None

    def __enter__(self) -> Span:
        global _open_scopes
        self._token = _attach(_set_span_in_context(self.span))
        _open_scopes += 1
        return self.span

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: object) -> None:
        span = self.span
        try:
            if exc is not None and span.is_recording():
                mark_error(span, exc_type.__qualname__ if exc_type else "error", str(exc))
                span.record_exception(exc)
        finally:
            global _open_scopes
            _open_scopes -= 1
            _detach(self._token)
            span.end()


def start_root_span(name: str, attributes: Mapping[str, Any] | None = None, *,
                    kind: str | SpanKind = "internal") -> Any:
    """``with start_root_span(...) as span``: a span for a client call or a workflow run,
    current inside the block. It is a root (where sampling is decided) unless a span is
    already current (a client inside an agent's task continues that trace). When tracing
    is off, or the root is not sampled, ``span`` is a no-op that records nothing."""
    tracer_ = _tracer
    if tracer_ is None:
        return _NOOP_SCOPE
    if not _get_current_span().get_span_context().is_valid and not _root_sampled():
        # Not sampled: an unsampled span is current in the block, so that what starts
        # inside (the steps of a workflow) follows this decision instead of making its own.
        return _Scope(_unsampled_span())
    return _Scope(tracer_.start_span(name, kind=_kind(kind), attributes=attributes))


def _root_sampled() -> bool:
    """Whether a new trace is kept: the sample ratio's draw."""
    return _random() < _root_ratio


def _unsampled_span() -> Span:
    """A span that records nothing, of a new trace that was not sampled."""
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
    return NonRecordingSpan(SpanContext(_random_bits(128) or 1, _random_bits(64) or 1,
                                        is_remote=False, trace_flags=TraceFlags(0)))


def _continuing(traceparent: str | None) -> tuple[Tracer | None, Context | None]:
    """The tracer and the context to continue ``traceparent`` in (None, None when tracing
    is off or there is no valid traceparent)."""
    tracer_ = _tracer
    if tracer_ is None or traceparent is None:
        return None, None
    ctx = context_from(traceparent)
    return (tracer_, ctx) if ctx is not None else (None, None)


def child_span(name: str, traceparent: str | None, attributes: Mapping[str, Any] | None = None,
               kind: str | SpanKind = "internal") -> Any:
    """``with child_span(...) as span``: a span that continues the trace of a message's
    ``traceparent`` (an agent running a task), current inside the block. A no-op when
    ``traceparent`` is None or malformed, or tracing is off. An exception leaving the
    block marks the span as an error."""
    tracer_, ctx = _continuing(traceparent)
    if tracer_ is None or ctx is None:
        return _NOOP_SCOPE
    return _Scope(tracer_.start_span(name, context=ctx, kind=_kind(kind),
                                     attributes=attributes))


def current_child_span(name: str, attributes: Mapping[str, Any] | None = None,
                       kind: str | SpanKind = "internal") -> Any:
    """``with current_child_span(...) as span``: a child of the current span, only when
    that one is recording (an LLM call inside an agent's task span); a no-op otherwise,
    so it never starts a trace of its own."""
    tracer_ = _tracer
    if tracer_ is None:
        return _NOOP_SCOPE
    if not _get_current_span().is_recording():
        return _NOOP_SCOPE
    return _Scope(tracer_.start_span(name, kind=_kind(kind), attributes=attributes))


def chat_span(model: str, *, max_tokens: int | None = None, temperature: float | None = None,
              server_url: str | None = None,
              attributes: Mapping[str, Any] | None = None) -> Any:
    """``with chat_span(model) as span``: the GenAI ``chat {model}`` CLIENT span of one
    LLM request, under the current span (a no-op without a recording one, or when off).
    ``server_url`` gives ``server.address`` and ``server.port``."""
    if _tracer is None:
        return _NOOP_SCOPE
    attrs: dict[str, Any] = {GEN_AI_OPERATION_NAME: OP_CHAT, GEN_AI_REQUEST_MODEL: model}
    if max_tokens is not None:
        attrs[GEN_AI_REQUEST_MAX_TOKENS] = max_tokens
    if temperature is not None:
        attrs[GEN_AI_REQUEST_TEMPERATURE] = temperature
    if server_url:
        from urllib.parse import urlsplit
        try:
            parts = urlsplit(server_url)
            if parts.hostname:
                attrs[SERVER_ADDRESS] = parts.hostname
            if parts.port is not None:
                attrs[SERVER_PORT] = parts.port
        except ValueError:
            pass
    if attributes:
        attrs.update(attributes)
    return current_child_span(f"{OP_CHAT} {model}", attrs, "client")


class SubmitSpan:
    """The client's ``invoke_agent`` CLIENT span of one submitted task, built only when
    it ends (:func:`end_submit_span`): its ids are drawn at submit, so that the
    traceparent can travel with the task, and the span goes to the exporter as a finished
    span, without the SDK's live-span machinery on the submit path."""

    __slots__ = ("attributes", "name", "parent_id", "span_id", "start_ns", "trace_id",
                 "traceparent")

    def __init__(self, name: str, trace_id: int, parent_id: int | None,
                 attributes: dict[str, Any]) -> None:
        self.name = name
        self.trace_id = trace_id
        self.parent_id = parent_id
        self.span_id = _random_bits(64) or 1
        self.start_ns = time.time_ns()
        self.attributes = attributes
        self.traceparent = f"00-{trace_id:032x}-{self.span_id:016x}-01"

    def is_recording(self) -> bool:
        return True


def submit_span(task_id: str, capabilities: Sequence[str], agent: str | None = None
                ) -> SubmitSpan | None:
    """The span of one submitted task: a child of the current span if there is one (a
    workflow, an agent's task), else the root of a new trace, kept by the sample ratio.
    End it with :func:`end_submit_span` when the result is in.

    Returns:
        The span, or None when tracing is off or the trace is not sampled (nothing to
        end, and no ``traceparent`` to send).
    """
    if _tracer is None:
        return None
    if _open_scopes:
        parent = _get_current_span()
        context = parent.get_span_context()
        if context.is_valid:
            if not parent.is_recording():
                return None  # inside a trace that was not sampled
            trace_id, parent_id = context.trace_id, context.span_id
        elif not _root_sampled():
            return None
        else:
            trace_id, parent_id = _random_bits(128) or 1, None
    elif not _root_sampled():
        return None  # a new trace, not sampled: nothing built, nothing sent
    else:
        trace_id, parent_id = _random_bits(128) or 1, None
    attrs: dict[str, Any] = {GEN_AI_OPERATION_NAME: OP_INVOKE_AGENT, ORCH_TASK_ID: task_id,
                             ORCH_CAPABILITIES: list(capabilities),
                             MESSAGING_SYSTEM: MESSAGING_SYSTEM_ZEROMQ}
    if agent:
        attrs[GEN_AI_AGENT_NAME] = agent
    target = agent or " ".join(capabilities)
    return SubmitSpan(f"{OP_INVOKE_AGENT} {target}" if target else OP_INVOKE_AGENT,
                      trace_id, parent_id, attrs)


def end_submit_span(span: SubmitSpan, handle: Any) -> None:
    """End a :func:`submit_span` span with the task's outcome; ``handle`` is the task's
    handle (a ``TaskHandle``: its done callback passes it). Never raises."""
    attrs = span.attributes
    error: tuple[str, str] | None = None
    try:
        try:
            result = handle.result_nowait()
        except Exception as e:  # noqa: BLE001 - the result cannot come: the span says why
            error = (type(e).__name__, str(e))
        else:
            status = getattr(result, "status", None)
            if status is not None:
                attrs[ORCH_TASK_STATUS] = status
            if getattr(result, "attempts", None):
                attrs[ORCH_ATTEMPT] = result.attempts
            if getattr(result, "agent", None):
                attrs[GEN_AI_AGENT_ID] = result.agent
            if status is not None and status != "succeeded":
                failure = getattr(result, "error", None)
                error = (getattr(failure, "code", None) or status,
                         str(failure) if failure is not None else status)
        emit_span(span.name, span.trace_id, span.span_id, span.parent_id, span.start_ns,
                  time.time_ns(), attrs, "client", error)
    except Exception:
        logger.debug("could not record a task's span", exc_info=True)


def new_span_id() -> int:
    """A random, valid span id."""
    return _random_bits(64) or 1


def parse_traceparent(traceparent: str) -> tuple[int, int, bool] | None:
    """(trace id, parent span id, sampled) of a W3C ``traceparent``; None if malformed."""
    parts = traceparent.split("-")
    if len(parts) != 4 or len(parts[1]) != 32 or len(parts[2]) != 16 or len(parts[3]) != 2:
        return None
    try:
        trace_id, span_id, flags = int(parts[1], 16), int(parts[2], 16), int(parts[3], 16)
    except ValueError:
        return None
    if not trace_id or not span_id or parts[0] == "ff":
        return None
    return trace_id, span_id, bool(flags & 1)


_SPAN_CLASSES: list[Any] = []


def emit_span(name: str, trace_id: int, span_id: int, parent_id: int | None,
              start_ns: int, end_ns: int, attributes: dict[str, Any],
              kind: str = "internal", error: tuple[str, str] | None = None,
              events: Sequence[tuple[str, dict[str, Any] | None, int]] = ()) -> None:
    """Hand a finished span (known after the fact: its ids, times and attributes) to
    the exporter, without the SDK's live-span machinery (a third of the cost). Nothing
    when tracing is off. ``error`` is ``(error.type, message)``: status ERROR."""
    processor = _processor
    if processor is None:
        return
    if not _SPAN_CLASSES:
        from opentelemetry.sdk.trace import Event, ReadableSpan
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope
        from opentelemetry.trace import SpanContext, TraceFlags
        from opentelemetry.trace.status import Status, StatusCode
        _SPAN_CLASSES.extend((ReadableSpan, SpanContext, TraceFlags(1), Status,
                              StatusCode, Event, InstrumentationScope(SCOPE),
                              Status(StatusCode.UNSET)))
    readable, context, sampled, status_of, codes, event_of, scope, unset = _SPAN_CLASSES
    status = unset
    if error is not None:
        attributes[ERROR_TYPE] = error[0]
        status = status_of(codes.ERROR, error[1] or error[0])
    processor.on_end(readable(
        name=name, context=context(trace_id, span_id, False, sampled),
        parent=None if parent_id is None else context(trace_id, parent_id, True, sampled),
        resource=_resource, attributes=attributes,
        events=tuple(event_of(n, a, t) for n, a, t in events) if events else (),
        kind=_kind(kind), status=status, start_time=start_ns, end_time=end_ns,
        instrumentation_scope=scope))


def record_span(name: str, traceparent: str | None, start_wall_s: float, end_wall_s: float,
                attributes: Mapping[str, Any] | None = None, error: str | None = None, *,
                kind: str | SpanKind = "internal") -> str | None:
    """Emit a finished span, child of ``traceparent``, that ran from ``start_wall_s`` to
    ``end_wall_s`` (wall-clock seconds, ``time.time()``): for spans known after the fact.

    Args:
        error: the span failed with this ``error.type`` (status ERROR).

    Returns:
        The new span's ``traceparent`` (to parent more spans on it), or None when nothing
        was recorded (tracing off, no or a malformed ``traceparent``).
    """
    tracer_, ctx = _continuing(traceparent)
    if tracer_ is None or ctx is None:
        return None
    span = tracer_.start_span(name, context=ctx, kind=_kind(kind), attributes=attributes,
                              start_time=_ns(start_wall_s))
    if error is not None:
        mark_error(span, error)
    tp = traceparent_of(span)
    span.end(end_time=_ns(end_wall_s))
    return tp


def _ns(wall_s: float) -> int:
    """Wall-clock seconds as nanoseconds, to the microsecond (a float of seconds holds no
    more: this keeps 1700000000.25 from becoming ...249999872)."""
    return round(wall_s * 1e6) * 1000


def mark_error(span: Any, error_type: str, message: str | None = None) -> None:
    """Set ``span``'s status to ERROR with ``error.type`` (conventions: a low-cardinality
    class of the failure, such as an exception class or an error code)."""
    if not span.is_recording():
        return
    from opentelemetry.trace import Status, StatusCode
    span.set_attribute(ERROR_TYPE, error_type)
    span.set_status(Status(StatusCode.ERROR, message or error_type))


# ---------------------------------------------------------------- the jsonl exporter

def span_record(span: ReadableSpan) -> dict[str, Any]:
    """The JSON object :class:`JsonlSpanExporter` writes for ``span``."""
    ctx = span.context
    parent = span.parent
    status = span.status
    record: dict[str, Any] = {
        "name": span.name,
        "trace_id": f"{ctx.trace_id:032x}" if ctx is not None else None,
        "span_id": f"{ctx.span_id:016x}" if ctx is not None else None,
        "parent_span_id": f"{parent.span_id:016x}" if parent is not None else None,
        "kind": span.kind.name.lower(),
        "start_ns": span.start_time,
        "end_ns": span.end_time,
        "attributes": dict(span.attributes or {}),
        "service": span.resource.attributes.get(SERVICE_NAME),
        "status": status.status_code.name.lower(),
    }
    if status.description:
        record["status_message"] = status.description
    if span.events:
        record["events"] = [{"name": e.name, "time_ns": e.timestamp,
                             "attributes": dict(e.attributes or {})} for e in span.events]
    return record


class JsonlSpanExporter:
    """Appends one compact JSON object per finished span to a file, one ``write`` of an
    ``O_APPEND`` descriptor per line: lines of several processes sharing the file never
    interleave. Fields: see :func:`span_record`. A ``SpanExporter`` by its methods (not
    a subclass, so that importing this module does not load the OpenTelemetry SDK)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT,
                                       0o600)
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        import orjson
        from opentelemetry.sdk.trace.export import SpanExportResult

        with self._lock:
            fd = self._fd
            if fd is None:
                return SpanExportResult.FAILURE
            # One write per batch: an O_APPEND write lands whole, so the batch's lines
            # stay together even with other processes appending to the same file.
            data = b"".join(orjson.dumps(span_record(span), default=str) + b"\n"
                            for span in spans)
            try:
                written = os.write(fd, data)
                while written < len(data):  # a short write: only on a full disk
                    data = data[written:]
                    written = os.write(fd, data)
            except OSError:
                return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        with self._lock:
            fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


__all__ = [
    "DEFAULT_FILE",
    "DEFAULT_SAMPLE_RATIO",
    "current_trace_id",
    "ENV_EXPORTER",
    "ENV_FILE",
    "ENV_OTEL_SAMPLER",
    "ENV_OTEL_SAMPLER_ARG",
    "ENV_SAMPLE_RATIO",
    "ERROR_TYPE",
    "EXPORTERS",
    "EXPORTER_CONSOLE",
    "EXPORTER_JSONL",
    "EXPORTER_NONE",
    "EXPORTER_OTLP",
    "GEN_AI_AGENT_ID",
    "GEN_AI_AGENT_NAME",
    "GEN_AI_OPERATION_NAME",
    "GEN_AI_PROVIDER_NAME",
    "GEN_AI_REQUEST_MAX_TOKENS",
    "GEN_AI_REQUEST_MODEL",
    "GEN_AI_REQUEST_TEMPERATURE",
    "GEN_AI_RESPONSE_FINISH_REASONS",
    "GEN_AI_RESPONSE_ID",
    "GEN_AI_RESPONSE_MODEL",
    "GEN_AI_USAGE_INPUT_TOKENS",
    "GEN_AI_USAGE_OUTPUT_TOKENS",
    "MESSAGING_SYSTEM",
    "MESSAGING_SYSTEM_ZEROMQ",
    "NOOP_SPAN",
    "OP_CHAT",
    "OP_INVOKE_AGENT",
    "OP_INVOKE_WORKFLOW",
    "ORCH_ATTEMPT",
    "ORCH_CAPABILITIES",
    "ORCH_RUN_ID",
    "ORCH_TASK_ID",
    "ORCH_TASK_STATUS",
    "ORCH_WORKFLOW_NAME",
    "SCOPE",
    "SERVER_ADDRESS",
    "SERVER_PORT",
    "SERVICE_NAME",
    "TRACEPARENT",
    "JsonlSpanExporter",
    "TracingConfig",
    "TracingConfigError",
    "chat_span",
    "child_span",
    "context_from",
    "current_child_span",
    "current_traceparent",
    "end_submit_span",
    "init_tracing",
    "mark_error",
    "record_span",
    "shutdown_tracing",
    "span_record",
    "start_root_span",
    "submit_span",
    "traceparent_of",
    "tracer",
    "tracing_enabled",
]
