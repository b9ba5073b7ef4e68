"""Security analysis: bandit as a library, plus our checks for the forms bandit misses.

Bandit runs with its default profile (every test, every severity and confidence, ``#nosec``
honoured), so a file's findings here are the findings ``bandit -r`` reports on it (file,
line, test id). Its test set (the plugin manager's work: entry points, plugin imports,
blacklists) is built once per worker process by :class:`BanditScanner`, not per file;
per file only bandit's node visitor runs, over the tree the worker already parsed.

Bandit resolves import aliases (``import subprocess as sp``, ``from yaml import load as l``)
but not calls through a variable (``runner = subprocess.run; runner(cmd, shell=True)``),
``getattr(hashlib, "md5")``, builtins reached through ``builtins.eval``, a SQL query
formatted from a template variable, or a password in an annotated assignment. The ``S1xx``
checks of :func:`check` find those. :func:`merge` drops one of ours when bandit already
reports the same problem at the same line.
"""

from __future__ import annotations

import ast
import io
import logging
import re
import tokenize
from typing import Any, Final

# Importing bandit loads its formatter plugins too; one whose optional dependency is
# missing (sarif) logs an error we have no use for (we use bandit's tests only).
logging.getLogger("stevedore.extension").setLevel(logging.CRITICAL)

from bandit.core import config as b_config
from bandit.core import meta_ast as b_meta_ast
from bandit.core import metrics as b_metrics
from bandit.core import node_visitor as b_node_visitor
from bandit.core import test_set as b_test_set
from bandit.core.manager import _parse_nosec_comment

from agents.analysis.source import (
    Resolver,
    Rule,
    Source,
    dotted,
    is_true,
    keyword,
)
from agents.findings import Category, Finding, Severity

logger = logging.getLogger(__name__)

#: Bandit's severity and confidence names -> ours.
_LEVELS: Final = {"LOW": Severity.LOW, "MEDIUM": Severity.MEDIUM, "HIGH": Severity.HIGH,
                  "UNDEFINED": Severity.INFO}


class BanditScanner:
    """Bandit's test set, built once; :meth:`scan` runs it over one parsed file."""

    def __init__(self) -> None:
        # Bandit logs every file it cannot name a module for; the worker has no use for it.
        logging.getLogger("bandit").setLevel(logging.ERROR)
        self._config = b_config.BanditConfig()
        self._tests = b_test_set.BanditTestSet(self._config, {})
        #: the calls, imports and assignments of the last file scanned
        self.collected: list[ast.AST] = []

    def scan(self, fname: str, rel: str, data: bytes, tree: ast.Module,
             lines: list[str]) -> list[Finding]:
        """Bandit's findings for the file at ``fname`` (reported under ``rel``).

        Afterwards :attr:`collected` holds the nodes :func:`check` needs, gathered on
        bandit's own walk of the tree (a second walk would cost a tenth of bandit's time).

        Args:
            fname: the file's path in the workspace (bandit names its module from it).
            rel: the carried relative path the findings name.
            data: the file's bytes.
            tree: ``ast.parse(data)``; bandit's visitor walks it (and marks its nodes).
            lines: the file's text lines, for the offending line.
        """
        nosec_lines: dict[int, set[str]] = {}
        if b"#" in data:
            # As bandit's manager does: comments are where ``# nosec`` lives.
            try:
                for tok in tokenize.tokenize(io.BytesIO(data).readline):
                    if tok.type == tokenize.COMMENT:
                        nosec_lines[tok.start[0]] = _parse_nosec_comment(tok.string)
            except (tokenize.TokenError, SyntaxError):
                pass
        metrics = b_metrics.Metrics()
        metrics.begin(fname)
        visitor = _CollectingVisitor(
            fname, io.BytesIO(data), b_meta_ast.BanditMetaAst(), self._tests, False,
            nosec_lines, metrics)
        # BanditNodeVisitor.process, minus its own ast.parse.
        visitor.generic_visit(tree)
        visitor.context = {"file_data": visitor.fdata, "filename": fname, "lineno": 0,
                           "linerange": [0, 1], "col_offset": 0}
        visitor.update_scores(visitor.tester.run_tests(visitor.context, "File"))
        self.collected = visitor.collected
        out = []
        for issue in visitor.tester.results:
            line = int(issue.lineno or 0)
            span = [int(n) for n in (issue.linerange or [line]) if n]
            cwe = issue.cwe.id if issue.cwe is not None and issue.cwe.id else None
            out.append(Finding(
                category=Category.SECURITY, rule=issue.test_id, name=issue.test,
                message=issue.text, severity=_LEVELS.get(issue.severity, Severity.LOW),
                confidence=_LEVELS.get(issue.confidence, Severity.LOW), path=rel,
                line=line, end_line=max(span, default=line),
                column=max(int(issue.col_offset), 0),
                code=lines[line - 1].strip() if 0 < line <= len(lines) else "",
                cwe=cwe, tool="bandit", suggestion=_BANDIT_FIXES.get(issue.test_id, "")))
        return out


#: The nodes :func:`check` looks at (calls, annotated assignments) or resolves names
#: with (imports, assignments).
_COLLECTED: Final = (ast.Call, ast.AnnAssign, ast.Assign, ast.Import, ast.ImportFrom)


class _CollectingVisitor(b_node_visitor.BanditNodeVisitor):  # type: ignore[misc]
    """Bandit's visitor, keeping the nodes our checks need as it passes them."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.collected: list[ast.AST] = []

    def pre_visit(self, node: ast.AST) -> Any:
        if isinstance(node, _COLLECTED):
            self.collected.append(node)
        return super().pre_visit(node)


#: One-line fixes for bandit's tests that have a standard one.
_BANDIT_FIXES: Final = {
    "B102": "Do not exec data; dispatch to known functions instead.",
    "B105": "Read secrets from the environment or a secret store, not the source.",
    "B106": "Read secrets from the environment or a secret store, not the source.",
    "B107": "Read secrets from the environment or a secret store, not the source.",
    "B301": "Deserialize untrusted data with json (or a schema-checked format), not pickle.",
    "B303": "Use hashlib.sha256 (or a password KDF such as hashlib.scrypt for passwords).",
    "B307": "Use ast.literal_eval for literals; never eval untrusted input.",
    "B324": "Use hashlib.sha256, or hashlib.scrypt/pbkdf2_hmac for passwords.",
    "B506": "Use yaml.safe_load (or Loader=yaml.SafeLoader).",
    "B602": "Pass an argument list to subprocess without shell=True.",
    "B604": "Pass an argument list to subprocess without shell=True.",
    "B605": "Use subprocess.run with an argument list instead of a shell.",
    "B608": "Use parameterised queries (placeholders and a parameter tuple).",
}

_EVAL = Rule("S101", "eval_through_alias", Severity.MEDIUM, Severity.HIGH,
             _BANDIT_FIXES["B307"], 78)
_SHELL = Rule("S102", "shell_through_alias", Severity.HIGH, Severity.HIGH,
              _BANDIT_FIXES["B602"], 78)
_DESERIALIZE = Rule("S103", "unsafe_deserialization_through_alias", Severity.MEDIUM,
                    Severity.HIGH, _BANDIT_FIXES["B301"], 502)
_YAML = Rule("S104", "yaml_load_through_alias", Severity.MEDIUM, Severity.HIGH,
             _BANDIT_FIXES["B506"], 20)
_HASH = Rule("S105", "weak_hash_through_alias", Severity.HIGH, Severity.HIGH,
             _BANDIT_FIXES["B324"], 327)
_SQL = Rule("S106", "sql_built_by_formatting", Severity.MEDIUM, Severity.MEDIUM,
            _BANDIT_FIXES["B608"], 89)
_PASSWORD = Rule("S107", "hardcoded_password_annotated", Severity.LOW, Severity.MEDIUM,
                 _BANDIT_FIXES["B105"], 259)

#: Which bandit tests report the same problem as each of our rules (see :func:`merge`).
SAME_PROBLEM: Final = {
    "S101": {"B307", "B102"}, "S102": {"B602", "B604", "B605", "B609"},
    "S103": {"B301", "B302"}, "S104": {"B506"}, "S105": {"B303", "B324"},
    "S106": {"B608"}, "S107": {"B105", "B106", "B107"},
}

_SUBPROCESS: Final = frozenset(f"subprocess.{n}" for n in (
    "run", "call", "check_call", "check_output", "Popen"))
_SHELL_ALWAYS: Final = frozenset({"os.system", "os.popen", "subprocess.getoutput",
                                  "subprocess.getstatusoutput", "commands.getoutput"})
_DESERIALIZERS: Final = frozenset({"pickle.loads", "pickle.load", "pickle.Unpickler",
                                   "cPickle.loads", "cPickle.load", "marshal.loads",
                                   "marshal.load", "dill.loads", "dill.load",
                                   "shelve.open", "jsonpickle.decode"})
_YAML_LOADS: Final = frozenset({"yaml.load", "yaml.load_all", "yaml.unsafe_load",
                                "yaml.unsafe_load_all", "yaml.full_load"})
_ENV_SETTERS: Final = frozenset({"os.environ.setdefault", "os.putenv"})
_SAFE_LOADERS: Final = frozenset({"SafeLoader", "CSafeLoader", "BaseLoader", "CBaseLoader"})
_WEAK_HASHES: Final = frozenset({"md4", "md5", "sha", "sha1"})
_SQL_CALLS: Final = frozenset({"execute", "executemany", "executescript", "read_sql"})
#: Words one of which a file needs for any S1xx check to fire (a cheap text test first:
#: most files have none, and skipping their walk keeps a worker as fast as bandit).
_TRIGGERS: Final = re.compile(
    r"eval|exec|system|popen|getoutput|pickle|marshal|dill|shelve|yaml|hashlib|setattr|"
    r"environ|putenv|read_sql|pass(?:w|phrase)|_pass\b|pwd|secret|token|api_?key",
    re.IGNORECASE)
_SECRET_NAME: Final = re.compile(
    r"(^|_)(pass(wd|word|phrase)?|pwd|secret|token|api_?key)$", re.IGNORECASE)


def check(source: Source, nodes: list[ast.AST] | None = None) -> list[Finding]:
    """Our ``S1xx`` findings: dangerous calls reached in ways bandit does not follow.

    Args:
        source: the file.
        nodes: its calls, assignments and imports (:attr:`BanditScanner.collected`);
            None: walk the tree for them.
    """
    if not _TRIGGERS.search(source.text):
        return []  # none of the names these checks look for: skip the walk
    if nodes is None:
        nodes = [n for n in ast.walk(source.tree) if isinstance(n, _COLLECTED)]
    resolver = Resolver(source.tree, nodes)
    out: list[Finding] = []
    for node in nodes:
        if isinstance(node, ast.Call):
            found = _check_call(source, resolver, node)
            if found is not None:
                out.append(found)
        elif isinstance(node, ast.AnnAssign) and _is_secret_constant(node.value):
            name = dotted(node.target)
            if name is not None and _SECRET_NAME.search(name.rsplit(".", 1)[-1]):
                out.append(source.finding(_PASSWORD, Category.SECURITY, node,
                                          f"hard-coded password assigned to {name}"))
    return out


def _check_call(source: Source, resolver: Resolver, call: ast.Call) -> Finding | None:
    if isinstance(call.func, ast.Attribute) and call.func.attr in _SQL_CALLS and call.args \
            and _is_formatted(call.args[0]):
        return source.finding(_SQL, Category.SECURITY, call,
                              f"SQL passed to {call.func.attr}() is built by string "
                              "formatting")
    secret = _secret_set(call, resolver)
    if secret is not None:
        return source.finding(_PASSWORD, Category.SECURITY, call,
                              f"hard-coded password set as {secret}")
    resolved = resolver.qualname(call.func)
    if resolved is None or not resolved[1]:
        return None  # bandit follows direct calls and import aliases
    name = resolved[0]
    rule = _indirect_rule(call, name)
    if rule is None:
        return None
    return source.finding(rule, Category.SECURITY, call,
                          f"{name} ({rule.name.replace('_', ' ')}) called through "
                          f"{ast.unparse(call.func)}")


def _secret_set(call: ast.Call, resolver: Resolver) -> str | None:
    """What a call sets to a password constant (``setattr(c, "password", "x")``,
    ``os.environ.setdefault("DB_PASSWORD", "x")``), or None."""
    if len(call.args) < 2 or not _is_secret_constant(call.args[-1]):
        return None
    key = call.args[-2]
    if not (isinstance(key, ast.Constant) and isinstance(key.value, str)
            and _SECRET_NAME.search(key.value)):
        return None
    if isinstance(call.func, ast.Name) and call.func.id == "setattr" and len(call.args) == 3:
        return f"attribute {key.value!r}"
    resolved = resolver.qualname(call.func)
    if resolved is not None and resolved[0] in _ENV_SETTERS and len(call.args) == 2:
        return f"environment variable {key.value}"
    return None


def _indirect_rule(call: ast.Call, name: str) -> Rule | None:
    """Our rule for a dangerous ``name`` reached through a variable or ``getattr``."""
    if name in ("eval", "exec"):
        return _EVAL
    if name in _SHELL_ALWAYS or (name in _SUBPROCESS and is_true(keyword(call, "shell"))):
        return _SHELL
    if name in _DESERIALIZERS:
        return _DESERIALIZE
    if name in _YAML_LOADS and not _safe_yaml(call, name):
        return _YAML
    if name.startswith("hashlib.") and _weak_hash(call, name):
        return _HASH
    return None


def _is_secret_constant(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, str) and \
        len(node.value) > 0


def _is_formatted(node: ast.expr) -> bool:
    """A string built from parts at run time: ``t % x``, ``a + b``, f-string, ``.format``."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Mod, ast.Add)):
        return not (isinstance(node.left, ast.Constant) and isinstance(node.right, ast.Constant))
    if isinstance(node, ast.JoinedStr):
        return any(isinstance(v, ast.FormattedValue) for v in node.values)
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
        node.func.attr == "format"


def _safe_yaml(call: ast.Call, name: str) -> bool:
    if name not in ("yaml.load", "yaml.load_all"):
        return False
    loader = keyword(call, "Loader") or (call.args[1] if len(call.args) > 1 else None)
    loader_name = dotted(loader) if loader is not None else None
    return loader_name is not None and loader_name.rsplit(".", 1)[-1] in _SAFE_LOADERS


def _weak_hash(call: ast.Call, name: str) -> bool:
    used = keyword(call, "usedforsecurity")
    if isinstance(used, ast.Constant) and used.value is False:
        return False
    algorithm = name.split(".", 1)[1]
    if algorithm == "new" and call.args and isinstance(call.args[0], ast.Constant):
        algorithm = str(call.args[0].value)
    return algorithm.lower() in _WEAK_HASHES


def merge(bandit: list[Finding], ours: list[Finding]) -> list[Finding]:
    """Bandit's findings and ours, without ours where bandit reports the same problem at
    the same line."""
    seen = {(f.path, f.line, f.rule) for f in bandit}
    kept = [f for f in ours
            if not any((f.path, f.line, same) in seen for same in SAME_PROBLEM.get(f.rule, ()))]
    return bandit + kept
