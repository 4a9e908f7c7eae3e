"""amqpsched as users run it: the scheduler and worker CLIs, the client SDK, default settings
(quorum queues, publisher confirms, acks after effect, INFO logging)."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator
from typing import Any, cast

import aio_pika

from amqpsched import Client, Settings
from amqpsched.client import answer_value
from amqpsched.protocol import Answer
from amqpsched.retry import DELAY_STEPS_MS
from amqpsched.topology import Topology

from .base import System
from .procs import BenchError
from .workloads import Measurement, Workload, drive_async

CAPABILITY = "echo"
#: Seconds within which each task's answer is due.
TASK_TIMEOUT = 120.0


def has_map() -> bool:
    return hasattr(Client, "map")


class Amqpsched(System):
    name = "amqpsched"

    #: Direct answers (protocol section 16): a lone succeeded task answered by its worker.
    direct_answers = True
    #: The scheduler's and workers' event loop (``AMQPSCHED_EVENT_LOOP``).
    event_loop = "asyncio"

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        suffix = ("" if self.direct_answers else "nd") + (
            "" if self.event_loop == "auto" else "aio"
        )
        self.namespace = f"bench{ctx.run_id}{suffix}"
        self.settings = Settings(
            amqp_url=ctx.amqp_url, namespace=self.namespace, direct_answers=self.direct_answers
        )
        self.client: Client | None = None
        self.scheduler_pids: list[int] = []
        self.worker_pids: list[int] = []

    def describe(self) -> str:
        return (
            f"{self.ctx.amqpsched_schedulers} scheduler(s) + {self.ctx.amqpsched_workers} worker "
            f"process(es) x concurrency {self.ctx.amqpsched_concurrency}, client SDK (one "
            "connection)"
        )

    def unsupported(self, w: Workload) -> str | None:
        return "see amqpsched-map" if w.name == "map" else None

    async def start(self) -> None:
        env = self.ctx.env(
            AMQPSCHED_AMQP_URL=self.ctx.amqp_url,
            AMQPSCHED_NAMESPACE=self.namespace,
            AMQPSCHED_DIRECT_ANSWERS=str(self.direct_answers).lower(),
            AMQPSCHED_EVENT_LOOP=self.event_loop,
        )
        # Side by side, each follows the others through the journal (cluster mode); the first
        # declares the topology before the others start.
        first = self.spawn(["-m", "amqpsched.scheduler"], "scheduler", env)
        await first.wait_for_output("consuming")
        others = [
            self.spawn(["-m", "amqpsched.scheduler"], f"scheduler{i}", env)
            for i in range(1, self.ctx.amqpsched_schedulers)
        ]
        for sched in others:
            await sched.wait_for_output("consuming")
        self.scheduler_pids = [first.pid, *(s.pid for s in others)]
        workers = [
            self.spawn(
                [
                    "-m",
                    "amqpsched.worker",
                    "--capability",
                    CAPABILITY,
                    "--concurrency",
                    str(self.ctx.amqpsched_concurrency),
                ],
                f"worker{i}",
                env,
            )
            for i in range(self.ctx.amqpsched_workers)
        ]
        for worker in workers:
            await worker.wait_for_output("consuming")
        self.worker_pids = [w.pid for w in workers]
        self.client = Client(self.settings)
        await self.client.connect()
        await self._wait_for_workers(len(workers))

    async def _wait_for_workers(self, count: int) -> None:
        assert self.client is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            for entry in await self.client.capabilities():
                if entry.name == CAPABILITY and entry.workers >= count:
                    return
            await asyncio.sleep(0.1)
        raise BenchError(f"the scheduler did not see {count} echo worker(s) in 30s")

    def roles(self) -> dict[str, list[int]]:
        return {"scheduler": self.scheduler_pids, "worker": self.worker_pids}

    async def call(self, payload: str) -> Any:
        assert self.client is not None
        return await self.client.call(CAPABILITY, payload, timeout=TASK_TIMEOUT)

    async def run(self, w: Workload, payload: str) -> Measurement:
        return await drive_async(self.call, payload, w.tasks, w.in_flight, w.pause)

    async def stop(self) -> None:
        if self.client is not None:
            await self.client.close()
            self.client = None
        await self.stop_procs()
        topology = Topology(self.namespace)
        conn = await aio_pika.connect(self.ctx.amqp_url)
        try:
            await topology.delete_all(await conn.channel(), [CAPABILITY])
            return
        except Exception as exc:  # fall back to one channel per name below
            print(f"bench: amqpsched: delete_all failed ({exc!r}); deleting name by name")
        finally:
            await conn.close()
        await self.delete_amqp(
            [
                topology.submit_queue,
                topology.results_queue,
                topology.dead_letter_queue,
                topology.journal_queue,
                topology.capability_queue(CAPABILITY),
                *(topology.delay_queue(ms) for ms in DELAY_STEPS_MS),
            ],
            [
                topology.tasks_exchange,
                topology.registry_exchange,
                topology.dead_letter_exchange,
                topology.delay_exchange,
                topology.control_exchange,
            ],
        )


class AmqpschedNoDirect(Amqpsched):
    """Every answer from the scheduler (``AMQPSCHED_DIRECT_ANSWERS=false``), one hop more: what
    direct answers save, for the workloads where tasks travel alone."""

    name = "amqpsched-nodirect"
    direct_answers = False

    def unsupported(self, w: Workload) -> str | None:
        alone = w.name in ("latency", "paced") or (w.name == "throughput" and w.in_flight == 1)
        return None if alone else "one task at a time only"


class AmqpschedUvloop(Amqpsched):
    """The scheduler and workers on uvloop (``AMQPSCHED_EVENT_LOOP=uvloop``, from the bench
    extra) instead of asyncio's own loop: what uvloop would save."""

    name = "amqpsched-uvloop"
    event_loop = "uvloop"

    def unsupported(self, w: Workload) -> str | None:
        if w.name in ("latency", "paced"):
            return None
        if w.name == "throughput" and w.in_flight in (1, 1000) and w.payload_bytes <= 100:
            return None
        return "sequential and 1 or 1,000 in flight only"


class AmqpschedMap(Amqpsched):
    """The batch API (``Client.map``); skipped while the client has none."""

    name = "amqpsched-map"

    @classmethod
    def unavailable(cls) -> str | None:
        return None if has_map() else "not implemented (amqpsched.Client has no map method)"

    def unsupported(self, w: Workload) -> str | None:
        return None if w.name == "map" else "map only"

    async def run(self, w: Workload, payload: str) -> Measurement:
        assert self.client is not None
        payloads = [payload] * w.tasks
        started = time.perf_counter()
        results = await _collect(self.client.map(CAPABILITY, payloads, timeout=TASK_TIMEOUT))
        elapsed = time.perf_counter() - started
        if len(results) != w.tasks or any(r != payload for r in results):
            raise BenchError(f"map answered {len(results)} result(s), not {w.tasks} echoes")
        return Measurement(w.tasks, elapsed)


async def _collect(outcome: Any) -> list[Any]:
    """The results of ``Client.map``, whether it returns a list, an awaitable or an async
    iterator (the API is not fixed yet)."""
    if inspect.isawaitable(outcome):
        outcome = await outcome
    if hasattr(outcome, "__aiter__"):
        return [_value(item) async for item in cast(AsyncIterator[Any], outcome)]
    return [_value(item) for item in outcome]


def _value(item: Any) -> Any:
    """A result, or the result of an answer."""
    return answer_value(item) if isinstance(item, Answer) else item
