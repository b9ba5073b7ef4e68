"""CURVE and ZAP on the broker's sockets: the allow-list, the key files of a secure data
dir, and the ZAP handler threads.

Every server socket of a secure broker (the task ROUTER, the bus XPUB and XSUB, the state
service ROUTER) is a CURVE server with the ZAP domain ``orchestrator`` enforced
(``wire/curve.py``): libzmq asks the ZAP handler of the socket's context about every new
connection, and refuses it while no handler answers. Each context (the broker's, the
state service's, the bus forwarder's) has its own ZAP handler thread, since ZAP is an
inproc endpoint of one context; all of them read one :class:`AllowList`.

The allow-list is ``<data dir>/keys/authorized.json``::

    {"version": 1,
     "keys": {"<public key, Z85>": {"role": "agent", "names": [], "comment": "...",
                                    "added_at": 1764780000.0}}}

It is read again whenever the file changes (its size, mtime and inode are compared on
every ZAP request: a stat, microseconds, once per new connection), so ``orchestrator keys
authorize`` and ``keys revoke`` take effect without a restart, for **new** connections.
libzmq cannot drop one peer of a bound socket: a connection accepted before a revoke
stays up until it closes (a later part of issue 15 refuses its messages with
``unauthorized``).

An accepted connection's ZAP user id is the peer's public key (Z85), and its metadata
property ``Role`` the key's role: the broker reads both from any frame of the peer's
messages (``frame.get("User-Id")``, ``frame.get("Role")``).
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import orjson
import zmq
import zmq.utils.z85

from broker.engine.access import Grant
from wire.curve import (
    AUTHORIZED_FILE, BROKER_KEY_NAME, ClientKeys, KeyFileError, LOCAL_AGENT_KEY_NAME,
    LOCAL_NODE_KEY_NAME,
    LOCAL_KEY_NAME, PUBLIC_SUFFIX,
    SECRET_SUFFIX, apply_client, apply_server, check_private, is_key, keys_dir,
    read_secret_file, write_key_pair, key_scope,
)

logger = logging.getLogger(__name__)

#: The roles a key may have; ``broker`` is the broker's own key (its bus publisher).
ROLES: Final = ("agent", "client", "node", "admin", "broker")
#: The allow-list file's format version.
ALLOW_LIST_VERSION: Final = 1
#: libzmq's ZAP endpoint in every context, and the protocol version it speaks.
ZAP_ENDPOINT: Final = "inproc://zeromq.zap.01"
_ZAP_VERSION: Final = b"1.0"
#: Refused handshakes kept for the broker loop to announce (older ones are dropped).
MAX_QUEUED_REFUSALS: Final = 256
#: How long starting a ZAP handler may take before the broker gives up.
ZAP_START_TIMEOUT_S: Final = 5.0


# ---------------------------------------------------------------------- the allow-list


def authorized_path(home: Path) -> Path:
    """The allow-list file of the data dir ``home``."""
    return keys_dir(home) / AUTHORIZED_FILE


def load_authorized(path: Path) -> dict[str, dict[str, Any]]:
    """The allow-list's entries, public key -> ``{role, names, comment, added_at}``
    (empty when the file does not exist).

    Raises:
        KeyFileError: the file is unreadable or not an allow-list.
    """
    try:
        document = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        return {}
    except (OSError, orjson.JSONDecodeError) as e:
        raise KeyFileError(f"cannot read the allow-list {path}: {e}") from None
    keys = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(keys, dict):
        raise KeyFileError(f"{path} is not an allow-list (no \"keys\" map)")
    return {key: entry for key, entry in keys.items()
            if is_key(key) and isinstance(entry, dict) and entry.get("role") in ROLES}


def save_authorized(path: Path, keys: dict[str, dict[str, Any]]) -> None:
    """Write the allow-list atomically (a new file renamed over the old, 0600): a ZAP
    handler reading it meanwhile sees the old list or the new one, never half of one."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    document = orjson.dumps({"version": ALLOW_LIST_VERSION, "keys": keys},
                            option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(document)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def authorize(path: Path, public_key: str, role: str, comment: str = "",
              names: list[str] | None = None,
              capabilities: list[str] | None = None) -> dict[str, Any]:
    """Add (or update) ``public_key`` in the allow-list; returns its entry. An agent key
    with ``names`` or ``capabilities`` may register only under those."""
    keys = load_authorized(path)
    entry = {"role": role, "names": names or [], "capabilities": capabilities or [],
             "comment": comment, "added_at": time.time()}
    keys[public_key] = entry
    save_authorized(path, keys)
    return entry


def revoke(path: Path, public_key: str) -> dict[str, Any] | None:
    """Remove ``public_key`` from the allow-list; returns its entry (None if absent)."""
    keys = load_authorized(path)
    entry = keys.pop(public_key, None)
    if entry is not None:
        save_authorized(path, keys)
    return entry


class AllowList:
    """The allow-list as the ZAP handlers see it: reloaded when the file changes.

    Args:
        path: the allow-list file.
        fixed: keys accepted whatever the file says (the broker's own), key -> role.
    """

    def __init__(self, path: Path, fixed: dict[str, str]) -> None:
        self.path = path
        self.fixed = dict(fixed)
        self._lock = threading.Lock()
        self._signature: tuple[int, int, int] | None = None
        self._roles: dict[str, str] = {}
        self._entries: dict[str, dict[str, Any]] = {}
        #: how many times the file was (re)loaded: a reader compares it to see a change
        self.generation = 0

    def role(self, public_key: str) -> str | None:
        """The role of ``public_key`` (Z85), or None when it is not authorized."""
        fixed = self.fixed.get(public_key)
        if fixed is not None:
            return fixed
        with self._lock:
            self._reload_if_changed()
            return self._roles.get(public_key)

    def grant(self, public_key: str) -> Grant | None:
        """What ``public_key`` may do (role, names, capabilities), or None when it is
        not authorized (the file is read again first if it changed)."""
        scope = key_scope(public_key)
        fixed = self.fixed.get(public_key)
        if fixed is not None:
            return Grant(fixed, scope)
        with self._lock:
            self._reload_if_changed()
            entry = self._entries.get(public_key)
        if entry is None:
            return None
        return Grant(str(entry["role"]), scope, _strings(entry.get("names")),
                     _strings(entry.get("capabilities")))

    def _reload_if_changed(self) -> None:
        try:
            st = os.stat(self.path)
            signature = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            signature = (0, 0, 0)
        if signature == self._signature:
            return
        try:
            entries = load_authorized(self.path)
        except KeyFileError as e:
            # Keep the last good list: a file being edited by hand must not open the door
            # (nor lock everyone out).
            logger.error("allow-list not reloaded: %s", e)
            return
        self._roles = {key: str(entry["role"]) for key, entry in entries.items()}
        self._entries = entries
        self._signature = signature
        self.generation += 1
        logger.info("allow-list loaded: %d key(s) from %s", len(self._roles), self.path)


def _strings(value: Any) -> frozenset[str]:
    """A list of strings from the allow-list file (anything else: none)."""
    if not isinstance(value, list):
        return frozenset()
    return frozenset(item for item in value if isinstance(item, str))


class KeyGrants:
    """The broker loop's view of the allow-list: each key's :class:`Grant`, cached so
    that a message costs a dict lookup; :meth:`refresh` (every heartbeat interval) reads
    the file again when it changed and names the keys that lost their authorisation.

    Args:
        allow: the allow-list the ZAP handlers read too.
    """

    def __init__(self, allow: AllowList) -> None:
        self.allow = allow
        self._cache: dict[str, Grant] = {}
        #: connections the ZAP handlers refused, (key, address), oldest first: appended
        #: by their threads, taken by the loop (a deque's ends are thread-safe)
        self.refusals: deque[tuple[str, str]] = deque(maxlen=MAX_QUEUED_REFUSALS)
        self._generation = allow.generation

    def grant(self, public_key: str) -> Grant | None:
        """The grant of ``public_key``, or None: not (or no longer) authorized."""
        grant = self._cache.get(public_key)
        if grant is None:
            # A key authorized since the last refresh (its connection passed ZAP, which
            # read the new file): look again.
            grant = self.allow.grant(public_key)
            if grant is not None:
                self._cache[public_key] = grant
        return grant

    def take_refusals(self) -> list[tuple[str, str]]:
        """The handshakes refused since the last call: (key, address)."""
        taken = []
        while self.refusals:
            taken.append(self.refusals.popleft())
        return taken

    def refresh(self) -> set[str]:
        """Re-read the allow-list if it changed; returns the scopes of the cached keys
        that are no longer authorized (their grants are dropped too, and a changed
        grant is read again on the key's next message)."""
        self.allow.role("")  # reloads the file if it changed
        if self.allow.generation == self._generation:
            return set()  # (a ZAP handler may have reloaded it: the count tells)
        self._generation = self.allow.generation
        revoked = {grant.scope for key, grant in self._cache.items()
                   if self.allow.grant(key) is None}
        self._cache.clear()
        return revoked


# ---------------------------------------------------------------------- the ZAP handlers


def _metadata(properties: dict[str, str]) -> bytes:
    """ZMTP metadata: per property a 1-byte name length, the name, a 4-byte value
    length, the value."""
    out = b""
    for name, value in properties.items():
        raw = value.encode()
        out += bytes([len(name)]) + name.encode() + struct.pack(">I", len(raw)) + raw
    return out


class ZapHandler:
    """Answers the ZAP requests of one context from a daemon thread.

    It ends when the context terminates (its socket's ``recv`` raises
    ``ContextTerminated``), so whoever terminates the context needs nothing more.

    Args:
        ctx: the context whose server sockets it authenticates.
        allow: who is accepted.
        name: the thread's name.
    """

    def __init__(self, ctx: zmq.Context[Any], allow: AllowList, name: str,
                 refusals: deque[tuple[str, str]] | None = None) -> None:
        self.allow = allow
        self.accepted = 0
        self.refused = 0
        #: (key, address) of recent refusals, for the broker loop to announce
        self.refusals: deque[tuple[str, str]] = refusals if refusals is not None \
            else deque(maxlen=MAX_QUEUED_REFUSALS)
        self._ctx = ctx
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        """Bind the ZAP endpoint (in the thread) and return once it is bound.

        Raises:
            zmq.ZMQError: the endpoint could not be bound (another handler has it).
            TimeoutError: the thread did not start in time.
        """
        self._thread.start()
        if not self._ready.wait(ZAP_START_TIMEOUT_S):
            raise TimeoutError("the ZAP handler did not start")
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        try:
            sock = self._ctx.socket(zmq.REP)
            sock.setsockopt(zmq.LINGER, 0)
            sock.bind(ZAP_ENDPOINT)
        except zmq.ZMQError as e:
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        try:
            while True:
                sock.send_multipart(self.answer(sock.recv_multipart()))
        except zmq.ContextTerminated:
            pass
        except Exception:  # noqa: BLE001 - a dead handler refuses everyone: say why
            logger.critical("the ZAP handler stopped: no new connection will be accepted",
                            exc_info=True)
        finally:
            sock.close(linger=0)

    def answer(self, request: list[bytes]) -> list[bytes]:
        """The ZAP reply to one request (RFC 27): 200 with the key as user id and its
        role as metadata, or 400."""
        if len(request) < 6:
            return [_ZAP_VERSION, request[1] if len(request) > 1 else b"", b"500",
                    b"malformed ZAP request", b"", b""]
        version, request_id, _domain, address, _identity, mechanism = request[:6]
        credentials = request[6:]
        if version != _ZAP_VERSION:
            return [_ZAP_VERSION, request_id, b"500", b"unsupported ZAP version", b"", b""]
        role = None
        key = ""
        if mechanism == b"CURVE" and len(credentials) == 1 and len(credentials[0]) == 32:
            key = zmq.utils.z85.encode(credentials[0]).decode()
            role = self.allow.role(key)
        if role is None:
            self.refused += 1
            self.refusals.append((key or "(none)", address.decode(errors="replace")))
            logger.warning("refused a %s connection from %s: key %s is not authorized",
                           mechanism.decode(errors="replace"),
                           address.decode(errors="replace"), key or "(none)")
            return [_ZAP_VERSION, request_id, b"400", b"unauthorized", b"", b""]
        self.accepted += 1
        return [_ZAP_VERSION, request_id, b"200", b"OK", key.encode(),
                _metadata({"Role": role})]


# ---------------------------------------------------------------------- the server side


@dataclass(frozen=True, slots=True)
class SecureHome:
    """A secure data dir's keys: the broker's pair and the local admin key's files."""

    home: Path
    broker_public: str
    broker_secret: str
    local_public_file: Path
    local_secret_file: Path
    #: the key of the agents ``start`` launches (role agent)
    local_agent_secret_file: Path
    #: the key of this machine's node supervisor (role node)
    local_node_secret_file: Path


def _local_key(keys: Path, authorized: Path, name: str, role: str, note: str) -> Path:
    """The secret file of the local key ``name``, created and authorized with ``role``
    when missing (its permissions checked either way)."""
    secret_file = keys / f"{name}{SECRET_SUFFIX}"
    if not secret_file.exists():
        write_key_pair(keys, name)
        public, _ = read_secret_file(secret_file)
        authorize(authorized, public, role, note)
    else:
        read_secret_file(secret_file)
    return secret_file


def prepare_secure_home(home: Path) -> SecureHome:
    """Make ``home`` ready for a secure broker, checking its permissions.

    Creates what is missing: the data dir and its keys dir (0700), the broker's key pair,
    the local admin key (authorized as ``admin``: the CLI and the local agents of this
    data dir use it), and an empty allow-list. Refuses a data dir, keys dir or secret key
    file that others may read.

    Raises:
        KeyFileError: a permission or key file problem (one line, with the chmod to run).
        OSError: files cannot be created.
    """
    if not home.exists():
        home.mkdir(mode=0o700, parents=True)
    check_private(home, 0o700)
    keys = keys_dir(home)
    keys.mkdir(mode=0o700, exist_ok=True)
    check_private(keys, 0o700)
    broker_secret_file = keys / f"{BROKER_KEY_NAME}{SECRET_SUFFIX}"
    if not broker_secret_file.exists():
        write_key_pair(keys, BROKER_KEY_NAME)
    broker_public, broker_secret = read_secret_file(broker_secret_file)
    local_secret_file = keys / f"{LOCAL_KEY_NAME}{SECRET_SUFFIX}"
    local_public_file = keys / f"{LOCAL_KEY_NAME}{PUBLIC_SUFFIX}"
    path = authorized_path(home)
    if not local_secret_file.exists():
        write_key_pair(keys, LOCAL_KEY_NAME)
        local_public, _ = read_secret_file(local_secret_file)
        authorize(path, local_public, "admin", "local admin key (created by a secure start)",
                  ["local-admin"])
    else:
        read_secret_file(local_secret_file)  # its permissions are checked too
    agent_secret_file = _local_key(keys, path, LOCAL_AGENT_KEY_NAME, "agent",
                                   "the agents `start` launches (created by a secure start)")
    node_secret_file = _local_key(keys, path, LOCAL_NODE_KEY_NAME, "node",
                                  "this machine's node supervisor (created by a secure start)")
    if not path.exists():
        save_authorized(path, {})
    check_private(path, 0o600)
    return SecureHome(home, broker_public, broker_secret, local_public_file,
                      local_secret_file, agent_secret_file, node_secret_file)


class CurveServer:
    """What a secure broker applies to its sockets: CURVE server options and one ZAP
    handler per context on its server sockets; its own key pair on its client sockets
    (the broker's event publisher connects to the bus).

    Args:
        keys: the data dir's keys (:func:`prepare_secure_home`).
    """

    def __init__(self, keys: SecureHome) -> None:
        self.public_key = keys.broker_public
        self._secret_key = keys.broker_secret
        self.allow = AllowList(authorized_path(keys.home), {keys.broker_public: "broker"})
        #: the broker loop's cached view of :attr:`allow`
        self.grants = KeyGrants(self.allow)
        self._handlers: dict[int, ZapHandler] = {}
        self._lock = threading.Lock()

    def secure_server(self, ctx: zmq.Context[Any], sock: zmq.Socket[Any], name: str) -> None:
        """Make ``sock`` a CURVE server of ``ctx`` and start ``ctx``'s ZAP handler (once
        per context). Call before binding ``sock``."""
        with self._lock:
            if id(ctx) not in self._handlers:
                handler = ZapHandler(ctx, self.allow, f"zap-{name}", self.grants.refusals)
                handler.start()
                self._handlers[id(ctx)] = handler
        apply_server(sock, self._secret_key)

    def secure_client(self, sock: zmq.Socket[Any]) -> None:
        """Make ``sock`` a CURVE client of the broker's own servers (before connect)."""
        apply_client(sock, ClientKeys(self.public_key, self.public_key, self._secret_key))

    def refused(self) -> int:
        """Connections the ZAP handlers refused since the start."""
        return sum(handler.refused for handler in self._handlers.values())


#: The values of ``ORCH_SECURE`` that turn ``--secure`` on (as ``BrokerConfig.from_env``
#: reads it), so that every process of a data dir agrees on what the variable means.
SECURE_ENV: Final = "ORCH_SECURE"
_SECURE_VALUES: Final = ("1", "true", "yes", "on")


def secure_requested(flag: bool | None) -> bool:
    """Whether a standalone process (the state service, the bus forwarder) runs secure:
    its ``--secure`` flag, else ``ORCH_SECURE`` read as the broker reads it."""
    if flag:
        return True
    return os.environ.get(SECURE_ENV, "").strip().lower() in _SECURE_VALUES


def curve_server_for(home: Path) -> CurveServer:
    """The :class:`CurveServer` of a process serving the data dir ``home`` beside (or
    instead of) its broker: the data dir made ready and checked exactly as the broker's
    ``--secure`` does (:func:`prepare_secure_home`), so that a standalone state service
    or bus forwarder has the broker's key pair and accepts the keys of the same
    allow-list.

    Raises:
        KeyFileError: a permission, key file or allow-list problem, or files that cannot
            be created (one line, saying what to do).
    """
    try:
        return CurveServer(prepare_secure_home(home))
    except OSError as e:
        # One kind of error for the callers to print as one line: OSError's text alone
        # would not say which directory.
        raise KeyFileError(f"cannot create the keys in {home}: {e.strerror or e}") from None


__all__ = [
    "ALLOW_LIST_VERSION", "AllowList", "CurveServer", "KeyGrants", "ROLES", "SECURE_ENV",
    "SecureHome", "ZapHandler",
    "authorize", "authorized_path", "curve_server_for", "load_authorized",
    "prepare_secure_home", "revoke", "save_authorized", "secure_requested",
]
