"""Client requests decoded with each large payload kept as the bytes it came in.

The scheduler never reads a payload: it hands it on to a worker, which decodes it. Decoding a
structured payload into Python objects, only to encode it again for the dispatch, costs the
scheduler more than everything else it does for the task (about 0.9 ms for 64 KiB of small
objects, against a few µs for one long string). Here msgspec checks the whole body in one pass
and gives each payload back as its bytes; pydantic then validates the rest of the request,
with each payload replaced by ``null``, exactly as :func:`protocol.decode` validates a whole
request. The payload goes on as :class:`protocol.RawJson`.

What this path does not accept goes through :func:`protocol.decode`, which gives the reason:
a request refused here is refused there, with the same words. A small body goes there first:
below :data:`RAW_FROM` bytes a payload per task, the extra pass costs more than it saves.

Either way, a payload may nest at most :data:`MAX_DEPTH` deep: deeper, a worker could not
decode its task (pydantic refuses JSON nested 200 deep, and a task batch holds its payloads
three levels down)."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import msgspec
from pydantic import BaseModel, ValidationError

from ..errors import DecodeError
from ..protocol import M, RawJson, SubmitBatch, SubmitBatchItem, SubmitRequest, decode

#: Bytes of body per task from which payloads are kept raw.
RAW_FROM = 2048
#: How deep a payload may nest (arrays and objects).
MAX_DEPTH = 128

_FIELDS = msgspec.json.Decoder(dict[str, msgspec.Raw])
_ITEMS = msgspec.json.Decoder(list[dict[str, msgspec.Raw]])
_KEYS: dict[type[BaseModel], dict[str, bytes]] = {
    model: {name: b'"' + name.encode() + b'":' for name in model.model_fields}
    for model in (SubmitRequest, SubmitBatch, SubmitBatchItem)
}


class _Refused(Exception):
    """Not for this path: :func:`protocol.decode` decides."""


def decode_request(model: type[M], raw: bytes) -> M:
    """:func:`protocol.decode`, with the payloads of a large submission kept raw."""
    if model is SubmitRequest:
        request = _decoded(model, raw, _submission)
        levels = 1  # the body, then the payload
    elif model is SubmitBatch:
        request = _decoded(model, raw, _batch)
        levels = 3  # the body, its tasks, a task, then the payload
    else:
        return decode(model, raw)
    if too_deep(raw, MAX_DEPTH + levels):
        raise DecodeError("invalid_fields", raw, f"payload: nested more than {MAX_DEPTH} deep")
    return request


def _decoded(model: type[M], raw: bytes, fast: Callable[[type[M], bytes], M]) -> M:
    if len(raw) >= RAW_FROM:
        try:
            return fast(model, raw)
        except _Refused:
            pass
    return decode(model, raw)


_ESCAPE = re.compile(rb"\\.", re.S)
_STRING = re.compile(rb'"[^"]*"')
_NOT_STRUCTURE = bytes(range(256)).translate(None, b'[]{}"')
_SQUARE = bytes.maketrans(b"{}", b"[]")


def too_deep(raw: bytes, limit: int) -> bool:
    """Whether the well-formed JSON ``raw`` nests arrays and objects more than ``limit`` deep.
    Each step runs at C speed: escapes out, then all but brackets and quotes, then strings,
    then one level of brackets per pass."""
    if b"\\" in raw:
        raw = _ESCAPE.sub(b"", raw)
    marks = raw.translate(_SQUARE, _NOT_STRUCTURE)
    if marks.count(b"[") <= limit:
        return False
    # Quotes alternate, opening and closing: taking out two in a row keeps that, and joins at
    # most two strings' contents, all of it to go.
    marks = marks.replace(b'""', b"")
    if b'"' in marks:
        marks = _STRING.sub(b"", marks)
    for _ in range(limit):
        if not marks:
            return False
        marks = marks.replace(b"[]", b"")
    return bool(marks)


def _fields(decoder: msgspec.json.Decoder[Any], raw: bytes | msgspec.Raw) -> Any:
    try:
        return decoder.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        raise _Refused from None


def _envelope(model: type[BaseModel], fields: Mapping[str, bytes | msgspec.Raw]) -> bytes:
    """The JSON object of ``fields`` (each value as its raw JSON, the payload taken out), its
    payload ``null``."""
    keys = _KEYS[model]
    parts: list[bytes | msgspec.Raw] = [b"{"]
    for name, value in fields.items():
        key = keys.get(name)
        if key is None:  # an unknown field: decode says which
            raise _Refused
        parts += (key, value, b",")
    parts.append(b'"payload":null}')
    return b"".join(parts)


def _validate(model: type[M], envelope: bytes) -> M:
    try:
        return model.model_validate_json(envelope, strict=True)
    except ValidationError:
        raise _Refused from None


def _check_text(raw: bytes) -> None:
    """msgspec skips a payload's strings without checking their UTF-8."""
    if not raw.isascii():
        try:
            raw.decode()
        except UnicodeDecodeError:
            raise _Refused from None


def _payload(fields: dict[str, msgspec.Raw]) -> RawJson:
    payload = fields.pop("payload", None)
    if payload is None:
        raise _Refused
    return RawJson(bytes(payload))


def _submission(model: type[M], raw: bytes) -> M:
    fields = _fields(_FIELDS, raw)
    _check_text(raw)
    payload = _payload(fields)
    request = _validate(model, _envelope(SubmitRequest, fields))
    request.__dict__["payload"] = payload
    return request


def _batch(model: type[M], raw: bytes) -> M:
    if len(raw) < RAW_FROM * raw.count(b'"payload"'):  # at least as many as its tasks
        raise _Refused
    fields = _fields(_FIELDS, raw)
    listed = fields.pop("tasks", None)
    if listed is None:
        raise _Refused
    items = _fields(_ITEMS, listed)
    if not items:
        raise _Refused
    _check_text(raw)
    payloads = [_payload(item) for item in items]
    parts: list[bytes | msgspec.Raw] = [b'{"tasks":[']
    for item in items:
        parts += (_envelope(SubmitBatchItem, item), b",")
    parts[-1] = b"]"
    keys = _KEYS[SubmitBatch]
    for name, value in fields.items():
        key = keys.get(name)
        if key is None:
            raise _Refused
        parts += (b",", key, value)
    parts.append(b"}")
    batch = _validate(model, b"".join(parts))
    for task, payload in zip(batch.tasks, payloads, strict=True):  # type: ignore[attr-defined]
        task.__dict__["payload"] = payload
    return batch
