"""amqpsched: a distributed task scheduler on RabbitMQ."""

from ._version import __version__
from .client import Client, SyncClient, TaskHandle
from .errors import (
    AmqpschedError,
    BrokerError,
    ConfigurationError,
    DecodeError,
    NoWorkerAvailable,
    TaskError,
    TaskFailed,
    TaskTimeout,
    UnknownTask,
)
from .protocol import RetryPolicy
from .settings import Settings
from .worker.app import InvalidPayload, WorkerApp

__all__ = [
    "AmqpschedError",
    "BrokerError",
    "Client",
    "ConfigurationError",
    "DecodeError",
    "InvalidPayload",
    "NoWorkerAvailable",
    "RetryPolicy",
    "Settings",
    "SyncClient",
    "TaskError",
    "TaskFailed",
    "TaskHandle",
    "TaskTimeout",
    "UnknownTask",
    "WorkerApp",
    "__version__",
]
