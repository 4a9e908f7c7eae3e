"""A task's hold on the message that brought it. A ``task`` message carries one task and is
settled when that task is; a ``task_batch`` message carries several and is settled once all of
them are: acked when every one was reported, handed back (all of it) if any one must run again."""

from __future__ import annotations

from .. import transport
from ..protocol import Kind, TaskMessage, encode
from ..transport import IncomingMessage, MessageCopy


class Delivery:
    """One task of ``message``. :meth:`settle` once: ack (``requeue`` None) or nack."""

    def __init__(self, message: IncomingMessage) -> None:
        self.message = message

    @property
    def source(self) -> IncomingMessage | MessageCopy:
        """What a dead-letter copy of this task is made of."""
        return self.message

    async def settle(self, requeue: bool | None = None) -> None:
        await transport.settle(self.message, requeue=requeue)


class BatchDelivery:
    """The message of a ``task_batch``, settled when all its parts are."""

    def __init__(self, message: IncomingMessage, count: int) -> None:
        self.message = message
        self.left = count
        self.requeue = False

    def part(self, task: TaskMessage) -> BatchPart:
        return BatchPart(self, task)

    async def done(self, requeue: bool | None) -> None:
        self.left -= 1
        self.requeue = self.requeue or bool(requeue)
        if self.left == 0:
            await transport.settle(self.message, requeue=True if self.requeue else None)


class BatchPart(Delivery):
    def __init__(self, batch: BatchDelivery, task: TaskMessage) -> None:
        super().__init__(batch.message)
        self.batch = batch
        self.task = task
        self._settled = False

    @property
    def source(self) -> IncomingMessage | MessageCopy:
        """A ``task`` message of this one task, as if it had come alone."""
        m = self.message
        return MessageCopy(
            body=encode(self.task),
            headers=dict(m.headers or {}),
            type=Kind.TASK.value,
            reply_to=m.reply_to,
            correlation_id=self.task.correlation_id,
            content_type=m.content_type,
            message_id=self.task.task_id,
        )

    async def settle(self, requeue: bool | None = None) -> None:
        if self._settled:
            return
        self._settled = True
        await self.batch.done(requeue)
