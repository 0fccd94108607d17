"""The worker process: one engine loaded once, slides in flight, job state kept by middleware.

``run_worker`` loads the model package (``Engine.from_dir``), declares the actors with
``SlideJob`` (the slide actors' body, bound to this engine) and adds the job middleware of
``service.middleware`` (state, metrics, webhooks), then starts a Dramatiq worker (one process per
GPU; the blocking engine runs on worker threads, not on an event loop).

Slides in flight (``xmag.inflight``): the worker runs ``XMAG_SLIDES_IN_FLIGHT`` worker threads
(default 2) with a prefetch of as many messages, never more, so it
holds no message it could not start at once. Each thread runs one job through the unchanged state
machine: the state middleware claims it (attempts, lease, compare-and-set) before the actor runs,
and finishes it exactly once after. Inside the actor, hashing, the store look-up, opening and
planning run on the job's own thread, overlapping the model's work on another job; the tile
pipeline waits for the engine's model gate (one slide on the model at a time, first ready first
served; a canceled job leaves the queue at once). A job waiting at the gate is claimed and leased
like a running one (the heartbeat renews every job the worker holds), so a SIGKILL mid-prepare
loses nothing: the message is redelivered and the lease runs out, as for a kill mid-model. Its time
limit counts the wait (at most one other slide's model time). ``XMAG_SLIDES_IN_FLIGHT=1`` is one
slide at a time.

A heartbeat thread writes the worker's record (``/readyz`` needs one live worker with its model
loaded) and renews the leases of the jobs it holds; a worker that cannot write its heartbeat for
``worker_stale_s`` exits so its supervisor (``xmag serve``, Docker, systemd) restarts it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dramatiq
from dramatiq.middleware import CurrentMessage

from service.errors import ServiceUnavailableError, UnknownTaskError
from service.logs import configure_logging, get_logger
from service.middleware import (
    ClaimedJob,
    JobMetricsMiddleware,
    JobStateMiddleware,
    JobWebhookMiddleware,
    install_job_middleware,
)
from service.queue import declare_actors, make_broker, redis_client
from service.settings import ServiceSettings
from service.store import JobRecord, JobStore
from xmag.digest import DigestCache, SlideDigest
from xmag.errors import SlideNotFoundError
from xmag.inflight import SlidesInFlightSettings
from xmag.pipeline import lower_thread_priority
from xmag.store import ResultStore, StoredResult

__all__ = ["Lease", "SlideJob", "run_worker"]

_log = get_logger("service.worker")

#: Progress and cancel checks write/read Redis at most this often (s): one call per batch is cheap,
#: but tiny batches on a fast GPU would otherwise hammer Redis.
PROGRESS_INTERVAL_S = 0.25


@dataclass
class Lease:
    """The engine's callbacks for one claimed job: progress and cancel checks renew its lease.

    Attributes:
        store: the job records.
        job_id: the job.
        worker_id: the lease owner.
        lease_ms: how long each renewal holds the job.
    """

    store: JobStore
    job_id: str
    worker_id: str
    lease_ms: int
    cancel_requested: bool = False
    _last_write: float = field(default=0.0, repr=False)
    _total_written: int | None = field(default=None, repr=False)

    def progress(self, done: int, total: int) -> None:
        """Engine callback: tiles done / total (writes at most every PROGRESS_INTERVAL_S, but
        always the first report of a total and the last, so a client never misses either)."""
        now = time.monotonic()
        first = total != self._total_written
        if not first and done < total and now - self._last_write < PROGRESS_INTERVAL_S:
            return
        self._last_write = now
        self._total_written = total
        flag = self.store.renew(
            self.job_id, self.worker_id, lease_ms=self.lease_ms, done=done, total=total
        )
        self.cancel_requested = self.cancel_requested or flag == 1

    def should_cancel(self) -> bool:
        """Engine callback between batches: True once a cancel was requested."""
        if not self.cancel_requested and time.monotonic() - self._last_write >= PROGRESS_INTERVAL_S:
            self._last_write = time.monotonic()
            flag = self.store.renew(self.job_id, self.worker_id, lease_ms=self.lease_ms)
            self.cancel_requested = flag == 1
        return self.cancel_requested


class SlideJob:
    """The slide actors' body in a worker: one claimed job's result, found or computed.

    The result is named before the slide is opened (``Engine.result_key`` over the slide's sha256,
    the model and the options): an upload's sha256 travels in the job record, a by-path slide's
    comes from the ``DigestCache`` (hashed once per file version). A result already in the store
    finishes the job at once (``cache_hit``) without opening or reading the slide; only a miss
    embeds it into a staging folder published under that key (``xmag.store.lookup_or_embed``).

    Declared as the actor's function (``declare_actors(slide_job=...)``), so the engine, loaded
    once per process, is bound at declaration; the job itself comes from the current message
    (``CurrentMessage``), where ``JobStateMiddleware`` put the record it claimed. No module-level
    state: two workers in one process (tests) each have their own.

    Args:
        engine: the loaded ``xmag.engine.Engine``.
        store: the job records (lease renewals).
        results: the result store shared by every worker.
        digests: by-path slides' digests.
        settings: the lease length.
        worker_id: this worker's lease owner id.
        nice: niceness a job thread takes, relative to the process, at its first job (slides in
            flight: the next slide's hash, plan and reads yield the cores to the model, whose
            calls go back to the engine's priority, ``xmag.inflight.ModelThread``); 0: none.
            The heartbeat thread, which renews the leases, keeps its priority.
    """

    def __init__(
        self,
        engine: Any,
        store: JobStore,
        results: ResultStore,
        digests: DigestCache,
        settings: ServiceSettings,
        worker_id: str,
        nice: int = 0,
    ) -> None:
        self.engine = engine
        self.store = store
        self.results = results
        self.digests = digests
        self.settings = settings
        self.worker_id = worker_id
        self.nice = nice

    def __call__(self, job_id: str) -> StoredResult:
        """The claimed job's result, looked up or computed (blocking, on the worker thread).

        Returns:
            The stored result, ``hit`` when found (the middleware records it and its figures).

        Raises:
            ServiceUnavailableError: the job was not claimed (Redis unreachable?): retried.
            UnknownTaskError: the job asks for a task head this worker's model does not have
                (the API checks at submission only once a worker has published its card).
            XmagError: from the engine (typed input errors, cancellation, inference faults).
        """
        from xmag.params import SlideOptions
        from xmag.store import lookup_or_embed

        lower_thread_priority(self.nice)  # once per job thread; later calls change nothing
        claimed = ClaimedJob.of(CurrentMessage.get_current_message())
        if claimed is None or claimed.record.id != job_id:
            raise ServiceUnavailableError(
                f"The slide job {job_id} has no claim: the worker could not claim it (Redis "
                "unreachable?). It will be retried."
            )
        record = claimed.record
        heads = set(self.engine.package.card.tasks)  # heads and the cascade's task
        unknown = sorted(set(record.tasks) - heads)
        if unknown:
            raise UnknownTaskError(
                f"Unknown task(s) {unknown}; this worker's model offers {sorted(heads)}. "
                "Resubmit with tasks from GET /v1/models.",
                tasks=unknown,
            )
        lease = Lease(self.store, job_id, self.worker_id, self.settings.lease_ms)
        stored = lookup_or_embed(
            self.engine,
            self.results,
            Path(record.slide_path),
            self._digest(record),
            options=SlideOptions(**record.options),
            staging_name=f"{job_id}.{claimed.attempt}",
            display_name=record.display_name or None,
            progress=lease.progress,
            should_cancel=lease.should_cancel,
        )
        if stored.hit:
            # The job's progress tells the result's tiles (all done), not "0 / 0": a client
            # (the viewer's job list) shows a hit like any finished job; ``cache_hit`` says
            # nothing was computed, and the metrics count no tiles for it (middleware).
            kept = stored.result.tiles.kept
            lease.progress(kept, kept)
        return stored

    def _digest(self, record: JobRecord) -> SlideDigest:
        """The slide's sha256 and size: the upload's, else from the digest cache.

        Raises:
            SlideNotFoundError: a by-path slide was removed or made unreadable since submission.
        """
        if record.slide_sha256:
            return SlideDigest(record.slide_sha256, record.slide_size_bytes)
        try:
            return self.digests.digest(record.slide_path)
        except (FileNotFoundError, PermissionError) as exc:
            raise SlideNotFoundError(
                f"The slide cannot be read any more ({type(exc).__name__}); it was moved, "
                "removed or its permissions changed after submission. Resubmit it.",
                path=record.slide_path,
            ) from exc


class _Heartbeat(threading.Thread):
    """Writes the worker record and renews the running job's lease; exits the process if stalled."""

    def __init__(self, state: JobStateMiddleware, info: dict[str, str | int]) -> None:
        super().__init__(name="xmag-heartbeat", daemon=True)
        self.state = state
        self.info = info
        self.stop_event = threading.Event()
        self.last_ok = time.monotonic()

    def beat(self) -> None:
        st = self.state
        job_ids = st.current_job_ids
        st.store.heartbeat(st.worker_id, {**self.info, "job": ",".join(job_ids)})
        for job_id in job_ids:
            st.store.renew(job_id, st.worker_id, lease_ms=st.settings.lease_ms)
        path = st.settings.worker_heartbeat_file
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(str(time.time()))
        self.last_ok = time.monotonic()

    def run(self) -> None:
        settings = self.state.settings
        interval = min(settings.worker_heartbeat_s, settings.lease_ms / 3000)
        while not self.stop_event.wait(interval):
            try:
                self.beat()
            except Exception as exc:
                stalled = time.monotonic() - self.last_ok
                _log.warning("heartbeat failed", extra={"error": repr(exc), "stalled_s": stalled})
                if stalled > settings.worker_stale_s:
                    _log.critical(
                        "heartbeat stalled; exiting so the supervisor restarts the worker"
                    )
                    os._exit(3)


class _LoadingHeartbeat(threading.Thread):
    """While the engine loads: the heartbeat file and a worker record saying why it is not ready.

    A TensorRT engine build can take minutes, longer than a container healthcheck's start period;
    without a heartbeat the container would be killed mid-build, again and again. The record has
    ``model_loaded`` 0 (``/readyz`` does not count the worker) and ``status`` "building engine";
    a failed load leaves ``status`` "failed: <error>" until the record expires.
    """

    def __init__(self, store: JobStore, worker_id: str, settings: ServiceSettings) -> None:
        super().__init__(name="xmag-loading-heartbeat", daemon=True)
        self.store, self.worker_id, self.settings = store, worker_id, settings
        self.info: dict[str, str | int] = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "model_loaded": 0,
            "status": "building engine",
            "started_ms": int(time.time() * 1000),
        }
        self.stop_event = threading.Event()

    def beat(self) -> None:
        path = self.settings.worker_heartbeat_file
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(str(time.time()))
        self.store.heartbeat(self.worker_id, self.info)

    def run(self) -> None:
        while not self.stop_event.wait(self.settings.worker_heartbeat_s):
            try:
                self.beat()
            except Exception as exc:  # Redis down: the file still keeps the container alive
                _log.warning("loading heartbeat failed", extra={"error": repr(exc)})

    def failed(self, exc: BaseException) -> None:
        self.stop_event.set()
        self.info["status"] = f"failed: {exc}"[:500]
        with contextlib.suppress(Exception):
            self.store.heartbeat(self.worker_id, self.info)


def load_engine(settings: ServiceSettings) -> Any:
    """``Engine.from_dir`` on the configured model package (once per worker process).

    The engine settings are ``settings.engine``: the ``XMAG_*`` variables of ``xmag.settings``
    (``XMAG_PROVIDERS``, ``XMAG_INTRA_OP_THREADS``, ``XMAG_BATCH_SIZE``, ``XMAG_READER_WORKERS``,
    ``XMAG_QUEUE_DEPTH``, ``XMAG_READER_NICE``, ``XMAG_TRT_FP16``, ``XMAG_TRT_CACHE_DIR``,
    ``XMAG_CUDA_DEVICE_ID``, ``XMAG_VARIANT``), read once with the service's. Results go to the
    service's result store (``<data dir>/results``), not to the CLI's ``XMAG_CACHE_DIR``.
    """
    from xmag.engine import Engine

    return Engine.from_dir(settings.model_dir, settings.engine)


def model_card(engine: Any) -> tuple[str, dict[str, Any]]:
    """The loaded package's name@version and card (published for GET /v1/models)."""
    package = getattr(engine, "package", None)
    card = getattr(package, "card", None)
    data: dict[str, Any] = card.model_dump(mode="json") if card is not None else {}
    name = f"{data.get('name', 'model')}@{data.get('version', '0')}"
    return name, data


def run_worker(
    settings: ServiceSettings, redis_url: str, *, stop: threading.Event | None = None
) -> int:
    """Run one worker until SIGTERM/SIGINT (or ``stop``). Returns the exit status."""
    configure_logging(settings.log_level)
    worker_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    store = JobStore(redis_client(redis_url), settings.namespace)
    loading = _LoadingHeartbeat(store, worker_id, settings)
    with contextlib.suppress(Exception):  # Redis not up yet: the loop below retries
        loading.beat()
    loading.start()
    try:
        engine = load_engine(settings)  # a TensorRT build can take minutes: heartbeat meanwhile
    except BaseException as exc:
        _log.critical("engine failed to load", extra={"worker": worker_id, "error": str(exc)})
        loading.failed(exc)
        raise
    loading.stop_event.set()
    loading.join()
    in_flight = SlidesInFlightSettings().slides_in_flight
    broker = make_broker(settings, redis_url)
    digests = DigestCache(settings.data_dir / "digests")
    # Slides in flight share the CPU with the model: job threads yield to it (0 for one slide).
    nice = engine.settings.reader_nice if in_flight > 1 else 0
    slide_job = SlideJob(
        engine, store, ResultStore(settings.results_store), digests, settings, worker_id, nice
    )
    actors = declare_actors(broker, settings, slide_job=slide_job)
    state = JobStateMiddleware(
        store, settings, worker_id, {a.actor_name for a in actors.slides.values()}
    )
    install_job_middleware(broker, state, JobMetricsMiddleware(store), JobWebhookMiddleware(actors))

    name, card = model_card(engine)
    if card.get("trained") is False:
        _log.warning(
            "the model package is untrained: its embeddings and predictions carry no meaning",
            extra={"model": name, "model_dir": str(settings.model_dir)},
        )
    store.publish_model(name, card)
    info: dict[str, str | int] = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "model": name,
        "model_loaded": 1,
        "status": "ready",  # replaces the loading heartbeat's "building engine"
        "started_ms": int(time.time() * 1000),
    }
    heartbeat = _Heartbeat(state, info)
    heartbeat.beat()
    heartbeat.start()

    worker = dramatiq.Worker(
        broker,
        queues=set(actors.slide_queues),
        worker_threads=in_flight,
        worker_timeout=settings.worker_idle_timeout_ms,
    )
    # One message per slide in flight, no more: never hoard messages other workers could run.
    worker.queue_prefetch = in_flight
    worker.start()
    _log.info(
        "worker ready", extra={"worker": worker_id, "model": name, "slides_in_flight": in_flight}
    )

    stop = stop or threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(ValueError):  # not the main thread (tests)
            signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    _log.info("worker stopping", extra={"worker": worker_id})
    worker.stop(timeout=int(settings.worker_shutdown_grace_s * 1000))
    heartbeat.stop_event.set()
    with contextlib.suppress(Exception):
        store.remove_worker(worker_id)
    broker.close()
    return 0
