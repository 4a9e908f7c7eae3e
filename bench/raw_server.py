"""A bare aio-pika RPC server, the floor for a Python client: consume a quorum queue, publish
each reply to ``reply_to`` with the request's ``correlation_id`` (publisher confirms), ack the
request once the reply is confirmed. ``python -m bench.raw_server --queue NAME``."""

from __future__ import annotations

import argparse
import asyncio
import signal

import aio_pika
from aio_pika.abc import AbstractIncomingMessage, DeliveryMode


async def serve(url: str, queue_name: str, prefetch: int) -> None:
    conn = await aio_pika.connect(url)
    channel = await conn.channel(publisher_confirms=True)
    await channel.set_qos(prefetch_count=prefetch)
    queue = await channel.declare_queue(
        queue_name, durable=True, arguments={"x-queue-type": "quorum"}
    )
    exchange = channel.default_exchange

    async def on_request(msg: AbstractIncomingMessage) -> None:
        if msg.reply_to:
            reply = aio_pika.Message(
                msg.body,
                correlation_id=msg.correlation_id,
                content_type=msg.content_type,
                delivery_mode=DeliveryMode.PERSISTENT,
            )
            await exchange.publish(reply, msg.reply_to)
        await msg.ack()

    await queue.consume(on_request)
    print(f"raw server consuming {queue_name} (prefetch {prefetch})", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.raw_server", description=__doc__)
    parser.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--queue", required=True)
    parser.add_argument("--prefetch", type=int, default=64)
    args = parser.parse_args()
    asyncio.run(serve(args.url, args.queue, args.prefetch))


if __name__ == "__main__":
    main()
