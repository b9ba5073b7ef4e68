"""CURVE on Orchestrator's sockets: the socket options of both sides, and key files.

One place for what the broker (a CURVE server on its ROUTER, the bus XPUB/XSUB and the
state service ROUTER) and the SDK (a CURVE client on every DEALER, SUB and XPUB) set, so
that the two cannot drift apart.

Facts this relies on (libzmq 4.3.5, measured):

- A CURVE server with no ZAP handler accepts **any** client key. So every server socket
  sets a ZAP domain and ``ZAP_ENFORCE_DOMAIN``: with no handler answering, nothing is
  accepted.
- A refused peer gets no socket error: its socket monitor sees
  ``HANDSHAKE_FAILED_AUTH`` (unknown key), ``HANDSHAKE_FAILED_NO_DETAIL`` (a wrong server
  public key: the server cannot decrypt the HELLO; libzmq retries every ~0.1 s) or
  ``HANDSHAKE_FAILED_PROTOCOL`` (plaintext against CURVE, or CURVE against plaintext:
  mechanism mismatch), within milliseconds. After AUTH and PROTOCOL failures libzmq does
  not reconnect that socket: a peer that wants to try again opens a new socket.

Key files are Z85 text (40 characters per key). ``NAME.key`` holds the public key,
``NAME.key_secret`` both keys, in the format of :func:`zmq.auth.create_certificates`
(``public-key = "..."`` / ``secret-key = "..."``), so pyzmq's tools read them too; a file
holding the bare 40-character key is accepted as well. A secret file must be readable by
its owner only (0600).
"""

from __future__ import annotations

import base64
import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import zmq
import zmq.utils.z85

#: The ZAP domain every server socket sets (and enforces).
ZAP_DOMAIN: Final = "orchestrator"
#: Characters of a Z85-encoded CURVE key.
KEY_CHARS: Final = 40
#: The data dir's key directory (0700) and the allow-list in it.
KEYS_DIR: Final = "keys"
AUTHORIZED_FILE: Final = "authorized.json"
#: The broker's key pair in the keys dir, and the local admin key ``start --secure``
#: creates for the CLI and the local agents of the same data dir.
BROKER_KEY_NAME: Final = "broker"
LOCAL_KEY_NAME: Final = "local-admin"
#: The key of the agents a secure ``start`` launches (role ``agent``: an agent process
#: never holds the admin key).
LOCAL_AGENT_KEY_NAME: Final = "local-agents"
#: The key of the data dir's node supervisor (role node), made by a secure start.
LOCAL_NODE_KEY_NAME: Final = "local-node"
PUBLIC_SUFFIX: Final = ".key"
SECRET_SUFFIX: Final = ".key_secret"
#: A remote peer's settings: the broker's public key (text or file), its own secret file.
ENV_SERVER_KEY: Final = "ORCH_CURVE_SERVER_KEY"
ENV_SERVER_KEY_FILE: Final = "ORCH_CURVE_SERVER_KEY_FILE"
ENV_KEY_FILE: Final = "ORCH_CURVE_KEY_FILE"

_Z85 = re.compile(r"^[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}$")
_CERT_LINE = re.compile(r'^\s*(public|secret)-key\s*=\s*"(.{40})"\s*$', re.MULTILINE)


class KeyFileError(ValueError):
    """Raised when a key or key file is malformed, missing or too open; the message is
    one line that says what to do."""


def is_key(text: str) -> bool:
    """Whether ``text`` is a Z85-encoded CURVE key (40 characters of the Z85 alphabet)."""
    return bool(_Z85.match(text))


def parse_key(text: str, what: str = "key") -> str:
    """``text`` stripped, checked to be a Z85 key.

    Raises:
        KeyFileError: it is not 40 Z85 characters.
    """
    key = text.strip()
    if not is_key(key):
        raise KeyFileError(f"{what} is not a CURVE key (40 Z85 characters): {key[:50]!r}")
    return key


def check_private(path: Path, mode: int) -> None:
    """Refuse ``path`` if group or others may use it (key files 0600, directories 0700).

    Raises:
        KeyFileError: naming the chmod to run.
    """
    try:
        current = stat.S_IMODE(path.stat().st_mode)
    except OSError as e:
        raise KeyFileError(f"cannot read {path}: {e.strerror or e}") from None
    if current & 0o077:
        raise KeyFileError(f"{path} is open to other users (mode {current:04o}); run: "
                           f"chmod {mode:o} {path}")


def read_keys(path: Path) -> dict[str, str]:
    """The keys in a key file: ``{"public": ..., "secret": ...}`` (those present).

    Raises:
        KeyFileError: unreadable, or no key in it.
    """
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise KeyFileError(f"cannot read the key file {path}: "
                           f"{getattr(e, 'strerror', None) or e}") from None
    keys = {kind: key for kind, key in _CERT_LINE.findall(text) if is_key(key)}
    if not keys and is_key(text.strip()):
        keys = {"public": text.strip()}
    if not keys:
        raise KeyFileError(f"{path} holds no CURVE key (40 Z85 characters)")
    return keys


def read_public_key(text_or_path: str) -> str:
    """A public key given as the key itself or as a file holding it.

    Raises:
        KeyFileError: neither a key nor a readable key file.
    """
    candidate = text_or_path.strip()
    if is_key(candidate):
        return candidate
    path = Path(candidate)
    try:
        found = "\0" not in candidate and path.is_file()
    except OSError:  # a name too long, a path through a file...
        found = False
    if not found:
        raise KeyFileError(f"{candidate[:60]!r} is neither a CURVE key (40 Z85 "
                           "characters) nor a key file")
    keys = read_keys(path)
    if "public" in keys:
        return keys["public"]
    return zmq.curve_public(keys["secret"].encode()).decode()


def read_secret_file(path: Path) -> tuple[str, str]:
    """(public, secret) from a secret key file, which must be 0600.

    Raises:
        KeyFileError: missing, too open, or without a secret key.
    """
    check_private(path, 0o600)
    keys = read_keys(path)
    if "secret" not in keys:
        raise KeyFileError(f"{path} holds no secret key (a public key file? give the "
                           f"{SECRET_SUFFIX} file)")
    secret = keys["secret"]
    return zmq.curve_public(secret.encode()).decode(), secret


def write_key_pair(directory: Path, name: str) -> tuple[Path, Path]:
    """Create a key pair: ``NAME.key`` (public, 0644) and ``NAME.key_secret`` (0600) in
    ``directory`` (created 0700 when missing).

    Raises:
        KeyFileError: a file of that name exists already (never overwritten).
        OSError: the files cannot be written.
    """
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    public, secret = (key.decode() for key in zmq.curve_keypair())
    public_path = directory / f"{name}{PUBLIC_SUFFIX}"
    secret_path = directory / f"{name}{SECRET_SUFFIX}"
    for path in (public_path, secret_path):
        if path.exists():
            raise KeyFileError(f"{path} exists already; remove it or choose another --name")
    header = f"#   Orchestrator CURVE key {name!r} (ZeroMQ certificate format)\n"
    _write_new(secret_path, f'{header}metadata\ncurve\n    public-key = "{public}"\n'
                            f'    secret-key = "{secret}"\n', 0o600)
    _write_new(public_path, f'{header}metadata\ncurve\n    public-key = "{public}"\n', 0o644)
    return public_path, secret_path


def _write_new(path: Path, text: str, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, mode)  # whatever the umask


@dataclass(frozen=True, slots=True)
class ClientKeys:
    """What a CURVE client needs: the server's public key and its own pair (Z85)."""

    server_key: str
    public_key: str
    secret_key: str


def apply_server(sock: zmq.Socket[Any], secret_key: str) -> None:
    """Make ``sock`` a CURVE server that asks ZAP about every peer, and refuses all while
    no ZAP handler answers (call before ``bind``)."""
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.CURVE_SECRETKEY, secret_key.encode())
    sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN.encode())
    sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)


def apply_client(sock: zmq.Socket[Any], keys: ClientKeys) -> None:
    """Make ``sock`` a CURVE client of the server ``keys.server_key`` (before connect)."""
    sock.setsockopt(zmq.CURVE_SERVERKEY, keys.server_key.encode())
    sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.public_key.encode())
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys.secret_key.encode())


#: Under CURVE, a peer's routing ids and task ids start with its key's scope: the first
#: :data:`SCOPE_KEY_CHARS` characters of its public key's bytes in lowercase base32
#: (``a``-``z``, ``2``-``7``) and :data:`SCOPE_SEPARATOR` (not a base32 character, so a
#: scope is recognised by position). 20 base32 characters are 100 bits: finding another
#: key with the same scope means generating about 2^99 key pairs. Base32, not the Z85 of
#: the key itself: Z85 has ``$ & < > ( ) ! * ?`` and ``-``, so a scoped task id pasted
#: into a shell broke it (or was read as an option), where ``[a-z2-7]`` never does.
SCOPE_KEY_CHARS: Final = 20
SCOPE_SEPARATOR: Final = "~"
_SCOPE_CHARS: Final = SCOPE_KEY_CHARS + 1


def key_scope(public_key: str) -> str:
    """The scope of ``public_key`` (Z85): the prefix of its peers' routing ids and task
    ids on a secure broker.

    Raises:
        ValueError: ``public_key`` is not 40 Z85 characters.
    """
    if len(public_key) != KEY_CHARS:
        raise ValueError(f"a CURVE public key is {KEY_CHARS} Z85 characters, "
                         f"not {len(public_key)}")
    raw = zmq.utils.z85.decode(public_key.encode("ascii"))
    return base64.b32encode(raw).decode("ascii")[:SCOPE_KEY_CHARS].lower() + SCOPE_SEPARATOR


def scope_in(text: str) -> str | None:
    """The scope ``text`` starts with (a task id or routing id), or None."""
    if len(text) > SCOPE_KEY_CHARS and text[SCOPE_KEY_CHARS] == SCOPE_SEPARATOR:
        return text[:_SCOPE_CHARS]
    return None


def in_scope(scope: str, name: str) -> str:
    """``name`` as an id of ``scope``'s own: unchanged when it starts with ``scope``,
    else prefixed with it (another key's ``OTHER~x`` becomes ``SCOPE~OTHER~x``, never
    the other's id). New task ids are made so, and a secure broker reads the ids a
    non-admin names so."""
    return name if name.startswith(scope) else scope + name


def scoped(scope: str, name: str) -> str:
    """``name`` in ``scope``: unchanged when it already carries a scope (an admin naming
    another key's task), else prefixed with ``scope``."""
    if not scope or scope_in(name) is not None:
        return name
    return scope + name


def keys_dir(home: Path) -> Path:
    """The data dir's key directory."""
    return home / KEYS_DIR


def client_keys(home: Path | None = None, url: str = "") -> ClientKeys | None:
    """The CURVE settings of this process's client sockets, or None for plaintext.

    First the environment: :data:`ENV_SERVER_KEY` (or :data:`ENV_SERVER_KEY_FILE`) and
    :data:`ENV_KEY_FILE`, both or neither. Else, when ``home`` is given and ``url`` is
    one of the endpoints its broker announced with a public key (``broker.json``: a
    secure broker of this machine), the data dir's local admin key.

    Raises:
        KeyFileError: a half or wrong setting (one variable without the other, a bad key
            or key file, a secret file open to others).
    """
    server_text = os.environ.get(ENV_SERVER_KEY, "").strip()
    server_file = os.environ.get(ENV_SERVER_KEY_FILE, "").strip()
    key_file = os.environ.get(ENV_KEY_FILE, "").strip()
    if server_text or server_file or key_file:
        if not (server_text or server_file) or not key_file:
            raise KeyFileError(f"set both {ENV_SERVER_KEY} (or {ENV_SERVER_KEY_FILE}) and "
                               f"{ENV_KEY_FILE}, or neither")
        server = (parse_key(server_text, ENV_SERVER_KEY) if server_text
                  else read_public_key(server_file))
        public, secret = read_secret_file(Path(key_file))
        return ClientKeys(server, public, secret)
    if home is None:
        return None
    return local_client_keys(home, url)


def local_client_keys(home: Path, url: str = "") -> ClientKeys | None:
    """The local admin key of the data dir ``home`` with its broker's announced public
    key (None when its broker is not secure, has no local key, or ``url``, when given,
    is none of its endpoints: a plaintext broker elsewhere gets plaintext)."""
    try:
        info = json.loads((home / "broker.json").read_text())
    except (OSError, ValueError, RecursionError):
        # ValueError covers a torn write and text that is not UTF-8; RecursionError, a
        # file nested deeper than json's recursion allows: not the broker's file either.
        return None
    if not isinstance(info, dict):
        return None
    if url and url not in (info.get(name) for name in ("endpoint", "bus_out", "bus_in",
                                                       "events", "state")):
        return None
    server = info.get("curve_public_key")
    secret_path = keys_dir(home) / f"{LOCAL_KEY_NAME}{SECRET_SUFFIX}"
    if not isinstance(server, str) or not is_key(server) or not secret_path.exists():
        return None
    public, secret = read_secret_file(secret_path)
    return ClientKeys(server, public, secret)


__all__ = [
    "AUTHORIZED_FILE", "BROKER_KEY_NAME", "ClientKeys", "ENV_KEY_FILE", "ENV_SERVER_KEY",
    "ENV_SERVER_KEY_FILE", "KEYS_DIR", "KEY_CHARS", "KeyFileError", "LOCAL_AGENT_KEY_NAME", "LOCAL_KEY_NAME",
    "PUBLIC_SUFFIX", "SCOPE_KEY_CHARS", "SCOPE_SEPARATOR", "SECRET_SUFFIX", "ZAP_DOMAIN",
    "apply_client", "apply_server", "check_private", "client_keys", "in_scope", "is_key",
    "key_scope",
    "keys_dir", "local_client_keys", "parse_key", "read_keys", "read_public_key",
    "read_secret_file", "scope_in", "scoped", "write_key_pair",
]
