"""The task protocol (commands 0x01-0x3F): frames, commands, encode and decode.

With :mod:`wire.state` and :mod:`wire.bus`, this package is the one place that knows
how messages look on the wire. It holds no sockets. Everything else (the broker, the agent SDK, the client, tests) builds the
dataclasses below and calls :func:`encode` / :func:`decode`.

Every message is a ZeroMQ multipart message::

    frame 0: SIGNATURE           b"ORCH" and the protocol version (b"ORCH5" today)
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

from wire.codec import (
    EMPTY_MAP, Payload, as_array, as_id_list, as_map, as_opt_num, as_req, as_opt_str, as_str, as_str_list, blob, command_byte, foreign_error_header, items_with_blobs, new_tuple, pack, plain, unpack_header, version_mismatch,
)
from wire.errors import DecodeError
from wire.documents import StatusDocument, TaskDocument
from wire.limits import PROTOCOL_VERSION, SIGNATURE
from wire.nodes import (
    NodePlan, NodeReport, Scale, ScaleReply, decode_node, decode_plan, decode_scale,
    node_header,
)
from wire.purge import Purge, PurgeReply, decode_purge, purge_header

class Command(enum.IntEnum):
    """Frame 1 of every message."""

    # agent -> broker
    READY = 0x01
    HEARTBEAT = 0x02
    RESULT = 0x03
    PROGRESS = 0x04
    DIRECT = 0x05
    DISCONNECT = 0x06
    PONG = 0x07
    #: node supervisor -> broker (``wire/nodes.py``)
    NODE = 0x08
    # broker -> agent
    TASK = 0x10
    CANCEL = 0x11
    ACK = 0x12
    WELCOME = 0x13
    PING = 0x14
    #: broker -> node supervisor (``wire/nodes.py``)
    PLAN = 0x15
    # client -> broker
    SUBMIT = 0x20
    FETCH = 0x21
    STATUS = 0x22
    TASKS = 0x23
    READ = 0x24
    RELEASE = 0x25
    #: both ways: the request and its answer (``wire/purge.py``)
    PURGE = 0x26
    #: both ways: set an agent's replica count, and its answer (``wire/nodes.py``)
    SCALE = 0x27
    # broker -> client
    ACCEPTED = 0x30
    CHUNK = 0x31
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
    #: a SUBMIT refused because the broker's journal cannot write (a full disk); the
    #: broker accepts new tasks again once a write succeeds
    STORAGE_FULL = "storage_full"
    #: a well-formed message whose values are refused (a name with control characters)
    BAD_REQUEST = "bad_request"
    #: a READY refused because the broker holds as many agents as it takes from that
    #: remote address, or in all (``--max-agents-per-address``, ``--max-agents``)
    TOO_MANY_AGENTS = "too_many_agents"
    #: SCALE named an agent no live node supervisor has in its catalogue
    NO_NODE = "no_node"
    #: a finished task whose payloads a PURGE removed (its result's ``error.code``: the
    #: status stays what it was, the data is gone)
    PURGED = "purged"


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

    Header: map ``{"ivl", "live", "endpoints", "boot", "limits"}``: heartbeat interval
    (s) and liveness that the agent should use too, the other endpoints (bus, state) by
    name, the broker's boot id, and its size limits (``{"max_message_bytes",
    "max_header_bytes"}``: the SDK checks its sends against them). ``limits`` is
    optional both ways: a peer that does not know it ignores it, and an SDK that does not
    get it keeps the defaults of ``wire.limits``.
    """

    heartbeat_interval_s: float
    heartbeat_liveness: int
    endpoints: dict[str, str] = field(default_factory=dict)
    boot: str = ""
    limits: dict[str, int] | None = None


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Liveness signal, both ways. Header: map, empty from agents.

    A client pings with ``{"role": "client"}``; the broker answers every client ping
    with ``{"boot": id}``, a random id per broker start, so that a client notices a
    restart and sends again what the old broker may not have kept.

    An agent adds ``{"stats": {name: int}}`` (its messaging counters: bus messages lost,
    mailbox overflows, ...) at most once per interval when they changed; the broker
    shows them per agent in its status.

    The broker's answer to a client adds ``{"limits": {...}}``, its size limits as in
    :class:`Welcome` (optional: a client that does not get it keeps the defaults).
    """

    role: str | None = None
    boot: str | None = None
    stats: dict[str, int] | None = None
    limits: dict[str, int] | None = None


@dataclass(frozen=True, slots=True)
class Ping:
    """Broker -> agent: a health check. Header: map ``{"seq", "deadline_s"}``.

    The agent answers with :class:`Pong` from its event loop, once its ``ping()`` hook
    has given its verdict; the broker counts the agent UNRESPONSIVE when no answer came
    within ``deadline_s`` (shorter than the liveness window: a stuck loop is seen before
    the agent is declared dead).
    """

    seq: int
    deadline_s: float


@dataclass(frozen=True, slots=True)
class Pong:
    """Agent -> broker: the answer to :class:`Ping` number ``seq`` (the newest the agent
    has seen). Header: map ``{"seq", "ok", "detail", "running"}``: whether its ``ping()``
    hook found it fit, why not (one line, or nil), and ``[id, age_s, limit_s]`` for each
    task it runs: how long it has run and the time its attempt was given, so that the
    broker sees a task that ran past its limit without stopping when cancelled.
    """

    seq: int
    ok: bool
    detail: str | None = None
    running: tuple[tuple[str, float, float], ...] = ()


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
    tasks: list[TaskDocument] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Disconnect:
    """Graceful goodbye, both ways; from the broker with reason ``not_registered`` it asks
    the agent to send READY again. Header: map ``{"reason", "back"}``: ``back`` (agent ->
    broker, optional) lists the tasks a draining agent hands back unfinished: they run
    again elsewhere, and the attempt does not count against their retries."""

    reason: str = ""
    handed_back: list[str] = field(default_factory=list)


class TaskSpec(NamedTuple):
    """One task as a client submits it.

    Wire item (msgpack array, in field order):
    ``[id, payload, caps, agent, priority, timeout_s, max_retries, parent_id,
    attempt_timeout_s, hold]``. ``timeout_s`` is the whole task's deadline, counted from
    its acceptance (queueing, every attempt and the back-off between them);
    ``attempt_timeout_s`` bounds each attempt (nil: only the task's deadline does);
    ``hold`` keeps the task's result in the broker, whatever its retention limits, until
    a RELEASE names it (a workflow step's result, until its run has checkpointed it).

    With tracing on, a sampled task's item has an 11th element: the W3C ``traceparent``
    of the span it belongs to (read it with :func:`trace_of`). Without tracing the item
    has 10 elements: nothing is added to the wire.
    """

    id: str
    payload: Payload
    capabilities: tuple[str, ...] = ()
    agent: str | None = None
    priority: int = 0
    timeout_s: float | None = None
    max_retries: int | None = None
    parent_id: str | None = None
    attempt_timeout_s: float | None = None
    hold: bool = False


@dataclass(frozen=True, slots=True)
class Submit:
    """Client -> broker: a batch of tasks. Header: array of :class:`TaskSpec` items."""

    tasks: list[TaskSpec]


class Assignment(NamedTuple):
    """One task handed to an agent.

    Wire item: ``[id, payload, attempt, timeout_s, caps, parent_id]``; ``timeout_s`` is
    the time this attempt has left when the broker sends it (the earlier of the attempt
    limit and the task's deadline). A task submitted with a ``traceparent`` has it as a
    7th element (:func:`trace_of`).
    """

    id: str
    payload: Payload
    attempt: int
    timeout_s: float
    capabilities: tuple[str, ...]
    parent_id: str | None = None


#: A W3C traceparent is 55 characters; a longer string in its place is refused.
MAX_TRACEPARENT_CHARS: Final = 128
#: How many elements a TaskSpec and an Assignment have without a traceparent.
SPEC_FIELDS: Final = 10
ASSIGNMENT_FIELDS: Final = 6


def trace_of(item: TaskSpec | Assignment) -> str | None:
    """The W3C ``traceparent`` a task item carries (an element after its declared
    fields, present only when its submitter traces it), or None."""
    fields = SPEC_FIELDS if type(item) is TaskSpec else ASSIGNMENT_FIELDS
    if len(item) > fields:
        traceparent: str = tuple.__getitem__(item, fields)
        return traceparent
    return None


def with_trace(item: TaskSpec | Assignment, traceparent: str | None) -> Any:
    """``item`` carrying ``traceparent`` (as is when None)."""
    if traceparent is None:
        return item
    return new_tuple(type(item), (*item, traceparent))


@dataclass(frozen=True, slots=True)
class Dispatch:
    """Broker -> agent (command TASK): a batch of assignments. Header: array of items."""

    tasks: list[Assignment]


class Withheld(NamedTuple):
    """A RESULT payload the broker keeps in its result store instead of sending it:
    ``size`` bytes, which the client reads in ranges (:class:`Read`, at most
    :data:`~wire.limits.READ_CHUNK_BYTES` each), so that a large result neither sits in
    the broker's memory on its way out nor holds up the client's other messages.
    On the wire: ``[size]`` in the payload's place."""

    size: int


class ResultItem(NamedTuple):
    """One task outcome, agent -> broker and broker -> client.

    Wire item: ``[task_id, status, payload, error_code, error_message, agent, attempts,
    queued_ms, run_ms, retryable]``. Agents leave ``agent``, ``attempts`` and
    ``queued_ms`` nil; the broker fills them in for clients. ``payload`` is bin (inline),
    an integer (the index of its frame, counted from frame 3), or, broker -> client only,
    ``[size]`` (:class:`Withheld`).
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
class Read:
    """Client -> broker: ``length`` bytes from ``offset`` of a finished task's payload
    (one its RESULT withheld). Header: map ``{"req", "id", "offset", "length"}``.
    Answer: CHUNK, or ERROR ``not_found`` carrying ``req`` (the result is gone)."""

    req: int
    task_id: str
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class Chunk:
    """Broker -> client: the answer to :class:`Read`. Header: map ``{"req", "id",
    "offset", "total"}`` (``total``: the whole payload's size); frame 3: the bytes."""

    req: int
    task_id: str
    offset: int
    total: int
    data: Payload = b""


@dataclass(frozen=True, slots=True)
class Release:
    """Client -> broker: the held results of these tasks (SUBMIT's ``hold``) may go;
    retention applies to them again. Header: map ``{"ids"}``. No answer."""

    task_ids: list[str]


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
    status: StatusDocument = field(default_factory=lambda: StatusDocument())


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
    Fetch, StatusRequest, StatusReply, Error, Direct, DirectVerdict, Read, Chunk, Release,
    Ping, Pong, Purge, PurgeReply, NodeReport, NodePlan, Scale, ScaleReply,
]

def _frames(command: Command, header: bytes, blobs: list[Any] | None = None) -> list[Any]:
    frames = [SIGNATURE, COMMAND_FRAMES[command], header]
    if blobs:
        frames.extend(blobs)
    return frames


def encode_results(items: list[ResultItem]) -> list[Any]:
    """``encode(Results(items))``, without building the message first (the broker's
    per-pass output: a dataclass costs an interpreted ``__init__`` even when compiled)."""
    blobs: list[Any] = []
    return _frames(Command.RESULT, pack(items_with_blobs(items, 2, blobs)), blobs)


def encode_dispatch(assignments: list[Assignment]) -> list[Any]:
    """``encode(Dispatch(assignments))``, without building the message first."""
    blobs: list[Any] = []
    return _frames(Command.TASK, pack(items_with_blobs(assignments, 1, blobs)), blobs)


#: Largest value a HEARTBEAT's ``stats`` counter carries: a counter beyond it is sent as
#: this. Counters grow from what peers send (a bus publisher's ``seq`` jumping by 2^64
#: adds that much to ``bus_gaps``), and msgpack cannot encode an integer past 64 bits:
#: without the cap, one forged bus message made every heartbeat of the agent raise.
MAX_STAT_VALUE: Final = 2 ** 63 - 1


def _heartbeat_header(role: str | None, boot: str | None, stats: dict[str, int] | None,
                      limits: dict[str, int] | None = None) -> dict[str, Any]:
    """A HEARTBEAT's header: only the fields that are set, counters capped at
    :data:`MAX_STAT_VALUE`."""
    header: dict[str, Any] = {}
    if role is not None:
        header["role"] = role
    if boot is not None:
        header["boot"] = boot
    if stats is not None:
        header["stats"] = {name: min(count, MAX_STAT_VALUE) for name, count in stats.items()}
    return _optional(header, limits=limits)


def _optional(header: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """``header`` with those of ``fields`` that are set: a peer that does not know an
    optional field never sees it, and one that does not send it is not wrong."""
    for key, value in fields.items():
        if value is not None:
            header[key] = value
    return header


def _encode_control(msg: Disconnect | Ping | Pong) -> list[Any]:
    """DISCONNECT and the health checks' PING and PONG."""
    match msg:
        case Disconnect(reason, handed_back):
            if handed_back:
                return _frames(Command.DISCONNECT,
                               pack({"reason": reason, "back": handed_back}))
            return _frames(Command.DISCONNECT, pack({"reason": reason}))
        case Ping(seq, deadline_s):
            return _frames(Command.PING, pack({"seq": seq, "deadline_s": deadline_s}))
    return _frames(Command.PONG, pack({"seq": msg.seq, "ok": msg.ok, "detail": msg.detail,
                                       "running": [list(r) for r in msg.running]}))


def _encode_reads(msg: Read | Chunk | Release | Purge | PurgeReply | NodeReport | NodePlan
                  | Scale | ScaleReply) -> list[Any]:
    """READ, CHUNK, RELEASE and PURGE: the commands of finished tasks' results (withheld,
    held, purged); and the agent pools' NODE, PLAN and SCALE (rare: off the hot match)."""
    match msg:
        case NodeReport() | NodePlan() | Scale() | ScaleReply():
            return _frames(_POOL_COMMANDS[type(msg)], pack(node_header(msg)))
        case Purge() | PurgeReply():
            return _frames(Command.PURGE, pack(purge_header(msg)))
        case Read(req, task_id, offset, length):
            return _frames(Command.READ, pack(
                {"req": req, "id": task_id, "offset": offset, "length": length}))
        case Chunk(req, task_id, offset, total, data):
            return _frames(Command.CHUNK, pack(
                {"req": req, "id": task_id, "offset": offset, "total": total}), [data])
    return _frames(Command.RELEASE, pack({"ids": msg.task_ids}))


#: The command of each agent-pool message (``wire/nodes.py``).
_POOL_COMMANDS: Final[dict[type, Command]] = {
    NodeReport: Command.NODE, NodePlan: Command.PLAN, Scale: Command.SCALE,
    ScaleReply: Command.SCALE}


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
            return _frames(Command.SUBMIT, pack(items_with_blobs(tasks, 1, blobs)), blobs)
        case Accepted(ids):
            return _frames(Command.ACCEPTED, pack(ids))
        case Ack(ids):
            return _frames(Command.ACK, pack(ids))
        case Direct(items):
            return _frames(Command.DIRECT, pack(items_with_blobs(items, 2, blobs)), blobs)
        case Heartbeat(role, boot, stats, limits):
            if role is None and boot is None and stats is None and limits is None:
                return _frames(Command.HEARTBEAT, EMPTY_MAP)
            return _frames(Command.HEARTBEAT,
                           pack(_heartbeat_header(role, boot, stats, limits)))
        case Progress(started, running):
            return _frames(Command.PROGRESS, pack({"started": started, "running": running}))
        case TaskQuery(req, statuses, limit, ids):
            return _frames(Command.TASKS, pack(
                {"req": req, "status": statuses, "limit": limit, "ids": ids}))
        case TaskList(req, tasks):
            return _frames(Command.TASKS, pack({"req": req, "tasks": tasks}))
        case Ready():
            header = {"id": msg.agent_id, "name": msg.name, "caps": list(msg.capabilities),
                      "max": msg.max_concurrent, "v": msg.version, "running": list(msg.running)}
            return _frames(Command.READY, pack(header))
        case Welcome(interval, liveness, endpoints, boot, limits):
            return _frames(Command.WELCOME, pack(_optional(
                {"ivl": interval, "live": liveness, "endpoints": endpoints, "boot": boot},
                limits=limits)))
        case Disconnect() | Ping() | Pong():
            return _encode_control(msg)
        case Cancel(ids):
            return _frames(Command.CANCEL, pack({"ids": ids}))
        case Fetch(req, ids, wait):
            return _frames(Command.FETCH, pack({"req": req, "ids": ids, "wait": wait}))
        case Read() | Chunk() | Release() | Purge() | PurgeReply() | NodeReport() | \
                NodePlan() | Scale() | ScaleReply():
            return _encode_reads(msg)
        case StatusRequest(req, until, timeout_s):
            return _frames(Command.STATUS,
                           pack({"req": req, "until": until, "timeout_s": timeout_s}))
        case StatusReply(req, status):
            return _frames(Command.STATUS, pack({"req": req, "status": status}))
        case Error(code, message, req, ids):
            return _frames(Command.ERROR,
                           pack({"code": code, "message": message, "req": req, "ids": ids}))
        case DirectVerdict(acks, errors):
            return _frames(Command.DIRECT, pack({"acks": acks, "errs": errors}))
    raise TypeError(f"not a protocol message: {msg!r}")


# ------------------------------------------------------------------------- decoding


def _decode_submit(header: Any, blobs: list[Any]) -> Submit:
    tasks: list[TaskSpec] = []
    append = tasks.append
    for item in as_array(header):
        fields = item
        if type(item) is not tuple or len(item) != SPEC_FIELDS:
            item = _traced_item(item, SPEC_FIELDS, "SUBMIT")
            fields = item[:SPEC_FIELDS]
        tid, ref, caps, agent, priority, timeout_s, retries, parent, attempt_s, hold = fields
        if type(hold) is not bool:
            raise ValueError("hold must be a boolean")
        if type(tid) is not str or type(caps) is not tuple or type(priority) is not int:
            raise ValueError("task id must be a string, caps an array, priority an integer")
        for cap in caps:
            if type(cap) is not str:
                raise ValueError("capabilities must be strings")
        if agent is not None and type(agent) is not str:
            raise ValueError("agent must be a string or nil")
        if timeout_s is not None and (type(timeout_s) not in (int, float) or not timeout_s > 0):
            raise ValueError("timeout_s must be a positive number or nil")
        if attempt_s is not None and (type(attempt_s) not in (int, float)
                                      or not attempt_s > 0):
            raise ValueError("attempt_timeout_s must be a positive number or nil")
        if retries is not None and (type(retries) is not int or retries < 0):
            raise ValueError("max_retries must be a non-negative integer or nil")
        if parent is not None and type(parent) is not str:
            raise ValueError("parent_id must be a string or nil")
        if type(ref) is not bytes:
            item = (tid, blob(ref, blobs), caps, agent, priority, timeout_s, retries, parent,
                    attempt_s, hold, *item[SPEC_FIELDS:])
        append(new_tuple(TaskSpec, item))
    return Submit(tasks)


def _traced_item(item: Any, fields: int, command: str) -> tuple[Any, ...]:
    """A task item that is not ``fields`` long: valid only with a traceparent after
    its fields."""
    if type(item) is not tuple or len(item) != fields + 1 or type(item[fields]) is not str \
            or len(item[fields]) > MAX_TRACEPARENT_CHARS:
        raise ValueError(f"a {command} item must be an array of {fields} (or {fields + 1} "
                         "with a traceparent string)")
    return item


#: The types a number of a message may have (msgpack decodes to these two).
_NUMBERS: Final = (int, float)


def _decode_results(header: Any, blobs: list[Any]) -> Results:
    results: list[ResultItem] = []
    append = results.append
    for item in as_array(header):
        if type(item) is not tuple or len(item) != 10:
            raise ValueError("a RESULT item must be an array of 10")
        tid, status, ref, code, message, agent, attempts, queued_ms, run_ms, retryable = item
        if type(tid) is not str or type(status) is not str:
            raise ValueError("task id and status must be strings")
        if code is not None and (type(code) is not str or type(message) is not str):
            raise ValueError("error code and message must be strings")
        # What the broker copies into the journal and clients' results has its type.
        if (type(attempts) is not int or (agent is not None and type(agent) is not str)
                or (run_ms is not None and type(run_ms) not in _NUMBERS)
                or (queued_ms is not None and type(queued_ms) not in _NUMBERS)
                or (retryable is not None and type(retryable) is not bool)):
            raise ValueError("a RESULT item's agent must be a string or nil, attempts an "
                             "integer, queued_ms and run_ms numbers or nil, retryable a "
                             "boolean or nil")
        if type(ref) is not bytes:
            item = (tid, status, _result_payload(ref, blobs), code, message, agent, attempts,
                    queued_ms, run_ms, retryable)
        append(new_tuple(ResultItem, item))
    return Results(results)


def _result_payload(ref: Any, blobs: list[Any]) -> Payload | Withheld:
    """A RESULT item's payload that is not inline: a frame, or withheld (``[size]``)."""
    if type(ref) is tuple:
        if len(ref) != 1 or type(ref[0]) is not int or ref[0] < 0:
            raise ValueError("a withheld payload must be [size]")
        return Withheld(ref[0])
    return blob(ref, blobs)


def _decode_dispatch(header: Any, blobs: list[Any]) -> Dispatch:
    tasks = []
    for item in as_array(header):
        fields = item
        if type(item) is not tuple or len(item) != ASSIGNMENT_FIELDS:
            item = _traced_item(item, ASSIGNMENT_FIELDS, "TASK")
            fields = item[:ASSIGNMENT_FIELDS]
        tid, ref, attempt, timeout_s, caps, parent = fields
        if (type(tid) is not str or type(attempt) is not int or type(caps) is not tuple
                or type(timeout_s) not in (int, float)):
            raise ValueError("a TASK item has a wrong type")
        if type(ref) is not bytes:
            item = (tid, blob(ref, blobs), attempt, timeout_s, caps, parent,
                    *item[ASSIGNMENT_FIELDS:])
        tasks.append(new_tuple(Assignment, item))
    return Dispatch(tasks)


def _decode_ready(header: Any) -> Ready:
    h = as_map(header)
    max_concurrent = h.get("max")
    if type(max_concurrent) is not int or max_concurrent < 1:
        raise ValueError("max_concurrent must be a positive integer")
    version = h.get("v")
    if version != PROTOCOL_VERSION:
        theirs = 'unknown (its READY has no "v")' if version is None else repr(version)
        raise DecodeError(version_mismatch(theirs), code=ErrorCode.BAD_VERSION)
    return Ready(as_str(h.get("id"), "agent id"), as_str(h.get("name"), "agent name"),
                 as_str_list(h.get("caps"), "caps"), max_concurrent, version,
                 as_str_list(h.get("running", []), "running"))


def decode(frames: list[Any]) -> Message:
    """Decode frames (identity already removed) into a message.

    An ERROR of another protocol version decodes too (an :class:`Error`): that is how a
    peer reads the broker's ``bad_version`` refusal, whichever of the two is newer.

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
        try:
            command, batch_decoder = _command(frames), None
        except DecodeError as e:
            return _foreign_error(frames, e)
    try:
        header = unpack_header(frames[2])
        if batch_decoder is not None:
            return batch_decoder(header, frames[3:])
        return _decode_header(command, header, frames[3:])
    except DecodeError:
        raise
    except Exception as e:  # noqa: BLE001 - any codec failure is the peer's bad frame
        raise DecodeError(f"bad {command.name} header: {e}") from e


def _foreign_error(frames: list[Any], error: DecodeError) -> Error:
    """An ERROR from a peer of another protocol version (its refusal, typically
    ``bad_version``), which every version can read (:func:`foreign_error_header`).

    Raises:
        DecodeError: ``error``, for any other message that failed the envelope check.
    """
    if error.code == ErrorCode.BAD_VERSION.value:
        header = foreign_error_header(frames, Command.ERROR)
        if header is not None:
            req, ids = header.get("req"), header.get("ids")
            return Error(header["code"], header["message"], req if type(req) is int else None,
                         [i for i in ids if type(i) is str] if type(ids) is tuple else [])
    raise error


def _command(frames: list[Any]) -> Command:
    """The message's command, from its signature and command frames; each fault raises
    with its stable error code."""
    code = command_byte(frames)
    try:
        return Command(code)
    except ValueError:
        raise DecodeError(f"unknown command 0x{code:02x}",
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
            return Accepted(as_id_list(header))
        case Command.ACK:
            return Ack(as_id_list(header))
        case Command.DIRECT:
            return _decode_direct(header, blobs)
        case Command.HEARTBEAT:
            h = as_map(header)
            return Heartbeat(as_opt_str(h.get("role"), "role"), as_opt_str(h.get("boot"), "boot"),
                             _stats(h.get("stats")), _limits(h.get("limits")))
        case Command.PROGRESS:
            h = as_map(header)
            return Progress(as_id_list(h.get("started", ())), as_id_list(h.get("running", ())))
        case Command.TASKS:
            h = as_map(header)
            req = as_req(h)
            if "tasks" in h:
                return TaskList(req, plain(h["tasks"]))
            statuses = h.get("status")
            limit = h.get("limit", 100)
            if type(limit) is not int or limit < 0:
                raise ValueError("limit must be a non-negative integer")
            ids = h.get("ids")
            return TaskQuery(req, None if statuses is None else as_id_list(statuses), limit,
                             None if ids is None else as_id_list(ids))
        case Command.READY:
            return _decode_ready(header)
        case Command.WELCOME:
            h = as_map(header)
            return Welcome(float(h["ivl"]), int(h["live"]), dict(h.get("endpoints") or {}),
                           str(h.get("boot", "")), _limits(h.get("limits")))
        case Command.DISCONNECT:
            h = as_map(header)
            return Disconnect(str(h.get("reason", "")), as_id_list(h.get("back", ())))
        case Command.PING:
            h = as_map(header)
            seq, deadline_s = h.get("seq"), as_opt_num(h.get("deadline_s"), "deadline_s")
            if type(seq) is not int or deadline_s is None:
                raise ValueError("seq must be an integer and deadline_s a number")
            return Ping(seq, deadline_s)
        case Command.PONG:
            return _decode_pong(as_map(header))
        case Command.CANCEL:
            return Cancel(as_id_list(as_map(header).get("ids")))
        case Command.FETCH:
            h = as_map(header)
            req = as_req(h)
            return Fetch(req, as_id_list(h.get("ids")), bool(h.get("wait", False)))
        case Command.READ | Command.CHUNK:
            return _decode_range(command, as_map(header), blobs)
        case Command.RELEASE:
            return Release(as_id_list(as_map(header).get("ids")))
        case Command.PURGE:
            return decode_purge(header)
        case Command.NODE:
            return decode_node(header)
        case Command.PLAN:
            return decode_plan(header)
        case Command.SCALE:
            return decode_scale(header)
        case Command.STATUS:
            h = as_map(header)
            req = as_req(h)
            if "status" in h:
                return StatusReply(req, plain(as_map(h["status"])))
            until = h.get("until")
            if until is not None:
                until = plain(as_map(until))
            return StatusRequest(req, until, float(as_opt_num(h.get("timeout_s"), "timeout_s") or 0.0))
        case Command.ERROR:
            h = as_map(header)
            return Error(str(h.get("code", "")), str(h.get("message", "")), h.get("req"),
                         list(h.get("ids") or []))
    raise DecodeError(f"command {command.name} is not accepted here",
                      code=ErrorCode.UNKNOWN_COMMAND)


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
    for item in as_array(header):
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
            item = (to, msg_id, blob(ref, blobs), reply_to, flags, error, sender)
        append(new_tuple(DirectItem, item))
    return Direct(items)


def _decode_range(command: Command, h: dict[str, Any], blobs: list[Any]) -> Read | Chunk:
    req, task_id, offset = h.get("req"), h.get("id"), h.get("offset")
    if type(req) is not int or type(task_id) is not str or type(offset) is not int or \
            offset < 0:
        raise ValueError("req and offset must be integers (offset >= 0), id a string")
    if command is Command.READ:
        length = h.get("length")
        if type(length) is not int or length <= 0:
            raise ValueError("length must be a positive integer")
        return Read(req, task_id, offset, length)
    total = h.get("total")
    if type(total) is not int or total < 0 or len(blobs) != 1:
        raise ValueError("a CHUNK has a total (integer) and one frame of data")
    return Chunk(req, task_id, offset, total, blobs[0])


def _decode_pong(h: dict[str, Any]) -> Pong:
    seq, ok, detail = h.get("seq"), h.get("ok"), h.get("detail")
    if type(seq) is not int or type(ok) is not bool:
        raise ValueError("seq must be an integer and ok a boolean")
    running: list[tuple[str, float, float]] = []
    for item in as_array(h.get("running", ())):
        if type(item) is not tuple or len(item) != 3 or type(item[0]) is not str or \
                any(type(v) not in (int, float) for v in item[1:]):
            raise ValueError("running must hold [id, age_s, limit_s] items")
        running.append((item[0], float(item[1]), float(item[2])))
    return Pong(seq, ok, as_opt_str(detail, "detail"), tuple(running))


def _limits(value: Any) -> dict[str, int] | None:
    """WELCOME's and a HEARTBEAT's ``limits``: a map of limit name to integer, or nil."""
    if value is None:
        return None
    if type(value) is not dict or any(type(k) is not str or type(v) is not int
                                      for k, v in value.items()):
        raise ValueError("limits must be a map of string to integer")
    return value


def _stats(value: Any) -> dict[str, int] | None:
    if value is None:
        return None
    if type(value) is not dict or any(type(k) is not str or type(v) is not int
                                      for k, v in value.items()):
        raise ValueError("stats must be a map of string to integer")
    return value

