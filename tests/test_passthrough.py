"""The scheduler's decoding of messages with large payloads and results kept as their bytes:
client requests, workers' outcomes, journal entries. Pure, no broker
(``amqpsched.scheduler.passthrough``)."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from amqpsched.errors import DecodeError
from amqpsched.protocol import (
    MAX_DEPTH,
    Answer,
    AnswerBatch,
    OutcomeBatch,
    OutcomeEvent,
    RawJson,
    Status,
    StatusReply,
    SubmitBatch,
    SubmitRequest,
    TaskBatch,
    TaskMessage,
    TaskState,
    answer_of,
    construct,
    decode,
    decode_event,
    too_deep,
)
from amqpsched.protocol import encode as encode_model
from amqpsched.scheduler.outbox import answer_batch_body
from amqpsched.scheduler.passthrough import RAW_FROM, decode_message, decode_request

from .json_values import random_json, read_alike

ROWS = [
    {"id": i, "name": f"item {i} é \u2603", "score": i * 0.1, "tags": ["a", 'b\n"q"'], "n": None}
    for i in range(60)
]


def _body(payload: Any, **fields: Any) -> bytes:
    return json.dumps({"v": 1, "capability": "echo", "payload": payload, **fields}).encode()


def _task(payload: Any) -> TaskMessage:
    return construct(
        TaskMessage,
        task_id="t1",
        capability="echo",
        payload=payload,
        attempt=1,
        submitted_at=1.0,
        deadline=2.0,
        reply_to="r",
        correlation_id="c",
    )


def test_a_large_payload_is_kept_as_its_bytes_and_written_back_unchanged() -> None:
    payload_bytes = json.dumps(ROWS, ensure_ascii=False).encode()
    body = b'{"v": 1, "capability": "echo", "timeout": 5, "payload": ' + payload_bytes + b"}"
    assert len(body) >= RAW_FROM
    request = decode_request(SubmitRequest, body)
    assert request.payload == RawJson(payload_bytes)
    assert request.timeout == 5 and request.capability == "echo"
    parsed = decode(SubmitRequest, body)
    assert request.model_copy(update={"payload": parsed.payload}) == parsed
    # the dispatch carries the client's bytes, and means what the decoded payload means
    encoded = encode_model(_task(request.payload))
    assert payload_bytes in encoded
    assert json.loads(encoded) == json.loads(encode_model(_task(parsed.payload)))
    assert TaskMessage.model_validate_json(encoded).payload == ROWS


def test_small_bodies_are_decoded_whole() -> None:
    body = _body({"x": 1})
    assert len(body) < RAW_FROM
    assert decode_request(SubmitRequest, body).payload == {"x": 1}


BIG = "x" * RAW_FROM
BAD_LARGE = [
    _body(BIG).replace(b'"v": 1', b'"v": 1.0'),
    _body(BIG).replace(b'"v": 1, ', b""),
    _body(BIG).replace(b'"capability"', b'"capabilty"'),
    _body(BIG)[:-5],
    _body(BIG).replace(b"xxxx", b"x\xffx", 1),
    _body(BIG).replace(b'"echo"', b'"e cho"'),
    _body([1, "NaN", BIG]).replace(b'"NaN"', b"NaN"),
    _body(BIG, timeout=-1),
    _body(BIG).replace(b'"payload": "x', b'"payload": "\\ud800x'),
    _body(BIG).replace(b'"payload": "x', b'"payload": [1, 2,] , "z": "x'),
    b"[" + _body(BIG) + b"]",
    _body(BIG).replace(b'"payload": ', b""),
    _body(BIG, extra=1),
]


@pytest.mark.parametrize("body", BAD_LARGE)
def test_a_large_request_is_refused_for_the_reason_a_whole_decode_gives(body: bytes) -> None:
    with pytest.raises(DecodeError) as whole:
        decode(SubmitRequest, body)
    with pytest.raises(DecodeError) as raw:
        decode_request(SubmitRequest, body)
    assert (raw.value.reason, raw.value.detail) == (whole.value.reason, whole.value.detail)


def test_a_batch_of_large_payloads_keeps_each_raw_and_small_ones_whole() -> None:
    def batch(payload: Any) -> bytes:
        tasks = [
            {
                "task_id": f"t{i}",
                "correlation_id": f"c{i}",
                "capability": "echo",
                "payload": payload,
            }
            for i in range(4)
        ]
        return json.dumps({"v": 1, "tasks": tasks}).encode()

    big = decode_request(SubmitBatch, batch(ROWS))
    assert [t.task_id for t in big.tasks] == ["t0", "t1", "t2", "t3"]
    payloads: list[Any] = [t.payload for t in big.tasks]
    assert all(type(p) is RawJson for p in payloads)
    assert [json.loads(p.raw) for p in payloads] == [ROWS] * 4
    small = decode_request(SubmitBatch, batch({"x": 1}))
    assert [t.payload for t in small.tasks] == [{"x": 1}] * 4
    wrong = batch(ROWS).replace(b'"c2"', b'""')
    with pytest.raises(DecodeError) as raw:
        decode_request(SubmitBatch, wrong)
    with pytest.raises(DecodeError) as whole:
        decode(SubmitBatch, wrong)
    assert raw.value.detail == whole.value.detail


def _depth(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    return 0


#: Leaves that look like structure: brackets and quotes in strings.
STRUCTURE_LIKE = ["x]", "[[", 'a"b', 1, "\\", "}{", "\\]", ""]


def _nested(rng: random.Random, depth: int) -> Any:
    return random_json(rng, depth, STRUCTURE_LIKE, lambda r: f"k{r.random()}[", 3)


def test_too_deep_counts_nesting_as_a_parser_does() -> None:
    rng = random.Random(6)
    for _ in range(1500):
        value = _nested(rng, rng.randint(0, 10))
        raw = json.dumps(value).encode()
        depth = _depth(value)
        for limit in range(12):
            assert too_deep(raw, limit) == (depth > limit), (raw, limit)


@pytest.mark.parametrize("filler", ["", BIG])
def test_a_payload_nested_deeper_than_the_limit_is_refused_small_or_large(filler: str) -> None:
    def nested(depth: int) -> bytes:
        return _body([1]).replace(b"[1]", b"[" * depth + json.dumps(filler).encode() + b"]" * depth)

    assert decode_request(SubmitRequest, nested(MAX_DEPTH)).capability == "echo"
    for depth in (MAX_DEPTH + 1, 1000):
        with pytest.raises(DecodeError) as info:
            decode_request(SubmitRequest, nested(depth))
        assert info.value.reason == "invalid_fields"


# -- messages of amqpsched's own components: outcomes, journaled tasks and answers ----------------


def _outcome(result: Any, task_id: str = "t1") -> OutcomeEvent:
    return construct(
        OutcomeEvent,
        task_id=task_id,
        capability="echo",
        attempt=1,
        worker_id="w1",
        status=Status.SUCCEEDED,
        result=result,
        error=None,
        reply_to="r",
        correlation_id="c",
        submitted_at=1.0,
        started_at=2.0,
        finished_at=3.0,
    )


def _raw(value: object) -> bytes | None:
    """The bytes of a value kept raw; None for a decoded one."""
    return value.raw if isinstance(value, RawJson) else None


def test_a_large_result_is_kept_as_its_bytes_and_answered_unchanged() -> None:
    body = encode_model(_outcome(ROWS))
    assert len(body) >= RAW_FROM
    outcome = decode_message(OutcomeEvent, body)
    kept = _raw(outcome.result)
    assert kept is not None
    whole = decode_event(OutcomeEvent, body)
    assert outcome.model_copy(update={"result": whole.result}) == whole
    # the answer carries the worker's bytes, and means what the decoded result means
    answer = encode_model(answer_of(outcome))
    assert kept in answer
    whole_answer = answer_of(whole)
    assert json.loads(answer) == json.loads(encode_model(whole_answer))
    assert Answer.model_validate_json(answer).result == ROWS
    # journaled, the answer is read back with its result kept raw, and written the same again
    journaled = decode_message(Answer, answer)
    assert journaled.result == outcome.result and encode_model(journaled) == answer
    # inside another reply (a status reply holds the answer), written again whole
    status = StatusReply(task_id="t1", state=TaskState.SUCCEEDED, answer=journaled)
    assert StatusReply.model_validate_json(encode_model(status)).answer == whole_answer


def test_an_outcome_batch_keeps_each_large_result_raw_and_small_ones_whole() -> None:
    def batch(result: Any) -> bytes:
        events = ",".join(encode_model(_outcome(result, f"t{i}")).decode() for i in range(3))
        return f'{{"v":1,"events":[{events}],"traceparents":[null,null,null]}}'.encode()

    big = decode_message(OutcomeBatch, batch(ROWS))
    assert [e.task_id for e in big.events] == ["t0", "t1", "t2"]
    assert [json.loads(_raw(e.result) or b"null") for e in big.events] == [ROWS] * 3
    assert big.traceparents == [None] * 3
    small = decode_message(OutcomeBatch, batch({"x": 1}))
    assert [e.result for e in small.events] == [{"x": 1}] * 3


def test_journaled_answer_batches_keep_large_results_raw_and_null_ones_null() -> None:
    big = encode_model(answer_of(_outcome(ROWS)))
    failed = encode_model(answer_of(_outcome(None)))
    body = answer_batch_body([("c1", big), ("c2", failed), ("c3", big)])
    batch = decode_message(AnswerBatch, body)
    assert [a.correlation_id for a in batch.answers] == ["c1", "c2", "c3"]
    results = [a.answer.result for a in batch.answers]
    assert [_raw(r) is not None for r in results] == [True, False, True]
    assert results[1] is None
    assert json.loads(
        answer_batch_body([(a.correlation_id, encode_model(a.answer)) for a in batch.answers])
    ) == json.loads(body)
    # a large outcome with a null result (a failure with a long traceback): null, not bytes
    long_failure = _outcome(None).model_copy(update={"worker_id": "w" * RAW_FROM})
    assert decode_message(OutcomeEvent, encode_model(long_failure)).result is None


def test_journaled_tasks_keep_large_payloads_raw_and_dispatch_them_unchanged() -> None:
    task = encode_model(_task(ROWS))
    kept = decode_message(TaskMessage, task)
    payload = _raw(kept.payload)
    assert payload is not None and payload in task
    assert json.loads(encode_model(kept)) == json.loads(task)
    tasks = b'{"v":1,"tasks":[' + task + b"," + task + b'],"traceparents":[]}'
    assert all(_raw(t.payload) for t in decode_message(TaskBatch, tasks).tasks)


OUTCOME = encode_model(_outcome(ROWS))
ODD_OUTCOMES = [
    OUTCOME.replace(b'"attempt":1', b'"attempt":"1"'),  # coerced, as decode_event does
    OUTCOME.replace(b'"worker_id":"w1"', b'"worker_id":"w1","later":true'),  # a newer field
    OUTCOME.replace(b'"result":', b'"result_":'),  # no result
    OUTCOME.replace(b'"result":[', b'"result":' + b"[" * 220, 1)[:-1] + b"]" * 220 + b"}",
]
BAD_OUTCOMES = [
    OUTCOME[:-5],
    OUTCOME.replace(b'"task_id":"t1",', b""),
    OUTCOME.replace(b'"item 1 ', b'"item \xff ', 1),
    OUTCOME.replace(b'"attempt":1', b'"attempt":"one"'),
    OUTCOME.replace(b'"status":"succeeded"', b'"status":"fine"'),
]


@pytest.mark.parametrize("body", ODD_OUTCOMES + BAD_OUTCOMES)
def test_an_outcome_not_for_this_path_is_decoded_as_before(body: bytes) -> None:
    expected, decoded = read_alike(
        lambda: decode_event(OutcomeEvent, body), lambda: decode_message(OutcomeEvent, body)
    )
    if expected is None:  # refused alike
        return
    kept = _raw(decoded.result)
    if kept is not None:
        decoded = decoded.model_copy(update={"result": json.loads(kept)})
    assert decoded == expected
