"""The planner: free text to a workflow, deterministic and rule-based, needing nothing else.

``orchestrator submit "Analyze this codebase for security issues"`` (no ``--capability``)
comes here. :func:`plan` reads the text in three passes:

1. **Targets**, found by their shape rather than by wording: paths that exist (``./src``,
   ``lib/``, ``README.md``, or a bare word naming a directory here), a pull request
   (``PR 45``, ``pull request #123``), a revision range (``main..HEAD``), "since main",
   "my last 3 commits", uncommitted work.
2. **Concepts**: the words, lower-cased, are matched against a lexicon of concepts
   (security, performance, review, inspection, codebase, change, research, summary, build,
   ...). A lexicon entry of five letters or more is a stem and matches every word it starts
   (``vulnerab``: vulnerable, vulnerabilities); one of seven or more also forgives one typo
   after the first two letters (``secuirty``, ``perfomance``); a shorter entry matches
   itself and its inflections (``scan``: scanned, scanning). So the planner reads phrasings nobody wrote down, as long as their
   words share a stem with the lexicon, or nearly do.
3. **Scoring**: each intent sums the weights of the concepts and target features it cares
   about (a path favours analysing files and disfavours research; a question favours
   research); the concept of the leading verb counts extra, since "Research X security"
   is research and "Audit X for security" is an audit. An intent also has a gate (security
   needs a security word) and the best score must reach a threshold. Ties go to the first
   intent in :class:`Intent`'s order. Nothing is random, so the same text in the same
   directory gives the same plan.

The plans, every one validated by :meth:`Workflow.from_dict`'s rules (names, kinds):

- security / performance / code review of a tree or of a change: a map-reduce of
  ``security_audit`` / ``performance_analysis`` / ``code_review`` over batches of files,
  reduced by ``synthesis``. Each map item is ``{"files": [{"path", "content"}, ...]}``; for
  a change each file also has ``status`` and ``changed_lines`` (``[[first, last], ...]``)
  and the item has ``"change"`` (what was asked for), so reviewers report only on those.
- summary: a map-reduce of ``summarization`` over documents, reduced by ``synthesis``.
- refactoring: a map-reduce of ``refactoring`` over batches, reduced by ``aggregation``.
- debugging: one ``debugging`` task carrying the whole project (it runs the tests).
- research: a map-reduce of ``search`` (or ``document_analysis`` when only that is online)
  over 4-5 aspect queries (``{"query", "aspect", "topic"}``), reduced by ``synthesis``.
- build: the pipeline ``search`` -> ``code_generation`` -> ``code_review`` on
  ``{"specification", "language", "query"}``.

An LLM planner plugs in through the :class:`Planner` protocol; what it proposes is checked
by :func:`validate_proposal` (the definition's schema, the run input, and the capabilities
online) before anything runs. This module makes no network call.
"""

from __future__ import annotations

import functools
import logging
import math
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Final, Protocol

from workflows.files import DEFAULT_BATCH_BYTES, ChangeRequest, FilesError, LastCommits, \
    PullRequest, RevisionRange, SinceRevision, SkippedFile, collect_changes, collect_files, \
    default_branch, pack_batches
from workflows.model import Approval, Consensus, DefinitionError, MapReduce, Node, Pipeline, \
    ReviewLoop, TaskStep, Workflow, format_path

logger = logging.getLogger(__name__)

#: Files the code analyses read. The built-in reviewer analyses Python (bandit, the AST),
#: the same files ``bandit -r`` scans; a reviewer for more languages widens this.
CODE_SUFFIXES: Final = (".py", ".pyw")
#: Files a summary of "the docs" reads.
DOC_SUFFIXES: Final = (".md", ".markdown", ".rst", ".txt", ".adoc", ".org")
#: Map tasks running at once in a planned map-reduce, at most.
DEFAULT_MAX_PARALLEL: Final = 32
#: Share of map items that must succeed for the reduce to run: a batch that failed is
#: reported in the result, not allowed to sink the whole report.
ANALYSIS_MIN_SUCCESS: Final = 0.9
#: Research is useful with half of its aspects answered.
RESEARCH_MIN_SUCCESS: Final = 0.5
#: Whole deadline of one map task (a batch of files or one aspect) and of a reduce.
MAP_TIMEOUT_S: Final = 300.0
REDUCE_TIMEOUT_S: Final = 300.0
#: Whole deadline of each step of a build (generation with an LLM is slow).
BUILD_STEP_TIMEOUT_S: Final = 900.0
#: Bytes one debugging task may carry: the whole project travels in it.
DEBUG_MAX_BYTES: Final = 16 * 1024 * 1024
#: Bytes of documents a research task may carry as its corpus (each aspect carries it).
RESEARCH_CORPUS_MAX_BYTES: Final = 4 * 1024 * 1024
#: A request longer than this is refused: requests are a sentence or two, and reading
#: costs a lexicon pass per word.
MAX_TEXT_CHARS: Final = 4000
#: The best intent's score must reach this for the text to be planned at all.
MIN_SCORE: Final = 3.0
#: Extra weight for the concept of the text's leading word (its verb, usually).
LEAD_BONUS: Final = 1.5
#: Lexicon entries this long or longer are stems (they match every word they start).
STEM_MIN_CHARS: Final = 5
#: Entries this long or longer also forgive one typo. Shorter stems would forgive too much:
#: "condens" is one letter from "consens(us)".
FUZZY_MIN_CHARS: Final = 7


class PlanError(ValueError):
    """Raised when a text cannot be planned: the root of the planner's errors. The
    message is one line."""


class Unplannable(PlanError):
    """Raised when the planner cannot tell what a text asks for.

    Attributes:
        text: the text.
        capabilities: what the agents online offer (None: not known).
    """

    def __init__(self, text: str, capabilities: Collection[str] | None) -> None:
        self.text = text
        self.capabilities = None if capabilities is None else tuple(sorted(capabilities))
        shown = " ".join(text.split())
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        if self.capabilities is None:
            offer = ("the planner knows security and performance audits, code reviews of a "
                     "tree or a change, summaries, refactoring, debugging, research and builds")
        elif not self.capabilities:
            offer = "no agent is online"
        else:
            offer = f"the agents online can do: {', '.join(self.capabilities)}"
        super().__init__(f"cannot plan {shown!r}: {offer}; to send the text to one of them "
                         "as it is, use --capability NAME")


class InvalidPlan(PlanError):
    """Raised when a proposed plan (from an LLM) fails validation.

    Attributes:
        path: the offending field from the proposal's root (empty: the whole proposal).
        reason: what is wrong.
    """

    def __init__(self, path: tuple[str | int, ...], reason: str) -> None:
        self.path = path
        self.reason = reason
        where = format_path(path)
        super().__init__(f"invalid plan: {where}: {reason}" if where else f"invalid plan: {reason}")


class Intent(StrEnum):
    """What a text asks for; the order breaks ties between equal scores."""

    SECURITY = "security"
    PERFORMANCE = "performance"
    REVIEW = "review"
    SUMMARIZE = "summarize"
    REFACTOR = "refactor"
    DEBUG = "debug"
    RESEARCH = "research"
    BUILD = "build"


# --- the lexicon ---------------------------------------------------------------------------

#: Concepts and the words that signal them (see the module docstring for how they match).
CONCEPTS: Final[dict[str, tuple[str, ...]]] = {
    "security": (
        "secur", "security", "insecur", "vulnerab", "vulnerability", "vuln", "exploit",
        "inject", "injection", "xss", "csrf", "ssrf",
        "xxe", "cve", "cwe", "attack", "threat", "unsafe", "danger", "malici", "malware",
        "backdoor", "owasp", "sqli", "rce", "pentest", "penetration", "taint", "sanitiz",
        "sanitis", "harden", "breach", "leak", "secret", "credential", "password", "hack",
        "compromis", "privilege", "bandit", "weakness", "deserializ", "traversal", "hole",
        "abuse", "cryptograph", "safety",
    ),
    "performance": (
        "performan", "performance", "speed", "fast", "faster", "slow", "latenc", "bottleneck", "effici",
        "ineffici", "optimi", "optimis", "hotspot", "hot path", "quadratic", "memory", "cpu",
        "throughput", "profil", "sluggish", "lag", "laggy", "scalab", "perf", "expensive",
    ),
    "review": (
        "review", "critiq", "critic", "feedback", "lgtm", "quality", "smell", "maintainab",
        "readab", "style", "lint", "look over", "read over", "look through", "go over",
        "go through", "second opinion", "sanity check", "proofread", "nitpick",
    ),
    "inspect": (
        "audit", "scan", "check", "inspect", "analy", "analyze", "analyse", "examin", "assess", "look", "find",
        "detect", "hunt", "vet", "probe", "sweep", "investigat", "scrutin", "evaluat",
        "spot", "identif", "search", "flag", "catch", "report",
    ),
    "codebase": (
        "codebase", "code", "source", "sourcecode", "src", "project", "repo", "repositor",
        "file", "module", "tree", "director", "folder", "packag", "app", "lib", "script",
        "dir", "program", "implementation",
    ),
    "change": (
        "pr", "pull request", "merge request", "mr", "diff", "patch", "chang", "commit",
        "branch", "since", "staged", "uncommitted", "delta", "changeset", "revision",
    ),
    "research": (
        "research", "investigat", "investigate", "learn", "know", "known", "knowledge", "explor", "study",
        "studies", "survey", "overview", "compar", "state of the art", "literature",
        "find out", "tell me", "explain", "understand", "background", "pros", "cons",
        "tradeoff", "trade off", "alternativ", "look into", "dig into", "read up", "informat",
        "deep dive", "history", "landscape", "versus", "vs", "differen", "introduc",
    ),
    "summarize": (
        "summar", "summaris", "summarize", "summarise", "summary", "tldr", "tl dr",
        "digest", "recap", "condense", "brief",
        "outline", "gist", "abstract", "key points", "synops", "overview",
    ),
    "docs": (
        "doc", "docs", "document", "readme", "note", "paper", "article", "manual", "guide",
        "wiki", "spec", "text", "markdown", "md", "chapter", "report", "changelog",
    ),
    "build": (
        "build", "creat", "implement", "write", "develop", "make", "generat",
        "generate", "scaffold",
        "code up", "add", "prototyp", "construct", "set up", "setup", "produc", "compose",
        "bootstrap", "spin up", "put together", "whip up", "draft", "craft", "design",
    ),
    "artifact": (
        "api", "rest", "endpoint", "servic", "server", "module", "parser", "function",
        "class", "librar", "app", "applica", "cli", "tool", "script", "bot", "websit", "site",
        "page", "databas", "db", "schema", "client", "compon", "feature", "system",
        "authent", "login", "crud", "microservic", "plugin", "extension", "widget", "form",
        "handler", "middleware", "wrapper", "sdk", "store", "cache", "queue", "scraper",
        "crawler", "convert", "validat", "generator", "calculat", "interface", "ui",
        "dashboard", "backend", "frontend", "algorithm", "program", "game", "engine",
        "framework", "daemon", "webhook", "pipeline", "command", "utility", "helper", "mvp",
        "todo", "chat", "blog", "shop", "model", "test", "prototype", "linter", "compiler",
        "interpreter", "emulator", "simulat", "solver", "lexer", "tokeniz", "router",
        "proxy", "scheduler", "logger", "monitor", "tracker", "manager", "counter", "timer",
    ),
    "language": (
        "python", "rust", "go", "golang", "java", "javascript", "typescript", "ruby",
        "kotlin", "swift", "php", "scala", "haskell", "elixir", "bash", "shell", "sql",
        "node", "nodejs", "react", "django", "flask", "fastapi", "cpp", "csharp", "js", "ts",
    ),
    "refactor": (
        "refactor", "refactoring", "restructur", "clean up", "cleanup", "tidy", "simplif", "reformat",
        "format", "moderniz", "modernis", "rewrite", "dedup", "reorganiz", "reorganis",
        "untangl", "decoupl",
    ),
    "debug": (
        "debug", "fix", "failing", "fail", "fails", "failure", "broken", "crash", "error",
        "traceback", "exception", "stack trace", "not working", "flaky", "red",
    ),
    "tests": ("test", "pytest", "unittest", "suite"),
}

#: Per intent: weights of concepts and of target features (``@path``: a path was named,
#: ``@change``: a change was named by its shape (a PR, a range), ``@question``).
WEIGHTS: Final[dict[Intent, dict[str, float]]] = {
    Intent.SECURITY: {"security": 4, "inspect": 1, "codebase": 1, "review": 0.5,
                      "@path": 1.5, "@change": 1},
    Intent.PERFORMANCE: {"performance": 4, "inspect": 1, "codebase": 1, "review": 0.5,
                         "@path": 1.5, "@change": 1},
    Intent.REVIEW: {"review": 3, "inspect": 1, "codebase": 1, "change": 1.5, "@path": 1.5,
                    "@change": 3},
    Intent.SUMMARIZE: {"summarize": 4, "docs": 1.5, "codebase": 0.5, "@path": 1.5},
    Intent.REFACTOR: {"refactor": 4, "codebase": 1, "@path": 1.5},
    Intent.DEBUG: {"debug": 2.5, "tests": 1.5, "codebase": 0.5, "@path": 1.5},
    Intent.RESEARCH: {"research": 3.5, "@question": 3, "@path": -1, "@change": -3},
    Intent.BUILD: {"build": 2.5, "artifact": 1.5, "language": 1},
}

#: Per intent: it is considered only when one of these is present. ``@inspect_code`` is
#: an inspection verb aimed at code, a path or a change ("look at PR 4", "check ./src").
GATES: Final[dict[Intent, frozenset[str]]] = {
    Intent.SECURITY: frozenset({"security"}),
    Intent.PERFORMANCE: frozenset({"performance"}),
    Intent.REVIEW: frozenset({"review", "@inspect_code", "@change"}),
    Intent.SUMMARIZE: frozenset({"summarize"}),
    Intent.REFACTOR: frozenset({"refactor"}),
    Intent.DEBUG: frozenset({"debug"}),
    Intent.RESEARCH: frozenset({"research", "@question"}),
    Intent.BUILD: frozenset({"@build_thing"}),
}

#: Words that carry no request ("please could you", "I'd like to"): skipped when finding
#: the leading word and stripped from topics.
FILLERS: Final = frozenset({
    "please", "pls", "can", "could", "would", "will", "you", "i", "we", "d", "like", "want",
    "wanna", "need", "to", "help", "me", "us", "let", "lets", "s", "go", "ahead", "and",
    "kindly", "hey", "hi", "hello", "just", "quickly", "now", "then", "also", "ok", "okay",
    "so", "do", "a", "an", "the", "some", "quick", "thorough", "full", "deep", "run",
    "perform", "carry", "out", "give", "get", "thanks", "thank", "m", "ll", "re", "ve",
})
QUESTION_WORDS: Final = frozenset({"what", "whats", "how", "why", "which", "who", "when",
                                   "where"})
_YES_NO_STARTS: Final = frozenset({"is", "are", "does", "do", "did", "should", "can", "could",
                                   "will", "would", "was", "were", "has", "have"})
#: Words between a research verb and its topic ("learn more about X").
_TOPIC_LEADS: Final = FILLERS | QUESTION_WORDS | _YES_NO_STARTS | frozenset({
    "about", "on", "into", "regarding", "of", "more", "up", "is", "are", "known", "there",
    "between", "for", "anything", "everything", "all", "info", "topic", "subject", "tell",
    "show", "teach", "whether"})
#: Verbs that ask for research, stripped from the front of a topic; the nouns of the
#: research concept ("history", "landscape") stay: they are part of what is asked.
_RESEARCH_VERBS: Final = ("research", "investigat", "learn", "know", "known", "explor",
                          "study", "studi", "survey", "find", "explain", "understand",
                          "look", "dig", "read", "compar", "describ", "discover", "examin",
                          "search")
_TOPIC_TAILS: Final = frozenset({"work", "works", "mean", "means", "please", "do", "does",
                                 "for", "me", "in", "detail", "depth", "thanks"})
#: Words never taken for a path even when a file of that name exists here.
_NOT_PATHS: Final = FILLERS | QUESTION_WORDS | _YES_NO_STARTS | frozenset({
    "this", "that", "it", "my", "our", "your", "for", "in", "of", "on", "at", "with", "all"})
_LANGUAGE_NAMES: Final = {"golang": "go", "js": "javascript", "ts": "typescript",
                          "nodejs": "javascript", "node": "javascript", "react": "javascript",
                          "django": "python", "flask": "python", "fastapi": "python",
                          "cpp": "c++", "csharp": "c#"}
_NUMBER_WORDS: Final = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6,
                        "seven": 7, "eight": 8, "nine": 9, "ten": 10, "few": 3, "couple": 2,
                        "couple of": 2}

_WORD: Final = re.compile(r"[a-z0-9]+")
_PR: Final = re.compile(r"\b(?:pull[\s_-]*requests?|prs?|merge[\s_-]*requests?|mrs?)\s*"
                        r"(?:#|no\.?\s*|number\s*|num\s*)?(\d{1,9})\b", re.IGNORECASE)
_HASH_NUMBER: Final = re.compile(r"(?<![\w/&])#(\d{1,9})\b")
_RANGE: Final = re.compile(r"(?<!\S)([A-Za-z0-9_@][\w./~^@{}-]*?)(\.\.\.?)([\w./~^@{}-]*?)"
                           r"(?=[\s,;:!?)]|$)")
_SINCE: Final = re.compile(r"\b(?:since|against|compared\s+(?:to|with)|relative\s+to)\s+"
                           r"(?:the\s+)?(?:branch\s+|tag\s+|commit\s+)?([\w./~^@{}-]+)",
                           re.IGNORECASE)
_LAST: Final = re.compile(r"\b(?:last|past|previous|latest|recent|most\s+recent|final)\s+"
                          r"(?:(\d{1,4}|one|two|three|four|five|six|seven|eight|nine|ten|few|"
                          r"couple(?:\s+of)?)\s+)?commits?\b", re.IGNORECASE)
_ONE_COMMIT: Final = re.compile(r"\b(?:this|that|my|the|head)\s+commit\b", re.IGNORECASE)
_WORKTREE: Final = re.compile(r"\b(?:uncommitted|unstaged|staged|working\s+(?:tree|copy|"
                              r"directory)|local\s+changes|pending\s+changes)\b", re.IGNORECASE)
_COMPARISON_SPLIT: Final = re.compile(r"\s+(?:vs\.?|versus|and|or|with|to|against)\s+|\s*,\s*",
                                      re.IGNORECASE)
_SENTENCE_END: Final = ".,;:!?\"'`)]}>"


@functools.lru_cache(maxsize=4096)
def _inflections(stem: str) -> frozenset[str]:
    """A short lexicon word and its inflections: scan -> scans, scanned, scanning."""
    forms = {stem, stem + "s", stem + "es", stem + "ed", stem + "d", stem + "ing", stem + "er",
             stem + "ers", stem + "y", stem + "ly"}
    if stem.endswith("e"):
        forms |= {stem[:-1] + "ing", stem[:-1] + "ion"}
    if stem[-1:] not in "aeiouwxy":
        forms |= {stem + stem[-1] + ending for ending in ("ing", "ed", "er", "y")}
    return frozenset(forms)


def _distance_at_most_one(left: str, right: str) -> bool:
    """Whether two words are equal but for one edit (insert, delete, change, swap)."""
    if abs(len(left) - len(right)) > 1:
        return False
    if len(left) == len(right):
        diffs = [i for i, (a, b) in enumerate(zip(left, right)) if a != b]
        return len(diffs) <= 1 or (len(diffs) == 2 and diffs[1] == diffs[0] + 1 and
                                   left[diffs[0]] == right[diffs[1]] and
                                   left[diffs[1]] == right[diffs[0]])
    short, long_ = (left, right) if len(left) < len(right) else (right, left)
    index = next((i for i, (a, b) in enumerate(zip(short, long_)) if a != b), len(short))
    return short[index:] == long_[index + 1:]


@functools.lru_cache(maxsize=65536)
def word_matches(token: str, entry: str) -> bool:
    """Whether ``token`` (a lower-case word) is what lexicon ``entry`` stands for.

    An entry of :data:`STEM_MIN_CHARS` letters or more matches every word it starts; one
    of :data:`FUZZY_MIN_CHARS` or more also matches a word whose start is one typo away
    from it (the first two letters must agree: typos rarely hit them). A shorter entry
    matches itself and its inflections.
    """
    if len(entry) < STEM_MIN_CHARS:
        return token in _inflections(entry)
    if token.startswith(entry):
        return True
    if len(entry) < FUZZY_MIN_CHARS or len(token) < FUZZY_MIN_CHARS - 1 or \
            token[:2] != entry[:2]:
        return False
    return any(_distance_at_most_one(token[:size], entry)
               for size in (len(entry) - 1, len(entry), len(entry) + 1) if size <= len(token))


def find_concepts(tokens: tuple[str, ...]) -> dict[str, frozenset[int]]:
    """Concept -> the indexes of the tokens that signal it."""
    found: dict[str, set[int]] = {}
    for concept, entries in CONCEPTS.items():
        for entry in entries:
            parts = entry.split()
            for start in range(len(tokens) - len(parts) + 1):
                if all(word_matches(tokens[start + k], part) for k, part in enumerate(parts)):
                    found.setdefault(concept, set()).update(range(start, start + len(parts)))
    return {concept: frozenset(where) for concept, where in found.items()}


# --- reading a text ----------------------------------------------------------------------


@dataclass(frozen=True)
class Reading:
    """What the planner read in a text.

    Attributes:
        text: the text as given.
        tokens: its words, lower-case, with paths and revision ranges taken out.
        concepts: concept -> indexes of the tokens that signal it.
        lead: the concepts of the leading word (after fillers such as "please").
        question: the text asks a question.
        path: an existing file or directory the text names, resolved.
        path_text: that path as written.
        change: a change named by its shape (pull request, range, last commits...).
        generic_change: the text speaks of changes without naming which ("my changes").
    """

    text: str
    tokens: tuple[str, ...]
    concepts: Mapping[str, frozenset[int]]
    lead: frozenset[str]
    question: bool
    path: Path | None
    path_text: str | None
    change: ChangeRequest | None
    generic_change: bool

    def features(self) -> frozenset[str]:
        """Concepts present, plus the ``@`` target features the weights use."""
        out = set(self.concepts)
        if self.path is not None:
            out.add("@path")
        if self.change is not None:
            out.add("@change")
        if self.question:
            out.add("@question")
        if "inspect" in out and out & {"codebase", "@path", "@change", "change"}:
            out.add("@inspect_code")
        if "build" in out and out & {"artifact", "language"}:
            out.add("@build_thing")
        return frozenset(out)

    def words_for(self, concept: str) -> list[str]:
        """The text's words that signalled ``concept``, for explanations."""
        return [self.tokens[i] for i in sorted(self.concepts.get(concept, ()))]


def read(text: str, cwd: Path) -> Reading:
    """Read targets and concepts from ``text`` (see the module docstring).

    Raises:
        PlanError: the text names a path (``./x``, ``/x``, ``~/x``) that does not exist.
    """
    path_text, path = _find_path(text, cwd)
    masked = text
    if path_text:
        masked = masked.replace(path_text, " ")
    masked = _RANGE.sub(" ", masked)
    tokens = tuple(_WORD.findall(masked.lower()))
    concepts = find_concepts(tokens)
    lead_index = next((i for i, t in enumerate(tokens) if t not in FILLERS), None)
    lead = frozenset(c for c, where in concepts.items() if lead_index in where)
    words = _WORD.findall(text.lower())
    question = bool(words) and (words[0] in QUESTION_WORDS or (
        text.rstrip().endswith("?") and words[0] in _YES_NO_STARTS))
    change = _find_change(text, concepts)
    generic = change is None and "change" in concepts
    return Reading(text, tokens, concepts, lead, question, path, path_text, change, generic)


def _find_path(text: str, cwd: Path) -> tuple[str | None, Path | None]:
    """The first path the text names that exists: explicit ones (``./src``, ``lib/``,
    ``notes.md``) first, then a bare word naming a file or directory here."""
    bare: tuple[str, Path] | None = None
    for raw in text.split():
        word = raw.strip("\"'`()[]{}<>,;:!?")
        while word.endswith(".") and word not in (".", "..") and not _exists(cwd, word):
            word = word[:-1]
        if not word:
            continue
        explicit = word.startswith(("/", "./", "../", "~/")) or word in (".", "..")
        shaped = explicit or "/" in word or re.search(r"\w\.[A-Za-z0-9]{1,8}$", word)
        exists = _exists(cwd, word)
        full = cwd / Path(word).expanduser() if exists else cwd
        if exists and shaped:
            return word, full.resolve()
        if exists and bare is None and word.lower() not in _NOT_PATHS and \
                ".." not in word and not word.startswith("#"):
            bare = (word, full.resolve())
        elif explicit and not exists:
            raise PlanError(f"no such file or directory: {word}")
    return bare if bare else (None, None)


def _exists(cwd: Path, word: str) -> bool:
    """Whether ``word`` names an existing file or directory, from ``cwd``; a word no file
    can be named (too long, a NUL, an unknown ``~user``) names none."""
    try:
        return (cwd / Path(word).expanduser()).exists()
    except (OSError, ValueError, RuntimeError):
        return False


def _find_change(text: str, concepts: Mapping[str, frozenset[int]]) -> ChangeRequest | None:
    """A change named by its shape. Pull requests, ranges and "last N commits" are
    unmistakable; "since X" and uncommitted work count only in a text about changes or
    reviews ("research Rome since 1900" is not a git range)."""
    if match := _PR.search(text) or (_HASH_NUMBER.search(text) if "#" in text else None):
        return PullRequest(int(match[1]))
    for match in _RANGE.finditer(text):
        left, right = match[1], match[3]
        if not left.endswith("/") and not right.startswith("/"):
            return RevisionRange(match[0])
    if match := _LAST.search(text):
        amount = (match[1] or "one").lower()
        count = int(amount) if amount.isdigit() else _NUMBER_WORDS.get(" ".join(amount.split()), 3)
        return LastCommits(max(1, count))
    if not concepts.keys() & {"change", "review", "inspect"}:
        return None
    if match := _SINCE.search(text):
        return SinceRevision(match[1].rstrip(_SENTENCE_END))
    if _WORKTREE.search(text):
        return SinceRevision("HEAD")
    if _ONE_COMMIT.search(text):
        return LastCommits(1)
    return None


def score(reading: Reading) -> list[tuple[float, Intent]]:
    """Every intent whose gate is open, best first, with its score."""
    features = reading.features()
    scored: list[tuple[float, Intent]] = []
    for intent in Intent:
        if not GATES[intent] & features:
            continue
        weights = WEIGHTS[intent]
        total = sum(weight for name, weight in weights.items() if name in features)
        if any(weights.get(concept, 0) > 0 for concept in reading.lead):
            total += LEAD_BONUS
        scored.append((total, intent))
    # A stable sort on the score alone keeps Intent's order among equal scores.
    return sorted(scored, key=lambda pair: -pair[0])


# --- plans ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """A workflow and its run input, planned from a text.

    Attributes:
        intent: what the text was read as (an :class:`Intent` value, or ``proposed``).
        workflow: the definition to run.
        input: the run's input (a list of map items, or the pipeline's first input).
        summary: one line saying what the plan does.
        target: what it works on, JSON-able (``{"path": "src"}``, ``{"change": ...}``,
            ``{"topic": ...}``, ``{"specification": ...}``).
        files: files the input carries.
        batches: map items the input holds (0 when it is not a map-reduce).
        skipped: files in scope left out, with the reason.
        missing: capabilities the plan needs that no agent online offers (empty when the
            capabilities online were not given).
        reasons: why the planner chose this plan, for ``describe``.
    """

    intent: str
    workflow: Workflow
    input: Any
    summary: str
    target: dict[str, Any] = field(default_factory=dict)
    files: int = 0
    batches: int = 0
    skipped: tuple[SkippedFile, ...] = ()
    missing: tuple[str, ...] = ()
    reasons: str = ""

    @property
    def capabilities(self) -> tuple[str, ...]:
        """Every capability the workflow's steps route by, sorted."""
        return tuple(sorted(capabilities_of(self.workflow.root)))

    def describe(self) -> str:
        """The plan as readable text, a few lines: what, the steps, the files, what is
        missing."""
        lines = [self.summary, f"workflow {self.workflow.name}:"]
        lines += _describe_node(self.workflow.root, "  ", "")
        if self.skipped:
            shown = ", ".join(f"{s.path} ({s.reason})" for s in self.skipped[:5])
            more = f" and {len(self.skipped) - 5} more" if len(self.skipped) > 5 else ""
            lines.append(f"skipped {len(self.skipped)} file(s): {shown}{more}")
        if self.missing:
            lines.append(f"missing: {', '.join(self.missing)} (no agent online offers "
                         f"{'it' if len(self.missing) == 1 else 'them'})")
        if self.reasons:
            lines.append(f"why: {self.reasons}")
        return "\n".join(lines)

    def to_dict(self, *, include_input: bool = True) -> dict[str, Any]:
        """The plan as JSON-able data; ``workflow`` is the definition's dict form, which
        :meth:`Workflow.from_dict` reads back. ``include_input=False`` leaves the run input
        (file contents) out, for printing."""
        out: dict[str, Any] = {
            "intent": self.intent, "summary": self.summary, "target": self.target,
            "workflow": self.workflow.to_dict(), "capabilities": list(self.capabilities),
            "missing": list(self.missing), "files": self.files, "batches": self.batches,
            "skipped": [{"path": s.path, "reason": s.reason} for s in self.skipped],
            "reasons": self.reasons,
        }
        if include_input:
            out["input"] = self.input
        return out


def capabilities_of(node: Node) -> set[str]:
    """The capabilities the task steps under ``node`` route by."""
    if isinstance(node, TaskStep):
        return {node.capability} if node.capability else set()
    if isinstance(node, Pipeline):
        return set().union(*(capabilities_of(step) for step in node.steps))
    if isinstance(node, MapReduce):
        return capabilities_of(node.mapper) | (
            capabilities_of(node.reducer) if node.reducer else set())
    if isinstance(node, Consensus):
        return capabilities_of(node.voter)
    if isinstance(node, ReviewLoop):
        return capabilities_of(node.producer) | capabilities_of(node.reviewer)
    return set()


def _describe_node(node: Node, indent: str, label: str) -> list[str]:
    head = f"{indent}{label}{node.name}"
    if isinstance(node, TaskStep):
        target = f"capability {node.capability}" if node.capability else f"agent {node.agent}"
        timeout = f", timeout {node.timeout_s:g} s" if node.timeout_s else ""
        return [f"{head}: {target}{timeout}"]
    deeper = indent + "  "
    if isinstance(node, MapReduce):
        lines = [f"{head}: map-reduce, up to {node.max_parallel} at once, min_success "
                 f"{node.min_success:g}"]
        lines += _describe_node(node.mapper, deeper, "map: ")
        if node.reducer is not None:
            lines += _describe_node(node.reducer, deeper, "reduce: ")
        return lines
    if isinstance(node, Pipeline):
        lines = [f"{head}: pipeline of {len(node.steps)} steps"]
        for number, step in enumerate(node.steps, 1):
            lines += _describe_node(step, deeper, f"{number}. ")
        return lines
    if isinstance(node, Consensus):
        return [f"{head}: consensus of {node.voters or 'all'} voters at {node.threshold:g}"] + \
            _describe_node(node.voter, deeper, "vote: ")
    if isinstance(node, ReviewLoop):
        return [f"{head}: review loop, at most {node.max_rounds} rounds"] + \
            _describe_node(node.producer, deeper, "produce: ") + \
            _describe_node(node.reviewer, deeper, "review: ")
    assert isinstance(node, Approval)
    return [f"{head}: human approval: {node.prompt}"]


class Planner(Protocol):
    """Turns a text into a plan. :class:`RuleBasedPlanner` is the default; an LLM planner
    implements the same method and passes what it proposes through
    :func:`validate_proposal`."""

    def plan(self, text: str, *, cwd: str | Path, path: str | Path | None = None,
             online_capabilities: Collection[str] | None = None) -> Plan:
        """Plan ``text``; see :func:`plan`."""
        ...


class RuleBasedPlanner:
    """The deterministic planner of this module (see the module docstring)."""

    def plan(self, text: str, *, cwd: str | Path, path: str | Path | None = None,
             online_capabilities: Collection[str] | None = None) -> Plan:
        """Plan ``text``; see :func:`plan`."""
        return plan(text, cwd=cwd, path=path, online_capabilities=online_capabilities)


class ProposingPlanner:
    """An LLM's proposals, validated, with the rule-based planner behind them.

    ``propose(text, capabilities_online)`` returns a proposal (see
    :func:`validate_proposal`); the network call lives with the caller. A proposal that
    fails validation, or a failed call, falls back to ``fallback`` and is logged.
    """

    def __init__(self, propose: Callable[[str, tuple[str, ...]], Any],
                 fallback: Planner | None = None) -> None:
        self._propose = propose
        self._fallback: Planner = fallback or RuleBasedPlanner()

    def plan(self, text: str, *, cwd: str | Path, path: str | Path | None = None,
             online_capabilities: Collection[str] | None = None) -> Plan:
        """Plan ``text`` from the proposal, or with the fallback planner."""
        # Plans that carry files need the client's tree, which only the rule-based
        # planner reads; so those texts never go to the model.
        try:
            fallback = self._fallback.plan(text, cwd=cwd, path=path,
                                           online_capabilities=online_capabilities)
        except Unplannable:
            fallback = None
        if fallback is not None and fallback.files:
            return fallback
        try:
            proposal = self._propose(text, tuple(sorted(online_capabilities or ())))
            return validate_proposal(proposal, online_capabilities=online_capabilities)
        except InvalidPlan as error:
            logger.warning("the proposed plan was refused: %s", error)
        except (OSError, ValueError, TimeoutError) as error:
            logger.warning("no plan proposed: %s", error)
        if fallback is None:
            raise Unplannable(text, online_capabilities)
        return fallback


def plan(text: str, *, cwd: str | Path, path: str | Path | None = None,
         online_capabilities: Collection[str] | None = None) -> Plan:
    """Turn a free-text request into a workflow and its input.

    Args:
        text: the request, as typed.
        cwd: the directory the request is about (the client's working directory).
        path: the tree to work on (``--path``), overriding a path in the text.
        online_capabilities: what the agents online offer; when given, the plan's
            ``missing`` lists what it needs beyond them.

    Returns:
        The plan.

    Raises:
        Unplannable: the text cannot be placed; the message lists what the agents online
            can do.
        PlanError: the text names something that is not there (a path, a revision, a
            pull request that was not fetched), or there is nothing to work on.
    """
    base = Path(cwd)
    if not base.is_dir():
        raise PlanError(f"no such directory: {cwd}")
    if not text or not text.strip():
        raise Unplannable(text, online_capabilities)
    if len(text) > MAX_TEXT_CHARS:
        raise PlanError(f"the text is {len(text)} characters; the planner reads at most "
                        f"{MAX_TEXT_CHARS} (put the details in a file and name it)")
    reading = read(text, base)
    ranked = score(reading)
    if not ranked or ranked[0][0] < MIN_SCORE:
        raise Unplannable(text, online_capabilities)
    total, intent = ranked[0]
    target = Path(path) if path is not None else reading.path or base
    if not target.is_absolute():
        target = base / target
    planned = _BUILDERS[intent](reading, base, target, online_capabilities)
    words = ", ".join(f"{c} ({' '.join(reading.words_for(c))})"
                      for c in sorted(reading.concepts) if WEIGHTS[intent].get(c, 0) > 0)
    reasons = f"read as {intent.value} (score {total:g}) from {words or 'its form'}"
    missing: tuple[str, ...] = ()
    if online_capabilities is not None:
        missing = tuple(sorted(set(planned.capabilities) - set(online_capabilities)))
    plan_ = Plan(planned.intent, planned.workflow, planned.input, planned.summary,
                 planned.target, planned.files, planned.batches, planned.skipped, missing,
                 reasons)
    # Every plan passes the same validation as a YAML file or an LLM's proposal.
    Workflow.from_dict(plan_.workflow.to_dict())
    return plan_


# --- the plans, one builder per intent ------------------------------------------------------


@dataclass(frozen=True)
class _FileWork:
    """What a file-based plan does: its capability, names and how it reads."""

    workflow: str
    step: str
    mapper: str
    capability: str
    reducer_capability: str
    noun: str


_FILE_WORK: Final[dict[Intent, _FileWork]] = {
    Intent.SECURITY: _FileWork("security-audit", "audit", "scan", "security_audit",
                               "synthesis", "security audit"),
    Intent.PERFORMANCE: _FileWork("performance-review", "analyze", "profile",
                                  "performance_analysis", "synthesis", "performance analysis"),
    Intent.REVIEW: _FileWork("code-review", "review", "review-batch", "code_review",
                             "synthesis", "code review"),
    Intent.SUMMARIZE: _FileWork("summary", "summarize", "summarize-batch", "summarization",
                                "synthesis", "summary"),
    Intent.REFACTOR: _FileWork("refactor", "refactor", "refactor-batch", "refactoring",
                               "aggregation", "refactoring"),
}


def _relative_name(target: Path, base: Path) -> str:
    """How a target reads in a plan and prefixes its files: relative to the client's
    directory when inside it, else its own name (never an absolute path)."""
    try:
        rel = target.resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        rel = target.name
    return rel or "."


def _map_reduce(work: _FileWork, items: list[Any], min_success: float,
                mapper_capability: str | None = None) -> MapReduce:
    mapper = TaskStep(work.mapper, capability=mapper_capability or work.capability,
                      timeout_s=MAP_TIMEOUT_S)
    reducer = TaskStep("synthesize" if work.reducer_capability == "synthesis" else "merge",
                       capability=work.reducer_capability, timeout_s=REDUCE_TIMEOUT_S)
    return MapReduce(work.step, mapper, reducer,
                     max_parallel=max(1, min(DEFAULT_MAX_PARALLEL, len(items))),
                     min_success=min_success)


def _plan_files(intent: Intent, reading: Reading, base: Path, target: Path,
                online: Collection[str] | None) -> Plan:
    """Map-reduce over batches of a tree's files, or of a change's changed files."""
    work = _FILE_WORK[intent]
    suffixes = _suffixes_for(intent, reading)
    request = _change_request(reading, target)
    try:
        if request is not None:
            return _plan_change(work, request, target, suffixes)
        found = collect_files(target, suffixes=suffixes)
    except FilesError as error:
        raise PlanError(str(error)) from error
    where = _relative_name(target, base)
    # Paths travel relative to the client's directory ("src/app.py"), as findings are
    # reported; collect_files gives them relative to the target itself.
    home = _relative_name(target.parent if target.is_file() else target, base)
    prefix = "" if home == "." else home + "/"
    batches = pack_batches(found.files)
    items = [{"files": [{"path": prefix + f.path, "content": f.content} for f in batch]}
             for batch in batches]
    if not items:
        kinds = "text" if suffixes is None else "/".join(suffixes)
        raise PlanError(f"no {kinds} files to work on in {where}"
                        f"{f' ({len(found.skipped)} skipped)' if found.skipped else ''}")
    workflow = Workflow(work.workflow, _map_reduce(work, items, ANALYSIS_MIN_SUCCESS))
    summary = (f"{work.noun} of {where}: {len(found.files)} file(s) in {len(items)} "
               f"batch(es) of up to {DEFAULT_BATCH_BYTES // 1024} KiB")
    skipped = tuple(SkippedFile(prefix + s.path, s.reason) for s in found.skipped)
    return Plan(intent.value, workflow, items, summary, {"path": where}, len(found.files),
                len(items), skipped)


def _suffixes_for(intent: Intent, reading: Reading) -> tuple[str, ...] | None:
    """Which files an intent reads: code for the analyses; for a summary, documents when
    the text speaks of docs, else every text file."""
    if intent is Intent.SUMMARIZE:
        return DOC_SUFFIXES if "docs" in reading.concepts else None
    return CODE_SUFFIXES


def _change_request(reading: Reading, target: Path) -> ChangeRequest | None:
    if reading.change is not None:
        return reading.change
    if reading.generic_change:
        # "Review my changes": what this branch did since the default branch, uncommitted
        # work included (on the default branch itself, that is the uncommitted work).
        try:
            return SinceRevision(default_branch(target if target.is_dir() else target.parent))
        except FilesError as error:
            raise PlanError(str(error)) from error
    return None


def _plan_change(work: _FileWork, request: ChangeRequest, target: Path,
                 suffixes: tuple[str, ...] | None) -> Plan:
    repo = target if target.is_dir() else target.parent
    change = collect_changes(repo, request, suffixes=suffixes)
    label = change.label
    items = [{"change": label, "files": [f.to_dict() for f in batch]}
             for batch in pack_batches(change.files)]
    if not items:
        kinds = "text" if suffixes is None else "/".join(suffixes)
        skipped = f" ({len(change.skipped)} skipped)" if change.skipped else ""
        raise PlanError(f"nothing to review in {label}: no {kinds} file changed{skipped}; "
                        "name another change, e.g. \"review my last 3 commits\"")
    workflow = Workflow(f"{work.workflow}-change",
                        _map_reduce(work, items, ANALYSIS_MIN_SUCCESS))
    lines = sum(end - start + 1 for f in change.files for start, end in f.changed_lines)
    summary = (f"{work.noun} of {label}: {len(change.files)} changed file(s), {lines} "
               f"changed line(s), in {len(items)} batch(es)")
    target_info = {"change": label, "base": change.base,
                   "head": change.head or "working tree", "deleted": list(change.deleted)}
    return Plan(_intent_of(work), workflow, items, summary, target_info,
                len(change.files), len(items), change.skipped)


def _intent_of(work: _FileWork) -> str:
    return next(intent.value for intent, known in _FILE_WORK.items() if known is work)


def _plan_debug(reading: Reading, base: Path, target: Path,
                online: Collection[str] | None) -> Plan:
    """One debugging task carrying the whole project: it runs the project's tests, which
    need every file together."""
    try:
        found = collect_files(target)
    except FilesError as error:
        raise PlanError(str(error)) from error
    where = _relative_name(target, base)
    if not found.files:
        raise PlanError(f"no text files to debug in {where}")
    if found.total_bytes > DEBUG_MAX_BYTES:
        raise PlanError(f"{where} holds {found.total_bytes} bytes of text; debugging carries "
                        f"the project in one task, at most {DEBUG_MAX_BYTES}; name a smaller "
                        "directory")
    workflow = Workflow("debug", TaskStep("debug", capability="debugging",
                                          timeout_s=BUILD_STEP_TIMEOUT_S))
    data = {"files": [f.to_dict() for f in found.files], "request": reading.text}
    return Plan(Intent.DEBUG.value, workflow, data,
                f"debugging of {where}: {len(found.files)} file(s) in one task",
                {"path": where}, len(found.files), 0, found.skipped)


def _plan_research(reading: Reading, base: Path, target: Path,
                   online: Collection[str] | None) -> Plan:
    """Parallel research over aspects of the topic, then synthesis."""
    topic = extract_topic(_without_path(reading.text, reading.path_text))
    if not topic:
        raise PlanError("research what? name a topic, as in: research vector databases")
    aspects = research_aspects(topic, comparison="compar" in reading.text.lower() or
                               bool(re.search(r"\b(?:vs\.?|versus)\s", reading.text, re.I)))
    items: list[dict[str, Any]] = [{"query": query, "aspect": name, "topic": topic}
                                   for name, query in aspects]
    files = 0
    if reading.path is not None:
        try:
            corpus = collect_files(reading.path, suffixes=None)
        except FilesError as error:
            raise PlanError(str(error)) from error
        if corpus.total_bytes > RESEARCH_CORPUS_MAX_BYTES:
            raise PlanError(f"{reading.path_text} holds {corpus.total_bytes} bytes of text; "
                            f"research carries at most {RESEARCH_CORPUS_MAX_BYTES}")
        documents = [f.to_dict() for f in corpus.files]
        files = len(documents)
        for item in items:
            item["documents"] = documents
    # search is the researcher's ranked search; document_analysis serves where only it is
    # online.
    capability = "search"
    if online is not None and "search" not in online and "document_analysis" in online:
        capability = "document_analysis"
    work = _FileWork("research", "research", "aspect", capability, "synthesis", "research")
    workflow = Workflow("research", _map_reduce(work, items, RESEARCH_MIN_SUCCESS))
    summary = (f"research on {topic!r}: {len(items)} aspects in parallel "
               f"({', '.join(name for name, _ in aspects)}), then a synthesis")
    return Plan(Intent.RESEARCH.value, workflow, items, summary, {"topic": topic}, files,
                len(items))


def _without_path(text: str, path_text: str | None) -> str:
    """The text without the path it names and the word leading to it ("research X in
    ./docs" -> "research X"): the path is the corpus, not the topic."""
    if not path_text:
        return text
    return re.sub(r"(?:\b(?:in|from|using|under|at|of|with|inside)\s+(?:the\s+)?"
                  r"(?:(?:docs?|documents?|files?|notes?)\s+(?:in|at|under)\s+)?)?"
                  + re.escape(path_text), " ", text, count=1, flags=re.I)


def extract_topic(text: str) -> str:
    """The topic of a research request: the text without its leading verb, fillers and
    question words, and without trailing punctuation ("what is known about Y?" -> "Y")."""
    words = text.split()
    start = 0
    while start < len(words):
        tokens = _WORD.findall(words[start].lower())
        if tokens and all(t in _TOPIC_LEADS or any(word_matches(t, e)
                                                   for e in _RESEARCH_VERBS) for t in tokens):
            start += 1
            continue
        if not tokens:
            start += 1
            continue
        break
    rest = words[start:]
    while rest and all(t in _TOPIC_TAILS for t in _WORD.findall(rest[-1].lower())):
        rest.pop()
    return " ".join(rest).strip(_SENTENCE_END + " ")


def research_aspects(topic: str, *, comparison: bool = False) -> list[tuple[str, str]]:
    """3 to 5 ``(aspect, query)`` pairs for a topic, the same for the same topic.

    A comparison ("Kafka vs RabbitMQ") gets an overview of each side (at most three), the
    trade-offs between them and when to choose which; any other topic gets its overview,
    trade-offs, alternatives and best practices.
    """
    subjects = [s.strip(_SENTENCE_END + " ") for s in _COMPARISON_SPLIT.split(topic)]
    subjects = [s for s in subjects if s]
    if comparison and len(subjects) >= 2:
        subjects = subjects[:3]
        joined = " versus ".join(subjects)
        out = [(f"overview-{i}", f"{subject}: overview and key concepts")
               for i, subject in enumerate(subjects, 1)]
        return out + [("trade-offs", f"{joined}: trade-offs and differences"),
                      ("choice", f"when to choose {' or '.join(subjects)}")]
    return [("overview", f"{topic}: overview and key concepts"),
            ("trade-offs", f"{topic}: advantages, disadvantages and trade-offs"),
            ("alternatives", f"alternatives to {topic}"),
            ("practices", f"{topic}: best practices and common pitfalls")]


def _plan_build(reading: Reading, base: Path, target: Path,
                online: Collection[str] | None) -> Plan:
    """The pipeline research -> code generation -> review on the specification."""
    specification = " ".join(reading.text.split()).strip()
    language = "python"
    for index in sorted(reading.concepts.get("language", ())):
        token = reading.tokens[index]
        language = _LANGUAGE_NAMES.get(token, token)
        break
    steps = (TaskStep("research", capability="search", timeout_s=BUILD_STEP_TIMEOUT_S),
             TaskStep("generate", capability="code_generation",
                      timeout_s=BUILD_STEP_TIMEOUT_S),
             TaskStep("review", capability="code_review", timeout_s=BUILD_STEP_TIMEOUT_S))
    workflow = Workflow("build", Pipeline("build", steps))
    data = {"specification": specification, "language": language,
            "query": f"{extract_build_subject(specification)}: design and best practices"}
    summary = (f"build {extract_build_subject(specification)!r} in {language}: research, "
               "then code generation, then a code review")
    return Plan(Intent.BUILD.value, workflow, data, summary,
                {"specification": specification, "language": language})


def extract_build_subject(specification: str) -> str:
    """What is to be built: the specification without its leading verb and articles
    ("Create a user authentication module" -> "user authentication module", "Code up a
    parser" -> "parser")."""
    words = specification.split()
    verbs = [entry.split() for entry in CONCEPTS["build"]]
    start = 0
    while start < len(words):
        tokens = [_WORD.findall(w.lower()) for w in words[start:start + 2]]
        first = tokens[0]
        if first and all(t in FILLERS or any(len(v) == 1 and word_matches(t, v[0])
                                             for v in verbs) for t in first):
            start += 1
            continue
        # A two-word verb ("code up", "spin up") is skipped whole.
        pair = [t[0] if t else "" for t in tokens]
        if len(pair) == 2 and any(len(v) == 2 and all(word_matches(w, p) for w, p in
                                                      zip(pair, v)) for v in verbs):
            start += 2
            continue
        break
    return " ".join(words[start:]).strip(_SENTENCE_END + " ") or specification


def _file_builder(intent: Intent) -> Callable[[Reading, Path, Path, Collection[str] | None],
                                               Plan]:
    def build(reading: Reading, base: Path, target: Path,
              online: Collection[str] | None) -> Plan:
        return _plan_files(intent, reading, base, target, online)
    return build


_BUILDERS: Final[dict[Intent, Callable[[Reading, Path, Path, Collection[str] | None], Plan]]] = {
    **{intent: _file_builder(intent) for intent in _FILE_WORK},
    Intent.DEBUG: _plan_debug,
    Intent.RESEARCH: _plan_research,
    Intent.BUILD: _plan_build,
}


# --- proposals from elsewhere (an LLM) ----------------------------------------------------

#: Nesting a proposed run input may have: enough for any sane input, bounded for a hostile
#: one.
_MAX_INPUT_DEPTH: Final = 32


def validate_proposal(proposal: Any, *, online_capabilities: Collection[str] | None = None,
                      online_agents: Collection[str] | None = None) -> Plan:
    """Check a proposed plan before it runs, and make it a :class:`Plan`.

    A proposal is ``{"workflow": <a workflow's dict form>, "input": <JSON-able data>,
    "summary": <one line>}`` (``input`` and ``summary`` optional). The workflow must pass
    :meth:`Workflow.from_dict`; the input must be plain JSON data; every step must route
    by a capability that an agent online offers (when they are given), or name an agent in
    ``online_agents``: a model inventing a capability is caught here, not at run time.

    Raises:
        InvalidPlan: naming the offending field of the proposal.
    """
    if not isinstance(proposal, dict):
        raise InvalidPlan((), f"must be a map, not {type(proposal).__name__}")
    unknown = sorted(str(k) for k in proposal if k not in {"workflow", "input", "summary"})
    if unknown:
        raise InvalidPlan((unknown[0],), "unknown field; expected workflow, input, summary")
    try:
        workflow = Workflow.from_dict(proposal.get("workflow"))
    except DefinitionError as error:
        raise InvalidPlan(("workflow", *error.path), error.reason) from error
    data = proposal.get("input")
    _check_json(data, ("input",), 0)
    summary = proposal.get("summary") or f"proposed workflow {workflow.name}"
    if not isinstance(summary, str) or "\n" in summary.strip():
        raise InvalidPlan(("summary",), "must be one line of text")
    _check_routes(workflow.root, ("workflow", "root"), online_capabilities, online_agents)
    batches = len(data) if isinstance(data, list) else 0
    return Plan("proposed", workflow, data, summary.strip(), {}, 0, batches)


def _check_routes(node: Node, where: tuple[str | int, ...],
                  online: Collection[str] | None, agents: Collection[str] | None) -> None:
    if isinstance(node, TaskStep):
        if node.agent is not None and (agents is None or node.agent not in agents):
            raise InvalidPlan(where + ("agent",), f"no agent {node.agent!r} is online")
        if node.capability is not None and online is not None and \
                node.capability not in online:
            offered = ", ".join(sorted(online)) or "nothing"
            raise InvalidPlan(where + ("capability",), f"no agent online offers "
                              f"{node.capability!r} (online: {offered})")
        return
    for key, child in _children(node):
        _check_routes(child, where + key, online, agents)


def _children(node: Node) -> list[tuple[tuple[str | int, ...], Node]]:
    """A node's child nodes, each with its key path below the node."""
    out: list[tuple[tuple[str | int, ...], Node]] = []
    if isinstance(node, Pipeline):
        out += [(("steps", i), step) for i, step in enumerate(node.steps)]
    elif isinstance(node, MapReduce):
        out.append((("mapper",), node.mapper))
        if node.reducer is not None:
            out.append((("reducer",), node.reducer))
    elif isinstance(node, Consensus):
        out.append((("voter",), node.voter))
    elif isinstance(node, ReviewLoop):
        out += [(("producer",), node.producer), (("reviewer",), node.reviewer)]
    return out


def _check_json(value: Any, where: tuple[str | int, ...], depth: int) -> None:
    """Plain JSON data only: the input is stored in the state service and sent in tasks."""
    if depth > _MAX_INPUT_DEPTH:
        raise InvalidPlan(where, f"nested more than {_MAX_INPUT_DEPTH} levels deep")
    if value is None or isinstance(value, (bool, int, str)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidPlan(where, "must be a finite number")
        return
    if isinstance(value, list):
        for index, item in enumerate(value):
            _check_json(item, where + (index,), depth + 1)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidPlan(where, "a map's keys must be strings")
            _check_json(item, where + (key,), depth + 1)
        return
    raise InvalidPlan(where, f"must be JSON data, not {type(value).__name__}")
