"""Dramatiq: 2 worker processes x 8 threads, RabbitMQ broker (its defaults: classic queues, no
publisher confirms, acks after the actor ran), results in Redis; ``group`` for the map workload."""

from __future__ import annotations

import time
from typing import Any

from .base import Context, ThreadedSystem, require
from .workloads import Measurement, Workload, drive_window

PROCESSES = 2
THREADS = 8
RESULT_TIMEOUT_MS = 120_000


class DramatiqSystem(ThreadedSystem):
    name = "dramatiq"

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.queue = f"bench{ctx.run_id}_dramatiq"
        self.namespace = f"bench{ctx.run_id}"
        self.redis_url = ""
        self.broker: Any = None
        self.actor: Any = None

    @classmethod
    def unavailable(cls) -> str | None:
        return require("dramatiq") or require("pika") or require("redis")

    def describe(self) -> str:
        return f"{PROCESSES} processes x {THREADS} threads, RabbitMQ broker, Redis results"

    def unsupported(self, w: Workload) -> str | None:
        return None

    def roles(self) -> dict[str, list[int]]:
        roles = super().roles()
        redis = self.ctx.redis_pid()
        if redis is not None:
            roles["broker"] = [redis]  # RabbitMQ + Redis: Dramatiq's results live in Redis
        return roles

    async def start(self) -> None:
        self.redis_url = await self.ctx.redis_url()
        worker = self.spawn(
            [
                "-m",
                "dramatiq",
                "bench.dramatiq_app",
                "--processes",
                str(PROCESSES),
                "--threads",
                str(THREADS),
            ],
            "worker",
            self.ctx.env(
                BENCH_AMQP_URL=self.ctx.amqp_url,
                BENCH_REDIS_URL=self.redis_url,
                BENCH_DRAMATIQ_QUEUE=self.queue,
                BENCH_REDIS_NAMESPACE=self.namespace,
            ),
        )
        await worker.wait_for_output("Worker process is ready for action.", count=PROCESSES)

        from .dramatiq_app import make

        self.broker, self.actor = await self.in_thread(
            lambda: make(self.ctx.amqp_url, self.redis_url, self.queue, self.namespace)
        )

    def _send(self, payload: str) -> Any:
        return self.actor.send(payload)

    @staticmethod
    def _wait(message: Any) -> Any:
        return message.get_result(block=True, timeout=RESULT_TIMEOUT_MS)

    async def run(self, w: Workload, payload: str) -> Measurement:
        if w.name == "map":
            return await self.in_thread(lambda: self._group(w.tasks, payload))
        return await self.in_thread(
            lambda: drive_window(self._send, self._wait, payload, w.tasks, w.in_flight, w.pause)
        )

    def _group(self, tasks: int, payload: str) -> Measurement:
        import dramatiq

        group: Any = dramatiq.group
        started = time.perf_counter()
        g = group([self.actor.message(payload) for _ in range(tasks)]).run()
        values = list(g.get_results(block=True, timeout=RESULT_TIMEOUT_MS))
        elapsed = time.perf_counter() - started
        if len(values) != tasks or any(v != payload for v in values):
            raise ValueError(f"group answered {len(values)} result(s), not {tasks} echoes")
        return Measurement(tasks, elapsed)

    async def stop(self) -> None:
        if self.broker is not None:
            broker = self.broker
            self.broker = None
            await self.in_thread(broker.close)
        self.shutdown_thread()
        await self.stop_procs()
        await self.delete_amqp([self.queue, f"{self.queue}.DQ", f"{self.queue}.XQ"])
        if self.redis_url:
            await _delete_keys(self.redis_url, f"{self.namespace}:*")


async def _delete_keys(url: str, pattern: str) -> None:
    import redis.asyncio

    client = redis.asyncio.Redis.from_url(url)
    try:
        keys = [key async for key in client.scan_iter(match=pattern, count=1000)]
        for i in range(0, len(keys), 1000):
            await client.delete(*keys[i : i + 1000])
    finally:
        await client.aclose()
