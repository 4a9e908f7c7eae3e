"""The worker SDK and process: ``python -m amqpsched.worker --capability resize``."""

from .app import Handler, InvalidPayload, WorkerApp
from .runner import Worker

__all__ = ["Handler", "InvalidPayload", "Worker", "WorkerApp"]
