"""``python -m bench --hops``: how long one hop through the broker takes, publish (with a
confirm) to delivery, one message at a time, through a quorum queue and through a classic one.

Why: a task's sequential round trip is a chain of such hops. The raw aio-pika RPC crosses one
quorum queue (the request) and one classic queue (the reply); amqpsched's critical path crosses
two quorum queues (``tasks.submit``, the capability queue) and one classic queue (the direct
answer). Their sum, with no Python work on the way, is the floor of the ratio of the two round
trips. Rounds alternate between the kinds, so a slow moment of the machine hits both.

Then it sends hops back to back for a while, through each kind, and reports the slow ones (over
``SLOW_US``) and how they bunch: bursts of slow hops that recur every second or two set the
sequential p99 of every system on this broker, the bare RPC's included."""

from __future__ import annotations

import argparse
import asyncio
import itertools
import time
import uuid

import aio_pika
from aio_pika.abc import AbstractIncomingMessage, DeliveryMode
from pamqp.common import FieldTable

from .workloads import percentile

KINDS = ("quorum", "classic")
ROUNDS = 4
PER_ROUND = 400
#: A hop slower than this (µs) is slow; slow hops less than BURST_GAP seconds apart are a burst.
SLOW_US = 5000.0
BURST_GAP = 0.5
STALL_SECONDS = 8.0


def bursts(timed: list[tuple[float, float]], slow_us: float, gap: float) -> list[list[float]]:
    """The start times of the slow hops of ``timed`` ((start in s, hop in µs), in order),
    grouped into bursts: a slow hop within ``gap`` seconds of the previous slow one joins its
    burst."""
    groups: list[list[float]] = []
    for start, hop in timed:
        if hop <= slow_us:
            continue
        if groups and start - groups[-1][-1] <= gap:
            groups[-1].append(start)
        else:
            groups.append([start])
    return groups


async def _hops(url: str, kind: str, count: int, seconds: float = 0.0) -> list[tuple[float, float]]:
    """``count`` hops (or as many as fit in ``seconds``) through a new queue of ``kind``: each
    one's start (perf_counter seconds) and length (microseconds)."""
    producer = await aio_pika.connect(url)
    consumer = await aio_pika.connect(url)
    try:
        publish_channel = await producer.channel(publisher_confirms=True)
        consume_channel = await consumer.channel()
        name = f"bench.hops.{kind}.{uuid.uuid4().hex[:8]}"
        arguments: FieldTable = {"x-queue-type": "quorum"} if kind == "quorum" else {}
        queue = await consume_channel.declare_queue(name, durable=True, arguments=arguments)
        arrived: asyncio.Queue[float] = asyncio.Queue()

        async def on_message(msg: AbstractIncomingMessage) -> None:
            arrived.put_nowait(time.perf_counter())
            await msg.ack()

        tag = await queue.consume(on_message)
        hops: list[tuple[float, float]] = []
        until = time.perf_counter() + seconds
        try:
            while len(hops) < count or time.perf_counter() < until:
                sent = time.perf_counter()
                message = aio_pika.Message(b"x" * 100, delivery_mode=DeliveryMode.PERSISTENT)
                await publish_channel.default_exchange.publish(message, name, mandatory=True)
                hops.append((sent, (await asyncio.wait_for(arrived.get(), 30) - sent) * 1e6))
        finally:
            await queue.cancel(tag)
            await queue.delete(if_unused=False, if_empty=False)
        return hops
    finally:
        await producer.close()
        await consumer.close()


async def run_hops(args: argparse.Namespace) -> int:
    count = 50 if args.quick else PER_ROUND
    rounds = 1 if args.quick else ROUNDS
    hops: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for _ in range(rounds):
        for kind in KINDS:
            hops[kind] += [hop for _, hop in await _hops(args.amqp_url, kind, count)]
    ordered = {kind: sorted(values) for kind, values in hops.items()}
    p50 = {kind: percentile(values, 0.5) for kind, values in ordered.items()}
    print(f"hops: publish (confirmed) to delivery, one message at a time, {rounds} x {count} each")
    for kind, values in ordered.items():
        print(
            f"  {kind:8} p50 {p50[kind]:6.0f} µs   p90 {percentile(values, 0.9):6.0f} µs   "
            f"p99 {percentile(values, 0.99):6.0f} µs"
        )
    raw = p50["quorum"] + p50["classic"]
    ours = 2 * p50["quorum"] + p50["classic"]
    print(
        f"  floor of the sequential ratio (hops only): amqpsched 2 quorum + 1 classic = "
        f"{ours:.0f} µs; raw RPC 1 quorum + 1 classic = {raw:.0f} µs; x{ours / raw:.2f}"
    )
    seconds = 1.0 if args.quick else STALL_SECONDS
    for kind in KINDS:
        timed = await _hops(args.amqp_url, kind, 1, seconds)
        found = bursts(timed, SLOW_US, BURST_GAP)
        slow = sum(len(burst) for burst in found)
        starts = [burst[0] for burst in found]
        apart = sorted(b - a for a, b in itertools.pairwise(starts))
        spacing = f"; {percentile(apart, 0.5):.2f} s apart (median)" if apart else ""
        print(
            f"  stalls: {len(timed)} {kind} hops back to back in {seconds:.0f} s: {slow} over "
            f"{SLOW_US / 1000:.0f} ms ({100 * slow / len(timed):.1f} %), in {len(found)} "
            f"bursts{spacing}"
        )
    return 0
