"""Who may read and write which keys of the state service (issue 15; no sockets, no I/O
but the rules file read at start).

On a secure service (``--secure``) every request is checked against a table of key
prefixes: the rule with the **longest** prefix a key starts with decides, and says which
roles of the allow-list (``broker/security.py``) may read and which may write under it.
Lock names share the key space: acquiring a lock needs write access to its name (so an
agent cannot take a workflow runner's lease and stall the run). ``admin`` and ``broker``
(the broker's own key) may do everything, whatever the table says, so no rules file can
lock the operator out. A plaintext service has no roles and checks nothing.

The default table (:data:`DEFAULT_RULES`)::

    prefix        read                         write (and lock)
    ""            agent client node admin      agent client node admin   (shared space)
    wf/           client admin                 client admin              (workflow runs)
    llm/usage/    agent client node admin      agent admin               (LLM usage)
    llm/budget/   agent client node admin      agent admin               (token budgets)
    nodes/        agent client node admin      node admin                (node supervisors)

``<data dir>/keys/state_rules.json`` adjusts it, read once when the service starts::

    {"version": 1,
     "rules": [{"prefix": "secrets/", "read": ["admin"], "write": ["admin"]},
               {"prefix": "", "read": ["agent", "client", "node"], "write": ["client"]}]}

A rule of the file replaces the default rule of the same prefix, or adds one.

Listings and watches of a prefix that covers keys the role may not read are allowed
(``list("")`` from an agent): the keys it may not read are left out (:meth:`coverage`
says when filtering is needed at all). A prefix entirely inside such an area is refused
with ``unauthorized``, rather than looking empty.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, NamedTuple

import orjson

from broker.errors import ConfigError, StateRequestError
from wire.curve import keys_dir
from wire.state import (
    LockAcquire, StateDelete, StateGet, StateList, StateMessage, StatePut, StateWatch,
)

#: The rules file in the keys dir of the data dir.
RULES_FILE: Final = "state_rules.json"
RULES_VERSION: Final = 1
#: Roles that may do everything: the operator's keys and the broker's own.
FULL_ACCESS_ROLES: Final = frozenset({"admin", "broker"})
#: The roles a rule may name (those of the allow-list but the full-access ones).
RULE_ROLES: Final = frozenset({"agent", "client", "node", "admin"})
#: The error code of a refused request (the same as the broker's, ``wire.tasks``).
UNAUTHORIZED: Final = "unauthorized"

_EVERYONE: Final = frozenset({"agent", "client", "node", "admin"})


class Op(str, enum.Enum):
    """What a request does to a key."""

    READ = "read"
    WRITE = "write"


class Coverage(enum.Enum):
    """How much of a prefix a role may read."""

    #: every key under it: nothing to filter
    ALL = "all"
    #: some keys under it: filter each one
    SOME = "some"
    #: none: refuse
    NONE = "none"


class Peer(NamedTuple):
    """The sender of a request: its CURVE public key and its role (both "" in plaintext)."""

    key: str
    role: str


#: The sender of every request of a plaintext service.
ANONYMOUS: Final = Peer("", "")


@dataclass(frozen=True, slots=True)
class PrefixRule:
    """Who may read and write the keys starting with ``prefix``."""

    prefix: str
    read: frozenset[str]
    write: frozenset[str]

    def allows(self, role: str, op: Op) -> bool:
        """Whether ``role`` may do ``op`` here (full-access roles aside)."""
        return role in (self.read if op is Op.READ else self.write)

    def to_doc(self) -> dict[str, Any]:
        """The rule as the rules file writes it."""
        return {"prefix": self.prefix, "read": sorted(self.read), "write": sorted(self.write)}


def _rule(prefix: str, read: Iterable[str], write: Iterable[str]) -> PrefixRule:
    return PrefixRule(prefix, frozenset(read), frozenset(write))


DEFAULT_RULES: Final[tuple[PrefixRule, ...]] = (
    # The shared space: what agents coordinate through (README: review/rules,
    # stats/reviewed, repo/<name>/head) and what `orchestrator state` reads and writes.
    _rule("", _EVERYONE, _EVERYONE),
    # Workflow runs (workflows/ids.py): records, checkpoints, control keys, large inputs,
    # the runners' leases. Written by runners and the `workflow` commands, both clients;
    # run inputs may hold user code, and an agent taking wf/lease/<run> would stall it.
    _rule("wf/", ("client", "admin"), ("client", "admin")),
    # Agents publish their own LLM usage; everyone reads it (status, /metrics), and a
    # client cannot forge it.
    _rule("llm/usage/", _EVERYONE, ("agent", "admin")),
    # Token budgets are counted by the agents that spend them (agent_sdk.llm.TokenBudget).
    _rule("llm/budget/", _EVERYONE, ("agent", "admin")),
    # Reserved for node supervisors (issue 16): what runs where.
    _rule("nodes/", _EVERYONE, ("node", "admin")),
)


class AccessDenied(StateRequestError):
    """Raised when a role may not do what a request asks under a key prefix; its reply
    is the ERROR ``unauthorized`` naming the prefix and the role."""

    def __init__(self, role: str, op: Op, key: str, prefix: str, what: str = "key") -> None:
        area = f"under {prefix!r}" if prefix else "in the shared space"
        super().__init__(f"role {role or '(none)'} may not {op.value} {what} {key!r}: "
                         f"{op.value} {area} is not granted to {role or '(none)'}",
                         UNAUTHORIZED)
        self.role = role
        self.op = op
        self.key = key
        self.prefix = prefix


class AccessRules:
    """The prefix table of one service.

    Args:
        rules: the table; a rule for ``""`` is added (nobody but the full-access roles)
            when missing, so that every key has a rule.
    """

    def __init__(self, rules: Iterable[PrefixRule] = DEFAULT_RULES) -> None:
        by_prefix = {rule.prefix: rule for rule in rules}
        by_prefix.setdefault("", _rule("", (), ()))
        #: longest prefix first: the first rule a key starts with is its rule
        self.rules: tuple[PrefixRule, ...] = tuple(
            sorted(by_prefix.values(), key=lambda r: (-len(r.prefix), r.prefix)))

    @classmethod
    def load(cls, home: Path) -> AccessRules:
        """The default table adjusted by the data dir's rules file (if there is one).

        Raises:
            ConfigError: the file is unreadable or malformed (a secure service does not
                start on rules it cannot read: guessing could open what was closed).
        """
        path = keys_dir(home) / RULES_FILE
        try:
            document = orjson.loads(path.read_bytes())
        except FileNotFoundError:
            return cls()
        except (OSError, orjson.JSONDecodeError) as e:
            raise ConfigError(f"cannot read the state access rules {path}: {e}") from None
        return cls(merge_rules(DEFAULT_RULES, parse_rules(document, str(path))))

    def rule_for(self, key: str) -> PrefixRule:
        """The rule deciding for ``key``: the longest prefix it starts with."""
        for rule in self.rules:
            if key.startswith(rule.prefix):
                return rule
        raise AssertionError("the table always has a rule for ''")  # pragma: no cover

    def allows(self, role: str, op: Op, key: str) -> bool:
        """Whether ``role`` may do ``op`` on ``key``."""
        return role in FULL_ACCESS_ROLES or self.rule_for(key).allows(role, op)

    def check(self, role: str, op: Op, key: str, what: str = "key") -> None:
        """Pass, or raise :class:`AccessDenied` naming the rule's prefix."""
        if role in FULL_ACCESS_ROLES:
            return
        rule = self.rule_for(key)
        if not rule.allows(role, op):
            raise AccessDenied(role, op, key, rule.prefix, what)

    def coverage(self, role: str, prefix: str) -> Coverage:
        """How much under ``prefix`` ``role`` may read: the rule deciding for the prefix
        itself, and every more specific rule beneath it."""
        if role in FULL_ACCESS_ROLES:
            return Coverage.ALL
        top = self.rule_for(prefix).allows(role, Op.READ)
        beneath = [rule.allows(role, Op.READ) for rule in self.rules
                   if len(rule.prefix) > len(prefix) and rule.prefix.startswith(prefix)]
        if all(allowed == top for allowed in beneath):
            return Coverage.ALL if top else Coverage.NONE
        return Coverage.SOME

    def check_request(self, role: str, msg: StateMessage) -> Coverage:
        """Check one request of ``role``; returns how much of a listed or watched prefix
        it may see (ALL for other requests).

        Raises:
            AccessDenied: it may not.
        """
        match msg:
            case StateGet(_, key):
                self.check(role, Op.READ, key)
            case StatePut() | StateDelete():
                self.check(role, Op.WRITE, msg.key)
            case LockAcquire(_, name):
                self.check(role, Op.WRITE, name, "lock")
            case StateList(_, prefix) | StateWatch(_, prefix):
                coverage = self.coverage(role, prefix)
                if coverage is Coverage.NONE:
                    raise AccessDenied(role, Op.READ, prefix, self.rule_for(prefix).prefix,
                                       "prefix")
                return coverage
        # RENEW and RELEASE need the lease (granted only with write access), LOCKS is
        # filtered, HELLO, PING, UNWATCH and INFO touch no key.
        return Coverage.ALL

    def table(self) -> list[dict[str, Any]]:
        """The rules, shortest prefix first (for INFO and documentation)."""
        return [rule.to_doc() for rule in sorted(self.rules, key=lambda r: r.prefix)]


def parse_rules(document: Any, source: str) -> list[PrefixRule]:
    """The rules of a rules file's document.

    Raises:
        ConfigError: not ``{"version": 1, "rules": [{prefix, read, write}, ...]}`` with
            known roles.
    """
    if not isinstance(document, dict) or document.get("version", RULES_VERSION) != RULES_VERSION:
        raise ConfigError(f"{source}: not a version {RULES_VERSION} state rules document")
    items = document.get("rules")
    if not isinstance(items, list):
        raise ConfigError(f'{source}: "rules" must be a list')
    rules = []
    for index, item in enumerate(items):
        where = f"{source}: rules[{index}]"
        if not isinstance(item, dict) or not isinstance(item.get("prefix"), str):
            raise ConfigError(f'{where}: each rule needs a "prefix" string')
        sets = []
        for op in Op:
            roles = item.get(op.value, [])
            if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
                raise ConfigError(f'{where}.{op.value}: a list of roles')
            unknown = sorted(set(roles) - RULE_ROLES)
            if unknown:
                raise ConfigError(f"{where}.{op.value}: unknown role(s) {', '.join(unknown)} "
                                  f"(roles: {', '.join(sorted(RULE_ROLES))})")
            sets.append(frozenset(roles))
        rules.append(PrefixRule(item["prefix"], sets[0], sets[1]))
    return rules


def merge_rules(base: Iterable[PrefixRule], overrides: Iterable[PrefixRule]
                ) -> list[PrefixRule]:
    """``base`` with each rule of ``overrides`` replacing the one of its prefix (or added)."""
    merged = {rule.prefix: rule for rule in base}
    merged.update((rule.prefix, rule) for rule in overrides)
    return list(merged.values())


__all__ = [
    "ANONYMOUS",
    "DEFAULT_RULES",
    "FULL_ACCESS_ROLES",
    "RULES_FILE",
    "UNAUTHORIZED",
    "AccessDenied",
    "AccessRules",
    "Coverage",
    "Op",
    "Peer",
    "PrefixRule",
    "merge_rules",
    "parse_rules",
]
