"""A scheduler embedded in your own program: ``python examples/scheduler/main.py``.

The same as ``python -m amqpsched.scheduler``, written out: settings come from ``AMQPSCHED_*``
environment variables (``AMQPSCHED_AMQP_URL``, ``AMQPSCHED_NAMESPACE``...) and ``.env``; SIGTERM
or Ctrl+C stops it cleanly."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry

from amqpsched import Settings
from amqpsched.runtime import serve, setup_logging
from amqpsched.scheduler import Scheduler


async def main() -> None:
    settings = Settings()
    setup_logging(settings)
    # serve() starts the scheduler, serves /metrics if AMQPSCHED_METRICS_PORT is set, and stops
    # it on SIGTERM or SIGINT.
    registry = CollectorRegistry()
    await serve(Scheduler(settings, registry=registry), settings, registry)


if __name__ == "__main__":
    asyncio.run(main())
