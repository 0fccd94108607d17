"""Job plumbing on a real Redis: typed records, atomic batches, the reconciler's mark, and the
slide middleware (state, metrics, webhooks) in their order around Dramatiq's Retries, run by a real
Dramatiq worker in this process.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import dramatiq
import pytest
import redis

from service.embedded_redis import EmbeddedRedis
from service.middleware import (
    JobMetricsMiddleware,
    JobStateMiddleware,
    JobWebhookMiddleware,
    install_job_middleware,
)
from service.queue import WEBHOOK_QUEUE, broker_namespace, declare_actors, make_broker
from service.settings import ServiceSettings
from service.store import FINAL_STATES, JobRecord, JobSpec, JobState, JobStore, new_id

SPEC = JobSpec(slide_kind="path", slide_path="/slides/a.svs", options={"tissue_threshold": 0.3})


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis(tmp_path_factory.mktemp("jobs-redis")) as server:
        yield server


@pytest.fixture
def store(redis_server: EmbeddedRedis) -> Iterator[JobStore]:
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    yield JobStore(client, new_id("t"))
    client.close()


def test_a_job_record_is_read_back_typed_with_its_json_fields_parsed(store: JobStore) -> None:
    job_id = store.create_job(SPEC).id
    record = store.get(job_id)
    assert record is not None
    assert record.state is JobState.QUEUED and record.options == {"tissue_threshold": 0.3}
    assert record.tasks == [] and record.error is None and record.created_ms > 0
    claim = store.claim(job_id, "w1", lease_ms=10_000, max_attempts=3)
    assert claim.outcome == "claimed" and claim.record is not None
    assert claim.record.state is JobState.RUNNING and claim.record.lease_owner == "w1"
    error = {"code": "NO_TISSUE", "message": "none"}
    finished = store.finish(job_id, "w1", JobState.FAILED, error=error)
    assert finished is not None and finished.error is not None
    assert (finished.state, finished.error.code, finished.finished_ms > 0) == (
        JobState.FAILED,
        "NO_TISSUE",
        True,
    )
    assert store.finish(job_id, "w1", JobState.SUCCEEDED) is None  # not leased any more


def test_a_batch_its_jobs_and_its_key_are_created_together_and_replayed_whole(
    store: JobStore,
) -> None:
    idem = store.idem_key("key1", "batch-7")
    jobs = [(new_id("job"), SPEC), (new_id("job"), JobSpec("path", "/b.svs", priority="high"))]
    first = store.create_batch("batch_1", jobs, idem_key=idem, idem_hash="h")
    assert first.created and first.id == "batch_1"
    again = store.create_batch("batch_2", [(new_id("job"), SPEC)], idem_key=idem, idem_hash="h")
    assert (
        not again.created
        and again.id == "batch_1"
        and again.prior
        == {
            "hash": "h",
            "kind": "batch",
            "id": "batch_1",
        }
    )
    batch = store.batch("batch_1")
    assert batch is not None and batch.size == 2
    assert batch.job_ids == [job_id for job_id, _ in jobs]
    records = store.get_many(batch.job_ids)
    assert [r.priority for r in records] == ["normal", "high"]
    assert {r.batch_id for r in records} == {""}  # the spec's batch_id is the caller's to set
    # The replay created nothing: no second batch, no orphan job.
    assert store.batch("batch_2") is None
    assert store.r.zcard(f"{store.ns}:jobs") == 2


def test_concurrent_batches_with_one_key_create_one_batch_and_no_orphan_jobs(
    store: JobStore,
) -> None:
    idem = store.idem_key("key1", "race")
    outcomes = []
    barrier = threading.Barrier(8)

    def submit(i: int) -> None:
        jobs = [(new_id("job"), SPEC) for _ in range(50)]
        barrier.wait()
        outcomes.append(store.create_batch(f"batch_{i}", jobs, idem_key=idem, idem_hash="h"))

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [o for o in outcomes if o.created]
    assert len(winners) == 1 and {o.id for o in outcomes} == {winners[0].id}
    batch = store.batch(winners[0].id)
    assert batch is not None and len(batch.job_ids) == 50
    assert store.r.zcard(f"{store.ns}:jobs") == 50


def test_the_reconciler_mark_touches_only_a_job_still_queued_and_stale(store: JobStore) -> None:
    job_id = store.create_job(JobSpec("path", "/a.svs", priority="low")).id
    record = store.get(job_id)
    assert record is not None
    assert store.mark_resent(job_id, not_updated_since_ms=record.updated_ms - 1) is None
    assert store.mark_resent(job_id, not_updated_since_ms=record.updated_ms) == "low"
    marked = store.get(job_id)
    assert marked is not None and marked.reconciled == 1
    assert marked.updated_ms >= record.updated_ms
    # Claimed meanwhile: left alone, whatever its age.
    store.claim(job_id, "w1", lease_ms=10_000, max_attempts=3)
    assert store.mark_resent(job_id, not_updated_since_ms=2**62) is None
    after = store.get(job_id)
    assert after is not None and (after.state, after.reconciled) == (JobState.RUNNING, 1)
    assert store.mark_resent("job_missing", not_updated_since_ms=2**62) is None


def _run_one(
    redis_server: EmbeddedRedis,
    tmp_path: Path,
    body: Callable[[str], None],
    *,
    max_attempts: int,
    until: Callable[[JobRecord], bool],
) -> tuple[JobStore, str, ServiceSettings]:
    """Submit one job with a callback and run it through a real worker with the job middleware.

    Args:
        body: the slide actors' function (what ``service.worker.SlideJob`` is in a worker).
        until: stops the worker once the job's record satisfies it (and its message is done).
    """
    settings = ServiceSettings(
        _env_file=None,
        namespace=new_id("mw"),
        data_dir=tmp_path,
        max_attempts=max_attempts,
        retry_min_backoff_ms=10_000,  # a retry would still sit in the delay queue at the end
        retry_max_backoff_ms=10_000,
    )
    broker = make_broker(settings, redis_server.url)
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    store = JobStore(client, settings.namespace)
    actors = declare_actors(broker, settings, slide_job=body)
    state = JobStateMiddleware(
        store,
        settings,
        "w1",
        {a.actor_name for a in actors.slides.values()},
    )
    install_job_middleware(broker, state, JobMetricsMiddleware(store), JobWebhookMiddleware(actors))
    job_id = store.create_job(JobSpec("path", "/a.svs", callback_url="http://hook/x")).id
    actors.slides["normal"].send(job_id)
    worker = dramatiq.Worker(broker, queues={"xmag-slides"}, worker_threads=1, worker_timeout=50)
    worker.start()
    try:
        deadline = time.monotonic() + 30
        record = store.get(job_id)
        while record is None or not until(record):
            assert time.monotonic() < deadline, record
            time.sleep(0.05)
            record = store.get(job_id)
    finally:
        worker.stop()  # lets the message in hand finish its after hooks (Retries included)
        broker.close()
    return store, job_id, settings


def test_a_final_failure_is_recorded_once_and_never_redelivered_by_retries(
    redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    calls: list[str] = []

    def crashes(job_id: str) -> None:
        calls.append(job_id)
        raise RuntimeError("the GPU fell off")  # transient, but this was the last attempt

    store, job_id, settings = _run_one(
        redis_server, tmp_path, crashes, max_attempts=1, until=lambda r: r.state in FINAL_STATES
    )
    record = store.get(job_id)
    assert record is not None and record.state is JobState.DEAD, record
    assert record.error is not None and record.error.code == "ATTEMPTS_EXHAUSTED"
    assert calls == [job_id]
    # Retries ran after the state middleware and saw max_retries = 0: no delayed redelivery.
    dq = broker_namespace(settings)
    assert store.r.hlen(f"{dq}:xmag-slides.DQ.msgs") == 0
    assert store.r.hlen(f"{dq}:xmag-slides.msgs") == 0
    # Metrics and webhook middleware each saw the final state once.
    assert store.r.hget(f"{settings.namespace}:metrics:jobs_finished", "dead") == "1"
    (webhook,) = store.r.hvals(f"{dq}:{WEBHOOK_QUEUE}.msgs")
    url, _, body = json.loads(webhook)["args"]
    assert url == "http://hook/x"
    assert json.loads(body)["data"]["error_code"] == "ATTEMPTS_EXHAUSTED"
    # Dramatiq keeps the failed message as a dead letter: without the slide's path.
    (dead_letter,) = store.r.hvals(f"{dq}:xmag-slides.XQ.msgs")
    assert job_id in dead_letter and "/a.svs" not in dead_letter


def test_a_transient_failure_before_the_last_attempt_is_retried_without_a_webhook(
    redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    def crashes(job_id: str) -> None:
        raise RuntimeError("the GPU fell off")

    store, job_id, settings = _run_one(
        redis_server, tmp_path, crashes, max_attempts=3, until=lambda r: r.error is not None
    )
    record = store.get(job_id)
    assert record is not None and record.state is JobState.QUEUED, record
    assert record.error is not None and record.error.code == "INFERENCE_FAILED"
    dq = broker_namespace(settings)
    assert store.r.hlen(f"{dq}:xmag-slides.DQ.msgs") == 1  # Retries put it back with backoff
    assert store.r.hget(f"{settings.namespace}:metrics:jobs_finished", "dead") is None
    assert store.r.hlen(f"{dq}:{WEBHOOK_QUEUE}.msgs") == 0
