"""Code generation with an LLM: the prompt, and reading the reply into files.

The model is asked for fenced blocks that carry their file names on the fence line
(```` ```python file=src/slugify.py ````): the implementation, its tests, and a Markdown
document. The reply is read leniently (a name on the line before the fence, a block with
no name, a last block cut off by the token limit), because models drift from any format
they are given; what cannot be read at all is a :class:`UnusableReply`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, Final

from agents.sandbox import SandboxError, safe_relative

#: Characters of the research summary put in the prompt (the rest adds cost, not facts).
MAX_SUMMARY_CHARS: Final = 6000
#: Citations listed in the prompt.
MAX_CITATIONS: Final = 20
#: File extension of each language's code, for blocks the model did not name.
EXTENSIONS: Final = {
    "python": "py", "javascript": "js", "typescript": "ts", "go": "go", "rust": "rs",
    "java": "java", "c": "c", "cpp": "cpp", "c++": "cpp", "csharp": "cs", "c#": "cs",
    "ruby": "rb", "php": "php", "kotlin": "kt", "swift": "swift", "shell": "sh",
    "bash": "sh",
}
DOC_LANGUAGES: Final = frozenset({"markdown", "md", "rst", "text", "txt"})
DOC_SUFFIXES: Final = (".md", ".rst", ".txt")

SYSTEM_PROMPT: Final = (
    "You are a careful senior software engineer. For the specification you are given, "
    "write working, idiomatic {language} code, unit tests that exercise it (including "
    "edge cases and errors), and user documentation.\n"
    "Reply with fenced code blocks only, each with the language and its file name on the "
    "opening fence line, like:\n"
    "```{fence_language} file={code_path}\n...\n```\n"
    "Give, in this order: the implementation file(s); the test file(s) (names starting "
    "with test_ or under tests/); one Markdown file, README.md, documenting usage. "
    "Use relative paths. Do not put anything else outside the blocks.")

_FENCE: Final = re.compile(r"^ {0,3}(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
_NAMED: Final = re.compile(r"""(?:file|filename|path|name)\s*[=:]\s*["']?(?P<path>[^\s"'`]+)""",
                           re.IGNORECASE)
_PATHLIKE: Final = re.compile(r"(?P<path>[\w.-]+(?:/[\w.-]+)*\.[A-Za-z0-9]{1,8})")
_TEST_MARKERS: Final = ("def test_", "import pytest", "import unittest", "describe(", "it(",
                        "#[test]", "@Test", "func Test")


class UnusableReply(ValueError):
    """Raised when the model's reply holds no code block; one line."""


@dataclass(frozen=True, slots=True)
class GeneratedFile:
    """One file of the reply.

    Attributes:
        path: relative posix path (the model's name, or a default).
        content: its text.
        role: ``code``, ``tests`` or ``documentation``.
    """

    path: str
    content: str
    role: str


@dataclass(frozen=True, slots=True)
class GeneratedCode:
    """The reply, read.

    Attributes:
        files: every block, in reply order.
        truncated: the last block was cut off (the reply hit its token limit).
    """

    files: list[GeneratedFile] = field(default_factory=list)
    truncated: bool = False

    def text_of(self, role: str) -> str:
        """The contents of the files of ``role``, joined (one file: its content)."""
        parts = [f for f in self.files if f.role == role]
        if len(parts) == 1:
            return parts[0].content
        return "\n\n".join(f"# {f.path}\n{f.content}" for f in parts)


def normalize_language(language: Any) -> str:
    """The language asked for, lower-cased (``python`` when none is given)."""
    text = str(language or "").strip().lower()
    return text or "python"


def default_path(language: str, role: str, index: int) -> str:
    """The name of an unnamed block: ``main.py``, ``test_main.py``, ``README.md``..."""
    if role == "documentation":
        return "README.md" if index == 0 else f"DOC{index + 1}.md"
    ext = EXTENSIONS.get(language, "txt")
    stem = "main" if index == 0 else f"main{index + 1}"
    return f"test_{stem}.{ext}" if role == "tests" else f"{stem}.{ext}"


def build_messages(data: Mapping[str, Any]) -> list[dict[str, str]]:
    """The chat messages for a code generation task.

    Args:
        data: the task's input: ``specification`` and ``language``, and when an earlier
            research step ran, its ``summary`` and ``citations``.
    """
    language = normalize_language(data.get("language"))
    ext = EXTENSIONS.get(language, "txt")
    system = SYSTEM_PROMPT.format(language=language, fence_language=language,
                                  code_path=f"src/module.{ext}")
    parts = [f"Specification:\n{str(data.get('specification', '')).strip()}",
             f"Language: {language}"]
    summary = str(data.get("summary") or "").strip()
    if summary:
        parts.append("Research notes from an earlier step (use what applies):\n"
                     + summary[:MAX_SUMMARY_CHARS])
    citations = data.get("citations")
    if isinstance(citations, list) and citations:
        listed = [_citation(c) for c in citations[:MAX_CITATIONS]]
        parts.append("Sources of those notes: " + ", ".join(c for c in listed if c))
    return [{"role": "system", "content": system}, {"role": "user", "content": "\n\n".join(parts)}]


def _citation(citation: Any) -> str:
    if isinstance(citation, Mapping):
        lines = citation.get("lines")
        if isinstance(lines, list) and len(lines) == 2:
            return f"{citation.get('path', '?')}:{lines[0]}-{lines[1]}"
        return str(citation.get("path", ""))
    return str(citation)


def parse_reply(text: str, language: str) -> GeneratedCode:
    """The files of a reply.

    Raises:
        UnusableReply: the reply has no fenced block.
    """
    blocks, truncated = _blocks(text)
    if not blocks:
        raise UnusableReply("the model's reply has no fenced code block")
    files: list[GeneratedFile] = []
    counts: dict[str, int] = {}
    taken: set[str] = set()
    for info, body, before in blocks:
        name = _block_name(info, before)
        role = _role(name, info, body)
        path = name if name is not None and name not in taken else None
        if path is None:
            path = default_path(language, role, counts.get(role, 0))
        counts[role] = counts.get(role, 0) + 1
        taken.add(path)
        files.append(GeneratedFile(path, body, role))
    return GeneratedCode(files, truncated)


def _blocks(text: str) -> tuple[list[tuple[str, str, str]], bool]:
    """``[(info, body, text before the fence)]`` of the reply's fenced blocks, and
    whether the last one was never closed.

    A Markdown block may hold fenced examples of its own: inside one, a fence line with
    an info string opens a nested block, and a bare fence closes the innermost one.
    """
    lines = text.split("\n")
    blocks: list[tuple[str, str, str]] = []
    outside: list[str] = []
    index = 0
    while index < len(lines):
        opening = _FENCE.match(lines[index])
        index += 1
        if opening is None:
            outside.append(lines[index - 1])
            continue
        fence, info = opening["fence"], opening["info"].strip()
        nests = _is_markdown(info)
        body: list[str] = []
        depth = 0
        closed = False
        while index < len(lines):
            line = lines[index]
            index += 1
            inner = _FENCE.match(line)
            if inner is not None and inner["fence"][0] == fence[0] \
                    and len(inner["fence"]) >= len(fence):
                if inner["info"].strip() and nests:
                    depth += 1
                elif depth > 0:
                    depth -= 1
                elif not inner["info"].strip():
                    closed = True
                    break
            body.append(line)
        content = "\n".join(body)
        blocks.append((info, content + "\n" if content and not content.endswith("\n") else content,
                       "\n".join(outside)))
        outside = []
        if not closed:
            return blocks, True
    return blocks, False


def _is_markdown(info: str) -> bool:
    words = info.split()
    if words and words[0].lower() in DOC_LANGUAGES:
        return True
    named = _NAMED.search(info)
    return named is not None and named["path"].lower().endswith(DOC_SUFFIXES)


def _block_name(info: str, before: str) -> str | None:
    """The file name of a block: on its fence line, else on the line before it."""
    candidates = []
    named = _NAMED.search(info)
    if named is not None:
        candidates.append(named["path"])
    words = info.split()
    candidates.extend(w for w in words[1:] if _PATHLIKE.fullmatch(w))
    if len(words) == 1 and "." in words[0] and _PATHLIKE.fullmatch(words[0]):
        candidates.append(words[0])
    last_line = before.strip().splitlines()[-1] if before.strip() else ""
    if last_line and len(last_line) < 200:
        found = _PATHLIKE.search(last_line.replace("`", " ").replace("*", " "))
        if found is not None:
            candidates.append(found["path"])
    for candidate in candidates:
        try:
            return safe_relative(candidate.strip("`'\":,")).as_posix()
        except SandboxError:
            continue
    return None


def _role(name: str | None, info: str, content: str) -> str:
    language = info.split()[0].lower() if info.split() else ""
    if name is not None:
        pure = PurePosixPath(name)
        if pure.suffix.lower() in DOC_SUFFIXES:
            return "documentation"
        stem = pure.stem
        if stem.lower().startswith("test_") or stem.lower().endswith(("_test", ".test", ".spec")) \
                or stem.endswith("Test") \
                or "tests" in pure.parts[:-1] or "test" in pure.parts[:-1]:
            return "tests"
        return "code"
    if language in DOC_LANGUAGES:
        return "documentation"
    if any(marker in content for marker in _TEST_MARKERS):
        return "tests"
    return "code"
