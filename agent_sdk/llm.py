"""The LLM backend of the built-in agents: OpenAI-compatible chat completions.

::

    llm = LLM.from_env()                      # None when ORCH_LLM_BASE_URL is unset
    if llm is not None:
        llm.attach(self)                      # publish usage under llm/usage/<name>/<id>
        budget = TokenBudget.from_task(task, self.state)   # None without llm_budget
        reply = await llm.chat([{"role": "user", "content": prompt}], budget=budget)
        reply.text, reply.prompt_tokens, reply.completion_tokens

Configuration (environment): ``ORCH_LLM_BASE_URL`` (``http://127.0.0.1:8000/v1``; the
backend is off without it), ``ORCH_LLM_MODEL`` (default: the first model the server
lists), ``ORCH_LLM_API_KEY`` (local servers take any), ``ORCH_LLM_TIMEOUT_S`` (per
request, default 60), ``ORCH_LLM_MAX_ATTEMPTS`` (default 4) and ``ORCH_LLM_BACKOFF_S``
(first back-off, default 0.5).

Why the ``openai`` client library: vLLM, Ollama, llama.cpp and the hosted APIs all speak
its chat completions dialect, and the library keeps up with that dialect's details
(auth headers, error bodies, typed usage) so this module does not. Its own retries are
off (``max_retries=0``): ours sort failures into what the broker's retry policy
understands (:class:`LLMUnavailable` is a :class:`~agent_sdk.errors.RetryableError`,
:class:`LLMRequestRejected` and :class:`BudgetExceeded` are
:class:`~agent_sdk.errors.PermanentFailure`), and cancelling ``chat`` aborts the HTTP
request, because the library runs on httpx, which closes the connection when the
awaiting task is cancelled.

Token usage is counted per :class:`LLM` object (one per agent process) and published
to the state service under ``llm/usage/<agent name>/<agent id>``; a task's
``llm_budget`` field (``{"scope": str, "max_tokens": int}``) caps the tokens of every
call made for it, across agents, through ``llm/budget/<scope>``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol, Self, cast

from agent_sdk.errors import OrchestratorError, PermanentFailure, RetryableError
from wire.tracing import (
    GEN_AI_RESPONSE_FINISH_REASONS,
    GEN_AI_RESPONSE_ID,
    GEN_AI_RESPONSE_MODEL,
    GEN_AI_USAGE_INPUT_TOKENS,
    GEN_AI_USAGE_OUTPUT_TOKENS,
    chat_span,
)

if TYPE_CHECKING:
    import openai

    from agent_sdk.state import StateClient, Versioned
    from agent_sdk.sync import SyncStateClient
    from agent_sdk.task import Result, Task

logger = logging.getLogger(__name__)

#: Default seconds one HTTP request may take.
DEFAULT_TIMEOUT_S: Final = 60.0
#: Default tries of one call on 429, 5xx and connection errors (the first included).
DEFAULT_MAX_ATTEMPTS: Final = 4
#: Default first back-off; it doubles per retry, jittered, up to BACKOFF_MAX_S.
DEFAULT_BACKOFF_S: Final = 0.5
BACKOFF_MAX_S: Final = 8.0
#: A Retry-After up to this long is waited out; a longer one ends our retries at once
#: (the broker's retry, later, is the better wait).
RETRY_AFTER_MAX_S: Final = 10.0
#: Usage is written to the state service at most this often (and at the end of a task).
USAGE_PUBLISH_INTERVAL_S: Final = 3.0
#: State key prefixes.
USAGE_PREFIX: Final = "llm/usage/"
BUDGET_PREFIX: Final = "llm/budget/"
#: Characters of an error body quoted in an exception message.
ERROR_DETAIL_CHARS: Final = 300
#: Replaces a masked secret.
MASK: Final = "***"

ENV_BASE_URL: Final = "ORCH_LLM_BASE_URL"
ENV_MODEL: Final = "ORCH_LLM_MODEL"
ENV_API_KEY: Final = "ORCH_LLM_API_KEY"
ENV_TIMEOUT_S: Final = "ORCH_LLM_TIMEOUT_S"
ENV_MAX_ATTEMPTS: Final = "ORCH_LLM_MAX_ATTEMPTS"
ENV_BACKOFF_S: Final = "ORCH_LLM_BACKOFF_S"


# ---------------------------------------------------------------------- errors


class LLMError(OrchestratorError):
    """Raised when a chat completion cannot be had; ``code`` is a stable error code."""

    code: str = "llm_error"

    def to_result(self) -> Result:
        """This failure as a failed :class:`~agent_sdk.task.Result` carrying ``code``
        (``execute`` may return it instead of raising, so the client sees the code)."""
        from agent_sdk.task import Result

        retryable = True if isinstance(self, RetryableError) else (
            False if isinstance(self, PermanentFailure) else None)
        return Result.failure(self.code, str(self), retryable=retryable)


class LLMUnavailable(LLMError, RetryableError):
    """Raised when the endpoint failed transiently (429, 5xx, timeout, connection) on
    every attempt; the broker retries the task after its back-off."""

    code = "llm_unavailable"

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        #: the last HTTP status (None: timeout or no connection)
        self.status = status


class LLMRequestRejected(LLMError, PermanentFailure):
    """Raised when the endpoint refused the request with a 4xx other than 429 (a bad
    request, a wrong key or model): retrying the same request cannot help."""

    code = "llm_rejected"

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class InvalidBudget(LLMError, PermanentFailure):
    """Raised when a task's ``llm_budget`` field is not ``{"scope": str, "max_tokens":
    int > 0}``."""

    code = "bad_request"


class BudgetExceeded(LLMError, PermanentFailure):
    """Raised before a call when its token budget is already spent."""

    code = "budget_exceeded"

    def __init__(self, scope: str, spent: int, max_tokens: int) -> None:
        super().__init__(f"token budget {scope!r} is spent: {spent} of {max_tokens} tokens used")
        self.scope = scope
        self.spent = spent
        self.max_tokens = max_tokens


# ---------------------------------------------------------------------- records


@dataclass(frozen=True, slots=True)
class LLMConfig:
    """Where and how to call the chat completions endpoint."""

    base_url: str
    model: str | None = None
    api_key: str = "not-needed"
    timeout_s: float = DEFAULT_TIMEOUT_S
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    backoff_s: float = DEFAULT_BACKOFF_S
    backoff_max_s: float = BACKOFF_MAX_S
    retry_after_max_s: float = RETRY_AFTER_MAX_S
    #: usage is written to the state service at most this often
    usage_interval_s: float = USAGE_PUBLISH_INTERVAL_S

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> LLMConfig | None:
        """The configuration in ``env`` (default ``os.environ``); None without a base URL.

        Raises:
            ValueError: a number in the environment does not parse or is out of range.
        """
        env = os.environ if env is None else env
        base_url = env.get(ENV_BASE_URL, "").strip()
        if not base_url:
            return None
        return cls(base_url=base_url.rstrip("/"), model=env.get(ENV_MODEL, "").strip() or None,
                   api_key=env.get(ENV_API_KEY, "").strip() or "not-needed",
                   timeout_s=_env_number(env, ENV_TIMEOUT_S, DEFAULT_TIMEOUT_S),
                   max_attempts=int(_env_number(env, ENV_MAX_ATTEMPTS, DEFAULT_MAX_ATTEMPTS)),
                   backoff_s=_env_number(env, ENV_BACKOFF_S, DEFAULT_BACKOFF_S, minimum=0.0))


def _env_number(env: Mapping[str, str], name: str, default: float,
                minimum: float = 1e-3) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None
    if value < minimum:
        raise ValueError(f"{name}={raw!r} must be at least {minimum:g}")
    return value


@dataclass(frozen=True, slots=True)
class Completion:
    """One chat completion: the reply text and what it cost."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    model: str = ""
    finish_reason: str | None = None
    #: the server sent no usage: the token counts are estimated from the text length
    estimated: bool = False

    @property
    def total_tokens(self) -> int:
        """Prompt and completion tokens together (what a budget counts)."""
        return self.prompt_tokens + self.completion_tokens


@dataclass(slots=True)
class Usage:
    """Running token totals of one :class:`LLM` object (one agent process)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    calls: int = 0
    failed_calls: int = 0

    @property
    def total_tokens(self) -> int:
        """Prompt and completion tokens together."""
        return self.prompt_tokens + self.completion_tokens

    def to_dict(self) -> dict[str, int]:
        """A JSON/msgpack-friendly copy, with ``total_tokens``."""
        return {**asdict(self), "total_tokens": self.total_tokens}


class UsageOwner(Protocol):
    """What :meth:`LLM.attach` needs of an agent (a :class:`~agent_sdk.agent.BaseAgent`)."""

    name: str
    agent_id: str

    @property
    def state(self) -> StateClient: ...


# ---------------------------------------------------------------------- budget


@dataclass(slots=True)
class TokenBudget:
    """A cap on the tokens spent for one task or workflow run, shared by every agent
    whose task carries the same ``scope``: the running total lives in the state
    service under ``llm/budget/<scope>`` as ``{"spent", "max_tokens", "calls"}``.

    A call is refused once the total reached ``max_tokens``; a call already in flight
    may finish and its tokens are added after, so the total can pass the cap by at
    most the calls that were in flight at that moment.
    """

    scope: str
    max_tokens: int
    state: StateClient

    @property
    def key(self) -> str:
        """The state key of the running total."""
        return BUDGET_PREFIX + self.scope

    @classmethod
    def from_task(cls, task: Task, state: StateClient) -> TokenBudget | None:
        """The budget named by the task's ``llm_budget`` field (None without one).

        Raises:
            InvalidBudget: the field is not ``{"scope": str, "max_tokens": int > 0}``.
        """
        spec = task.get("llm_budget")
        if spec is None:
            return None
        if not isinstance(spec, Mapping):
            raise InvalidBudget(f"llm_budget must be a map with scope and max_tokens, "
                                f"not {type(spec).__name__}")
        scope, max_tokens = spec.get("scope"), spec.get("max_tokens")
        if not isinstance(scope, str) or not scope.strip():
            raise InvalidBudget("llm_budget.scope must be a non-empty string")
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens <= 0:
            raise InvalidBudget(f"llm_budget.max_tokens must be a positive integer, "
                                f"not {max_tokens!r}")
        return cls(scope.strip(), max_tokens, state)

    async def spent(self) -> int:
        """Tokens spent in this scope so far."""
        return int(_budget_record(await self.state.get(self.key)).get("spent", 0))

    async def check(self) -> None:
        """Raise :class:`BudgetExceeded` if the scope's total reached ``max_tokens``."""
        spent = await self.spent()
        if spent >= self.max_tokens:
            raise BudgetExceeded(self.scope, spent, self.max_tokens)

    async def add(self, tokens: int) -> int:
        """Add ``tokens`` to the scope's total (compare-and-set, retried on conflicts,
        so concurrent agents lose no update); returns the new total."""
        max_tokens = self.max_tokens

        def bump(current: Any) -> dict[str, int]:
            record = _budget_record(current)
            return {"spent": int(record.get("spent", 0)) + tokens,
                    "calls": int(record.get("calls", 0)) + 1,
                    "max_tokens": max_tokens}

        new = await self.state.update(self.key, bump)
        return int(new["spent"])


def _budget_record(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


# ---------------------------------------------------------------------- the client


class LLM:
    """An OpenAI-compatible chat completions client with our retries, token counting
    and budgets. One per agent process; safe to share between its concurrent tasks.

    Args:
        config: the endpoint and retry settings.
        client: an ``openai.AsyncOpenAI`` to use instead of building one (tests).
    """

    def __init__(self, config: LLMConfig, client: openai.AsyncOpenAI | None = None) -> None:
        self.config = config
        # Built here, not on the first call: importing openai and building its SSL
        # context take long enough to stall an agent's loop past its heartbeats.
        self._client: openai.AsyncOpenAI | None = (client if client is not None
                                                   else _new_openai(config))
        self._model: str | None = config.model
        self._usage = Usage()
        self._owner: UsageOwner | None = None
        self._last_publish = float("-inf")
        self._publish_pending: asyncio.Task[None] | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> LLM | None:
        """The LLM the environment configures, or None when ``ORCH_LLM_BASE_URL`` is
        unset (the features that need one are then off)."""
        config = LLMConfig.from_env(env)
        return None if config is None else cls(config)

    # ------------------------------------------------------------------ calls

    async def chat(self, messages: Sequence[Mapping[str, str]], *, max_tokens: int | None = None,
                   budget: TokenBudget | None = None, temperature: float | None = None,
                   secrets: Iterable[str] | None = None) -> Completion:
        """One chat completion.

        Every message's content is passed through :func:`mask_secrets` first (the
        ``secrets`` given, and anything that looks like a hard-coded secret), so what an
        audit found never reaches the endpoint.

        Args:
            messages: ``[{"role": "system"|"user"|"assistant", "content": str}, ...]``.
            max_tokens: cap on the completion's tokens.
            budget: the task's token budget, checked before the call and charged after.
            temperature: sampling temperature (the server's default when None).
            secrets: exact strings to mask as well.

        Raises:
            BudgetExceeded: the budget was already spent.
            LLMUnavailable: 429, 5xx or connection errors on every attempt, or a timeout.
            LLMRequestRejected: another 4xx; the message quotes what the server said.
        """
        if asyncio.current_task() is None:
            # The SDK runs ``execute`` eagerly up to its first pause, outside any Task;
            # the HTTP client underneath refuses to start there: move into the Task.
            await asyncio.sleep(0)
        if budget is not None:
            await budget.check()
        secret_list = list(secrets or ())
        sent = [{"role": m.get("role", "user"),
                 "content": mask_secrets(m.get("content", ""), secret_list, patterns=True)}
                for m in messages]
        options: dict[str, Any] = {}
        if max_tokens is not None:
            options["max_tokens"] = max_tokens
        if temperature is not None:
            options["temperature"] = temperature
        try:
            completion = await self._call_with_retries(sent, options)
        except LLMError:
            self._usage.failed_calls += 1
            raise
        usage = self._usage
        usage.prompt_tokens += completion.prompt_tokens
        usage.completion_tokens += completion.completion_tokens
        usage.calls += 1
        if budget is not None:
            await budget.add(completion.total_tokens)
        self._schedule_publish()
        return completion

    async def _call_with_retries(self, messages: list[dict[str, str]],
                                 options: dict[str, Any]) -> Completion:
        config = self.config
        attempt = 0
        while True:
            attempt += 1
            try:
                return await self._call_once(messages, options)
            except _Transient as failure:
                wait_s = _backoff_s(config, attempt, failure.retry_after_s)
                if failure.final or attempt >= config.max_attempts or wait_s is None:
                    raise LLMUnavailable(f"{failure.message} (gave up after {attempt} "
                                         f"attempt{'s' * (attempt > 1)})",
                                         failure.status) from None
                logger.info("LLM call failed (%s); retry %d in %.2f s", failure.message,
                            attempt, wait_s)
                await asyncio.sleep(wait_s)

    async def _call_once(self, messages: list[dict[str, str]],
                         options: dict[str, Any]) -> Completion:
        import openai

        client = self._openai()
        url = self.config.base_url
        try:
            model = self._model or await self._default_model(client)
            # The GenAI ``chat {model}`` span, under the task's span; a no-op when
            # tracing is off or no span is current.
            with chat_span(model, max_tokens=options.get("max_tokens"),
                           temperature=options.get("temperature"), server_url=url) as span:
                # Plain dicts are what the typed message params stand for at run time.
                reply = await client.chat.completions.create(model=model,
                                                             messages=cast(Any, messages),
                                                             **options)
                if span.is_recording():
                    _trace_reply(span, reply)
        except openai.APITimeoutError:
            # Not retried here: the request already used a whole timeout of the task's
            # time; the broker's retry (with its back-off) is the next attempt.
            raise _Transient(f"the LLM endpoint {url} did not answer within "
                             f"{self.config.timeout_s:g} s", final=True) from None
        except openai.APIConnectionError as e:
            raise _Transient(f"cannot reach the LLM endpoint {url}: {e}") from None
        except openai.APIStatusError as e:
            status = e.status_code
            detail = _error_detail(e)
            if status == 429 or status >= 500:
                raise _Transient(f"the LLM endpoint {url} answered HTTP {status}: {detail}",
                                 status, _retry_after_s(e.response.headers)) from None
            raise LLMRequestRejected(f"the LLM endpoint {url} refused the request "
                                     f"(HTTP {status}): {detail}", status) from None
        return _completion_of(reply, messages)

    async def _default_model(self, client: openai.AsyncOpenAI) -> str:
        """The first model the server lists (llama.cpp and Ollama serve one)."""
        page = await client.models.list()
        if not page.data:
            raise LLMRequestRejected(f"the LLM endpoint {self.config.base_url} lists no model; "
                                     f"set {ENV_MODEL}")
        self._model = page.data[0].id
        return self._model

    def _openai(self) -> openai.AsyncOpenAI:
        if self._client is None:
            self._client = _new_openai(self.config)
        return self._client

    async def aclose(self) -> None:
        """Publish the last usage (when attached) and close the HTTP client."""
        pending, self._publish_pending = self._publish_pending, None
        if pending is not None:
            pending.cancel()
        if self._owner is not None:
            await self.publish_usage()
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # ------------------------------------------------------------------ usage

    @property
    def model(self) -> str | None:
        """The model asked for (None until the server's default was looked up)."""
        return self._model

    def usage_snapshot(self) -> dict[str, Any]:
        """This process's totals: ``{"prompt_tokens", "completion_tokens",
        "total_tokens", "calls", "failed_calls", "model", "endpoint"}``."""
        return {**self._usage.to_dict(), "model": self._model, "endpoint": self.config.base_url}

    def attach(self, owner: UsageOwner) -> None:
        """Publish usage under ``llm/usage/<owner.name>/<owner.agent_id>``: at most every
        ``config.usage_interval_s`` after calls (in the background), and whenever
        :meth:`publish_usage` is awaited (at the end of a task)."""
        self._owner = owner

    async def publish_usage(self) -> bool:
        """Write the usage snapshot to the state service now; returns whether it was
        written (a state service that cannot be reached is logged, not raised: usage
        reporting never fails a task)."""
        owner = self._owner
        if owner is None:
            return False
        self._last_publish = time.monotonic()
        record = {**self.usage_snapshot(), "agent": owner.name, "agent_id": owner.agent_id,
                  "updated_at": time.time()}
        try:
            await owner.state.set(f"{USAGE_PREFIX}{owner.name}/{owner.agent_id}", record)
        except OrchestratorError as e:
            logger.warning("LLM usage not published: %s", e)
            return False
        return True

    def _schedule_publish(self) -> None:
        """Publish now, or once the interval since the last publish is over, in the
        background (a call never waits on the state service for it)."""
        if self._owner is None or self._publish_pending is not None:
            return
        delay_s = max(0.0, self._last_publish + self.config.usage_interval_s - time.monotonic())
        self._publish_pending = asyncio.get_running_loop().create_task(
            self._publish_after(delay_s))

    async def _publish_after(self, delay_s: float) -> None:
        try:
            if delay_s:
                await asyncio.sleep(delay_s)
        finally:
            self._publish_pending = None
        await self.publish_usage()


def _new_openai(config: LLMConfig) -> openai.AsyncOpenAI:
    """The library's client with its own retries off (ours sort the failures)."""
    import openai

    return openai.AsyncOpenAI(base_url=config.base_url, api_key=config.api_key,
                              timeout=config.timeout_s, max_retries=0)


class _Transient(Exception):
    """A failure worth another attempt (internal to the retry loop)."""

    def __init__(self, message: str, status: int | None = None,
                 retry_after_s: float | None = None, *, final: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.retry_after_s = retry_after_s
        #: do not retry here (a timeout): raise LLMUnavailable at once
        self.final = final


def _backoff_s(config: LLMConfig, attempt: int, retry_after_s: float | None) -> float | None:
    """Seconds to wait before attempt ``attempt + 1``; None: give up now (the server
    asked for a longer wait than we hold a task for)."""
    if retry_after_s is not None:
        return retry_after_s if retry_after_s <= config.retry_after_max_s else None
    ceiling = min(config.backoff_max_s, config.backoff_s * 2 ** (attempt - 1))
    # Full jitter on the upper half: agents that failed together do not retry together.
    return random.uniform(ceiling / 2, ceiling)


def _retry_after_s(headers: Mapping[str, str]) -> float | None:
    raw = headers.get("retry-after")
    if raw is None:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        return None  # an HTTP date: treated as no hint


def _error_detail(error: Any) -> str:
    """What the server said: the error body's message, else the body text, shortened."""
    body = getattr(error, "body", None)
    message: Any = None
    if isinstance(body, dict):
        inner = body.get("error", body)
        message = inner.get("message") if isinstance(inner, dict) else inner
    if not message:
        try:
            message = error.response.text
        except Exception:  # noqa: BLE001 - a streamed or closed body has no text
            message = str(error)
    text = " ".join(str(message).split())
    return text[:ERROR_DETAIL_CHARS] + ("..." if len(text) > ERROR_DETAIL_CHARS else "")


def _trace_reply(span: Any, reply: Any) -> None:
    """The GenAI response and usage attributes of a ``chat`` span."""
    usage = reply.usage
    if usage is not None and usage.prompt_tokens is not None:
        span.set_attribute(GEN_AI_USAGE_INPUT_TOKENS, int(usage.prompt_tokens))
        span.set_attribute(GEN_AI_USAGE_OUTPUT_TOKENS, int(usage.completion_tokens or 0))
    if reply.model:
        span.set_attribute(GEN_AI_RESPONSE_MODEL, reply.model)
    if getattr(reply, "id", None):
        span.set_attribute(GEN_AI_RESPONSE_ID, reply.id)
    reasons = [c.finish_reason for c in reply.choices or () if c.finish_reason]
    if reasons:
        span.set_attribute(GEN_AI_RESPONSE_FINISH_REASONS, reasons)


def _completion_of(reply: Any, messages: list[dict[str, str]]) -> Completion:
    choice = reply.choices[0] if reply.choices else None
    text = (choice.message.content if choice is not None and choice.message else None) or ""
    usage = reply.usage
    if usage is not None and usage.prompt_tokens is not None:
        return Completion(text, int(usage.prompt_tokens), int(usage.completion_tokens or 0),
                          reply.model or "", choice.finish_reason if choice else None)
    # No usage from the server: about four characters a token, so budgets still bite.
    prompt_chars = sum(len(m["content"]) for m in messages)
    return Completion(text, prompt_chars // 4 + 1, len(text) // 4 + 1, reply.model or "",
                      choice.finish_reason if choice else None, estimated=True)


# ---------------------------------------------------------------------- reading usage


def summarize_usage(entries: Iterable[Versioned]) -> dict[str, Any]:
    """The usage records under ``llm/usage/`` and ``llm/budget/`` as one report:
    ``{"agents": [record...], "total": {"prompt_tokens", "completion_tokens",
    "total_tokens", "calls"}, "budgets": [{"scope", "spent", "max_tokens", "calls"}]}``."""
    agents: list[dict[str, Any]] = []
    budgets: list[dict[str, Any]] = []
    total = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0, "calls": 0}
    for entry in entries:
        value = entry.value if isinstance(entry.value, dict) else {}
        if entry.key.startswith(USAGE_PREFIX):
            agents.append(value)
            for name in total:
                total[name] += int(value.get(name, 0) or 0)
        elif entry.key.startswith(BUDGET_PREFIX):
            budgets.append({"scope": entry.key[len(BUDGET_PREFIX):],
                            "spent": int(value.get("spent", 0)),
                            "max_tokens": value.get("max_tokens"),
                            "calls": int(value.get("calls", 0))})
    return {"agents": agents, "total": total, "budgets": budgets}


def read_usage(state: SyncStateClient) -> dict[str, Any]:
    """Token usage per agent and per budget, from a blocking state client (the CLI's
    ``status``); see :func:`summarize_usage` for the shape."""
    return summarize_usage([*state.list(USAGE_PREFIX), *state.list(BUDGET_PREFIX)])


async def aread_usage(state: StateClient) -> dict[str, Any]:
    """:func:`read_usage` for the async state client."""
    return summarize_usage([*await state.list(USAGE_PREFIX), *await state.list(BUDGET_PREFIX)])


# ---------------------------------------------------------------------- secrets & notice


#: What looks like a hard-coded secret; a group named ``value`` is masked alone (the
#: rest of the match, such as a variable name, stays readable).
SECRET_PATTERNS: Final[tuple[re.Pattern[str], ...]] = (
    re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY( BLOCK)?-----.*?"
               r"-----END [A-Z0-9 ]*PRIVATE KEY( BLOCK)?-----", re.DOTALL),
    re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    re.compile(r"\bsk-[A-Za-z0-9_\-]{16,}"),
    re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}\b"),
    re.compile(r"""(?ix)\b[a-z0-9_]*(?:password|passwd|pwd|secret|api_?key|token|access_?key)
                   [a-z0-9_]*["']?\s*[:=]\s*(?P<quote>["'])(?P<value>[^"'\n]+)(?P=quote)"""),
)


def mask_secrets(text: str, secrets: Iterable[str] | None = None, *,
                 patterns: bool | None = None) -> str:
    """``text`` with secrets replaced by ``***``.

    Args:
        secrets: exact strings to mask (what an audit found). Without a list, anything
            that looks like a hard-coded secret is masked instead.
        patterns: also mask what looks like a secret (default: only when ``secrets``
            is None).
    """
    if secrets is not None:
        # Longest first: a secret that contains another is masked whole.
        for secret in sorted({s for s in secrets if s}, key=len, reverse=True):
            text = text.replace(secret, MASK)
    if patterns if patterns is not None else secrets is None:
        for pattern in SECRET_PATTERNS:
            text = pattern.sub(_mask_match, text)
    return text


def _mask_match(match: re.Match[str]) -> str:
    if "value" not in match.re.groupindex:
        return MASK
    whole, start = match.group(0), match.start()
    return whole[:match.start("value") - start] + MASK + whole[match.end("value") - start:]


def describe_endpoint(env: Mapping[str, str] | None = None) -> str | None:
    """One line naming where user code goes (None without an LLM configured), for
    ``start`` and ``run`` to print once."""
    config = LLMConfig.from_env(env)
    if config is None:
        return None
    model = config.model or "the server's default"
    return f"user code will be sent to {config.base_url} (model {model})"


__all__ = [
    "BUDGET_PREFIX",
    "LLM",
    "USAGE_PREFIX",
    "BudgetExceeded",
    "Completion",
    "InvalidBudget",
    "LLMConfig",
    "LLMError",
    "LLMRequestRejected",
    "LLMUnavailable",
    "TokenBudget",
    "Usage",
    "UsageOwner",
    "aread_usage",
    "describe_endpoint",
    "mask_secrets",
    "read_usage",
    "summarize_usage",
]
