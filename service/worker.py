"""The worker process: one engine loaded once, one slide at a time, job state kept by middleware.

``run_worker`` loads the model package (``Engine.from_dir``), declares the actors, adds three
middleware and starts a Dramatiq worker with one worker thread and a prefetch of one (one process
per GPU; the blocking engine runs on that thread, not on an event loop):

* ``JobLifecycle``: claims the job record before the actor runs (attempts counter, lease,
  exactly-once compare-and-set), hands the actor its context (slide path, options, progress and
  cancel callbacks), and after it records the outcome: succeeded (result published to the results
  store), failed (input errors, never retried), canceled, queued again (a transient fault, retried
  by
  Dramatiq with backoff) or dead (attempts exhausted); then it queues the webhook.
* the heartbeat thread: the worker's record (``/readyz`` needs one live worker with its model
  loaded) and the lease of the job it runs; a worker that cannot write its heartbeat for
  ``worker_stale_s`` exits so its supervisor (``xmag serve``, Docker, systemd) restarts it.
* metrics: durations, stage timings and tile counts into Redis (``service.metrics``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dramatiq
from dramatiq.middleware import Middleware, Retries, SkipMessage
from dramatiq.middleware.time_limit import TimeLimitExceeded

from service.errors import AttemptsExhaustedError, JobTimeLimitError, UnknownTaskError
from service.logs import configure_logging, get_logger
from service.metrics import record_job
from service.queue import (
    Actors,
    declare_actors,
    make_broker,
    redis_client,
    send_webhook,
    set_context_getter,
)
from service.results import ResultsStore
from service.settings import ServiceSettings
from service.store import JobState, JobStore, new_id
from service.webhooks import build_event
from xmag.errors import JobCanceledError, XmagError

__all__ = ["JobContext", "JobLifecycle", "run_worker"]

_log = get_logger("service.worker")

#: Progress and cancel checks write/read Redis at most this often (s): one call per batch is cheap,
#: but tiny batches on a fast GPU would otherwise hammer Redis.
PROGRESS_INTERVAL_S = 0.25


@dataclass
class JobContext:
    """What the actor needs for one claimed job, and what it produced.

    Attributes:
        job_id: the job.
        attempt: this delivery's attempt number (1-based).
        slide_path: the file (or DICOM folder) the engine opens.
        staging_dir: where the engine writes; published to the results store on success.
        options: the job's slide options (JSON dict for ``SlideOptions``).
        tasks: the task heads the job asked for (empty: every head); checked before the run.
    """

    job_id: str
    attempt: int
    slide_path: Path
    staging_dir: Path
    options: dict[str, Any]
    lifecycle: JobLifecycle
    tasks: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    result: Any = None
    cancel_requested: bool = False
    _last_write: float = 0.0

    def progress(self, done: int, total: int) -> None:
        """Engine callback: tiles done / total (writes at most every PROGRESS_INTERVAL_S)."""
        now = time.monotonic()
        if done < total and now - self._last_write < PROGRESS_INTERVAL_S:
            return
        self._last_write = now
        flag = self.lifecycle.store.renew(
            self.job_id,
            self.lifecycle.worker_id,
            lease_ms=self.lifecycle.settings.lease_ms,
            done=done,
            total=total,
        )
        self.cancel_requested = self.cancel_requested or flag == 1

    def should_cancel(self) -> bool:
        """Engine callback between batches: True once a cancel was requested."""
        if not self.cancel_requested and time.monotonic() - self._last_write >= PROGRESS_INTERVAL_S:
            self._last_write = time.monotonic()
            flag = self.lifecycle.store.renew(
                self.job_id, self.lifecycle.worker_id, lease_ms=self.lifecycle.settings.lease_ms
            )
            self.cancel_requested = flag == 1
        return self.cancel_requested

    def run(self) -> None:
        """Run the engine on the slide (blocking, on the worker thread).

        Raises:
            UnknownTaskError: the job asks for a task head this worker's model does not have
                (the API checks at submission only once a worker has published its card).
            XmagError: from the engine (typed input errors, cancellation, inference faults).
        """
        from xmag.engine import SlideOptions

        heads = {head.name for head in self.lifecycle.engine.package.card.heads}
        unknown = sorted(set(self.tasks) - heads)
        if unknown:
            raise UnknownTaskError(
                f"Unknown task(s) {unknown}; this worker's model offers {sorted(heads)}. "
                "Resubmit with tasks from GET /v1/models.",
                tasks=unknown,
            )
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        self.result = self.lifecycle.engine.embed_slide(
            self.slide_path,
            self.staging_dir,
            options=SlideOptions(**self.options),
            progress=self.progress,
            should_cancel=self.should_cancel,
        )


class JobLifecycle(Middleware):
    """Job state, progress, exactly-once completion, webhooks and metrics around the slide actor."""

    def __init__(
        self,
        store: JobStore,
        actors: Actors,
        engine: Any,
        settings: ServiceSettings,
        worker_id: str,
        results: ResultsStore,
    ) -> None:
        self.store = store
        self.actors = actors
        self.engine = engine
        self.settings = settings
        self.worker_id = worker_id
        self.results = results
        self.slide_actor_names = {actor.actor_name for actor in actors.slides.values()}
        self._local = threading.local()
        self.current_job_id: str | None = None

    def current(self) -> JobContext | None:
        return getattr(self._local, "job", None)

    # Dramatiq hooks -----------------------------------------------------------------------
    def before_process_message(self, broker: dramatiq.Broker, message: Any) -> None:
        self._local.job = None
        if message.actor_name not in self.slide_actor_names:
            return
        job_id = str(message.args[0])
        claim = self.store.claim(
            job_id,
            self.worker_id,
            lease_ms=self.settings.lease_ms,
            max_attempts=self.settings.max_attempts,
        )
        log = {"job_id": job_id, "worker": self.worker_id, "outcome": claim.outcome}
        if claim.outcome == "claimed":
            record = self.store.get(job_id) or {}
            attempt = int(claim.value)
            self._local.job = JobContext(
                job_id=job_id,
                attempt=attempt,
                slide_path=Path(record["slide_path"]),
                staging_dir=self.results.staging_dir(job_id, attempt),
                options=json.loads(record.get("options") or "{}"),
                lifecycle=self,
                tasks=json.loads(record.get("tasks") or "[]"),
            )
            self.current_job_id = job_id
            _log.info("job started", extra={**log, "attempt": attempt})
            return
        if claim.outcome == "leased":
            # A live worker holds the lease (a duplicate delivery): look again when it runs out.
            broker.enqueue(message.copy(), delay=int(claim.value) + 100)
        elif claim.outcome in ("dead", "canceled"):
            self._finished(job_id, claim.outcome, job_seconds=None)
        _log.info("job skipped", extra=log)
        raise SkipMessage(f"job {job_id}: {claim.outcome}")

    def after_process_message(
        self,
        broker: dramatiq.Broker,
        message: Any,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        context = self.current()
        if context is None:
            return
        self._local.job = None
        self.current_job_id = None
        try:
            self._record_outcome(message, context, exception)
        finally:
            shutil.rmtree(context.staging_dir, ignore_errors=True)

    def _record_outcome(self, message: Any, ctx: JobContext, exc: BaseException | None) -> None:
        elapsed = time.monotonic() - ctx.started
        log = {"job_id": ctx.job_id, "attempt": ctx.attempt, "seconds": round(elapsed, 3)}
        if exc is None:
            key = self.results.publish(ctx.staging_dir)
            if self.store.finish(ctx.job_id, self.worker_id, JobState.SUCCEEDED, result_key=key):
                self._finished(ctx.job_id, "succeeded", job_seconds=elapsed, result=ctx.result)
                _log.info("job succeeded", extra=log)
            else:
                _log.warning("job finished elsewhere; result discarded", extra=log)
            return
        if isinstance(exc, JobCanceledError):
            state, error = JobState.CANCELED, exc.to_dict()
        elif isinstance(exc, TimeLimitExceeded):
            # The same slide would run past the limit again: final (no retry, see below).
            limit = self.settings.job_time_limit_s
            state = JobState.FAILED
            error = JobTimeLimitError(
                f"The job ran past its {limit:.0f} s time limit; raise XMAG_JOB_TIME_LIMIT_S."
            ).to_dict()
        elif isinstance(exc, XmagError) and not exc.transient:
            state, error = JobState.FAILED, exc.to_dict()
        elif ctx.attempt >= self.settings.max_attempts:
            cause = exc.code if isinstance(exc, XmagError) else type(exc).__name__
            state = JobState.DEAD
            error = AttemptsExhaustedError(
                f"The job failed on each of its {ctx.attempt} attempts (last: {cause}); it is "
                "dead-lettered. Check the service logs for this job id, then resubmit.",
                last_error=cause,
            ).to_dict()
        else:
            state = JobState.QUEUED  # Retries re-enqueues it with backoff
            error = (
                exc.to_dict()
                if isinstance(exc, XmagError)
                else {"code": "INFERENCE_FAILED", "message": f"{type(exc).__name__} (retrying)"}
            )
        if state != JobState.QUEUED:
            # Final: Dramatiq's Retries (which runs after this middleware) must not redeliver it.
            message.options["max_retries"] = 0
        changed = self.store.finish(ctx.job_id, self.worker_id, state, error=error)
        _log.info(
            "job " + state.value, extra={**log, "code": error.get("code"), "recorded": changed}
        )
        if changed and state != JobState.QUEUED:
            self._finished(ctx.job_id, state.value, job_seconds=elapsed)

    def _finished(
        self, job_id: str, state: str, *, job_seconds: float | None, result: Any = None
    ) -> None:
        """Metrics and the webhook for a job that just reached a final state."""
        stages, tiles, tiles_seconds = _result_figures(result)
        with contextlib.suppress(Exception):  # metrics never fail a job
            record_job(
                self.store.r,
                self.store.ns,
                state=state,
                job_seconds=job_seconds,
                stage_seconds=stages,
                tiles=tiles,
                tiles_seconds=tiles_seconds if tiles_seconds else (job_seconds or 0.0),
            )
        record = self.store.get(job_id)
        if record and record.get("callback_url"):
            send_webhook(self.actors, record["callback_url"], new_id("msg"), build_event(record))


def _result_figures(result: Any) -> tuple[dict[str, float], int, float]:
    """Stage timings (s), tiles embedded and their model seconds from a SlideResult, if any."""
    if result is None:
        return {}, 0, 0.0
    data = result.model_dump(mode="json") if hasattr(result, "model_dump") else dict(result)
    timings = data.get("timings") or {}
    stages = {str(k): float(v) for k, v in timings.items() if isinstance(v, int | float)}
    qc = data.get("qc") or {}
    tiles = int(qc.get("tiles_kept") or 0)
    return stages, tiles, float(sum(stages.values()))


class _Heartbeat(threading.Thread):
    """Writes the worker record and renews the running job's lease; exits the process if stalled."""

    def __init__(self, lifecycle: JobLifecycle, info: dict[str, str | int]) -> None:
        super().__init__(name="xmag-heartbeat", daemon=True)
        self.lifecycle = lifecycle
        self.info = info
        self.stop_event = threading.Event()
        self.last_ok = time.monotonic()

    def beat(self) -> None:
        lc = self.lifecycle
        job_id = lc.current_job_id
        lc.store.heartbeat(lc.worker_id, {**self.info, "job": job_id or ""})
        if job_id:
            lc.store.renew(job_id, lc.worker_id, lease_ms=lc.settings.lease_ms)
        path = lc.settings.worker_heartbeat_file
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(str(time.time()))
        self.last_ok = time.monotonic()

    def run(self) -> None:
        settings = self.lifecycle.settings
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


def load_engine(settings: ServiceSettings) -> Any:
    """``Engine.from_dir`` on the configured model package (once per worker process).

    The engine reads its own settings from the ``XMAG_*`` variables of ``xmag.settings``
    (``XMAG_PROVIDERS``, ``XMAG_INTRA_OP_THREADS``, ``XMAG_BATCH_SIZE``, ``XMAG_READER_WORKERS``,
    ``XMAG_QUEUE_DEPTH``, ``XMAG_TRT_FP16``, ``XMAG_TRT_CACHE_DIR``, ``XMAG_CUDA_DEVICE_ID``,
    ``XMAG_VARIANT``, ``XMAG_CACHE_DIR``); none of them clashes with a service setting.
    """
    from xmag.engine import Engine
    from xmag.settings import EngineSettings

    return Engine.from_dir(settings.model_dir, EngineSettings())


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
    engine = load_engine(settings)
    broker = make_broker(settings, redis_url)
    actors = declare_actors(broker, settings)
    store = JobStore(redis_client(redis_url), settings.namespace)
    results = ResultsStore(settings.results_store)
    lifecycle = JobLifecycle(store, actors, engine, settings, worker_id, results)
    # Before Retries: its after_process_message must see the max_retries this one sets for a final
    # outcome (Dramatiq runs after-hooks in middleware order).
    broker.add_middleware(lifecycle, before=Retries)
    set_context_getter(lifecycle.current)

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
        "started_ms": int(time.time() * 1000),
    }
    heartbeat = _Heartbeat(lifecycle, info)
    heartbeat.beat()
    heartbeat.start()

    worker = dramatiq.Worker(
        broker,
        queues=set(actors.slide_queues),
        worker_threads=1,
        worker_timeout=settings.worker_idle_timeout_ms,
    )
    worker.queue_prefetch = 1  # one slide at a time; never hoard messages other workers could run
    worker.start()
    _log.info("worker ready", extra={"worker": worker_id, "model": name})

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
