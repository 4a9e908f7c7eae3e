"""The one exception tree of amqpsched: callers never catch aio-pika's or aiormq's errors."""

from __future__ import annotations

from typing import Any


class AmqpschedError(Exception):
    """Root of every error raised by amqpsched."""


class ConfigurationError(AmqpschedError):
    """Settings or arguments that cannot work (bad capability name, unknown app module...)."""


class BrokerError(AmqpschedError):
    """The broker could not be reached, refused an operation, or did not confirm a publish."""


class DecodeError(AmqpschedError):
    """A message body that is not a valid protocol message. Keeps the raw bytes and the reason."""

    def __init__(self, reason: str, raw: bytes, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.raw = raw
        self.detail = detail


class TaskError(AmqpschedError):
    """A task did not produce a result."""

    def __init__(self, task_id: str, message: str) -> None:
        super().__init__(message)
        self.task_id = task_id


class TaskFailed(TaskError):
    """The system answered ``failed``. ``error_type`` is one of the protocol's error types."""

    def __init__(
        self,
        task_id: str,
        error_type: str,
        message: str,
        detail: dict[str, Any] | None = None,
        attempts: int | None = None,
    ) -> None:
        super().__init__(task_id, f"task {task_id} failed ({error_type}): {message}")
        self.error_type = error_type
        self.error_message = message
        self.detail = detail or {}
        self.attempts = attempts


class NoWorkerAvailable(TaskFailed):
    """No live worker offered the capability before the task's timeout."""


class TaskTimeout(TaskError):
    """No answer arrived within the time the client waited."""


class UnknownTask(TaskError):
    """The scheduler does not know (or no longer remembers) this task id."""
