"""Shared fixtures: a real RabbitMQ, a fresh namespace per test, and factories that clean up."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import uuid
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import pytest

from amqpsched import Client, Settings
from amqpsched.scheduler import Scheduler
from amqpsched.topology import Topology
from amqpsched.worker import Worker, WorkerApp
from amqpsched.worker.builtin import app as builtin_app

ROOT = Path(__file__).resolve().parent.parent
LOCAL_URL = "amqp://guest:guest@127.0.0.1:5672/"


def _answers(url: str) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 5672), 2):
            return True
    except OSError:
        return False


def _docker_answers() -> bool:
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="session")
def amqp_url() -> Iterator[str]:
    """AMQPSCHED_TEST_AMQP_URL, else the local broker on 5672, else testcontainers' RabbitMQ."""
    url = os.environ.get("AMQPSCHED_TEST_AMQP_URL")
    if url:
        yield url
        return
    if _answers(LOCAL_URL):
        yield LOCAL_URL
        return
    if _docker_answers():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from testcontainers.community.rabbitmq import RabbitMqContainer

        with RabbitMqContainer("rabbitmq:3.13") as container:
            host = container.get_container_host_ip()
            port = container.get_exposed_port(5672)
            yield f"amqp://guest:guest@{host}:{port}/"
        return
    message = (
        "no RabbitMQ: set AMQPSCHED_TEST_AMQP_URL, start one on 127.0.0.1:5672 "
        "(rabbitmq-server -detached), or run a Docker engine for testcontainers"
    )
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


class System:
    """One isolated amqpsched system on the broker: its own namespace, cleaned up at the end."""

    def __init__(self, url: str, **overrides: Any) -> None:
        self.namespace = f"t{uuid.uuid4().hex[:10]}"
        self.overrides: dict[str, Any] = {
            "heartbeat_interval": 0.2,
            "heartbeat_miss_limit": 3,
            "shutdown_timeout": 10,
            **overrides,
        }
        self.settings = Settings(amqp_url=url, namespace=self.namespace, **self.overrides)
        self.topology = Topology(self.namespace)
        self.capabilities: set[str] = {"echo", "sleep", "resize"}
        self._cleanup: list[Callable[[], Awaitable[Any]]] = []

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            AMQPSCHED_AMQP_URL=self.settings.amqp_url.get_secret_value(),
            AMQPSCHED_NAMESPACE=self.namespace,
            PYTHONPATH=str(ROOT),
        )
        env.update({f"AMQPSCHED_{k.upper()}": str(v) for k, v in self.overrides.items()})
        env.update(extra)
        return env

    async def scheduler(self, scheduler_id: str | None = None, **overrides: Any) -> Scheduler:
        settings = self.settings.model_copy(update=overrides) if overrides else self.settings
        sched = Scheduler(settings, scheduler_id)
        await sched.start()
        self._cleanup.append(sched.stop)
        return sched

    async def worker(
        self,
        *capabilities: str,
        app: WorkerApp | None = None,
        concurrency: int | None = None,
    ) -> Worker:
        self.capabilities.update(capabilities)
        worker = Worker(app or builtin_app, capabilities, self.settings, concurrency=concurrency)
        await worker.start()
        self._cleanup.append(worker.stop)
        return worker

    async def client(self) -> Client:
        client = Client(self.settings)
        await client.connect()
        self._cleanup.append(client.close)
        return client

    async def dead_letters(
        self, expect: int, timeout: float = 10.0
    ) -> list[aio_pika.abc.AbstractIncomingMessage]:
        """Wait until ``expect`` messages are in the dead-letter queue; return them (acked)."""
        conn = await aio_pika.connect(self.settings.amqp_url.get_secret_value())
        try:
            channel = await conn.channel()
            queue = await channel.get_queue(self.topology.dead_letter_queue)
            got: list[aio_pika.abc.AbstractIncomingMessage] = []
            async with asyncio.timeout(timeout):
                while len(got) < expect:
                    msg = await queue.get(fail=False)
                    if msg is None:
                        await asyncio.sleep(0.05)
                        continue
                    await msg.ack()
                    got.append(msg)
            return got
        finally:
            await conn.close()

    async def close(self) -> None:
        for stop in reversed(self._cleanup):
            with suppress(Exception):
                await stop()
        conn = await aio_pika.connect(self.settings.amqp_url.get_secret_value())
        try:
            # Each on a channel of its own: a failed delete closes its channel.
            names, exchanges = self.topology.durable_names(sorted(self.capabilities))
            for name in names:
                channel = await conn.channel()
                with suppress(Exception):
                    await channel.queue_delete(name)
                with suppress(Exception):
                    await channel.close()
            for ex in exchanges:
                channel = await conn.channel()
                with suppress(Exception):
                    await channel.exchange_delete(ex)
                with suppress(Exception):
                    await channel.close()
        finally:
            await conn.close()


@pytest.fixture
async def system(amqp_url: str) -> AsyncIterator[System]:
    sys_ = System(amqp_url)
    try:
        yield sys_
    finally:
        await sys_.close()


@pytest.fixture
def system_factory(amqp_url: str) -> Callable[..., System]:
    """For tests that need non-default settings: ``system_factory(default_timeout=1)``.
    The caller must ``await s.close()``."""
    return lambda **overrides: System(amqp_url, **overrides)


class RawClient:
    """Publishes raw bytes to tasks.submit the way any AMQP client could, and reads replies."""

    def __init__(self, system: System) -> None:
        self.system = system

    async def __aenter__(self) -> RawClient:
        self.conn = await aio_pika.connect(self.system.settings.amqp_url.get_secret_value())
        self.channel = await self.conn.channel()
        self.replies = await self.channel.declare_queue(exclusive=True)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.conn.close()

    async def send(
        self,
        body: bytes,
        *,
        reply: bool = True,
        type_: str | None = None,
        headers: dict[str, Any] | None = None,
    ) -> str:
        corr = uuid.uuid4().hex
        await self.channel.default_exchange.publish(
            aio_pika.Message(
                body,
                content_type="application/json",
                correlation_id=corr,
                reply_to=self.replies.name if reply else None,
                type=type_,
                headers=headers,
            ),
            routing_key=self.system.topology.submit_queue,
        )
        return corr

    async def reply_message(
        self, corr: str, timeout: float = 10
    ) -> aio_pika.abc.AbstractIncomingMessage:
        async with asyncio.timeout(timeout):
            while True:
                msg = await self.replies.get(fail=False, no_ack=True)
                if msg is None:
                    await asyncio.sleep(0.02)
                elif msg.correlation_id == corr:
                    return msg

    async def reply(self, corr: str, timeout: float = 10) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((await self.reply_message(corr, timeout)).body)
        return data


class Proc:
    """A process started by its CLI, with its output kept for the failure message."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self._fh = log.open("wb")
        self.popen = subprocess.Popen(
            [sys.executable, *args], env=env, stdout=self._fh, stderr=subprocess.STDOUT, cwd=ROOT
        )

    def output(self) -> str:
        self._fh.flush()
        return self.log.read_text(errors="replace")

    async def wait_for_output(self, text: str, timeout: float = 20.0) -> None:
        async with asyncio.timeout(timeout):
            while text not in self.output():
                if self.popen.poll() is not None:
                    raise AssertionError(f"process exited early:\n{self.output()}")
                await asyncio.sleep(0.05)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(10)
        self._fh.close()


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., Proc]]:
    procs: list[Proc] = []

    def start(args: list[str], env: dict[str, str], name: str = "proc") -> Proc:
        proc = Proc(args, env, tmp_path / f"{name}-{len(procs)}.log")
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.stop()
