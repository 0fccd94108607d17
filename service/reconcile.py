"""The reconciler: sends again the message of a queued job that has none.

Submitting a job takes two writes: the job record (``JobStore.create_job``), then its Dramatiq
message. If Redis or the API process fails between the two, the record stays ``queued`` with no
message, and no worker would ever see it. The reconciler, run by the API process every
``reconcile_interval_s`` (and once at startup), finds queued jobs not updated for
``reconcile_after_s`` whose id is in no message of the slide queues, and sends them again.

Where a job's message can be (Dramatiq's Redis broker, ``{dq}`` = ``broker_namespace``)::

    {dq}:{queue}.msgs      HASH  redis message id -> encoded message: ready, or held by a worker
                                 (a message stays here until it is acknowledged, also while its
                                 worker is dead and before maintenance requeues it)
    {dq}:{queue}.DQ.msgs   HASH  the same for delayed messages (retries with backoff)

A job is marked (``updated_ms``, ``reconciled``) by ``JobStore.mark_resent`` before its message is
sent again: if the send fails, the next pass after ``reconcile_after_s`` tries again.

A duplicate message is harmless: a worker claims a job only while it is queued (or its lease ran
out), and a job that is running or final makes the duplicate a no-op (``service.store``). So the
checks here can be loose in the safe direction; they only have to avoid flooding the queues.
Only one API replica reconciles per interval (a Redis lock).
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterable

import redis
from dramatiq import Message
from dramatiq.errors import DecodeError

from service.logs import get_logger
from service.queue import PRIORITY_QUEUES, Actors
from service.store import JobState, JobStore

__all__ = ["Reconciler", "job_ids_with_messages", "reconcile_once"]

_log = get_logger("service.reconcile")
#: Queued jobs looked at per pass (oldest first); the rest wait for the next pass.
MAX_JOBS_PER_PASS = 1000
_SCAN_COUNT = 500  # HSCAN batch size


def job_ids_with_messages(raw: redis.Redis, broker_ns: str, queues: Iterable[str]) -> set[str]:
    """Job ids that have a message, ready or delayed, in any of ``queues``.

    Args:
        raw: a client without ``decode_responses`` (messages are bytes).
        broker_ns: Dramatiq's key prefix (``service.queue.broker_namespace``).
        queues: slide queue names.
    """
    ids: set[str] = set()
    for queue in queues:
        # Delayed first: a message only moves from the delay queue to the ready one, so scanning
        # in this order cannot miss a message that moves during the scan.
        for key in (f"{broker_ns}:{queue}.DQ.msgs", f"{broker_ns}:{queue}.msgs"):
            for _, data in raw.hscan_iter(key, count=_SCAN_COUNT):
                try:
                    message = Message.decode(data)
                except DecodeError:
                    _log.warning("undecodable message", extra={"key": key})
                    continue
                if message.args:
                    ids.add(str(message.args[0]))
    return ids


def reconcile_once(
    store: JobStore, raw: redis.Redis, actors: Actors, broker_ns: str, *, after_s: float
) -> list[str]:
    """One pass: re-send queued jobs untouched for ``after_s`` seconds that have no message.

    Returns:
        The ids of the jobs sent again.
    """
    seconds, micros = store.r.time()
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    cutoff_ms = now_ms - int(after_s * 1000)
    # The queued index is scored by created_ms: a job updated since is re-checked below.
    candidates = [
        str(i)
        for i in store.r.zrangebyscore(
            store.state_key(JobState.QUEUED), "-inf", cutoff_ms, start=0, num=MAX_JOBS_PER_PASS
        )
    ]
    if not candidates:
        return []
    present = job_ids_with_messages(raw, broker_ns, [q for q, _ in PRIORITY_QUEUES.values()])
    sent = []
    for job_id in candidates:
        if job_id in present:
            continue
        # Checked and marked in one script: a job claimed, canceled or re-sent meanwhile stays.
        priority = store.mark_resent(job_id, not_updated_since_ms=cutoff_ms)
        if priority is None:
            continue
        actors.slides.get(priority, actors.slides["normal"]).send(job_id)
        sent.append(job_id)
    if sent:
        _log.warning("re-sent queued jobs that had no message", extra={"jobs": len(sent)})
    return sent


class Reconciler(threading.Thread):
    """Runs ``reconcile_once`` every ``interval_s`` (the first pass at once) until stopped."""

    def __init__(
        self,
        store: JobStore,
        raw: redis.Redis,
        actors: Actors,
        broker_ns: str,
        *,
        interval_s: float,
        after_s: float,
    ) -> None:
        super().__init__(name="xmag-reconciler", daemon=True)
        self.store, self.raw, self.actors, self.broker_ns = store, raw, actors, broker_ns
        self.interval_s = interval_s
        self.after_s = after_s
        self.stop_event = threading.Event()
        self._lock_key = f"{store.ns}:reconcile:lock"
        self._token = uuid.uuid4().hex

    def run(self) -> None:
        while True:
            try:
                # One replica per interval; the lock expires by itself, so a dead holder is fine.
                ttl_ms = max(1, int(self.interval_s * 1000))
                if self.store.r.set(self._lock_key, self._token, nx=True, px=ttl_ms):
                    reconcile_once(
                        self.store, self.raw, self.actors, self.broker_ns, after_s=self.after_s
                    )
            except redis.RedisError as exc:  # Redis down or restarting: the next pass retries
                _log.warning("reconcile pass failed", extra={"error": repr(exc)})
            if self.stop_event.wait(self.interval_s):
                return

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=5)
