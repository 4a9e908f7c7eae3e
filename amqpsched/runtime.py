"""Running a long-lived service: logging, signals, the health server, a clean exit."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from collections.abc import Callable, Coroutine
from typing import Any, Protocol, TypeVar

from prometheus_client import CollectorRegistry

from .errors import ConfigurationError
from .health import HealthServer
from .logs import JsonFormatter, TextFormatter
from .settings import Settings

log = logging.getLogger("amqpsched")
T = TypeVar("T")


class Service(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    @property
    def ready(self) -> bool: ...


def setup_logging(settings: Settings) -> None:
    """Log to stderr: one JSON object per line with ``log_json``, else plain text; both carry
    the task a line is about (``logs.task_context``)."""
    handler = logging.StreamHandler()
    if settings.log_json:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=settings.log_level.upper(), handlers=[handler])
    logging.getLogger("aio_pika").setLevel(logging.WARNING)
    logging.getLogger("aiormq").setLevel(logging.WARNING)


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop to run on (``Settings.event_loop``); None: asyncio's own."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise ConfigurationError("event_loop=uvloop, but uvloop is not installed") from None
        return None
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T], settings: Settings) -> T:
    """``asyncio.run(main)`` on the event loop ``settings`` choose."""
    with asyncio.Runner(loop_factory=loop_factory(settings.event_loop)) as runner:
        return runner.run(main)


#: Python's cyclic garbage collector in a started service (``gc.set_threshold``). The default
#: (700, 10, 10) ran a collection every 700 net allocations: about a fifth of the scheduler's and
#: a worker's CPU under load, and pauses of tens of ms when a full collection walked every object
#: made at start. Per-task objects are mostly freed by reference counting; few form cycles.
GC_THRESHOLDS = (10_000, 20, 10)
#: A worker's: ten times fewer collections again. Its tasks' objects live only while they run,
#: yet a collection every 10,000 net allocations still took a tenth of its CPU in a `map`
#: (py-spy and ``gc.callbacks``). Not the scheduler's: its memory with a million waiting tasks
#: has a target (``bench --scale``), close to its limit.
WORKER_GC_THRESHOLDS = (100_000, 20, 10)


def tune_gc(thresholds: tuple[int, int, int] = GC_THRESHOLDS) -> None:
    """Move what exists now (modules, the service) out of the collector's reach for good, and
    collect less often from here on."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*thresholds)


async def serve(
    service: Service,
    settings: Settings,
    registry: CollectorRegistry,
    gc_thresholds: tuple[int, int, int] = GC_THRESHOLDS,
) -> None:
    """Start ``service``, serve health endpoints, and stop cleanly on SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    health = None
    if settings.metrics_port is not None:
        health = HealthServer(settings.metrics_port, lambda: service.ready, registry)
        await health.start()
    try:
        await service.start()
        if settings.gc_tuning:
            tune_gc(gc_thresholds)
        await stop.wait()
        log.info("stopping on signal")
        await service.stop()
    finally:
        if health is not None:
            await health.stop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
