"""The pure-Python fixer the coder uses when ``ruff`` is absent; a standalone script.

It runs as a tool process in the task's throwaway copy, like any formatter
(``python fixer.py FILE...``), so it imports only the standard library: the tool process
does not need the agent's packages on its path. It prints one JSON line per file:
``{"path", "changed", "detail"}``.

Fixes, each checked before it is kept:

- trailing whitespace, and tabs in indentation (4 spaces), outside multi-line strings;
  kept only if the module's syntax tree is unchanged;
- blank lines at the end of the file, and a missing final newline;
- unused imports of the module's top level (single-line statements only; never in
  ``__init__.py``, never ``__future__``, never a name listed in ``__all__`` or mentioned
  in a string, which covers string annotations); kept only if the result parses.
"""

from __future__ import annotations

import ast
import io
import json
import re
import sys
import tokenize
from dataclasses import dataclass
from pathlib import Path
from typing import Final

#: Width of one indentation level when tabs are replaced.
INDENT_WIDTH: Final = 4
_WORD: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True, slots=True)
class FixOutcome:
    """What fixing one file did.

    Attributes:
        text: the fixed source (the original when nothing could be fixed).
        detail: why the file was left as it was ("" when it was fixed or clean).
    """

    text: str
    detail: str


def fix_source(text: str, *, is_package_init: bool = False) -> FixOutcome:
    """The fixed version of one Python module's source.

    Args:
        text: the module's source.
        is_package_init: the file is an ``__init__.py`` (its imports are re-exports).

    Returns:
        The outcome; a module that does not parse is returned unchanged, with why.
    """
    try:
        original = ast.dump(ast.parse(text))
    except (SyntaxError, ValueError, RecursionError) as e:
        return FixOutcome(text, f"unparseable: {_syntax_error_line(e)}")
    fixed = _fix_whitespace(text)
    if _tree_dump(fixed) != original:
        # A whitespace change that alters the program (tabs mixed with spaces) is not a fix.
        fixed = _fix_end_of_file(text)
    if not is_package_init:
        without_imports = _remove_unused_imports(fixed)
        if _tree_dump(without_imports) is not None:
            fixed = without_imports
    return FixOutcome(fixed, "")


def _syntax_error_line(error: BaseException) -> str:
    if isinstance(error, SyntaxError):
        return f"{error.msg} (line {error.lineno})"
    return f"{type(error).__name__}: {error}"


def _tree_dump(text: str) -> str | None:
    try:
        return ast.dump(ast.parse(text))
    except (SyntaxError, ValueError, RecursionError):
        return None


def _string_lines(text: str) -> tuple[set[int], set[int]]:
    """Lines (1-based) whose end lies inside a multi-line string, and lines whose start
    does: that whitespace is the string's content, not layout."""
    ends: set[int] = set()
    starts: set[int] = set()
    middle = getattr(tokenize, "FSTRING_MIDDLE", -1)
    try:
        for token in tokenize.generate_tokens(io.StringIO(text).readline):
            if token.type in (tokenize.STRING, middle) and token.end[0] > token.start[0]:
                ends.update(range(token.start[0], token.end[0]))
                starts.update(range(token.start[0] + 1, token.end[0] + 1))
    except (tokenize.TokenError, SyntaxError):
        everything = set(range(1, text.count("\n") + 2))
        return everything, everything
    return ends, starts


def _fix_whitespace(text: str) -> str:
    open_ends, open_starts = _string_lines(text)
    lines = text.splitlines(keepends=True)
    out = []
    for number, line in enumerate(lines, start=1):
        body = line.rstrip("\r\n")
        ending = line[len(body):]
        if number not in open_ends:
            body = body.rstrip()
        if number not in open_starts:
            indent = body[:len(body) - len(body.lstrip())]
            if "\t" in indent:
                body = indent.expandtabs(INDENT_WIDTH) + body[len(indent):]
        out.append(body + ending)
    return _fix_end_of_file("".join(out))


def _fix_end_of_file(text: str) -> str:
    """No blank lines (or trailing spaces) after the last line, one final newline."""
    stripped = text.rstrip()
    if not stripped:
        return ""
    return stripped + ("\r\n" if "\r\n" in text else "\n")


def _used_names(tree: ast.Module) -> set[str]:
    used = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            # Names in strings: string annotations, __all__, doctest-free references.
            used.update(_WORD.findall(node.value))
    return used


def _remove_unused_imports(text: str) -> str:
    tree = ast.parse(text)
    used = _used_names(tree)
    lines = text.splitlines(keepends=True)
    edits: list[tuple[int, str | None]] = []
    for node in tree.body:
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(node, ast.ImportFrom) and node.module == "__future__":
            continue
        if node.end_lineno != node.lineno or not _alone_on_line(lines[node.lineno - 1], node):
            continue
        if any(alias.name == "*" for alias in node.names):
            continue
        kept = [alias for alias in node.names if _bound_name(alias) in used]
        if len(kept) == len(node.names):
            continue
        if not kept:
            edits.append((node.lineno, None))
            continue
        replacement: ast.stmt
        if isinstance(node, ast.Import):
            replacement = ast.Import(names=kept)
        else:
            replacement = ast.ImportFrom(module=node.module, names=kept, level=node.level)
        line = lines[node.lineno - 1]
        ending = line[len(line.rstrip("\r\n")):]
        edits.append((node.lineno, ast.unparse(replacement) + ending))
    for lineno, new in sorted(edits, reverse=True):
        if new is None:
            del lines[lineno - 1]
        else:
            lines[lineno - 1] = new
    return "".join(lines)


def _alone_on_line(line: str, node: ast.stmt) -> bool:
    """Whether the statement is the only code on its line (no ``;``, no comment lost)."""
    before = line[:node.col_offset]
    after = line[node.end_col_offset or 0:].strip()
    return not before.strip() and not after


def _bound_name(alias: ast.alias) -> str:
    if alias.asname:
        return alias.asname
    return alias.name.split(".", 1)[0]


def fix_file(path: Path) -> dict[str, object]:
    """Fix one file in place; return its JSON line's record."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        return {"path": str(path), "changed": False, "detail": f"unreadable: {e}"}
    outcome = fix_source(text, is_package_init=path.name == "__init__.py")
    changed = outcome.text != text
    if changed:
        path.write_text(outcome.text, encoding="utf-8")
    return {"path": str(path), "changed": changed, "detail": outcome.detail}


def main(argv: list[str]) -> int:
    """Fix every file named in ``argv``; exit 0 (a file that cannot be fixed is reported,
    not an error of the tool)."""
    for name in argv:
        print(json.dumps(fix_file(Path(name))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
