"""``raw-aio-pika``: a bare RPC over a quorum queue with publisher confirms on both sides, no
scheduler. Client: one connection, one confirm channel, one exclusive reply queue, futures by
correlation id."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractIncomingMessage,
    DeliveryMode,
)

from .base import Context, System
from .workloads import Measurement, Workload, drive_async

PREFETCH = 64


class RawAioPika(System):
    name = "raw-aio-pika"

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.queue = f"bench{ctx.run_id}.raw"
        self._conn: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None
        self._reply_to = ""
        self._pending: dict[str, asyncio.Future[bytes]] = {}

    def describe(self) -> str:
        return f"1 server process, prefetch {PREFETCH}, quorum queue, confirms on every publish"

    async def start(self) -> None:
        server = self.spawn(
            [
                "-m",
                "bench.raw_server",
                "--url",
                self.ctx.amqp_url,
                "--queue",
                self.queue,
                "--prefetch",
                str(PREFETCH),
            ],
            "server",
        )
        await server.wait_for_output("consuming")
        self._conn = await aio_pika.connect(self.ctx.amqp_url)
        self._channel = await self._conn.channel(publisher_confirms=True)
        reply = await self._channel.declare_queue(exclusive=True, auto_delete=True)
        self._reply_to = reply.name
        await reply.consume(self._on_reply, no_ack=True)
        self._exchange = self._channel.default_exchange

    async def _on_reply(self, msg: AbstractIncomingMessage) -> None:
        fut = self._pending.pop(msg.correlation_id or "", None)
        if fut is not None and not fut.done():
            fut.set_result(msg.body)

    async def call(self, payload: Any) -> Any:
        """A text payload goes as its bytes; any other as JSON (``--payload-shape rows``), which
        a client of any RPC has to encode and decode."""
        assert self._exchange is not None
        corr = uuid.uuid4().hex
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._pending[corr] = fut
        msg = aio_pika.Message(
            payload.encode() if isinstance(payload, str) else json.dumps(payload).encode(),
            correlation_id=corr,
            reply_to=self._reply_to,
            delivery_mode=DeliveryMode.PERSISTENT,
        )
        await self._exchange.publish(msg, self.queue, mandatory=True)
        body = await asyncio.wait_for(fut, 120)
        return body.decode() if isinstance(payload, str) else json.loads(body)

    async def run(self, w: Workload, payload: Any) -> Measurement:
        return await drive_async(self.call, payload, w.tasks, w.in_flight, w.pause)

    async def stop(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None
        await self.stop_procs()
        await self.delete_amqp([self.queue])
