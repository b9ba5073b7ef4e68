"""The state service protocol (commands 0x40-0x5F).

The state service (``broker/state/``) has a ROUTER socket of its own and speaks the same
frame layout: frame 0 ``SIGNATURE`` (``b"ORCH"`` and the protocol version), frame 1 the
command byte, frame 2 a msgpack map. Its commands live in their own range and have their
own codec (:func:`encode_state`, :func:`decode_state`), so that the broker's
:func:`decode` answers them with ``unknown_command`` and the state service answers task
commands the same way.

Every request carries ``req`` (an integer chosen by the client) and every reply echoes
it. Values are opaque to the service: the client msgpack-encodes a value and sends the
bytes as msgpack ``bin``; the service stores and returns those bytes untouched.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple, Union

from wire.codec import (
    EMPTY_MAP, as_array, as_map, as_req, as_str, command_byte, foreign_error_header, pack, plain,
    unpack_header, version_mismatch,
)
from wire.errors import DecodeError, StateDecodeError
from wire.limits import PROTOCOL_VERSION, SIGNATURE
from wire.tasks import ErrorCode

#: Longest key or lock name, in UTF-8 bytes.
MAX_KEY_BYTES: Final = 1024
#: Largest encoded value the service stores; a bigger one is refused with ``too_large``.
MAX_VALUE_BYTES: Final = 1024 * 1024
#: Most items one LIST reply carries (the reply says ``more`` when it stopped early).
MAX_LIST_ITEMS: Final = 10_000
#: Most value bytes one LIST reply carries, far below :data:`MAX_FRAME_BYTES`.
MAX_LIST_BYTES: Final = 16 * 1024 * 1024
#: Longest lease a lock may be taken or renewed for, in seconds.
MAX_LEASE_TTL_S: Final = 3600.0
#: Most events, and about the most value bytes, one EVENTS message carries; a burst of
#: changes goes in several messages (each far below :data:`MAX_FRAME_BYTES`).
MAX_EVENTS_PER_MESSAGE: Final = 512
MAX_EVENTS_BYTES: Final = 16 * 1024 * 1024


class StateCommand(enum.IntEnum):
    """Frame 1 of state service messages."""

    # client -> state service
    HELLO = 0x40
    PING = 0x41          # both ways
    GET = 0x42
    PUT = 0x43
    DELETE = 0x44
    LIST = 0x45
    ACQUIRE = 0x46
    RENEW = 0x47
    RELEASE = 0x48
    WATCH = 0x49
    UNWATCH = 0x4A
    LOCKS = 0x4B
    INFO = 0x4C
    # state service -> client
    WELCOME = 0x50
    VALUE = 0x51
    DONE = 0x52
    ITEMS = 0x53
    LEASE = 0x54
    EVENTS = 0x55
    LOCK_TABLE = 0x56
    INFO_REPLY = 0x57
    ERROR = 0x5F


STATE_COMMAND_FRAMES: Final[dict[StateCommand, bytes]] = {c: bytes((c,)) for c in StateCommand}


class StateErrorCode(str, enum.Enum):
    """Stable error codes of the state service (carried by its ERROR replies)."""

    BAD_FRAME = ErrorCode.BAD_FRAME.value
    BAD_VERSION = ErrorCode.BAD_VERSION.value
    UNKNOWN_COMMAND = ErrorCode.UNKNOWN_COMMAND.value
    TOO_LARGE = ErrorCode.TOO_LARGE.value
    #: a field has the wrong type or an invalid value (empty key, negative ttl, ...)
    BAD_REQUEST = "bad_request"
    #: CAS: the key's version is not the expected one; ``current`` carries the version
    CONFLICT = "conflict"
    #: the sender has no session (never said HELLO, or it expired): say HELLO again
    NO_SESSION = "no_session"
    #: ACQUIRE: the lock stayed held by others for the whole ``wait_s``
    LOCK_TIMEOUT = "lock_timeout"
    #: RENEW / RELEASE: this session does not hold the lock under that token (any more)
    NOT_HELD = "not_held"
    #: a write guarded by a fencing token that is not the lock's current lease
    STALE_TOKEN = "stale_token"
    #: a watcher fell too far behind; the watch is cancelled and should be set up again
    WATCH_OVERFLOW = "watch_overflow"
    #: a secure service's access rules refuse the sender's role this key prefix
    #: (``broker/state/access.py``), or the session belongs to another key
    UNAUTHORIZED = ErrorCode.UNAUTHORIZED.value


#: A fencing guard on a write: the lock name and the token of the lease the writer holds.
Fence = tuple[str, int]


@dataclass(frozen=True, slots=True)
class StateHello:
    """Client -> state: open (or re-open) this routing id's session.

    Frames: ``[SIGNATURE, 0x40, {"req", "name", "v"}]``. ``name`` labels the session in
    ``locks`` listings. Leases this routing id held before a restart of the service are
    adopted by the new session; the WELCOME lists them.
    """

    req: int
    name: str = ""
    version: int = PROTOCOL_VERSION


@dataclass(frozen=True, slots=True)
class StatePing:
    """Liveness, both ways: the client sends it when idle for an interval, the service
    answers each one. Frames: ``[SIGNATURE, 0x41, {}]``."""


@dataclass(frozen=True, slots=True)
class StateGet:
    """Client -> state: read one key. Frames: ``[SIGNATURE, 0x42, {"req", "key"}]``.
    Answered with VALUE (version 0 and a nil value when the key does not exist)."""

    req: int
    key: str


@dataclass(frozen=True, slots=True)
class StatePut:
    """Client -> state: write one key (SET, or CAS when ``expected`` is given).

    Frames: ``[SIGNATURE, 0x43, {"req", "key", "value", "expected", "ttl_s", "fence"}]``.
    ``value`` is msgpack ``bin`` (the encoded value). ``expected``: nil for an
    unconditional write, 0 for "must not exist", else the version the key must have.
    ``ttl_s``: nil, or seconds after which the key is deleted. ``fence``: nil, or
    ``[lock, token]`` that must be the lock's current lease. Answered with DONE carrying
    the new version, or ERROR ``conflict`` / ``stale_token``.
    """

    req: int
    key: str
    value: bytes
    expected: int | None = None
    ttl_s: float | None = None
    fence: Fence | None = None


@dataclass(frozen=True, slots=True)
class StateDelete:
    """Client -> state: delete one key.

    Frames: ``[SIGNATURE, 0x44, {"req", "key", "expected", "fence"}]``. Answered with DONE
    (``existed`` says whether there was a key; ``version`` is the deletion's version).
    """

    req: int
    key: str
    expected: int | None = None
    fence: Fence | None = None


@dataclass(frozen=True, slots=True)
class StateList:
    """Client -> state: the keys under ``prefix`` in key order.

    Frames: ``[SIGNATURE, 0x45, {"req", "prefix", "after", "limit", "values"}]``. ``after``
    continues a listing past that key; without ``values`` the items carry nil values.
    Answered with ITEMS.
    """

    req: int
    prefix: str = ""
    after: str | None = None
    limit: int = MAX_LIST_ITEMS
    values: bool = True


@dataclass(frozen=True, slots=True)
class LockAcquire:
    """Client -> state: take the lock ``name`` for ``ttl_s``, waiting up to ``wait_s``.

    Frames: ``[SIGNATURE, 0x46, {"req", "name", "ttl_s", "wait_s"}]``. ``wait_s`` nil waits
    without limit, 0 tries once. Waiters are served first come, first served. Answered
    with LEASE (when granted) or ERROR ``lock_timeout``.
    """

    req: int
    name: str
    ttl_s: float
    wait_s: float | None = None


@dataclass(frozen=True, slots=True)
class LockRenew:
    """Client -> state: extend a held lease to ``ttl_s`` from now (nil: its own ttl).

    Frames: ``[SIGNATURE, 0x47, {"req", "name", "token", "ttl_s"}]``. Answered with LEASE
    or ERROR ``not_held``.
    """

    req: int
    name: str
    token: int
    ttl_s: float | None = None


@dataclass(frozen=True, slots=True)
class LockRelease:
    """Client -> state: give a lease back. Frames: ``[SIGNATURE, 0x48, {"req", "name",
    "token"}]``. Answered with DONE or ERROR ``not_held``."""

    req: int
    name: str
    token: int


@dataclass(frozen=True, slots=True)
class StateWatch:
    """Client -> state: send me every change of keys under ``prefix``.

    Frames: ``[SIGNATURE, 0x49, {"req", "prefix", "since"}]``. The watch's id is ``req``:
    EVENTS messages carry it. With ``since`` (a version), changes after it are replayed
    first. Answered with DONE whose ``version`` is the service's current version.
    """

    req: int
    prefix: str = ""
    since: int | None = None


@dataclass(frozen=True, slots=True)
class StateUnwatch:
    """Client -> state: stop the watch ``watch`` (the req of its WATCH).
    Frames: ``[SIGNATURE, 0x4A, {"req", "watch"}]``. Answered with DONE."""

    req: int
    watch: int


@dataclass(frozen=True, slots=True)
class LockList:
    """Client -> state: the held locks under ``prefix``. Frames: ``[SIGNATURE, 0x4B,
    {"req", "prefix"}]``. Answered with LOCK_TABLE."""

    req: int
    prefix: str = ""


@dataclass(frozen=True, slots=True)
class StateInfoRequest:
    """Client -> state: the service's counters. Frames: ``[SIGNATURE, 0x4C, {"req"}]``.
    Answered with INFO_REPLY."""

    req: int


@dataclass(frozen=True, slots=True)
class StateWelcome:
    """State -> client, in answer to HELLO.

    Frames: ``[SIGNATURE, 0x50, {"req", "ivl", "live", "version", "instance", "leases"}]``:
    the heartbeat interval (s) and liveness the client should use, the service's current
    version, an id that changes whenever the service restarts, and the leases
    ``[[name, token, ttl_s]]`` the session holds (adopted after a restart).
    """

    req: int
    heartbeat_interval_s: float
    heartbeat_liveness: int
    version: int
    instance: str
    leases: list[tuple[str, int, float]] = field(default_factory=list)


class Entry(NamedTuple):
    """One key as the service returns it. Wire item: ``[key, version, value]``; ``value``
    is the stored msgpack bytes, nil for a deletion (in EVENTS) or when values were not
    asked for (in ITEMS)."""

    key: str
    version: int
    value: bytes | None


@dataclass(frozen=True, slots=True)
class StateValue:
    """State -> client: the answer to GET. Frames: ``[SIGNATURE, 0x51, {"req", "key",
    "version", "value"}]``."""

    req: int
    key: str
    version: int
    value: bytes | None


@dataclass(frozen=True, slots=True)
class StateDone:
    """State -> client: a write, delete, release, watch or unwatch succeeded.

    Frames: ``[SIGNATURE, 0x52, {"req", "version", "existed"}]``. ``version``: the new
    version of the key (PUT, DELETE) or the service's current version (WATCH); ``existed``:
    whether DELETE found a key.
    """

    req: int
    version: int = 0
    existed: bool = True


@dataclass(frozen=True, slots=True)
class StateItems:
    """State -> client: the answer to LIST. Frames: ``[SIGNATURE, 0x53, {"req", "version",
    "items", "more"}]``; ``items`` are :class:`Entry` arrays in key order, ``more`` says
    the listing stopped at a limit (continue with ``after`` the last key)."""

    req: int
    version: int
    items: list[Entry]
    more: bool = False


@dataclass(frozen=True, slots=True)
class LeaseGranted:
    """State -> client: the lock is yours (ACQUIRE) or still yours (RENEW).

    Frames: ``[SIGNATURE, 0x54, {"req", "name", "token", "ttl_s"}]``. ``token`` is the
    fencing token: it only ever increases per lock name, across restarts of the service.
    """

    req: int
    name: str
    token: int
    ttl_s: float


@dataclass(frozen=True, slots=True)
class StateEvents:
    """State -> client: changes seen by a watch, in version order.

    Frames: ``[SIGNATURE, 0x55, {"watch", "events", "resync"}]``: ``events`` are
    :class:`Entry` arrays (nil value: the key was deleted or expired). ``resync`` marks a
    replay that could not be exact (the ``since`` version was older than the service's
    change log): the events are then the current keys, and deletions in between are lost.
    """

    watch: int
    events: list[Entry]
    resync: bool = False


class LockInfo(NamedTuple):
    """One held lock. Wire item: ``[name, token, holder, session, expires_in_s, waiters]``.

    On a secure service, ``token`` is nil and ``session`` "" for a lock held by another
    session, unless the asker is an admin: a token is the holder's business."""

    name: str
    token: int | None
    holder: str
    session: str
    expires_in_s: float
    waiters: int


@dataclass(frozen=True, slots=True)
class LockTable:
    """State -> client: the answer to LOCKS. Frames: ``[SIGNATURE, 0x56, {"req", "locks"}]``."""

    req: int
    locks: list[LockInfo]


@dataclass(frozen=True, slots=True)
class StateInfo:
    """State -> client: the answer to INFO. Frames: ``[SIGNATURE, 0x57, {"req", "info"}]``."""

    req: int
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class StateErrorReply:
    """State -> client: a request was refused.

    Frames: ``[SIGNATURE, 0x5F, {"req", "code", "message", "current", "value"}]``. ``req`` is
    nil when the request could not be read that far. For ``conflict``, ``current`` is the
    key's version (0: it does not exist) and ``value`` its value, so that a retrying
    writer needs no extra read.
    """

    code: str
    message: str
    req: int | None = None
    current: int | None = None
    value: bytes | None = None


StateMessage = Union[
    StateHello, StatePing, StateGet, StatePut, StateDelete, StateList, LockAcquire, LockRenew,
    LockRelease, StateWatch, StateUnwatch, LockList, StateInfoRequest, StateWelcome, StateValue,
    StateDone, StateItems, LeaseGranted, StateEvents, LockTable, StateInfo, StateErrorReply,
]

_EMPTY_STATE_PING: Final = [SIGNATURE, STATE_COMMAND_FRAMES[StateCommand.PING], EMPTY_MAP]


def _state_frames(command: StateCommand, header: dict[str, Any]) -> list[Any]:
    return [SIGNATURE, STATE_COMMAND_FRAMES[command], pack(header)]


def encode_state(msg: StateMessage) -> list[Any]:
    """Encode a state service message into its frames (without the ROUTER identity).

    Raises:
        TypeError: when ``msg`` is not a state service message.
    """
    frames = _encode_key_message(msg)
    if frames is None:
        frames = _encode_lock_message(msg)
    if frames is None:
        raise TypeError(f"not a state service message: {msg!r}")
    return frames


def _encode_key_message(msg: StateMessage) -> list[Any] | None:
    """The key-value messages (and PING); None for any other."""
    match msg:
        case StateGet(req, key):
            return _state_frames(StateCommand.GET, {"req": req, "key": key})
        case StatePut(req, key, value, expected, ttl_s, fence):
            return _state_frames(StateCommand.PUT, {
                "req": req, "key": key, "value": value, "expected": expected, "ttl_s": ttl_s,
                "fence": None if fence is None else list(fence)})
        case StateValue(req, key, version, value):
            return _state_frames(StateCommand.VALUE,
                                 {"req": req, "key": key, "version": version, "value": value})
        case StateDone(req, version, existed):
            return _state_frames(StateCommand.DONE,
                                 {"req": req, "version": version, "existed": existed})
        case StatePing():
            return list(_EMPTY_STATE_PING)
        case StateDelete(req, key, expected, fence):
            return _state_frames(StateCommand.DELETE, {
                "req": req, "key": key, "expected": expected,
                "fence": None if fence is None else list(fence)})
        case StateEvents(watch, events, resync):
            return _state_frames(StateCommand.EVENTS,
                                 {"watch": watch, "events": events, "resync": resync})
        case StateList(req, prefix, after, limit, values):
            return _state_frames(StateCommand.LIST, {"req": req, "prefix": prefix,
                                                     "after": after, "limit": limit,
                                                     "values": values})
        case StateItems(req, version, items, more):
            return _state_frames(StateCommand.ITEMS,
                                 {"req": req, "version": version, "items": items, "more": more})
        case StateWatch(req, prefix, since):
            return _state_frames(StateCommand.WATCH,
                                 {"req": req, "prefix": prefix, "since": since})
        case StateUnwatch(req, watch):
            return _state_frames(StateCommand.UNWATCH, {"req": req, "watch": watch})
    return None


def _encode_lock_message(msg: StateMessage) -> list[Any] | None:
    """The lock, session and info messages, and ERROR; None for any other."""
    match msg:
        case LockAcquire(req, name, ttl_s, wait_s):
            return _state_frames(StateCommand.ACQUIRE,
                                 {"req": req, "name": name, "ttl_s": ttl_s, "wait_s": wait_s})
        case LockRenew(req, name, token, ttl_s):
            return _state_frames(StateCommand.RENEW,
                                 {"req": req, "name": name, "token": token, "ttl_s": ttl_s})
        case LockRelease(req, name, token):
            return _state_frames(StateCommand.RELEASE, {"req": req, "name": name, "token": token})
        case LeaseGranted(req, name, token, ttl_s):
            return _state_frames(StateCommand.LEASE,
                                 {"req": req, "name": name, "token": token, "ttl_s": ttl_s})
        case StateErrorReply(code, message, req, current, value):
            return _state_frames(StateCommand.ERROR, {"req": req, "code": code,
                                                      "message": message, "current": current,
                                                      "value": value})
        case StateHello(req, name, version):
            return _state_frames(StateCommand.HELLO, {"req": req, "name": name, "v": version})
        case StateWelcome(req, interval, liveness, version, instance, leases):
            return _state_frames(StateCommand.WELCOME, {
                "req": req, "ivl": interval, "live": liveness, "version": version,
                "instance": instance, "leases": [list(lease) for lease in leases]})
        case LockList(req, prefix):
            return _state_frames(StateCommand.LOCKS, {"req": req, "prefix": prefix})
        case LockTable(req, locks):
            return _state_frames(StateCommand.LOCK_TABLE, {"req": req, "locks": locks})
        case StateInfoRequest(req):
            return _state_frames(StateCommand.INFO, {"req": req})
        case StateInfo(req, info):
            return _state_frames(StateCommand.INFO_REPLY, {"req": req, "info": info})
    return None


def _key(value: Any, what: str = "key") -> str:
    if type(value) is not str or not value:
        raise ValueError(f"{what} must be a non-empty string")
    if len(value) > MAX_KEY_BYTES // 4 and len(value.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        raise DecodeError(f"{what} is longer than {MAX_KEY_BYTES} bytes", code=ErrorCode.TOO_LARGE)
    return value


def _prefix(value: Any) -> str:
    if value is None:
        return ""
    if type(value) is not str:
        raise ValueError("prefix must be a string")
    if len(value.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        raise DecodeError(f"prefix is longer than {MAX_KEY_BYTES} bytes",
                          code=ErrorCode.TOO_LARGE)
    return value


def _value(value: Any) -> bytes:
    if type(value) is not bytes:
        raise ValueError("value must be msgpack bin (the encoded value)")
    if len(value) > MAX_VALUE_BYTES:
        raise DecodeError(f"value of {len(value)} bytes exceeds the limit of "
                          f"{MAX_VALUE_BYTES} bytes", code=ErrorCode.TOO_LARGE)
    return value


def _opt_value(value: Any) -> bytes | None:
    return None if value is None else _value(value)


def _opt_version(value: Any, what: str) -> int | None:
    if value is not None and (type(value) is not int or value < 0):
        raise ValueError(f"{what} must be a non-negative integer or nil")
    return value


def _version(value: Any, what: str) -> int:
    if type(value) is not int or value < 0:
        raise ValueError(f"{what} must be a non-negative integer")
    return value


def _positive_s(value: Any, what: str, limit: float | None = None) -> float:
    if type(value) not in (int, float) or not 0 < value < float("inf"):
        raise ValueError(f"{what} must be a positive number of seconds")
    if limit is not None and value > limit:
        raise ValueError(f"{what} must be at most {limit:g} s")
    return float(value)


def _opt_positive_s(value: Any, what: str, limit: float | None = None) -> float | None:
    return None if value is None else _positive_s(value, what, limit)


def _fence(value: Any) -> Fence | None:
    if value is None:
        return None
    if (type(value) is not tuple or len(value) != 2 or type(value[0]) is not str
            or type(value[1]) is not int):
        raise ValueError("fence must be [lock name, token] or nil")
    return (_key(value[0], "fence lock name"), value[1])


def _entries(value: Any) -> list[Entry]:
    entries = []
    for item in as_array(value):
        if type(item) is not tuple or len(item) != 3:
            raise ValueError("an entry must be an array of 3")
        entries.append(Entry(as_str(item[0], "key"), _version(item[1], "version"),
                             _opt_value(item[2])))
    return entries


def _decode_state_header(command: StateCommand, h: dict[Any, Any]) -> StateMessage:
    msg = _decode_key_command(command, h)
    if msg is None:
        msg = _decode_lock_command(command, h)
    if msg is None:
        raise DecodeError(f"command {command.name} is not accepted here",
                          code=ErrorCode.UNKNOWN_COMMAND)
    return msg


def _decode_key_command(command: StateCommand, h: dict[Any, Any]) -> StateMessage | None:
    """The key-value commands (and PING); None for any other."""
    match command:
        case StateCommand.GET:
            return StateGet(as_req(h), _key(h.get("key")))
        case StateCommand.PUT:
            return StatePut(as_req(h), _key(h.get("key")), _value(h.get("value")),
                            _opt_version(h.get("expected"), "expected"),
                            _opt_positive_s(h.get("ttl_s"), "ttl_s"), _fence(h.get("fence")))
        case StateCommand.PING:
            return StatePing()
        case StateCommand.VALUE:
            return StateValue(as_req(h), as_str(h.get("key"), "key"),
                              _version(h.get("version"), "version"), _opt_value(h.get("value")))
        case StateCommand.DONE:
            return StateDone(as_req(h), _version(h.get("version", 0), "version"),
                             bool(h.get("existed", True)))
        case StateCommand.DELETE:
            return StateDelete(as_req(h), _key(h.get("key")),
                               _opt_version(h.get("expected"), "expected"), _fence(h.get("fence")))
        case StateCommand.LIST:
            return _decode_list(h)
        case StateCommand.EVENTS:
            return StateEvents(_watch_id(h), _entries(h.get("events")),
                               bool(h.get("resync", False)))
        case StateCommand.ITEMS:
            return StateItems(as_req(h), _version(h.get("version"), "version"),
                              _entries(h.get("items")), bool(h.get("more", False)))
        case StateCommand.WATCH:
            return StateWatch(as_req(h), _prefix(h.get("prefix")),
                              _opt_version(h.get("since"), "since"))
        case StateCommand.UNWATCH:
            return StateUnwatch(as_req(h), _watch_id(h))
    return None


def _decode_lock_command(command: StateCommand, h: dict[Any, Any]) -> StateMessage | None:
    """The lock, session and info commands, and ERROR; None for any other."""
    match command:
        case StateCommand.ACQUIRE:
            return _decode_acquire(h)
        case StateCommand.RENEW:
            return LockRenew(as_req(h), _key(h.get("name"), "lock name"),
                             _version(h.get("token"), "token"),
                             _opt_positive_s(h.get("ttl_s"), "ttl_s", MAX_LEASE_TTL_S))
        case StateCommand.RELEASE:
            return LockRelease(as_req(h), _key(h.get("name"), "lock name"),
                               _version(h.get("token"), "token"))
        case StateCommand.LEASE:
            return LeaseGranted(as_req(h), as_str(h.get("name"), "lock name"),
                                _version(h.get("token"), "token"),
                                _positive_s(h.get("ttl_s"), "ttl_s"))
        case StateCommand.ERROR:
            req = h.get("req")
            current = h.get("current")
            return StateErrorReply(str(h.get("code", "")), str(h.get("message", "")),
                                   req if type(req) is int else None,
                                   current if type(current) is int else None,
                                   _opt_value(h.get("value")))
        case StateCommand.HELLO:
            return _decode_hello(h)
        case StateCommand.WELCOME:
            return _decode_welcome(h)
        case StateCommand.LOCKS:
            return LockList(as_req(h), _prefix(h.get("prefix")))
        case StateCommand.LOCK_TABLE:
            return _decode_lock_table(h)
        case StateCommand.INFO:
            return StateInfoRequest(as_req(h))
        case StateCommand.INFO_REPLY:
            return StateInfo(as_req(h), plain(as_map(h.get("info"))))
    return None


def _watch_id(h: dict[Any, Any]) -> int:
    watch = h.get("watch")
    if type(watch) is not int:
        raise ValueError("watch must be an integer")
    return watch


def _decode_list(h: dict[Any, Any]) -> StateList:
    limit = h.get("limit", MAX_LIST_ITEMS)
    if type(limit) is not int or not 1 <= limit <= MAX_LIST_ITEMS:
        raise ValueError(f"limit must be an integer in 1..{MAX_LIST_ITEMS}")
    after = h.get("after")
    if after is not None and type(after) is not str:
        raise ValueError("after must be a string or nil")
    values = h.get("values", True)
    if type(values) is not bool:
        raise ValueError("values must be a boolean")
    return StateList(as_req(h), _prefix(h.get("prefix")), after, limit, values)


def _decode_acquire(h: dict[Any, Any]) -> LockAcquire:
    wait_s = h.get("wait_s")
    if wait_s is not None and (type(wait_s) not in (int, float)
                               or not 0 <= wait_s < float("inf")):
        raise ValueError("wait_s must be a non-negative number of seconds or nil")
    return LockAcquire(as_req(h), _key(h.get("name"), "lock name"),
                       _positive_s(h.get("ttl_s"), "ttl_s", MAX_LEASE_TTL_S),
                       None if wait_s is None else float(wait_s))


def _decode_hello(h: dict[Any, Any]) -> StateHello:
    # Frame 0 has been checked already; "v" is a second check, and a HELLO without one
    # is taken as this version (it was optional).
    version = h.get("v", PROTOCOL_VERSION)
    if version != PROTOCOL_VERSION:
        raise DecodeError(version_mismatch(repr(version)), code=ErrorCode.BAD_VERSION)
    return StateHello(as_req(h), as_str(h.get("name", ""), "name"), version)


def _decode_welcome(h: dict[Any, Any]) -> StateWelcome:
    leases = []
    for lease in as_array(h.get("leases", ())):
        if type(lease) is not tuple or len(lease) != 3:
            raise ValueError("a lease must be [name, token, ttl_s]")
        leases.append((as_str(lease[0], "lock name"), _version(lease[1], "token"),
                       float(lease[2])))
    return StateWelcome(as_req(h), _positive_s(h.get("ivl"), "ivl"),
                        _version(h.get("live"), "live"), _version(h.get("version"), "version"),
                        as_str(h.get("instance"), "instance"), leases)


def _decode_lock_table(h: dict[Any, Any]) -> LockTable:
    locks = []
    for item in as_array(h.get("locks")):
        if type(item) is not tuple or len(item) != 6:
            raise ValueError("a lock must be an array of 6")
        locks.append(LockInfo(as_str(item[0], "name"),
                              None if item[1] is None else _version(item[1], "token"),
                              as_str(item[2], "holder"), as_str(item[3], "session"),
                              float(item[4]), _version(item[5], "waiters")))
    return LockTable(as_req(h), locks)


def decode_state(frames: list[Any]) -> StateMessage:
    """Decode frames (identity already removed) into a state service message.

    An ERROR of another protocol version decodes too (a :class:`StateErrorReply`): that
    is how a client reads the service's ``bad_version`` refusal, whichever is newer.

    Raises:
        StateDecodeError: with a stable ``code``: ``bad_frame`` (not a message, or the
            header is not a msgpack map), ``bad_version``, ``unknown_command``,
            ``bad_request`` (a field of the wrong type or value), ``too_large`` (a value
            or key over its limit); and the request's ``req`` when the header has one, so
            that the refusal reaches its caller.
    """
    try:
        code = command_byte(frames)
    except DecodeError as e:
        if e.code != ErrorCode.BAD_VERSION.value:
            raise StateDecodeError(str(e), code=e.code) from None
        # Another protocol version: its refusal is readable (ERROR never changes).
        header = foreign_error_header(frames, StateCommand.ERROR)
        if header is not None:
            req = header.get("req")
            return StateErrorReply(header["code"], header["message"],
                                   req if type(req) is int else None)
        raise StateDecodeError(str(e), code=e.code) from None
    try:
        command = StateCommand(code)
    except ValueError:
        raise StateDecodeError(f"unknown command 0x{code:02x} (the state service "
                               "accepts 0x40-0x4C)", code=ErrorCode.UNKNOWN_COMMAND) from None
    try:
        header = unpack_header(frames[2])
    except Exception as e:  # noqa: BLE001 - any codec failure is the peer's bad frame
        raise StateDecodeError(f"bad {command.name} header: not msgpack ({e})") from e
    if type(header) is not dict:
        raise StateDecodeError(f"bad {command.name} header: not a map")
    req = header.get("req")
    req = req if type(req) is int else None
    try:
        return _decode_state_header(command, header)
    except DecodeError as e:
        raise StateDecodeError(f"bad {command.name}: {e}", code=e.code, req=req) from e
    except Exception as e:  # noqa: BLE001 - a field of the wrong type or value
        raise StateDecodeError(f"bad {command.name}: {e}", code=StateErrorCode.BAD_REQUEST.value,
                               req=req) from e
