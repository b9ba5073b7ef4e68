"""The state service's access rules (issue 15) without the network: the prefix table, its
rules file, and the store enforcing it (roles, session keys, fenced writes, the lock
listing) on a fake clock. Nothing here sleeps or opens a socket.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from broker.errors import ConfigError
from broker.heartbeat import Liveness
from broker.state.access import (
    DEFAULT_RULES, RULES_FILE, AccessDenied, AccessRules, Coverage, Op, Peer, PrefixRule,
    merge_rules,
)
from broker.state.store import StateStore
from wire.codec import packb
from wire.state import (
    Entry, LeaseGranted, LockAcquire, LockInfo, LockList, LockTable, StateDelete, StateDone,
    StateErrorReply, StateEvents, StateGet, StateHello, StateItems, StateList, StatePut,
    StateValue, StateWatch, StateWelcome,
)
from workflows import ids

NOW = 1000.0
ADMIN = Peer("A" * 40, "admin")
CLIENT = Peer("C" * 40, "client")
AGENT = Peer("G" * 40, "agent")
NODE = Peer("N" * 40, "node")
OTHER_AGENT = Peer("H" * 40, "agent")


# ------------------------------------------------------------------ the table


@pytest.mark.parametrize(("role", "op", "key", "allowed"), [
    # the shared space: every role reads and writes
    ("agent", Op.WRITE, "stats/reviewed", True),
    ("client", Op.WRITE, "secure.k", True),
    ("node", Op.READ, "review/rules", True),
    # workflow runs: clients (runners, the workflow commands) only
    ("client", Op.WRITE, ids.run_key("r1"), True),
    ("client", Op.WRITE, ids.lease_name("r1"), True),
    ("agent", Op.READ, ids.run_key("r1"), False),
    ("agent", Op.WRITE, ids.checkpoint_key("r1", 3), False),
    ("node", Op.READ, ids.cancel_key("r1"), False),
    # LLM usage and budgets: agents count them, everyone reads them
    ("agent", Op.WRITE, "llm/usage/coder/a-1", True),
    ("client", Op.WRITE, "llm/usage/coder/a-1", False),
    ("client", Op.READ, "llm/budget/run-1", True),
    ("agent", Op.WRITE, "llm/budget/run-1", True),
    # node supervisors' area
    ("node", Op.WRITE, "nodes/n1", True),
    ("agent", Op.WRITE, "nodes/n1", False),
    ("agent", Op.READ, "nodes/n1", True),
    # admin and the broker's own key: everything
    ("admin", Op.WRITE, ids.run_key("r1"), True),
    ("broker", Op.WRITE, "llm/usage/x", True),
    # an unknown role: nothing
    ("", Op.READ, "stats/reviewed", False),
])
def test_default_rules(role: str, op: Op, key: str, allowed: bool) -> None:
    assert AccessRules().allows(role, op, key) is allowed


def test_the_longest_prefix_decides_and_the_refusal_names_it() -> None:
    rules = AccessRules([PrefixRule("", frozenset({"agent"}), frozenset({"agent"})),
                         PrefixRule("a/", frozenset(), frozenset()),
                         PrefixRule("a/open/", frozenset({"agent"}), frozenset({"agent"}))])
    assert rules.rule_for("a/open/x").prefix == "a/open/"
    assert rules.rule_for("a/closed").prefix == "a/"
    assert rules.rule_for("b").prefix == ""
    with pytest.raises(AccessDenied) as denied:
        rules.check("agent", Op.WRITE, "a/closed")
    assert denied.value.code == "unauthorized"
    assert "'a/'" in str(denied.value) and "agent" in str(denied.value)
    rules.check("agent", Op.WRITE, "a/open/x")


def test_a_table_without_a_catch_all_refuses_the_rest() -> None:
    rules = AccessRules([PrefixRule("jobs/", frozenset({"agent"}), frozenset({"agent"}))])
    assert rules.allows("agent", Op.WRITE, "jobs/1")
    assert not rules.allows("agent", Op.READ, "other")
    assert rules.allows("admin", Op.READ, "other")


def test_coverage_of_a_prefix() -> None:
    rules = AccessRules()
    assert rules.coverage("client", "") is Coverage.ALL       # a client reads everything
    assert rules.coverage("agent", "") is Coverage.SOME       # wf/ is left out
    assert rules.coverage("agent", "stats/") is Coverage.ALL
    assert rules.coverage("agent", "w") is Coverage.SOME
    assert rules.coverage("agent", "wf/") is Coverage.NONE
    assert rules.coverage("agent", "wf/runs/") is Coverage.NONE
    assert rules.coverage("admin", "") is Coverage.ALL


def test_the_rules_file_adjusts_the_defaults(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / RULES_FILE).write_text(json.dumps({"version": 1, "rules": [
        {"prefix": "secrets/", "read": ["admin"], "write": ["admin"]},
        {"prefix": "", "read": ["agent", "client"], "write": ["client"]}]}))
    rules = AccessRules.load(tmp_path)
    assert not rules.allows("client", Op.READ, "secrets/x")
    assert not rules.allows("agent", Op.WRITE, "stats/x")       # "" replaced
    assert rules.allows("agent", Op.WRITE, "llm/usage/a/1")     # defaults kept
    assert {r["prefix"] for r in rules.table()} == {"", "wf/", "llm/usage/", "llm/budget/",
                                                   "nodes/", "secrets/"}


def test_no_rules_file_means_the_defaults(tmp_path: Path) -> None:
    assert AccessRules.load(tmp_path).rules == AccessRules(DEFAULT_RULES).rules


@pytest.mark.parametrize("document", [
    [], {"version": 2, "rules": []}, {"rules": {}}, {"rules": [{"read": []}]},
    {"rules": [{"prefix": "x/", "read": ["root"]}]}, {"rules": [{"prefix": "x/", "write": "agent"}]},
])
def test_a_bad_rules_file_stops_the_start(tmp_path: Path, document: Any) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / RULES_FILE).write_text(json.dumps(document))
    with pytest.raises(ConfigError) as error:
        AccessRules.load(tmp_path)
    assert RULES_FILE in str(error.value)


def test_merge_rules_replaces_by_prefix() -> None:
    merged = merge_rules(DEFAULT_RULES, [PrefixRule("wf/", frozenset(), frozenset())])
    assert len(merged) == len(DEFAULT_RULES)
    assert next(r for r in merged if r.prefix == "wf/").read == frozenset()


# ------------------------------------------------------------------ the store


def secure_store() -> StateStore:
    store = StateStore(Liveness(1.0, 3), 1000)
    store.access = AccessRules()
    return store


def hello(store: StateStore, identity: bytes, peer: Peer) -> Any:
    return store.handle(identity, StateHello(1, identity.decode()), NOW, peer)


def put(store: StateStore, identity: bytes, peer: Peer, key: str, **kw: Any) -> Any:
    return store.handle(identity, StatePut(7, key, packb(1), **kw), NOW, peer)


def code_of(reply: Any) -> str | None:
    return reply.code if isinstance(reply, StateErrorReply) else None


def locks_of(reply: Any) -> list[LockInfo]:
    assert isinstance(reply, LockTable), reply
    return reply.locks


def test_the_store_refuses_what_the_role_may_not_do() -> None:
    store = secure_store()
    assert isinstance(hello(store, b"g", AGENT), StateWelcome)
    assert isinstance(hello(store, b"c", CLIENT), StateWelcome)
    # Given a run record written by a client
    assert isinstance(put(store, b"c", CLIENT, ids.run_key("r1")), StateDone)
    # Then an agent can neither write nor read it, nor take the run's lease
    refused = put(store, b"g", AGENT, ids.run_key("r1"))
    assert code_of(refused) == "unauthorized" and "'wf/'" in refused.message
    assert code_of(store.handle(b"g", StateGet(2, ids.run_key("r1")), NOW, AGENT)) == \
        "unauthorized"
    assert code_of(store.handle(b"g", StateDelete(3, ids.run_key("r1")), NOW, AGENT)) == \
        "unauthorized"
    assert code_of(store.handle(b"g", LockAcquire(4, ids.lease_name("r1"), 10.0, 0.0), NOW,
                                AGENT)) == "unauthorized"
    assert code_of(store.handle(b"g", StateList(5, "wf/"), NOW, AGENT)) == "unauthorized"
    assert code_of(store.handle(b"g", StateWatch(6, "wf/runs/"), NOW, AGENT)) == "unauthorized"
    # But it writes the shared space, and its listing of everything leaves wf/ out
    assert isinstance(put(store, b"g", AGENT, "stats/reviewed"), StateDone)
    listed = store.handle(b"g", StateList(8, "", None, 1, False), NOW, AGENT)
    assert isinstance(listed, StateItems)
    assert [e.key for e in listed.items] == ["stats/reviewed"]
    # And the refused requests changed nothing
    value = store.handle(b"c", StateGet(9, ids.run_key("r1")), NOW, CLIENT)
    assert isinstance(value, StateValue) and value.version == 1


def test_a_watch_sees_only_what_its_role_may_read() -> None:
    store = secure_store()
    hello(store, b"g", AGENT)
    hello(store, b"c", CLIENT)
    assert isinstance(store.handle(b"g", StateWatch(20, ""), NOW, AGENT), StateDone)
    assert isinstance(store.handle(b"c", StateWatch(21, ""), NOW, CLIENT), StateDone)
    put(store, b"c", CLIENT, ids.run_key("r1"))
    put(store, b"c", CLIENT, "jobs/1")
    seen: dict[bytes, list[str]] = {}
    for who, message in store.take_outgoing():
        assert isinstance(message, StateEvents)
        seen.setdefault(who, []).extend(change.key for change in message.events)
    assert seen == {b"g": ["jobs/1"], b"c": [ids.run_key("r1"), "jobs/1"]}
    # A replay from an old version is filtered the same way
    store.handle(b"g", StateWatch(22, "", 0), NOW, AGENT)
    replayed = [c.key for _, m in store.take_outgoing() if isinstance(m, StateEvents)
                for c in m.events]
    assert replayed == ["jobs/1"]


def test_a_session_is_bound_to_the_key_that_opened_it() -> None:
    store = secure_store()
    hello(store, b"s", CLIENT)
    # Another key on the same routing id (ROUTER_HANDOVER) is refused, HELLO or not
    assert code_of(put(store, b"s", OTHER_AGENT, "jobs/1")) == "unauthorized"
    assert code_of(hello(store, b"s", OTHER_AGENT)) == "unauthorized"
    # The owner goes on
    assert isinstance(put(store, b"s", CLIENT, "jobs/1"), StateDone)
    assert isinstance(hello(store, b"s", CLIENT), StateWelcome)


def test_fenced_writes_pass_only_for_the_holder_session_in_plaintext_too() -> None:
    for store, holder, other in ((StateStore(Liveness(1.0, 3), 1000), Peer("", ""),
                                  Peer("", "")), (secure_store(), CLIENT, AGENT)):
        hello(store, b"holder", holder)
        hello(store, b"other", other)
        granted = store.handle(b"holder", LockAcquire(2, "repo/x", 10.0, 0.0), NOW, holder)
        assert isinstance(granted, LeaseGranted)
        fence = ("repo/x", granted.token)
        # The holder's fenced write passes; another session with the same token does not
        assert isinstance(put(store, b"holder", holder, "repo/x/head", fence=fence), StateDone)
        stolen = put(store, b"other", other, "repo/x/head", fence=fence)
        assert code_of(stolen) == "stale_token"
        assert "only the holder" in stolen.message
        deleted = store.handle(b"other", StateDelete(3, "repo/x/head", fence=fence), NOW, other)
        assert code_of(deleted) == "stale_token"


def test_the_lock_listing_hides_other_sessions_tokens_but_not_from_an_admin() -> None:
    store = secure_store()
    for who, peer in ((b"c", CLIENT), (b"g", AGENT), (b"a", ADMIN)):
        hello(store, who, peer)
    c_lease = store.handle(b"c", LockAcquire(2, ids.lease_name("r1"), 10.0, 0.0), NOW, CLIENT)
    g_lease = store.handle(b"g", LockAcquire(3, "repo/x", 10.0, 0.0), NOW, AGENT)
    assert isinstance(c_lease, LeaseGranted) and isinstance(g_lease, LeaseGranted)

    def listing(who: bytes, peer: Peer) -> dict[str, tuple[int | None, str]]:
        rows = locks_of(store.handle(who, LockList(9, ""), NOW, peer))
        return {row.name: (row.token, row.session) for row in rows}

    # The holder sees its own token; others see the lock and holder, no token or session
    assert listing(b"c", CLIENT) == {ids.lease_name("r1"): (c_lease.token, "c"),
                                     "repo/x": (None, "")}
    # An agent does not even see the locks of wf/, which it may not read
    assert listing(b"g", AGENT) == {"repo/x": (g_lease.token, "g")}
    assert listing(b"a", ADMIN) == {ids.lease_name("r1"): (c_lease.token, "c"),
                                    "repo/x": (g_lease.token, "g")}
    rows = locks_of(store.handle(b"g", LockList(9, "repo/"), NOW, AGENT))
    assert rows[0].holder == "g" and rows[0].expires_in_s == 10.0


def test_a_plaintext_store_checks_no_role_and_shows_every_token() -> None:
    store = StateStore(Liveness(1.0, 3), 1000)
    hello(store, b"a", Peer("", ""))
    hello(store, b"b", Peer("", ""))
    assert isinstance(put(store, b"a", Peer("", ""), ids.run_key("r1")), StateDone)
    lease = store.handle(b"a", LockAcquire(2, "L", 10.0, 0.0), NOW)
    assert isinstance(lease, LeaseGranted)
    rows = locks_of(store.handle(b"b", LockList(9, ""), NOW))
    assert [(r.name, r.token, r.session) for r in rows] == [("L", lease.token, "a")]


def test_a_filtered_listing_pages_past_what_it_leaves_out() -> None:
    # A listing filtered to nothing still says whether more remains, never an empty
    # page with more=True (the SDK stops paging at an empty page).
    store = secure_store()
    hello(store, b"c", CLIENT)
    hello(store, b"g", AGENT)
    for n in range(5):
        put(store, b"c", CLIENT, f"wf/runs/r{n}")
    put(store, b"c", CLIENT, "x")
    listed = store.handle(b"g", StateList(4, "", None, 2, False), NOW, AGENT)
    assert isinstance(listed, StateItems)
    assert listed.items == [Entry("x", 6, None)] and listed.more is False
