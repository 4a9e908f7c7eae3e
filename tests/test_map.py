"""Client.map and `amqpsched map`: many payloads for one capability, on the real broker."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from amqpsched import TaskFailed, WorkerApp
from amqpsched.worker.builtin import app as builtin_app

from .conftest import ROOT, System


def _odd_fails() -> WorkerApp:
    app = WorkerApp()

    @app.capability("odd_fails")
    async def odd_fails(n: Any) -> Any:
        if int(n) % 2:
            raise ValueError(f"{n} is odd")
        return n

    app.include(builtin_app)
    return app


async def test_map_yields_results_in_input_order_with_progress(system: System) -> None:
    await system.scheduler()
    await system.worker("sleep", concurrency=16)
    client = await system.client()
    # Later inputs finish first: order must still follow the input.
    payloads = [{"seconds": 0.02 * (20 - i)} for i in range(20)]
    seen: list[tuple[int, int]] = []
    results = [
        r
        async for r in client.map(
            "sleep", payloads, window=8, progress=lambda d, t: seen.append((d, t))
        )
    ]
    assert results == [{"slept": p["seconds"]} for p in payloads]
    assert seen == [(i, 20) for i in range(1, 21)]


async def test_map_unordered_and_failures(system: System) -> None:
    await system.scheduler()
    await system.worker("odd_fails", "echo", app=_odd_fails(), concurrency=8)
    client = await system.client()
    results = [
        r async for r in client.map("odd_fails", range(10), ordered=False, return_exceptions=True)
    ]
    assert sorted(r for r in results if isinstance(r, int)) == [0, 2, 4, 6, 8]
    failures = [r for r in results if isinstance(r, TaskFailed)]
    assert len(failures) == 5
    assert {f.error_type for f in failures} == {"handler_error"}
    with pytest.raises(TaskFailed):
        async for _ in client.map("odd_fails", [0, 1, 2]):
            pass


async def test_map_of_a_thousand_through_one_client(system: System) -> None:
    await system.scheduler()
    await system.worker("echo", concurrency=64)
    client = await system.client()
    assert [r async for r in client.map("echo", range(1000), window=200)] == list(range(1000))


@pytest.mark.system
async def test_map_cli_prints_results_as_json_lines(system: System, tmp_path: Path) -> None:
    await system.scheduler()
    await system.worker("echo")
    source = tmp_path / "payloads.jsonl"
    source.write_text("\n".join(json.dumps({"n": i}) for i in range(5)) + "\n")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "amqpsched",
        "map",
        "echo",
        str(source),
        env=system.env(),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    assert [json.loads(line) for line in out.decode().splitlines()] == [{"n": i} for i in range(5)]
