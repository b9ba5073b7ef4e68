"""Plans proposed by an LLM, when one is configured (``ORCH_LLM_BASE_URL``).

The rule-based planner (:mod:`workflows.planner`) stays in charge of every text that
works on files (it reads the client's tree, which never goes to a model) and is the
fallback for everything else: :class:`~workflows.planner.ProposingPlanner` asks the
model only for the texts that carry no files, validates the proposal against the
workflow schema and the capabilities online (:func:`~workflows.planner.validate_proposal`),
and falls back to the rules when the proposal is refused or the call fails.

The model is shown the capabilities online, the dict form of a workflow and one example,
and asked for one JSON object ``{"workflow", "input", "summary"}``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from typing import Any, Final

from workflows.planner import Planner, ProposingPlanner, RuleBasedPlanner

logger = logging.getLogger(__name__)

#: Tokens the model may spend on a plan.
PLAN_MAX_TOKENS: Final = 1500

SYSTEM_PROMPT: Final = """You turn a user's request into a workflow for a multi-agent \
system. Answer with ONE JSON object and nothing else:
{"workflow": WORKFLOW, "input": INPUT, "summary": "one line saying what the plan does"}
WORKFLOW is {"workflow": "name", "root": NODE} where NODE is one of:
- {"kind": "task", "name": "n", "capability": "CAP"}  (CAP from the list given)
- {"kind": "pipeline", "name": "n", "steps": [NODE, ...]}  (each step's output feeds the next)
- {"kind": "map_reduce", "name": "n", "mapper": NODE, "reducer": NODE, "max_parallel": 4}
  (INPUT must then be a list: the mapper runs on each item, the reducer on all results)
Use only capabilities from the list. Keep it small: the fewest steps that do the job."""

EXAMPLE: Final = {
    "workflow": {"workflow": "research", "root": {
        "kind": "map_reduce", "name": "research", "max_parallel": 4,
        "mapper": {"kind": "task", "name": "aspect", "capability": "search"},
        "reducer": {"kind": "task", "name": "synthesize", "capability": "synthesis"}}},
    "input": [{"query": "vector databases: overview"},
              {"query": "vector databases: trade-offs"}],
    "summary": "research on vector databases in 2 aspects, then a synthesis",
}

_FENCE: Final = re.compile(r"```(?:json)?\s*(.*?)```", re.S)


def parse_proposal(text: str) -> Any:
    """The JSON object of a model's reply (fenced or bare).

    Raises:
        ValueError: the reply holds no JSON object.
    """
    fenced = _FENCE.search(text)
    body = fenced.group(1) if fenced else text
    start, end = body.find("{"), body.rfind("}")
    if start < 0 or end <= start:
        raise ValueError("the model's reply holds no JSON object")
    try:
        return json.loads(body[start:end + 1])
    except json.JSONDecodeError as error:
        raise ValueError(f"the model's reply is not valid JSON: {error.msg}") from None


def make_planner() -> Planner:
    """The planner to use: the rule-based one, behind an LLM's proposals when an LLM is
    configured."""
    from agent_sdk.llm import LLMConfig

    if LLMConfig.from_env() is None:
        return RuleBasedPlanner()
    return ProposingPlanner(propose_with_llm)


def propose_with_llm(text: str, capabilities: tuple[str, ...]) -> Any:
    """Ask the configured LLM for a plan of ``text`` (blocking: the CLI plans before its
    loop runs).

    Raises:
        OSError: the LLM could not be reached or refused (its one-line reason).
        ValueError: the reply holds no JSON object.
    """
    return asyncio.run(_propose(text, capabilities))


async def _propose(text: str, capabilities: tuple[str, ...]) -> Any:
    from agent_sdk.llm import LLM, LLMError

    llm = LLM.from_env()
    if llm is None:
        raise OSError("no LLM is configured")
    offered = ", ".join(capabilities) or "(none online; use the common ones: search, "\
        "synthesis, code_review, security_audit, code_generation)"
    messages = [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": f"Capabilities online: {offered}\n\nExample answer for "
                                    f"'research vector databases':\n{json.dumps(EXAMPLE)}"
                                    f"\n\nRequest: {text}"},
    ]
    try:
        completion = await llm.chat(messages, max_tokens=PLAN_MAX_TOKENS)
    except LLMError as error:
        raise OSError(f"the LLM did not answer: {error}") from None
    finally:
        await llm.aclose()
    return parse_proposal(completion.text)
