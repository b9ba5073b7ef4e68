"""The Orchestrator wire protocol, version 1: frames, commands, encode and decode.

This module is the one place that knows how messages look on the wire. It holds no
sockets. Everything else (the broker, the agent SDK, the client, tests) builds the
dataclasses below and calls :func:`encode` / :func:`decode`.

Every message is a ZeroMQ multipart message::

    frame 0: b"ORCH1"            signature and protocol version
    frame 1: one byte            the command (:class:`Command`)
    frame 2: msgpack             the header (layout per command, see each class)
    frame 3..: opaque bytes      large payloads ("blobs"), referenced from the header

A ROUTER socket adds the peer identity in front of frame 0 on receive and strips it on
send; :func:`encode` and :func:`decode` never see it.

Batching: the hot commands (SUBMIT, TASK, RESULT, ACCEPTED, ACK, DIRECT) carry a *list* of
items, so that one ZeroMQ message moves many tasks. Receiving a frame costs a few
microseconds in pyzmq, unpacking a msgpack item a fraction of one, so payloads of at
most :data:`INLINE_PAYLOAD_MAX` bytes travel inline in the header as msgpack ``bin``
values, and larger ones as their own frames (``payload`` is then the integer index of
the frame, counted from frame 3). Either way the broker never decodes a payload: it
moves the bytes object (or the ``zmq.Frame``) from the incoming item to the outgoing one.

``docs/protocol.md`` documents the same layout for people writing other clients.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple, Union

import msgpack

from broker.errors import DecodeError

#: Frame 0 of every message. The digit is the protocol version; a peer speaking
#: another version gets ERROR ``bad_version``.
SIGNATURE: Final = b"ORCH1"
PROTOCOL_VERSION: Final = 1

#: Largest frame any socket accepts (ZMQ_MAXMSGSIZE is per frame). A bigger frame makes
#: libzmq drop the connection, so senders check against it first (:class:`TooLarge`).
MAX_FRAME_BYTES: Final = 64 * 1024 * 1024

#: Payloads up to this size ride inside the header; larger ones get a frame of their own.
INLINE_PAYLOAD_MAX: Final = 16 * 1024

#: Most items a sender puts in one batch message. Bigger batches cost less per item but
#: make the processes work in turns instead of in a pipeline: with 128, a broker can
#: dispatch the first chunk of a burst while the client still encodes the next.
MAX_BATCH_ITEMS: Final = 128


def chunks(items: list[Any], size: int = MAX_BATCH_ITEMS) -> list[list[Any]]:
    """``items`` cut into lists of at most ``size`` (one message each)."""
    if len(items) <= size:
        return [items]
    return [items[i:i + size] for i in range(0, len(items), size)]

#: The payload type as the broker holds it: bytes, or a zmq.Frame for large blobs.
Payload = Any


class Command(enum.IntEnum):
    """Frame 1 of every message."""

    # agent -> broker
    READY = 0x01
    HEARTBEAT = 0x02
    RESULT = 0x03
    PROGRESS = 0x04
    DIRECT = 0x05
    DISCONNECT = 0x06
    # broker -> agent
    TASK = 0x10
    CANCEL = 0x11
    ACK = 0x12
    WELCOME = 0x13
    # client -> broker
    SUBMIT = 0x20
    FETCH = 0x21
    STATUS = 0x22
    TASKS = 0x23
    # broker -> client
    ACCEPTED = 0x30
    ERROR = 0x7F


#: Command bytes as single-byte ``bytes`` objects, built once.
COMMAND_FRAMES: Final[dict[Command, bytes]] = {c: bytes((c,)) for c in Command}


class ErrorCode(str, enum.Enum):
    """Stable error codes carried by ERROR messages and failed results."""

    BAD_FRAME = "bad_frame"
    BAD_VERSION = "bad_version"
    UNKNOWN_COMMAND = "unknown_command"
    TOO_LARGE = "too_large"
    NO_AGENT = "no_agent"
    QUEUE_FULL = "queue_full"
    NOT_REGISTERED = "not_registered"
    NOT_FOUND = "not_found"
    UNAUTHORIZED = "unauthorized"
    TIMEOUT = "timeout"
    SHUTTING_DOWN = "shutting_down"
    AGENT_ERROR = "agent_error"
    AGENT_LOST = "agent_lost"
    CANCELLED = "cancelled"
    #: a direct message the receiver (or the broker, on its behalf) could not queue
    MAILBOX_FULL = "mailbox_full"


class TaskStatus(str, enum.Enum):
    """Terminal states of a task as a client sees them."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"
    REJECTED = "rejected"


# --------------------------------------------------------------------------- messages


@dataclass(frozen=True, slots=True)
class Ready:
    """Agent registration (agent -> broker).

    Header: map ``{"id", "name", "caps", "max", "v", "running"}``. ``running`` lists the
    task ids the agent is still executing (after a reconnect), so that the broker counts
    them against its credit.
    """

    agent_id: str
    name: str
    capabilities: tuple[str, ...]
    max_concurrent: int
    version: int = PROTOCOL_VERSION
    running: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Welcome:
    """Broker -> agent, in answer to READY: registration done, and the broker's settings.

    Header: map ``{"ivl", "live", "endpoints", "boot"}``: heartbeat interval (s) and
    liveness that the agent should use too, the other endpoints (bus, state) by name,
    and the broker's boot id.
    """

    heartbeat_interval_s: float
    heartbeat_liveness: int
    endpoints: dict[str, str] = field(default_factory=dict)
    boot: str = ""


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Liveness signal, both ways. Header: map, empty from agents.

    A client pings with ``{"role": "client"}``; the broker answers every client ping
    with ``{"boot": id}``, a random id per broker start, so that a client notices a
    restart and sends again what the old broker may not have kept.

    An agent adds ``{"stats": {name: int}}`` (its messaging counters: bus messages lost,
    mailbox overflows, ...) at most once per interval when they changed; the broker
    shows them per agent in its status.
    """

    role: str | None = None
    boot: str | None = None
    stats: dict[str, int] | None = None


@dataclass(frozen=True, slots=True)
class Progress:
    """Agent -> broker: signs of life for tasks that did not finish at once.

    Header: map ``{"started": [ids], "running": [ids]}``: tasks that just started
    running, and (every heartbeat interval) all tasks still running, which renews their
    leases. A dispatched task with no sign of life for a lease period was lost on the way
    and is dispatched again.
    """

    started: list[str] = field(default_factory=list)
    running: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class TaskQuery:
    """Client -> broker (command TASKS): list finished tasks, newest first, or (with
    ``ids``) describe these tasks, open or finished, with their subtasks.

    Header: map ``{"req", "status": [str] or nil, "limit", "ids": [str] or nil}``;
    ``status`` filters, e.g. ``["failed", "timed_out"]`` for dead letters.
    """

    req: int
    statuses: list[str] | None = None
    limit: int = 100
    task_ids: list[str] | None = None


@dataclass(frozen=True, slots=True)
class TaskList:
    """Broker -> client (command TASKS). Header: map ``{"req", "tasks": [map]}``."""

    req: int
    tasks: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Disconnect:
    """Graceful goodbye, both ways; from the broker with reason ``not_registered`` it asks
    the agent to send READY again. Header: map ``{"reason"}``."""

    reason: str = ""


class TaskSpec(NamedTuple):
    """One task as a client submits it.

    Wire item (msgpack array, in field order):
    ``[id, payload, caps, agent, priority, timeout_s, max_retries, parent_id]``.
    """

    id: str
    payload: Payload
    capabilities: tuple[str, ...] = ()
    agent: str | None = None
    priority: int = 0
    timeout_s: float | None = None
    max_retries: int | None = None
    parent_id: str | None = None


@dataclass(frozen=True, slots=True)
class Submit:
    """Client -> broker: a batch of tasks. Header: array of :class:`TaskSpec` items."""

    tasks: list[TaskSpec]


class Assignment(NamedTuple):
    """One task handed to an agent.

    Wire item: ``[id, payload, attempt, timeout_s, caps, parent_id]``.
    """

    id: str
    payload: Payload
    attempt: int
    timeout_s: float
    capabilities: tuple[str, ...]
    parent_id: str | None = None


@dataclass(frozen=True, slots=True)
class Dispatch:
    """Broker -> agent (command TASK): a batch of assignments. Header: array of items."""

    tasks: list[Assignment]


class ResultItem(NamedTuple):
    """One task outcome, agent -> broker and broker -> client.

    Wire item: ``[task_id, status, payload, error_code, error_message, agent, attempts,
    queued_ms, run_ms, retryable]``. Agents leave ``agent``, ``attempts`` and
    ``queued_ms`` nil; the broker fills them in for clients.
    """

    task_id: str
    status: str
    payload: Payload = b""
    error_code: str | None = None
    error_message: str | None = None
    agent: str | None = None
    attempts: int = 0
    queued_ms: float | None = None
    run_ms: float | None = None
    #: for a failure: may the broker retry it? nil means "as the error code implies"
    retryable: bool | None = None


@dataclass(frozen=True, slots=True)
class Results:
    """Command RESULT: a batch of :class:`ResultItem`. Header: array of items."""

    results: list[ResultItem]


@dataclass(frozen=True, slots=True)
class Accepted:
    """Broker -> client: these submitted task ids are accepted. Header: list of ids."""

    task_ids: list[str]


@dataclass(frozen=True, slots=True)
class Ack:
    """Broker -> agent: results for these task ids are stored; forget them.
    Header: list of ids."""

    task_ids: list[str]


@dataclass(frozen=True, slots=True)
class Cancel:
    """Client -> broker and broker -> agent: cancel these tasks. Header: map ``{"ids"}``."""

    task_ids: list[str]


@dataclass(frozen=True, slots=True)
class Fetch:
    """Client -> broker: send me the results of these ids, now or (``wait``) when done.

    Header: map ``{"req", "ids", "wait"}``. Known ids answer with RESULT, unknown ones
    with ERROR ``not_found`` carrying ``req`` and the ids.
    """

    req: int
    task_ids: list[str]
    wait: bool = False


@dataclass(frozen=True, slots=True)
class StatusRequest:
    """Client -> broker: ask for the broker's status.

    Header: map ``{"req", "until", "timeout_s"}``. With ``until`` (``{"agents": n,
    "capability": c, "name": x}``) the broker answers once that many live agents match,
    or when ``timeout_s`` passes (the reply then says ``"met": false``).
    """

    req: int
    until: dict[str, Any] | None = None
    timeout_s: float = 0.0


@dataclass(frozen=True, slots=True)
class StatusReply:
    """Broker -> client (command STATUS). Header: map ``{"req", "status"}``."""

    req: int
    status: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Error:
    """ERROR: something was refused. Header: map ``{"code", "message", "req", "ids"}``."""

    code: str
    message: str
    req: int | None = None
    task_ids: list[str] = field(default_factory=list)


#: DirectItem flags: to every live instance of the agent name; a request (the sender
#: awaits a reply); no acknowledgement wanted (only errors).
DIRECT_BROADCAST: Final = 1
DIRECT_ASK: Final = 2
DIRECT_NO_ACK: Final = 4


class DirectItem(NamedTuple):
    """One direct message from a peer to another, through the broker.

    Wire item (msgpack array, in field order):
    ``[to, id, payload, re, flags, err, from]``:

    - ``to``: str (or bin): an agent id, an agent name (one live instance, round-robin;
      all of them with DIRECT_BROADCAST) or a client's routing id;
    - ``id``: int, chosen by the sender, unique among its messages in flight;
    - ``payload``: opaque bytes (the SDK puts msgpack there), inline or a blob frame
      index as in SUBMIT; the broker moves it untouched;
    - ``re``: int or nil: the ``id`` of the request this item answers;
    - ``flags``: int, DIRECT_BROADCAST | DIRECT_ASK | DIRECT_NO_ACK (requests and
      replies need no acknowledgement: the reply is one);
    - ``err``: nil, or ``[code, message]`` on a reply that is an error (``mailbox_full``,
      ``agent_error``) instead of data;
    - ``from``: nil from senders; the broker sets the sender's routing id (str, or bin
      when it is not UTF-8), where a reply goes.
    """

    to: str | bytes | None
    msg_id: int
    payload: Payload = b""
    reply_to: int | None = None
    flags: int = 0
    error: tuple[str, str] | None = None
    sender: str | bytes | None = None


@dataclass(frozen=True, slots=True)
class Direct:
    """Command DIRECT, both ways: a batch of :class:`DirectItem`. Header: array of items.

    A sender's items of one loop iteration go in one message, and the broker forwards
    them grouped per receiver, in order: as with tasks, a burst costs one message per
    hop, not one per item.
    """

    items: list[DirectItem]


@dataclass(frozen=True, slots=True)
class DirectVerdict:
    """Broker -> sender (command DIRECT): what became of the direct messages it sent
    during one loop pass.

    Header: a map (items come as an array) ``{"acks": [id], "errs": [[id, code,
    message]]}``: ``acks`` were handed to their receivers' connections (items flagged
    DIRECT_NO_ACK are not listed); ``errs`` were not delivered, e.g. ``no_agent`` (no
    such agent, or it is dead) or ``mailbox_full`` (the receiver does not keep up).
    """

    acks: list[int] = field(default_factory=list)
    errors: list[tuple[int, str, str]] = field(default_factory=list)


Message = Union[
    Ready, Welcome, Heartbeat, Progress, TaskQuery, TaskList, Disconnect, Submit, Dispatch, Results, Accepted, Ack, Cancel,
    Fetch, StatusRequest, StatusReply, Error, Direct, DirectVerdict,
]

# ------------------------------------------------------------------------- encoding

_packb = msgpack.Packer(use_bin_type=True).pack
_EMPTY_MAP: Final = _packb({})


def packb(obj: Any) -> bytes:
    """msgpack-encode ``obj`` the way every frame of this protocol is encoded."""
    return _packb(obj)


def unpackb(data: Any) -> Any:
    """Decode a msgpack value: strings as str, bin as bytes, arrays as lists."""
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def _unpack_header(data: Any) -> Any:
    # Arrays as tuples: batch items then are the NamedTuples' contents already.
    return msgpack.unpackb(data, raw=False, strict_map_key=False, use_list=False)


def _items_with_blobs(items: list[Any], payload_index: int, blobs: list[Any]) -> list[Any]:
    """Items as they go on the wire: small payloads inline, large ones (and zmq.Frames)
    replaced by the index of a frame of their own. Most batches have no large payload and
    go as they are, with no per-item copy."""
    for item in items:
        payload = item[payload_index]
        if type(payload) is not bytes or len(payload) > INLINE_PAYLOAD_MAX:
            break
    else:
        return items
    placed = []
    for item in items:
        payload = item[payload_index]
        if type(payload) is not bytes or len(payload) > INLINE_PAYLOAD_MAX:
            blobs.append(payload)
            item = item._replace(payload=len(blobs) - 1)
        placed.append(item)
    return placed


def _frames(command: Command, header: bytes, blobs: list[Any] | None = None) -> list[Any]:
    frames = [SIGNATURE, COMMAND_FRAMES[command], header]
    if blobs:
        frames.extend(blobs)
    return frames


def encode_results(items: list[ResultItem]) -> list[Any]:
    """``encode(Results(items))``, without building the message first (the broker's
    per-pass output: a dataclass costs an interpreted ``__init__`` even when compiled)."""
    blobs: list[Any] = []
    return _frames(Command.RESULT, _packb(_items_with_blobs(items, 2, blobs)), blobs)


def encode_dispatch(assignments: list[Assignment]) -> list[Any]:
    """``encode(Dispatch(assignments))``, without building the message first."""
    blobs: list[Any] = []
    return _frames(Command.TASK, _packb(_items_with_blobs(assignments, 1, blobs)), blobs)


def encode(msg: Message) -> list[Any]:
    """Encode a message into its frames (without the ROUTER identity frame).

    Raises:
        TypeError: when ``msg`` is not a protocol message.
    """
    blobs: list[Any] = []
    match msg:
        case Results(results):
            return encode_results(results)
        case Dispatch(tasks):
            return encode_dispatch(tasks)
        case Submit(tasks):
            return _frames(Command.SUBMIT, _packb(_items_with_blobs(tasks, 1, blobs)), blobs)
        case Accepted(ids):
            return _frames(Command.ACCEPTED, _packb(ids))
        case Ack(ids):
            return _frames(Command.ACK, _packb(ids))
        case Direct(items):
            return _frames(Command.DIRECT, _packb(_items_with_blobs(items, 2, blobs)), blobs)
        case Heartbeat(role, boot, stats):
            if role is None and boot is None and stats is None:
                return _frames(Command.HEARTBEAT, _EMPTY_MAP)
            header: dict[str, Any] = {}
            if role is not None:
                header["role"] = role
            if boot is not None:
                header["boot"] = boot
            if stats is not None:
                header["stats"] = stats
            return _frames(Command.HEARTBEAT, _packb(header))
        case Progress(started, running):
            return _frames(Command.PROGRESS, _packb({"started": started, "running": running}))
        case TaskQuery(req, statuses, limit, ids):
            return _frames(Command.TASKS, _packb(
                {"req": req, "status": statuses, "limit": limit, "ids": ids}))
        case TaskList(req, tasks):
            return _frames(Command.TASKS, _packb({"req": req, "tasks": tasks}))
        case Ready():
            header = {"id": msg.agent_id, "name": msg.name, "caps": list(msg.capabilities),
                      "max": msg.max_concurrent, "v": msg.version, "running": list(msg.running)}
            return _frames(Command.READY, _packb(header))
        case Welcome(interval, liveness, endpoints, boot):
            return _frames(Command.WELCOME, _packb(
                {"ivl": interval, "live": liveness, "endpoints": endpoints, "boot": boot}))
        case Disconnect(reason):
            return _frames(Command.DISCONNECT, _packb({"reason": reason}))
        case Cancel(ids):
            return _frames(Command.CANCEL, _packb({"ids": ids}))
        case Fetch(req, ids, wait):
            return _frames(Command.FETCH, _packb({"req": req, "ids": ids, "wait": wait}))
        case StatusRequest(req, until, timeout_s):
            return _frames(Command.STATUS,
                           _packb({"req": req, "until": until, "timeout_s": timeout_s}))
        case StatusReply(req, status):
            return _frames(Command.STATUS, _packb({"req": req, "status": status}))
        case Error(code, message, req, ids):
            return _frames(Command.ERROR,
                           _packb({"code": code, "message": message, "req": req, "ids": ids}))
        case DirectVerdict(acks, errors):
            return _frames(Command.DIRECT, _packb({"acks": acks, "errs": errors}))
    raise TypeError(f"not a protocol message: {msg!r}")


# ------------------------------------------------------------------------- decoding


def _blob(ref: Any, blobs: list[Any]) -> Payload:
    if type(ref) is int and 0 <= ref < len(blobs):
        return blobs[ref]
    raise ValueError(f"payload must be bin or a frame index, got {type(ref).__name__}")


def _str(value: Any, what: str) -> str:
    if type(value) is not str:
        raise ValueError(f"{what} must be a string")
    return value


def _opt_str(value: Any, what: str) -> str | None:
    if value is not None and type(value) is not str:
        raise ValueError(f"{what} must be a string or nil")
    return value


def _opt_num(value: Any, what: str) -> float | None:
    if value is not None and (type(value) not in (int, float) or value != value):
        raise ValueError(f"{what} must be a number or nil")
    return value


def _str_list(value: Any, what: str) -> tuple[str, ...]:
    if type(value) not in (tuple, list) or any(type(v) is not str for v in value):
        raise ValueError(f"{what} must be an array of strings")
    return tuple(value)


def _map(header: Any) -> dict[Any, Any]:
    if type(header) is not dict:
        raise ValueError("header must be a map")
    return header


def _array(header: Any) -> tuple[Any, ...]:
    if type(header) is not tuple:
        raise ValueError("header must be an array")
    return header


_new_tuple = tuple.__new__


def _decode_submit(header: Any, blobs: list[Any]) -> Submit:
    tasks: list[TaskSpec] = []
    append = tasks.append
    for item in _array(header):
        if type(item) is not tuple or len(item) != 8:
            raise ValueError("a SUBMIT item must be an array of 8")
        tid, ref, caps, agent, priority, timeout_s, retries, parent = item
        if type(tid) is not str or type(caps) is not tuple or type(priority) is not int:
            raise ValueError("task id must be a string, caps an array, priority an integer")
        for cap in caps:
            if type(cap) is not str:
                raise ValueError("capabilities must be strings")
        if agent is not None and type(agent) is not str:
            raise ValueError("agent must be a string or nil")
        if timeout_s is not None and (type(timeout_s) not in (int, float) or not timeout_s > 0):
            raise ValueError("timeout_s must be a positive number or nil")
        if retries is not None and (type(retries) is not int or retries < 0):
            raise ValueError("max_retries must be a non-negative integer or nil")
        if parent is not None and type(parent) is not str:
            raise ValueError("parent_id must be a string or nil")
        if type(ref) is not bytes:
            item = (tid, _blob(ref, blobs), caps, agent, priority, timeout_s, retries, parent)
        append(_new_tuple(TaskSpec, item))
    return Submit(tasks)


def _decode_results(header: Any, blobs: list[Any]) -> Results:
    results: list[ResultItem] = []
    append = results.append
    for item in _array(header):
        if type(item) is not tuple or len(item) != 10:
            raise ValueError("a RESULT item must be an array of 10")
        tid, status, ref, code, message, agent, attempts, queued_ms, run_ms, retryable = item
        if type(tid) is not str or type(status) is not str:
            raise ValueError("task id and status must be strings")
        if code is not None and (type(code) is not str or type(message) is not str):
            raise ValueError("error code and message must be strings")
        if type(ref) is not bytes:
            item = (tid, status, _blob(ref, blobs), code, message, agent, attempts,
                    queued_ms, run_ms, retryable)
        append(_new_tuple(ResultItem, item))
    return Results(results)


def _decode_dispatch(header: Any, blobs: list[Any]) -> Dispatch:
    tasks = []
    for item in _array(header):
        if type(item) is not tuple or len(item) != 6:
            raise ValueError("a TASK item must be an array of 6")
        tid, ref, attempt, timeout_s, caps, parent = item
        if (type(tid) is not str or type(attempt) is not int or type(caps) is not tuple
                or type(timeout_s) not in (int, float)):
            raise ValueError("a TASK item has a wrong type")
        if type(ref) is not bytes:
            item = (tid, _blob(ref, blobs), attempt, timeout_s, caps, parent)
        tasks.append(_new_tuple(Assignment, item))
    return Dispatch(tasks)


def _decode_ready(header: Any) -> Ready:
    h = _map(header)
    max_concurrent = h.get("max")
    if type(max_concurrent) is not int or max_concurrent < 1:
        raise ValueError("max_concurrent must be a positive integer")
    version = h.get("v")
    if version != PROTOCOL_VERSION:
        raise DecodeError(f"protocol version {version!r} is not {PROTOCOL_VERSION}",
                          code=ErrorCode.BAD_VERSION)
    return Ready(_str(h.get("id"), "agent id"), _str(h.get("name"), "agent name"),
                 _str_list(h.get("caps"), "caps"), max_concurrent, version,
                 _str_list(h.get("running", []), "running"))


def _id_list(value: Any) -> list[str]:
    return list(_str_list(value, "ids"))


def _plain(value: Any) -> Any:
    """Header arrays arrive as tuples; documents handed to users get lists."""
    if type(value) is tuple:
        return [_plain(v) for v in value]
    if type(value) is dict:
        return {k: _plain(v) for k, v in value.items()}
    return value


def decode(frames: list[Any]) -> Message:
    """Decode frames (identity already removed) into a message.

    Raises:
        DecodeError: with a stable ``code`` (``bad_frame``, ``bad_version``,
            ``unknown_command``) for anything that is not a valid message.
    """
    if len(frames) < 3:
        raise DecodeError(f"a message has at least 3 frames, got {len(frames)}")
    # The batch commands (nearly every message) skip the Command enum and the match:
    # a dict lookup on the command frame's bytes costs a fraction of both.
    hot = _HOT_DECODERS.get(frames[1]) if type(frames[1]) is bytes else None
    if hot is not None and frames[0] == SIGNATURE:
        command, batch_decoder = hot
    else:
        command, batch_decoder = _command(frames), None
    try:
        header = _unpack_header(frames[2])
        if batch_decoder is not None:
            return batch_decoder(header, frames[3:])
        return _decode_header(command, header, frames[3:])
    except DecodeError:
        raise
    except Exception as e:  # noqa: BLE001 - any codec failure is the peer's bad frame
        raise DecodeError(f"bad {command.name} header: {e}") from e


def _command(frames: list[Any]) -> Command:
    """The message's command, from its signature and command frames; each fault raises
    with its stable error code."""
    signature = bytes(frames[0])
    if signature != SIGNATURE:
        if signature.startswith(b"ORCH"):
            raise DecodeError(f"protocol {signature!r} is not {SIGNATURE!r}",
                              code=ErrorCode.BAD_VERSION)
        raise DecodeError("frame 0 is not the ORCH1 signature")
    command_frame = bytes(frames[1])
    if len(command_frame) != 1:
        raise DecodeError("frame 1 must be a single command byte")
    try:
        return Command(command_frame[0])
    except ValueError:
        raise DecodeError(f"unknown command 0x{command_frame[0]:02x}",
                          code=ErrorCode.UNKNOWN_COMMAND) from None


#: The commands that carry batches and their decoders, by command frame.
_HOT_DECODERS: Final[dict[bytes, tuple[Command, Callable[[Any, list[Any]], Message]]]] = {
    COMMAND_FRAMES[Command.SUBMIT]: (Command.SUBMIT, _decode_submit),
    COMMAND_FRAMES[Command.RESULT]: (Command.RESULT, _decode_results),
    COMMAND_FRAMES[Command.TASK]: (Command.TASK, _decode_dispatch),
}


def _decode_header(command: Command, header: Any, blobs: list[Any]) -> Message:
    match command:
        case Command.SUBMIT:
            return _decode_submit(header, blobs)
        case Command.RESULT:
            return _decode_results(header, blobs)
        case Command.TASK:
            return _decode_dispatch(header, blobs)
        case Command.ACCEPTED:
            return Accepted(_id_list(header))
        case Command.ACK:
            return Ack(_id_list(header))
        case Command.DIRECT:
            return _decode_direct(header, blobs)
        case Command.HEARTBEAT:
            h = _map(header)
            return Heartbeat(_opt_str(h.get("role"), "role"), _opt_str(h.get("boot"), "boot"),
                             _stats(h.get("stats")))
        case Command.PROGRESS:
            h = _map(header)
            return Progress(_id_list(h.get("started", ())), _id_list(h.get("running", ())))
        case Command.TASKS:
            h = _map(header)
            req = h.get("req")
            if type(req) is not int:
                raise ValueError("req must be an integer")
            if "tasks" in h:
                return TaskList(req, _plain(h["tasks"]))
            statuses = h.get("status")
            limit = h.get("limit", 100)
            if type(limit) is not int or limit < 0:
                raise ValueError("limit must be a non-negative integer")
            ids = h.get("ids")
            return TaskQuery(req, None if statuses is None else _id_list(statuses), limit,
                             None if ids is None else _id_list(ids))
        case Command.READY:
            return _decode_ready(header)
        case Command.WELCOME:
            h = _map(header)
            return Welcome(float(h["ivl"]), int(h["live"]), dict(h.get("endpoints") or {}),
                           str(h.get("boot", "")))
        case Command.DISCONNECT:
            return Disconnect(str(_map(header).get("reason", "")))
        case Command.CANCEL:
            return Cancel(_id_list(_map(header).get("ids")))
        case Command.FETCH:
            h = _map(header)
            req = h.get("req")
            if type(req) is not int:
                raise ValueError("req must be an integer")
            return Fetch(req, _id_list(h.get("ids")), bool(h.get("wait", False)))
        case Command.STATUS:
            h = _map(header)
            req = h.get("req")
            if type(req) is not int:
                raise ValueError("req must be an integer")
            if "status" in h:
                return StatusReply(req, _plain(_map(h["status"])))
            until = h.get("until")
            if until is not None:
                until = _plain(_map(until))
            return StatusRequest(req, until, float(_opt_num(h.get("timeout_s"), "timeout_s") or 0.0))
        case Command.ERROR:
            h = _map(header)
            return Error(str(h.get("code", "")), str(h.get("message", "")), h.get("req"),
                         list(h.get("ids") or []))
    raise DecodeError(f"command {command.name} is not accepted here",
                      code=ErrorCode.UNKNOWN_COMMAND)


# =========================================================================================
# Agent messaging: DIRECT headers and the pub/sub bus frames
#
# DIRECT (0x05) moves messages from one peer to another through the broker's ROUTER
# (:class:`DirectItem`, :class:`Direct` and :class:`DirectVerdict` above; their decoder is
# below). The bus does not go through the broker's loop at all: an XSUB/XPUB forwarder
# (``broker/bus.py``) moves frames between publishers and subscribers, and ZeroMQ matches
# subscriptions as byte prefixes of frame 0. A bus message is two frames:
#
#     frame 0: topic, UTF-8
#     frame 1: msgpack map {"from": publisher id, "seq": int, "data": message}
#
# ``seq`` counts a publisher's messages per topic from 1; a subscriber that sees it jump
# counts the missing ones as dropped (a queue on the way was full). A probe,
# ``{"from": id, "probe": int}`` and no ``seq``, is what a subscriber publishes on a topic
# it just subscribed to: receiving its own probe proves that the subscription has reached
# the forwarder. SDK subscribers swallow probes.
# =========================================================================================

#: Topics the broker publishes on: an agent registered, an agent left (payload
#: ``{"id", "name", "capabilities"}``, plus ``"reason"`` for left), and a task changed
#: state (topic ``tasks.<task id>``, payload ``{"task_id", "state", "attempt", "agent",
#: "at"}``, ``at`` in wall-clock seconds).
BUS_AGENT_JOINED: Final = "agents.joined"
BUS_AGENT_LEFT: Final = "agents.left"
BUS_TASKS_PREFIX: Final = "tasks."
#: The ``from`` of events the broker publishes.
BUS_BROKER_SENDER: Final = "broker"


class BusEnvelope(NamedTuple):
    """One decoded bus message. ``probe`` is set (and ``seq`` 0) for probes."""

    topic: str
    sender: str
    seq: int
    data: Any
    probe: int | None = None


def encode_bus(topic: str, sender: str, seq: int, data: Any) -> list[bytes]:
    """The two frames of a bus message.

    Raises:
        TypeError: ``data`` is not msgpack-encodable.
    """
    return [topic.encode(), _packb({"from": sender, "seq": seq, "data": data})]


def encode_bus_probe(topic: str, sender: str, token: int) -> list[bytes]:
    """The two frames of a subscription probe (see the section comment)."""
    return [topic.encode(), _packb({"from": sender, "probe": token})]


def decode_bus(frames: list[Any]) -> BusEnvelope:
    """Decode the frames of a bus message.

    Raises:
        DecodeError: not two frames, a topic that is not UTF-8, or a bad envelope.
    """
    if len(frames) != 2:
        raise DecodeError(f"a bus message has 2 frames, got {len(frames)}")
    try:
        topic, body = frames
        topic = topic.decode() if type(topic) is bytes else bytes(topic).decode()
        envelope = unpackb(body)
        sender = envelope["from"]
        seq = envelope.get("seq")
        if type(sender) is str and type(seq) is int:
            return _new_tuple(BusEnvelope, (topic, sender, seq, envelope.get("data"), None))
        probe = envelope.get("probe")
        if type(sender) is str and type(probe) is int:
            return BusEnvelope(topic, sender, 0, None, probe)
        raise ValueError("the envelope needs a string 'from' and an integer 'seq' or 'probe'")
    except Exception as e:  # noqa: BLE001 - any codec failure is the publisher's bad frame
        raise DecodeError(f"bad bus message: {e}") from e


def _decode_direct(header: Any, blobs: list[Any]) -> Direct | DirectVerdict:
    if type(header) is dict:
        acks = header.get("acks") or ()
        if type(acks) is not tuple or any(type(i) is not int for i in acks):
            raise ValueError("acks must be an array of integers")
        errors = []
        for error in header.get("errs") or ():
            if (type(error) is not tuple or len(error) != 3 or type(error[0]) is not int
                    or type(error[1]) is not str or type(error[2]) is not str):
                raise ValueError("an error must be [id, code, message]")
            errors.append(error)
        return DirectVerdict(list(acks), errors)
    items: list[Any] = []
    append = items.append
    for item in _array(header):
        if type(item) is not tuple or len(item) != 7:
            raise ValueError("a DIRECT item must be an array of 7")
        to, msg_id, ref, reply_to, flags, error, sender = item
        if type(msg_id) is not int or type(flags) is not int:
            raise ValueError("id and flags must be integers")
        if (to is not None and type(to) is not str and type(to) is not bytes) or \
                (sender is not None and type(sender) is not str and type(sender) is not bytes):
            raise ValueError("to and from must be strings, bin or nil")
        if reply_to is not None and type(reply_to) is not int:
            raise ValueError("re must be an integer or nil")
        if error is not None and (type(error) is not tuple or len(error) != 2
                                  or type(error[0]) is not str or type(error[1]) is not str):
            raise ValueError("err must be [code, message] or nil")
        if type(ref) is not bytes:
            item = (to, msg_id, _blob(ref, blobs), reply_to, flags, error, sender)
        append(_new_tuple(DirectItem, item))
    return Direct(items)


def _stats(value: Any) -> dict[str, int] | None:
    if value is None:
        return None
    if type(value) is not dict or any(type(k) is not str or type(v) is not int
                                      for k, v in value.items()):
        raise ValueError("stats must be a map of string to integer")
    return value


# =========================================================================================
# State service protocol (commands 0x40-0x5F)
#
# The state service (``broker/state/``) has a ROUTER socket of its own and speaks the same
# frame layout: frame 0 ``b"ORCH1"``, frame 1 the command byte, frame 2 a msgpack map. Its
# commands live in their own range and have their own codec (:func:`encode_state`,
# :func:`decode_state`), so that the broker's :func:`decode` answers them with
# ``unknown_command`` and the state service answers task commands the same way.
#
# Every request carries ``req`` (an integer chosen by the client) and every reply echoes
# it. Values are opaque to the service: the client msgpack-encodes a value and sends the
# bytes as msgpack ``bin``; the service stores and returns those bytes untouched.
# =========================================================================================

from broker.errors import StateDecodeError  # noqa: E402 - kept with its section

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


#: A fencing guard on a write: the lock name and the token of the lease the writer holds.
Fence = tuple[str, int]


@dataclass(frozen=True, slots=True)
class StateHello:
    """Client -> state: open (or re-open) this routing id's session.

    Frames: ``[b"ORCH1", 0x40, {"req", "name", "v"}]``. ``name`` labels the session in
    ``locks`` listings. Leases this routing id held before a restart of the service are
    adopted by the new session; the WELCOME lists them.
    """

    req: int
    name: str = ""
    version: int = PROTOCOL_VERSION


@dataclass(frozen=True, slots=True)
class StatePing:
    """Liveness, both ways: the client sends it when idle for an interval, the service
    answers each one. Frames: ``[b"ORCH1", 0x41, {}]``."""


@dataclass(frozen=True, slots=True)
class StateGet:
    """Client -> state: read one key. Frames: ``[b"ORCH1", 0x42, {"req", "key"}]``.
    Answered with VALUE (version 0 and a nil value when the key does not exist)."""

    req: int
    key: str


@dataclass(frozen=True, slots=True)
class StatePut:
    """Client -> state: write one key (SET, or CAS when ``expected`` is given).

    Frames: ``[b"ORCH1", 0x43, {"req", "key", "value", "expected", "ttl_s", "fence"}]``.
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

    Frames: ``[b"ORCH1", 0x44, {"req", "key", "expected", "fence"}]``. Answered with DONE
    (``existed`` says whether there was a key; ``version`` is the deletion's version).
    """

    req: int
    key: str
    expected: int | None = None
    fence: Fence | None = None


@dataclass(frozen=True, slots=True)
class StateList:
    """Client -> state: the keys under ``prefix`` in key order.

    Frames: ``[b"ORCH1", 0x45, {"req", "prefix", "after", "limit", "values"}]``. ``after``
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

    Frames: ``[b"ORCH1", 0x46, {"req", "name", "ttl_s", "wait_s"}]``. ``wait_s`` nil waits
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

    Frames: ``[b"ORCH1", 0x47, {"req", "name", "token", "ttl_s"}]``. Answered with LEASE
    or ERROR ``not_held``.
    """

    req: int
    name: str
    token: int
    ttl_s: float | None = None


@dataclass(frozen=True, slots=True)
class LockRelease:
    """Client -> state: give a lease back. Frames: ``[b"ORCH1", 0x48, {"req", "name",
    "token"}]``. Answered with DONE or ERROR ``not_held``."""

    req: int
    name: str
    token: int


@dataclass(frozen=True, slots=True)
class StateWatch:
    """Client -> state: send me every change of keys under ``prefix``.

    Frames: ``[b"ORCH1", 0x49, {"req", "prefix", "since"}]``. The watch's id is ``req``:
    EVENTS messages carry it. With ``since`` (a version), changes after it are replayed
    first. Answered with DONE whose ``version`` is the service's current version.
    """

    req: int
    prefix: str = ""
    since: int | None = None


@dataclass(frozen=True, slots=True)
class StateUnwatch:
    """Client -> state: stop the watch ``watch`` (the req of its WATCH).
    Frames: ``[b"ORCH1", 0x4A, {"req", "watch"}]``. Answered with DONE."""

    req: int
    watch: int


@dataclass(frozen=True, slots=True)
class LockList:
    """Client -> state: the held locks under ``prefix``. Frames: ``[b"ORCH1", 0x4B,
    {"req", "prefix"}]``. Answered with LOCK_TABLE."""

    req: int
    prefix: str = ""


@dataclass(frozen=True, slots=True)
class StateInfoRequest:
    """Client -> state: the service's counters. Frames: ``[b"ORCH1", 0x4C, {"req"}]``.
    Answered with INFO_REPLY."""

    req: int


@dataclass(frozen=True, slots=True)
class StateWelcome:
    """State -> client, in answer to HELLO.

    Frames: ``[b"ORCH1", 0x50, {"req", "ivl", "live", "version", "instance", "leases"}]``:
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
    """State -> client: the answer to GET. Frames: ``[b"ORCH1", 0x51, {"req", "key",
    "version", "value"}]``."""

    req: int
    key: str
    version: int
    value: bytes | None


@dataclass(frozen=True, slots=True)
class StateDone:
    """State -> client: a write, delete, release, watch or unwatch succeeded.

    Frames: ``[b"ORCH1", 0x52, {"req", "version", "existed"}]``. ``version``: the new
    version of the key (PUT, DELETE) or the service's current version (WATCH); ``existed``:
    whether DELETE found a key.
    """

    req: int
    version: int = 0
    existed: bool = True


@dataclass(frozen=True, slots=True)
class StateItems:
    """State -> client: the answer to LIST. Frames: ``[b"ORCH1", 0x53, {"req", "version",
    "items", "more"}]``; ``items`` are :class:`Entry` arrays in key order, ``more`` says
    the listing stopped at a limit (continue with ``after`` the last key)."""

    req: int
    version: int
    items: list[Entry]
    more: bool = False


@dataclass(frozen=True, slots=True)
class LeaseGranted:
    """State -> client: the lock is yours (ACQUIRE) or still yours (RENEW).

    Frames: ``[b"ORCH1", 0x54, {"req", "name", "token", "ttl_s"}]``. ``token`` is the
    fencing token: it only ever increases per lock name, across restarts of the service.
    """

    req: int
    name: str
    token: int
    ttl_s: float


@dataclass(frozen=True, slots=True)
class StateEvents:
    """State -> client: changes seen by a watch, in version order.

    Frames: ``[b"ORCH1", 0x55, {"watch", "events", "resync"}]``: ``events`` are
    :class:`Entry` arrays (nil value: the key was deleted or expired). ``resync`` marks a
    replay that could not be exact (the ``since`` version was older than the service's
    change log): the events are then the current keys, and deletions in between are lost.
    """

    watch: int
    events: list[Entry]
    resync: bool = False


class LockInfo(NamedTuple):
    """One held lock. Wire item: ``[name, token, holder, session, expires_in_s, waiters]``."""

    name: str
    token: int
    holder: str
    session: str
    expires_in_s: float
    waiters: int


@dataclass(frozen=True, slots=True)
class LockTable:
    """State -> client: the answer to LOCKS. Frames: ``[b"ORCH1", 0x56, {"req", "locks"}]``."""

    req: int
    locks: list[LockInfo]


@dataclass(frozen=True, slots=True)
class StateInfo:
    """State -> client: the answer to INFO. Frames: ``[b"ORCH1", 0x57, {"req", "info"}]``."""

    req: int
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class StateErrorReply:
    """State -> client: a request was refused.

    Frames: ``[b"ORCH1", 0x5F, {"req", "code", "message", "current", "value"}]``. ``req`` is
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

_EMPTY_STATE_PING: Final = [SIGNATURE, STATE_COMMAND_FRAMES[StateCommand.PING], _EMPTY_MAP]


def _state_frames(command: StateCommand, header: dict[str, Any]) -> list[Any]:
    return [SIGNATURE, STATE_COMMAND_FRAMES[command], _packb(header)]


def encode_state(msg: StateMessage) -> list[Any]:
    """Encode a state service message into its frames (without the ROUTER identity).

    Raises:
        TypeError: when ``msg`` is not a state service message.
    """
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
        case LockList(req, prefix):
            return _state_frames(StateCommand.LOCKS, {"req": req, "prefix": prefix})
        case LockTable(req, locks):
            return _state_frames(StateCommand.LOCK_TABLE, {"req": req, "locks": locks})
        case StateInfoRequest(req):
            return _state_frames(StateCommand.INFO, {"req": req})
        case StateInfo(req, info):
            return _state_frames(StateCommand.INFO_REPLY, {"req": req, "info": info})
    raise TypeError(f"not a state service message: {msg!r}")


def _req(h: dict[Any, Any]) -> int:
    req = h.get("req")
    if type(req) is not int:
        raise ValueError("req must be an integer")
    return req


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
    for item in _array(value):
        if type(item) is not tuple or len(item) != 3:
            raise ValueError("an entry must be an array of 3")
        entries.append(Entry(_str(item[0], "key"), _version(item[1], "version"),
                             _opt_value(item[2])))
    return entries


def _decode_state_header(command: StateCommand, h: dict[Any, Any]) -> StateMessage:
    match command:
        case StateCommand.GET:
            return StateGet(_req(h), _key(h.get("key")))
        case StateCommand.PUT:
            return StatePut(_req(h), _key(h.get("key")), _value(h.get("value")),
                            _opt_version(h.get("expected"), "expected"),
                            _opt_positive_s(h.get("ttl_s"), "ttl_s"), _fence(h.get("fence")))
        case StateCommand.PING:
            return StatePing()
        case StateCommand.VALUE:
            return StateValue(_req(h), _str(h.get("key"), "key"), _version(h.get("version"),
                                                                           "version"),
                              _opt_value(h.get("value")))
        case StateCommand.DONE:
            return StateDone(_req(h), _version(h.get("version", 0), "version"),
                             bool(h.get("existed", True)))
        case StateCommand.DELETE:
            return StateDelete(_req(h), _key(h.get("key")),
                               _opt_version(h.get("expected"), "expected"), _fence(h.get("fence")))
        case StateCommand.LIST:
            limit = h.get("limit", MAX_LIST_ITEMS)
            if type(limit) is not int or not 1 <= limit <= MAX_LIST_ITEMS:
                raise ValueError(f"limit must be an integer in 1..{MAX_LIST_ITEMS}")
            after = h.get("after")
            if after is not None and type(after) is not str:
                raise ValueError("after must be a string or nil")
            values = h.get("values", True)
            if type(values) is not bool:
                raise ValueError("values must be a boolean")
            return StateList(_req(h), _prefix(h.get("prefix")), after, limit, values)
        case StateCommand.ACQUIRE:
            wait_s = h.get("wait_s")
            if wait_s is not None and (type(wait_s) not in (int, float)
                                       or not 0 <= wait_s < float("inf")):
                raise ValueError("wait_s must be a non-negative number of seconds or nil")
            return LockAcquire(_req(h), _key(h.get("name"), "lock name"),
                               _positive_s(h.get("ttl_s"), "ttl_s", MAX_LEASE_TTL_S),
                               None if wait_s is None else float(wait_s))
        case StateCommand.RENEW:
            return LockRenew(_req(h), _key(h.get("name"), "lock name"),
                             _version(h.get("token"), "token"),
                             _opt_positive_s(h.get("ttl_s"), "ttl_s", MAX_LEASE_TTL_S))
        case StateCommand.RELEASE:
            return LockRelease(_req(h), _key(h.get("name"), "lock name"),
                               _version(h.get("token"), "token"))
        case StateCommand.LEASE:
            return LeaseGranted(_req(h), _str(h.get("name"), "lock name"),
                                _version(h.get("token"), "token"),
                                _positive_s(h.get("ttl_s"), "ttl_s"))
        case StateCommand.EVENTS:
            watch = h.get("watch")
            if type(watch) is not int:
                raise ValueError("watch must be an integer")
            return StateEvents(watch, _entries(h.get("events")), bool(h.get("resync", False)))
        case StateCommand.ERROR:
            req = h.get("req")
            current = h.get("current")
            return StateErrorReply(str(h.get("code", "")), str(h.get("message", "")),
                                   req if type(req) is int else None,
                                   current if type(current) is int else None,
                                   _opt_value(h.get("value")))
        case StateCommand.HELLO:
            version = h.get("v", PROTOCOL_VERSION)
            if version != PROTOCOL_VERSION:
                raise DecodeError(f"protocol version {version!r} is not {PROTOCOL_VERSION}",
                                  code=ErrorCode.BAD_VERSION)
            name = h.get("name", "")
            return StateHello(_req(h), _str(name, "name"), version)
        case StateCommand.WELCOME:
            leases = []
            for lease in _array(h.get("leases", ())):
                if type(lease) is not tuple or len(lease) != 3:
                    raise ValueError("a lease must be [name, token, ttl_s]")
                leases.append((_str(lease[0], "lock name"), _version(lease[1], "token"),
                               float(lease[2])))
            return StateWelcome(_req(h), _positive_s(h.get("ivl"), "ivl"),
                                _version(h.get("live"), "live"),
                                _version(h.get("version"), "version"),
                                _str(h.get("instance"), "instance"), leases)
        case StateCommand.ITEMS:
            return StateItems(_req(h), _version(h.get("version"), "version"),
                              _entries(h.get("items")), bool(h.get("more", False)))
        case StateCommand.WATCH:
            return StateWatch(_req(h), _prefix(h.get("prefix")),
                              _opt_version(h.get("since"), "since"))
        case StateCommand.UNWATCH:
            watch = h.get("watch")
            if type(watch) is not int:
                raise ValueError("watch must be an integer")
            return StateUnwatch(_req(h), watch)
        case StateCommand.LOCKS:
            return LockList(_req(h), _prefix(h.get("prefix")))
        case StateCommand.LOCK_TABLE:
            locks = []
            for item in _array(h.get("locks")):
                if type(item) is not tuple or len(item) != 6:
                    raise ValueError("a lock must be an array of 6")
                locks.append(LockInfo(_str(item[0], "name"), _version(item[1], "token"),
                                      _str(item[2], "holder"), _str(item[3], "session"),
                                      float(item[4]), _version(item[5], "waiters")))
            return LockTable(_req(h), locks)
        case StateCommand.INFO:
            return StateInfoRequest(_req(h))
        case StateCommand.INFO_REPLY:
            return StateInfo(_req(h), _plain(_map(h.get("info"))))
    raise DecodeError(f"command {command.name} is not accepted here",
                      code=ErrorCode.UNKNOWN_COMMAND)


def decode_state(frames: list[Any]) -> StateMessage:
    """Decode frames (identity already removed) into a state service message.

    Raises:
        StateDecodeError: with a stable ``code``: ``bad_frame`` (not a message, or the
            header is not a msgpack map), ``bad_version``, ``unknown_command``,
            ``bad_request`` (a field of the wrong type or value), ``too_large`` (a value
            or key over its limit); and the request's ``req`` when the header has one, so
            that the refusal reaches its caller.
    """
    if len(frames) < 3:
        raise StateDecodeError(f"a message has at least 3 frames, got {len(frames)}")
    signature = bytes(frames[0])
    if signature != SIGNATURE:
        if signature.startswith(b"ORCH"):
            raise StateDecodeError(f"protocol {signature!r} is not {SIGNATURE!r}",
                                   code=ErrorCode.BAD_VERSION)
        raise StateDecodeError("frame 0 is not the ORCH1 signature")
    command_frame = bytes(frames[1])
    if len(command_frame) != 1:
        raise StateDecodeError("frame 1 must be a single command byte")
    try:
        command = StateCommand(command_frame[0])
    except ValueError:
        raise StateDecodeError(f"unknown command 0x{command_frame[0]:02x} (the state service "
                               "accepts 0x40-0x4C)", code=ErrorCode.UNKNOWN_COMMAND) from None
    try:
        header = _unpack_header(frames[2])
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
