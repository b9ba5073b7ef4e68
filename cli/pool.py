"""Which agents ``orchestrator start`` and ``orchestrator run`` launch: the default pool of
built-in agents, adjusted or replaced by ``--agents``.

- With no ``--agents``: reviewer x2, researcher, coder and synthesizer, each a process.
- Bare built-in names adjust that pool: ``--agents reviewer=4,coder=0``.
- A ``module:Class[=N]`` spec replaces it (the built-ins named beside it still start):
  ``--agents my_agents:Translator=3`` starts only three translators.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import click

#: Most processes of one agent class a start launches.
MAX_REPLICAS: Final = 1024


@dataclass(frozen=True, slots=True)
class BuiltIn:
    """A built-in agent: its class and how many processes the default pool runs."""

    spec: str
    default: int
    capabilities: tuple[str, ...]


#: The built-in agents by the name `--agents` knows them by, in launch order.
BUILT_INS: Final[dict[str, BuiltIn]] = {
    "reviewer": BuiltIn("agents.reviewer:ReviewerAgent", 2,
                        ("code_review", "security_audit", "performance_analysis")),
    "researcher": BuiltIn("agents.researcher:ResearcherAgent", 1,
                          ("search", "document_analysis", "summarization")),
    "coder": BuiltIn("agents.coder:CoderAgent", 1,
                     ("refactoring", "debugging", "code_generation")),
    "synthesizer": BuiltIn("agents.synthesizer:SynthesizerAgent", 1,
                           ("synthesis", "aggregation")),
}


_BUILT_IN_SPECS: Final = frozenset(b.spec for b in BUILT_INS.values())


def default_pool() -> list[tuple[str, int]]:
    """The pool a start launches with no ``--agents``."""
    return [(b.spec, b.default) for b in BUILT_INS.values()]


def parse_agents(spec: str) -> list[tuple[str, int]]:
    """Resolve ``--agents`` into (``module:Class``, N) pairs, N > 0 (see the module doc).

    Raises:
        click.BadParameter: a part is neither a built-in name with an optional ``=N``
            (0 allowed) nor ``module:Class`` with an optional ``=N``.
    """
    counts = {name: b.default for name, b in BUILT_INS.items()}
    named: dict[str, int] = {}
    custom: list[tuple[str, int]] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, has_count, count_text = part.partition("=")
        name = name.strip()
        builtin = BUILT_INS.get(name)
        low = 0 if builtin is not None else 1
        if has_count and not (count_text.isascii() and count_text.isdigit()
                              and low <= int(count_text) <= MAX_REPLICAS):
            raise click.BadParameter(f"{part!r}: N must be a whole number from {low} to "
                                     f"{MAX_REPLICAS}", param_hint="--agents")
        if builtin is not None:
            named[name] = int(count_text) if has_count else builtin.default
            continue
        module, _, cls = name.partition(":")
        if not (module and cls and name.isprintable()):
            raise click.BadParameter(
                f"{part!r} is neither a built-in agent ({', '.join(BUILT_INS)}) nor "
                "module:Class", param_hint="--agents")
        custom.append((name, int(count_text) if has_count else 1))
    if custom:
        chosen = [(BUILT_INS[name].spec, n) for name, n in named.items()] + custom
    else:
        counts.update(named)
        chosen = [(BUILT_INS[name].spec, n) for name, n in counts.items()]
    return [(spec_, n) for spec_, n in chosen if n > 0]


def builtins_for(capabilities: set[str] | frozenset[str]) -> list[tuple[str, int]]:
    """The built-in agents that serve ``capabilities``, with their default counts (for
    ``run``, which starts only what its plan needs)."""
    return [(b.spec, b.default) for b in BUILT_INS.values()
            if capabilities & set(b.capabilities)]


class AgentSpecs(click.ParamType):
    """``--agents``: checked while the command line is parsed (see :func:`parse_agents`)."""

    name = "NAME=N|module:Class[=N],..."

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> str:
        try:
            agents = parse_agents(str(value))
        except click.BadParameter as e:
            self.fail(e.format_message(), param, ctx)
        # A module:Class that cannot be imported fails here, before anything starts
        # (its processes would only crash until their supervisor gives up).
        for spec, _ in agents:
            if spec not in _BUILT_IN_SPECS:
                try:
                    check_importable(spec)
                except ValueError as e:
                    self.fail(str(e), param, ctx)
        return str(value)


def check_importable(spec: str) -> None:
    """Import ``module:Class`` as the agent processes will (``python -m agent_sdk run``
    from this working directory, which puts it on their path), and check it is an agent.

    Raises:
        ValueError: it cannot be imported, or is not a BaseAgent subclass (the message
            says which).
    """
    import os
    import sys

    from agent_sdk.__main__ import load_agent_class

    here = os.getcwd()
    added = here not in sys.path
    if added:
        sys.path.insert(0, here)
    try:
        load_agent_class(spec)
    finally:
        if added:
            sys.path.remove(here)


def say_llm_endpoint() -> None:
    """Say once, on stderr, which LLM endpoint will receive user code (when one is
    configured), before any agent sends it anything."""
    from agent_sdk.llm import describe_endpoint

    line = describe_endpoint()
    if line:
        click.echo(f"note: {line}", err=True)
