"""Files travel with the work: source trees and git changes, read here, carried in tasks.

Agents may run on other machines, so a step that works on files carries their contents,
never a path of the client's machine. This module reads them on the client's side:

- :func:`collect_files` walks a directory (through ``git ls-files`` where it is a git
  repository, so ``.gitignore`` holds) and reads the text files, reporting every file it
  leaves out and why (binary, too big, not UTF-8);
- :func:`pack_batches` packs files into batches for tasks: many small files to a batch up to
  a byte budget and a count, a big file alone;
- :func:`collect_changes` reads a change from a local git repository (a revision range, the
  changes since a branch, the last commits, or a pull request's fetched ref): the changed
  files' contents and the changed line ranges of each, so a reviewer reports only on them.

Every path in a record is relative to the directory or repository it was collected from,
with ``/`` separators. Only ``git`` itself is run (no shell), with a time limit.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Final, Protocol, TypeVar, Union

#: A file bigger than this is left out (and reported): a generated or vendored blob is rarely
#: worth a task, and a task holds its whole payload in memory on both sides.
DEFAULT_MAX_FILE_BYTES: Final = 1024 * 1024
#: Bytes of file content one batch (one task) carries at most, unless one file is bigger.
DEFAULT_BATCH_BYTES: Final = 256 * 1024
#: Files one batch carries at most: bounds the work of one task when files are tiny.
DEFAULT_BATCH_FILES: Final = 64
#: How long one git command may take before the collection fails.
GIT_TIMEOUT_S: Final = 60.0
#: Files a collection lists at most (all of them, before the suffix filter): a directory
#: with more is the wrong one ("audit /"), and a walk of it would take minutes.
DEFAULT_MAX_LISTED_FILES: Final = 100_000
#: The head of a file read to tell text from binary (git's own heuristic: a NUL byte).
_SNIFF_BYTES: Final = 8000

#: Directories never walked into: version control, caches, installed dependencies.
SKIPPED_DIRS: Final = frozenset({
    ".git", ".hg", ".svn", "__pycache__", "node_modules", ".venv", "venv", ".tox", ".nox",
    ".mypy_cache", ".pytest_cache", ".ruff_cache", ".eggs", "site-packages", ".direnv",
})
#: A directory holding this file is a Python virtual environment, whatever its name.
_VENV_MARKER: Final = "pyvenv.cfg"

#: Environment for git: never prompt for credentials, and messages in a fixed language.
_GIT_ENV: Final = {"GIT_TERMINAL_PROMPT": "0", "LC_ALL": "C", "GIT_OPTIONAL_LOCKS": "0"}


class FilesError(ValueError):
    """Raised when files or a change cannot be collected; the message is one line."""


class GitError(FilesError):
    """Raised when git is missing, the directory is not a repository, or a git command
    fails."""


class RevisionNotFound(GitError):
    """Raised when a revision named in a change request does not exist in the repository.

    Attributes:
        revision: the revision as the user named it.
    """

    def __init__(self, revision: str, message: str | None = None) -> None:
        self.revision = revision
        super().__init__(message or f"no revision {revision!r} in this repository")


class PullRequestNotFetched(RevisionNotFound):
    """Raised when a pull request's head is not in the local repository.

    Attributes:
        number: the pull request's number.
    """

    def __init__(self, number: int) -> None:
        self.number = number
        super().__init__(f"pr/{number}", f"pull request #{number} is not in this repository; "
                         f"fetch it first: git fetch origin pull/{number}/head:pr/{number}")


@dataclass(frozen=True, slots=True)
class SourceFile:
    """One text file as it travels in a task.

    Attributes:
        path: relative to the collected directory, ``/``-separated.
        content: the file's text.
        size_bytes: its size in bytes (UTF-8).
    """

    path: str
    content: str
    size_bytes: int

    def to_dict(self) -> dict[str, Any]:
        """The form a task carries: ``{"path": ..., "content": ...}``."""
        return {"path": self.path, "content": self.content}


@dataclass(frozen=True, slots=True)
class SkippedFile:
    """A file left out of a collection, and why (``binary``, ``over the size limit``...)."""

    path: str
    reason: str


@dataclass(frozen=True)
class FileSet:
    """The text files under a directory.

    Attributes:
        files: in path order.
        skipped: files in scope that were left out, with the reason.
        used_git: whether ``git ls-files`` chose the files (``.gitignore`` respected).
    """

    files: tuple[SourceFile, ...]
    skipped: tuple[SkippedFile, ...]
    used_git: bool

    @property
    def total_bytes(self) -> int:
        """The bytes of content the files carry."""
        return sum(f.size_bytes for f in self.files)


class _Carried(Protocol):
    """Anything packed into batches: it has a size."""

    @property
    def size_bytes(self) -> int: ...


CarriedT = TypeVar("CarriedT", bound=_Carried)


def collect_files(root: str | os.PathLike[str], *, suffixes: Collection[str] | None = None,
                  max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
                  max_files: int = DEFAULT_MAX_LISTED_FILES, use_git: bool = True) -> FileSet:
    """Read the text files under ``root`` (or ``root`` itself when it is a file).

    Args:
        root: the directory (or one file) to collect.
        suffixes: only files ending in one of these (``".py"``); None: every file. A
            ``root`` that is a file is read whatever its suffix.
        max_file_bytes: files bigger than this are skipped and reported.
        max_files: more files than this under ``root`` (counted before ``suffixes``) is an
            error: the directory is too big to carry.
        use_git: list files with ``git ls-files -co --exclude-standard`` when ``root`` is
            inside a git work tree and git is installed (``.gitignore`` is respected).

    Returns:
        The files in path order, and the ones left out with the reason.

    Raises:
        FilesError: ``root`` does not exist, or holds more than ``max_files`` files.
    """
    base = Path(root)
    if base.is_file():
        # A file named outright is wanted whatever its suffix.
        return _read_all(base.parent, [base.name], None, max_file_bytes, used_git=False)
    if not base.is_dir():
        raise FilesError(f"no such file or directory: {os.fspath(root)}")
    listed = _git_listing(base) if use_git else None
    names = listed if listed is not None else list(itertools.islice(_walk(base), max_files + 1))
    if len(names) > max_files:
        raise FilesError(f"more than {max_files} files under {os.fspath(root)}; name a "
                         "smaller directory")
    return _read_all(base, names, suffixes, max_file_bytes, used_git=listed is not None)


def pack_batches(files: Sequence[CarriedT], *, max_batch_bytes: int = DEFAULT_BATCH_BYTES,
                 max_batch_files: int = DEFAULT_BATCH_FILES) -> list[tuple[CarriedT, ...]]:
    """Pack files into batches, one task each, keeping their order.

    Small files share a batch up to ``max_batch_bytes`` and ``max_batch_files``; a file of
    ``max_batch_bytes`` or more travels alone. Order is kept (files of one directory stay
    together), so the same tree always gives the same batches.

    Raises:
        ValueError: a limit below 1.
    """
    if max_batch_bytes < 1 or max_batch_files < 1:
        raise ValueError("batch limits must be at least 1")
    batches: list[tuple[CarriedT, ...]] = []
    current: list[CarriedT] = []
    current_bytes = 0
    for item in files:
        if item.size_bytes >= max_batch_bytes:
            batches.append((item,))
            continue
        if current and (current_bytes + item.size_bytes > max_batch_bytes or
                        len(current) >= max_batch_files):
            batches.append(tuple(current))
            current, current_bytes = [], 0
        current.append(item)
        current_bytes += item.size_bytes
    if current:
        batches.append(tuple(current))
    return batches


def _git_listing(base: Path) -> list[str] | None:
    """The files git sees under ``base`` (tracked and untracked, not ignored), relative to
    ``base``; None when git is missing or ``base`` is not in a work tree."""
    if shutil.which("git") is None:
        return None
    try:
        inside = _run_git(base, ["rev-parse", "--is-inside-work-tree"], check=False)
        if inside.returncode != 0 or inside.stdout.strip() != b"true":
            return None
        # A directory the repository ignores (a tool's install under a dotfiles repo, say)
        # was named on purpose: walk it, rather than find nothing in it.
        if _run_git(base, ["check-ignore", "-q", "."], check=False).returncode == 0:
            return None
        # ls-files prints paths relative to the directory it runs in, which is what a task
        # carries; -z keeps odd names (spaces, quotes, newlines) intact.
        listing = _run_git(base, ["ls-files", "-co", "--exclude-standard", "-z"]).stdout
    except GitError:
        return None
    return sorted({os.fsdecode(name) for name in listing.split(b"\0") if name})


def _walk(base: Path) -> Iterator[str]:
    """Every file under ``base`` outside the skipped directories, relative to it.

    The walk stays on ``base``'s file system (as ``find -xdev``): a mount below it is
    another tree, and /proc or /sys hold files that block when read.
    """
    device = base.stat().st_dev
    for directory, dirs, files in os.walk(base):
        # Pruning in place stops os.walk descending; symlinked directories are not followed.
        dirs[:] = sorted(d for d in dirs if d not in SKIPPED_DIRS and
                         not _is_venv(Path(directory, d)) and
                         _device(Path(directory, d)) == device)
        here = Path(directory).relative_to(base)
        for name in sorted(files):
            yield (here / name).as_posix()


def _read_all(base: Path, names: Sequence[str], suffixes: Collection[str] | None,
              max_file_bytes: int, *, used_git: bool) -> FileSet:
    files: list[SourceFile] = []
    skipped: list[SkippedFile] = []
    wanted = tuple(suffixes) if suffixes is not None else None
    resolved_base = base.resolve()
    venvs: dict[str, bool] = {}
    for name in names:
        rel = PurePosixPath(name)
        if wanted is not None and not name.endswith(wanted):
            continue
        if _in_skipped_dir(base, rel, venvs):
            continue
        outcome = _read_one(base / rel, rel.as_posix(), resolved_base, max_file_bytes)
        if isinstance(outcome, SourceFile):
            files.append(outcome)
        elif outcome is not None:
            skipped.append(outcome)
    files.sort(key=lambda f: f.path)
    return FileSet(tuple(files), tuple(skipped), used_git)


def _is_venv(directory: Path) -> bool:
    try:
        return (directory / _VENV_MARKER).is_file()
    except OSError:
        return False


def _device(directory: Path) -> int | None:
    try:
        return directory.stat().st_dev
    except OSError:
        return None


def _in_skipped_dir(base: Path, rel: PurePosixPath, venvs: dict[str, bool]) -> bool:
    """Whether a listed file sits in a skipped directory: git lists a committed or
    un-ignored ``node_modules`` or venv too, and nobody wants those audited."""
    for depth, part in enumerate(rel.parts[:-1]):
        if part in SKIPPED_DIRS:
            return True
        prefix = "/".join(rel.parts[:depth + 1])
        if prefix not in venvs:
            venvs[prefix] = _is_venv(base / prefix)
        if venvs[prefix]:
            return True
    return False


def _read_one(path: Path, rel: str, resolved_base: Path,
              max_file_bytes: int) -> SourceFile | SkippedFile | None:
    """The file as a record, a skip with its reason, or None when it is not a file (a git
    submodule, a file deleted since it was committed)."""
    try:
        if path.is_symlink() and not path.resolve().is_relative_to(resolved_base):
            return SkippedFile(rel, "a symlink leading out of the directory")
        if not path.is_file():
            return None
        size = path.stat().st_size
        if size > max_file_bytes:
            return SkippedFile(rel, f"{size} bytes, over the {max_file_bytes}-byte limit")
        raw = path.read_bytes()
    except OSError as error:
        return SkippedFile(rel, f"unreadable: {error.strerror or error}")
    return _decoded(rel, raw)


def _decoded(rel: str, raw: bytes) -> SourceFile | SkippedFile:
    if b"\0" in raw[:_SNIFF_BYTES]:
        return SkippedFile(rel, "binary")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return SkippedFile(rel, "not UTF-8 text")
    return SourceFile(rel, text, len(raw))


# --- changes from git -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RevisionRange:
    """``A..B`` (what B has that A lacks), ``A...B`` (since they forked) or ``A`` (A..HEAD)."""

    spec: str

    def describe(self) -> str:
        """How the change reads in a plan."""
        return self.spec


@dataclass(frozen=True, slots=True)
class SinceRevision:
    """Everything since the current branch left ``revision`` (``merge-base(revision,
    HEAD)``), including uncommitted and untracked work when ``include_worktree``."""

    revision: str
    include_worktree: bool = True

    def describe(self) -> str:
        """How the change reads in a plan."""
        extra = " (uncommitted work included)" if self.include_worktree else ""
        return f"the changes since {self.revision}{extra}"


@dataclass(frozen=True, slots=True)
class LastCommits:
    """The last ``count`` commits of the current branch (``HEAD~count..HEAD``)."""

    count: int

    def describe(self) -> str:
        """How the change reads in a plan."""
        return "the last commit" if self.count == 1 else f"the last {self.count} commits"


@dataclass(frozen=True, slots=True)
class PullRequest:
    """A pull request's head, fetched into the local repository (``refs/pull/N/head`` or
    ``pr/N``), against where it forked from ``base`` (None: the default branch)."""

    number: int
    base: str | None = None

    def describe(self) -> str:
        """How the change reads in a plan."""
        return f"pull request #{self.number}"


ChangeRequest = Union[RevisionRange, SinceRevision, LastCommits, PullRequest]


@dataclass(frozen=True, slots=True)
class ChangedFile:
    """A changed file as a reviewer receives it.

    Attributes:
        path: relative to the repository's top, ``/``-separated.
        status: ``added``, ``modified``, ``renamed``, ``copied``, ``type-changed`` or
            ``untracked``.
        content: the file's text after the change.
        changed_lines: inclusive 1-based ``(first, last)`` line ranges added or changed.
        size_bytes: the content's size in bytes.
        old_path: the path before a rename or copy.
    """

    path: str
    status: str
    content: str
    changed_lines: tuple[tuple[int, int], ...]
    size_bytes: int
    old_path: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The form a task carries: path, content, status and the changed line ranges."""
        return {"path": self.path, "content": self.content, "status": self.status,
                "changed_lines": [list(r) for r in self.changed_lines]}


@dataclass(frozen=True)
class ChangeSet:
    """A change read from a repository.

    Attributes:
        label: what was asked for, readable (``pull request #12``).
        base: the commit the change is measured from.
        head: the commit it ends at; None when it ends at the working tree.
        files: the changed text files with changed lines, in path order.
        deleted: paths the change deleted.
        skipped: changed files left out, with the reason.
    """

    label: str
    base: str
    head: str | None
    files: tuple[ChangedFile, ...]
    deleted: tuple[str, ...]
    skipped: tuple[SkippedFile, ...]


#: git's name-status letters, as words.
_STATUS: Final = {"A": "added", "M": "modified", "R": "renamed", "C": "copied",
                  "T": "type-changed", "D": "deleted"}
_HUNK: Final = re.compile(rb"^@@ -\d+(?:,\d+)? \+(\d+)(?:,(\d+))? @@")


def collect_changes(repo: str | os.PathLike[str], request: ChangeRequest, *,
                    suffixes: Collection[str] | None = None,
                    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> ChangeSet:
    """Read a change from the git repository holding ``repo``.

    Args:
        repo: any directory inside the repository's work tree.
        request: which change (:class:`RevisionRange`, :class:`SinceRevision`,
            :class:`LastCommits` or :class:`PullRequest`).
        suffixes: only files ending in one of these; None: every file.
        max_file_bytes: changed files bigger than this are skipped and reported.

    Returns:
        The changed files' contents after the change and their changed line ranges.

    Raises:
        GitError: git is missing, ``repo`` is not in a repository, or git failed.
        RevisionNotFound: a named revision does not exist.
        PullRequestNotFetched: the pull request's ref is not in the repository, naming the
            ``git fetch`` command that brings it.
    """
    git = _Repository.open(Path(repo))
    base, head = git.endpoints(request)
    wanted = tuple(suffixes) if suffixes is not None else None
    statuses = git.name_status(base, head)
    ranges = git.changed_lines(base, head)
    if head is None:
        venvs: dict[str, bool] = {}
        for path in git.untracked():
            # Untracked work counts, but not an un-ignored node_modules or venv beside it.
            if not _in_skipped_dir(git.top, PurePosixPath(path), venvs):
                statuses.setdefault(path, ("untracked", None))
    files: list[ChangedFile] = []
    deleted: list[str] = []
    skipped: list[SkippedFile] = []
    for path, (status, old_path) in sorted(statuses.items()):
        if status == "deleted":
            deleted.append(path)
            continue
        if wanted is not None and not path.endswith(wanted):
            continue
        outcome = git.content(path, head, max_file_bytes)
        if isinstance(outcome, SkippedFile):
            skipped.append(outcome)
            continue
        lines = ranges.get(path, ())
        if status == "untracked":
            # Lines as git counts them: a final line without a newline still counts.
            text = outcome.content
            count = text.count("\n") + (0 if text.endswith("\n") else 1)
            lines = ((1, count),) if text else ()
        if not lines:
            skipped.append(SkippedFile(path, "no changed lines (a rename or mode change)"))
            continue
        files.append(ChangedFile(path, status, outcome.content, lines, outcome.size_bytes,
                                 old_path))
    return ChangeSet(request.describe(), base, head, tuple(files), tuple(deleted),
                     tuple(skipped))


def default_branch(repo: str | os.PathLike[str]) -> str:
    """The default branch of the repository holding ``repo``, as a short name
    (``main``, ``origin/main``): what "the changes" of a branch are measured against.

    Raises:
        GitError: git is missing, ``repo`` is not in a repository, or it has neither an
            ``origin/HEAD`` nor a main or master branch.
    """
    ref = _Repository.open(Path(repo)).default_branch()
    for prefix in ("refs/heads/", "refs/remotes/"):
        if ref.startswith(prefix):
            return ref[len(prefix):]
    return ref


def _run_git(cwd: Path, args: list[str], *, check: bool = True,
             stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    # Options the user's config could change in the output we parse are pinned here.
    command = ["git", "-c", "core.quotepath=off", "-c", "color.ui=never", *args]
    try:
        done = subprocess.run(command, cwd=cwd, input=stdin, capture_output=True,
                              timeout=GIT_TIMEOUT_S, env={**os.environ, **_GIT_ENV})
    except FileNotFoundError as error:
        raise GitError("git is not installed (or not on PATH)") from error
    except subprocess.TimeoutExpired as error:
        raise GitError(f"git {args[0]} took over {GIT_TIMEOUT_S:g} s") from error
    except OSError as error:
        raise GitError(f"cannot run git in {cwd}: {error.strerror or error}") from error
    if check and done.returncode != 0:
        message = done.stderr.decode("utf-8", "replace").strip().splitlines()
        raise GitError(f"git {args[0]} failed: {message[0] if message else done.returncode}")
    return done


class _Repository:
    """git commands against one repository, run at its top level (diff paths are relative
    to the top, and so are the records)."""

    def __init__(self, top: Path) -> None:
        self.top = top

    @classmethod
    def open(cls, directory: Path) -> _Repository:
        if not directory.is_dir():
            raise GitError(f"no such directory: {directory}")
        done = _run_git(directory, ["rev-parse", "--show-toplevel"], check=False)
        if done.returncode != 0:
            raise GitError(f"not a git repository: {directory}")
        return cls(Path(os.fsdecode(done.stdout.strip())))

    def git(self, args: list[str], *, stdin: bytes | None = None) -> bytes:
        return _run_git(self.top, args, stdin=stdin).stdout

    def commit(self, revision: str) -> str:
        """The commit id ``revision`` names."""
        # A revision starting with "-" would be read as an option by git.
        if not revision or revision.startswith("-") or any(c in revision for c in "\0\n "):
            raise RevisionNotFound(revision)
        done = _run_git(self.top, ["rev-parse", "--verify", "--quiet", "--end-of-options",
                                   f"{revision}^{{commit}}"], check=False)
        if done.returncode != 0:
            raise RevisionNotFound(revision)
        return done.stdout.decode().strip()

    def merge_base(self, left: str, right: str) -> str:
        done = _run_git(self.top, ["merge-base", left, right], check=False)
        if done.returncode != 0:
            raise GitError(f"{left[:12]} and {right[:12]} have no common ancestor")
        return done.stdout.decode().strip()

    def endpoints(self, request: ChangeRequest) -> tuple[str, str | None]:
        """``(base, head)`` commits for ``request``; head None means the working tree."""
        if isinstance(request, RevisionRange):
            return self._range(request.spec)
        if isinstance(request, SinceRevision):
            head = self.commit("HEAD")
            base = self.merge_base(self.commit(request.revision), head)
            return base, None if request.include_worktree else head
        if isinstance(request, LastCommits):
            return self._last(request.count)
        return self._pull_request(request)

    def _range(self, spec: str) -> tuple[str, str]:
        symmetric = "..." in spec
        left, sep, right = spec.partition("..." if symmetric else "..")
        head = self.commit(right or "HEAD") if sep else self.commit("HEAD")
        base = self.commit(left or "HEAD")
        # A...B is what B did since the two forked: measured from their merge base.
        return (self.merge_base(base, head) if symmetric else base), head

    def _last(self, count: int) -> tuple[str, str]:
        if count < 1:
            raise FilesError("ask for at least one commit")
        head = self.commit("HEAD")
        history = int(self.git(["rev-list", "--count", "--first-parent", head]).decode())
        if count < history:
            return self.commit(f"HEAD~{count}"), head
        # The whole history: measured from the empty tree, so every file is added.
        empty = self.git(["hash-object", "-t", "tree", "--stdin"], stdin=b"")
        return empty.decode().strip(), head

    def _pull_request(self, request: PullRequest) -> tuple[str, str]:
        number = request.number
        head = None
        for ref in (f"refs/pull/{number}/head", f"refs/heads/pr/{number}",
                    f"refs/remotes/origin/pr/{number}", f"refs/remotes/origin/pull/{number}/head"):
            try:
                head = self.commit(ref)
                break
            except RevisionNotFound:
                continue
        if head is None:
            raise PullRequestNotFetched(number)
        base_ref = request.base or self.default_branch(exclude=head)
        return self.merge_base(self.commit(base_ref), head), head

    def default_branch(self, exclude: str | None = None) -> str:
        """The branch work is merged into: ``origin/HEAD``'s target, else main or master
        (remote first); skipping a branch at commit ``exclude`` (a pull request's own
        head)."""
        done = _run_git(self.top, ["symbolic-ref", "--quiet", "refs/remotes/origin/HEAD"],
                        check=False)
        candidates = [done.stdout.decode().strip()] if done.returncode == 0 else []
        candidates += ["refs/remotes/origin/main", "refs/remotes/origin/master",
                       "refs/heads/main", "refs/heads/master"]
        for ref in candidates:
            try:
                if self.commit(ref) != exclude:
                    return ref
            except RevisionNotFound:
                continue
        raise GitError("cannot tell the default branch (no origin/HEAD, main or master); "
                       "name the base revision")

    def name_status(self, base: str, head: str | None) -> dict[str, tuple[str, str | None]]:
        """path -> (status word, old path for renames and copies)."""
        raw = self.git(["diff", "--name-status", "-z", "-M", "--no-ext-diff", base,
                        *([head] if head else []), "--"])
        fields = [os.fsdecode(f) for f in raw.split(b"\0")]
        out: dict[str, tuple[str, str | None]] = {}
        index = 0
        while index < len(fields) and fields[index]:
            letter = fields[index][0]
            if letter in "RC":
                old, new = fields[index + 1], fields[index + 2]
                out[new] = (_STATUS[letter], old)
                index += 3
            else:
                out[fields[index + 1]] = (_STATUS.get(letter, "modified"), None)
                index += 2
        return out

    def changed_lines(self, base: str, head: str | None) -> dict[str, tuple[tuple[int, int], ...]]:
        """path -> the new side's changed line ranges, from a zero-context diff."""
        # Explicit prefixes override diff.noprefix and diff.mnemonicPrefix in user config.
        patch = self.git(["diff", "-U0", "-M", "--no-color", "--no-ext-diff", "--no-textconv",
                          "--src-prefix=a/", "--dst-prefix=b/", base,
                          *([head] if head else []), "--"])
        return _parse_patch(patch)

    def untracked(self) -> list[str]:
        raw = self.git(["ls-files", "-o", "--exclude-standard", "-z"])
        return [os.fsdecode(name) for name in raw.split(b"\0") if name]

    def content(self, path: str, head: str | None,
                max_file_bytes: int) -> SourceFile | SkippedFile:
        """The file's text after the change: from the work tree, or from ``head``."""
        if head is None:
            outcome = _read_one(self.top / path, path, self.top.resolve(), max_file_bytes)
            return outcome if outcome is not None else SkippedFile(path, "not a regular file")
        if "\n" in path:
            return SkippedFile(path, "a newline in its name")
        spec = f"{head}:{path}".encode()
        header = self.git(["cat-file", "--batch-check"], stdin=spec + b"\n").split()
        if len(header) < 3 or header[1] != b"blob":
            return SkippedFile(path, "not a regular file")
        if int(header[2]) > max_file_bytes:
            return SkippedFile(path, f"{int(header[2])} bytes, over the {max_file_bytes}-byte "
                               "limit")
        return _decoded(path, self.git(["cat-file", "blob", spec.decode()]))


def _parse_patch(patch: bytes) -> dict[str, tuple[tuple[int, int], ...]]:
    """The ``+`` side's line ranges per file of a ``-U0`` patch.

    Only a file's header (between ``diff --git`` and its first ``@@``) is read for its
    path: a hunk's content line may itself start with ``+++``.
    """
    ranges: dict[str, list[tuple[int, int]]] = {}
    current: str | None = None
    in_header = False
    for line in patch.split(b"\n"):
        if line.startswith(b"diff --git "):
            current, in_header = None, True
        elif in_header and line.startswith(b"+++ "):
            # git ends the name with a tab when it holds a space (for patch(1)); a name
            # that really ends in a tab is C-quoted, so the tab is never part of it.
            raw = line[4:]
            target = _unquote(raw[:-1] if raw.endswith(b"\t") else raw)
            current = os.fsdecode(target[2:]) if target.startswith(b"b/") else None
        elif line.startswith(b"@@"):
            in_header = False
            match = _HUNK.match(line)
            if match and current is not None:
                start, count = int(match[1]), int(match[2] or b"1")
                if count:
                    ranges.setdefault(current, []).append((start, start + count - 1))
    return {path: _merged(spans) for path, spans in ranges.items()}


def _merged(spans: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    out: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if out and start <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return tuple(out)


_ESCAPES: Final = {ord("a"): 7, ord("b"): 8, ord("t"): 9, ord("n"): 10, ord("v"): 11,
                   ord("f"): 12, ord("r"): 13, ord('"'): 34, ord("\\"): 92}


def _unquote(raw: bytes) -> bytes:
    """A path as git's patch header writes it: C-quoted (``"b/a\\"b"``) when it holds
    quotes, backslashes or control characters, else as is."""
    if not (raw.startswith(b'"') and raw.endswith(b'"') and len(raw) >= 2):
        return raw
    body, out, index = raw[1:-1], bytearray(), 0
    while index < len(body):
        byte = body[index]
        if byte != ord("\\") or index + 1 >= len(body):
            out.append(byte)
            index += 1
        elif body[index + 1:index + 4].isdigit():
            out.append(int(body[index + 1:index + 4], 8) & 0xFF)
            index += 4
        else:
            out.append(_ESCAPES.get(body[index + 1], body[index + 1]))
            index += 2
    return bytes(out)
