"""``amqpsched demo``: a scheduler and a resize worker as processes, driven by the client SDK.

Everything runs in a namespace of its own (``demo<random>``) that is deleted at the end, so the
demo never touches another system on the same broker."""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from PIL import Image, ImageDraw, UnidentifiedImageError
from pydantic import JsonValue, ValidationError

from . import transport
from .broker import check_login, ensure_broker, port_answers
from .client import Client
from .errors import AmqpschedError, TaskTimeout
from .settings import Settings, mask_url
from .topology import Topology
from .worker.builtin import ResizeResult

CAPABILITY = "resize"
SOURCES = [(320, 240), (200, 300), (640, 360), (256, 256), (90, 400)]
TARGETS = [(64, 48), (128, 128), (96, 160), (200, 100), (32, 32)]
FORMATS = ["PNG", "JPEG"]
PALETTE = [(255, 64, 64), (64, 200, 255), (255, 220, 0), (160, 80, 255), (40, 220, 120)]
LIVE_TIMEOUT = 30.0  # seconds for the scheduler and the worker to come up
TASK_TIMEOUT = 30.0  # seconds each resize may take
STOP_TIMEOUT = 10.0  # seconds each child has to exit after SIGTERM
ROOT = Path(__file__).resolve().parent.parent


class DemoFailed(AmqpschedError):
    """Something in the demo did not work as it should."""


@dataclass
class _Child:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    _fh: IO[bytes]

    @classmethod
    def start(cls, name: str, args: list[str], env: dict[str, str], workdir: Path) -> _Child:
        log = workdir / f"{name}.log"
        fh = log.open("wb")
        popen = subprocess.Popen(
            [sys.executable, *args],
            env=env,
            cwd=workdir,  # no .env of the caller's directory: the demo's settings come from env
            stdin=subprocess.DEVNULL,
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
        return cls(name, popen, log, fh)

    def tail(self, lines: int = 15) -> str:
        self._fh.flush()
        text = self.log.read_text(errors="replace").splitlines()[-lines:]
        return "\n".join(f"  {self.name}| {line}" for line in text) or f"  {self.name}| (no output)"

    def stop(self) -> str:
        """SIGTERM, wait (bounded), SIGKILL if needed; a note on how it went."""
        note = "already exited"
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            note = "stopped"
            try:
                self.popen.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(STOP_TIMEOUT)
                note = f"killed: no exit within {STOP_TIMEOUT:.0f}s of SIGTERM"
        self._fh.close()
        return f"{self.name} {note} (exit {self.popen.returncode})"


def make_image(index: int, size: tuple[int, int], fmt: str) -> bytes:
    """A colourful test image: three gradients as channels, and a few shapes on top."""
    w, h = size
    ramp = Image.linear_gradient("L")
    channels = [
        ramp.resize(size),
        ramp.rotate(90).resize(size),
        Image.radial_gradient("L").resize(size),
    ]
    shift = index % 3
    img = Image.merge("RGB", channels[shift:] + channels[:shift])
    draw = ImageDraw.Draw(img)
    colour = [PALETTE[(index + k) % len(PALETTE)] for k in range(3)]
    draw.ellipse((w // 8, h // 8, w // 2, h // 2), fill=colour[0], outline="white", width=3)
    draw.rectangle((w // 2, h // 2, w - w // 8, h - h // 8), fill=colour[1], outline="black")
    draw.polygon([(w // 2, h // 10), (w - w // 10, h // 2), (w // 2, h // 2)], fill=colour[2])
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _child_env(url: str, namespace: str) -> dict[str, str]:
    """The caller's environment, with the demo's broker and namespace (no metrics port: two
    children would fight for it)."""
    env = {k: v for k, v in os.environ.items() if k != "AMQPSCHED_METRICS_PORT"}
    env.update(
        AMQPSCHED_AMQP_URL=url,
        AMQPSCHED_NAMESPACE=namespace,
        AMQPSCHED_HEARTBEAT_INTERVAL="0.5",  # the scheduler sees the worker sooner
        AMQPSCHED_SHUTDOWN_TIMEOUT="5",
    )
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


async def _wait_live(client: Client, children: list[_Child]) -> None:
    """Poll the catalog until a worker offers ``resize``; fail early if a child exits."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + LIVE_TIMEOUT
    while True:
        for child in children:
            if child.popen.poll() is not None:
                raise DemoFailed(f"the {child.name} exited early (code {child.popen.returncode})")
        try:
            catalog = await client.capabilities(timeout=1.0)
        except TaskTimeout:  # the scheduler is not consuming yet; the request waits for it
            catalog = []
        if any(e.name == CAPABILITY and e.workers > 0 for e in catalog):
            return
        if loop.time() > deadline:
            raise DemoFailed(f"no live {CAPABILITY!r} worker after {LIVE_TIMEOUT:.0f}s")
        await asyncio.sleep(0.1)


def _check(result: object, target: tuple[int, int], task_id: str) -> bytes:
    """The PNG of a resize result, after checking it decodes and has the asked size."""
    try:
        answer = ResizeResult.model_validate(result)
        png = base64.b64decode(answer.image, validate=True)
        with Image.open(io.BytesIO(png)) as img:
            img.load()
            fmt, size = img.format, img.size
    except (ValidationError, binascii.Error, UnidentifiedImageError, OSError) as exc:
        raise DemoFailed(f"task {task_id}: the result is not a readable image: {exc}") from exc
    if fmt != "PNG" or size != target or (answer.width, answer.height) != target:
        raise DemoFailed(
            f"task {task_id}: asked for a {target[0]}x{target[1]} PNG, got a {size[0]}x{size[1]} "
            f"{fmt} (reported {answer.width}x{answer.height})"
        )
    return png


async def _resize(client: Client, index: int, total: int) -> str:
    size = SOURCES[index % len(SOURCES)]
    target = TARGETS[index % len(TARGETS)]
    fmt = FORMATS[index % len(FORMATS)]
    data = make_image(index, size, fmt)
    payload: JsonValue = {
        "image": base64.b64encode(data).decode(),
        "width": target[0],
        "height": target[1],
    }
    started = time.perf_counter()
    handle = await client.submit(CAPABILITY, payload, timeout=TASK_TIMEOUT)
    result = await handle.result()
    elapsed_ms = (time.perf_counter() - started) * 1000
    png = _check(result, target, handle.task_id)
    return (
        f"image {index + 1}/{total}: {size[0]}x{size[1]} {fmt} ({len(data)} bytes) -> "
        f"{target[0]}x{target[1]} PNG ({len(png)} bytes) task={handle.task_id} "
        f"{elapsed_ms:.0f} ms"
    )


async def _drive(settings: Settings, children: list[_Child], images: int) -> None:
    started = time.perf_counter()
    async with Client(settings) as client:
        await _wait_live(client, children)
        print(f"  ready in {(time.perf_counter() - started) * 1000:.0f} ms", flush=True)
        lines = await asyncio.gather(*(_resize(client, i, images) for i in range(images)))
    for line in lines:
        print(line, flush=True)


async def _delete_topology(settings: Settings) -> None:
    async with transport.connection(settings, "amqpsched-demo-cleanup") as conn:
        try:
            channel = await conn.channel()
            await Topology(settings.namespace).delete_all(channel, [CAPABILITY])
        except transport.BROKER_ERRORS as exc:
            raise DemoFailed(f"{exc.__class__.__name__}: {exc}") from exc


def _run(url: str, workdir: Path, images: int) -> bool:
    namespace = f"demo{uuid.uuid4().hex[:10]}"
    settings = Settings(amqp_url=url, namespace=namespace)
    env = _child_env(url, namespace)
    print(f"  namespace  {namespace}", flush=True)
    children: list[_Child] = []
    ok = False
    try:
        children.append(_Child.start("scheduler", ["-m", "amqpsched.scheduler"], env, workdir))
        worker_args = ["-m", "amqpsched.worker", "--capability", CAPABILITY]
        children.append(_Child.start("worker", worker_args, env, workdir))
        for child in children:
            print(f"  {child.name:10} pid {child.popen.pid}", flush=True)
        asyncio.run(_drive(settings, children, images))
        ok = True
    except AmqpschedError as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        for child in children:
            print(child.tail(), file=sys.stderr)
    finally:
        for child in reversed(children):  # the worker first: it says goodbye to the scheduler
            print(f"  {child.stop()}", flush=True)
        try:
            asyncio.run(_delete_topology(settings))
            print(f"  deleted the queues and exchanges of {namespace}")
        except AmqpschedError as exc:
            print(f"demo failed: could not clean up namespace {namespace}: {exc}", file=sys.stderr)
            ok = False
    return ok


def run_demo(images: int = 3) -> int:
    """Run the demo; 0 if every image came back resized as asked, else 1 (with the reason on
    stderr)."""
    if images < 1:
        print("demo failed: --images must be at least 1", file=sys.stderr)
        return 1
    started = time.perf_counter()
    try:
        # A list of broker addresses (a cluster): the demo uses the first that answers.
        urls = [u.get_secret_value() for u in Settings().amqp_urls()]
        url = next((u for u in urls if port_answers(u)), urls[0])
        print("amqpsched demo", flush=True)
        with (
            ensure_broker(url) as broker,
            tempfile.TemporaryDirectory(prefix="amqpsched-demo-") as tmp,
        ):
            print(f"  broker     {mask_url(broker.url)} ({broker.origin})", flush=True)
            check_login(broker.url)  # before any child starts: a wrong password fails here
            ok = _run(broker.url, Path(tmp), images)
    except (AmqpschedError, ValidationError) as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    if not ok:
        return 1
    elapsed = time.perf_counter() - started
    print(f"ok: {images} image(s) resized and verified in {elapsed:.1f} s")
    return 0


__all__ = ["make_image", "run_demo"]
