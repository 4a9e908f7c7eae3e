"""W3C trace context across processes, and OpenTelemetry spans when the ``otel`` extra is
installed and a tracer provider is configured.

The ``traceparent`` header travels client -> scheduler -> worker -> scheduler -> client on every
message of a task. Without OpenTelemetry it is copied as is (the client makes a fresh one); with
it, the client, the scheduler and the worker each open a span (``amqpsched.submit``,
``amqpsched.dispatch``, ``amqpsched.execute``), child of the incoming traceparent, and pass the
child's traceparent onward. A malformed header is dropped, never an error."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from typing import Any

from . import logs
from ._version import __version__

try:
    from opentelemetry import trace as otel_trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    _PROPAGATOR: TraceContextTextMapPropagator | None = TraceContextTextMapPropagator()
except ImportError:  # pragma: no cover - without the `otel` extra
    _PROPAGATOR = None

#: The message header carrying the W3C trace context.
TRACEPARENT = "traceparent"
_FORMAT = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16

#: Span kinds by name, so callers need not import OpenTelemetry.
PRODUCER, CONSUMER, INTERNAL = "producer", "consumer", "internal"


#: The last traceparent found valid: the tasks of a batch often share one.
_last_valid: list[str | None] = [None]


def valid(value: Any) -> str | None:
    """``value`` if it is a well-formed W3C traceparent (version 00 or a later one), else None."""
    if value is not None and value == _last_valid[0]:
        return _last_valid[0]
    checked = _valid(value)
    if checked is not None and checked == value:
        _last_valid[0] = checked
    return checked


def _valid(value: Any) -> str | None:
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return None
    if not isinstance(value, str) or len(value) < 55:
        return None
    head = value[:55]
    if not _FORMAT.fullmatch(head) or head[:2] == "ff":
        return None
    if len(value) > 55 and (head[:2] == "00" or value[55] != "-"):
        return None
    if head[3:35] == _ZERO_TRACE or head[36:52] == _ZERO_SPAN:
        return None
    return head


def from_headers(headers: Mapping[str, Any] | None) -> str | None:
    """The valid traceparent of a message's headers, or None."""
    if not headers:
        return None
    return valid(headers.get(TRACEPARENT))


def new_traceparent() -> str:
    """A fresh, sampled traceparent: a new trace."""
    return f"00-{os.urandom(16).hex()}-{os.urandom(8).hex()}-01"


def trace_id(traceparent: str | None) -> str | None:
    return traceparent[3:35] if traceparent else None


def current_traceparent() -> str | None:
    """The traceparent of the task being handled here (in a worker: the ``amqpsched.execute``
    span's), or None outside of a task."""
    ctx = logs.current()
    return ctx.traceparent if ctx is not None else None


def current_trace_id() -> str | None:
    """The trace id (32 hex digits) of the task being handled here, for a handler's own use."""
    return trace_id(current_traceparent())


def headers(traceparent: str | None, base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``base`` with the traceparent header added when there is one."""
    out = dict(base) if base else {}
    if traceparent is not None:
        out[TRACEPARENT] = traceparent
    return out


#: Seconds between two looks for a tracer provider while none is set (a look reads the
#: environment: too slow for every task).
PROVIDER_RECHECK = 1.0
#: [when a provider was last looked for in vain, the tracer once one is found]
_found: list[Any] = [-PROVIDER_RECHECK, None]


def _tracer(fresh: bool = False) -> Any:
    """The amqpsched tracer, or None when OpenTelemetry is absent or has no provider set (a
    provider set later is seen within :data:`PROVIDER_RECHECK` seconds; at once if ``fresh``)."""
    if _PROPAGATOR is None:
        return None
    looked_at, tracer = _found
    if tracer is not None:
        return tracer  # a provider is set once, for good
    now = time.monotonic()
    if not fresh and now - looked_at < PROVIDER_RECHECK:
        return None
    provider = otel_trace.get_tracer_provider()
    if isinstance(provider, otel_trace.ProxyTracerProvider | otel_trace.NoOpTracerProvider):
        _found[0] = now
        return None
    tracer = provider.get_tracer("amqpsched", __version__)
    _found[1] = tracer
    return tracer


def enabled() -> bool:
    """True when spans are recorded (the ``otel`` extra and a configured tracer provider)."""
    return _tracer(fresh=True) is not None


class Span:
    """What :func:`span` yields: the traceparent to send onward, and a way to mark failure."""

    __slots__ = ("_span", "traceparent")

    def __init__(self, traceparent: str | None, span: Any = None) -> None:
        self.traceparent = traceparent
        self._span = span

    def fail(self, message: str) -> None:
        if self._span is not None:
            from opentelemetry.trace import Status, StatusCode

            self._span.set_status(Status(StatusCode.ERROR, message))


class _Untraced:
    """What :func:`span` returns while tracing is off: the span as is (no generator per task)."""

    __slots__ = ("_span",)

    def __init__(self, span: Span) -> None:
        self._span = span

    def __enter__(self) -> Span:
        return self._span

    def __exit__(self, *exc: object) -> None:
        return None


def span(
    name: str,
    parent: str | None,
    *,
    kind: str = INTERNAL,
    attributes: Mapping[str, str | int] | None = None,
    create: bool = False,
) -> AbstractContextManager[Span]:
    """An OpenTelemetry span child of ``parent`` (else of the current OpenTelemetry context)
    when tracing is on; yields the traceparent to propagate. When it is off, that is ``parent``
    as is, or with ``create`` a new trace if there is none."""
    tracer = _tracer()
    if tracer is None:
        return _Untraced(
            Span(parent or (_from_current_otel() or new_traceparent() if create else None))
        )
    return _traced(tracer, name, parent, kind, attributes)


@contextmanager
def _traced(
    tracer: Any,
    name: str,
    parent: str | None,
    kind: str,
    attributes: Mapping[str, str | int] | None,
) -> Iterator[Span]:
    assert _PROPAGATOR is not None
    context = _PROPAGATOR.extract({TRACEPARENT: parent}) if parent is not None else None
    span_kind = {
        PRODUCER: otel_trace.SpanKind.PRODUCER,
        CONSUMER: otel_trace.SpanKind.CONSUMER,
    }.get(kind, otel_trace.SpanKind.INTERNAL)
    with tracer.start_as_current_span(
        name, context=context, kind=span_kind, attributes=dict(attributes or {})
    ) as current:
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier)
        yield Span(valid(carrier.get(TRACEPARENT)) or parent, current)


def _from_current_otel() -> str | None:
    """The traceparent of an active OpenTelemetry span (someone else's tracer), if any."""
    if _PROPAGATOR is None:
        return None
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return valid(carrier.get(TRACEPARENT))
