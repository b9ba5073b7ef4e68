"""Exceptions of the agent SDK; :class:`OrchestratorError` is the root of all of them.

The wire package's errors reach SDK callers as the subclasses at the end of this module:
each is both an :class:`OrchestratorError` and the :mod:`wire.errors` class it stands for,
so ``except OrchestratorError`` and ``except wire.errors.TooLarge`` both catch a
:class:`TooLarge` raised by the SDK.
"""

from __future__ import annotations

import wire.errors as wire_errors


class OrchestratorError(Exception):
    """Raised for any failure the SDK reports on purpose."""


class BrokerUnavailable(OrchestratorError):
    """Raised when the broker did not answer within the deadline."""

    def __init__(self, url: str, waited_s: float, *, refused: bool = False) -> None:
        why = (f"nothing accepts connections at {url} (connection refused)" if refused
               else f"no answer from the broker at {url} within {waited_s:g} s")
        super().__init__(f"{why}; is the broker running? (start it with "
                         "`orchestrator start`)")
        #: the connection was refused before any broker was reached there
        self.refused = refused
        self.url = url
        self.waited_s = waited_s


class Unauthorized(OrchestratorError):
    """Raised when a secure broker (or its state service or bus) refused this peer's
    CURVE handshake, or the handshake failed for a key or mechanism mismatch: nothing
    can be sent until the keys are fixed. The message says which case it most likely is
    and what to do; ``reason`` is one of ``unknown_key``, ``wrong_server_key``,
    ``plaintext_to_secure``, ``curve_to_plaintext``."""

    def __init__(self, url: str, reason: str, message: str) -> None:
        super().__init__(f"unauthorized: {message}")
        self.code = "unauthorized"
        self.url = url
        self.reason = reason


class KeyConfigError(OrchestratorError, ValueError):
    """Raised when this process's CURVE settings are wrong: one of ORCH_CURVE_KEY_FILE
    and ORCH_CURVE_SERVER_KEY(_FILE) without the other, a malformed key, a missing key
    file, a secret key file others may read."""


class WaitTimeout(OrchestratorError, TimeoutError):
    """Raised when a client's own wait deadline passes (the task itself may go on)."""


class TaskNotFound(OrchestratorError, LookupError):
    """Raised when the broker knows no task with the id (or its result is past retention)."""

    def __init__(self, task_id: str, message: str = "") -> None:
        super().__init__(message or f"no task with id {task_id!r}")
        self.task_id = task_id


class RequestRefused(OrchestratorError):
    """Raised when the broker answers a request with ERROR; carries the stable ``code``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


class PermanentFailure(OrchestratorError):
    """Raise it in ``execute`` for a failure that a retry cannot fix (bad input, say):
    the task fails at once, with no retry and no second opinion on another agent, even
    when the task asked for retries."""


class RetryableError(OrchestratorError):
    """Raise it in ``execute`` for a transient failure of the agent or of what it depends
    on (a service that timed out, a rate limit, a connection reset): the broker tries the
    task again after a back-off while its retries last (the broker's default, 3, when
    the task names none), and counts it against this agent's circuit breaker. An agent
    can mark exception classes of its own the same way with ``retry_on``.

    Any other exception of ``execute`` is taken for the task's own failure (its input,
    most often): retried only when the task asked for retries, else tried once on
    another agent of the same capabilities (a second opinion), when there is one."""


class InvalidName(OrchestratorError, ValueError):
    """Raised when an agent's name, id or a capability cannot be registered: empty, over
    :data:`~agent_sdk.config.MAX_NAME_CHARS` characters, or with control characters."""


class RegistrationRefused(RequestRefused):
    """Raised by an agent's ``run`` (and ``wait_registered``) when the broker answered its
    READY with ERROR (``bad_request``: a name it refuses; ``too_many_agents``: over its
    cap): the agent stops instead of registering again."""

    def __init__(self, url: str, code: str, message: str) -> None:
        OrchestratorError.__init__(self, f"the broker at {url} refused the agent ({code}): "
                                   f"{message}")
        self.code = code
        self.url = url


class VersionMismatch(RequestRefused):
    """Raised when the broker or the state service speaks another protocol version than
    this SDK: it answered with ERROR ``bad_version``, whose message names both versions.
    Nothing can work until both sides run the same Orchestrator release, so the SDK
    stops there: every request and task result waiting on that connection, an agent's
    ``run`` and ``wait_registered`` and every later call raise this at once, and nothing
    is sent again."""

    def __init__(self, url: str, message: str, peer: str = "the broker") -> None:
        OrchestratorError.__init__(self, f"{peer} at {url} refused our messages "
                                   f"(bad_version): {message}")
        self.code = "bad_version"
        self.url = url


class NoSuchAgent(RequestRefused, LookupError):
    """Raised when a direct message names no live agent (by id or name) and no connected
    client: code ``no_agent``. A dead agent counts as none."""

    def __init__(self, message: str) -> None:
        super().__init__("no_agent", message)


class MailboxFull(RequestRefused):
    """Raised when the receiver of a direct message had no room for it (its mailbox, or
    the broker's queue for a receiver that lags, was full): code ``mailbox_full``."""

    def __init__(self, message: str) -> None:
        super().__init__("mailbox_full", message)


class RemoteError(RequestRefused):
    """Raised by ``request`` when the receiver's handler raised: code ``agent_error``,
    the message starting with the exception type; ``sender`` is who answered."""

    def __init__(self, message: str, sender: str | bytes | None = None) -> None:
        super().__init__("agent_error", message)
        self.sender = sender


class BusUnavailable(OrchestratorError):
    """Raised when the pub/sub bus cannot be used: the broker announces none (it runs
    with ``--no-bus``)."""


class ReservedTopic(OrchestratorError, ValueError):
    """Raised by ``publish`` (and ``wait_for_subscribers``) for a topic only the broker
    publishes (``agents.*``, ``tasks.*``): subscribers take those from the broker's own
    events socket and drop them from the shared bus, so such a message would never
    arrive. Publish your own events under another prefix."""

    def __init__(self, topic: str) -> None:
        super().__init__(f"topic {topic!r} is reserved for the broker's events (prefixes "
                         f"'agents.' and 'tasks.'): subscribers ignore it from anyone "
                         f"else; publish under another prefix")
        self.topic = topic


class StateUnavailable(OrchestratorError):
    """Raised when the state service did not answer within the deadline, or the
    connection was lost while a request was out (its outcome is then unknown)."""

    def __init__(self, url: str, waited_s: float, detail: str = "") -> None:
        super().__init__(detail or f"no answer from the state service at {url} within "
                         f"{waited_s:g} s; is it running? (`orchestrator start` runs it)")
        self.url = url
        self.waited_s = waited_s


class StateError(RequestRefused):
    """Raised when the state service refuses a request; ``code`` is the stable error code
    (``bad_request``, ``too_large``, ...; the subclasses below have their own)."""


class VersionConflict(StateError):
    """Raised when a compare-and-set finds the key at another version than expected.

    ``current_version`` is the key's version now (0: it does not exist) and
    ``current_value`` its value, so a retry needs no extra read.
    """

    def __init__(self, key: str, expected_version: int, current_version: int,
                 current_value: object = None, message: str = "") -> None:
        super().__init__("conflict", message or f"key {key!r} is at version {current_version}, "
                         f"not the expected {expected_version}")
        self.key = key
        self.expected_version = expected_version
        self.current_version = current_version
        self.current_value = current_value


class LockTimeout(StateError, TimeoutError):
    """Raised when a lock stayed held by others for the whole ``wait``."""

    def __init__(self, name: str, wait_s: float | None, message: str = "") -> None:
        super().__init__("lock_timeout", message or f"lock {name!r} not acquired within "
                         f"{wait_s:g} s")
        self.name = name
        self.wait_s = wait_s


class StaleFencingToken(StateError):
    """Raised when a write guarded by a fencing token is refused: the token is not the
    lock's current lease (its holder lost the lock to expiry or death)."""

    def __init__(self, lock: str, token: int, message: str = "") -> None:
        super().__init__("stale_token", message or f"fencing token {token} of lock {lock!r} "
                         "is stale")
        self.lock = lock
        self.token = token


class LeaseLost(StateError):
    """Raised when renewing or releasing a lease the service no longer counts as held
    (it expired, or the session holding it did)."""

    def __init__(self, name: str, token: int, message: str = "") -> None:
        super().__init__("not_held", message or f"lease {token} of lock {name!r} is lost")
        self.name = name
        self.token = token


class StateAccessDenied(StateError, Unauthorized):
    """Raised when a secure state service refuses a request of this key's role: its key
    prefix rules do not grant it (the message names the prefix and the role), or the
    session belongs to another key. Code ``unauthorized``, reason ``access_denied``;
    also an :class:`Unauthorized`, so the CLI exits 5."""

    def __init__(self, message: str, url: str = "") -> None:
        OrchestratorError.__init__(self, f"unauthorized: {message}")
        self.code = "unauthorized"
        self.url = url
        self.reason = "access_denied"


# ------------------------------------------------------------------ wire errors


class WireError(OrchestratorError, wire_errors.WireError):
    """Raised when frames break the wire protocol; ``code`` is the stable error code."""


class DecodeError(WireError, wire_errors.DecodeError):
    """Raised when frames cannot be decoded into a protocol message."""


class TooLarge(WireError, wire_errors.TooLarge):
    """Raised when a message (a payload, a value, a frame) is bigger than the protocol's
    ``MAX_FRAME_BYTES``; ``size`` and ``limit`` say by how much."""


class StateDecodeError(DecodeError, wire_errors.StateDecodeError):
    """Raised when frames cannot be decoded into a state service message."""


#: The SDK class for each wire class, most specific first (the order ``as_sdk_error``
#: tries them in).
_SDK_CLASSES: tuple[tuple[type[wire_errors.WireError], type[WireError]], ...] = (
    (wire_errors.TooLarge, TooLarge),
    (wire_errors.StateDecodeError, StateDecodeError),
    (wire_errors.DecodeError, DecodeError),
    (wire_errors.WireError, WireError),
)


def as_sdk_error(error: wire_errors.WireError) -> WireError:
    """The SDK's exception for a wire error, carrying the same message and data.

    Args:
        error: raised by the wire package (or already an SDK error, returned as it is).

    Returns:
        An instance of the SDK subclass standing for ``error``'s class.
    """
    if isinstance(error, WireError):
        return error
    sdk_class = next(sdk for wire_class, sdk in _SDK_CLASSES if isinstance(error, wire_class))
    # Copied rather than constructed: the wire classes' constructors differ, and the
    # attributes (code, size, limit, req) are all in the instance dict.
    converted = sdk_class.__new__(sdk_class, *error.args)
    converted.__dict__.update(error.__dict__)
    return converted
