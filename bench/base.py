"""What every system under test provides, and what the bench gives it."""

from __future__ import annotations

import asyncio
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, TypeVar
from urllib.parse import urlsplit

import aio_pika

from .procs import ROOT, BenchError, Proc, listener_pid, redis_answers, start_redis
from .workloads import Measurement, Workload

T = TypeVar("T")


@dataclass
class Context:
    """One bench run: its id (in every queue name), broker, Redis, options and log directory."""

    run_id: str
    amqp_url: str
    log_dir: Path
    quick: bool
    redis_url_option: str | None = None
    amqpsched_workers: int = 1
    amqpsched_schedulers: int = 1
    amqpsched_concurrency: int = 64
    _redis: Proc | None = field(default=None, repr=False)
    _redis_url: str | None = field(default=None, repr=False)

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        env.update(extra)
        return env

    async def redis_url(self) -> str:
        """The Redis to use: ``--redis-url``, else 127.0.0.1:6379 if it answers, else a private
        ``redis-server`` started now (stopped by :meth:`close`)."""
        if self._redis_url is None:
            if self.redis_url_option:
                self._redis_url = self.redis_url_option
            elif redis_answers("127.0.0.1", 6379):
                self._redis_url = "redis://127.0.0.1:6379/0"
            else:
                self._redis, port = await start_redis(self.log_dir)
                print(f"bench: started redis-server on port {port}", flush=True)
                self._redis_url = f"redis://127.0.0.1:{port}/0"
        return self._redis_url

    def redis_pid(self) -> int | None:
        """The Redis process, once :meth:`redis_url` chose one (for its CPU time)."""
        if self._redis is not None:
            return self._redis.pid
        if self._redis_url is None:
            return None
        return listener_pid(urlsplit(self._redis_url).port or 6379)

    @property
    def amqp_port(self) -> int:
        return urlsplit(self.amqp_url).port or 5672

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.stop()
            self._redis = None


class System(ABC):
    """A system under test: starts its processes, runs workloads, cleans up after itself."""

    name: ClassVar[str]

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.procs: list[Proc] = []

    def describe(self) -> str:
        """One line: what runs, how it is configured."""
        return ""

    @classmethod
    def unavailable(cls) -> str | None:
        """Why this system cannot run here (a missing package), else None."""
        return None

    def unsupported(self, w: Workload) -> str | None:
        """Why this workload does not apply to this system, else None."""
        return "no batch API" if w.name == "map" else None

    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    async def run(self, w: Workload, payload: str) -> Measurement: ...

    @abstractmethod
    async def stop(self) -> None:
        """Stop everything started and delete every queue, exchange and key created."""

    def roles(self) -> dict[str, list[int]]:
        """Processes whose CPU and memory are reported, by role."""
        return {"worker": [p.pid for p in self.procs]}

    def spawn(self, args: list[str], name: str, env: dict[str, str] | None = None) -> Proc:
        proc = Proc.python(args, env or self.ctx.env(), self.ctx.log_dir, f"{self.name}-{name}")
        self.procs.append(proc)
        return proc

    async def stop_procs(self) -> None:
        for proc in reversed(self.procs):
            await proc.stop()

    async def delete_amqp(self, queues: Sequence[str], exchanges: Sequence[str] = ()) -> None:
        """Delete queues and exchanges, each on a fresh channel (a failure closes its channel)."""
        conn = await aio_pika.connect(self.ctx.amqp_url)
        try:
            for queue in queues:
                with suppress(Exception):
                    channel = await conn.channel()
                    await channel.queue_delete(queue)
                    await channel.close()
            for exchange in exchanges:
                with suppress(Exception):
                    channel = await conn.channel()
                    await channel.exchange_delete(exchange)
                    await channel.close()
        finally:
            await conn.close()


class ThreadedSystem(System):
    """A system with a blocking client: all its client calls run in one dedicated thread (the
    clients keep per-thread connections and reply queues)."""

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self._thread = ThreadPoolExecutor(1, thread_name_prefix=f"bench-{self.name}")

    async def in_thread(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn)

    def shutdown_thread(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)


def require(module: str) -> str | None:
    """None if ``module`` imports, else why not (for :meth:`System.unavailable`)."""
    try:
        __import__(module)
    except ImportError as exc:
        return f"not installed ({exc.name}; pip install -e '.[bench]')"
    return None


__all__ = ["BenchError", "Context", "System", "ThreadedSystem", "require"]
