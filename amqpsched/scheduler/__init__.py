"""The scheduler: ``python -m amqpsched.scheduler``."""

from .service import Scheduler

__all__ = ["Scheduler"]
