"""The scheduler's journal: a RabbitMQ stream of its decisions, replayed by a scheduler that
starts, so a restart forgets nothing within the retention window: no second answer, no lost
deadline, no forgotten cancel or idempotency key.

Dispatches and answers are journaled by the very publish that makes them: the stream is a second
destination of the same message (a ``BCC`` header). That is not all-or-nothing when a broker node
fails: RabbitMQ can refuse (nack) such a publish while one destination took it, and can hold a
stream write unconfirmed for good when the stream's leader moves. The scheduler repairs both (see
``Scheduler._finish_nowait``) with separate writes here: :meth:`Journal.copy_answers`. Other
records (cancels, liveness, worker events) are appended as JSON lines, group-committed: records
that arrive while a publish awaits its confirm go together in the next message. Every write here
that is refused or not confirmed within :data:`WRITE_TIMEOUT` is made again on a new channel: a
second copy of an entry is harmless, applying entries is idempotent."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractQueue, AbstractRobustConnection

from .. import transport
from ..errors import AmqpschedError, BrokerError
from ..protocol import Kind
from ..topology import Topology
from .outbox import answer_batch_body
from .readback import Unread

log = logging.getLogger("amqpsched.journal")

Record = dict[str, Any]
#: Messages journaled by the publish that sends them (a ``BCC``); the rest are JSON lines.
JOURNALED_KINDS = frozenset({Kind.TASK, Kind.ANSWER, Kind.TASK_BATCH, Kind.ANSWER_BATCH})


#: Seconds a journal write waits for its confirm before it is made again on a new channel.
WRITE_TIMEOUT = 5.0
#: Attempts of one journal write.
WRITE_ATTEMPTS = 3
#: The journal reader acks entries together (``multiple``): after this many (its prefetch is
#: 1,000), or :data:`ACK_IDLE` seconds after the first unacked one: one ack less per entry.
ACK_EVERY = 200
ACK_IDLE = 0.2
#: An ack on a channel closed meanwhile (RuntimeError: its connection is closed).
_ACK_ERRORS: tuple[type[BaseException], ...] = (*transport.SETTLE_ERRORS, RuntimeError)


def cancelled(task_id: str, until: float) -> Record:
    return {"k": "cancelled", "task_id": task_id, "until": until}


class Journal:
    def __init__(
        self,
        channel: AbstractChannel,
        topology: Topology,
        scheduler_id: str | None = None,
        new_channel: Callable[[], Awaitable[AbstractChannel]] | None = None,
    ) -> None:
        """``new_channel``: opens a channel to write on when a write on ``channel`` fails (None:
        each write is tried once)."""
        self.channel = channel
        self.topology = topology
        self._headers = {transport.H_SCHEDULER: scheduler_id} if scheduler_id else None
        self._new_channel = new_channel
        self._replacing: asyncio.Future[None] | None = None
        self._batch: list[tuple[Record, asyncio.Future[None]]] = []
        self._flusher: asyncio.Future[None] | None = None
        #: Writes not read back from the journal yet (None: not tracked).
        self.unread: Unread | None = None

    async def rewrite(self, body: bytes, kind: str) -> None:
        """Write an entry again (confirmed once, but not stored)."""
        await self._write(body, Kind(kind))

    async def copy_answers(self, answers: list[bytes]) -> None:
        """Journal encoded answers on their own (not by the publish that sent them): one
        ``answer_batch`` entry. Return once the broker confirmed it."""
        await self._write(answer_batch_body([("", a) for a in answers]), Kind.ANSWER_BATCH)

    async def _write(self, body: bytes, kind: Kind) -> None:
        for attempt in range(1, WRITE_ATTEMPTS + 1):
            channel = self.channel
            if self.unread is not None:
                self.unread.sent(body, kind, time.monotonic())
            try:
                await transport.publish(
                    channel.default_exchange,
                    transport.message(body, kind, persistent=True, headers=self._headers),
                    self.topology.journal_queue,
                    mandatory=True,
                    timeout=WRITE_TIMEOUT if self._new_channel else transport.PUBLISH_TIMEOUT,
                )
                if self.unread is not None:
                    self.unread.confirmed(body, kind, time.monotonic())
                return
            except BrokerError as exc:
                if self.unread is not None:
                    self.unread.failed(body, kind)
                if attempt == WRITE_ATTEMPTS or self._new_channel is None:
                    raise
                log.warning("journal write failed (%s): writing again on a new channel", exc)
                await self._replace(channel)

    async def _replace(self, failed: AbstractChannel) -> None:
        """Write on a new channel from now on, unless another write replaced ``failed`` already
        (one replacement for every write that failed on it)."""
        if self._replacing is None or self._replacing.done():
            if self.channel is not failed:
                return
            self._replacing = asyncio.ensure_future(self._open(failed))
        await asyncio.shield(self._replacing)

    async def _open(self, failed: AbstractChannel) -> None:
        assert self._new_channel is not None
        try:
            self.channel = await self._new_channel()
        except (AmqpschedError, RuntimeError) as exc:  # RuntimeError: the connection is closed
            log.warning("could not open a journal channel: %s", exc)
            await asyncio.sleep(0.5)
            return
        await transport.close_quietly(failed)

    async def append(self, record: Record) -> None:
        """Return once the broker has confirmed the record is stored."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._batch.append((record, fut))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.ensure_future(self._flush())
        await fut

    async def _flush(self) -> None:
        while self._batch:
            batch, self._batch = self._batch, []
            body = "\n".join(json.dumps(r, separators=(",", ":")) for r, _ in batch).encode()
            try:
                await self._write(body, Kind.JOURNAL)
            except BrokerError as exc:
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for _, fut in batch:
                if not fut.done():
                    fut.set_result(None)


Apply = Callable[[str, bytes, str | None], None]


class JournalReader:
    """Reads the journal oldest first, calling ``apply(kind, body, origin)`` on each entry:
    kind ``task``/``task_batch`` (dispatches), ``answer``/``answer_batch``, or ``record`` (one
    JSON line); ``origin`` is the id of the scheduler that wrote it (None if unknown).

    :meth:`read` returns once the end is reached. The end is found by appending a marker first
    and reading until it comes back; then entries go on being applied until none has come for
    ``settle`` seconds, because a scheduler that was just killed may have publishes still on
    their way into the stream behind the marker. With ``follow``, it goes on reading what other
    schedulers write, until :meth:`close`."""

    def __init__(self, conn: AbstractRobustConnection, topology: Topology, apply: Apply) -> None:
        self.conn = conn
        self.topology = topology
        self.apply = apply
        self.count = 0
        #: Stream offset of the last entry applied: what a restored consumer delivers again is
        #: skipped.
        self.offset = -1
        self._marker = uuid.uuid4().hex
        self._done = asyncio.Event()
        self._arrived = asyncio.Event()
        self._channel: AbstractChannel | None = None
        self._queue: AbstractQueue | None = None
        self._tag: str | None = None
        #: The last entry applied and not acked yet, how many are unacked, the timer to ack them.
        self._unacked: aio_pika.abc.AbstractIncomingMessage | None = None
        self._unacked_count = 0
        self._ack_timer: asyncio.TimerHandle | None = None
        self._acks: set[asyncio.Future[None]] = set()

    async def read(
        self,
        *,
        follow: bool = False,
        since: float | None = None,
        timeout: float = 120.0,
        settle: float = 0.3,
    ) -> int:
        """Read to the end (from ``since``, a Unix time: the stream is read from the chunk
        holding that moment). Return the count of entries applied."""
        try:
            self._channel = channel = await self.conn.channel(publisher_confirms=True)
            await channel.set_qos(prefetch_count=1000)
            self._queue = queue = await channel.get_queue(self.topology.journal_queue)
            await transport.publish(
                channel.default_exchange,
                aio_pika.Message(json.dumps({"k": "marker", "id": self._marker}).encode()),
                self.topology.journal_queue,
                mandatory=True,
            )
            start: str | datetime = "first" if since is None else datetime.fromtimestamp(since, UTC)
            self._tag = await queue.consume(self._on_message, arguments={"x-stream-offset": start})
            await asyncio.wait_for(self._done.wait(), timeout)
            quiet_until = time.monotonic() + 10 * settle
            while time.monotonic() < quiet_until:
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), settle)
                except TimeoutError:
                    break  # quiet: the journal is read
        except transport.BROKER_ERRORS as exc:
            await self.close()
            raise BrokerError(f"cannot read the journal: {exc}") from exc
        except BaseException:
            await self.close()
            raise
        if not follow:
            await self.close()
        return self.count

    async def close(self) -> None:
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None
        self._unacked = None
        channel, self._channel = self._channel, None
        if channel is None or channel.is_closed:
            return
        try:
            if self._queue is not None and self._tag is not None:
                await self._queue.cancel(self._tag)
            await channel.close()
        except transport.BROKER_ERRORS as exc:
            log.debug("journal reader closed with %s", exc)

    async def _on_message(self, msg: aio_pika.abc.AbstractIncomingMessage) -> None:
        # Entries are applied before the first await, so in delivery order.
        self._arrived.set()
        headers = msg.headers or {}
        offset = headers.get("x-stream-offset")
        if isinstance(offset, int):
            if offset <= self.offset:  # delivered again by a consumer restored after a reconnect
                self._settle(msg)
                return
            self.offset = offset
        origin = headers.get(transport.H_SCHEDULER)
        origin = origin if isinstance(origin, str) else None
        if msg.type in JOURNALED_KINDS:
            try:
                self.apply(msg.type, msg.body, origin)
                self.count += 1
            except Exception:
                log.exception("journal %s skipped", msg.type)
            self._settle(msg)
            return
        for line in msg.body.splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                log.warning("unreadable journal line skipped")
                continue
            if record.get("k") == "marker":
                if record.get("id") == self._marker:
                    self._done.set()
                continue
            try:
                self.apply("record", line, origin)
                self.count += 1
            except Exception:
                log.exception("journal record skipped: %s", str(record)[:200])
        self._settle(msg)

    def _settle(self, msg: aio_pika.abc.AbstractIncomingMessage) -> None:
        """Ack ``msg`` and every entry before it, now or a little later (:data:`ACK_EVERY`)."""
        self._unacked = msg
        self._unacked_count += 1
        if self._unacked_count >= ACK_EVERY:
            self._ack()
        elif self._ack_timer is None:
            self._ack_timer = asyncio.get_running_loop().call_later(ACK_IDLE, self._ack)

    def _ack(self) -> None:
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None
        msg, self._unacked, self._unacked_count = self._unacked, None, 0
        if msg is None:
            return
        ack = asyncio.ensure_future(self._ack_up_to(msg))
        self._acks.add(ack)
        ack.add_done_callback(self._acks.discard)

    @staticmethod
    async def _ack_up_to(msg: aio_pika.abc.AbstractIncomingMessage) -> None:
        # On the channel that delivered it: after a reconnect that one is closed and the ack
        # fails, never acking a tag of the new channel; what was not acked comes again, and is
        # skipped by its offset.
        try:
            await msg.ack(multiple=True)
        except _ACK_ERRORS as exc:
            log.debug("journal entries not acked: %s", exc)


async def replay(
    conn: AbstractRobustConnection,
    topology: Topology,
    apply: Callable[[str, bytes], None],
    timeout: float = 120.0,
    settle: float = 0.3,
    since: float | None = None,
) -> int:
    """Read the journal to its end once (see :class:`JournalReader`)."""
    reader = JournalReader(conn, topology, lambda kind, body, _origin: apply(kind, body))
    return await reader.read(since=since, timeout=timeout, settle=settle)


#: ``take(kind, body, origin, offset, headers)`` on each dispatch entry read back; True: done.
Take = Callable[[str, bytes, str | None, int, dict[str, Any]], bool]


async def read_dispatches(
    conn: AbstractRobustConnection,
    topology: Topology,
    since: int,
    take: Take,
    *,
    timeout: float = 60.0,
) -> None:
    """Read the dispatch entries of the journal from offset ``since`` on, calling ``take`` on
    each, until it returns True or the end is reached: a marker appended first, so every entry
    written before the call is read."""
    done = asyncio.Event()
    marker = uuid.uuid4().hex.encode()
    closing = False

    async def on_message(msg: aio_pika.abc.AbstractIncomingMessage) -> None:
        if closing:
            return  # no frame on a channel being closed: the broker would close the connection
        headers = msg.headers or {}
        offset = headers.get("x-stream-offset")
        if done.is_set() or not isinstance(offset, int) or offset < since:
            pass
        elif msg.type in (Kind.TASK, Kind.TASK_BATCH):
            origin = headers.get(transport.H_SCHEDULER)
            origin = origin if isinstance(origin, str) else None
            try:
                if take(msg.type, msg.body, origin, offset, dict(headers)):
                    done.set()
            except Exception:
                log.exception("journal %s at %d skipped", msg.type, offset)
        elif marker in msg.body:
            done.set()
        await msg.ack()

    try:
        channel = await conn.channel(publisher_confirms=True)
    except transport.BROKER_ERRORS as exc:
        raise BrokerError(f"cannot read the journal: {exc}") from exc
    try:
        await channel.set_qos(prefetch_count=1000)
        await transport.publish(
            channel.default_exchange,
            aio_pika.Message(b'{"k":"marker","id":"' + marker + b'"}'),
            topology.journal_queue,
            mandatory=True,
        )
        queue = await channel.get_queue(topology.journal_queue, ensure=False)
        tag = await queue.consume(on_message, arguments={"x-stream-offset": since})
        try:
            await asyncio.wait_for(done.wait(), timeout)
        except TimeoutError:
            raise BrokerError(f"reading the journal from {since} took over {timeout}s") from None
        closing = True
        await queue.cancel(tag)
    except transport.BROKER_ERRORS as exc:
        raise BrokerError(f"cannot read the journal: {exc}") from exc
    finally:
        closing = True
        await transport.close_quietly(channel)
