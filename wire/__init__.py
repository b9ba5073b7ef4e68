"""The Orchestrator wire protocol: frames, commands, typed messages, encode and decode.

This package is the one place that knows how messages look on the wire; it imports only
msgpack and zmq (and the standard library), holds no sockets in its codecs, and is what
an agent machine needs besides ``agent_sdk``:

- :mod:`wire.limits`: signature, protocol version, frame and batch limits;
- :mod:`wire.errors`: :class:`~wire.errors.WireError` and its subclasses;
- :mod:`wire.codec`: msgpack settings, the envelope check every command range shares,
  blob placement, validators;
- :mod:`wire.tasks`: the task protocol (broker, clients, agents);
- :mod:`wire.state`: the state service protocol;
- :mod:`wire.bus`: the pub/sub bus frames and topics;
- :mod:`wire.documents`: the typed documents carried inside messages;
- :mod:`wire.sockets`: fast multipart send and receive, common socket options.

Every message is a ZeroMQ multipart message::

    frame 0: b"ORCH5"            signature and protocol version
    frame 1: one byte            the command
    frame 2: msgpack             the header (layout per command)
    frame 3..: opaque bytes      large payloads ("blobs"), referenced from the header

On import, the package loads the compiled build of its modules (its own mypyc group,
see :mod:`wire.native_build`) while it matches the source exactly.
"""

from __future__ import annotations

from wire.native_build import NativeBuild

#: The modules mypyc compiles, in the group ``orchestrator_wire``.
WIRE_BUILD = NativeBuild(
    package="wire",
    # wire.errors stays Python: the SDK subclasses its exceptions, and an interpreted
    # class cannot subclass a compiled one.
    modules=("wire.limits", "wire.codec", "wire.tasks", "wire.state", "wire.bus",
             "wire.sockets"),
    group="orchestrator_wire",
)

#: Whether this process runs the compiled build of :data:`WIRE_BUILD`.
compiled: bool = WIRE_BUILD.load(__path__)  # noqa: F821 - the package's own __path__

from wire.limits import (  # noqa: E402 - after the build is in place
    INLINE_PAYLOAD_MAX, MAX_BATCH_ITEMS, MAX_FRAME_BYTES, PROTOCOL_VERSION, SIGNATURE,
)

__all__ = [
    "INLINE_PAYLOAD_MAX", "MAX_BATCH_ITEMS", "MAX_FRAME_BYTES", "PROTOCOL_VERSION", "SIGNATURE",
    "WIRE_BUILD", "compiled",
]
