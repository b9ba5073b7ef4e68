"""Key scopes (``wire/curve.py``): the prefix a secure broker puts on a key's routing ids
and task ids. Users paste task ids into shells, so a scope must be safe there."""

from __future__ import annotations

import re
import subprocess

import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from wire.curve import KEY_CHARS, SCOPE_KEY_CHARS, in_scope, key_scope, scope_in, scoped

_RAW_KEYS = st.binary(min_size=32, max_size=32)


def z85(raw: bytes) -> str:
    return zmq.utils.z85.encode(raw).decode("ascii")


@settings(max_examples=300, deadline=None)
@given(_RAW_KEYS)
def test_a_scope_is_shell_safe_and_found_by_position(raw: bytes) -> None:
    # Given any public key (Z85 may hold $ & < > ( ) and a leading "-")
    key = z85(raw)
    # When its scope is made
    scope = key_scope(key)
    # Then it is [a-z2-7]{20}~: a task id with it is one shell word, never an option
    assert re.fullmatch(r"[a-z2-7]{%d}~" % SCOPE_KEY_CHARS, scope), scope
    task_id = scope + "build-42"
    assert not task_id.startswith("-")
    # ...and found again by position
    assert scope_in(task_id) == scope
    assert scoped(scope, "build-42") == scoped(scope, task_id) == task_id
    assert in_scope(scope, task_id) == task_id


@settings(max_examples=100, deadline=None)
@given(_RAW_KEYS, _RAW_KEYS)
def test_keys_that_differ_in_their_first_100_bits_have_different_scopes(
        a: bytes, b: bytes) -> None:
    # (a scope holds the first 100 bits: 12 bytes and the high half of the 13th)
    if int.from_bytes(a[:13]) >> 4 == int.from_bytes(b[:13]) >> 4:
        return
    assert key_scope(z85(a)) != key_scope(z85(b))


def test_scoped_ids_pass_through_a_real_shell_unquoted() -> None:
    # Given task ids of 200 real keys, the Z85 keys themselves full of metacharacters
    keys = [zmq.curve_keypair()[0].decode() for _ in range(200)]
    assert any(set(key) & set("$&<>()!*?;") for key in keys)
    ids = [key_scope(key) + "build-42" for key in keys]
    # When bash prints each, written unquoted on its command line
    script = "\n".join(f"printf '%s\\n' {task_id}" for task_id in ids)
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30)
    # Then each comes back as it was
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ids


def test_real_keys_have_their_own_stable_scopes() -> None:
    # Two real keys: different scopes; the same key: the same scope
    first, _ = zmq.curve_keypair()
    second, _ = zmq.curve_keypair()
    assert key_scope(first.decode()) == key_scope(first.decode())
    assert key_scope(first.decode()) != key_scope(second.decode())


@pytest.mark.parametrize("bad", ["", "short", "x" * (KEY_CHARS + 1)])
def test_a_scope_of_something_not_a_key_is_a_clear_error(bad: str) -> None:
    with pytest.raises(ValueError, match="40 Z85 characters"):
        key_scope(bad)
