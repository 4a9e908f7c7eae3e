"""``python -m bench --scale``: the scheduler's memory while many tasks wait for a capability no
worker serves, and its CPU while many simulated workers heartbeat (issue #6).

Targets: RSS within 50 MB of idle with the tasks waiting; heartbeats under 10 % of one core."""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import tempfile
import time
import uuid
from pathlib import Path

import aio_pika

from amqpsched import Client, Settings
from amqpsched.protocol import CapabilityInfo, Kind, WorkerAnnouncement
from amqpsched.topology import Topology

from .procs import ROOT, Proc, cpu_seconds

MEMORY_TARGET_MB = 50.0
CPU_TARGET_PCT = 10.0
HEARTBEAT_WINDOW_S = 20.0
IN_FLIGHT = 2000
TASK_TIMEOUT_S = 3600.0
#: Every simulated worker serves HB_CAPABILITY plus 0-2 of EXTRA_CAPABILITIES.
HB_CAPABILITY = "scale-hb"
EXTRA_CAPABILITIES = ["scale-a", "scale-b", "scale-c", "scale-d"]
#: The capability nobody serves: the tasks wait for it.
IDLE_CAPABILITY = "scale-nobody"


def _kb(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def _verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


class Announcer:
    """M simulated workers on one connection and one channel, no publisher confirms."""

    def __init__(self, url: str, namespace: str, workers: int, interval: float) -> None:
        self.url = url
        self.exchange_name = Topology(namespace).registry_exchange
        self.interval = interval
        rng = random.Random(6)
        host = socket.gethostname()
        self.workers = [
            WorkerAnnouncement(
                worker_id=f"scale-{i}-{uuid.uuid4().hex[:8]}",
                hostname=host,
                pid=100000 + i,
                capabilities=[
                    CapabilityInfo(name=name)
                    for name in [HB_CAPABILITY, *rng.sample(EXTRA_CAPABILITIES, rng.randint(0, 2))]
                ],
                concurrency=4,
                sent_at=0.0,
            )
            for i in range(workers)
        ]
        self.sent = 0

    async def __aenter__(self) -> Announcer:
        self.conn = await aio_pika.connect(self.url)
        channel = await self.conn.channel(publisher_confirms=False)
        self.exchange = await channel.get_exchange(self.exchange_name, ensure=False)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.conn.close()

    async def _announce(self, worker: WorkerAnnouncement, kind: Kind) -> None:
        body = worker.model_copy(update={"sent_at": time.time()}).model_dump_json().encode()
        msg = aio_pika.Message(body, type=str(kind), content_type="application/json")
        await self.exchange.publish(msg, routing_key="")
        self.sent += 1

    async def hello(self) -> None:
        for worker in self.workers:
            await self._announce(worker, Kind.HELLO)

    async def heartbeats(self, seconds: float) -> None:
        """One heartbeat per worker per interval, spread evenly over the interval."""
        slot = 0.05
        slots = max(1, round(self.interval / slot))
        start = time.monotonic()
        tick = 0
        while time.monotonic() - start < seconds:
            index = tick % slots
            for worker in self.workers[index::slots]:
                await self._announce(worker, Kind.HEARTBEAT)
            tick += 1
            await asyncio.sleep(max(0.0, start + tick * slot - time.monotonic()))


async def _registered(client: Client) -> int:
    for entry in await client.capabilities():
        if entry.name == HB_CAPABILITY:
            return entry.workers
    return 0


async def _submit_all(client: Client, tasks: int, in_flight: int) -> float:
    """Submit ``tasks`` tasks, ``in_flight`` submissions at a time; answers are not awaited."""
    left = tasks
    done = 0
    started = time.perf_counter()

    async def lane() -> None:
        nonlocal left, done
        while left > 0:
            left -= 1
            await client.submit(IDLE_CAPABILITY, "x", timeout=TASK_TIMEOUT_S)
            done += 1
            if done % 50_000 == 0:
                rate = done / (time.perf_counter() - started)
                print(f"bench: scale: {done:,} submitted ({rate:,.0f}/s)", flush=True)

    await asyncio.gather(*(lane() for _ in range(min(in_flight, tasks))))
    return time.perf_counter() - started


async def _all_dispatched(url: str, topology: Topology, tasks: int, timeout: float) -> int:
    """Wait until every task waits in its capability queue (the scheduler took and dispatched
    every submission); return the tasks not there yet (0: all)."""
    conn = await aio_pika.connect(url)
    try:
        channel = await conn.channel()
        deadline = time.monotonic() + timeout
        left = tasks
        shown = time.monotonic()
        while time.monotonic() < deadline:
            try:
                queue = await channel.declare_queue(
                    topology.capability_queue(IDLE_CAPABILITY), passive=True
                )
            except aio_pika.exceptions.ChannelNotFoundEntity:
                # Not declared yet: the scheduler declares it with its first dispatch. The
                # refusal closed the channel.
                channel = await conn.channel()
                await asyncio.sleep(0.2)
                continue
            left = tasks - (queue.declaration_result.message_count or 0)
            if left <= 0:
                return 0
            if time.monotonic() - shown > 30:
                print(f"bench: scale: {tasks - left:,} dispatched", flush=True)
                shown = time.monotonic()
            await asyncio.sleep(1)
        return left
    finally:
        await conn.close()


async def _queue_depth(url: str, name: str) -> int | None:
    conn = await aio_pika.connect(url)
    try:
        channel = await conn.channel()
        queue = await channel.declare_queue(name, passive=True)
        return queue.declaration_result.message_count
    except Exception:
        return None
    finally:
        await conn.close()


async def run_scale(args: argparse.Namespace) -> int:
    run_id = uuid.uuid4().hex[:8]
    namespace = f"bench{run_id}"
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix=f"bench-scale-{run_id}-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    interval = float(os.environ.get("AMQPSCHED_HEARTBEAT_INTERVAL", "2"))
    tasks, workers = args.scale_tasks, args.scale_workers
    print(
        f"bench: scale: {tasks:,} waiting tasks, {workers:,} simulated workers, heartbeat "
        f"interval {interval:g}s; cpus {os.cpu_count()}; run {run_id}; logs in {log_dir}",
        flush=True,
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.update(
        AMQPSCHED_AMQP_URL=args.amqp_url,
        AMQPSCHED_NAMESPACE=namespace,
        AMQPSCHED_HEARTBEAT_INTERVAL=f"{interval:g}",
    )
    topology = Topology(namespace)
    sched = Proc.python(["-m", "amqpsched.scheduler"], env, log_dir, "scale-scheduler")
    client: Client | None = None
    ok = True
    try:
        await sched.wait_for_output("consuming")
        pid = sched.pid
        client = Client(Settings(amqp_url=args.amqp_url, namespace=namespace))
        await client.connect()
        # 1. idle
        cpu0, t0 = cpu_seconds(pid), time.monotonic()
        await asyncio.sleep(5)
        idle_cpu = (cpu_seconds(pid) - cpu0) / (time.monotonic() - t0) * 100
        idle_rss = _kb(pid, "VmRSS")
        print(f"bench: scale: idle RSS {idle_rss:.1f} MB, idle CPU {idle_cpu:.1f} %", flush=True)

        # 2. waiting tasks (first: the heartbeats of 1,000 workers leave memory of their own)
        before_rss = _kb(pid, "VmRSS")
        elapsed = await _submit_all(client, tasks, IN_FLIGHT)
        submit_rate = tasks / elapsed
        print(f"bench: scale: {tasks:,} submitted in {elapsed:.0f}s ({submit_rate:,.0f}/s)")
        left = await _all_dispatched(args.amqp_url, topology, tasks, 1800)
        await asyncio.sleep(5)
        rss, hwm = _kb(pid, "VmRSS"), _kb(pid, "VmHWM")
        depth = await _queue_depth(args.amqp_url, topology.capability_queue(IDLE_CAPABILITY))

        # 3. heartbeats, while the tasks wait
        async with Announcer(args.amqp_url, namespace, workers, interval) as ann:
            await ann.hello()
            deadline = time.monotonic() + 30
            seen = 0
            while time.monotonic() < deadline and seen < workers:
                seen = await _registered(client)
                await asyncio.sleep(0.5)
            cpu0, t0 = cpu_seconds(pid), time.monotonic()
            sent0 = ann.sent
            await ann.heartbeats(HEARTBEAT_WINDOW_S)
            window = time.monotonic() - t0
            hb_cpu = (cpu_seconds(pid) - cpu0) / window * 100
            rate = (ann.sent - sent0) / window
            seen = await _registered(client)
        hb_rss = _kb(pid, "VmRSS")
        print(
            f"bench: scale: heartbeats {rate:,.0f}/s over {window:.0f}s: scheduler CPU "
            f"{hb_cpu:.1f} % of one core; {seen:,} of {workers:,} workers registered; "
            f"RSS {hb_rss:.1f} MB",
            flush=True,
        )

        alive = sched.popen.poll() is None

        delta, peak_delta = rss - idle_rss, hwm - idle_rss
        mem_ok = alive and left == 0 and peak_delta <= MEMORY_TARGET_MB
        cpu_ok = seen == workers and hb_cpu < CPU_TARGET_PCT
        ok = mem_ok and cpu_ok
        print()
        print(f"scale report (run {run_id}, {os.cpu_count()} cpus)")
        print(f"  scheduler idle RSS              {idle_rss:8.1f} MB (idle CPU {idle_cpu:.1f} %)")
        print(f"  RSS before submitting           {before_rss:8.1f} MB")
        label = f"RSS with {tasks:,} tasks waiting"
        print(f"  {label:31} {rss:8.1f} MB (delta {delta:+.1f} MB)")
        print(f"  peak RSS (VmHWM)                {hwm:8.1f} MB (delta {peak_delta:+.1f} MB)")
        print(f"  RSS after the heartbeats        {hb_rss:8.1f} MB")
        print(
            f"  submissions                     {submit_rate:8,.0f} tasks/s, {IN_FLIGHT} in flight"
        )
        print(f"  not dispatched yet              {left:8,}; capability queue depth {depth}")
        print(f"  memory target: peak within {MEMORY_TARGET_MB:.0f} MB of idle: {_verdict(mem_ok)}")
        print(
            f"  heartbeats: {workers:,} workers, {rate:,.0f}/s, scheduler {hb_cpu:.1f} % of one "
            f"core, {seen:,} registered"
        )
        print(f"  CPU target: under {CPU_TARGET_PCT:.0f} % of one core: {_verdict(cpu_ok)}")
        if tasks < 1_000_000 or workers < 1_000:
            print("  (smaller than the issue's 1,000,000 tasks / 1,000 workers)")
    finally:
        if client is not None:
            await client.close()
        await sched.stop()
        conn = await aio_pika.connect(args.amqp_url)
        try:
            await topology.delete_all(
                await conn.channel(), [IDLE_CAPABILITY, HB_CAPABILITY, *EXTRA_CAPABILITIES]
            )
        except Exception as exc:
            print(f"bench: scale: cleanup failed: {exc!r}", flush=True)
        finally:
            await conn.close()
    return 0 if ok else 1
