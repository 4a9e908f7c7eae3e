"""The examples and `amqpsched demo`, run as a user would; and the demo's broker finder."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import aio_pika
import aiormq
import pytest

from amqpsched import Client, TaskTimeout
from amqpsched import broker as broker_mod
from amqpsched.broker import HOW_TO, ensure_broker
from amqpsched.errors import BrokerError
from amqpsched.topology import Topology
from amqpsched.worker.app import load_app

from .conftest import ROOT, Proc, System

EXAMPLE_CAPABILITIES = {"echo", "wordcount", "square"}


def run(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


async def wait_live(
    client: Client, names: set[str], procs: Iterable[Proc], timeout: float = 30.0
) -> None:
    """Poll the scheduler's catalog until every name in ``names`` has a live worker."""
    async with asyncio.timeout(timeout):
        while True:
            for proc in procs:
                if proc.popen.poll() is not None:
                    raise AssertionError(f"process exited early:\n{proc.output()}")
            try:
                catalog = await client.capabilities(timeout=1.0)
            except TaskTimeout:  # no scheduler consuming yet
                continue
            if names <= {e.name for e in catalog if e.workers > 0}:
                return
            await asyncio.sleep(0.05)


async def terminate(proc: Proc, timeout: float = 15.0) -> int:
    proc.popen.send_signal(signal.SIGTERM)
    return await asyncio.to_thread(proc.popen.wait, timeout)


@pytest.mark.system
async def test_client_example_against_scheduler_and_worker_examples(
    system: System, spawn: Callable[..., Proc]
) -> None:
    system.capabilities.update({"wordcount", "square"})
    env = system.env()
    scheduler = spawn(["examples/scheduler/main.py"], env, "scheduler")
    worker = spawn(["examples/worker/main.py"], env, "worker")
    await wait_live(await system.client(), EXAMPLE_CAPABILITIES, [scheduler, worker])

    done = await asyncio.to_thread(run, ["examples/client/main.py"], env, 60)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == 'echo -> {"hello": "world", "n": [1, 2, 3]}'
    counted = json.loads(lines[1].removeprefix("wordcount -> "))
    assert counted == {"words": 15, "lines": 2, "top": [["the", 4], ["fox", 2], ["dog", 2]]}
    assert lines[2] == "square -> [1, 4, 9, 16, 25]"
    assert re.fullmatch(r"status [0-9a-f]{32} -> succeeded after 1 attempt\(s\)", lines[3])
    assert lines[4] == "wordcount with a bad payload -> invalid_payload"
    assert lines[5] == "capabilities:"
    listed = {line.split()[0]: line.split()[1] for line in lines[6:]}
    assert listed == {name: "workers=1" for name in EXAMPLE_CAPABILITIES}

    # Both examples stop cleanly on SIGTERM.
    assert await terminate(worker) == 0, worker.output()
    assert await terminate(scheduler) == 0, scheduler.output()
    assert "stopped after 8 task(s)" in worker.output()


@pytest.mark.system
async def test_worker_example_app_loads_into_the_stock_worker(
    system: System, spawn: Callable[..., Proc]
) -> None:
    system.capabilities.update({"wordcount", "square"})
    await system.scheduler()
    args = ["-m", "amqpsched.worker", "--app", "examples.worker.main", "-c", "wordcount"]
    worker = spawn([*args, "-c", "square"], system.env(), "worker")
    client = await system.client()
    await wait_live(client, {"wordcount", "square"}, [worker])
    assert await client.call("wordcount", {"text": "a b a", "top": 1}, timeout=30) == {
        "words": 3,
        "lines": 1,
        "top": [["a", 2]],
    }
    assert await client.call("square", {"n": -4}, timeout=30) == 16
    catalog = {e.name: e for e in await client.capabilities()}
    assert "echo" not in catalog  # only what -c asked for
    assert catalog["wordcount"].description.startswith("Counts the words")
    assert "text" in str(catalog["wordcount"].payload_schema)


def test_worker_example_exposes_app(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT))
    app = load_app("examples.worker.main")
    assert set(app.handlers) == {"wordcount", "square"}
    assert not app.handlers["wordcount"].is_async
    assert app.handlers["square"].is_async


DEMO_LINE = re.compile(
    r"image (\d)/2: (\d+)x(\d+) (PNG|JPEG) \(\d+ bytes\) -> (\d+)x(\d+) PNG \(\d+ bytes\) "
    r"task=[0-9a-f]{32} \d+ ms"
)


@pytest.mark.system
@pytest.mark.timeout(180)
async def test_demo_resizes_and_cleans_up(amqp_url: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "AMQPSCHED_NAMESPACE"}
    env["AMQPSCHED_AMQP_URL"] = amqp_url
    args = ["-m", "amqpsched", "demo", "--images", "2"]
    done = await asyncio.to_thread(run, args, env, 120)
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert "guest:***@" in out
    assert ":guest@" not in out + done.stderr  # the password is masked
    images = [m.groups() for m in map(DEMO_LINE.fullmatch, out.splitlines()) if m]
    assert images == [
        ("1", "320", "240", "PNG", "64", "48"),
        ("2", "200", "300", "JPEG", "128", "128"),
    ]
    assert "worker stopped (exit 0)" in out
    assert "scheduler stopped (exit 0)" in out
    assert out.splitlines()[-1].startswith("ok: 2 image(s) resized and verified")

    # Its namespace is gone from the broker.
    found = re.search(r"namespace\s+(demo[0-9a-f]+)", out)
    assert found, out
    topo = Topology(found.group(1))
    conn = await aio_pika.connect(amqp_url)
    try:
        for name in (topo.submit_queue, topo.results_queue, topo.capability_queue("resize")):
            channel = await conn.channel()
            with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity):
                await channel.declare_queue(name, passive=True)
        for name in (topo.tasks_exchange, topo.registry_exchange, topo.dead_letter_exchange):
            channel = await conn.channel()
            with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity):
                await channel.declare_exchange(name, passive=True)
    finally:
        await conn.close()


# -- ensure_broker ---------------------------------------------------------------------------


def free_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"amqp://guest:secret@127.0.0.1:{port}/"


@pytest.mark.system
def test_ensure_broker_uses_a_broker_that_answers(amqp_url: str) -> None:
    with ensure_broker(amqp_url) as handle:
        assert (handle.url, handle.origin) == (amqp_url, "existing")


def test_ensure_broker_says_how_to_get_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(broker_mod, "_server_binary", lambda: None)
    monkeypatch.setattr(broker_mod, "_docker_answers", lambda: False)
    with pytest.raises(BrokerError) as caught:
        ensure_broker(free_port_url())
    message = str(caught.value)
    assert HOW_TO in message
    assert "apt-get install -y rabbitmq-server && rabbitmq-server -detached" in message
    assert "docker run" in message
    assert "AMQPSCHED_AMQP_URL" in message
    assert "secret" not in message


def test_ensure_broker_starts_nothing_for_a_remote_url(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail() -> str:
        raise AssertionError("must not look for a local server")

    monkeypatch.setattr(broker_mod, "_server_binary", fail)
    with pytest.raises(BrokerError, match="nothing answers"):
        ensure_broker("amqp://u:p@host.invalid:5672/")


def fake_server(tmp_path: Path, script: str) -> str:
    path = tmp_path / "rabbitmq-server"
    path.write_text(f"#!/bin/sh\n{script}\n")
    path.chmod(0o755)
    return str(path)


def test_ensure_broker_reports_a_server_that_fails(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    binary = fake_server(tmp_path, 'echo "no permission" >&2; exit 3')
    monkeypatch.setattr(broker_mod, "_server_binary", lambda: binary)
    with pytest.raises(BrokerError, match="exited 3: no permission"):
        ensure_broker(free_port_url())


def test_ensure_broker_waits_a_bounded_time(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    binary = fake_server(tmp_path, "exit 0")  # "starts", but nothing ever listens
    monkeypatch.setattr(broker_mod, "_server_binary", lambda: binary)
    with pytest.raises(BrokerError, match="did not accept an AMQP login within 1s"):
        ensure_broker(free_port_url(), start_timeout=1.0)
