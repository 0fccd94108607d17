"""The slide jobs' Dramatiq middleware: one per concern.

* ``JobStateMiddleware`` claims the job record before the actor runs (attempts counter, lease,
  exactly-once compare-and-set, ``service.store``), hands the claimed record to the actor in the
  message's options, and afterwards records the outcome: succeeded (the actor's
  ``xmag.store.StoredResult``: its key, and whether it was a cache hit), failed (input errors,
  never retried), canceled, queued again (a transient fault, retried by Dramatiq with backoff) or
  dead (attempts exhausted). It writes what happened into the message's options for the two below.
* ``JobMetricsMiddleware`` adds a job that reached a final state to the metrics in Redis (a cache
  hit counts as a hit, with no tiles and no stage seconds: nothing was computed).
* ``JobWebhookMiddleware`` queues the signed webhook of a job that reached a final state.

Order (``install_job_middleware``): Dramatiq runs *before* hooks in middleware order and *after*
hooks in reverse order. The three go after ``Retries``, state last: the state's after hook runs
first, so the webhook and metrics hooks see its outcome, and ``Retries`` runs after all of them,
so it sees the ``max_retries = 0`` the state sets on a final outcome and does not redeliver it.

Message options written here (JSON, since a message can be enqueued again)::

    xmag_job       {"attempt": n, "record": JobRecord}   set before the actor runs (claimed only)
    xmag_outcome   {"record", "job_seconds"}             set when the job reached a final state
                                                         (the record without paths or messages)
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass
from typing import Any

import dramatiq
from dramatiq.middleware import Middleware, Retries, SkipMessage
from dramatiq.middleware.time_limit import TimeLimitExceeded

from service.errors import AttemptsExhaustedError, JobTimeLimitError
from service.logs import get_logger
from service.metrics import record_job
from service.queue import Actors, send_webhook
from service.settings import ServiceSettings
from service.store import JobRecord, JobState, JobStore, new_id
from service.webhooks import build_event
from xmag.errors import JobCanceledError, XmagError
from xmag.store import StoredResult

__all__ = [
    "ClaimedJob",
    "JobMetricsMiddleware",
    "JobOutcome",
    "JobStateMiddleware",
    "JobWebhookMiddleware",
    "install_job_middleware",
]

_log = get_logger("service.worker")

_CLAIM_OPTION = "xmag_job"
_OUTCOME_OPTION = "xmag_outcome"
#: The job record fields an outcome carries (``service.webhooks.build_event`` and metrics).
_OUTCOME_FIELDS: dict[str, Any] = {
    "id": True,
    "state": True,
    "cache_hit": True,
    "batch_id": True,
    "callback_url": True,
    "result_url": True,
    "job_url": True,
    "error": {"code"},
    "client": True,
    "reference": True,
    "metadata": True,
}


@dataclass(frozen=True)
class ClaimedJob:
    """A job this worker claimed for one delivery: what the actor runs.

    Attributes:
        record: the job as the claim left it (``running``, leased to this worker).
        attempt: this delivery's attempt number (1-based).
    """

    record: JobRecord
    attempt: int

    @classmethod
    def of(cls, message: Any) -> ClaimedJob | None:
        """The claim the state middleware put in ``message`` (None when it could not claim)."""
        options = getattr(message, "options", None) or {}
        data = options.get(_CLAIM_OPTION)
        if not data:
            return None
        return cls(JobRecord.model_validate(data["record"]), int(data["attempt"]))


@dataclass(frozen=True)
class JobOutcome:
    """A final state the state middleware just recorded (exactly once per job).

    Attributes:
        record: the job after the change.
        job_seconds: wall time of this delivery (None when it ended at the claim: dead, canceled).
    """

    record: JobRecord
    job_seconds: float | None

    @classmethod
    def of(cls, message: Any) -> JobOutcome | None:
        data = message.options.get(_OUTCOME_OPTION)
        if not data:
            return None
        return cls(JobRecord.model_validate(data["record"]), data["job_seconds"])

    def put(self, message: Any) -> None:
        # Only what metrics and the webhook read: the message may end in Dramatiq's dead letters,
        # and slide paths or error messages (patient identifiers hide in them) stay in the record.
        record = self.record.model_dump(mode="json", include=_OUTCOME_FIELDS)
        message.options[_OUTCOME_OPTION] = {"record": record, "job_seconds": self.job_seconds}


@dataclass
class _Running:
    job_id: str
    attempt: int
    started: float


class JobStateMiddleware(Middleware):
    """Claims, leases and finishes slide jobs (exactly-once completion).

    Args:
        store: the job records.
        settings: lease, attempts and time limit.
        worker_id: this worker's lease owner id.
        actor_names: the slide actors (other messages pass untouched).
    """

    def __init__(
        self,
        store: JobStore,
        settings: ServiceSettings,
        worker_id: str,
        actor_names: set[str],
    ) -> None:
        self.store = store
        self.settings = settings
        self.worker_id = worker_id
        self.actor_names = actor_names
        self._running: dict[str, _Running] = {}  # message id -> claimed delivery
        self._lock = threading.Lock()

    @property
    def current_job_ids(self) -> list[str]:
        """Jobs this worker holds a lease on now (renewed by the heartbeat)."""
        with self._lock:
            return [running.job_id for running in self._running.values()]

    def before_process_message(self, broker: dramatiq.Broker, message: Any) -> None:
        if message.actor_name not in self.actor_names:
            return
        # Left by an earlier delivery of this message (a retry carries its options along).
        message.options.pop(_CLAIM_OPTION, None)
        message.options.pop(_OUTCOME_OPTION, None)
        job_id = str(message.args[0])
        claim = self.store.claim(
            job_id,
            self.worker_id,
            lease_ms=self.settings.lease_ms,
            max_attempts=self.settings.max_attempts,
        )
        log = {"job_id": job_id, "worker": self.worker_id, "outcome": claim.outcome}
        if claim.outcome == "claimed" and claim.record is not None:
            attempt = int(claim.value)
            message.options[_CLAIM_OPTION] = {
                "attempt": attempt,
                "record": claim.record.model_dump(mode="json"),
            }
            with self._lock:
                self._running[message.message_id] = _Running(job_id, attempt, time.monotonic())
            _log.info("job started", extra={**log, "attempt": attempt})
            return
        if claim.outcome == "leased":
            # A live worker holds the lease (a duplicate delivery): look again when it runs out.
            broker.enqueue(message.copy(), delay=int(claim.value) + 100)
        elif claim.outcome in ("dead", "canceled") and claim.record is not None:
            JobOutcome(claim.record, job_seconds=None).put(message)
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
        with self._lock:
            running = self._running.pop(message.message_id, None)
        if running is None:
            return
        message.options.pop(_CLAIM_OPTION, None)
        self._record_outcome(message, running, result, exception)

    def _record_outcome(
        self, message: Any, run: _Running, result: Any, exc: BaseException | None
    ) -> None:
        elapsed = time.monotonic() - run.started
        log = {"job_id": run.job_id, "attempt": run.attempt, "seconds": round(elapsed, 3)}
        if exc is None and isinstance(result, StoredResult):
            record = self.store.finish(
                run.job_id,
                self.worker_id,
                JobState.SUCCEEDED,
                result_key=result.key,
                cache_hit=result.hit,
            )
            if record is not None:
                JobOutcome(record, job_seconds=elapsed).put(message)
                _log.info("job succeeded", extra={**log, "cache_hit": result.hit})
            else:
                _log.warning("job finished elsewhere; result discarded", extra=log)
            return
        if exc is None:  # an actor that returned no stored result: a bug, not the slide's fault
            exc = TypeError(f"the slide actor returned {type(result).__name__}, not StoredResult")
        state, error = self._failure(exc, run.attempt)
        if state != JobState.QUEUED:
            # Final: Retries (whose after hook runs after this one) must not redeliver it.
            message.options["max_retries"] = 0
        record = self.store.finish(run.job_id, self.worker_id, state, error=error)
        _log.info(
            "job " + state.value,
            extra={**log, "code": error.get("code"), "recorded": record is not None},
        )
        if record is not None and state != JobState.QUEUED:
            JobOutcome(record, job_seconds=elapsed).put(message)

    def _failure(self, exc: BaseException, attempt: int) -> tuple[JobState, dict[str, Any]]:
        """The state and error a failed delivery leaves the job in."""
        if isinstance(exc, JobCanceledError):
            return JobState.CANCELED, exc.to_dict()
        if isinstance(exc, TimeLimitExceeded):
            # The same slide would run past the limit again: final (no retry).
            limit = self.settings.job_time_limit_s
            return JobState.FAILED, JobTimeLimitError(
                f"The job ran past its {limit:.0f} s time limit; raise XMAG_JOB_TIME_LIMIT_S."
            ).to_dict()
        if isinstance(exc, XmagError) and not exc.transient:
            return JobState.FAILED, exc.to_dict()
        cause = exc.code if isinstance(exc, XmagError) else type(exc).__name__
        if attempt >= self.settings.max_attempts:
            return JobState.DEAD, AttemptsExhaustedError(
                f"The job failed on each of its {attempt} attempts (last: {cause}); it is "
                "dead-lettered. Check the service logs for this job id, then resubmit.",
                last_error=cause,
            ).to_dict()
        if isinstance(exc, XmagError):
            return JobState.QUEUED, exc.to_dict()  # Retries re-enqueues it with backoff
        return JobState.QUEUED, {"code": "INFERENCE_FAILED", "message": f"{cause} (retrying)"}


class _FinalOutcomeMiddleware(Middleware):
    """Calls ``final`` once for each job the state middleware moved to a final state."""

    def after_process_message(
        self,
        broker: dramatiq.Broker,
        message: Any,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        outcome = JobOutcome.of(message)
        if outcome is not None:
            self.final(outcome, result)

    def after_skip_message(self, broker: dramatiq.Broker, message: Any) -> None:
        outcome = JobOutcome.of(message)
        if outcome is not None:
            self.final(outcome, None)

    def final(self, outcome: JobOutcome, result: Any) -> None:
        raise NotImplementedError


class JobMetricsMiddleware(_FinalOutcomeMiddleware):
    """Adds each finished job's duration, stage timings and tiles to the metrics in Redis."""

    def __init__(self, store: JobStore) -> None:
        self.store = store

    def final(self, outcome: JobOutcome, result: Any) -> None:
        hit = outcome.record.cache_hit
        # A hit computed nothing: the stored result's timings are those of the run that did.
        stages, tiles, tiles_seconds = ({}, 0, 0.0) if hit else result_figures(result)
        with contextlib.suppress(Exception):  # metrics never fail a job
            record_job(
                self.store.r,
                self.store.ns,
                state=outcome.record.state.value,
                job_seconds=outcome.job_seconds,
                stage_seconds=stages,
                tiles=tiles,
                tiles_seconds=tiles_seconds if tiles_seconds else (outcome.job_seconds or 0.0),
                cache_hit=hit,
            )


class JobWebhookMiddleware(_FinalOutcomeMiddleware):
    """Queues the signed webhook of each finished job that asked for one."""

    def __init__(self, actors: Actors) -> None:
        self.actors = actors

    def final(self, outcome: JobOutcome, result: Any) -> None:
        record = outcome.record
        if record.callback_url:
            send_webhook(self.actors, record.callback_url, new_id("msg"), build_event(record))


def result_figures(result: Any) -> tuple[dict[str, float], int, float]:
    """Stage timings (s), tiles embedded and their seconds from a computed ``StoredResult``."""
    if not isinstance(result, StoredResult) or result.hit:
        return {}, 0, 0.0
    stages = {str(k): float(v) for k, v in result.result.timings.items()}
    return stages, result.result.qc.tiles_kept, float(sum(stages.values()))


def install_job_middleware(
    broker: dramatiq.Broker,
    state: JobStateMiddleware,
    metrics: JobMetricsMiddleware,
    webhooks: JobWebhookMiddleware,
) -> None:
    """Add the three after ``Retries``, state last (see the module docstring for why).

    Raises:
        RuntimeError: the broker has no ``Retries`` middleware (the order would mean nothing).
    """
    if not any(isinstance(m, Retries) for m in broker.middleware):
        raise RuntimeError("The broker needs the Retries middleware before the job middleware.")
    for middleware in (webhooks, metrics, state):
        broker.add_middleware(middleware)
