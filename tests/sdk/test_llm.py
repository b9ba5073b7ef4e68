"""The LLM backend against a real local HTTP server (the fake OpenAI-compatible one):
replies and usage, permanent and transient failures, retries, timeouts, cancellation,
secret masking, configuration. Never the network."""

from __future__ import annotations

import asyncio
import json
import socket
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from agent_sdk.errors import PermanentFailure, RetryableError
from agent_sdk.llm import (
    BudgetExceeded, InvalidBudget, LLM, LLMConfig, LLMRequestRejected, LLMUnavailable,
    TokenBudget, describe_endpoint, mask_secrets,
)
from agent_sdk.loop import run
from agent_sdk.task import Task
from tests.conftest import kill, python_process, read_json_line
from tests.fakes.llm_server import (
    ErrorReply, FakeLLMServer, HoldReply, MODEL_ID, TextReply, reply_from_dict,
)

T = TypeVar("T")

HELLO = [{"role": "user", "content": "hello"}]
#: Deadline of every wait on the fake's threads.
WAIT_S = 5.0


@pytest.fixture
def server() -> Iterator[FakeLLMServer]:
    with FakeLLMServer() as fake:
        yield fake


def config(server: FakeLLMServer, **overrides: object) -> LLMConfig:
    """Fast settings: short timeout, quick back-off, three attempts."""
    options: dict[str, object] = {"model": "test-model", "api_key": "sk-test-key-0000",
                                  "timeout_s": 5.0, "max_attempts": 3, "backoff_s": 0.01}
    options.update(overrides)
    return LLMConfig(base_url=server.url, **options)  # type: ignore[arg-type]


def with_llm(cfg: LLMConfig, scenario: Callable[[LLM], Awaitable[T]]) -> T:
    """Run ``scenario(llm)`` on a fresh loop and close the LLM's HTTP client after."""
    async def main() -> T:
        async with LLM(cfg) as llm:
            return await scenario(llm)

    return run(main())


# ------------------------------------------------------------------ replies


def test_a_reply_is_returned_and_its_tokens_counted(server: FakeLLMServer) -> None:
    # Given two scripted replies with usage counts
    server.push(TextReply("first", prompt_tokens=12, completion_tokens=3),
                TextReply("second", prompt_tokens=7, completion_tokens=9))

    # When the agent asks twice
    async def scenario(llm: LLM) -> tuple[list[str], dict[str, object]]:
        one = await llm.chat(HELLO, max_tokens=50)
        two = await llm.chat([{"role": "system", "content": "be brief"}, *HELLO])
        assert (one.prompt_tokens, one.completion_tokens, one.total_tokens) == (12, 3, 15)
        assert (two.prompt_tokens, two.completion_tokens) == (7, 9)
        assert not one.estimated
        return [one.text, two.text], llm.usage_snapshot()

    texts, usage = with_llm(config(server), scenario)

    # Then the texts come back, the totals add up, and the requests carried what we sent
    assert texts == ["first", "second"]
    assert usage["prompt_tokens"] == 19 and usage["completion_tokens"] == 12
    assert usage["total_tokens"] == 31 and usage["calls"] == 2 and usage["failed_calls"] == 0
    first, second = server.chat_requests
    assert first.body["model"] == "test-model" and first.body["max_tokens"] == 50
    assert first.body["messages"] == HELLO
    assert "max_tokens" not in second.body and second.body["messages"][0]["role"] == "system"
    assert first.headers["authorization"] == "Bearer sk-test-key-0000"


def test_without_a_model_the_servers_first_model_is_used(server: FakeLLMServer) -> None:
    async def scenario(llm: LLM) -> str | None:
        await llm.chat(HELLO)
        await llm.chat(HELLO)
        return llm.model

    assert with_llm(config(server, model=None), scenario) == MODEL_ID
    assert [r.path for r in server.requests] == ["/v1/models", "/v1/chat/completions",
                                                 "/v1/chat/completions"]
    assert server.chat_requests[0].body["model"] == MODEL_ID


def test_a_reply_without_usage_is_estimated_so_budgets_still_count(
        server: FakeLLMServer) -> None:
    server.push(TextReply("x" * 40, usage=False))
    reply = with_llm(config(server), lambda llm: llm.chat([{"role": "user",
                                                            "content": "y" * 80}]))
    assert reply.estimated and reply.prompt_tokens == 21 and reply.completion_tokens == 11


# ------------------------------------------------------------------ failures


def test_a_400_is_permanent_and_says_what_the_server_said(server: FakeLLMServer) -> None:
    # Given a server that rejects the request
    server.push(ErrorReply(400, {"error": {"message": "context length 9000 exceeds 4096"}}))

    # When the agent asks
    with pytest.raises(LLMRequestRejected) as caught:
        with_llm(config(server), lambda llm: llm.chat(HELLO))

    # Then the failure is permanent, carries the server's words, and was not retried
    assert isinstance(caught.value, PermanentFailure)
    assert not isinstance(caught.value, RetryableError)
    assert caught.value.status == 400 and caught.value.code == "llm_rejected"
    assert "HTTP 400" in str(caught.value)
    assert "context length 9000 exceeds 4096" in str(caught.value)
    assert len(server.chat_requests) == 1
    result = caught.value.to_result()
    assert result.error is not None and result.error.code == "llm_rejected"
    assert result.retryable is False


def test_a_429_is_retried_after_the_servers_retry_after(server: FakeLLMServer) -> None:
    # Given a rate limit asking for one second, then a reply
    server.push(ErrorReply(429, {"error": {"message": "rate limited"}}, retry_after="1"),
                TextReply("after the wait"))

    # When the agent asks (with a back-off far shorter than the Retry-After)
    started = time.monotonic()
    reply = with_llm(config(server, backoff_s=0.001), lambda llm: llm.chat(HELLO))
    waited_s = time.monotonic() - started

    # Then the second attempt succeeded, after the wait the server asked for
    assert reply.text == "after the wait"
    assert len(server.chat_requests) == 2
    assert waited_s >= 0.95


def test_a_long_retry_after_gives_up_at_once_as_transient(server: FakeLLMServer) -> None:
    server.push(ErrorReply(429, {"error": {"message": "quota"}}, retry_after="3600"))
    with pytest.raises(LLMUnavailable) as caught:
        with_llm(config(server), lambda llm: llm.chat(HELLO))
    assert caught.value.status == 429 and len(server.chat_requests) == 1


def test_503_forever_raises_transient_after_the_attempts(server: FakeLLMServer) -> None:
    # Given a server that is always overloaded
    server.default = ErrorReply(503, "upstream overloaded")

    # When the agent asks
    async def scenario(llm: LLM) -> None:
        try:
            await llm.chat(HELLO)
        finally:
            assert llm.usage_snapshot()["failed_calls"] == 1

    with pytest.raises(LLMUnavailable) as caught:
        with_llm(config(server, max_attempts=3), scenario)

    # Then it tried exactly three times and the error is one the broker retries
    assert isinstance(caught.value, RetryableError)
    assert not isinstance(caught.value, PermanentFailure)
    assert caught.value.status == 503 and caught.value.code == "llm_unavailable"
    assert "upstream overloaded" in str(caught.value) and "3 attempts" in str(caught.value)
    assert len(server.chat_requests) == 3
    assert caught.value.to_result().retryable is True


def test_a_timeout_is_transient_and_not_waited_out_again(server: FakeLLMServer) -> None:
    # Given a reply slower than the client's timeout
    server.push(TextReply("too late", delay_s=3.0))

    # When the agent asks with a 0.3 s timeout
    started = time.monotonic()
    with pytest.raises(LLMUnavailable) as caught:
        with_llm(config(server, timeout_s=0.3), lambda llm: llm.chat(HELLO))

    # Then it fails as transient well before the reply would have come, after one request
    assert time.monotonic() - started < 2.5
    assert isinstance(caught.value, RetryableError) and caught.value.status is None
    assert "did not answer within 0.3 s" in str(caught.value)
    assert len(server.chat_requests) == 1


def test_no_server_is_a_transient_connection_failure() -> None:
    # Given a port nothing listens on (bound, then closed: free)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cfg = LLMConfig(base_url=f"http://127.0.0.1:{port}/v1", model="m", max_attempts=2,
                    backoff_s=0.01)

    with pytest.raises(LLMUnavailable) as caught:
        with_llm(cfg, lambda llm: llm.chat(HELLO))
    assert "cannot reach the LLM endpoint" in str(caught.value)
    assert "2 attempts" in str(caught.value)


def test_cancelling_the_call_aborts_the_http_request(server: FakeLLMServer) -> None:
    # Given a server that holds the reply
    server.push(HoldReply())

    async def scenario(llm: LLM) -> float:
        call = asyncio.ensure_future(llm.chat(HELLO))
        loop = asyncio.get_running_loop()
        # When the request reached the server and is held there
        held = await loop.run_in_executor(None, server.holding.wait, WAIT_S)
        assert held, "the request never reached the server"
        cancelled_at = time.monotonic()
        call.cancel()
        # Then the call ends with CancelledError at once
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(call, 1.0)
        return time.monotonic() - cancelled_at

    took_s = with_llm(config(server), scenario)
    assert took_s < 1.0
    # ...and the server sees its client go away while it still holds the reply
    assert server.disconnected.wait(WAIT_S)


# ------------------------------------------------------------------ secrets


def test_secrets_are_masked_before_they_are_sent(server: FakeLLMServer) -> None:
    code = ('DB_PASSWORD = "hunter2-very-secret"\n'
            'client = make(api_key="sk-proj-ABCDEFGHIJKLMNOPQRSTUV")\n'
            'aws = "AKIAIOSFODNN7EXAMPLE"\n'
            "token = lookup('internal-token-xyz')\n")

    async def scenario(llm: LLM) -> None:
        await llm.chat([{"role": "user", "content": f"review:\n{code}"}],
                       secrets=["internal-token-xyz"])

    with_llm(config(server), scenario)
    sent = server.chat_requests[0].body["messages"][0]["content"]
    for secret in ("hunter2-very-secret", "sk-proj-ABCDEFGHIJKLMNOPQRSTUV",
                   "AKIAIOSFODNN7EXAMPLE", "internal-token-xyz"):
        assert secret not in sent
    assert 'DB_PASSWORD = "***"' in sent and "lookup('***')" in sent


def test_mask_secrets_given_strings_and_patterns() -> None:
    key_block = ("-----BEGIN RSA PRIVATE KEY-----\nMIIEow\nAIBAAK\n"
                 "-----END RSA PRIVATE KEY-----")
    # Given strings: only those are masked, longest first
    assert mask_secrets("a=s3cr3t b=s3cr3t-long", ["s3cr3t", "s3cr3t-long"]) == "a=*** b=***"
    assert mask_secrets('password = "x1"', ["other"]) == 'password = "x1"'
    # No list: what looks like a secret is masked, names kept
    assert mask_secrets('password = "x1"') == 'password = "***"'
    assert mask_secrets("{'api_key': 'abc123'}") == "{'api_key': '***'}"
    assert mask_secrets(f"key:\n{key_block}\nend") == "key:\n***\nend"
    assert mask_secrets("id AKIAIOSFODNN7EXAMPLE") == "id ***"
    assert mask_secrets("nothing here = 'plain'") == "nothing here = 'plain'"
    # Both when asked
    assert mask_secrets('pwd = "a" and zz', ["zz"], patterns=True) == 'pwd = "***" and ***'


# ------------------------------------------------------------------ configuration


def test_from_env_is_none_without_a_base_url() -> None:
    assert LLM.from_env({}) is None
    assert LLM.from_env({"ORCH_LLM_BASE_URL": "  ", "ORCH_LLM_MODEL": "m"}) is None
    assert describe_endpoint({}) is None


def test_from_env_reads_every_setting() -> None:
    llm = LLM.from_env({"ORCH_LLM_BASE_URL": "http://127.0.0.1:8000/v1/",
                        "ORCH_LLM_MODEL": "qwen", "ORCH_LLM_API_KEY": "k",
                        "ORCH_LLM_TIMEOUT_S": "12.5", "ORCH_LLM_MAX_ATTEMPTS": "2",
                        "ORCH_LLM_BACKOFF_S": "0"})
    assert llm is not None
    assert llm.config == LLMConfig("http://127.0.0.1:8000/v1", "qwen", "k", 12.5, 2, 0.0)
    assert describe_endpoint({"ORCH_LLM_BASE_URL": "http://h:1/v1", "ORCH_LLM_MODEL": "q"}) \
        == "user code will be sent to http://h:1/v1 (model q)"
    with pytest.raises(ValueError, match="ORCH_LLM_TIMEOUT_S='soon' is not a number"):
        LLM.from_env({"ORCH_LLM_BASE_URL": "http://h:1/v1", "ORCH_LLM_TIMEOUT_S": "soon"})


def test_a_task_names_its_budget_or_none() -> None:
    # The state client is not touched to read the field: any object stands in.
    state: Any = object()
    assert TokenBudget.from_task(Task(data={"code": "x"}), state) is None
    budget = TokenBudget.from_task(
        Task(data=1, llm_budget={"scope": "run-7", "max_tokens": 500}), state)
    assert budget is not None and (budget.scope, budget.max_tokens) == ("run-7", 500)
    assert budget.key == "llm/budget/run-7"
    for bad in ({"scope": "", "max_tokens": 5}, {"scope": "s", "max_tokens": 0},
                {"scope": "s", "max_tokens": True}, ["s", 5]):
        with pytest.raises(InvalidBudget):
            TokenBudget.from_task(Task(data=1, llm_budget=bad), state)
    exceeded = BudgetExceeded("run-7", 510, 500)
    assert exceeded.code == "budget_exceeded" and isinstance(exceeded, PermanentFailure)
    assert "510 of 500" in str(exceeded)


def test_scripted_replies_read_from_json() -> None:
    assert reply_from_dict({"kind": "error", "status": 429, "retry_after": "1"}) == \
        ErrorReply(429, retry_after="1")
    assert reply_from_dict({"text": "hi", "prompt_tokens": 3}) == TextReply("hi", 3)
    with pytest.raises(ValueError, match="unknown reply kind"):
        reply_from_dict({"kind": "teapot"})


def test_the_fake_runs_as_a_process_scripted_over_http(tmp_path: Path) -> None:
    # Given the fake started as a process with a script file, on a free port
    script = tmp_path / "replies.json"
    script.write_text(json.dumps([{"kind": "text", "text": "from the file",
                                   "prompt_tokens": 4, "completion_tokens": 2}]))
    proc = python_process("-m", "tests.fakes.llm_server", "--port", "0",
                          "--script", str(script))
    try:
        url = read_json_line(proc)["url"]
        control = url.removesuffix("/v1") + "/_control"
        # When a test queues one more reply over HTTP and the LLM asks twice
        script_more = json.dumps([{"kind": "error", "status": 404, "body": {
            "error": {"message": "model 'nope' not found"}}}]).encode()
        with urllib.request.urlopen(urllib.request.Request(
                f"{control}/replies", data=script_more, method="POST"), timeout=WAIT_S) as queued:
            assert json.loads(queued.read()) == {"queued": 1}

        async def scenario(llm: LLM) -> str:
            reply = await llm.chat(HELLO)
            with pytest.raises(LLMRequestRejected, match="model 'nope' not found"):
                await llm.chat(HELLO)
            return reply.text

        cfg = LLMConfig(base_url=url, model="nope")
        assert with_llm(cfg, scenario) == "from the file"
        # Then the process recorded both requests
        with urllib.request.urlopen(f"{control}/requests", timeout=WAIT_S) as answer:
            recorded = json.loads(answer.read())
        assert [r["path"] for r in recorded] == ["/v1/chat/completions"] * 2
        assert recorded[0]["body"]["messages"] == HELLO
    finally:
        kill(proc)
