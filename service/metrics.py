"""Prometheus metrics, kept in Redis so every worker's figures reach the API's ``/metrics``.

Why Redis and not ``prometheus_client``'s multiprocess folder: workers run on other machines
(compose replicas, ``xmag worker`` elsewhere) that share Redis but no folder; Redis is already the
shared state
of the service, a worker's increments are one pipelined round trip per job, and a scrape reads a few
hashes. Counters survive worker restarts (they live in Redis, persisted with the AOF).

Keys::

    {ns}:metrics:jobs_finished      HASH state -> count of jobs that reached it
    {ns}:metrics:job_seconds        HASH "le:<bound>" -> cumulative count, "sum", "count"
    {ns}:metrics:stage_seconds      HASH "<stage>|le:<bound>", "<stage>|sum", "<stage>|count"
    {ns}:metrics:tiles              HASH "tiles" -> tiles embedded, "seconds" -> time embedding them
    {ns}:metrics:cache              HASH "hits" -> succeeded jobs answered from the result store
                                         (they add no tiles and no stage seconds)

Job states and queue depth are read live from the job indexes and Dramatiq's queues at scrape time.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import redis
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector

from service.store import JobState, decode_hash

__all__ = ["JOB_BUCKETS_S", "STAGE_BUCKETS_S", "RedisMetricsCollector", "record_job"]

#: Job duration buckets (s): small slides take seconds, big ones minutes.
JOB_BUCKETS_S = (1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
#: Stage duration buckets (s).
STAGE_BUCKETS_S = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


def _observe(
    pipe: redis.client.Pipeline, key: str, prefix: str, value: float, bounds: tuple[float, ...]
) -> None:
    for bound in bounds:
        if value <= bound:
            pipe.hincrby(key, f"{prefix}le:{bound}", 1)
    pipe.hincrbyfloat(key, f"{prefix}sum", value)
    pipe.hincrby(key, f"{prefix}count", 1)


def record_job(
    client: redis.Redis,
    namespace: str,
    *,
    state: str,
    job_seconds: float | None,
    stage_seconds: Mapping[str, float] | None = None,
    tiles: int = 0,
    tiles_seconds: float = 0.0,
    cache_hit: bool = False,
) -> None:
    """Add one finished job's figures (called by the worker's metrics middleware).

    Args:
        cache_hit: the job's result was found in the result store (counted as a hit).
    """
    base = f"{namespace}:metrics"
    with client.pipeline(transaction=False) as pipe:
        pipe.hincrby(f"{base}:jobs_finished", state, 1)
        if job_seconds is not None:
            _observe(pipe, f"{base}:job_seconds", "", job_seconds, JOB_BUCKETS_S)
        for stage, seconds in (stage_seconds or {}).items():
            _observe(pipe, f"{base}:stage_seconds", f"{stage}|", float(seconds), STAGE_BUCKETS_S)
        if tiles:
            pipe.hincrby(f"{base}:tiles", "tiles", tiles)
            pipe.hincrbyfloat(f"{base}:tiles", "seconds", tiles_seconds)
        if cache_hit:
            pipe.hincrby(f"{base}:cache", "hits", 1)
        pipe.execute()


def _histogram(
    fields: Mapping[str, str], bounds: tuple[float, ...]
) -> tuple[list[tuple[str, float]], float]:
    """Prometheus buckets ``(upper bound, cumulative count)`` and the sum of one histogram hash.

    ``fields`` holds ``le:<bound>`` counts, ``count`` and ``sum`` (see ``_observe``).
    """
    buckets = [(str(b), float(fields.get(f"le:{b}", 0))) for b in bounds]
    buckets.append(("+Inf", float(fields.get("count", 0))))
    return buckets, float(fields.get("sum", 0.0))


class RedisMetricsCollector(Collector):
    """Reads the service's metrics from Redis at scrape time.

    Args:
        client: redis-py client (``decode_responses=True``).
        namespace: job key prefix.
        queues: Dramatiq queue names to report depth for.
        broker_namespace: Dramatiq's key prefix.
        worker_stale_s: heartbeat age after which a worker no longer counts as alive.
    """

    def __init__(
        self,
        client: redis.Redis,
        namespace: str,
        queues: list[str],
        broker_namespace: str,
        worker_stale_s: float,
    ) -> None:
        self.r = client
        self.ns = namespace
        self.queues = queues
        self.broker_ns = broker_namespace
        self.worker_stale_s = worker_stale_s

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily | HistogramMetricFamily]:
        from service.store import JobStore

        store = JobStore(self.r, self.ns)
        by_state = GaugeMetricFamily("xmag_jobs", "Jobs currently in each state.", labels=["state"])
        for state, count in store.counts_by_state().items():
            by_state.add_metric([state], count)
        yield by_state

        finished = CounterMetricFamily(
            "xmag_jobs_finished", "Jobs that reached a final state.", labels=["state"]
        )
        counts = decode_hash(self.r.hgetall(f"{self.ns}:metrics:jobs_finished"))
        for state in (s.value for s in JobState if s not in (JobState.QUEUED, JobState.RUNNING)):
            finished.add_metric([state], float(counts.get(state, 0)))
        yield finished

        hits = decode_hash(self.r.hgetall(f"{self.ns}:metrics:cache"))
        yield CounterMetricFamily(
            "xmag_jobs_cache_hits",
            "Jobs answered from the result store without opening their slide.",
            value=float(hits.get("hits", 0)),
        )

        job_fields = decode_hash(self.r.hgetall(f"{self.ns}:metrics:job_seconds"))
        buckets, total = _histogram(job_fields, JOB_BUCKETS_S)
        hist = HistogramMetricFamily("xmag_job_duration_seconds", "Wall time of finished jobs.")
        hist.add_metric([], buckets, total)
        yield hist

        stage_fields = decode_hash(self.r.hgetall(f"{self.ns}:metrics:stage_seconds"))
        stages = sorted({k.split("|", 1)[0] for k in stage_fields})
        stage_hist = HistogramMetricFamily(
            "xmag_stage_duration_seconds",
            "Time per pipeline stage of succeeded jobs.",
            labels=["stage"],
        )
        for stage in stages:
            fields = {
                k.split("|", 1)[1]: v for k, v in stage_fields.items() if k.startswith(stage + "|")
            }
            buckets, total = _histogram(fields, STAGE_BUCKETS_S)
            stage_hist.add_metric([stage], buckets, total)
        yield stage_hist

        tiles = decode_hash(self.r.hgetall(f"{self.ns}:metrics:tiles"))
        n_tiles, seconds = float(tiles.get("tiles", 0)), float(tiles.get("seconds", 0.0))
        yield CounterMetricFamily("xmag_tiles", "Tiles embedded by all workers.", value=n_tiles)
        yield CounterMetricFamily(
            "xmag_tiles_seconds", "Job seconds spent on those tiles.", value=seconds
        )
        yield GaugeMetricFamily(
            "xmag_tiles_per_second",
            "Tiles embedded per second of job time, over all finished jobs.",
            value=n_tiles / seconds if seconds > 0 else 0.0,
        )

        depth = GaugeMetricFamily(
            "xmag_queue_depth",
            "Messages waiting per queue (delayed retries included).",
            labels=["queue"],
        )
        with self.r.pipeline(transaction=False) as pipe:
            for queue in self.queues:
                pipe.llen(f"{self.broker_ns}:{queue}")
                pipe.hlen(f"{self.broker_ns}:{queue}.DQ.msgs")
            values = pipe.execute()
        for i, queue in enumerate(self.queues):
            depth.add_metric([queue], float(values[2 * i] + values[2 * i + 1]))
        yield depth

        yield GaugeMetricFamily(
            "xmag_workers_alive",
            "Workers with a recent heartbeat.",
            value=len(store.live_workers(self.worker_stale_s)),
        )
