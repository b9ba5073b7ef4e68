"""Full-text search over passages with BM25 ranking: SQLite FTS5, from the standard library.

Why FTS5: it ships with Python's ``sqlite3`` (no dependency on an agent machine), ranks with
BM25 (``bm25()``), stems English with its ``porter`` tokenizer (so "caching" finds
"cache"), and one file holds a corpus's index, which makes incremental updates a matter of
a few rows.

Documents are cut into **passages** (paragraphs, or windows of at most
:data:`MAX_PASSAGE_LINES` lines), each keeping its file and line range, so every hit cites
``path`` and ``lines``. Free text becomes an FTS5 query with :func:`fts_query`: its words
quoted (FTS5 operators, quotes, ``*`` and parentheses in the text are then plain
characters), stop words dropped, the rest OR-ed: BM25 ranks passages matching more and
rarer words first.

Two ways to hold an index:

- :meth:`SearchIndex.memory` for the documents a task carries (cached by content hash by
  the agent);
- :meth:`SearchIndex.open` for a corpus directory on the agent's machine, kept in an SQLite
  file and brought up to date by :meth:`SearchIndex.sync_directory`, which re-indexes only
  files whose size, modification time and then content hash changed, and drops deleted
  ones.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Final

#: Longest passage, in lines: a cited range stays small enough to check by eye.
MAX_PASSAGE_LINES: Final = 20
#: Longest passage of a fenced code block, which is cut only past it (a passage that
#: starts inside code cannot be told from prose).
MAX_CODE_PASSAGE_LINES: Final = 200
#: A paragraph shorter than this many lines is merged with the next (a heading with its text).
MIN_PASSAGE_LINES: Final = 3
#: Most words of a query sent to FTS5 (a pasted page must not become a huge query).
MAX_QUERY_TERMS: Final = 32
#: Biggest file of a corpus directory that is indexed; bigger ones are skipped (and said so).
MAX_FILE_BYTES: Final = 1024 * 1024
#: Most files of a corpus directory indexed; past it the rest are skipped (and said so).
MAX_FILES: Final = 20_000
#: Files a sync lists as skipped in its stats, at most (the rest are only counted).
MAX_LISTED_SKIPS: Final = 20
#: The ``sha256`` of a file the index knows it cannot index (binary, too big).
NOT_INDEXED: Final = "-"
#: Suffixes of files never read: they are not text.
BINARY_SUFFIXES: Final = frozenset({
    ".pyc", ".pyo", ".so", ".o", ".a", ".dll", ".dylib", ".exe", ".bin", ".class", ".jar",
    ".png", ".jpg", ".jpeg", ".gif", ".bmp", ".ico", ".webp", ".pdf", ".zip", ".gz", ".tgz",
    ".bz2", ".xz", ".zst", ".7z", ".tar", ".whl", ".woff", ".woff2", ".ttf", ".otf", ".mp3",
    ".mp4", ".wav", ".sqlite", ".db"})
#: Directories of generated files, never walked.
SKIPPED_DIRS: Final = frozenset({"__pycache__", "node_modules"})
#: A file modified this close to (or after) its indexing is hashed even when its size and
#: mtime look unchanged: a write in the same clock tick as the indexing would otherwise
#: go unseen (git's "racy clean" problem).
RACY_WINDOW_NS: Final = 2_000_000_000
#: Tokens of FTS5 snippets around the matches.
SNIPPET_TOKENS: Final = 24
#: BM25 weights of the columns: the passage text, then its title (path words, heading).
BODY_WEIGHT: Final = 1.0
TITLE_WEIGHT: Final = 0.5
#: How long a write waits for another process's write to the same index file.
BUSY_TIMEOUT_S: Final = 30.0
#: Bumped when the tables or the passages change (2: fenced code blocks are whole
#: passages): an index of another version is rebuilt.
SCHEMA_VERSION: Final = "2"

WORD: Final = re.compile(r"[^\W_]+")
#: A Markdown heading line (its level's hashes, then its text).
HEADING: Final = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
#: A line that opens or closes a fenced code block (passages and the researcher's
#: sentences must agree on what is code).
FENCE: Final = re.compile(r"^\s*(```|~~~)")

#: Words too common to help a search (English function words and question fillers).
STOP_WORDS: Final = frozenset("""
a about above after again against all am an and any are as at be because been before being
below between both but by can could did do does doing down during each few for from further
had has have having he her here hers herself him himself his how i if in into is it its
itself just me more most my myself no nor not now of off on once only or other our ours
ourselves out over own same she should so some such than that the their theirs them
themselves then there these they this those through to too under until up very was we were
what when where which while who whom why will with would you your yours yourself
yourselves also may might must shall get gets got make makes made many much via vs versus
tell explain describe show give find know want need please let use used using one two
""".split())


class CorpusError(ValueError):
    """Raised when a corpus directory cannot be indexed (missing, not a directory)."""


@dataclass(frozen=True, slots=True)
class Passage:
    """A span of one document: what the index holds and a hit cites.

    Attributes:
        path: the document, relative with ``/`` separators.
        first_line: 1-based first line.
        last_line: 1-based last line (inclusive).
        text: the lines ``first_line..last_line`` joined with ``\\n``.
        title: words that name the passage (path words, the markdown heading above it).
    """

    path: str
    first_line: int
    last_line: int
    text: str
    title: str = ""


@dataclass(frozen=True, slots=True)
class Hit:
    """A passage a search found, with its BM25 score (higher is better)."""

    passage: Passage
    score: float
    snippet: str

    def to_dict(self) -> dict[str, Any]:
        """The contract's result entry: ``{"path", "score", "lines", "snippet"}``."""
        return {"path": self.passage.path, "score": self.score,
                "lines": [self.passage.first_line, self.passage.last_line],
                "snippet": self.snippet}


@dataclass(slots=True)
class SyncStats:
    """What :meth:`SearchIndex.sync_directory` did, for the result's ``corpus.index``.

    Attributes:
        added: files indexed for the first time.
        updated: files whose content changed, indexed again.
        removed: files gone from the directory, dropped from the index.
        unchanged: files left as they were.
        skipped: files this sync found it cannot index (too big, not text, over the file
            cap), with why; the first :data:`MAX_LISTED_SKIPS` of them.
        not_indexed: files of the directory not in the index (skipped now or before).
    """

    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    unchanged: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)
    not_indexed: int = 0

    def skip(self, path: str, reason: str) -> None:
        """Note a file left out of the index (listed up to :data:`MAX_LISTED_SKIPS`)."""
        if len(self.skipped) < MAX_LISTED_SKIPS:
            self.skipped.append({"path": path, "reason": reason})

    @property
    def reindexed(self) -> list[str]:
        """Files (re)indexed by this sync, sorted."""
        return sorted(self.added + self.updated)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly view."""
        return {"added": sorted(self.added), "updated": sorted(self.updated),
                "removed": sorted(self.removed), "reindexed": self.reindexed,
                "unchanged": self.unchanged, "skipped": self.skipped,
                "not_indexed": self.not_indexed}


# ------------------------------------------------------------------ text helpers

def words(text: str) -> list[str]:
    """The lowercase words of ``text`` (letters and digits; ``_`` and marks split)."""
    return [w.lower() for w in WORD.findall(text)]


def stem(word: str) -> str:
    """A light English stem, the same for a word's plural and -ing/-ed forms.

    Only used to compare the query with sentences in Python (FTS5 stems with Porter on
    its side); it needs to be consistent, not linguistically right.
    """
    if len(word) <= 3:
        return word
    for suffix, replacement in (("ies", "y"), ("ing", ""), ("ed", ""), ("ly", ""),
                                ("s", "")):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3 and not word.endswith("ss"):
            return word[: len(word) - len(suffix)] + replacement
    return word


def content_terms(text: str) -> list[str]:
    """Stems of the words of ``text`` that are not stop words."""
    return [stem(w) for w in words(text) if w not in STOP_WORDS and len(w) > 1]


def fts_query(text: str) -> str | None:
    """A safe FTS5 MATCH expression for free text, or None when it has no searchable word.

    Every term is double-quoted, so FTS5 syntax in the text (``"``, ``(``, ``*``, ``NEAR``,
    ``AND``, ``-``, ``:``) is taken as words or dropped, never parsed; stop words go unless
    nothing else is left; the terms are OR-ed so BM25 ranks partial matches too.
    """
    tokens = list(dict.fromkeys(words(text)))
    kept = [t for t in tokens if t not in STOP_WORDS and (len(t) > 1 or t.isdigit())]
    chosen = (kept or tokens)[:MAX_QUERY_TERMS]
    if not chosen:
        return None
    return " OR ".join(f'"{t}"' for t in chosen)


def split_passages(path: str, content: str) -> list[Passage]:
    """Cut a document into passages: paragraphs (blank-line separated), short ones merged
    with the next, long ones cut into windows of :data:`MAX_PASSAGE_LINES` lines.

    A fenced code block (```` ``` ```` or ``~~~``) is one block, blank lines and all, and
    is cut into windows only past :data:`MAX_CODE_PASSAGE_LINES`: a passage then never
    starts inside code, so the researcher can tell code from prose by its fences.
    """
    lines = content.splitlines()
    path_words = " ".join(words(PurePosixPath(path).as_posix()))
    blocks: list[tuple[int, int]] = []  # 0-based [start, end)
    code: set[int] = set()  # starts of fenced blocks
    start: int | None = None
    fence_open = False
    for i, line in enumerate(lines):
        if FENCE.match(line):
            if not fence_open:
                if start is not None:
                    blocks.append((start, i))
                start, fence_open = i, True
                code.add(i)
            else:
                blocks.append((start if start is not None else i, i + 1))
                start, fence_open = None, False
            continue
        if fence_open or line.strip():
            if start is None:
                start = i
        elif start is not None:
            blocks.append((start, i))
            start = None
    if start is not None:
        blocks.append((start, len(lines)))
    merged: list[tuple[int, int]] = []
    for block in blocks:
        if merged:
            prev = merged[-1]
            if prev[1] - prev[0] < MIN_PASSAGE_LINES and block[0] not in code \
                    and block[1] - prev[0] <= MAX_PASSAGE_LINES:
                merged[-1] = (prev[0], block[1])
                continue
        merged.append(block)
    passages: list[Passage] = []
    heading = ""
    for first, end in merged:
        size = MAX_CODE_PASSAGE_LINES if first in code else MAX_PASSAGE_LINES
        for window in range(first, end, size):
            stop = min(end, window + size)
            chunk = lines[window:stop]
            for line in chunk:
                match = HEADING.match(line)
                if match:
                    heading = match.group(2)
                    break
            passages.append(Passage(path, window + 1, stop, "\n".join(chunk),
                                    f"{path_words} {heading}".strip()))
    return passages


def document_key(documents: Iterable[tuple[str, str]]) -> str:
    """A hash naming a set of ``(path, content)`` documents, whatever their order."""
    digest = hashlib.sha256()
    for path, content in sorted(documents):
        digest.update(path.encode() + b"\0")
        digest.update(hashlib.sha256(content.encode("utf-8", "surrogatepass")).digest())
    return digest.hexdigest()


# ------------------------------------------------------------------ the index

_SCHEMA: Final = (
    "CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    ("CREATE TABLE IF NOT EXISTS files(path TEXT PRIMARY KEY, size INTEGER NOT NULL, "
     "mtime_ns INTEGER NOT NULL, sha256 TEXT NOT NULL, indexed_ns INTEGER NOT NULL)"),
    # Where each passage is: the FTS table's rowid is the span's id. Kept apart from the
    # FTS table so that dropping a file's passages is an index lookup, not a scan.
    ("CREATE TABLE IF NOT EXISTS spans(id INTEGER PRIMARY KEY, path TEXT NOT NULL, "
     "first_line INTEGER NOT NULL, last_line INTEGER NOT NULL)"),
    "CREATE INDEX IF NOT EXISTS spans_path ON spans(path)",
    ("CREATE VIRTUAL TABLE IF NOT EXISTS passages USING fts5(body, title, "
     "tokenize = 'porter unicode61 remove_diacritics 2')"),
)


class SearchIndex:
    """A BM25 index of passages in one SQLite database (a file, or memory).

    Thread-safe: every call holds the index's lock, so an agent may call it from worker
    threads (``asyncio.to_thread``) while its event loop keeps heartbeating. Writes run
    in ``BEGIN IMMEDIATE`` transactions, so two processes sharing an index file (two
    researchers of one data dir) take turns instead of interleaving a sync.
    """

    def __init__(self, connection: sqlite3.Connection) -> None:
        connection.isolation_level = None  # transactions are ours: see _write
        self._db = connection
        self._lock = threading.Lock()
        with self._lock, self._write():
            version = self._version()
            if version not in (None, SCHEMA_VERSION):
                # An index written by another layout: rebuilt from the files, never misread.
                for table in ("passages", "spans", "files", "meta"):
                    self._db.execute(f"DROP TABLE IF EXISTS {table}")
            for statement in _SCHEMA:
                self._db.execute(statement)
            self._db.execute("INSERT OR REPLACE INTO meta VALUES ('schema', ?)",
                             (SCHEMA_VERSION,))

    @contextlib.contextmanager
    def _write(self) -> Iterator[None]:
        """One write transaction, taken at once (``IMMEDIATE``), rolled back on error."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _version(self) -> str | None:
        try:
            row = self._db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
        except sqlite3.OperationalError:
            return None
        return None if row is None else str(row[0])

    @classmethod
    def memory(cls) -> SearchIndex:
        """An index in memory (the documents of a task)."""
        return cls(sqlite3.connect(":memory:", check_same_thread=False))

    @classmethod
    def open(cls, path: Path) -> SearchIndex:
        """The index in the SQLite file ``path`` (created with its directory if needed)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(str(path), check_same_thread=False,
                                     timeout=BUSY_TIMEOUT_S)
        connection.execute("PRAGMA journal_mode = WAL")
        return cls(connection)

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------ writing

    def add_document(self, path: str, content: str) -> int:
        """Index one document (replacing what the index had of it); its passage count."""
        encoded = content.encode("utf-8", "surrogatepass")
        with self._lock, self._write():
            count = self._replace(path, content)
            self._db.execute("INSERT OR REPLACE INTO files VALUES (?, ?, 0, ?, ?)",
                             (path, len(encoded), hashlib.sha256(encoded).hexdigest(),
                              time.time_ns()))
            return count

    def _drop(self, path: str) -> None:
        self._db.execute("DELETE FROM passages WHERE rowid IN "
                         "(SELECT id FROM spans WHERE path = ?)", (path,))
        self._db.execute("DELETE FROM spans WHERE path = ?", (path,))

    def _replace(self, path: str, content: str) -> int:
        self._drop(path)
        passages = split_passages(path, content)
        for p in passages:
            span = self._db.execute("INSERT INTO spans(path, first_line, last_line) "
                                    "VALUES (?, ?, ?)", (p.path, p.first_line, p.last_line))
            self._db.execute("INSERT INTO passages(rowid, body, title) VALUES (?, ?, ?)",
                             (span.lastrowid, p.text, p.title))
        return len(passages)

    def sync_directory(self, root: Path) -> SyncStats:
        """Bring the index up to date with the text files under ``root``.

        A file is read and hashed only when its size or mtime changed (or it was modified
        within :data:`RACY_WINDOW_NS` of its last indexing), and re-indexed only when its
        hash changed. Files gone from ``root`` are dropped. A file that cannot be indexed
        (binary, too big) is remembered as such, and read again only once it changes.
        Hidden files and directories, caches (:data:`SKIPPED_DIRS`) and symbolic links are
        left out.

        Raises:
            CorpusError: ``root`` is not a directory.
        """
        if not root.is_dir():
            raise CorpusError(f"research corpus {root} is not a directory")
        stats = SyncStats()
        with self._lock, self._write():
            known = {row[0]: (row[1], row[2], row[3], row[4]) for row in
                     self._db.execute("SELECT path, size, mtime_ns, sha256, indexed_ns "
                                      "FROM files")}
            seen: set[str] = set()
            for rel, full in _walk(root):
                if len(seen) >= MAX_FILES:
                    stats.skip(rel, f"over {MAX_FILES} files")
                    continue
                seen.add(rel)
                self._sync_file(rel, full, known.get(rel), stats)
            for gone in sorted(set(known) - seen):
                self._drop(gone)
                self._db.execute("DELETE FROM files WHERE path = ?", (gone,))
                if known[gone][2] != NOT_INDEXED:
                    stats.removed.append(gone)
        return stats

    def _sync_file(self, rel: str, full: Path, known: tuple[int, int, str, int] | None,
                   stats: SyncStats) -> None:
        try:
            info = full.stat()
        except OSError as error:
            stats.skip(rel, f"cannot stat: {error.strerror}")
            return
        if known is not None and known[0] == info.st_size and known[1] == info.st_mtime_ns \
                and info.st_mtime_ns < known[3] - RACY_WINDOW_NS:
            if known[2] == NOT_INDEXED:
                stats.not_indexed += 1
            else:
                stats.unchanged += 1
            return
        content, reason = _read_text(full, info.st_size)
        now_ns = time.time_ns()
        if content is None:
            # Remembered as not indexed, so it is not read again until it changes.
            self._drop(rel)
            self._db.execute("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?)",
                             (rel, info.st_size, info.st_mtime_ns, NOT_INDEXED, now_ns))
            stats.not_indexed += 1
            if known is None or known[2] != NOT_INDEXED:
                stats.skip(rel, reason)
            return
        digest = hashlib.sha256(content.encode("utf-8", "surrogatepass")).hexdigest()
        row = (rel, info.st_size, info.st_mtime_ns, digest, now_ns)
        if known is not None and known[2] == digest:
            # Touched, not changed: remember the new mtime so the next sync skips it.
            self._db.execute("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?)", row)
            stats.unchanged += 1
            return
        self._replace(rel, content)
        self._db.execute("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?)", row)
        (stats.added if known is None or known[2] == NOT_INDEXED else stats.updated).append(rel)

    # ------------------------------------------------------------ reading

    def search(self, text: str, limit: int = 5) -> list[Hit]:
        """The passages best matching free ``text``, best first (BM25)."""
        query = fts_query(text)
        if query is None or limit < 1:
            return []
        with self._lock:
            rows = self._db.execute(
                "SELECT spans.path, spans.first_line, spans.last_line, body, title, "
                f"bm25(passages, {BODY_WEIGHT}, {TITLE_WEIGHT}) AS rank, "
                f"snippet(passages, 0, '', '', ' … ', {SNIPPET_TOKENS}) "
                "FROM passages JOIN spans ON spans.id = passages.rowid "
                "WHERE passages MATCH ? ORDER BY rank LIMIT ?", (query, limit)).fetchall()
        return [Hit(Passage(path, int(first), int(last), body, title),
                    round(-float(rank), 4), " ".join(snippet.split()))
                for path, first, last, body, title, rank, snippet in rows]

    def document_count(self) -> int:
        """How many documents the index holds."""
        with self._lock:
            row = self._db.execute("SELECT COUNT(*) FROM files WHERE sha256 != ?",
                                   (NOT_INDEXED,)).fetchone()
        return int(row[0])

    def passage_count(self) -> int:
        """How many passages the index holds."""
        with self._lock:
            row = self._db.execute("SELECT COUNT(*) FROM spans").fetchone()
        return int(row[0])


def _walk(root: Path) -> Iterator[tuple[str, Path]]:
    """``(relative posix path, full path)`` of the regular files under ``root``, sorted,
    hidden entries and symbolic links left out."""
    for directory, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                             and d not in SKIPPED_DIRS
                             and not os.path.islink(os.path.join(directory, d)))
        for name in sorted(filenames):
            full = Path(directory, name)
            if name.startswith(".") or full.is_symlink() or not full.is_file():
                continue
            yield full.relative_to(root).as_posix(), full


def _read_text(path: Path, size: int) -> tuple[str | None, str]:
    """The file's text, or None and why not: too big, a binary suffix, a NUL byte, not
    UTF-8, unreadable."""
    if size > MAX_FILE_BYTES:
        return None, f"over {MAX_FILE_BYTES} bytes"
    if path.suffix.lower() in BINARY_SUFFIXES:
        return None, "a binary file type"
    try:
        raw = path.read_bytes()
    except OSError as error:
        return None, f"cannot read: {error.strerror}"
    if b"\0" in raw[:8192]:
        return None, "binary (a NUL byte)"
    try:
        return raw.decode("utf-8"), ""
    except UnicodeDecodeError:
        return None, "not UTF-8 text"


__all__ = ["CorpusError", "FENCE", "HEADING", "Hit", "MAX_PASSAGE_LINES", "Passage",
           "STOP_WORDS", "SearchIndex", "SyncStats", "content_terms", "document_key",
           "fts_query", "split_passages", "stem", "words"]
