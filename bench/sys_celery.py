"""Celery: prefork worker with 2 processes on the shared RabbitMQ (its default classic queue,
early acks), ``rpc://`` results; ``group`` for the map workload."""

from __future__ import annotations

from contextlib import suppress
from typing import Any

from .base import Context, ThreadedSystem, require
from .workloads import Measurement, Workload, drive_window

PROCESSES = 2
RESULT_TIMEOUT = 120.0


class CelerySystem(ThreadedSystem):
    name = "celery"

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.queue = f"bench{ctx.run_id}.celery"
        self.app: Any = None

    @classmethod
    def unavailable(cls) -> str | None:
        return require("celery")

    def describe(self) -> str:
        return f"prefork worker, {PROCESSES} processes, rpc:// results, defaults otherwise"

    def unsupported(self, w: Workload) -> str | None:
        return None

    async def start(self) -> None:
        worker = self.spawn(
            [
                "-m",
                "celery",
                "-A",
                "bench.celery_app",
                "worker",
                "--pool",
                "prefork",
                "--concurrency",
                str(PROCESSES),
                "--queues",
                self.queue,
                "--hostname",
                f"bench{self.ctx.run_id}@%h",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                "--loglevel",
                "INFO",
            ],
            "worker",
            self.ctx.env(BENCH_AMQP_URL=self.ctx.amqp_url, BENCH_CELERY_QUEUE=self.queue),
        )
        await worker.wait_for_output(" ready.")

        from .celery_app import make_app

        self.app = make_app(self.ctx.amqp_url, self.queue)

    def _send(self, payload: str) -> Any:
        return self.app.tasks["bench.echo"].apply_async((payload,))

    @staticmethod
    def _wait(result: Any) -> Any:
        return result.get(timeout=RESULT_TIMEOUT)

    async def run(self, w: Workload, payload: str) -> Measurement:
        if w.name == "map":
            return await self.in_thread(lambda: self._group(w.tasks, payload))
        return await self.in_thread(
            lambda: drive_window(self._send, self._wait, payload, w.tasks, w.in_flight, w.pause)
        )

    def _group(self, tasks: int, payload: str) -> Measurement:
        import time

        from celery import group

        echo = self.app.tasks["bench.echo"]
        started = time.perf_counter()
        results = group(echo.s(payload) for _ in range(tasks)).apply_async()
        values = results.get(timeout=RESULT_TIMEOUT)
        elapsed = time.perf_counter() - started
        if len(values) != tasks or any(v != payload for v in values):
            raise ValueError(f"group answered {len(values)} result(s), not {tasks} echoes")
        return Measurement(tasks, elapsed)

    async def stop(self) -> None:
        if self.app is not None:
            app = self.app
            self.app = None
            await self.in_thread(lambda: _close(app))
        self.shutdown_thread()
        await self.stop_procs()
        await self.delete_amqp([self.queue], [self.queue])


def _close(app: Any) -> None:
    with suppress(Exception):  # best effort; the connection closes with the process
        app.backend.result_consumer.stop()
    app.close()
