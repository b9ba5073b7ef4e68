"""The broker's size limits on the client side: large submits wait until the broker
said what it takes, and submits are refused ``too_large`` here rather than sent to be
dropped.

A broker announces its frame and header limits (``--max-message-bytes``,
``--max-header-bytes``) in its answer to a client's HEARTBEAT. Until it heard them the
client knows only that every broker takes frames of
:data:`wire.limits.MIN_MESSAGE_BYTES`: a bigger payload waits, and the client asks (a
HEARTBEAT), because a frame over the broker's limit makes libzmq drop the connection,
and with it what was queued behind it. Smaller ones, nearly all, never wait and cost
no extra message.
"""

from __future__ import annotations

from wire.limits import MIN_MESSAGE_BYTES
from wire.tasks import Error, ErrorCode, Heartbeat, Message, Submit, TaskSpec
from agent_sdk.connection import Transport
from agent_sdk.errors import TooLarge
from agent_sdk.handles import TaskHandle, reject
from agent_sdk.messaging.bus import BusMessaging


class SubmitLimits:
    """The submits of one client that wait for the broker's size limits."""

    def __init__(self) -> None:
        self.waiting: list[TaskSpec] = []

    def check(self, channel: Transport[Message], payload: bytes) -> bool:
        """Whether a submit of ``payload`` may leave now; False: keep it with :meth:`hold`
        until :meth:`adopt`.

        Raises:
            TooLarge: the payload is over the broker's frame limit (or the default, if
                the broker has not said yet).
        """
        size = len(payload)
        if size > channel.max_frame_bytes:
            raise TooLarge(size, channel.max_frame_bytes)
        return size <= MIN_MESSAGE_BYTES or channel.limits_known

    def hold(self, spec: TaskSpec, handle: TaskHandle,
             channel: Transport[Message]) -> TaskHandle:
        """Keep ``spec`` until :meth:`adopt`, and ask the broker for its limits (once: if
        the answer is lost, the client's pings while tasks are open ask again); returns
        ``handle``."""
        if not self.waiting:
            channel.send(Heartbeat(role="client"))
        self.waiting.append(spec)
        return handle

    def adopt(self, channel: Transport[Message] | None, limits: dict[str, int] | None,
              handles: dict[str, TaskHandle], outgoing: list[TaskSpec],
              bus: BusMessaging) -> None:
        """The broker announced ``limits`` (None: it announces none, the defaults hold):
        the submits that waited and fit join ``outgoing`` (flushed soon); the others end
        ``rejected`` with ``too_large``, naming the limit. Bus messages are checked
        against the frame limit too."""
        if channel is None:
            return
        channel.adopt_limits(limits)
        bus.max_frame_bytes = channel.max_frame_bytes
        waiting, self.waiting = self.waiting, []
        for spec in waiting:
            if len(spec.payload) > channel.max_frame_bytes:
                refuse(spec, TooLarge(len(spec.payload), channel.max_frame_bytes), handles)
            else:
                outgoing.append(spec)
        if outgoing:
            channel.request_flush()


def send_submits(channel: Transport[Message], batch: list[TaskSpec],
                 handles: dict[str, TaskHandle]) -> None:
    """One SUBMIT of ``batch``; if its header is over the broker's limit (long ids or
    capability lists), each task alone, and the ones still too big end ``too_large``."""
    try:
        channel.send(Submit(batch))
        return
    except TooLarge:
        if len(batch) == 1:
            refuse(batch[0], None, handles)
            return
    for spec in batch:
        try:
            channel.send(Submit([spec]))
        except TooLarge as e:
            refuse(spec, e, handles)


def refuse(spec: TaskSpec, error: TooLarge | None, handles: dict[str, TaskHandle]) -> None:
    """End ``spec``'s handle ``rejected`` with ``too_large`` (never sent)."""
    message = str(error) if error is not None else "the task's SUBMIT is over the broker's limits"
    reject(Error(ErrorCode.TOO_LARGE.value, message, None, [spec.id]), handles)
