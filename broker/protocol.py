"""The wire protocol's old home: every name now lives in the ``wire`` package.

Kept for one release so that code importing ``broker.protocol`` keeps working; new code
imports from :mod:`wire.tasks`, :mod:`wire.state`, :mod:`wire.bus`, :mod:`wire.codec` and
:mod:`wire.limits`.
"""

from __future__ import annotations

from wire.limits import (  # noqa: F401 - re-exported
    INLINE_PAYLOAD_MAX, MAX_BATCH_ITEMS, MAX_FRAME_BYTES, PROTOCOL_VERSION, SIGNATURE,
)
from wire.codec import (  # noqa: F401 - re-exported
    EMPTY_MAP, Payload, as_array, as_id_list, as_map, as_opt_num, as_opt_str, as_str,
    as_str_list, blob, check_signature, chunks, command_byte, items_with_blobs, new_tuple,
    pack, packb, plain, unpack_header, unpackb,
)
from wire.tasks import (  # noqa: F401 - re-exported
    Accepted, Ack, Assignment, COMMAND_FRAMES, Cancel, Command, DIRECT_ASK, DIRECT_BROADCAST,
    DIRECT_NO_ACK, Direct, DirectItem, DirectVerdict, Disconnect, Dispatch, Error, ErrorCode,
    Fetch, Heartbeat, Message, Progress, Ready, ResultItem, Results, StatusReply,
    StatusRequest, Submit, TaskList, TaskQuery, TaskSpec, TaskStatus, Welcome, decode,
    encode, encode_dispatch, encode_results,
)
from wire.state import (  # noqa: F401 - re-exported
    Entry, Fence, LeaseGranted, LockAcquire, LockInfo, LockList, LockRelease, LockRenew,
    LockTable, MAX_EVENTS_BYTES, MAX_EVENTS_PER_MESSAGE, MAX_KEY_BYTES, MAX_LEASE_TTL_S,
    MAX_LIST_BYTES, MAX_LIST_ITEMS, MAX_VALUE_BYTES, STATE_COMMAND_FRAMES, StateCommand,
    StateDelete, StateDone, StateErrorCode, StateErrorReply, StateEvents, StateGet, StateHello,
    StateInfo, StateInfoRequest, StateItems, StateList, StateMessage, StatePing, StatePut,
    StateUnwatch, StateValue, StateWatch, StateWelcome, decode_state, encode_state,
)
from wire.bus import (  # noqa: F401 - re-exported
    BUS_AGENT_JOINED, BUS_AGENT_LEFT, BUS_BROKER_SENDER, BUS_TASKS_PREFIX, BusEnvelope,
    PrefixSet, decode_bus, encode_bus, encode_bus_probe,
)
