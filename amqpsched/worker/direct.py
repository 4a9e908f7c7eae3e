"""When a worker answers a client itself (docs/protocol.md, section 16). Pure: no I/O.

A worker that finished a task publishes its ``outcome`` once; when the task allows it, that one
publish reaches the client's reply queue too (``BCC``), and the client has its answer one hop
before the scheduler could send it. The scheduler, seeing the outcome's :data:`DIRECT_HEADER`,
journals the answer and answers only the other askers. The rule below keeps the client's answer
single: the worker answers directly only where the scheduler cannot have answered already, and
cannot answer again.
"""

from __future__ import annotations

from ..protocol import TaskMessage

#: A direct answer needs the attempt to have started this many seconds before the task's deadline:
#: nearer to it, the scheduler may be answering ``expired`` at the same moment (and the clocks of
#: two machines differ a little).
DEADLINE_MARGIN = 2.0


class Heartbeats:
    """Whether this worker's heartbeats kept reaching the broker. A scheduler declares a worker
    dead once ``interval * miss_limit`` seconds pass without one, and gives its task to another
    attempt; the first attempt's outcome is then fenced off by the scheduler, so it must not go
    to the client directly either. A gap of ``interval * (miss_limit - 0.5)`` between two
    heartbeats that reached the broker, or a lost connection, counts as a lapse (with
    ``miss_limit`` 1, every gap does: no direct answers)."""

    def __init__(self, interval: float, miss_limit: int, now: float) -> None:
        self.limit = interval * (miss_limit - 0.5)
        self.ok_at = now
        self.lapsed_at = now

    def beat(self, now: float) -> None:
        """A heartbeat was confirmed by the broker at ``now``."""
        if now - self.ok_at > self.limit:
            self.lapsed_at = now
        self.ok_at = now

    def broke(self, now: float) -> None:
        """The connection was lost and is back: nothing tells what schedulers saw meanwhile."""
        self.lapsed_at = now

    def kept_since(self, since: float, now: float) -> bool:
        return self.lapsed_at < since and now - self.ok_at <= self.limit


def answers_directly(
    task: TaskMessage,
    *,
    succeeded: bool,
    redelivered: bool,
    cancelled: bool,
    started_at: float,
    batched: bool,
    heartbeats_kept: bool = True,
) -> bool:
    """Whether the outcome of ``task`` also goes to its client.

    - the client asked for it (``task.direct``), and the outcome travels alone (an
      ``outcome_batch`` holds other clients' tasks);
    - the attempt succeeded: a failure may be retried, which only the scheduler decides;
    - the message was not delivered before: an earlier delivery may have answered already, its
      worker dying before the ack; the scheduler, which knows, answers instead;
    - no cancel notice came, and the attempt started well before the deadline: the scheduler
      answers a cancelled or an expired task itself;
    - the worker's heartbeats kept coming since the attempt started (:class:`Heartbeats`): else
      a scheduler may have declared it dead and run the task again.
    """
    return (
        heartbeats_kept
        and task.direct
        and succeeded
        and not batched
        and not redelivered
        and not cancelled
        and started_at < task.deadline - DEADLINE_MARGIN
    )
