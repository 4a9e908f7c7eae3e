"""The scheduler's journal: a RabbitMQ stream of its decisions, replayed by a scheduler that
starts, so a restart forgets nothing within the retention window: no second answer, no lost
deadline, no forgotten cancel or idempotency key.

Dispatches and answers are journaled by the very publish that makes them: the stream is a second
destination of the same message (a ``BCC`` header), so a message and its journal record exist
together or not at all. Other records (cancels) are appended as JSON lines, group-committed:
records that arrive while a publish awaits its confirm go together in the next message."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractRobustConnection

from .. import transport
from ..errors import BrokerError
from ..protocol import Kind
from ..topology import Topology

log = logging.getLogger("amqpsched.journal")

Record = dict[str, Any]
#: Messages journaled by the publish that sends them (a ``BCC``); the rest are JSON lines.
JOURNALED_KINDS = frozenset({Kind.TASK, Kind.ANSWER, Kind.TASK_BATCH, Kind.ANSWER_BATCH})


def cancelled(task_id: str, until: float) -> Record:
    return {"k": "cancelled", "task_id": task_id, "until": until}


class Journal:
    def __init__(self, channel: AbstractChannel, topology: Topology) -> None:
        self.channel = channel
        self.topology = topology
        self._batch: list[tuple[Record, asyncio.Future[None]]] = []
        self._flusher: asyncio.Future[None] | None = None

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
                await transport.publish(
                    self.channel.default_exchange,
                    transport.message(body, Kind.JOURNAL, persistent=True),
                    self.topology.journal_queue,
                    mandatory=True,
                )
            except BrokerError as exc:
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for _, fut in batch:
                if not fut.done():
                    fut.set_result(None)


async def replay(
    conn: AbstractRobustConnection,
    topology: Topology,
    apply: Callable[[str, bytes], None],
    timeout: float = 120.0,
    settle: float = 0.3,
    since: float | None = None,
) -> int:
    """Read the whole journal, oldest first, calling ``apply(kind, body)`` on each record: kind
    ``task`` (a dispatch), ``answer``, or ``record`` (one JSON line). Return the count. The end is
    found by appending a marker first and reading until it comes back; then records go on being
    applied until none has come for ``settle`` seconds, because a scheduler that was just killed
    may have publishes still on their way into the stream behind the marker. With ``since`` (a
    Unix time), only from about then on: a stream is read from the chunk holding that moment."""
    channel = await conn.channel(publisher_confirms=True)
    marker = uuid.uuid4().hex
    count = 0
    done = asyncio.Event()
    arrived = asyncio.Event()
    try:
        await channel.set_qos(prefetch_count=1000)
        queue = await channel.get_queue(topology.journal_queue)
        await transport.publish(
            channel.default_exchange,
            aio_pika.Message(json.dumps({"k": "marker", "id": marker}).encode()),
            topology.journal_queue,
            mandatory=True,
        )

        async def on_message(msg: aio_pika.abc.AbstractIncomingMessage) -> None:
            # Records are applied before the first await, so in delivery order.
            nonlocal count
            arrived.set()
            if msg.type in JOURNALED_KINDS:
                try:
                    apply(msg.type, msg.body)
                    count += 1
                except Exception:
                    log.exception("journal %s skipped", msg.type)
                await msg.ack()
                return
            for line in msg.body.splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    log.warning("unreadable journal line skipped")
                    continue
                if record.get("k") == "marker":
                    if record.get("id") == marker:
                        done.set()
                    continue
                try:
                    apply("record", line)
                    count += 1
                except Exception:
                    log.exception("journal record skipped: %s", str(record)[:200])
            await msg.ack()

        # From the start, or from a moment (the stream's chunks are found by their timestamps).
        offset: str | datetime = "first" if since is None else datetime.fromtimestamp(since, UTC)
        tag = await queue.consume(on_message, arguments={"x-stream-offset": offset})
        try:
            await asyncio.wait_for(done.wait(), timeout)
            quiet_until = time.monotonic() + 10 * settle
            while time.monotonic() < quiet_until:
                arrived.clear()
                try:
                    await asyncio.wait_for(arrived.wait(), settle)
                except TimeoutError:
                    break  # quiet: the journal is read
        finally:
            await queue.cancel(tag)
    except transport.BROKER_ERRORS as exc:
        raise BrokerError(f"cannot read the journal: {exc}") from exc
    finally:
        await channel.close()
    return count
