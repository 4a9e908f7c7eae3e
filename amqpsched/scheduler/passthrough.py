"""Messages decoded with each large payload or result kept as the bytes it came in.

The scheduler never reads a task's payload or result: it hands the payload on to a worker and
the result on to the client and the journal. Decoding a structured value into Python objects,
only to encode it again, costs the scheduler more than everything else it does for the task
(about 0.9 ms for 64 KiB of small objects, against a few µs for one long string). Here msgspec
checks the whole body in one pass and gives each such value back as its bytes; pydantic then
validates the rest, with each value replaced by ``null``, as the whole body would be validated.
The value goes on as :class:`protocol.RawJson`, which :func:`protocol.encode` writes back as it
came.

Which field is passed on, per message: a submission's and a task's ``payload``, an outcome's
and an answer's ``result``, in the message, in each item of its batch, or in the answer of each
item of an answer batch (:data:`SHAPES`). A ``null`` one is kept as ``None``.

What this path does not take goes through the usual decoder, which gives the reason: a client
request refused here is refused by :func:`protocol.decode` with the same words, a message of
amqpsched's own components is decoded by :func:`protocol.decode_event`. A small body goes there
first: below :data:`RAW_FROM` bytes per value, the extra pass costs more than it saves.

A client's payload may nest at most :data:`MAX_DEPTH` deep: deeper, a worker could not decode
its task (pydantic refuses JSON nested 200 deep, and a task batch holds its payloads three
levels down). A component's message nested deeper than that goes the usual way, as before."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import msgspec
from pydantic import BaseModel, ValidationError

from ..errors import DecodeError
from ..protocol import (
    MAX_DEPTH,
    Answer,
    AnswerBatch,
    BatchedAnswer,
    M,
    OutcomeBatch,
    OutcomeEvent,
    RawJson,
    SubmitBatch,
    SubmitBatchItem,
    SubmitRequest,
    TaskBatch,
    TaskMessage,
    decode,
    decode_event,
    too_deep,
)

#: Bytes of body per value from which values are kept raw.
RAW_FROM = 2048


@dataclass(frozen=True)
class Shape:
    """Where a ``model`` keeps the value passed on: in its ``field``; or, with ``inner``, in
    the object that field holds (``listed``: in each object of the list it holds)."""

    model: type[BaseModel]
    field: str
    inner: Shape | None = None
    listed: bool = False

    @property
    def levels(self) -> int:
        """How deep the value sits: the body, then each object and list on the way."""
        if self.inner is None:
            return 1
        return (2 if self.listed else 1) + self.inner.levels

    @property
    def several(self) -> bool:
        """Whether a body may hold several values (a batch)."""
        return self.listed or (self.inner is not None and self.inner.several)

    @property
    def leaf(self) -> str:
        """The name of the field that holds the value."""
        return self.field if self.inner is None else self.inner.leaf

    def models(self) -> list[type[BaseModel]]:
        return [self.model, *(self.inner.models() if self.inner else [])]


def _each(model: type[BaseModel], items: str, inner: Shape) -> Shape:
    return Shape(model, items, inner, listed=True)


_ANSWER = Shape(Answer, "result")
SHAPES: dict[type[BaseModel], Shape] = {
    SubmitRequest: Shape(SubmitRequest, "payload"),
    SubmitBatch: _each(SubmitBatch, "tasks", Shape(SubmitBatchItem, "payload")),
    TaskMessage: Shape(TaskMessage, "payload"),
    TaskBatch: _each(TaskBatch, "tasks", Shape(TaskMessage, "payload")),
    OutcomeEvent: Shape(OutcomeEvent, "result"),
    OutcomeBatch: _each(OutcomeBatch, "events", Shape(OutcomeEvent, "result")),
    Answer: _ANSWER,
    AnswerBatch: _each(AnswerBatch, "answers", Shape(BatchedAnswer, "answer", _ANSWER)),
}

_FIELDS = msgspec.json.Decoder(dict[str, msgspec.Raw])
_ITEMS = msgspec.json.Decoder(list[dict[str, msgspec.Raw]])


def _quoted(name: str) -> bytes:
    return b'"' + name.encode() + b'"'


_KEYS: dict[type[BaseModel], dict[str, bytes]] = {
    model: {name: _quoted(name) + b":" for name in model.model_fields}
    for shape in SHAPES.values()
    for model in shape.models()
}


class _Refused(Exception):
    """Not for this path: the usual decoder decides."""


def decode_request(model: type[M], raw: bytes) -> M:
    """:func:`protocol.decode` of a client request, with the payloads of a large submission
    kept raw; a payload nested more than :data:`MAX_DEPTH` deep is refused."""
    shape = SHAPES.get(model)
    if shape is None:
        return decode(model, raw)
    request = _kept_raw(model, raw, shape, strict=True) if len(raw) >= RAW_FROM else None
    if request is None:
        request = decode(model, raw)
    if too_deep(raw, MAX_DEPTH + shape.levels):
        raise DecodeError("invalid_fields", raw, f"payload: nested more than {MAX_DEPTH} deep")
    return request


def decode_message(model: type[M], raw: bytes) -> M:
    """:func:`protocol.decode_event` of a message from amqpsched's own components (an outcome,
    a journaled task or answer), with its large payloads or results kept raw."""
    shape = SHAPES.get(model)
    if shape is not None and len(raw) >= RAW_FROM and not too_deep(raw, MAX_DEPTH + shape.levels):
        message = _kept_raw(model, raw, shape, strict=False)
        if message is not None:
            return message
    return decode_event(model, raw)


def _kept_raw(model: type[M], raw: bytes, shape: Shape, strict: bool) -> M | None:
    """``raw`` as ``model``, each of its values at ``shape`` kept raw; None: not for this path."""
    try:
        return _passed_on(model, raw, shape, strict)
    except _Refused:
        return None


def _fields(decoder: msgspec.json.Decoder[Any], raw: bytes | msgspec.Raw) -> Any:
    try:
        return decoder.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        raise _Refused from None


def _object(
    keys: Mapping[str, bytes], fields: Mapping[str, bytes | msgspec.Raw], *last: bytes
) -> list[bytes | msgspec.Raw]:
    """The parts of the JSON object of ``fields`` (each value its raw JSON), ``last`` last."""
    parts: list[bytes | msgspec.Raw] = [b"{"]
    for name, value in fields.items():
        key = keys.get(name)
        if key is None:  # an unknown field: the usual decoder says what to do with it
            raise _Refused
        parts += (key, value, b",")
    if last:
        parts += last
    elif len(parts) > 1:
        parts.pop()  # the last comma
    parts.append(b"}")
    return parts


def _check_text(raw: bytes) -> None:
    """msgspec skips a raw value's strings without checking their UTF-8."""
    if not raw.isascii():
        try:
            raw.decode()
        except UnicodeDecodeError:
            raise _Refused from None


def _passed_on(model: type[M], raw: bytes, shape: Shape, strict: bool) -> M:
    """``raw`` as ``model``, each of its values at ``shape`` kept raw."""
    if shape.several and len(raw) < RAW_FROM * raw.count(_quoted(shape.leaf)):
        raise _Refused  # under RAW_FROM a value (the key counts the values, maybe more)
    fields = _fields(_FIELDS, raw)
    _check_text(raw)
    values: list[RawJson | None] = []
    message = _validate(model, _rebuilt(shape, fields, values), strict)
    _put_back(shape, message, iter(values))
    return message


def _rebuilt(
    shape: Shape, fields: dict[str, msgspec.Raw], values: list[RawJson | None]
) -> list[bytes | msgspec.Raw]:
    """The parts of the JSON object of ``fields``, its value at ``shape`` taken out into
    ``values`` and written ``null``."""
    value = fields.pop(shape.field, None)
    if value is None:
        raise _Refused
    key = _quoted(shape.field)
    if shape.inner is None:
        kept = bytes(value)
        values.append(None if kept == b"null" else RawJson(kept))  # a failure's null result
        return _object(_KEYS[shape.model], fields, key, b":null")
    if shape.listed:
        items = _fields(_ITEMS, value)
        if not items:
            raise _Refused
        inner: list[bytes | msgspec.Raw] = [b"["]
        for item in items:
            inner += _rebuilt(shape.inner, item, values)
            inner.append(b",")
        inner[-1] = b"]"
    else:
        inner = _rebuilt(shape.inner, _fields(_FIELDS, value), values)
    return _object(_KEYS[shape.model], fields, key, b":", *inner)


def _put_back(shape: Shape, message: BaseModel, values: Iterator[RawJson | None]) -> None:
    """Set in ``message``, validated, each value :func:`_rebuilt` took out."""
    if shape.inner is None:
        message.__dict__[shape.field] = next(values)
        return
    held = getattr(message, shape.field)
    for item in held if shape.listed else [held]:
        _put_back(shape.inner, item, values)


def _validate(model: type[M], parts: list[bytes | msgspec.Raw], strict: bool) -> M:
    try:
        return model.model_validate_json(b"".join(parts), strict=strict)
    except ValidationError:
        raise _Refused from None
