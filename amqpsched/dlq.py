"""The dead-letter queue as an operator sees it: list what is in it, replay what should run again.

Two kinds of message end up in the dead-letter queue, each with its reason in the headers
(``transport.dead_letter_message``):

* a client request the scheduler rejected (bad input): its body is the raw request, maybe not
  even JSON. A replay republishes it unchanged to the submit queue, with its original type,
  reply_to and correlation id.
* a task (AMQP type ``task``) whose retries were exhausted (``retries_exhausted``, by the worker)
  or whose worker died every time (``delivery_limit``, by the scheduler). A replay submits it
  again under the same task id; the original submitter gets a second answer.

Listing never removes a message: they are fetched unacknowledged and handed back. A replayed dead
letter is acknowledged (removed) only once the broker confirmed its resubmission.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractRobustConnection, DeliveryMode
from pydantic import ValidationError

from . import transport
from .errors import BrokerError, DecodeError
from .protocol import Kind, SubmitRequest, TaskMessage, decode, encode
from .settings import Settings
from .topology import Topology
from .transport import IncomingMessage

#: Seconds one basic.get may take before the broker is deemed unresponsive.
GET_TIMEOUT = 10.0


@dataclass(frozen=True)
class DeadLetter:
    """One message of the dead-letter queue, as its headers describe it."""

    dead_id: str
    reason: str
    error: str
    source: str
    capability: str | None
    task_id: str | None
    attempts: int | None
    #: AMQP type of the message that died (``submit``, ``task``...); None when it had none.
    original_type: str | None
    #: Where the answer of the dead request or task goes (for a task: its submitter).
    reply_to: str | None
    correlation_id: str | None
    body_size: int
    #: When it was dead-lettered, when the message tells (else None).
    dead_at: datetime | None = None

    @property
    def is_task(self) -> bool:
        return self.original_type == Kind.TASK.value

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (``dead_at`` in ISO 8601)."""
        return {
            "dead_id": self.dead_id,
            "reason": self.reason,
            "error": self.error,
            "source": self.source,
            "capability": self.capability,
            "task_id": self.task_id,
            "attempts": self.attempts,
            "original_type": self.original_type,
            "reply_to": self.reply_to,
            "correlation_id": self.correlation_id,
            "body_size": self.body_size,
            "dead_at": self.dead_at.isoformat() if self.dead_at else None,
        }


@dataclass(frozen=True)
class ReplayReport:
    """What :func:`replay` did: dead ids replayed, ids asked for but absent, and dead letters
    selected but left in the queue because they cannot be resubmitted (id, why)."""

    replayed: tuple[str, ...] = ()
    not_found: tuple[str, ...] = ()
    skipped: tuple[tuple[str, str], ...] = field(default=())

    @property
    def ok(self) -> bool:
        return not self.not_found and not self.skipped


def format_line(dead: DeadLetter, width: int = 160) -> str:
    """One human-readable line for ``amqpsched dlq list``."""
    error = " ".join(dead.error.split())
    attempts = "-" if dead.attempts is None else str(dead.attempts)
    line = (
        f"{dead.dead_id or '-'}  {dead.reason}  capability={dead.capability or '-'}  "
        f"task={dead.task_id or '-'}  attempts={attempts}  {error}"
    )
    return line if len(line) <= width else line[: width - 3] + "..."


# -- reading headers -----------------------------------------------------------------------------


def _text(headers: Mapping[str, Any], key: str) -> str | None:
    value = headers.get(key)
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if value is None or value == "":
        return None
    return str(value)


def _int(headers: Mapping[str, Any], key: str) -> int | None:
    value = headers.get(key)
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    try:
        return int(str(value)) if value is not None else None
    except ValueError:
        return None


def _utc(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return datetime.fromtimestamp(value, UTC)
    return None


def dead_at(incoming: IncomingMessage, reason: str) -> datetime | None:
    """The message's timestamp if it has one, else the time the broker dead-lettered it for
    ``reason`` (its ``x-death`` entry; older entries, e.g. a retry's delay, do not count)."""
    stamp = _utc(incoming.timestamp)
    if stamp is not None:
        return stamp
    deaths = (incoming.headers or {}).get("x-death")
    if isinstance(deaths, list):
        for death in deaths:
            if isinstance(death, Mapping) and death.get("reason") in (reason, reason.encode()):
                return _utc(death.get("time"))
    return None


def _task(incoming: IncomingMessage) -> TaskMessage | None:
    if incoming.type != Kind.TASK.value:
        return None
    try:
        return decode(TaskMessage, incoming.body)
    except DecodeError:
        return None


def describe(incoming: IncomingMessage) -> DeadLetter:
    """The :class:`DeadLetter` a dead-letter queue message stands for."""
    headers: Mapping[str, Any] = incoming.headers or {}
    reason = _text(headers, transport.H_REASON) or "unknown"
    task = _task(incoming)
    reply_to = _text(headers, transport.H_ORIGINAL_REPLY_TO) or (task.reply_to if task else None)
    corr = _text(headers, transport.H_ORIGINAL_CORRELATION_ID) or (
        task.correlation_id if task else None
    )
    return DeadLetter(
        dead_id=_text(headers, transport.H_DEAD_ID) or "",
        reason=reason,
        error=_text(headers, transport.H_ERROR) or "",
        source=_text(headers, transport.H_SOURCE) or "",
        capability=_text(headers, transport.H_CAPABILITY) or (task.capability if task else None),
        task_id=_text(headers, transport.H_TASK_ID) or (task.task_id if task else None),
        attempts=_int(headers, transport.H_ATTEMPTS),
        original_type=_text(headers, transport.H_ORIGINAL_TYPE) or incoming.type or None,
        reply_to=reply_to,
        correlation_id=corr,
        body_size=len(incoming.body),
        dead_at=dead_at(incoming, reason),
    )


# -- broker --------------------------------------------------------------------------------------


async def _depth(conn: AbstractRobustConnection, queue: str) -> int | None:
    """Messages ready in ``queue``; None when it does not exist. Uses a channel of its own, as
    the broker closes the channel of a passive declare that fails."""
    channel = await transport.confirm_channel(conn)
    try:
        declared = await channel.declare_queue(queue, passive=True)
    except aio_pika.exceptions.ChannelNotFoundEntity:
        return None
    except transport.BROKER_ERRORS as exc:
        raise BrokerError(f"cannot inspect {queue!r}: {exc}") from exc
    finally:
        await _close(channel)
    result = declared.declaration_result
    return result.message_count if result is not None else 0


async def _close(channel: AbstractChannel) -> None:
    """Close ``channel``: every message fetched on it and not acked goes back to its queue."""
    # A dead channel has handed its messages back already.
    with contextlib.suppress(*transport.BROKER_ERRORS):
        await channel.close()


async def _fetch(channel: AbstractChannel, queue_name: str, most: int) -> list[IncomingMessage]:
    """Up to ``most`` messages of ``queue_name``, unacknowledged (held until acked or closed)."""
    queue = await channel.get_queue(queue_name, ensure=False)
    got: list[IncomingMessage] = []
    try:
        while len(got) < most:
            msg = await queue.get(no_ack=False, fail=False, timeout=GET_TIMEOUT)
            if msg is None:
                break
            got.append(msg)
    except transport.BROKER_ERRORS as exc:
        raise BrokerError(f"cannot read {queue_name!r}: {exc.__class__.__name__}: {exc}") from exc
    return got


async def _hand_back(channel: AbstractChannel, held: list[IncomingMessage]) -> None:
    """Return every held, unacked message to its queue, then close the channel (which would
    return them anyway: the nack only makes it explicit and immediate)."""
    try:
        if held:
            await held[-1].nack(multiple=True, requeue=True)
    except transport.SETTLE_ERRORS:
        pass
    finally:
        await _close(channel)


async def list_dead(settings: Settings, limit: int = 100) -> list[DeadLetter]:
    """The first ``limit`` messages of the dead-letter queue, oldest first. Nothing is removed:
    the messages are fetched without acknowledgement and handed back."""
    if limit <= 0:
        return []
    topo = Topology(settings.namespace)
    async with transport.connection(settings, f"amqpsched-dlq-list-{uuid.uuid4().hex[:8]}") as conn:
        depth = await _depth(conn, topo.dead_letter_queue)
        if not depth:
            return []
        channel = await transport.confirm_channel(conn)
        held: list[IncomingMessage] = []
        try:
            held = await _fetch(channel, topo.dead_letter_queue, min(limit, depth))
            return [describe(msg) for msg in held]
        finally:
            await _hand_back(channel, held)


_DROPPED_HEADERS = frozenset({"x-death", "x-delivery-count"})
_DROPPED_PREFIXES = ("x-first-death-", "x-last-death-", "x-amqpsched-")


def _kept_headers(incoming: IncomingMessage) -> dict[str, Any]:
    """The request's own headers, without those the broker or amqpsched added."""
    return {
        k: v
        for k, v in (incoming.headers or {}).items()
        if k not in _DROPPED_HEADERS and not k.startswith(_DROPPED_PREFIXES)
    }


def resubmission(
    incoming: IncomingMessage, settings: Settings
) -> tuple[aio_pika.Message | None, str]:
    """The submit-queue message that replays a dead letter, or None and why it cannot."""
    headers: Mapping[str, Any] = incoming.headers or {}
    if incoming.type == Kind.TASK.value:
        try:
            task = decode(TaskMessage, incoming.body)
        except DecodeError as exc:
            return None, f"not a valid task message ({exc})"
        timeout = task.deadline - task.submitted_at
        try:
            request = SubmitRequest(
                v=1,
                capability=task.capability,
                payload=task.payload,
                task_id=task.task_id,
                timeout=timeout if timeout > 0 else settings.default_timeout,
                time_limit=task.time_limit,
                retry=task.retry,
            )
        except ValidationError as exc:
            return None, f"cannot make a submission of it ({exc.error_count()} error(s))"
        msg = transport.message(
            encode(request),
            Kind.SUBMIT,
            correlation_id=task.correlation_id or None,
            reply_to=task.reply_to or None,
            message_id=task.task_id,
            headers={transport.H_REPLAY: True},
        )
        return msg, ""
    original_type = _text(headers, transport.H_ORIGINAL_TYPE)
    if transport.H_ORIGINAL_TYPE not in headers:
        original_type = incoming.type or None
    return (
        aio_pika.Message(
            incoming.body,
            content_type=incoming.content_type,
            content_encoding=incoming.content_encoding,
            type=original_type,
            reply_to=_text(headers, transport.H_ORIGINAL_REPLY_TO),
            correlation_id=_text(headers, transport.H_ORIGINAL_CORRELATION_ID),
            message_id=incoming.message_id,
            delivery_mode=DeliveryMode.PERSISTENT,
            headers={**_kept_headers(incoming), transport.H_REPLAY: True},
        ),
        "",
    )


async def replay(settings: Settings, dead_ids: list[str] | None) -> ReplayReport:
    """Submit the dead letters ``dead_ids`` (None: all of them) again, and remove each from the
    dead-letter queue once the broker confirmed its resubmission. The others stay.

    Only the messages in the queue when the call starts are considered, so a replay that dies
    again is not replayed twice. Raises :class:`BrokerError` if the broker fails midway: the
    dead letters replayed by then are gone from the queue, every other one is back in it."""
    topo = Topology(settings.namespace)
    wanted = None if dead_ids is None else dict.fromkeys(dead_ids)
    if wanted is not None and not wanted:
        return ReplayReport()
    replayed: list[str] = []
    skipped: list[tuple[str, str]] = []
    found: set[str] = set()
    name = f"amqpsched-dlq-replay-{uuid.uuid4().hex[:8]}"
    async with transport.connection(settings, name) as conn:
        depth = await _depth(conn, topo.dead_letter_queue)
        if not depth:
            return ReplayReport(not_found=tuple(wanted or ()))
        channel = await transport.confirm_channel(conn)
        held: list[IncomingMessage] = []
        try:
            try:
                await topo.ensure(channel, topo.submit_exchange)
                submit = await channel.get_exchange(topo.submit_exchange, ensure=False)
            except transport.BROKER_ERRORS as exc:
                raise BrokerError(f"cannot declare {topo.submit_exchange!r}: {exc}") from exc
            queue = await channel.get_queue(topo.dead_letter_queue, ensure=False)
            selected: list[tuple[str, IncomingMessage]] = []
            # Take the queue's messages (held unacked, so none comes twice) until every id
            # asked for is found; all of them for --all.
            for _ in range(depth):
                if wanted is not None and len(found) == len(wanted):
                    break
                try:
                    msg = await queue.get(no_ack=False, fail=False, timeout=GET_TIMEOUT)
                except transport.BROKER_ERRORS as exc:
                    raise BrokerError(f"cannot read {topo.dead_letter_queue!r}: {exc}") from exc
                if msg is None:
                    break
                held.append(msg)
                dead_id = _text(msg.headers or {}, transport.H_DEAD_ID) or ""
                if wanted is None or dead_id in wanted:
                    found.add(dead_id)
                    selected.append((dead_id, msg))
            for dead_id, msg in selected:
                out, why = resubmission(msg, settings)
                if out is None:
                    skipped.append((dead_id, why))
                    continue
                await transport.publish(submit, out, topo.submit_queue, mandatory=True)
                try:
                    await msg.ack()
                except transport.SETTLE_ERRORS as exc:
                    raise BrokerError(
                        f"dead letter {dead_id} was replayed but is still in the dead-letter "
                        f"queue: {exc}"
                    ) from exc
                held.remove(msg)
                replayed.append(dead_id)
        finally:
            await _hand_back(channel, held)
    missing = tuple(i for i in (wanted or ()) if i not in found)
    return ReplayReport(replayed=tuple(replayed), not_found=missing, skipped=tuple(skipped))


__all__ = [
    "DeadLetter",
    "ReplayReport",
    "describe",
    "format_line",
    "list_dead",
    "replay",
    "resubmission",
]
