"""Registering handlers: ``@app.capability("name", payload=Model)`` on a sync or async function."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, TypeVar

import pydantic_core
from pydantic import BaseModel, JsonValue, ValidationError
from pydantic_core import PydanticSerializationError

from ..errors import ConfigurationError
from ..protocol import (
    MAX_DEPTH,
    CapabilityInfo,
    RawJson,
    RetryPolicy,
    holds_constants,
    is_capability_name,
    too_deep,
)

HandlerFunc = Callable[[Any], Any] | Callable[[Any], Awaitable[Any]]
F = TypeVar("F", bound=Callable[..., Any])


class InvalidPayload(Exception):
    """The payload does not fit the capability's schema (answered ``invalid_payload``)."""


class InvalidResult(Exception):
    """The handler returned something that is not JSON (answered ``handler_error``)."""


@dataclass(frozen=True)
class Handler:
    name: str
    func: HandlerFunc
    description: str
    payload_model: type[BaseModel] | None
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    time_limit: float | None = None

    @cached_property
    def is_async(self) -> bool:
        return inspect.iscoroutinefunction(self.func)

    def info(self) -> CapabilityInfo:
        schema: dict[str, Any] = (
            self.payload_model.model_json_schema() if self.payload_model is not None else {}
        )
        return CapabilityInfo(
            name=self.name,
            description=self.description,
            payload_schema=schema,
            retry=self.retry,
            time_limit=self.time_limit,
        )

    def parse(self, payload: JsonValue) -> Any:
        if self.payload_model is None:
            return payload
        try:
            return self.payload_model.model_validate(payload)
        except ValidationError as exc:
            raise InvalidPayload(str(exc)) from None


def to_json(result: Any) -> RawJson:
    """A handler's return value as JSON, encoded once, by pydantic-core (as the client encodes
    payloads): pydantic models, dataclasses, datetimes, UUIDs, sets and UTF-8 bytes as pydantic
    serialises them. Raise :class:`InvalidResult` for another type, a string UTF-8 cannot
    carry, NaN or an infinity (JSON has neither), and a value nested more than
    :data:`protocol.MAX_DEPTH` deep."""
    try:
        # by_alias=False: a model's fields by name, as model_dump() gives them
        raw = pydantic_core.to_json(result, by_alias=False, inf_nan_mode="constants")
    except PydanticSerializationError as exc:
        raise InvalidResult(
            f"handler returned {type(result).__name__}, which is not JSON serialisable: {exc}"
        ) from None
    if holds_constants(raw):
        raise InvalidResult("handler returned NaN or an infinity, which JSON cannot carry")
    if too_deep(raw, MAX_DEPTH):  # its scheduler and its client could not decode it
        raise InvalidResult(f"handler returned a value nested more than {MAX_DEPTH} deep")
    return RawJson(raw)


class WorkerApp:
    """A set of capability handlers, loaded by ``python -m amqpsched.worker --app module``."""

    def __init__(self) -> None:
        self._handlers: dict[str, Handler] = {}

    @property
    def handlers(self) -> Mapping[str, Handler]:
        return self._handlers

    def capability(
        self,
        name: str,
        *,
        description: str = "",
        payload: type[BaseModel] | None = None,
        retry: RetryPolicy | None = None,
        time_limit: float | None = None,
    ) -> Callable[[F], F]:
        """Register a handler. ``retry`` and ``time_limit`` (seconds per attempt) are the
        capability's defaults; a task may override them."""
        if not is_capability_name(name):
            raise ConfigurationError(f"invalid capability name {name!r}")

        def register(func: F) -> F:
            if name in self._handlers:
                raise ConfigurationError(f"capability {name!r} is registered twice")
            doc = description or (inspect.getdoc(func) or "").split("\n\n")[0]
            self._handlers[name] = Handler(
                name, func, doc, payload, retry or RetryPolicy(), time_limit
            )
            return func

        return register

    def include(self, other: WorkerApp) -> None:
        for name, handler in other.handlers.items():
            if name in self._handlers:
                raise ConfigurationError(f"capability {name!r} is registered twice")
            self._handlers[name] = handler


def load_app(spec: str) -> WorkerApp:
    """``module`` or ``module:attribute``; the attribute defaults to ``app``."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(f"cannot import {module_name!r}: {exc}") from exc
    app = getattr(module, attr or "app", None)
    if not isinstance(app, WorkerApp):
        raise ConfigurationError(f"{spec!r} is not an amqpsched WorkerApp")
    return app
