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
and an answer's ``result``, in the message or in each item of its batch (:data:`SHAPES`).

What this path does not take goes through the usual decoder, which gives the reason: a client
request refused here is refused by :func:`protocol.decode` with the same words, a message of
amqpsched's own components is decoded by :func:`protocol.decode_event`. A small body goes there
first: below :data:`RAW_FROM` bytes per value, the extra pass costs more than it saves.

A client's payload may nest at most :data:`MAX_DEPTH` deep: deeper, a worker could not decode
its task (pydantic refuses JSON nested 200 deep, and a task batch holds its payloads three
levels down). A component's message nested deeper than that goes the usual way, as before."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgspec
from pydantic import BaseModel, ValidationError

from ..errors import DecodeError
from ..protocol import (
    MAX_DEPTH,
    Answer,
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
    """Where a message keeps the value passed on: its own ``field``, or that of each item of
    its list ``items`` (of ``item`` models)."""

    field: str
    items: str = ""
    item: type[BaseModel] | None = None

    @property
    def levels(self) -> int:
        """How deep the value sits: the body, then the value (a batch: its list, an item)."""
        return 3 if self.items else 1


SHAPES: dict[type[BaseModel], Shape] = {
    SubmitRequest: Shape("payload"),
    SubmitBatch: Shape("payload", "tasks", SubmitBatchItem),
    TaskMessage: Shape("payload"),
    TaskBatch: Shape("payload", "tasks", TaskMessage),
    OutcomeEvent: Shape("result"),
    OutcomeBatch: Shape("result", "events", OutcomeEvent),
    Answer: Shape("result"),
}

_FIELDS = msgspec.json.Decoder(dict[str, msgspec.Raw])
_ITEMS = msgspec.json.Decoder(list[dict[str, msgspec.Raw]])


def _quoted(name: str) -> bytes:
    return b'"' + name.encode() + b'"'


_KEYS: dict[type[BaseModel], dict[str, bytes]] = {
    model: {name: _quoted(name) + b":" for name in model.model_fields}
    for shape_of, shape in SHAPES.items()
    for model in (shape_of, shape.item)
    if model is not None
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


def _taken(fields: dict[str, msgspec.Raw], name: str) -> RawJson:
    value = fields.pop(name, None)
    if value is None:
        raise _Refused
    return RawJson(bytes(value))


def _check_text(raw: bytes) -> None:
    """msgspec skips a raw value's strings without checking their UTF-8."""
    if not raw.isascii():
        try:
            raw.decode()
        except UnicodeDecodeError:
            raise _Refused from None


def _passed_on(model: type[M], raw: bytes, shape: Shape, strict: bool) -> M:
    """``raw`` as ``model``, each of its values at ``shape`` kept raw."""
    fields = _fields(_FIELDS, raw)
    if not shape.items:
        _check_text(raw)
        value = _taken(fields, shape.field)
        parts = _object(_KEYS[model], fields, _quoted(shape.field), b":null")
        message = _validate(model, parts, strict)
        message.__dict__[shape.field] = value
        return message
    assert shape.item is not None
    if len(raw) < RAW_FROM * raw.count(_quoted(shape.field)):  # at least as many as its items
        raise _Refused
    listed = fields.pop(shape.items, None)
    if listed is None:
        raise _Refused
    items = _fields(_ITEMS, listed)
    if not items:
        raise _Refused
    _check_text(raw)
    values = [_taken(item, shape.field) for item in items]
    keys, null = _KEYS[shape.item], (_quoted(shape.field), b":null")
    inner: list[bytes | msgspec.Raw] = [b"["]
    for item in items:
        inner += _object(keys, item, *null)
        inner.append(b",")
    inner[-1] = b"]"
    parts = _object(_KEYS[model], fields, _quoted(shape.items), b":", *inner)
    message = _validate(model, parts, strict)
    for item, value in zip(getattr(message, shape.items), values, strict=True):
        item.__dict__[shape.field] = value
    return message


def _validate(model: type[M], parts: list[bytes | msgspec.Raw], strict: bool) -> M:
    try:
        return model.model_validate_json(b"".join(parts), strict=strict)
    except ValidationError:
        raise _Refused from None
