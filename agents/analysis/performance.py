"""Performance analysis from the AST: work a loop repeats or makes quadratic.

- P101: a string grown in a loop (``s += part``, ``s = s + part``): each step copies the
  whole string, so the loop is quadratic;
- P102: a list grown by concatenation in a loop (``lst = lst + [x]``): likewise;
- P103: ``re.compile`` of a loop-invariant pattern inside a loop;
- P104: ``x in some_list`` inside a loop (a linear scan each time);
- P105: ``x in d.keys()`` (builds a view to test what ``x in d`` tests directly);
- P106: sorting a loop-invariant sequence inside a loop;
- P107: ``lst.insert(0, x)`` / ``lst.pop(0)`` in a loop (each shifts the whole list).

"Loop-invariant" means the expression reads no name the loop assigns (its targets and
every name stored in its body): cheap to decide, and it never flags a compile whose
pattern changes per iteration.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

from agents.analysis.source import FUNCTIONS, LOOPS, Resolver, Rule, Source
from agents.findings import Category, Finding, Severity

_STRING_BUILD = Rule("P101", "quadratic_string_build", Severity.MEDIUM, Severity.MEDIUM,
                     "Collect the parts in a list and ''.join() them once after the loop.")
_LIST_BUILD = Rule("P102", "quadratic_list_build", Severity.MEDIUM, Severity.HIGH,
                   "Use lst.append(x) or lst.extend(items) instead of lst = lst + [...].")
_COMPILE = Rule("P103", "regex_compiled_in_loop", Severity.LOW, Severity.HIGH,
                "Compile the pattern once, before the loop (or at module level).")
_LIST_MEMBER = Rule("P104", "membership_in_list_in_loop", Severity.LOW, Severity.MEDIUM,
                    "Build a set once before the loop and test membership in it.")
_KEYS_MEMBER = Rule("P105", "membership_in_dict_keys", Severity.LOW, Severity.HIGH,
                    "Test `key in mapping` directly, without .keys().")
_SORT = Rule("P106", "sort_in_loop", Severity.LOW, Severity.MEDIUM,
             "Sort once before the loop, or keep the data in a heap or bisect-ed list.")
_SHIFT = Rule("P107", "list_shift_in_loop", Severity.LOW, Severity.HIGH,
              "Use collections.deque (appendleft/popleft) instead of insert(0)/pop(0).")

_STR_FUNCS: Final = frozenset({"str", "repr", "format", "chr", "hex", "oct", "bin"})
_STR_METHODS: Final = frozenset({"join", "format", "upper", "lower", "strip", "replace",
                                 "decode", "rstrip", "lstrip", "title"})


@dataclass(frozen=True, slots=True)
class _Loop:
    """The innermost loop around a node, and the names it assigns."""

    node: ast.For | ast.AsyncFor | ast.While
    assigned: frozenset[str]


def check(source: Source) -> list[Finding]:
    """Every performance finding of ``source``."""
    resolver = Resolver(source.tree)
    out: list[Finding] = []
    for scope in [source.tree, *(n for n in ast.walk(source.tree) if isinstance(n, FUNCTIONS))]:
        kinds = _kinds(scope)
        for node, loop in _in_loops(scope):
            out.extend(_check(source, resolver, kinds, node, loop))
    return out


def _own_nodes(scope: ast.AST) -> Iterator[ast.AST]:
    """The nodes of a scope, not entering nested functions or classes."""
    pending = list(ast.iter_child_nodes(scope))
    while pending:
        node = pending.pop()
        yield node
        if not isinstance(node, (*FUNCTIONS, ast.ClassDef, ast.Lambda)):
            pending.extend(ast.iter_child_nodes(node))


def _kinds(scope: ast.AST) -> dict[str, str]:
    """What the scope's names hold, when an assignment says: ``"str"`` or ``"list"``."""
    kinds: dict[str, str] = {}
    for node in _own_nodes(scope):
        if isinstance(node, ast.Assign):
            kind = _kind(node.value)
            for target in node.targets:
                if kind and isinstance(target, ast.Name):
                    kinds.setdefault(target.id, kind)
        elif isinstance(node, ast.AnnAssign) and node.value is not None and \
                isinstance(node.target, ast.Name):
            kind = _kind(node.value)
            if kind:
                kinds.setdefault(node.target.id, kind)
    return kinds


def _kind(value: ast.expr) -> str:
    if isinstance(value, ast.Constant) and isinstance(value.value, str) or \
            isinstance(value, ast.JoinedStr):
        return "str"
    if isinstance(value, (ast.List, ast.ListComp)):
        return "list"
    if isinstance(value, ast.Call):
        func = value.func
        if isinstance(func, ast.Name):
            return "str" if func.id in _STR_FUNCS else "list" if func.id in (
                "list", "sorted") else ""
        if isinstance(func, ast.Attribute) and func.attr in _STR_METHODS:
            return "str"
    if isinstance(value, ast.BinOp) and isinstance(value.op, (ast.Add, ast.Mod)):
        return _kind(value.left) or _kind(value.right)
    return ""


def _in_loops(scope: ast.AST) -> Iterator[tuple[ast.AST, _Loop]]:
    """Each node of the scope inside a loop body, with its innermost loop."""
    def walk(node: ast.AST, loop: _Loop | None) -> Iterator[tuple[ast.AST, _Loop]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (*FUNCTIONS, ast.ClassDef, ast.Lambda)):
                continue
            if loop is not None:
                yield child, loop
            if isinstance(child, LOOPS):
                inner = _Loop(child, frozenset(_assigned(child)))
                if isinstance(child, ast.While):
                    yield from walk(child.test, loop)
                else:
                    yield from walk(child.iter, loop)
                for stmt in child.body:
                    yield stmt, inner
                    yield from walk(stmt, inner)
                for stmt in child.orelse:
                    if loop is not None:
                        yield stmt, loop
                    yield from walk(stmt, loop)
            else:
                yield from walk(child, loop)

    yield from walk(scope, None)


def _assigned(loop: ast.For | ast.AsyncFor | ast.While) -> set[str]:
    names: set[str] = set()
    roots: list[ast.AST] = list(loop.body)
    if not isinstance(loop, ast.While):
        roots.append(loop.target)
    for root in roots:
        for node in ast.walk(root):
            if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
                names.add(node.id)
    return names


def _invariant(node: ast.AST, loop: _Loop) -> bool:
    return not any(isinstance(n, ast.Name) and n.id in loop.assigned for n in ast.walk(node))


def _check(source: Source, resolver: Resolver, kinds: dict[str, str], node: ast.AST,
           loop: _Loop) -> Iterator[Finding]:
    if isinstance(node, (ast.AugAssign, ast.Assign)):
        yield from _check_growth(source, kinds, node)
    elif isinstance(node, ast.Call):
        yield from _check_call(source, resolver, kinds, node, loop)
    elif isinstance(node, ast.Compare):
        yield from _check_membership(source, kinds, node, loop)


def _check_growth(source: Source, kinds: dict[str, str],
                  node: ast.AugAssign | ast.Assign) -> Iterator[Finding]:
    """``s += part`` on a string; ``x = x + ...`` on a string or a list."""
    if isinstance(node, ast.AugAssign):
        if isinstance(node.op, ast.Add) and isinstance(node.target, ast.Name) and \
                "str" in (kinds.get(node.target.id), _kind(node.value)):
            yield source.finding(_STRING_BUILD, Category.PERFORMANCE, node,
                                 f"string {node.target.id} is grown with += inside a loop "
                                 "(quadratic)")
        return
    target = node.targets[0]
    if len(node.targets) != 1 or not isinstance(target, ast.Name) or \
            not _grows(target.id, node.value):
        return
    grown = _kind(node.value) or kinds.get(target.id, "")
    if grown == "list":
        yield source.finding(_LIST_BUILD, Category.PERFORMANCE, node,
                             f"list {target.id} is rebuilt with {target.id} + [...] inside a "
                             "loop (quadratic)")
    elif grown == "str":
        yield source.finding(_STRING_BUILD, Category.PERFORMANCE, node,
                             f"string {target.id} is grown with {target.id} + ... inside a "
                             "loop (quadratic)")


def _check_membership(source: Source, kinds: dict[str, str], node: ast.Compare,
                      loop: _Loop) -> Iterator[Finding]:
    """``x in d.keys()``; ``x in some_list`` where the list does not change in the loop."""
    for op, right in zip(node.ops, node.comparators):
        if not isinstance(op, (ast.In, ast.NotIn)):
            continue
        if isinstance(right, ast.Call) and isinstance(right.func, ast.Attribute) and \
                right.func.attr == "keys" and not right.args:
            yield source.finding(_KEYS_MEMBER, Category.PERFORMANCE, node,
                                 "membership test against .keys() inside a loop")
        elif isinstance(right, ast.Name) and kinds.get(right.id) == "list" and \
                right.id not in loop.assigned:
            yield source.finding(_LIST_MEMBER, Category.PERFORMANCE, node,
                                 f"membership test against list {right.id} inside a loop "
                                 "(a linear scan each time)")


def _grows(name: str, value: ast.expr) -> bool:
    """Whether ``value`` is ``name + ...`` (``name + a + b`` included)."""
    if not (isinstance(value, ast.BinOp) and isinstance(value.op, ast.Add)):
        return False
    left = value.left
    while isinstance(left, ast.BinOp) and isinstance(left.op, ast.Add):
        left = left.left
    return isinstance(left, ast.Name) and left.id == name


def _check_call(source: Source, resolver: Resolver, kinds: dict[str, str], call: ast.Call,
                loop: _Loop) -> Iterator[Finding]:
    resolved = resolver.qualname(call.func)
    name = resolved[0] if resolved is not None else ""
    if name == "re.compile" and _invariant(call, loop):
        yield source.finding(_COMPILE, Category.PERFORMANCE, call,
                             "re.compile of a loop-invariant pattern inside a loop")
    elif name == "sorted" and call.args and _invariant(call, loop):
        yield source.finding(_SORT, Category.PERFORMANCE, call,
                             "sorting the same data on every pass of a loop")
    elif isinstance(call.func, ast.Attribute) and isinstance(call.func.value, ast.Name):
        method, owner = call.func.attr, call.func.value.id
        if method == "sort" and owner not in loop.assigned:
            yield source.finding(_SORT, Category.PERFORMANCE, call,
                                 f"{owner}.sort() on every pass of a loop")
        elif method in ("insert", "pop") and call.args and \
                isinstance(call.args[0], ast.Constant) and call.args[0].value == 0 and \
                kinds.get(owner, "list") == "list":
            shown = "insert(0, ...)" if method == "insert" else "pop(0)"
            yield source.finding(_SHIFT, Category.PERFORMANCE, call,
                                 f"{owner}.{shown} inside a loop shifts the whole list")
