"""The one place that speaks AMQP (with ``topology``): connecting, publishing with confirms,
building messages, and turning aio-pika's errors into ours."""

from __future__ import annotations

import asyncio
import logging
import ssl
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import aiormq.abc
import aiormq.exceptions
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustChannel,
    AbstractRobustConnection,
    DeliveryMode,
)
from yarl import URL

from .errors import BrokerError, ConfigurationError
from .protocol import CONTENT_TYPE, Kind
from .settings import Settings, mask_url

log = logging.getLogger(__name__)

IncomingMessage = AbstractIncomingMessage

#: Header names amqpsched sets on dead-lettered messages.
H_REASON = "x-amqpsched-reason"
H_ERROR = "x-amqpsched-error"
H_CAPABILITY = "x-amqpsched-capability"
H_SOURCE = "x-amqpsched-source"
H_TASK_ID = "x-amqpsched-task-id"
H_ATTEMPTS = "x-amqpsched-attempts"
#: On a submission: run the task again even if its id is known (``amqpsched dlq replay``).
H_REPLAY = "x-amqpsched-replay"
#: On journaled messages: the id of the scheduler that wrote them.
H_SCHEDULER = "x-amqpsched-scheduler"
#: Unique id of one dead-lettered message, for ``amqpsched dlq``.
H_DEAD_ID = "x-amqpsched-dead-id"
H_ORIGINAL_TYPE = "x-amqpsched-original-type"
H_ORIGINAL_REPLY_TO = "x-amqpsched-original-reply-to"
H_ORIGINAL_CORRELATION_ID = "x-amqpsched-original-correlation-id"

BROKER_ERRORS: tuple[type[BaseException], ...] = (
    aio_pika.exceptions.AMQPError,
    aiormq.exceptions.AMQPError,
    aiormq.exceptions.ChannelInvalidStateError,
    ConnectionError,
    OSError,
    asyncio.TimeoutError,
)
#: Seconds to wait for a publish's confirm before calling it failed (it is then redone: at least
#: once, never lost).
PUBLISH_TIMEOUT = 30.0
SETTLE_ERRORS: tuple[type[BaseException], ...] = (
    *BROKER_ERRORS,
    aio_pika.exceptions.MessageProcessError,
)


def ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """The TLS context for ``amqps://`` URLs: verifies the broker (settings' CA or the system's)
    and presents a client certificate when one is set. One context serves every address (settings
    refuse a mix of amqp:// and amqps://); each address's certificate is checked against its own
    host name."""
    schemes = {urlsplit(url.get_secret_value()).scheme for url in settings.amqp_urls()}
    if "amqps" not in schemes:
        return None
    context = ssl.create_default_context(cafile=settings.tls_ca_file)
    if settings.tls_cert_file:
        context.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
    return context


class FailoverConnection(aio_pika.RobustConnection):
    """A robust connection to one of several broker addresses (the nodes of a cluster).

    aio-pika's :class:`~aio_pika.RobustConnection` reconnects to the one URL it was made with;
    this one moves on to the next address, round robin, each time the connection is lost or a
    reconnect attempt fails. Everything else is RobustConnection's: it restores channels, QoS,
    exchanges, queues, bindings and consumers, then calls ``reconnect_callbacks``.

    The hook is ``_on_connection_close``: aio-pika calls it when an established connection closes
    and also when an attempt fails (``UnderlayConnection.connect``), before its reconnect loop
    makes the next attempt with ``self.url``.
    """

    def __init__(self, urls: Sequence[str], first: int = 0, **kwargs: Any) -> None:
        if not urls:
            raise ValueError("no broker URL")
        self.urls = tuple(URL(url) for url in urls)
        self._current = first % len(self.urls)
        super().__init__(self.urls[self._current], **kwargs)

    async def _on_connection_close(self, closing: asyncio.Future[Any]) -> None:
        # Only once connected: the first attempt to each address is made by ``connect`` below.
        if len(self.urls) > 1 and self.connection_attempt and not self._close_called:
            lost = self.url
            self._current = (self._current + 1) % len(self.urls)
            self.url = self.urls[self._current]
            log.warning(
                "broker %s is gone or does not answer; the next attempt goes to %s",
                mask_url(str(lost)),
                mask_url(str(self.url)),
            )
        await super()._on_connection_close(closing)


async def connect(settings: Settings, name: str) -> AbstractRobustConnection:
    """A robust connection to the first broker address that answers (settings' order). It
    reconnects by itself, to any of the addresses, and restores channels, queues and consumers."""
    try:
        urls = [url.get_secret_value() for url in settings.amqp_urls()]
    except ValueError as exc:
        raise ConfigurationError(str(exc)) from exc
    try:
        context = ssl_context(settings)
    except (OSError, ValueError) as exc:
        raise ConfigurationError(f"cannot set up TLS: {exc}") from exc
    failures: list[str] = []
    for first, url in enumerate(urls):
        conn = FailoverConnection(
            urls,
            first,
            ssl_context=context,
            client_properties={"connection_name": name},
        )
        try:
            await conn.connect(timeout=settings.connect_timeout)
        except BROKER_ERRORS as exc:
            await conn.close()
            failures.append(f"{mask_url(url)}: {exc.__class__.__name__}: {exc}")
            continue
        except BaseException:
            await conn.close()  # its reconnect task, when the caller gives up (cancels)
            raise
        if first:
            log.warning("connected to broker %s; the ones before it did not answer", mask_url(url))
        return conn
    raise BrokerError(f"cannot connect to {'; '.join(failures)}")


@asynccontextmanager
async def connection(settings: Settings, name: str) -> AsyncIterator[AbstractRobustConnection]:
    conn = await connect(settings, name)
    try:
        yield conn
    finally:
        await conn.close()


async def close_quietly(channel: AbstractChannel) -> None:
    """Close ``channel``; a broken one is already as good as closed."""
    try:
        await channel.close()
    except BROKER_ERRORS as exc:
        log.debug("channel closed with %s", exc)


async def confirm_channel(
    conn: AbstractRobustConnection, prefetch: int | None = None
) -> AbstractChannel:
    try:
        channel = await conn.channel(publisher_confirms=True, on_return_raises=True)
        if prefetch is not None:
            await channel.set_qos(prefetch_count=prefetch)
    except BROKER_ERRORS as exc:
        raise BrokerError(f"cannot open a channel: {exc}") from exc
    return channel


def is_connected(conn: AbstractRobustConnection) -> bool:
    """True while the connection is up (False during a reconnect)."""
    connected = getattr(conn, "connected", None)
    if isinstance(connected, asyncio.Event):
        return connected.is_set() and not conn.is_closed
    return not conn.is_closed


def on_reconnect(conn: AbstractRobustConnection, callback: Callable[[], None]) -> None:
    """Call ``callback`` each time ``conn`` has re-established itself."""
    conn.reconnect_callbacks.add(lambda _sender: callback())


#: What :func:`consume_bodies` hands on: a message's AMQP ``type`` and its body.
BodyCallback = Callable[[str | None, bytes], Awaitable[None]]


async def consume_bodies(queue: AbstractQueue, callback: BodyCallback) -> None:
    """Consume ``queue`` with no acks, handing ``callback`` each message's type and body: no
    aio-pika message object and one task less per message than ``queue.consume`` (a fifth less
    of the scheduler's CPU per heartbeat, ``python -m bench --scale``), for a queue of many
    small messages nobody acks: workers' heartbeats. Consumes again each time its channel is
    restored (after a channel error or a reconnect), once the channel has declared and bound
    the queue again."""
    channel = queue.channel

    async def deliver(msg: aiormq.abc.DeliveredMessage) -> None:
        await callback(msg.header.properties.message_type, msg.body)

    async def consume() -> None:
        underlay = await channel.get_underlay_channel()
        await underlay.basic_consume(queue.name, deliver, no_ack=True)

    async def restored(_sender: object) -> None:
        try:
            await consume()
        except BROKER_ERRORS as exc:  # the next restore consumes again
            log.warning("could not consume %s again: %s", queue.name, exc)

    await consume()
    if isinstance(channel, AbstractRobustChannel):
        channel.reopen_callbacks.add(restored)


def message(
    body: bytes,
    kind: Kind,
    *,
    correlation_id: str | None = None,
    reply_to: str | None = None,
    message_id: str | None = None,
    persistent: bool = True,
    headers: Mapping[str, Any] | None = None,
) -> aio_pika.Message:
    return aio_pika.Message(
        body,
        content_type=CONTENT_TYPE,
        type=kind.value,
        correlation_id=correlation_id,
        reply_to=reply_to,
        message_id=message_id,
        delivery_mode=DeliveryMode.PERSISTENT if persistent else DeliveryMode.NOT_PERSISTENT,
        headers=dict(headers) if headers else None,
    )


async def publish(
    exchange: AbstractExchange,
    msg: aio_pika.Message,
    routing_key: str,
    *,
    mandatory: bool = False,
    timeout: float = PUBLISH_TIMEOUT,
) -> None:
    """Publish and wait for the broker's confirm; raise :class:`BrokerError` if none comes."""
    try:
        await exchange.publish(msg, routing_key, mandatory=mandatory, timeout=timeout)
    except aio_pika.exceptions.PublishError as exc:
        raise BrokerError(f"message to {routing_key!r} was not routed: {exc}") from exc
    except BROKER_ERRORS as exc:
        raise BrokerError(f"publish to {routing_key!r} failed: {exc.__class__.__name__}") from exc


def refused(exc: BaseException) -> bool:
    """Whether a failed :func:`publish` was refused by the broker (a nack): some destination did
    not take the message. With several destinations (a ``BCC``), the others may have."""
    return isinstance(exc.__cause__, aio_pika.exceptions.DeliveryError)


class Refusals:
    """When to publish on a new channel. After a queue's leader moved to another node, RabbitMQ
    3.10 can go on refusing (nacking) every publish of a channel that was restored, for 20 s or
    more, while a new channel on the same connection works: after ``limit`` refusals within
    ``window`` seconds, replace the channel (at most once a ``window``). Pure: no I/O."""

    def __init__(self, limit: int = 3, window: float = 2.0) -> None:
        self.limit = limit
        self.window = window
        self._at: list[float] = []
        self._replaced_at = float("-inf")

    def refused(self, now: float) -> bool:
        """A publish was refused at ``now``: whether to replace the channel now."""
        self._at = [t for t in self._at if t > now - self.window] + [now]
        if len(self._at) < self.limit or now <= self._replaced_at + self.window:
            return False
        self._replaced_at = now
        self._at.clear()
        return True


async def replacement_channel(conn: AbstractRobustConnection) -> AbstractChannel | None:
    """A new confirm channel to publish on, after :class:`Refusals` (None: it could not be
    opened, which is logged; the old one stays)."""
    try:
        channel = await confirm_channel(conn)
    except BrokerError as exc:
        log.warning("could not open a new channel to publish on: %s", exc)
        return None
    log.warning("publishes were refused: publishing on a new channel")
    return channel


async def retire(channel: AbstractChannel | None, keep: AbstractChannel | None = None) -> None:
    """Close ``channel``, no longer published on (replaced after :class:`Refusals`), once what
    was published on it is settled; not if it is ``keep`` (it consumes too)."""
    if channel is None or channel is keep:
        return
    await asyncio.sleep(PUBLISH_TIMEOUT)
    await close_quietly(channel)


@dataclass(frozen=True)
class MessageCopy:
    """The parts of a message a dead-letter copy is made of, for a message that is one part of
    another (a task of a ``task_batch``)."""

    body: bytes
    headers: dict[str, Any]
    type: str | None
    reply_to: str | None
    correlation_id: str | None
    content_type: str | None
    message_id: str | None


def dead_letter_message(
    incoming: IncomingMessage | MessageCopy,
    *,
    reason: str,
    error: str,
    source: str,
    capability: str | None = None,
    task_id: str | None = None,
    attempts: int | None = None,
) -> aio_pika.Message:
    """A copy of ``incoming`` for the dead-letter queue, its reason and origin in the headers."""
    headers: dict[str, Any] = dict(incoming.headers or {})
    headers.update(
        {
            H_DEAD_ID: uuid.uuid4().hex,
            H_REASON: reason,
            H_ERROR: error[:2000],
            H_SOURCE: source,
            H_ORIGINAL_TYPE: incoming.type or "",
            H_ORIGINAL_REPLY_TO: incoming.reply_to or "",
            H_ORIGINAL_CORRELATION_ID: incoming.correlation_id or "",
        }
    )
    if capability:
        headers[H_CAPABILITY] = capability
    if task_id:
        headers[H_TASK_ID] = task_id
    if attempts is not None:
        headers[H_ATTEMPTS] = attempts
    return aio_pika.Message(
        incoming.body,
        content_type=incoming.content_type,
        type=incoming.type,
        correlation_id=incoming.correlation_id,
        reply_to=incoming.reply_to,
        message_id=incoming.message_id,
        delivery_mode=DeliveryMode.PERSISTENT,
        headers=headers,
        timestamp=datetime.now(UTC),
    )


def death_reason(incoming: IncomingMessage) -> str:
    """Why the broker dead-lettered ``incoming`` (``delivery_limit``, ``expired``...)."""
    deaths = (incoming.headers or {}).get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        return str(deaths[0].get("reason", "unknown"))
    return "unknown"


async def settle(incoming: IncomingMessage, *, requeue: bool | None = None) -> None:
    """Ack (``requeue`` None) or nack; a broken channel is logged, not raised: the broker will
    redeliver the message, which is what at-least-once wants."""
    try:
        if requeue is None:
            await incoming.ack()
        else:
            await incoming.nack(requeue=requeue)
    except SETTLE_ERRORS as exc:
        log.warning("could not settle message %s: %s", incoming.message_id, exc)
