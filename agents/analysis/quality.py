"""Code review: complexity, long functions, broad excepts, mutable defaults, unused names.

Cyclomatic complexity comes from radon used as a library (:func:`radon.complexity.
cc_visit_ast` over the tree the worker already parsed): radon is the standard McCabe
implementation for Python, so the numbers here are the numbers ``radon cc`` prints and
that people already know; writing our own visitor would only give a second, slightly
different count. The other checks are small AST visitors of our own, because each is a
few lines and none needs a tool's configuration.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from typing import Final

from radon.complexity import cc_visit_ast
from radon.visitors import Class, Function

from agents.analysis.source import FUNCTIONS, Rule, Source
from agents.findings import Category, Finding, Severity

#: Complexity above which a function is a medium, and a high, finding.
COMPLEXITY_MEDIUM: Final = 10
COMPLEXITY_HIGH: Final = 20
#: Lines above which a function is too long.
MAX_FUNCTION_LINES: Final = 80

_COMPLEX = Rule("R101", "high_cyclomatic_complexity", Severity.MEDIUM, Severity.HIGH,
                "Split the function: extract the branches into smaller functions or a table.")
_LONG = Rule("R102", "function_too_long", Severity.LOW, Severity.HIGH,
             "Split the function into steps with names.")
_BROAD = Rule("R103", "broad_except_swallows", Severity.MEDIUM, Severity.HIGH,
              "Catch the specific exceptions you expect, and log or re-raise the rest.")
_MUTABLE = Rule("R104", "mutable_default_argument", Severity.MEDIUM, Severity.HIGH,
                "Default to None and create the list/dict/set inside the function.")
_UNUSED_IMPORT = Rule("R105", "unused_import", Severity.LOW, Severity.MEDIUM,
                      "Remove the unused import.")
_UNUSED_LOCAL = Rule("R106", "unused_local_variable", Severity.LOW, Severity.MEDIUM,
                     "Remove the assignment, or use the value.")

_MUTABLE_CALLS: Final = frozenset({"list", "dict", "set", "defaultdict", "OrderedDict",
                                   "deque", "bytearray"})
_BROAD_NAMES: Final = frozenset({"Exception", "BaseException"})
_LOGGING_CALLS: Final = frozenset({"debug", "info", "warning", "warn", "error", "exception",
                                   "critical", "log"})


def check(source: Source) -> list[Finding]:
    """Every code review finding of ``source``."""
    out = list(_complexity(source))
    for node in ast.walk(source.tree):
        if isinstance(node, FUNCTIONS):
            out.extend(_function(source, node))
        elif isinstance(node, ast.ExceptHandler) and _swallows(node):
            caught = "except:" if node.type is None else f"except {ast.unparse(node.type)}:"
            out.append(source.finding(_BROAD, Category.REVIEW, node,
                                      f"{caught} swallows every error"))
    out.extend(_unused_imports(source))
    return out


def _complexity(source: Source) -> Iterator[Finding]:
    pending: list[Function | Class] = list(cc_visit_ast(source.tree))
    while pending:
        block = pending.pop()
        if isinstance(block, Class):
            pending.extend(block.methods)
            continue
        pending.extend(block.closures)
        if block.complexity <= COMPLEXITY_MEDIUM:
            continue
        severity = Severity.HIGH if block.complexity > COMPLEXITY_HIGH else Severity.MEDIUM
        name = block.fullname
        yield Finding(category=Category.REVIEW, rule=_COMPLEX.id, name=_COMPLEX.name,
                      message=f"{name} has cyclomatic complexity {block.complexity} "
                              f"(over {COMPLEXITY_MEDIUM})",
                      severity=severity, confidence=_COMPLEX.confidence, path=source.path,
                      line=block.lineno, end_line=block.endline, column=block.col_offset,
                      code=source.line(block.lineno), suggestion=_COMPLEX.suggestion,
                      more={"complexity": block.complexity, "function": name})


def _function(source: Source, node: ast.FunctionDef | ast.AsyncFunctionDef) -> Iterator[Finding]:
    length = (node.end_lineno or node.lineno) - node.lineno + 1
    if length > MAX_FUNCTION_LINES:
        yield source.finding(_LONG, Category.REVIEW, node,
                             f"{node.name} is {length} lines long (over "
                             f"{MAX_FUNCTION_LINES})", whole=True, more={"lines": length})
    args = node.args
    for default in [*args.defaults, *(d for d in args.kw_defaults if d is not None)]:
        if _is_mutable(default):
            yield source.finding(_MUTABLE, Category.REVIEW, default,
                                 f"{node.name} has a mutable default argument "
                                 f"{ast.unparse(default)}")
    yield from _unused_locals(source, node)


def _is_mutable(node: ast.expr) -> bool:
    if isinstance(node, (ast.List, ast.Dict, ast.Set, ast.ListComp, ast.DictComp, ast.SetComp)):
        return True
    if isinstance(node, ast.Call):
        func = node.func
        name = func.id if isinstance(func, ast.Name) else \
            func.attr if isinstance(func, ast.Attribute) else ""
        return name in _MUTABLE_CALLS
    return False


def _swallows(handler: ast.ExceptHandler) -> bool:
    """A bare or ``Exception`` handler that neither raises, nor logs, nor reads the error:
    the error is gone without a trace."""
    caught = handler.type
    names = caught.elts if isinstance(caught, ast.Tuple) else [caught]
    broad = caught is None or any(isinstance(n, ast.Name) and n.id in _BROAD_NAMES
                                  for n in names)
    if not broad:
        return False
    for node in (n for stmt in handler.body for n in ast.walk(stmt)):
        if isinstance(node, ast.Raise):
            return False
        if isinstance(node, ast.Name) and node.id == handler.name:
            return False  # the error is kept, reported or wrapped
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                node.func.attr in _LOGGING_CALLS:
            return False
    return True


def _unused_imports(source: Source) -> Iterator[Finding]:
    if source.path.rsplit("/", 1)[-1] == "__init__.py":
        return  # a package's __init__ imports to re-export
    imported: dict[str, ast.stmt] = {}
    for stmt in source.tree.body:
        if isinstance(stmt, ast.Import):
            for alias in stmt.names:
                imported[alias.asname or alias.name.split(".")[0]] = stmt
        elif isinstance(stmt, ast.ImportFrom) and stmt.module != "__future__":
            for alias in stmt.names:
                if alias.name != "*":
                    imported[alias.asname or alias.name] = stmt
    if not imported:
        return
    used: set[str] = set()
    for node in ast.walk(source.tree):
        if isinstance(node, ast.Name):
            used.add(node.id)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            # Names in __all__ and in string annotations count as used.
            used.update(part for part in _words(node.value))
    for name, stmt in imported.items():
        if name not in used:
            yield source.finding(_UNUSED_IMPORT, Category.REVIEW, stmt,
                                 f"{name} is imported but never used", more={"name": name})


def _words(text: str) -> Iterator[str]:
    if len(text) > 200:
        return
    word = []
    for char in text:
        if char.isalnum() or char == "_":
            word.append(char)
        elif word:
            yield "".join(word)
            word = []
    if word:
        yield "".join(word)


def _unused_locals(source: Source,
                   func: ast.FunctionDef | ast.AsyncFunctionDef) -> Iterator[Finding]:
    stored: dict[str, ast.AST] = {}
    loaded: set[str] = set()
    declared: set[str] = set()
    for node in ast.walk(func):
        if isinstance(node, (ast.Global, ast.Nonlocal)):
            declared.update(node.names)
        elif isinstance(node, ast.Name):
            if isinstance(node.ctx, ast.Load):
                loaded.add(node.id)
            elif node.id not in stored:
                stored[node.id] = node
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                node.func.id in ("locals", "vars"):
            return  # the locals are read as a dict
    simple = _simple_targets(func)
    for name, node in stored.items():
        if name in loaded or name in declared or name.startswith("_") or name not in simple:
            continue
        yield source.finding(_UNUSED_LOCAL, Category.REVIEW, node,
                             f"local variable {name} in {func.name} is assigned but never used",
                             more={"name": name})


def _simple_targets(func: ast.FunctionDef | ast.AsyncFunctionDef) -> set[str]:
    """Names bound by a plain ``name = value`` or ``name: T = value`` of the function's
    own body (unpacking, loop targets and nested functions' names are left alone)."""
    names: set[str] = set()
    pending: list[ast.AST] = list(func.body)
    while pending:
        node = pending.pop()
        if isinstance(node, (*FUNCTIONS, ast.ClassDef, ast.Lambda)):
            continue
        if isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and node.value is not None and \
                isinstance(node.target, ast.Name):
            names.add(node.target.id)
        pending.extend(ast.iter_child_nodes(node))
    return names
