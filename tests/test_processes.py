"""The scheduler and worker as users run them: processes started by their CLIs, sent signals."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import pytest

from amqpsched.protocol import TaskState

from .conftest import System

pytestmark = pytest.mark.system


async def test_worker_sigterm_mid_task_finishes_it_and_exits_zero(
    system: System, spawn: Any
) -> None:
    await system.scheduler()
    worker = spawn(
        ["-m", "amqpsched.worker", "--capability", "sleep", "--concurrency", "1"],
        system.env(),
        "worker",
    )
    await worker.wait_for_output("consuming")
    client = await system.client()
    first = await client.submit("sleep", {"seconds": 1.5}, timeout=30)
    queued = [await client.submit("sleep", {"seconds": 0.1}, timeout=30) for _ in range(2)]
    async with asyncio.timeout(10):
        while (await first.status()).state != TaskState.RUNNING:
            await asyncio.sleep(0.02)
    worker.popen.send_signal(signal.SIGTERM)
    assert await first.result() == {"slept": 1.5}
    assert await asyncio.to_thread(worker.popen.wait, 20) == 0, worker.output()
    assert "stopped after 1 task(s)" in worker.output()
    # The unstarted tasks were left in (or handed back to) the queue: a new worker runs them.
    second = spawn(["-m", "amqpsched.worker", "-c", "sleep"], system.env(), "worker2")
    assert [await h.result() for h in queued] == [{"slept": 0.1}] * 2
    second.popen.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(second.popen.wait, 20) == 0


async def test_scheduler_sigterm_exits_zero(system: System, spawn: Any) -> None:
    sched = spawn(["-m", "amqpsched.scheduler", "--metrics-port", "0"], system.env(), "sched")
    await sched.wait_for_output("consuming")
    await system.worker("echo")
    client = await system.client()
    assert await client.call("echo", "via cli scheduler", timeout=10) == "via cli scheduler"
    sched.popen.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(sched.popen.wait, 20) == 0, sched.output()
    assert "stopped" in sched.output()


async def test_worker_cli_rejects_unknown_capability(system: System, spawn: Any) -> None:
    proc = spawn(["-m", "amqpsched.worker", "-c", "nope"], system.env(), "bad")
    code = await asyncio.to_thread(proc.popen.wait, 20)
    assert code == 1
    assert "no handler for nope" in proc.output()


async def test_worker_sigterm_hands_back_prefetched_tasks_at_once(
    system: System, spawn: Any
) -> None:
    await system.scheduler()
    # One slot, two capabilities: a running `sleep` and a prefetched `echo` waiting for the slot.
    draining = spawn(
        ["-m", "amqpsched.worker", "-c", "sleep", "-c", "echo", "--concurrency", "1"],
        system.env(),
        "draining",
    )
    await draining.wait_for_output("consuming")
    client = await system.client()
    long = await client.submit("sleep", {"seconds": 3}, timeout=30)
    async with asyncio.timeout(10):
        while (await long.status()).state != TaskState.RUNNING:
            await asyncio.sleep(0.02)
    waiting = await client.submit("echo", "handed back", timeout=30)
    draining.popen.send_signal(signal.SIGTERM)
    other = await system.worker("echo")
    answer = await waiting.answer(timeout=10)
    # Answered by the other worker while the first still finishes its running task.
    assert answer.worker_id == other.worker_id
    assert (await long.status()).state == TaskState.RUNNING
    assert await long.result() == {"slept": 3}
    assert await asyncio.to_thread(draining.popen.wait, 20) == 0, draining.output()
