"""The protocol's signature, version and size limits: the numbers both sides must agree on."""

from __future__ import annotations

from typing import Final

#: The protocol version this release speaks. A change to any frame's layout or meaning
#: (a new command or header field included) bumps it, and both ends of a connection must
#: speak the same one: a peer of another version is refused with ERROR ``bad_version``,
#: whose message names both versions (docs/protocol.md, "Versions").
#:
#: History: 1: the first release of the protocol. 2: ``timeout_s`` of SUBMIT is the
#: whole task's deadline (queue and every attempt); SUBMIT items gain a ninth field,
#: ``attempt_timeout_s`` (each attempt's limit, nil: none); TASK's ``timeout_s`` is the
#: time the attempt has left. 3: a RESULT's payload may be withheld (``[size]``: the
#: client reads it in ranges with READ, answered by CHUNK); SUBMIT items gain a tenth
#: field, ``hold`` (the result outlives retention until RELEASE). 4: security and limits:
#: PURGE (0x26) and its answer; WELCOME and the broker's answer to a client HEARTBEAT
#: gain ``limits``; ERROR codes ``unauthorized``, ``too_many_agents``, ``queue_full`` per
#: client; on a ``--secure`` broker routing ids and task ids start with the sender's key
#: scope; RESULT items' ``agent``, ``attempts``, ``queued_ms``, ``run_ms`` and
#: ``retryable`` must have their types. 5: a key's scope is 20 characters of lowercase
#: base32 of the key's bytes and ``~`` (it was the key's first 16 Z85 characters, which
#: put shell metacharacters and a leading ``-`` into task ids).
PROTOCOL_VERSION: Final = 5
#: What frame 0 of every message starts with; the protocol version follows in ASCII
#: digits. Frame 0 starting with this but for another version is ``bad_version``, any
#: other frame 0 ``bad_frame``.
SIGNATURE_PREFIX: Final = b"ORCH"
#: Frame 0 of every message this release sends: the prefix and the protocol version
#: (a literal, so that compiled code compares against a constant; a test checks it).
SIGNATURE: Final = b"ORCH5"

#: Largest frame any socket accepts (ZMQ_MAXMSGSIZE is per frame). A bigger frame makes
#: libzmq drop the connection, so senders check against it first (:class:`TooLarge`).
#: This is the default; a broker started with ``--max-message-bytes`` announces its own
#: value (WELCOME's and a client HEARTBEAT reply's ``limits``), and the SDK checks
#: against that once it heard it.
MAX_FRAME_BYTES: Final = 64 * 1024 * 1024
#: The smallest ``--max-message-bytes`` a broker accepts: room for the SDK's biggest
#: batch header (see :data:`MAX_HEADER_BYTES`) and a whole READ chunk. The SDK sends
#: frames up to this size before it heard the broker's own limit; a bigger one waits for
#: it (so that a broker with a small limit never sees a frame libzmq would drop it for).
MIN_MESSAGE_BYTES: Final = 4 * 1024 * 1024
#: Largest msgpack header frame (the one after the command) a broker or state service
#: decodes by default (``--max-header-bytes``); a bigger one is answered ``too_large``
#: undecoded, so that a peer cannot make it build millions of objects from one frame.
#: The SDK's biggest header is a batch of ``MAX_BATCH_ITEMS`` tasks or results with
#: inline payloads (128 x 16 KiB, about 2 MiB): the default leaves room for it.
MAX_HEADER_BYTES: Final = 4 * 1024 * 1024
#: The smallest ``--max-header-bytes`` a broker accepts: one batch of inline payloads.
MIN_HEADER_BYTES: Final = 3 * 1024 * 1024
#: The environment variable that raises the frame size an SDK process accepts from its
#: broker above :data:`MAX_FRAME_BYTES` (a broker started with a bigger
#: ``--max-message-bytes``; ``orchestrator start`` sets it for the agents it starts).
#: The receive limit is fixed when a socket connects, before the broker is heard.
MAX_MESSAGE_BYTES_ENV: Final = "ORCH_MAX_MESSAGE_BYTES"

#: Largest range one READ asks for: a withheld payload comes in pieces this big, so that
#: a client's other messages (a small task's RESULT) wait behind at most one of them.
READ_CHUNK_BYTES: Final = 4 * 1024 * 1024

#: Payloads up to this size ride inside the header; larger ones get a frame of their own.
INLINE_PAYLOAD_MAX: Final = 16 * 1024

#: Most items a sender puts in one batch message. Bigger batches cost less per item but
#: make the processes work in turns instead of in a pipeline: with 128, a broker can
#: dispatch the first chunk of a burst while the client still encodes the next.
MAX_BATCH_ITEMS: Final = 128

#: Where agents and clients find the broker and the state service when the caller names
#: none: the environment variable, then the default (the broker's and the state
#: service's default binds, 127.0.0.1:5555 and :5558). Kept here so that both sides
#: read the same names and ports.
BROKER_URL_ENV: Final = "ORCH_BROKER"
DEFAULT_BROKER_URL: Final = "tcp://127.0.0.1:5555"
STATE_URL_ENV: Final = "ORCH_STATE"
DEFAULT_STATE_URL: Final = "tcp://127.0.0.1:5558"

#: Longest agent id, agent name or capability (characters); they must be printable too
#: (a newline in a name would forge lines in the broker's log). The SDK checks before it
#: registers; the broker refuses a READY that breaks it with ``bad_request``.
MAX_NAME_CHARS: Final = 256
