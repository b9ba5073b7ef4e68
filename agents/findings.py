"""A finding: one problem an analysis found at a place in a file.

The one record every built-in agent speaks: the reviewer produces findings (from bandit,
from its own AST checks), the synthesizer merges, ranks and reports them (Markdown, JSON,
SARIF), and the CLI prints them. They cross the broker as plain dicts
(:meth:`Finding.to_dict` / :meth:`Finding.from_dict`), never pickled.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final, Mapping


class Severity(StrEnum):
    """How bad a finding is, in order. Bandit's LOW/MEDIUM/HIGH map onto the same names."""

    INFO = "info"
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"
    CRITICAL = "critical"

    @property
    def rank(self) -> int:
        """0 for info up to 4 for critical: compare severities by rank."""
        return _RANKS[self]

    @classmethod
    def parse(cls, text: str) -> Severity:
        """A severity from its name, any case (``"HIGH"``, ``"high"``).

        Raises:
            ValueError: naming the severities there are.
        """
        try:
            return cls(text.strip().lower())
        except ValueError:
            raise ValueError(f"unknown severity {text!r}; one of: "
                             f"{', '.join(s.value for s in cls)}") from None


_RANKS: Final = {s: i for i, s in enumerate(Severity)}


class Category(StrEnum):
    """What kind of analysis found it (and which capability asked for it)."""

    SECURITY = "security"
    REVIEW = "review"
    PERFORMANCE = "performance"
    ANALYSIS = "analysis"  # the analysis itself could not run: a file not parsed, a limit hit


@dataclass(frozen=True, slots=True)
class Finding:
    """One problem at one place.

    Attributes:
        category: which analysis found it.
        rule: a stable id (bandit's test id ``B602``, or ours: ``R101``, ``P101``...).
        name: the rule's short name (``subprocess_popen_with_shell_equals_true``).
        message: what is wrong, one sentence.
        severity: how bad it is.
        confidence: how sure the analysis is (``low``, ``medium``, ``high``).
        path: the file, relative, with ``/`` separators, as the task carried it.
        line: 1-based line of the problem.
        end_line: last line of the construct (``line`` when one line).
        column: 0-based column, when known.
        code: the offending line, stripped.
        cwe: the CWE id, when the rule has one.
        tool: what produced it (``bandit``, ``orchestrator``).
        suggestion: how to fix it, when there is a standard fix.
        more: extra fields of a rule (a function's complexity, say).
    """

    category: Category
    rule: str
    name: str
    message: str
    severity: Severity
    confidence: Severity
    path: str
    line: int
    end_line: int = 0
    column: int = 0
    code: str = ""
    cwe: int | None = None
    tool: str = "orchestrator"
    suggestion: str = ""
    more: Mapping[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, int, str]:
        """What makes two findings the same problem: file, line and rule."""
        return (self.path, self.line, self.rule)

    def to_dict(self) -> dict[str, Any]:
        """The form a result carries (JSON and msgpack friendly)."""
        out: dict[str, Any] = {
            "category": self.category.value, "rule": self.rule, "name": self.name,
            "message": self.message, "severity": self.severity.value,
            "confidence": self.confidence.value, "path": self.path, "line": self.line,
            "end_line": self.end_line or self.line, "column": self.column, "code": self.code,
            "cwe": self.cwe, "tool": self.tool, "suggestion": self.suggestion,
        }
        if self.more:
            out["more"] = dict(self.more)
        return out

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Finding:
        """A finding from :meth:`to_dict`'s form.

        Raises:
            ValueError: a field is missing or of the wrong kind (the message names it).
        """
        try:
            cwe = raw.get("cwe")
            return cls(
                category=Category(str(raw.get("category", Category.ANALYSIS.value))),
                rule=str(raw["rule"]), name=str(raw.get("name", raw["rule"])),
                message=str(raw.get("message", "")),
                severity=Severity.parse(str(raw.get("severity", "low"))),
                confidence=Severity.parse(str(raw.get("confidence", "medium"))),
                path=str(raw["path"]), line=int(raw.get("line", 0)),
                end_line=int(raw.get("end_line") or raw.get("line", 0)),
                column=int(raw.get("column", 0)), code=str(raw.get("code", "")),
                cwe=None if cwe in (None, "") else int(cwe), tool=str(raw.get("tool", "")),
                suggestion=str(raw.get("suggestion", "")), more=dict(raw.get("more") or {}),
            )
        except KeyError as missing:
            raise ValueError(f"a finding lacks the field {missing.args[0]!r}") from None
        except (TypeError, ValueError) as error:
            raise ValueError(f"a finding has a bad field: {error}") from None


def at_least(findings: list[Finding], severity: Severity) -> list[Finding]:
    """The findings of ``severity`` or worse."""
    return [f for f in findings if f.severity.rank >= severity.rank]


def ranked(findings: list[Finding]) -> list[Finding]:
    """Worst first, then by confidence, then by place (a stable, readable order)."""
    return sorted(findings, key=lambda f: (-f.severity.rank, -f.confidence.rank, f.path,
                                           f.line, f.rule))
