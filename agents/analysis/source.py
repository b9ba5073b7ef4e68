"""One parsed file as every check sees it, and the name resolution the checks share.

A file is parsed once per analysis (bandit's visitor walks the same tree), and each
check gets the tree, its lines (for the offending line of a finding) and its carried
relative path.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from agents.findings import Category, Finding, Severity


@dataclass(frozen=True, slots=True)
class Rule:
    """What a check reports: id, name, severity, and the standard fix.

    Attributes:
        id: stable rule id (``S101``, ``R101``, ``P101``).
        name: short snake_case name.
        severity: how bad a hit is.
        confidence: how sure the check is.
        suggestion: one line: how to fix it.
        cwe: the CWE id, for security rules.
    """

    id: str
    name: str
    severity: Severity
    confidence: Severity
    suggestion: str
    cwe: int | None = None


@dataclass(slots=True)
class Source:
    """A parsed Python file.

    Attributes:
        path: the carried relative path (what findings name).
        tree: its module AST.
        lines: its text, split in lines (line ``n`` is ``lines[n - 1]``).
        text: its text.
    """

    path: str
    tree: ast.Module
    lines: list[str] = field(default_factory=list)
    text: str = ""

    def line(self, number: int) -> str:
        """Line ``number`` (1-based), stripped; empty when out of range."""
        if 1 <= number <= len(self.lines):
            return self.lines[number - 1].strip()
        return ""

    def finding(self, rule: Rule, category: Category, node: ast.AST, message: str, *,
                whole: bool = False, more: Mapping[str, Any] | None = None) -> Finding:
        """A finding of ``rule`` at ``node``; ``whole`` spans the node's lines (a function,
        so that a change touching any of its lines keeps the finding)."""
        line = getattr(node, "lineno", 1)
        end = getattr(node, "end_lineno", None) or line
        return Finding(category=category, rule=rule.id, name=rule.name, message=message,
                       severity=rule.severity, confidence=rule.confidence, path=self.path,
                       line=line, end_line=end if whole else line,
                       column=getattr(node, "col_offset", 0), code=self.line(line),
                       cwe=rule.cwe, tool="orchestrator", suggestion=rule.suggestion,
                       more=dict(more or {}))


#: Builtins reached through their module: ``builtins.eval`` is ``eval``.
_BUILTIN_MODULES = ("builtins.", "__builtins__.")


class Resolver:
    """Qualified names of expressions: ``sp.run`` -> ``subprocess.run``.

    Flow-insensitive on purpose (a checker, not an interpreter): every import of the file
    and every plain assignment of a reference (``runner = subprocess.run``,
    ``h = getattr(hashlib, "md5")``) counts wherever it is. :meth:`qualname` also says
    whether it went through such a variable or ``getattr``, the forms bandit does not
    follow.
    """

    def __init__(self, tree: ast.Module, nodes: list[ast.AST] | None = None) -> None:
        """Args: tree: the module; nodes: ``list(ast.walk(tree))`` when the caller has it
        (one walk of a big file is most of this class's cost)."""
        self.imports: dict[str, str] = {}
        self.refs: dict[str, str] = {}
        assigns: list[tuple[str, ast.expr]] = []
        for node in nodes if nodes is not None else ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.asname:
                        self.imports[alias.asname] = alias.name
                    else:
                        top = alias.name.split(".")[0]
                        self.imports[top] = top
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                for alias in node.names:
                    self.imports[alias.asname or alias.name] = f"{node.module}.{alias.name}"
            elif isinstance(node, ast.Assign) and len(node.targets) == 1:
                target = dotted(node.targets[0])
                if target is not None and isinstance(node.value, (ast.Name, ast.Attribute,
                                                                  ast.Call)):
                    assigns.append((target, node.value))
        # Two rounds follow a chain of two variables (a = os.system; b = a).
        for _ in range(2):
            for target, value in assigns:
                resolved = self.qualname(value)
                if resolved is not None and ("." in resolved[0]
                                             or resolved[0] in _DANGEROUS_BUILTINS):
                    self.refs[target] = resolved[0]

    def qualname(self, node: ast.expr) -> tuple[str, bool] | None:
        """``(qualified name, indirect)`` of ``node``, or None when it names nothing known.

        ``indirect`` is true when a variable or ``getattr`` was followed.
        """
        if isinstance(node, ast.Name):
            if node.id in self.refs:
                return self.refs[node.id], True
            return self.imports.get(node.id, node.id), False
        if isinstance(node, ast.Attribute):
            full = dotted(node)
            if full is not None and full in self.refs:
                return self.refs[full], True
            base = self.qualname(node.value)
            if base is None:
                return None
            return _canonical(f"{base[0]}.{node.attr}"), base[1] or base[0] in (
                "builtins", "__builtins__")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                node.func.id == "getattr" and len(node.args) >= 2 and \
                isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str):
            base = self.qualname(node.args[0])
            if base is None:
                return None
            return _canonical(f"{base[0]}.{node.args[1].value}"), True
        return None


#: Builtins whose aliasing matters to the security checks.
_DANGEROUS_BUILTINS = frozenset({"eval", "exec", "compile", "__import__"})


def _canonical(name: str) -> str:
    for prefix in _BUILTIN_MODULES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def dotted(node: ast.AST) -> str | None:
    """``a.b.c`` for a chain of names, else None."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(node.id)
    return ".".join(reversed(parts))


def keyword(call: ast.Call, name: str) -> ast.expr | None:
    """The value of keyword argument ``name`` of ``call``, or None."""
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value
    return None


def is_true(node: ast.expr | None) -> bool:
    """Whether ``node`` is a constant that is true (``shell=True``, ``shell=1``)."""
    return isinstance(node, ast.Constant) and bool(node.value)


FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef)
LOOPS = (ast.For, ast.AsyncFor, ast.While)
