"""The researcher agent: BM25 search over a corpus, extractive summaries that cite sources.

Capabilities:

- ``search``: ranks passages of the corpus for ``query`` (BM25, :mod:`agents.search_index`)
  and writes a summary from the best sentences, each followed by its citation
  ``[path:first-last]``;
- ``summarization``: a summary per carried file (``{"files": [...]}``): key sentences by
  term weight for prose; the module docstring and the public definitions' first lines
  for code;
- ``document_analysis``: per-document statistics (words, headings, top terms, reading
  time) of the carried documents, and the ``search`` answer when a query is given.

The corpus is, first match wins: the documents the task carries (``documents``, or
``files``), indexed in memory and cached by content hash (the research map-reduce sends
the same documents with each aspect); else the corpus directory configured on this
machine (``ORCH_RESEARCH_CORPUS`` or the constructor's ``corpus_dir``), indexed
incrementally in an SQLite file under ``$ORCH_HOME/researcher/``; else none, and the
result says how to give one instead of failing.

With an LLM configured (``ORCH_LLM_BASE_URL``, :mod:`agent_sdk.llm`), the search summary
is written by the LLM from the retrieved passages and keeps their citations; without one
it is extractive. ``web_search`` is not advertised: this agent has no web search backend
it could serve it with, and an agent never advertises what it cannot do.

Output ``data`` (the contract the synthesizer and the build pipeline read): the input's
fields except ``documents``/``files``, plus ``kind: "research"``, ``results``
(``[{"path", "score", "lines", "snippet"}]``), ``summary``, ``citations``
(``[{"path", "lines"}]``) and ``corpus`` (``{"documents", "source", ...}``).
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import logging
import math
import os
import re
import sqlite3
import threading
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Final

from agent_sdk import BaseAgent, Result, Task
from agent_sdk.errors import PermanentFailure
from wire.home import home_dir
from agents.search_index import (
    FENCE, HEADING, STOP_WORDS, CorpusError, Hit, Passage, SearchIndex, content_terms,
    document_key, words,
)

if TYPE_CHECKING:
    from agent_sdk.llm import LLM

logger = logging.getLogger(__name__)

#: Where the corpus directory is configured on the agent's machine.
CORPUS_ENV: Final = "ORCH_RESEARCH_CORPUS"
#: Results returned when the task does not say (``limit``), and the most it may ask for.
DEFAULT_LIMIT: Final = 5
MAX_LIMIT: Final = 50
#: Passages the summary is drawn from (more than the results shown: a summary gains from
#: a second passage of the best document).
SUMMARY_PASSAGES: Final = 8
#: In-memory indexes of carried documents kept (the aspects of one research share one).
TASK_INDEX_CACHE: Final = 4
#: Most tokens the LLM may write for a summary.
LLM_SUMMARY_TOKENS: Final = 600

CAPABILITIES: Final = ("search", "document_analysis", "summarization")
NO_CORPUS: Final = ("No corpus to search: carry the documents with the task "
                    "(documents: [{\"path\", \"content\"}]), or start the researcher with "
                    f"{CORPUS_ENV} set to a directory of documents.")
_LLM_SYSTEM: Final = (
    "You answer a research question from the given passages only, each headed by its "
    "citation. Write a short "
    "summary (at most 6 sentences). After every sentence put the citation of the passage "
    "it comes from, exactly as given, like [docs/a.md:3-9]. If the passages do not answer "
    "the question, say so.")


# ------------------------------------------------------------------ summaries
#
# Extractive summaries: sentences ("units") keep their file and line range, so every
# sentence a summary quotes is followed by its citation [path:first-last].

#: Sentences of a search summary, and its length cap.
SUMMARY_SENTENCES: Final = 4
SUMMARY_MAX_CHARS: Final = 900
#: Sentences of a prose file's summary, and definitions listed of a code file.
FILE_SUMMARY_SENTENCES: Final = 3
FILE_SUMMARY_DEFINITIONS: Final = 8
#: MMR's trade-off: 1.0 ranks by relevance only, lower favours sentences unlike those
#: already chosen.
MMR_LAMBDA: Final = 0.7
#: Share of a research topic's terms a quoted sentence must hold (rounded up).
TOPIC_COVERAGE: Final = 0.6
#: A passage scoring under this fraction of the best one is off topic: not quoted.
MIN_RELATIVE_SCORE: Final = 0.35
#: Sentences this alike (Jaccard of their terms) are the same point said twice.
DUPLICATE_SIMILARITY: Final = 0.8
#: Longest quoted sentence; longer ones are cut.
MAX_UNIT_CHARS: Final = 400
#: Words read per minute, for the reading time.
READING_WORDS_PER_MINUTE: Final = 230
#: Terms listed in a document's ``top_terms``.
TOP_TERMS: Final = 10
CODE_SUFFIXES: Final = frozenset({
    ".py", ".pyi", ".js", ".mjs", ".ts", ".tsx", ".jsx", ".go", ".rs", ".java", ".kt", ".c",
    ".h", ".cc", ".cpp", ".hpp", ".cs", ".rb", ".php", ".sh", ".bash", ".swift", ".scala",
    ".lua", ".sql"})

_SENTENCE_BREAK: Final = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])")
_BULLET: Final = re.compile(r"^(?:[-*+]|\d+[.)])\s+")
#: A Markdown table row: its cells are not sentences.
_TABLE_ROW: Final = re.compile(r"^\s*\|")
#: A column-aligned line (a listing, a code block's middle when a passage starts inside
#: one): a run of three spaces after its first word. Prose does not align columns.
_ALIGNED: Final = re.compile(r"\S {3,}\S")
#: Letters of a term two words must share to be taken as the same word when the light
#: stemmer and the index's Porter stemmer disagree ("caching", "cache").
_PREFIX_LETTERS: Final = 4
_SIGNATURE: Final = re.compile(
    r"^\s*(?:export\s+)?(?:default\s+)?(?:pub(?:\([^)]*\))?\s+)?(?:public\s+|static\s+)*"
    r"(?:async\s+)?(?:function|class|interface|struct|enum|trait|impl|def|func|fn|type)\s+"
    r"[A-Za-z_]")
#: A C-like function definition at the top level: ``int main(void) {``.
_C_FUNCTION: Final = re.compile(
    r"^[A-Za-z_][\w\s*&:<>,]*?[\s*&]\**[A-Za-z_][\w:]*\s*\([^;]*\)\s*(?:const\s*)?\{?\s*$")
_C_FUNCTION_NOT: Final = re.compile(r"^(?:if|for|while|switch|return|else|do|case)\b")
#: How a comment line starts, by file suffix (C-like languages otherwise).
_C_COMMENTS: Final = ("//", "/*", "*")
_COMMENT_PREFIXES: Final = {".sh": ("#",), ".bash": ("#",), ".rb": ("#",), ".sql": ("--",),
                            ".lua": ("--",), ".php": ("//", "/*", "*", "#")}


@dataclass(frozen=True, slots=True)
class Unit:
    """A sentence (or a definition's first line) at its place, with a weight.

    Attributes:
        path: the document.
        first_line: 1-based first line of the sentence.
        last_line: 1-based last line.
        text: the sentence, on one line.
        terms: its content stems (for relevance and redundancy).
        score: its weight in the summary it was chosen for.
    """

    path: str
    first_line: int
    last_line: int
    text: str
    terms: frozenset[str] = frozenset()
    score: float = 0.0

    def scored(self, score: float) -> Unit:
        """The same unit with another weight."""
        return Unit(self.path, self.first_line, self.last_line, self.text, self.terms, score)


def citation_text(place: Unit | Passage) -> str:
    """``[path:first-last]``: how a summary cites a place."""
    return f"[{place.path}:{place.first_line}-{place.last_line}]"


def unique_citations(places: list[Unit] | list[Passage]) -> list[dict[str, Any]]:
    """The contract's ``citations``: ``[{"path", "lines"}]``, first mention first."""
    seen: dict[tuple[str, int, int], None] = {}
    for place in places:
        seen.setdefault((place.path, place.first_line, place.last_line), None)
    return [{"path": p, "lines": [a, b]} for p, a, b in seen]


def _cut(text: str) -> str:
    return text if len(text) <= MAX_UNIT_CHARS else text[: MAX_UNIT_CHARS - 1].rstrip() + "…"


def sentence_units(path: str, first_line: int, text: str) -> list[Unit]:
    """The sentences of a span of a document, each with its line range.

    Lines of a paragraph are joined, then cut at sentence ends; a list item starts a new
    paragraph; headings, fenced code (its markers and what lies between them) and table
    rows are left out: they are not sentences, and a command line that names the query's
    words is not an answer about them.
    """
    units: list[Unit] = []
    paragraph: list[tuple[int, str]] = []
    in_code = False

    def flush() -> None:
        if not paragraph:
            return
        starts, parts, offset = [], [], 0
        for _, line in paragraph:
            starts.append(offset)
            parts.append(line)
            offset += len(line) + 1
        joined = " ".join(parts)
        begin = 0
        for end, after in [(m.start(), m.end()) for m in _SENTENCE_BREAK.finditer(joined)] + \
                [(len(joined), len(joined))]:
            sentence = joined[begin:end].strip()
            if len(sentence.split()) >= 3:
                first = paragraph[bisect_right(starts, begin) - 1][0]
                last = paragraph[bisect_right(starts, max(begin, end - 1)) - 1][0]
                units.append(Unit(path, first, last, _cut(sentence),
                                  frozenset(content_terms(sentence))))
            begin = after
        paragraph.clear()

    for i, raw in enumerate(text.split("\n")):
        line = raw.strip()
        if FENCE.match(raw):
            in_code = not in_code
            flush()
            continue
        if in_code or not line or HEADING.match(raw) or _TABLE_ROW.match(raw) \
                or _ALIGNED.search(line):
            flush()
            continue
        bullet = _BULLET.match(line)
        if bullet:
            flush()
            line = line[bullet.end():]
        paragraph.append((first_line + i, line))
    flush()
    return units


def _jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 0.0


def mmr_select(candidates: list[Unit], count: int, max_chars: int) -> list[Unit]:
    """Up to ``count`` units by maximal marginal relevance: each pick maximizes
    ``λ·score − (1−λ)·(likeness to the picks)``; near-duplicates are skipped."""
    pool = sorted(candidates, key=lambda u: (-u.score, u.path, u.first_line))
    picked: list[Unit] = []
    total = 0
    while pool and len(picked) < count:
        def gain(unit: Unit) -> float:
            likeness = max((_jaccard(unit.terms, p.terms) for p in picked), default=0.0)
            return MMR_LAMBDA * unit.score - (1 - MMR_LAMBDA) * likeness
        best = max(pool, key=gain)
        pool.remove(best)
        if any(_jaccard(best.terms, p.terms) >= DUPLICATE_SIMILARITY or best.text == p.text
               for p in picked):
            continue
        if picked and total + len(best.text) > max_chars:
            continue
        picked.append(best)
        total += len(best.text)
    return picked


def extractive_summary(query: str, hits: list[Hit], topic: str = "") -> tuple[str, list[Unit]]:
    """A summary of the passages found for ``query``: the sentences that cover the most
    (and rarest) query terms in the best-ranked passages, redundancy removed by MMR, each
    followed by its citation. Returns the text and the sentences it quotes.

    ``topic`` (a research item's subject, whose ``query`` adds an aspect's words such as
    "trade-offs" or "best practices") must be spoken of by every quoted sentence: most of
    its terms (both of two), so that "Opening an older database..." is not an answer
    about vector databases because it shares "database".
    """
    if not hits:
        return "", []
    query_terms = set(content_terms(query))
    # (a topic counts where the query speaks of it: an item's topic is part of its query)
    topic_terms = set(content_terms(topic)) & query_terms
    needed = math.ceil(TOPIC_COVERAGE * len(topic_terms))

    def about(unit: Unit) -> bool:
        return bool(query_terms & unit.terms) and len(topic_terms & unit.terms) >= needed
    per_hit = [sentence_units(h.passage.path, h.passage.first_line, h.passage.text)
               for h in hits]
    all_units = [u for units in per_hit for u in units]
    doc_freq: dict[str, int] = {}
    for unit in all_units:
        for term in unit.terms:
            doc_freq[term] = doc_freq.get(term, 0) + 1
    idf = {t: math.log(1 + len(all_units) / (1 + doc_freq.get(t, 0))) for t in query_terms}
    query_weight = sum(idf.values()) or 1.0
    # Passages ranked by their prose: one that names the query's words only in code or
    # a table (a command example) neither answers nor sets the bar for the others.
    speaking = [(hit, spoken) for hit, units in zip(hits, per_hit)
                if (spoken := [u for u in units if about(u)])]
    top = speaking[0][0].score if speaking else 0.0
    candidates: list[Unit] = []
    for rank, (hit, units) in enumerate(speaking):
        passage_score = hit.score / top if top > 0 else 1.0 / (rank + 1)
        if passage_score < MIN_RELATIVE_SCORE:
            continue
        for unit in units:
            coverage = sum(idf[t] for t in query_terms & unit.terms) / query_weight
            candidates.append(unit.scored(0.4 * passage_score + 0.6 * coverage))
    if not candidates:
        # The index may have matched on stems this light stemmer does not share
        # ("caching", "cache"): quote the sentences that share a term's first letters.
        # None: the passages name the query's words only in code or tables.
        prefixes = {t[:_PREFIX_LETTERS] for t in topic_terms or query_terms}
        shared = max(1, math.ceil(TOPIC_COVERAGE * len(prefixes)))
        candidates = [unit.scored(1.0 / (rank + 1))
                      for rank, units in enumerate(per_hit[:2]) for unit in units
                      if len(prefixes & {t[:_PREFIX_LETTERS] for t in unit.terms}) >= shared]
    picked = mmr_select(candidates, SUMMARY_SENTENCES, SUMMARY_MAX_CHARS)
    return " ".join(f"{u.text} {citation_text(u)}" for u in picked), picked


@dataclass(frozen=True, slots=True)
class FileSummary:
    """The summary of one file: its key sentences, or its code's outline, cited."""

    path: str
    kind: str  # "text" or "code"
    title: str
    units: list[Unit]

    def line(self) -> str:
        """One line of the combined summary: ``path: sentence [cite] ...``."""
        body = " ".join(f"{u.text} {citation_text(u)}" for u in self.units)
        return f"{self.path}: {body or '(no text to summarize)'}"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly view."""
        return {"path": self.path, "kind": self.kind, "title": self.title,
                "summary": " ".join(f"{u.text} {citation_text(u)}" for u in self.units),
                "citations": unique_citations(self.units)}


def summarize_file(path: str, content: str) -> FileSummary:
    """A file's summary: for code its docstring and public definitions, for prose its key
    sentences by term weight (redundancy removed), in document order."""
    suffix = PurePosixPath(path).suffix.lower()
    if suffix in (".py", ".pyi"):
        units = _python_outline(path, content)
        if units is not None:
            return FileSummary(path, "code", PurePosixPath(path).name, units)
    if suffix in CODE_SUFFIXES:
        return FileSummary(path, "code", PurePosixPath(path).name, _code_outline(path, content))
    return FileSummary(path, "text", _title(path, content), _key_sentences(path, content))


def _title(path: str, content: str) -> str:
    for line in content.splitlines():
        match = HEADING.match(line)
        if match:
            return match.group(2)
    return PurePosixPath(path).name


def _key_sentences(path: str, content: str) -> list[Unit]:
    units = sentence_units(path, 1, content)
    if not units:
        return []
    counts: dict[str, int] = {}
    for unit in units:
        for term in content_terms(unit.text):
            counts[term] = counts.get(term, 0) + 1
    peak = max(counts.values(), default=1)
    scored = []
    for position, unit in enumerate(units):
        weight = sum(counts[t] / peak for t in unit.terms) / math.sqrt(1 + len(unit.terms))
        if position == 0:
            weight *= 1.2  # a document's first sentence tends to say what it is about
        scored.append(weight)
    top = max(scored) or 1.0
    picked = mmr_select([u.scored(s / top) for u, s in zip(units, scored)],
                        FILE_SUMMARY_SENTENCES, SUMMARY_MAX_CHARS)
    return sorted(picked, key=lambda u: u.first_line)


def _python_outline(path: str, content: str) -> list[Unit] | None:
    """The module docstring's first paragraph and each public definition's signature
    and docstring's first line; None when the file does not parse."""
    try:
        tree = ast.parse(content)
    except (SyntaxError, ValueError):
        return None
    units: list[Unit] = []
    doc = ast.get_docstring(tree)
    first = tree.body[0] if tree.body else None
    if doc and first is not None:
        lead = " ".join(doc.split("\n\n")[0].split())
        units.append(Unit(path, first.lineno, first.end_lineno or first.lineno, _cut(lead),
                          frozenset(content_terms(lead)), 1.0))
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) \
                or node.name.startswith("_"):
            continue
        if len(units) > FILE_SUMMARY_DEFINITIONS:
            break
        if isinstance(node, ast.ClassDef):
            head = f"class {node.name}"
        else:
            prefix = "async def" if isinstance(node, ast.AsyncFunctionDef) else "def"
            head = f"{prefix} {node.name}({ast.unparse(node.args)})"
        node_doc = ast.get_docstring(node)
        text = f"`{head}`" + (f": {node_doc.strip().splitlines()[0]}" if node_doc else "")
        units.append(Unit(path, node.lineno, node.end_lineno or node.lineno, _cut(text),
                          frozenset(content_terms(text)), 0.5))
    return units


def _code_outline(path: str, content: str) -> list[Unit]:
    """Other languages: the leading comment block and the definition lines."""
    suffix = PurePosixPath(path).suffix.lower()
    prefixes = _COMMENT_PREFIXES.get(suffix, _C_COMMENTS)
    lines = content.splitlines()
    units: list[Unit] = []
    comment: list[str] = []
    first = last = 0
    for number, line in enumerate(lines, 1):
        stripped = line.strip()
        if number == 1 and stripped.startswith("#!"):
            continue  # the interpreter line says nothing of the file
        if not stripped and not comment:
            continue
        if not stripped.startswith(prefixes):
            break
        text = stripped.lstrip("/*#-! ").removesuffix("*/").strip()
        comment.append(text)
        first, last = first or number, number
    lead = " ".join(" ".join(comment).split())
    if lead:
        units.append(Unit(path, first, last, _cut(lead), frozenset(content_terms(lead)), 1.0))
    for number, line in enumerate(lines, 1):
        if len(units) > FILE_SUMMARY_DEFINITIONS:
            break
        if _SIGNATURE.match(line) or (_C_FUNCTION.match(line) and not
                                      _C_FUNCTION_NOT.match(line)):
            text = f"`{line.strip().rstrip('{').strip()}`"
            units.append(Unit(path, number, number, _cut(text), frozenset(content_terms(text)),
                              0.5))
    return units


@dataclass(frozen=True, slots=True)
class DocumentStats:
    """What ``document_analysis`` reports of one document."""

    path: str
    words: int
    lines: int
    headings: list[dict[str, Any]]
    top_terms: list[list[Any]]
    reading_time_min: float

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly view."""
        return {"path": self.path, "words": self.words, "lines": self.lines,
                "headings": self.headings, "top_terms": self.top_terms,
                "reading_time_min": self.reading_time_min}


def analyze_document(path: str, content: str) -> DocumentStats:
    """Words, lines, markdown headings (level, text, line), the most frequent content
    words and the reading time of a document."""
    all_words = words(content)
    headings = []
    for number, line in enumerate(content.splitlines(), 1):
        match = HEADING.match(line)
        if match:
            headings.append({"level": len(match.group(1)), "text": match.group(2),
                             "line": number})
    counts: dict[str, int] = {}
    for word in all_words:
        if word not in STOP_WORDS and len(word) > 2 and not word.isdigit():
            counts[word] = counts.get(word, 0) + 1
    top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_TERMS]
    return DocumentStats(path, len(all_words), len(content.splitlines()), headings,
                         [[term, count] for term, count in top],
                         round(len(all_words) / READING_WORDS_PER_MINUTE, 1))


# ------------------------------------------------------------------ the agent

def researcher_data_dir() -> Path:
    """The researcher's data dir: ``researcher/`` under the data dir the broker would
    choose (``$ORCH_HOME``, else ``./.orchestrator`` where it exists, else the per-user
    ``$XDG_STATE_HOME/orchestrator``)."""
    return home_dir() / "researcher"


def _documents(value: Any, field_name: str) -> list[tuple[str, str]]:
    """``(path, content)`` of the carried files, checked.

    Raises:
        ValueError: an entry is not ``{"path": str, "content": str}``.
    """
    if value is None:
        return []
    if not isinstance(value, list):
        raise ValueError(f"{field_name} must be a list of {{path, content}}, "
                         f"got {type(value).__name__}")
    out = []
    for i, entry in enumerate(value):
        if not isinstance(entry, Mapping) or not isinstance(entry.get("path"), str) \
                or not isinstance(entry.get("content"), str):
            raise ValueError(f"{field_name}[{i}] must be {{\"path\": str, \"content\": str}}")
        out.append((entry["path"], entry["content"]))
    return out


def _limit(value: Any) -> int:
    if value is None:
        return DEFAULT_LIMIT
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_LIMIT:
        raise ValueError(f"limit must be an integer from 1 to {MAX_LIMIT}, got {value!r}")
    return value


@dataclass(slots=True)
class _Cached:
    """An in-memory index of carried documents, with the tasks searching it now."""

    index: SearchIndex
    users: int = 0
    evicted: bool = False


class Corpora:
    """The indexes the agent searches: carried document sets (an LRU of in-memory
    indexes by content hash) and the configured directory's file-backed index.

    A cached index is leased while a task searches it: one evicted meanwhile is closed
    when its last search ends, never under a running search.
    """

    def __init__(self, directory: Path | None, data_dir: Path) -> None:
        self.directory = directory
        self.data_dir = data_dir
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, _Cached] = OrderedDict()
        self._directory_index: SearchIndex | None = None

    @contextlib.contextmanager
    def lease(self, documents: list[tuple[str, str]]) -> Iterator[tuple[SearchIndex, bool]]:
        """The index of these documents while the block runs, and whether it was cached."""
        key = document_key(documents)
        with self._lock:
            entry = self._cache.get(key)
            if entry is not None:
                self._cache.move_to_end(key)
                entry.users += 1
        cached = entry is not None
        if entry is None:
            index = SearchIndex.memory()
            for path, content in documents:
                index.add_document(path, content)
            with self._lock:
                entry = self._cache.get(key)
                if entry is None:
                    entry = self._cache[key] = _Cached(index)
                else:
                    index.close()  # another task built it meanwhile: share that one
                entry.users += 1
                self._evict()
        try:
            yield entry.index, cached
        finally:
            with self._lock:
                entry.users -= 1
                if entry.evicted and entry.users == 0:
                    entry.index.close()

    def _evict(self) -> None:
        """Drop the least recently used indexes past :data:`TASK_INDEX_CACHE` (lock held)."""
        while len(self._cache) > TASK_INDEX_CACHE:
            _, old = self._cache.popitem(last=False)
            old.evicted = True
            if old.users == 0:
                old.index.close()

    def index_path(self) -> Path:
        """The SQLite file of the directory's index (one per corpus directory)."""
        assert self.directory is not None
        digest = sha256(str(self.directory).encode()).hexdigest()[:16]
        return self.data_dir / f"index-{digest}.sqlite"

    def directory_index(self) -> SearchIndex:
        """The directory's index, opened on first use.

        Raises:
            CorpusError: the index file cannot be opened or created.
        """
        with self._lock:
            if self._directory_index is None:
                path = self.index_path()
                try:
                    self._directory_index = SearchIndex.open(path)
                except (OSError, sqlite3.Error) as error:
                    raise CorpusError(f"cannot open the research index {path}: {error}") \
                        from error
            return self._directory_index

    def close(self) -> None:
        """Close every index (when the agent stops: no search runs any more)."""
        with self._lock:
            for entry in self._cache.values():
                entry.index.close()
            self._cache.clear()
            if self._directory_index is not None:
                self._directory_index.close()
                self._directory_index = None


class ResearcherAgent(BaseAgent):
    """Searches and summarizes documents with citations (see the module's text).

    Args:
        corpus_dir: a directory of documents on this machine (default
            ``$ORCH_RESEARCH_CORPUS``; none when unset).
        data_dir: where the directory's index lives (default ``$ORCH_HOME/researcher``).
        max_concurrent: most tasks at once.
        agent_id: this instance's id.
    """

    def __init__(self, corpus_dir: str | Path | None = None, data_dir: Path | None = None, *,
                 max_concurrent: int | None = None, agent_id: str | None = None) -> None:
        super().__init__("researcher", CAPABILITIES, max_concurrent=max_concurrent,
                         agent_id=agent_id)
        configured = corpus_dir if corpus_dir is not None else os.environ.get(CORPUS_ENV)
        directory = Path(configured).expanduser().absolute() if configured else None
        self.corpora = Corpora(directory, data_dir or researcher_data_dir())
        self._llm: LLM | None = None

    async def on_start(self) -> None:
        """Load the LLM backend when one is configured (optional: absent, extractive)."""
        self._llm = _llm_from_env()
        if self._llm is not None:
            self._llm.attach(self)

    async def on_stop(self) -> None:
        """Close the indexes and the LLM client."""
        self.corpora.close()
        if self._llm is not None:
            await self._llm.aclose()

    async def execute(self, task: Task) -> Result:
        """Route by the capability the task asked for (search when it named none)."""
        if isinstance(task.data, str):
            data: dict[str, Any] = {"query": task.data}
        elif isinstance(task.data, dict):
            data = task.data
        else:
            raise ValueError("a researcher task's data is a map ({\"query\": ...}, "
                             f"{{\"files\": [...]}}) or a query string, not "
                             f"{type(task.data).__name__}")
        wanted = set(task.capabilities)
        if "summarization" in wanted or (not wanted & set(CAPABILITIES)
                                         and "files" in data and not _query(data)):
            out = await asyncio.to_thread(self._summarize, data)
        elif "document_analysis" in wanted:
            out, hits = await asyncio.to_thread(self._analyze, data)
            await self._write_with_llm(task, data, out, hits)
        else:
            out, hits = await asyncio.to_thread(self._research, data)
            await self._write_with_llm(task, data, out, hits)
        confidence = 0.0 if out["corpus"]["source"] == "none" else 0.9 if out["results"] else 0.2
        return Result(data=out, confidence=confidence)

    # ------------------------------------------------------------ capabilities

    def _research(self, data: dict[str, Any]) -> tuple[dict[str, Any], list[Hit]]:
        """Search the corpus for the query; the output and the hits it was drawn from."""
        query = _query(data)
        limit = _limit(data.get("limit"))
        documents = _documents(data.get("documents", data.get("files")), "documents")
        out = _base(data)
        with self._corpus(documents) as (index, corpus):
            out["corpus"] = corpus
            if index is None:
                out.update(results=[], citations=[],
                           summary=corpus.pop("message", NO_CORPUS), summary_by="none")
                return out, []
            hits = index.search(query, max(limit, SUMMARY_PASSAGES))
        summary, units = extractive_summary(query, hits, str(data.get("topic") or ""))
        if not query.strip():
            summary = "No query given: nothing to search for."
        elif not hits:
            summary = (f"No passage of the {corpus['documents']} document(s) matches "
                       f"{query!r}.")
        elif not units:
            subject = str(data.get("topic") or "") or query
            summary = (f"No passage of the {corpus['documents']} document(s) is about "
                       f"{subject!r}: its words appear only in code, tables or passages "
                       f"on other subjects (nearest: {citation_text(hits[0].passage)}).")
        out.update(results=[hit.to_dict() for hit in hits[:limit]], summary=summary,
                   citations=unique_citations(units) or
                   unique_citations([hit.passage for hit in hits[:1]]),
                   # "none": nothing quoted, so this part did not answer its query
                   summary_by="extractive" if units else "none")
        return out, hits

    @contextlib.contextmanager
    def _corpus(self, documents: list[tuple[str, str]]
                ) -> Iterator[tuple[SearchIndex | None, dict[str, Any]]]:
        """The index to search (while the block runs) and the result's ``corpus``
        record: the carried documents, else the directory brought up to date, else none."""
        if documents:
            with self.corpora.lease(documents) as (index, cached):
                yield index, {"documents": index.document_count(), "source": "task",
                              "passages": index.passage_count(), "cached": cached}
            return
        directory = self.corpora.directory
        if directory is None:
            yield None, {"documents": 0, "source": "none"}
            return
        try:
            index = self.corpora.directory_index()
            stats = index.sync_directory(directory)
        except CorpusError as error:
            yield None, {"documents": 0, "source": "none", "message":
                         f"{error}: fix {CORPUS_ENV}, or carry the documents with the task."}
            return
        yield index, {"documents": index.document_count(), "source": "directory",
                      "passages": index.passage_count(), "directory": str(directory),
                      "index": stats.to_dict()}

    def _summarize(self, data: dict[str, Any]) -> dict[str, Any]:
        """A summary per carried file, with citations."""
        files = _documents(data.get("files", data.get("documents")), "files")
        out = _base(data)
        if not files:
            out.update(results=[], citations=[], summaries=[],
                       summary="Nothing to summarize: carry the files with the task "
                               "(files: [{\"path\", \"content\"}]).",
                       corpus={"documents": 0, "source": "none"}, summary_by="none")
            return out
        summaries = [summarize_file(path, content) for path, content in files]
        units = [unit for s in summaries for unit in s.units]
        out.update(
            results=[{"path": u.path, "score": round(u.score, 4),
                      "lines": [u.first_line, u.last_line], "snippet": u.text} for u in units],
            summary="\n".join(s.line() for s in summaries),
            citations=unique_citations(units),
            summaries=[s.to_dict() for s in summaries],
            corpus={"documents": len(files), "source": "task"}, summary_by="extractive")
        return out

    def _analyze(self, data: dict[str, Any]) -> tuple[dict[str, Any], list[Hit]]:
        """Statistics of the carried documents, and the search answer for a query."""
        documents = _documents(data.get("documents", data.get("files")), "documents")
        analysis = [analyze_document(path, content).to_dict() for path, content in documents]
        if _query(data):
            out, hits = self._research(data)
        else:
            hits = []
            out = self._summarize({**data, "files": data.get("documents", data.get("files"))})
        out["analysis"] = analysis
        return out, hits

    # ------------------------------------------------------------ the LLM path

    async def _write_with_llm(self, task: Task, data: dict[str, Any], out: dict[str, Any],
                              hits: list[Hit]) -> None:
        """Have the LLM write the summary from the passages (kept cited), when one is
        configured and there is something to write from. A permanent LLM failure (a
        rejected request, a spent budget) leaves the extractive summary, said so in
        ``llm_error``; a transient one is raised, so the broker retries the task."""
        llm = self._llm
        query = _query(data)
        if llm is None or not hits or not query:
            return
        from agent_sdk.llm import TokenBudget

        passages = hits[:SUMMARY_PASSAGES]
        listing = "\n\n".join(f"{citation_text(h.passage)}\n{h.passage.text}" for h in passages)
        messages = [{"role": "system", "content": _LLM_SYSTEM},
                    {"role": "user", "content": f"Question: {query}\n\nPassages:\n\n{listing}"}]
        try:
            completion = await llm.chat(messages, max_tokens=LLM_SUMMARY_TOKENS,
                                        budget=TokenBudget.from_task(task, self.state))
        except PermanentFailure as error:
            logger.warning("researcher: LLM summary refused, keeping the extractive one: %s",
                           error)
            out["llm_error"] = str(error)
            return
        finally:
            await llm.publish_usage()
        text = completion.text.strip()
        cited = [h.passage for h in passages if citation_text(h.passage) in text]
        if not cited:
            # The answer must stay checkable: cite what it was written from.
            cited = [h.passage for h in passages[:3]]
            text = f"{text} Sources: {' '.join(citation_text(p) for p in cited)}".strip()
        out.update(summary=text, citations=unique_citations(cited), summary_by="llm")


def _query(data: Mapping[str, Any]) -> str:
    """The text to search for: ``query``, else the build pipeline's ``specification``,
    else ``topic``."""
    for key in ("query", "specification", "topic"):
        value = data.get(key)
        if isinstance(value, str) and value.strip():
            return value
    return ""


def _base(data: Mapping[str, Any]) -> dict[str, Any]:
    """The input's fields a later step needs (all but the carried files), and the kind."""
    out = {k: v for k, v in data.items() if k not in ("documents", "files")}
    out["kind"] = "research"
    return out


def _llm_from_env() -> LLM | None:
    """``agent_sdk.llm.LLM.from_env()``; None when unconfigured, or when the SDK at hand
    has no LLM backend (the summaries are then extractive)."""
    try:
        from agent_sdk.llm import LLM
    except ImportError:
        return None
    return LLM.from_env()


__all__ = ["CAPABILITIES", "CORPUS_ENV", "ResearcherAgent", "researcher_data_dir"]
