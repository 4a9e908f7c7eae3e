"""The worker's decoding of tasks (``amqpsched.worker.decoding``): a large payload read by
msgspec gives the task pydantic would give, and a body it refuses is refused for the same
reason. Pure, no broker."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from amqpsched.protocol import (
    ErrorType,
    RetryOverride,
    TaskBatch,
    TaskMessage,
    construct,
    decode_event,
    encode,
)
from amqpsched.worker import decoding
from amqpsched.worker.decoding import FROM_BYTES, decode_task

from .json_values import random_json, read_alike

ROWS = [
    {"id": i, "name": f"r\u00e9sum\u00e9 {i} \u2603", "score": i / 7, "big": 2**70 + i, "n": None}
    for i in range(80)
]


def _task(payload: Any, task_id: str = "t1", **fields: Any) -> bytes:
    values: dict[str, Any] = {
        "task_id": task_id,
        "capability": "echo",
        "payload": payload,
        "attempt": 1,
        "submitted_at": 1.0,
        "deadline": 2.0,
        "reply_to": "r",
        "correlation_id": "c",
        **fields,
    }
    return encode(construct(TaskMessage, **values))


def _batch(*tasks: bytes) -> bytes:
    return b'{"v":1,"tasks":[' + b",".join(tasks) + b'],"traceparents":[]}'


def _same(model: Any, body: bytes) -> None:
    """``decode_task`` gives what ``decode_event`` gives, or fails with the same reason."""
    expected, decoded = read_alike(
        lambda: decode_event(model, body), lambda: decode_task(model, body)
    )
    assert repr(decoded) == repr(expected)  # the same types too (int, not float), NaN as NaN


#: Leaves two JSON readers could read apart: big integers, float edges, escapes, emoji.
ODD = [2**80, -(2**70), 0.1, 1e300, -0.0, 5, '\u00e9\\"\n', "", True, None, "\U0001f600"]


def _odd(rng: random.Random, depth: int) -> Any:
    return random_json(rng, depth, ODD, lambda r: f"k{r.randint(0, 3)}", 4)


def test_large_tasks_and_batches_decode_as_pydantic_decodes_them() -> None:
    rng = random.Random(7)
    for _ in range(200):
        payload = [_odd(rng, rng.randint(0, 5)) for _ in range(rng.randint(1, 60))]
        padded = {"pad": "x" * FROM_BYTES, "payload": payload}
        _same(TaskMessage, _task(payload))  # small or large
        _same(TaskMessage, _task(padded))
        _same(TaskBatch, _batch(_task(padded, "a"), _task(payload, "b"), _task(padded, "c")))
    retry = RetryOverride(max_attempts=3, retry_on=[ErrorType.HANDLER_ERROR])
    _same(TaskMessage, _task(ROWS, time_limit=5, retry=retry, idempotency_key="k", direct=True))


def test_the_fast_path_is_taken_for_large_tasks_only(monkeypatch: pytest.MonkeyPatch) -> None:
    large, small = _task(ROWS), _task({"x": 1})
    assert len(large) >= FROM_BYTES > len(small)
    taken: list[bytes] = []

    def whole(model: Any, raw: bytes) -> Any:
        taken.append(raw)
        return decode_event(model, raw)

    monkeypatch.setattr(decoding, "decode_event", whole)
    assert decode_task(TaskMessage, large).payload == ROWS
    batch = decode_task(TaskBatch, _batch(large, large))
    assert [t.payload for t in batch.tasks] == [ROWS, ROWS]
    assert taken == []  # read by msgspec, not by pydantic
    assert decode_task(TaskBatch, _batch(small, small)).tasks[0].payload == {"x": 1}
    assert decode_task(TaskMessage, small).payload == {"x": 1}
    assert len(taken) == 2


LARGE = _task(ROWS)
BAD = [
    LARGE[:-3],
    LARGE.replace(b'"task_id":"t1",', b""),
    LARGE.replace(b'"payload":', b'"payloads":'),
    LARGE.replace(b'"attempt":1', b'"attempt":0'),
    LARGE.replace(b'"attempt":1', b'"attempt":"1"'),
    LARGE.replace(b'"score":0.0', b'"score":1e400', 1),
    LARGE.replace(b'"score":0.0', b'"score":NaN', 1),
    LARGE.replace(b"r\xc3\xa9sum", b"r\xffsum", 1),
    LARGE.replace(b'"big":', b'"big":"\\ud800",', 1).replace(b'"\\ud800",1', b'"\\ud800"', 1),
    b"[" + LARGE + b"]",
    _batch(),
    _batch(LARGE, b"7"),
]


@pytest.mark.parametrize("body", BAD)
def test_odd_or_bad_bodies_decode_or_fail_as_pydantic_says(body: bytes) -> None:
    model = TaskBatch if body.startswith(b'{"v":1,"tasks"') else TaskMessage
    _same(model, body)


def test_a_payload_reads_back_as_the_json_it_was() -> None:
    text = json.dumps(ROWS, ensure_ascii=False)
    assert decode_task(TaskMessage, _task(json.loads(text))).payload == json.loads(text)
