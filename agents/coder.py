"""The coder agent: runs a project's tests, fixes its style, and writes code with an LLM.

Capabilities, decided when the agent is built (an agent never advertises what it cannot
serve):

- ``refactoring``, always: a formatter's and linter's fixes (``ruff check --fix`` and
  ``ruff format``, or the standard-library fixer of :mod:`agents.coding.fixer` when ruff
  is not installed) applied to a throwaway copy of the carried files, returned as a
  unified diff that applies with ``git apply`` and ``patch -p1``;
- ``debugging``, only when commands are allowed (``ORCH_ALLOW_COMMANDS=1``, which
  ``orchestrator start --allow-commands`` sets, or ``allow_commands=True``): runs the
  project's tests (pytest, else unittest, or the task's own ``command``) on a throwaway
  copy, with time and memory limits and no network, and returns the failures (test,
  file, line, assertion) read from pytest's JUnit report or unittest's output;
- ``code_generation``, only when an LLM is configured (``ORCH_LLM_BASE_URL``, see
  :mod:`agent_sdk.llm`): code, tests and documentation for a specification, using the
  summary of an earlier research step when the input carries one.

Inputs and outputs (``Result.data``; a later pipeline step reads only that):

- debugging ``{"files", "request"?, "command"?: [argv], "time_limit_s"?}`` ->
  ``{"kind": "test_run", "command", "runner", "outcome", "timed_out", "exit_code",
  "passed", "failed", "errors", "skipped", "failures": [{"test", "file", "line",
  "assertion", "message", "kind"}], "output_tail", "request"}``; ``outcome`` is
  ``passed``, ``failed``, ``no_tests``, ``timed_out``, ``memory_limit`` or ``error``,
  and ``assertion`` holds the failing statement then pytest's explanation
  (``assert mul(3, 1) == 3`` / ``assert 4 == 3``);
- refactoring ``{"files", "tool"?: "ruff"|"builtin"}`` -> ``{"kind": "patch", "diff",
  "files": [{"path", "changed", "detail"}], "tool", "changed"}``;
- code_generation ``{"specification", "language", ...research output}`` ->
  ``{"kind": "code", "specification", "language", "code", "tests", "documentation",
  "files": [{"path", "content"}], "citations", "model", "usage", "truncated"}``.

Every tool runs through :mod:`agents.sandbox`: a child process in its own session, with
memory and CPU limits and no network, on a copy that is deleted afterwards. Cancelling a
task kills its command's whole process group at once.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

from agent_sdk import BaseAgent, Result, Task
from agents.coding import codegen, refactor, testrun
from agents.coding.inputs import BadInput, payload, source_files, string_list
from agents.sandbox import DEFAULT_MEMORY_MB, Limits, privilege_note

if TYPE_CHECKING:
    from agent_sdk.llm import LLM

logger = logging.getLogger(__name__)

REFACTORING: Final = "refactoring"
DEBUGGING: Final = "debugging"
CODE_GENERATION: Final = "code_generation"
#: Environment switches (set per agent process).
ALLOW_COMMANDS_ENV: Final = "ORCH_ALLOW_COMMANDS"
TOOL_ENV: Final = "ORCH_CODER_TOOL"
TEST_RUNNER_ENV: Final = "ORCH_CODER_TEST_RUNNER"
MEMORY_ENV: Final = "ORCH_CODER_MEMORY_MB"
#: Longest a test command may run (a task's own deadline, or ``time_limit_s``, may cut it
#: shorter), and a formatter.
TEST_TIME_LIMIT_S: Final = 300.0
REFACTOR_TIME_LIMIT_S: Final = 60.0
#: Kept from a task's deadline for reporting the outcome after the command is killed.
DEADLINE_MARGIN_S: Final = 2.0
#: Shortest time limit a command is given (a task nearly out of time still tries).
MIN_TIME_LIMIT_S: Final = 1.0
#: Most tokens the model may write for one code generation (a task's ``max_tokens`` may
#: ask for fewer).
CODEGEN_MAX_TOKENS: Final = 4096
#: Tasks run at once: test commands are heavy, and each has its own memory limit.
DEFAULT_MAX_CONCURRENT: Final = 4



class _FromEnv(enum.Enum):
    """Marks "not given: read the environment" (None is a valid value: no LLM)."""

    TOKEN = "from-env"


_FROM_ENV: Final = _FromEnv.TOKEN


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a whole number") from None


def _load_llm() -> LLM | None:
    """The LLM the environment configures, or None (also when the backend module is
    not installed with this agent)."""
    try:
        from agent_sdk.llm import LLM
    except ImportError:
        return None
    return LLM.from_env()


class CoderAgent(BaseAgent):
    """Debugging, refactoring and code generation (see the module's text).

    Args:
        allow_commands: serve ``debugging`` (runs the tasks' test commands); default:
            the ``ORCH_ALLOW_COMMANDS`` environment variable.
        llm: the LLM for ``code_generation``; default: :meth:`LLM.from_env`; None: off.
        refactor_tool: ``ruff``, ``builtin`` or ``auto`` (ruff when installed); default:
            ``ORCH_CODER_TOOL``, else auto.
        test_runner: ``pytest``, ``unittest`` or ``auto`` (pytest when importable);
            default: ``ORCH_CODER_TEST_RUNNER``, else auto.
        memory_mb: address-space limit of every command; default ``ORCH_CODER_MEMORY_MB``,
            else :data:`agents.sandbox.DEFAULT_MEMORY_MB`.
        max_concurrent: tasks run at once.

    Raises:
        ValueError: an unknown tool or runner, or ruff asked for and not installed.
    """

    def __init__(self, *, allow_commands: bool | None = None,
                 llm: LLM | None | _FromEnv = _FROM_ENV, refactor_tool: str | None = None,
                 test_runner: str | None = None, memory_mb: int | None = None,
                 max_concurrent: int = DEFAULT_MAX_CONCURRENT) -> None:
        self.allow_commands = _env_flag(ALLOW_COMMANDS_ENV) if allow_commands is None \
            else allow_commands
        self.llm: LLM | None = _load_llm() if isinstance(llm, _FromEnv) else llm
        try:
            self.refactor_tool = refactor.pick_tool(refactor_tool or os.environ.get(TOOL_ENV))
        except refactor.ToolUnavailable as e:
            raise ValueError(str(e)) from None
        runner = (test_runner or os.environ.get(TEST_RUNNER_ENV, "") or "auto").strip().lower()
        if runner not in ("auto", testrun.PYTEST, testrun.UNITTEST):
            raise ValueError(f"unknown test runner {runner!r}: use pytest, unittest or auto")
        self.test_runner = testrun.default_runner() if runner == "auto" else runner
        self.memory_mb = memory_mb if memory_mb is not None else _env_int(MEMORY_ENV,
                                                                            DEFAULT_MEMORY_MB)
        super().__init__(name="coder", capabilities=self.servable(),
                         max_concurrent=max_concurrent)
        if self.llm is not None:
            self.llm.attach(self)

    async def on_start(self) -> None:
        """Say once, in the log, when tools keep root (see :func:`privilege_note`)."""
        note = privilege_note()
        if note is not None:
            logger.warning("coder: %s", note)

    async def on_stop(self) -> None:
        """Close the LLM client (publishing its last usage)."""
        if self.llm is not None:
            await self.llm.aclose()

    # ------------------------------------------------------------------ routing

    def servable(self) -> tuple[str, ...]:
        """What this agent can serve (its advertised capabilities, unless a command line
        overrode them: a task is still refused what the agent cannot do)."""
        served = [REFACTORING]
        if self.allow_commands:
            served.append(DEBUGGING)
        if self.llm is not None:
            served.append(CODE_GENERATION)
        return tuple(served)

    def capability_for(self, task: Task, data: Mapping[str, Any]) -> str:
        """The capability a task asks for: the first of the coder's it names; when it
        names none (sent to the agent by name), guessed from its input."""
        for capability in task.capabilities:
            if capability in (REFACTORING, DEBUGGING, CODE_GENERATION):
                return capability
        if "specification" in data:
            return CODE_GENERATION
        if "command" in data or "request" in data:
            return DEBUGGING
        return REFACTORING

    async def execute(self, task: Task) -> Result:
        """Route the task by the capability it asks for; bad input fails for good."""
        data = payload(task)
        capability = self.capability_for(task, data)
        if capability not in self.servable():
            why = {DEBUGGING: f"commands are not allowed on this agent (start it with "
                              f"{ALLOW_COMMANDS_ENV}=1)",
                   CODE_GENERATION: "no LLM is configured (set ORCH_LLM_BASE_URL)"}
            return Result.failure("unsupported", f"{capability}: {why.get(capability, '')}",
                                  retryable=False)
        try:
            if capability == DEBUGGING:
                return await self.debugging(task, data)
            if capability == CODE_GENERATION:
                return await self.code_generation(task, data)
            return await self.refactoring(task, data)
        except BadInput as e:
            return Result.failure("bad_request", str(e), retryable=False)

    # ------------------------------------------------------------------ capabilities

    def limits_for(self, task: Task, data: Mapping[str, Any], ceiling_s: float) -> Limits:
        """The limits of a task's commands: ``ceiling_s`` cut by the task's
        ``time_limit_s`` and by the time left before its deadline."""
        time_limit_s = ceiling_s
        asked = data.get("time_limit_s")
        if isinstance(asked, (int, float)) and not isinstance(asked, bool) and asked > 0:
            time_limit_s = min(time_limit_s, float(asked))
        if task.timeout_s is not None:
            time_limit_s = min(time_limit_s, task.timeout_s - DEADLINE_MARGIN_S)
        return Limits(memory_mb=self.memory_mb,
                      timeout_s=max(time_limit_s, MIN_TIME_LIMIT_S), network=False)

    async def debugging(self, task: Task, data: Mapping[str, Any]) -> Result:
        """Run the project's tests on a throwaway copy; report what failed."""
        files = source_files(data)
        command = string_list(data, "command")
        limits = self.limits_for(task, data, TEST_TIME_LIMIT_S)
        try:
            report = await testrun.run_tests(files, command, runner=self.test_runner,
                                             limits=limits)
        except FileNotFoundError as e:
            return Result.failure("command_not_found",
                                  f"the test command's program does not exist: {e.filename}",
                                  retryable=False)
        out = report.to_data()
        out["request"] = data.get("request")
        logger.info("coder: task %s ran %s: %s (%d failed, %d errors)", task.id,
                    report.runner, report.outcome, report.counts.failed, report.counts.errors)
        return Result(data=out, passed=report.outcome == "passed",
                      confidence=1.0 if report.outcome in ("passed", "failed") else 0.5)

    async def refactoring(self, task: Task, data: Mapping[str, Any]) -> Result:
        """Apply the fixes on a throwaway copy; return the diff (the input is untouched)."""
        files = source_files(data)
        tool = self.refactor_tool
        asked = data.get("tool")
        if isinstance(asked, str) and asked:
            try:
                tool = refactor.pick_tool(asked)
            except (refactor.ToolUnavailable, ValueError) as e:
                raise BadInput(str(e)) from None
        patch = await refactor.refactor(files, tool=tool,
                                        limits=self.limits_for(task, data,
                                                               REFACTOR_TIME_LIMIT_S))
        return Result(data=patch.to_data())

    async def code_generation(self, task: Task, data: Mapping[str, Any]) -> Result:
        """Ask the LLM for code, tests and documentation for the specification."""
        from agent_sdk.llm import LLMError, TokenBudget

        llm = self.llm
        assert llm is not None  # execute routes here only when code_generation is served
        specification = str(data.get("specification") or "").strip()
        if not specification:
            raise BadInput("code_generation needs a 'specification' (what to build)")
        language = codegen.normalize_language(data.get("language"))
        max_tokens = CODEGEN_MAX_TOKENS
        asked = data.get("max_tokens")
        if isinstance(asked, int) and not isinstance(asked, bool) and asked > 0:
            max_tokens = min(max_tokens, asked)
        # The SDK runs execute eagerly up to its first suspension, outside any asyncio
        # Task, and the HTTP client (httpx, through sniffio) refuses to start there: one
        # yield to the loop moves this execution into its Task first.
        await asyncio.sleep(0)
        try:
            budget = TokenBudget.from_task(task, self.state)
            completion = await llm.chat(codegen.build_messages(data), max_tokens=max_tokens,
                                        budget=budget)
        except LLMError as error:
            # As a result, not raised: the client sees the error's own code
            # (budget_exceeded, llm_unavailable), with the same retry decision.
            return error.to_result()
        finally:
            await llm.publish_usage()
        try:
            generated = codegen.parse_reply(completion.text, language)
        except codegen.UnusableReply as e:
            return Result.failure("llm_reply_unusable", str(e))
        code, tests, docs = (generated.text_of(role)
                             for role in ("code", "tests", "documentation"))
        out = {"kind": "code", "specification": specification, "language": language,
               "code": code, "tests": tests, "documentation": docs,
               "files": [{"path": f.path, "content": f.content} for f in generated.files],
               "citations": data.get("citations") or [],
               "model": completion.model,
               "usage": {"prompt_tokens": completion.prompt_tokens,
                         "completion_tokens": completion.completion_tokens},
               "truncated": generated.truncated or completion.finish_reason == "length"}
        return Result(data=out, code=code, tests=tests, documentation=docs,
                      confidence=0.5 if out["truncated"] else 0.8)


__all__ = ["CODE_GENERATION", "DEBUGGING", "REFACTORING", "CoderAgent"]
