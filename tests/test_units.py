"""Pure logic, no broker: protocol decoding, the worker registry, task state, settings, handlers."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, Field, ValidationError
from yarl import URL

from amqpsched.client import _Submission, _submission_body
from amqpsched.errors import ConfigurationError, DecodeError
from amqpsched.protocol import (
    MAX_DEPTH,
    Answer,
    ErrorType,
    Kind,
    RawJson,
    RetryOverride,
    RetryPolicy,
    Status,
    SubmitRequest,
    TaskMessage,
    TaskState,
    WorkerAnnouncement,
    construct,
    decode,
    encode,
)
from amqpsched.retry import DELAY_STEPS_MS, backoff_delay, delay_step, retry_delay
from amqpsched.runtime import run
from amqpsched.scheduler.events import outcome_attempts
from amqpsched.scheduler.readback import Unread
from amqpsched.scheduler.recovery import apply_answer, apply_dispatch, apply_entry
from amqpsched.scheduler.registry import WorkerRegistry
from amqpsched.scheduler.state import MemoryTaskStore, TaskRecord, is_fenced, timeout_error
from amqpsched.schemas import check_or_write, rendered
from amqpsched.settings import Settings, env_example, mask_url, mask_urls, split_urls
from amqpsched.transport import FailoverConnection, Refusals
from amqpsched.worker.app import InvalidPayload, InvalidResult, WorkerApp, to_json
from amqpsched.worker.started import StartClock

ROOT = Path(__file__).resolve().parent.parent


# -- protocol ------------------------------------------------------------------------------------


def test_construct_builds_what_model_construct_builds() -> None:
    task: dict[str, Any] = dict(
        task_id="t1",
        capability="echo",
        payload={"a": [1, 2]},
        attempt=1,
        submitted_at=1.0,
        deadline=2.0,
        reply_to="r",
        correlation_id="c",
        direct=True,
    )
    for fields in (task, {**task, "time_limit": 3.0, "answer_batch": True}):
        fast, slow = construct(TaskMessage, **fields), TaskMessage.model_construct(**fields)
        assert fast == slow
        assert encode(fast) == encode(slow)  # every field, defaults included, in order
        assert encode(fast) == slow.model_dump_json().encode()  # pydantic's own JSON, as bytes
        assert fast.model_fields_set == slow.model_fields_set == set(fields)
    answer = construct(Answer, task_id="t1", status=Status.SUCCEEDED, result=[1], attempts=1)
    assert answer == Answer.model_construct(
        task_id="t1", status=Status.SUCCEEDED, result=[1], attempts=1
    )
    # What it does not cover is model_construct's: a name that is no field, a required field
    # missing, a default made by a factory.
    assert construct(Answer, task_id="t", status=Status.FAILED, bogus=1) == Answer.model_construct(
        task_id="t", status=Status.FAILED
    )
    assert "task_id" not in construct(Answer, status=Status.FAILED).__dict__
    one = construct(WorkerAnnouncement, worker_id="w", sent_at=1.0)
    two = construct(WorkerAnnouncement, worker_id="w", sent_at=1.0)
    assert one.capabilities == [] and one.capabilities is not two.capabilities


def test_submit_decodes_with_defaults() -> None:
    req = decode(SubmitRequest, b'{"v": 1, "capability": "echo", "payload": [1, {"a": null}]}')
    assert req.capability == "echo"
    assert req.payload == [1, {"a": None}]
    assert req.timeout is None
    assert req.task_id is None


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"{not json", "malformed_json"),
        (b"\xff\xfe", "malformed_json"),
        (b"[1, 2]", "malformed_body"),
        (b'{"capability": "echo", "payload": 1}', "missing_version"),
        (b'{"v": 2, "capability": "echo", "payload": 1}', "unknown_version"),
        (b'{"v": 1, "payload": 1}', "invalid_fields"),
        (b'{"v": 1, "capability": 5, "payload": 1}', "invalid_fields"),
        (b'{"v": 1, "capability": "a b", "payload": 1}', "invalid_fields"),
        (b'{"v": 1, "capability": "echo", "payload": 1, "timeout": -1}', "invalid_fields"),
        (b'{"v": 1, "capability": "echo", "payload": 1, "extra": 1}', "invalid_fields"),
        (b'{"v": 1, "capability": "echo", "payload": 1, "task_id": ""}', "invalid_fields"),
    ],
)
def test_bad_bodies_raise_one_error_type_with_reason_and_raw(raw: bytes, reason: str) -> None:
    with pytest.raises(DecodeError) as info:
        decode(SubmitRequest, raw)
    assert info.value.reason == reason
    assert info.value.raw == raw
    assert info.value.detail


def test_invalid_fields_name_the_field() -> None:
    with pytest.raises(DecodeError) as info:
        decode(SubmitRequest, b'{"v": 1, "capability": "echo"}')
    assert "payload" in info.value.detail


def test_committed_schemas_match_the_models() -> None:
    directory = ROOT / "docs" / "schemas"
    for name, text in rendered().items():
        assert (directory / name).read_text() == text, f"{name} is stale: run amqpsched schema"
    assert check_or_write(directory, check=True) == 0


def test_schema_check_detects_drift(tmp_path: Path) -> None:
    assert check_or_write(tmp_path, check=False) == 0
    assert check_or_write(tmp_path, check=True) == 0
    (tmp_path / "answer.schema.json").write_text("{}")
    assert check_or_write(tmp_path, check=True) == 1


def test_answer_json_has_the_contract_fields() -> None:
    answer = Answer(task_id="t1", status=Status.SUCCEEDED, result={"x": 1})
    data = json.loads(answer.model_dump_json())
    assert data["final"] is True
    assert data["v"] == 1
    assert data["status"] == "succeeded"
    assert data["result"] == {"x": 1}


# -- registry ------------------------------------------------------------------------------------


def _ann(
    worker_id: str, *caps: str, concurrency: int = 2, in_flight: int = 0
) -> WorkerAnnouncement:
    return WorkerAnnouncement.model_validate(
        {
            "worker_id": worker_id,
            "capabilities": [{"name": c, "description": f"{c} it"} for c in caps],
            "concurrency": concurrency,
            "in_flight": in_flight,
            "sent_at": 0.0,
        }
    )


def test_worker_is_live_until_deadline_then_swept() -> None:
    reg = WorkerRegistry(heartbeat_interval=1.0, miss_limit=3)
    reg.observe(Kind.HELLO, _ann("w1", "resize"), now=100.0)
    assert reg.has_live("resize")
    assert not reg.has_live("echo")
    assert reg.sweep(now=102.9) == []
    reg.observe(Kind.HEARTBEAT, _ann("w1", "resize"), now=102.9)
    assert reg.sweep(now=105.8) == []
    assert reg.sweep(now=106.0) == ["w1"]
    assert not reg.has_live("resize")


def test_heartbeats_missed_while_the_scheduler_was_cut_off_do_not_count() -> None:
    reg = WorkerRegistry(heartbeat_interval=1.0, miss_limit=3)
    reg.observe(Kind.HELLO, _ann("w1", "resize"), now=100.0)
    reg.excuse(now=110.0)  # the scheduler was off the broker from ~101 to 110
    assert reg.sweep(now=112.9) == []
    assert reg.has_live("resize")
    assert reg.sweep(now=113.1) == ["w1"]  # a whole window after, and still silent: dead


def test_goodbye_removes_at_once() -> None:
    reg = WorkerRegistry(1.0, 3)
    reg.observe(Kind.HELLO, _ann("w1", "echo"), now=0.0)
    reg.observe(Kind.GOODBYE, _ann("w1", "echo"), now=0.1)
    assert not reg.has_live("echo")
    assert len(reg) == 0


def test_heartbeat_from_unknown_worker_registers_it() -> None:
    reg = WorkerRegistry(1.0, 3)
    reg.observe(Kind.HEARTBEAT, _ann("w9", "echo"), now=0.0)
    assert reg.has_live("echo")


def test_catalog_sums_workers_slots_and_load() -> None:
    reg = WorkerRegistry(1.0, 3)
    reg.observe(Kind.HELLO, _ann("w1", "echo", "resize", concurrency=4, in_flight=1), now=0.0)
    reg.observe(Kind.HELLO, _ann("w2", "resize", concurrency=2, in_flight=2), now=0.5)
    catalog = {e.name: e for e in reg.catalog()}
    assert catalog["resize"].workers == 2
    assert catalog["resize"].slots == 6
    assert catalog["resize"].in_flight == 3
    assert catalog["echo"].workers == 1
    assert catalog["echo"].description == "echo it"


# -- task state ----------------------------------------------------------------------------------


def _record(task_id: str, deadline: float, capability: str = "echo") -> TaskRecord:
    return TaskRecord(task_id, capability, "r", "c", submitted_at=0.0, deadline=deadline)


def _answer(task_id: str) -> Answer:
    return Answer(task_id=task_id, status=Status.SUCCEEDED, result=1)


def test_due_returns_unstarted_records_past_deadline_once() -> None:
    store = MemoryTaskStore(retention=10, max_size=100)
    store.add(_record("a", 5.0))
    store.add(_record("b", 3.0))
    running = _record("c", 1.0)
    running.state = TaskState.RUNNING
    store.add(running)
    done = _record("d", 2.0)
    store.add(done)
    store.finish(done, _answer("d"), now=1.5)
    assert store.due(now=0.5) == []
    assert [r.task_id for r in store.due(now=4.0)] == ["b"]
    assert store.due(now=4.0) == []
    assert [r.task_id for r in store.due(now=6.0)] == ["a"]


def test_finished_records_kept_for_retention_then_purged() -> None:
    store = MemoryTaskStore(retention=10, max_size=100)
    rec = _record("a", 100.0)
    store.add(rec)
    store.finish(rec, _answer("a"), now=1.0)
    assert store.purge(now=10.9) == 0
    assert store.get("a") is rec
    assert rec.state == TaskState.SUCCEEDED
    assert store.purge(now=11.1) == 1
    assert store.get("a") is None


def test_store_is_bounded_and_drops_finished_first() -> None:
    store = MemoryTaskStore(retention=1000, max_size=3)
    for i in range(3):
        store.add(_record(f"t{i}", 100.0))
    first = store.get("t0")
    assert first is not None
    store.finish(store.get("t1") or first, _answer("t1"), now=1.0)
    store.add(_record("t3", 100.0))
    assert store.get("t1") is None  # the finished one went first
    assert store.get("t0") is not None
    store.add(_record("t4", 100.0))
    assert store.get("t0") is None  # then the oldest
    assert len(store) == 3


def test_results_kept_within_a_byte_budget_the_oldest_forgotten_first() -> None:
    store = MemoryTaskStore(retention=1000, max_size=100, max_result_bytes=10_000)

    def answered(task_id: str, size: int, now: float) -> TaskRecord:
        record = _record(task_id, 100.0)
        store.add(record)
        answer = Answer(task_id=task_id, status=Status.SUCCEEDED, result="small")
        if size:  # kept as the worker's bytes, as the scheduler keeps a large result
            answer.__dict__["result"] = RawJson(b'"' + b"x" * (size - 2) + b'"')
        store.finish(record, answer, now)
        return record

    answered("small", 0, 0.5)  # a small result counts nothing: kept by count and retention
    for i in range(3):
        answered(f"r{i}", 3_000, 1.0 + i)
    assert store.result_bytes == 9_000 and store.shed == 0
    answered("r3", 3_000, 5.0)  # over: the oldest holding a result goes
    assert store.get("r0") is None and store.get("r1") is not None and store.shed == 1
    assert store.result_bytes == 9_000 and store.get("small") is not None
    # reopened (its answer could not be sent), a result counts no more; answered again, it does
    r3 = store.get("r3")
    assert r3 is not None
    store.reopen(r3, TaskState.RUNNING, [])
    assert store.result_bytes == 6_000
    store.finish(r3, Answer(task_id="r3", status=Status.SUCCEEDED, result=None), 6.0)
    assert store.result_bytes == 6_000
    # a result larger than the budget is kept alone, and the next one replaces it
    answered("huge", 25_000, 7.0)
    assert [t for t in ("r1", "r2", "r3", "huge") if store.get(t)] == ["r3", "huge"]
    assert store.result_bytes == 25_000
    answered("after", 3_000, 8.0)
    assert store.get("huge") is None and store.result_bytes == 3_000
    # one whose answer is not confirmed yet stays (it may be reopened); the next oldest goes
    loop = asyncio.new_event_loop()
    unsure = answered("unsure", 3_000, 9.0)
    unsure.answering = loop.create_future()
    answered("a1", 3_000, 10.0)
    answered("a2", 3_000, 11.0)
    assert [t for t in ("after", "unsure", "a1", "a2") if store.get(t)] == ["unsure", "a1", "a2"]
    # none confirmed but the newest: over the budget until they are, then shed at a fit
    unconfirmed = [unsure, store.get("a1"), store.get("a2")]
    for record in unconfirmed:
        assert record is not None
        record.answering = loop.create_future()
    answered("b", 3_000, 12.0)
    assert store.result_bytes == 12_000
    for record in unconfirmed:
        assert record is not None
        record.answering = None
    store.fit()
    assert store.get("unsure") is None and store.result_bytes == 9_000
    loop.close()
    assert store.purge(now=2000.0) >= 1 and store.result_bytes == 0


def test_an_unreadable_outcome_still_names_its_tasks_where_it_can() -> None:
    one = b'{"v": 1, "task_id": "t1", "attempt": 2, "status": "maybe"}'
    assert outcome_attempts(one) == [("t1", 2)]
    batch = b'{"events": [{"task_id": "a", "attempt": "x"}, 7, {"task_id": ""}, {"task_id": "b"}]}'
    assert outcome_attempts(batch) == [("a", None), ("b", None)]
    for body in (b"not json", b"[1, 2]", b'{"task_id": 5}', b"[" * 100_000 + b"]" * 100_000):
        assert outcome_attempts(body) == []


def test_timeout_error_tells_no_worker_from_expired() -> None:
    assert timeout_error(has_live_worker=False) == ErrorType.NO_WORKER
    assert timeout_error(has_live_worker=True) == ErrorType.EXPIRED


# -- settings ------------------------------------------------------------------------------------


def test_password_never_in_repr_or_masked_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AMQPSCHED_AMQP_URL", "amqp://alice:s3cr3t@broker:5672/prod")
    settings = Settings()
    assert "s3cr3t" not in repr(settings)
    assert "s3cr3t" not in str(settings)
    assert settings.amqp_url_masked() == "amqp://alice:***@broker:5672/prod"
    assert settings.amqp_url.get_secret_value().endswith("@broker:5672/prod")


def test_mask_url_without_password_is_unchanged() -> None:
    assert mask_url("amqp://localhost/") == "amqp://localhost/"


def test_settings_read_env_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AMQPSCHED_DEFAULT_TIMEOUT", "12.5")
    monkeypatch.setenv("AMQPSCHED_CONCURRENCY", "3")
    settings = Settings()
    assert settings.default_timeout == 12.5
    assert settings.concurrency == 3


def test_buffered_scheduler_series_read_as_if_observed_one_by_one() -> None:
    from prometheus_client import CollectorRegistry, Counter, Histogram

    from amqpsched.metrics import LATENCY_BUCKETS, SchedulerMetrics

    registry, plain = CollectorRegistry(), CollectorRegistry()
    series = SchedulerMetrics(registry).of("echo")
    histogram = Histogram("h", "h", ["capability"], buckets=LATENCY_BUCKETS, registry=plain)
    counter = Counter("c", "c", ["capability"], registry=plain)
    values = [0.0, 0.001, 0.0011, 0.5, 2.5, 3599.0, 1e9, *LATENCY_BUCKETS]
    for round_ in range(2):  # read between the rounds: handed on once, not twice
        for v in values:
            series.end_to_end.observe(v)
            histogram.labels("echo").observe(v)
            series.submitted.inc()
            counter.labels("echo").inc()

        def samples(reg: CollectorRegistry, prefix: str) -> list[tuple[str, str, float]]:
            return [
                (s.name.removeprefix(prefix), s.labels.get("le", ""), s.value)
                for m in reg.collect()
                for s in m.samples
                if s.name.startswith(prefix) and not s.name.endswith("_created")
            ]

        assert samples(registry, "amqpsched_task_end_to_end_seconds") == samples(plain, "h")
        assert registry.get_sample_value(
            "amqpsched_tasks_submitted_total", {"capability": "echo"}
        ) == len(values) * (round_ + 1)


def test_services_run_on_the_event_loop_the_settings_choose() -> None:
    async def loop_module() -> str:
        return type(asyncio.get_running_loop()).__module__

    assert run(loop_module(), Settings()).startswith("asyncio")
    assert run(loop_module(), Settings(event_loop="uvloop")).startswith("uvloop")  # dev extra
    assert run(loop_module(), Settings(event_loop="auto")).startswith("uvloop")
    with pytest.raises(ValidationError):
        Settings(event_loop="trio")


def test_env_example_lists_every_setting() -> None:
    text = (ROOT / ".env.example").read_text()
    assert text == env_example(), "stale: run amqpsched env-example > .env.example"
    for name in Settings.model_fields:
        assert f"AMQPSCHED_{name.upper()}" in text, name


# -- handlers ------------------------------------------------------------------------------------


class Point(BaseModel):
    x: int


def test_handler_registration_and_payload_parsing() -> None:
    app = WorkerApp()

    @app.capability("pt", payload=Point)
    def pt(p: Point) -> int:
        """Doubles x.

        More text."""
        return p.x * 2

    handler = app.handlers["pt"]
    assert handler.description == "Doubles x."
    assert handler.parse({"x": 2}) == Point(x=2)
    assert handler.info().payload_schema["properties"] == {"x": {"title": "X", "type": "integer"}}
    with pytest.raises(InvalidPayload, match="x"):
        handler.parse({"x": "nope"})
    with pytest.raises(ConfigurationError):
        app.capability("pt")(pt)
    with pytest.raises(ConfigurationError):
        app.capability("bad name")


class Aliased(BaseModel):
    field_name: int = Field(alias="fieldName")


def test_results_must_be_json() -> None:
    assert to_json(Point(x=1)) == RawJson(b'{"x":1}')
    assert to_json(Aliased(fieldName=2)) == RawJson(b'{"field_name":2}')  # as model_dump() writes
    assert to_json([1, "a", None, 2**70]) == RawJson(b'[1,"a",null,1180591620717411303424]')
    # what pydantic serialises, as the client does for payloads
    when = datetime.datetime(2026, 1, 2, 3, 4, 5)
    assert to_json({"at": when, "ids": (1, 2)}) == RawJson(
        b'{"at":"2026-01-02T03:04:05","ids":[1,2]}'
    )
    assert to_json("NaN and Infinity, in words") == RawJson(b'"NaN and Infinity, in words"')
    for bad in (object(), [1, object()], "half a pair: \ud800", b"\xff"):
        with pytest.raises(InvalidResult, match="not JSON serialisable"):
            to_json(bad)
    # JSON has no NaN: not silently null, an error the client sees
    for bad in (float("nan"), {"mean": [1.0, float("-inf")]}):
        with pytest.raises(InvalidResult, match="NaN or an infinity"):
            to_json(bad)
    # nested deeper than its scheduler and its client decode: an error, not a lost answer
    nested: Any = 1
    for depth in range(1, 221):
        nested = [nested]
        if depth == MAX_DEPTH:
            assert to_json(nested).raw.startswith(b"[" * MAX_DEPTH + b"1]")
    with pytest.raises(InvalidResult, match=f"nested more than {MAX_DEPTH} deep"):
        to_json(nested)


# -- retry timing and fencing ---------------------------------------------------------------------


def test_backoff_grows_exponentially_up_to_the_cap_with_jitter_below() -> None:
    policy = RetryPolicy(max_attempts=10, backoff=1.0, multiplier=2.0, backoff_max=5.0, jitter=0.5)
    assert [backoff_delay(policy, n, rand=0.0) for n in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 5.0]
    assert backoff_delay(policy, 2, rand=0.999) == pytest.approx(1.001, abs=1e-3)
    no_jitter = RetryPolicy(backoff=1.0, jitter=0.0)
    assert backoff_delay(no_jitter, 1, rand=0.9) == 1.0


def test_delay_is_rounded_down_to_a_broker_held_step() -> None:
    assert delay_step(0.0) == DELAY_STEPS_MS[0]
    assert delay_step(0.3) == 250
    assert delay_step(1.0) == 1000
    assert delay_step(4.99) == 2000
    assert delay_step(10**6) == DELAY_STEPS_MS[-1]


def test_retry_delay_respects_type_attempts_and_deadline() -> None:
    policy = RetryPolicy(max_attempts=3, backoff=1.0, jitter=0.0)
    handler = ErrorType.HANDLER_ERROR
    assert retry_delay(policy, 1, handler, now=0.0, deadline=100.0, rand=0.0) == 1000
    assert retry_delay(policy, 2, handler, now=0.0, deadline=100.0, rand=0.0) == 2000
    assert retry_delay(policy, 3, handler, now=0.0, deadline=100.0, rand=0.0) is None
    assert retry_delay(policy, 1, ErrorType.INVALID_PAYLOAD, 0.0, 100.0, 0.0) is None
    # No retry that would start after the task's deadline.
    assert retry_delay(policy, 1, handler, now=99.5, deadline=100.0, rand=0.0) is None


def test_retry_override_changes_only_the_fields_it_sets() -> None:
    base = RetryPolicy(max_attempts=5, backoff=2.0)
    merged = RetryOverride(max_attempts=2).apply(base)
    assert merged.max_attempts == 2
    assert merged.backoff == 2.0
    assert RetryOverride().apply(base) is base


def test_results_of_superseded_attempts_are_fenced() -> None:
    record = _record("t", 10.0)
    assert not is_fenced(None, 1)
    assert not is_fenced(record, 1)
    record.attempt = 2
    assert is_fenced(record, 1)
    assert not is_fenced(record, 2)
    assert not is_fenced(record, 3)


def test_running_on_finds_the_tasks_of_a_dead_worker() -> None:
    store = MemoryTaskStore(retention=10, max_size=10)
    a, b = _record("a", 10.0), _record("b", 10.0)
    for r in (a, b):
        r.state = TaskState.RUNNING
        store.add(r)
    a.worker_id, b.worker_id = "w1", "w2"
    assert store.running_on("w1") == [a]
    assert store.open_counts() == {"echo": 2}
    store.finish(a, _answer("a"), now=1.0)
    assert store.running_on("w1") == []
    assert store.open_counts() == {"echo": 1}


def test_idempotency_keys_expire_with_their_window() -> None:
    store = MemoryTaskStore(retention=100, max_size=10, idempotency_window=5)
    rec = _record("a", 10.0)
    rec.idempotency_key = "k"
    store.add(rec)
    assert store.by_key("k", now=4.0) is rec
    assert store.by_key("k", now=6.0) is None


# -- journal recovery -----------------------------------------------------------------------------


def _task(task_id: str, attempt: int = 1, submitted_at: float = 1.0) -> TaskMessage:
    return TaskMessage(
        task_id=task_id,
        capability="echo",
        payload=1,
        attempt=attempt,
        submitted_at=submitted_at,
        deadline=submitted_at + 60,
        reply_to="r",
        correlation_id="c",
        idempotency_key="k-" + task_id,
    )


def test_recovery_rebuilds_dispatched_answered_and_cancelled_tasks() -> None:
    store = MemoryTaskStore(retention=1000, max_size=100)
    cancels: dict[str, float] = {}
    apply_entry(store, cancels, "task", _task("a").model_dump_json().encode())
    apply_entry(store, cancels, "task", _task("b").model_dump_json().encode())
    answer = Answer(task_id="b", status=Status.SUCCEEDED, result=2, attempts=1, finished_at=5.0)
    apply_entry(store, cancels, "answer", answer.model_dump_json().encode())
    apply_entry(store, cancels, "record", b'{"k": "cancelled", "task_id": "a", "until": 61.0}')
    a, b = store.get("a"), store.get("b")
    assert a is not None and b is not None
    assert a.state == TaskState.DISPATCHED and a.recovered and a.task is not None
    assert store.by_key("k-a", now=2.0) is a
    assert b.final and b.answer == answer
    assert cancels == {"a": 61.0}


def test_recovery_keeps_the_latest_attempt_and_a_replays_new_run() -> None:
    store = MemoryTaskStore(retention=1000, max_size=100)
    apply_dispatch(store, _task("a", attempt=1))
    apply_dispatch(store, _task("a", attempt=2))
    apply_dispatch(store, _task("a", attempt=1))  # an older entry read later changes nothing
    record = store.get("a")
    assert record is not None and record.attempt == 2
    apply_answer(store, Answer(task_id="a", status=Status.FAILED, finished_at=10.0))
    # A replay from the dead-letter queue: a newer dispatch of the finished id runs anew...
    apply_dispatch(store, _task("a", submitted_at=20.0))
    replayed = store.get("a")
    assert replayed is not None and not replayed.final
    # ...and the first run's answer, read again, does not end it.
    apply_answer(store, Answer(task_id="a", status=Status.FAILED, finished_at=10.0))
    assert not replayed.final


# -- broker address lists (cluster mode) ---------------------------------------------------------

NODES = "amqp://alice:s3cr3t@rabbit-0:5672/prod, amqp://alice:s3cr3t@rabbit-1:5672/prod,"


def test_one_url_or_several_comma_separated() -> None:
    assert split_urls("amqp://localhost/") == ("amqp://localhost/",)
    assert split_urls(NODES) == (
        "amqp://alice:s3cr3t@rabbit-0:5672/prod",
        "amqp://alice:s3cr3t@rabbit-1:5672/prod",
    )
    # A comma in a password is percent-encoded; the client decodes it.
    (url,) = split_urls("amqp://alice:a%2Cb@rabbit-0/")
    assert URL(url).password == "a,b"


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("", "no broker URL"),
        (" , ", "no broker URL"),
        ("http://alice:s3cr3t@rabbit-0/", "not an amqp"),
        ("amqp://alice:s3cr3t@rabbit-0/,rabbit-1", "URL 2 of 2 is not an amqp"),
        ("amqp://alice:s3,cr3t@rabbit-0/", "%2C"),  # an unencoded comma splits the password
        ("amqp://alice:s3cr3t@rabbit-0:port/", "not an amqp"),
        ("amqp://alice:s3cr3t@rabbit-0/,amqps://alice:s3cr3t@rabbit-1/", "TLS for all"),
        ("amqp://alice:s3cr3t@rabbit-0/a,amqp://alice:s3cr3t@rabbit-1/b", "different vhosts"),
    ],
)
def test_bad_url_lists_are_refused_without_showing_them(value: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason) as caught:
        split_urls(value)
    assert "s3" not in str(caught.value)
    with pytest.raises(ValidationError) as refused:
        Settings(amqp_url=value)
    assert "s3" not in str(refused.value)


def test_default_vhost_written_either_way_is_one_vhost() -> None:
    assert len(split_urls("amqp://rabbit-0,amqp://rabbit-1:5673/")) == 2


def test_every_password_masked_in_a_url_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AMQPSCHED_AMQP_URL", NODES)
    settings = Settings()
    assert settings.amqp_url_masked() == (
        "amqp://alice:***@rabbit-0:5672/prod,amqp://alice:***@rabbit-1:5672/prod"
    )
    assert "s3cr3t" not in repr(settings)
    assert [url.get_secret_value() for url in settings.amqp_urls()] == list(split_urls(NODES))
    assert "s3cr3t" not in repr(settings.amqp_urls())


def test_masking_hides_a_part_that_is_not_a_url() -> None:
    # Never validated (a model_copy, say): the stray half of a password is not shown.
    assert mask_urls("amqp://alice:s3,cr3t@rabbit-0/") == "<not a URL>,<not a URL>"
    assert mask_urls("amqp://rabbit-0/") == mask_url("amqp://rabbit-0/")


async def test_failover_connection_moves_to_the_next_address_once_connected() -> None:
    urls = ["amqp://alice:s3cr3t@rabbit-0/", "amqp://rabbit-1/", "amqp://rabbit-2/"]
    conn = FailoverConnection(urls, 1)
    lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    lost.set_exception(ConnectionResetError())
    try:
        assert conn.url.host == "rabbit-1"
        await conn._on_connection_close(lost)  # a first attempt: connect() tries the next one
        assert conn.url.host == "rabbit-1"
        conn.connection_attempt = 1  # it has been connected: aio-pika's reconnect loop runs
        hosts = []
        for _ in range(3):
            await conn._on_connection_close(lost)
            hosts.append(conn.url.host)
        assert hosts == ["rabbit-2", "rabbit-0", "rabbit-1"]
        assert "s3cr3t" not in str(conn) and "s3cr3t" not in repr(conn)
    finally:
        await conn.close()
    await conn._on_connection_close(lost)  # closed: no more moves
    assert conn.url.host == "rabbit-1"


# -- journal writes read back --------------------------------------------------------------------


def test_a_confirmed_write_is_lost_once_a_later_one_is_read_back() -> None:
    unread = Unread()
    unread.sent(b"a", Kind.ANSWER, 1.0)
    unread.confirmed(b"a", Kind.ANSWER, 1.5)
    unread.sent(b"b", Kind.TASK, 1.2)  # sent before a's confirm: may precede it in the stream
    unread.confirmed(b"b", Kind.TASK, 1.6)
    unread.read(b"b")
    assert unread.lost(2.0) == []
    unread.sent(b"c", Kind.TASK, 2.0)  # sent after a's confirm: a, if stored, comes before it
    unread.read(b"c")
    assert unread.lost(2.1) == [(b"a", Kind.ANSWER)]
    assert unread.lost(2.2) == [] and len(unread) == 0


def test_writes_read_back_unconfirmed_or_failed_are_not_lost() -> None:
    unread = Unread()
    unread.sent(b"a", Kind.ANSWER, 1.0)
    unread.read(b"a")  # read back before its confirm was handled
    unread.confirmed(b"a", Kind.ANSWER, 1.1)
    unread.sent(b"b", Kind.ANSWER, 1.0)  # not confirmed yet: not known to be lost
    unread.sent(b"c", Kind.TASK, 1.0)
    unread.failed(b"c", Kind.TASK)  # its sender deals with it
    unread.sent(b"d", Kind.TASK, 2.0)
    unread.read(b"d")
    assert unread.lost(2.0) == []
    assert len(unread) == 1


def test_journal_records_are_read_back_one_line_at_a_time() -> None:
    unread = Unread()
    unread.sent(b'{"k":"alive"}\n{"k":"started"}', Kind.JOURNAL, 1.0)
    unread.confirmed(b'{"k":"alive"}\n{"k":"started"}', Kind.JOURNAL, 1.1)
    unread.read(b'{"k":"alive"}')
    unread.sent(b"later", Kind.TASK, 2.0)
    unread.read(b"later")
    assert unread.lost(2.0) == [(b'{"k":"started"}', Kind.JOURNAL)]


def test_writes_never_read_back_are_forgotten_after_a_while() -> None:
    unread = Unread()
    unread.sent(b"a", Kind.ANSWER, 1.0)
    assert unread.lost(500.0) == [] and len(unread) == 1
    assert unread.lost(1000.0) == [] and len(unread) == 0


def test_a_channel_is_replaced_after_repeated_refusals_at_most_once_a_window() -> None:
    refusals = Refusals(limit=3, window=2.0)
    assert not refusals.refused(0.0) and not refusals.refused(1.0)
    assert not refusals.refused(2.5), "the first one is out of the window"
    assert refusals.refused(2.9)
    assert not any(refusals.refused(t) for t in (3.0, 3.1, 3.2, 4.8)), "just replaced"
    assert refusals.refused(5.0)


def test_started_notices_are_sent_in_order_once_due_and_never_once_discarded() -> None:
    """One timer serves every running attempt's `started` notice: due ones are sent oldest
    first, a discarded one (its attempt finished in time) never is."""

    class Notice:
        def __init__(self, name: str, sent: list[str], all_sent: asyncio.Event) -> None:
            self.name, self.sent, self.all_sent = name, sent, all_sent

        def send(self) -> None:
            self.sent.append(self.name)
            if len(self.sent) == 2:
                self.all_sent.set()

    async def scenario() -> tuple[list[str], int]:
        clock = StartClock(delay=0.02)
        sent: list[str] = []
        done = asyncio.Event()
        a, b, c = (Notice(n, sent, done) for n in "abc")
        clock.add(a)
        clock.add(b)
        clock.discard(a)
        await asyncio.sleep(0)  # c comes a moment later: due later
        clock.add(c)
        await asyncio.wait_for(done.wait(), 5)
        return sent, len(clock)

    assert asyncio.run(scenario()) == (["b", "c"], 0)


def test_a_started_service_freezes_what_exists_and_collects_less_often() -> None:
    import gc

    from amqpsched.runtime import GC_THRESHOLDS, WORKER_GC_THRESHOLDS, tune_gc

    before = gc.get_threshold()
    try:
        tune_gc(WORKER_GC_THRESHOLDS)
        assert gc.get_threshold() == WORKER_GC_THRESHOLDS
        tune_gc()
        assert gc.get_threshold() == GC_THRESHOLDS
        assert gc.get_freeze_count() > 0
        assert Settings().gc_tuning  # on by default; AMQPSCHED_GC_TUNING=false keeps Python's
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def test_a_submission_is_serialised_as_json_and_rejects_what_is_not() -> None:
    @dataclasses.dataclass
    class Point:
        x: int
        y: float

    payload = {"text": "é\u2028", "n": [1, 2.5, None, True], "when": datetime.date(2026, 1, 2)}
    body = _submission_body("echo", {**payload, "point": Point(1, 2.5)}, task_id="t1", timeout=9.0)
    sub = _Submission.of(body, "corr1", None)
    single = json.loads(sub.single)
    assert single["v"] == 1 and single["task_id"] == "t1" and single["timeout"] == 9.0
    assert single["payload"] == {
        "text": "é\u2028",
        "n": [1, 2.5, None, True],
        "when": "2026-01-02",
        "point": {"x": 1, "y": 2.5},
    }
    item = json.loads(sub.item)
    assert item["correlation_id"] == "corr1" and item["payload"] == single["payload"]
    with pytest.raises(TypeError, match="not JSON serialisable"):
        _Submission.of(_submission_body("echo", object()), "c", None)
    # NaN goes as NaN, which the scheduler refuses as not JSON (it is not silently null)
    assert b"NaN" in _Submission.of(_submission_body("echo", float("nan")), "c", None).single


@pytest.mark.parametrize(
    "payload",
    [b"NaN", b"Infinity", b"-Infinity", b"[1, NaN]", b'{"a": Infinity}'],
)
def test_nan_and_infinity_are_refused_wherever_they_are(payload: bytes) -> None:
    raw = b'{"v": 1, "capability": "echo", "payload": ' + payload + b', "task_id": "t"}'
    with pytest.raises(DecodeError) as info:
        decode(SubmitRequest, raw)
    assert info.value.reason == "malformed_json"


def test_nan_and_infinity_inside_strings_are_text() -> None:
    for text in (b"NaN", b"Infinity", b"N" * 100, b"I" * 100):
        raw = b'{"v": 1, "capability": "echo", "payload": "' + text + b'", "task_id": "t"}'
        assert decode(SubmitRequest, raw).payload == text.decode()
