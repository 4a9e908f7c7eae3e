"""Running a long-lived service: logging, signals, the health server, a clean exit."""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Protocol

from prometheus_client import CollectorRegistry

from .health import HealthServer
from .logs import JsonFormatter, TextFormatter
from .settings import Settings

log = logging.getLogger("amqpsched")


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


async def serve(service: Service, settings: Settings, registry: CollectorRegistry) -> None:
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
        await stop.wait()
        log.info("stopping on signal")
        await service.stop()
    finally:
        if health is not None:
            await health.stop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
