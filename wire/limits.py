"""The protocol's signature, version and size limits: the numbers both sides must agree on."""

from __future__ import annotations

from typing import Final

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

