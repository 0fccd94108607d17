"""Job records in Redis: the state machine, leases, attempts, batches and idempotency keys.

Redis key layout (``{ns}`` is ``ServiceSettings.namespace``, ``xmag`` by default)::

    {ns}:job:{job_id}            HASH  one job: state, priority, created_ms/started_ms/finished_ms/
                                       updated_ms, attempts (deliveries, crash requeues included),
                                       completions (times it reached `succeeded`: 1 at most),
                                       lease_owner + lease_until_ms (the worker running it),
                                       slide_kind (upload|path), slide_path, slide_id, options,
                                       tasks (json), callback_url, result_url, batch_id,
                                       tiles_done, tiles_total, error (json {code, message}),
                                       result_key, cancel_requested (0|1)
    {ns}:jobs                    ZSET  every job id, scored by created_ms
    {ns}:jobs:{state}            ZSET  job ids in that state, scored by created_ms (for listing)
    {ns}:batch:{batch_id}        HASH  id, created_ms, size
    {ns}:batch:{batch_id}:jobs   LIST  job ids in submission order
    {ns}:idem:{principal}:{key}  STRING json {hash, kind, id}: an Idempotency-Key, kept 24 h
    {ns}:slide:{sha256}          HASH  an uploaded slide: sha256, size_bytes, ext, created_ms
    {ns}:apikeys                 HASH  sha256(key) hex -> json {id, scopes, created_ms, source}
    {ns}:workers                 ZSET  worker id -> last heartbeat (ms)
    {ns}:worker:{worker_id}      HASH  pid, host, model, model_loaded, started_ms, job (expires)
    {ns}:models                  HASH  "name@version" -> model card json (published by workers)
    {ns}:webhook_secret          STRING the generated Standard Webhooks secret (when none is set)
    {ns}:metrics:*               see service.metrics
    {ns}-dq:*                    Dramatiq's broker keys (queues, acks, heartbeats, dead letters)

Every state change is one Lua script (atomic, clock from Redis ``TIME`` so workers on several
machines agree). A worker must *claim* a job before running it and may only *finish* it while it
holds the lease: a message redelivered after a crash, or a duplicate, finds the job final (no-op) or
leased by a live worker (put back until the lease runs out). That compare-and-set makes completion
happen exactly once even though Dramatiq delivers at least once.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import redis
from redis.typing import EncodableT, FieldT

__all__ = [
    "FINAL_STATES",
    "Claim",
    "JobState",
    "JobStore",
    "decode_hash",
    "new_id",
    "request_hash",
]

#: Idempotency keys are remembered this long (s): long enough for any client retry loop.
IDEMPOTENCY_TTL_S = 24 * 3600
#: Worker records expire this long after their last heartbeat (s).
WORKER_RECORD_TTL_S = 24 * 3600


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"
    DEAD = "dead"  # dead-lettered: attempts exhausted (crashes or transient faults)


FINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELED, JobState.DEAD})


def new_id(prefix: str) -> str:
    """A random id, time-ordered by its first characters (``job_0190f2...``)."""
    return f"{prefix}_{int(time.time() * 1000):012x}{uuid.uuid4().hex[:16]}"


def request_hash(payload: Any) -> str:
    """sha256 of a request body in canonical JSON (for Idempotency-Key comparisons)."""
    return hashlib.sha256(
        json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()


_LUA_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# Moves a job between state indexes; KEYS[1] = job hash, ARGV[1] = namespace.
_LUA_MOVE = """
local function move(jobkey, ns, id, old, new, created)
  if old then redis.call('ZREM', ns .. ':jobs:' .. old, id) end
  redis.call('ZADD', ns .. ':jobs:' .. new, created, id)
  redis.call('HSET', jobkey, 'state', new)
end
"""

# KEYS: job hash, idem key (or "")  ARGV: ns, id, request hash, ttl, kind, then field/value pairs.
_CREATE = (
    _LUA_NOW
    + _LUA_MOVE
    + """
local ns, id, rhash, ttl, kind = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5]
if KEYS[2] ~= '' then
  local prior = redis.call('GET', KEYS[2])
  if prior then return {'existing', prior} end
  redis.call('SET', KEYS[2], cjson.encode({hash=rhash, kind=kind, id=id}), 'EX', ttl)
end
for i = 6, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('HSET', KEYS[1], 'id', id, 'created_ms', now, 'updated_ms', now, 'attempts', 0,
  'completions', 0, 'tiles_done', 0, 'tiles_total', 0, 'cancel_requested', 0)
redis.call('ZADD', ns .. ':jobs', now, id)
move(KEYS[1], ns, id, nil, 'queued', now)
return {'created', id}
"""
)

# KEYS: job  ARGV: ns, id, worker, lease_ms, max_attempts
_CLAIM = (
    _LUA_NOW
    + _LUA_MOVE
    + """
local ns, id, worker = ARGV[1], ARGV[2], ARGV[3]
local lease_ms, max_attempts = tonumber(ARGV[4]), tonumber(ARGV[5])
local s = redis.call('HMGET', KEYS[1], 'state', 'lease_owner', 'lease_until_ms', 'created_ms',
  'cancel_requested')
local state, owner, until_ms, created = s[1], s[2], tonumber(s[3] or '0'), s[4]
if not state then return {'missing', 0} end
if state == 'succeeded' or state == 'failed' or state == 'canceled' or state == 'dead' then
  return {'final', state}
end
if s[5] == '1' then
  move(KEYS[1], ns, id, state, 'canceled', created)
  redis.call('HSET', KEYS[1], 'finished_ms', now, 'updated_ms', now, 'lease_owner', '',
    'error', cjson.encode({code='JOB_CANCELED', message='The job was canceled.'}))
  return {'canceled', 0}
end
if state == 'running' and owner ~= worker and until_ms > now then
  return {'leased', until_ms - now}
end
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
if attempts > max_attempts then
  move(KEYS[1], ns, id, state, 'dead', created)
  redis.call('HSET', KEYS[1], 'finished_ms', now, 'updated_ms', now, 'lease_owner', '',
    'error', cjson.encode({code='ATTEMPTS_EXHAUSTED', message='The job was delivered ' ..
      (attempts - 1) .. ' times without finishing (its worker crashed or failed transiently ' ..
      'each time); it is dead-lettered. Inspect the slide, then resubmit it.'}))
  return {'dead', attempts - 1}
end
move(KEYS[1], ns, id, state, 'running', created)
redis.call('HSET', KEYS[1], 'lease_owner', worker, 'lease_until_ms', now + lease_ms,
  'updated_ms', now, 'worker', worker)
if not redis.call('HGET', KEYS[1], 'started_ms') then
  redis.call('HSET', KEYS[1], 'started_ms', now)
end
return {'claimed', attempts}
"""
)

# KEYS: job  ARGV: worker, lease_ms, tiles_done (or ''), tiles_total (or '')
_RENEW = (
    _LUA_NOW
    + """
local s = redis.call('HMGET', KEYS[1], 'state', 'lease_owner', 'cancel_requested')
if s[1] ~= 'running' or s[2] ~= ARGV[1] then return -1 end
redis.call('HSET', KEYS[1], 'lease_until_ms', now + tonumber(ARGV[2]), 'updated_ms', now)
if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'tiles_done', ARGV[3], 'tiles_total', ARGV[4]) end
return tonumber(s[3] or '0')
"""
)

# KEYS: job  ARGV: ns, id, worker, new state, error json or '', result key or ''
_FINISH = (
    _LUA_NOW
    + _LUA_MOVE
    + """
local ns, id, worker, new = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local s = redis.call('HMGET', KEYS[1], 'state', 'lease_owner', 'created_ms')
if s[1] ~= 'running' or s[2] ~= worker then return 0 end
move(KEYS[1], ns, id, s[1], new, s[3])
redis.call('HSET', KEYS[1], 'lease_owner', '', 'lease_until_ms', 0, 'updated_ms', now)
if ARGV[5] ~= '' then redis.call('HSET', KEYS[1], 'error', ARGV[5]) end
if new ~= 'queued' then redis.call('HSET', KEYS[1], 'finished_ms', now) end
if new == 'succeeded' then
  redis.call('HSET', KEYS[1], 'result_key', ARGV[6])
  redis.call('HDEL', KEYS[1], 'error')
  redis.call('HINCRBY', KEYS[1], 'completions', 1)
end
return 1
"""
)

# KEYS: job  ARGV: ns, id
_CANCEL = (
    _LUA_NOW
    + _LUA_MOVE
    + """
local s = redis.call('HMGET', KEYS[1], 'state', 'created_ms')
if not s[1] then return 'missing' end
if s[1] == 'queued' then
  move(KEYS[1], ARGV[1], ARGV[2], 'queued', 'canceled', s[2])
  redis.call('HSET', KEYS[1], 'finished_ms', now, 'updated_ms', now, 'cancel_requested', 1,
    'error', cjson.encode({code='JOB_CANCELED', message='The job was canceled.'}))
  return 'canceled'
end
if s[1] == 'running' then
  redis.call('HSET', KEYS[1], 'cancel_requested', 1, 'updated_ms', now)
  return 'requested'
end
return s[1]
"""
)


@dataclass(frozen=True)
class Claim:
    """Outcome of a worker's claim on a job.

    Attributes:
        outcome: ``claimed`` (run it), ``final`` (finished already: no-op), ``leased`` (a live
            worker
            holds it), ``dead`` (attempts exhausted now), ``canceled``, ``missing``.
        value: attempts (claimed/dead), final state (final) or lease ms left (leased).
    """

    outcome: str
    value: str | int


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def decode_hash(record: Mapping[Any, Any]) -> dict[str, str]:
    """A Redis hash as ``str -> str`` (redis-py types replies as ``bytes | str`` unions)."""
    return {_s(k): _s(v) for k, v in record.items()}


class JobStore:
    """Typed access to the job records; every mutation is atomic.

    Args:
        client: a redis-py client (``decode_responses=True``).
        namespace: key prefix.
    """

    def __init__(self, client: redis.Redis, namespace: str = "xmag") -> None:
        self.r = client
        self.ns = namespace
        self._create = client.register_script(_CREATE)
        self._claim = client.register_script(_CLAIM)
        self._renew = client.register_script(_RENEW)
        self._finish = client.register_script(_FINISH)
        self._cancel = client.register_script(_CANCEL)

    # keys
    def job_key(self, job_id: str) -> str:
        return f"{self.ns}:job:{job_id}"

    def state_key(self, state: str) -> str:
        return f"{self.ns}:jobs:{state}"

    def batch_key(self, batch_id: str) -> str:
        return f"{self.ns}:batch:{batch_id}"

    def idem_key(self, principal: str, key: str) -> str:
        return f"{self.ns}:idem:{principal}:{hashlib.sha256(key.encode()).hexdigest()[:32]}"

    # creation
    def create_job(
        self,
        fields: dict[str, str],
        *,
        job_id: str | None = None,
        idem_key: str = "",
        idem_hash: str = "",
        kind: str = "job",
    ) -> tuple[bool, str]:
        """Create a queued job; with an idempotency key, only if the key is new.

        Returns:
            ``(True, job_id)`` when created, ``(False, prior_record_json)`` when the idempotency key
            already exists (the caller compares hashes).
        """
        job_id = job_id or new_id("job")
        args: list[str] = [self.ns, job_id, idem_hash, str(IDEMPOTENCY_TTL_S), kind]
        for key, value in fields.items():
            args += [key, value]
        outcome, value = self._create(keys=[self.job_key(job_id), idem_key], args=args)
        return _s(outcome) == "created", _s(value)

    def remember_idempotency(self, idem_key: str, idem_hash: str, kind: str, obj_id: str) -> bool:
        """Store an idempotency key for a batch (SET NX). False when the key exists already."""
        payload = json.dumps({"hash": idem_hash, "kind": kind, "id": obj_id})
        return bool(self.r.set(idem_key, payload, nx=True, ex=IDEMPOTENCY_TTL_S))

    def idempotency_record(self, idem_key: str) -> dict[str, str] | None:
        raw = self.r.get(idem_key)
        return json.loads(raw) if raw else None

    def create_batch(self, batch_id: str, job_ids: Sequence[str]) -> None:
        """Record a batch and its jobs (in submission order)."""
        now = int(time.time() * 1000)
        with self.r.pipeline(transaction=True) as pipe:
            pipe.hset(
                self.batch_key(batch_id),
                mapping={"id": batch_id, "created_ms": now, "size": len(job_ids)},
            )
            if job_ids:
                pipe.rpush(f"{self.batch_key(batch_id)}:jobs", *job_ids)
            pipe.zadd(f"{self.ns}:batches", {batch_id: now})
            pipe.execute()

    # worker side
    def claim(self, job_id: str, worker_id: str, *, lease_ms: int, max_attempts: int) -> Claim:
        outcome, value = self._claim(
            keys=[self.job_key(job_id)], args=[self.ns, job_id, worker_id, lease_ms, max_attempts]
        )
        value = _s(value)
        return Claim(_s(outcome), int(value) if value.lstrip("-").isdigit() else value)

    def renew(
        self, job_id: str, worker_id: str, *, lease_ms: int, done: int | None = None, total: int = 0
    ) -> int:
        """Extend the lease (and record progress). Returns cancel_requested (0/1), or -1 if lost."""
        return int(
            self._renew(
                keys=[self.job_key(job_id)],
                args=[worker_id, lease_ms, "" if done is None else done, total],
            )
        )

    def finish(
        self,
        job_id: str,
        worker_id: str,
        state: JobState,
        *,
        error: dict[str, Any] | None = None,
        result_key: str = "",
    ) -> bool:
        """Compare-and-set from ``running`` (held by this worker) to ``state``; False = no-op."""
        return bool(
            self._finish(
                keys=[self.job_key(job_id)],
                args=[
                    self.ns,
                    job_id,
                    worker_id,
                    state.value,
                    json.dumps(error) if error else "",
                    result_key,
                ],
            )
        )

    # API side
    def cancel(self, job_id: str) -> str:
        """Cancel a queued job now, or ask a running one to stop. Returns the outcome/state."""
        return _s(self._cancel(keys=[self.job_key(job_id)], args=[self.ns, job_id]))

    def get(self, job_id: str) -> dict[str, str] | None:
        record = self.r.hgetall(self.job_key(job_id))
        return decode_hash(record) if record else None

    def get_many(self, job_ids: Iterable[str]) -> list[dict[str, str]]:
        ids = list(job_ids)
        with self.r.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hgetall(self.job_key(job_id))
            records = pipe.execute()
        return [decode_hash(rec) for rec in records if rec]

    def list_ids(
        self, *, state: str | None = None, batch_id: str | None = None, limit: int, offset: int
    ) -> list[str]:
        """Job ids, newest first (by state or all), or a batch's in submission order."""
        if batch_id is not None:
            ids = [_s(i) for i in self.r.lrange(f"{self.batch_key(batch_id)}:jobs", 0, -1)]
            if state is not None:
                states = self._states(ids)
                ids = [i for i, s in zip(ids, states, strict=True) if s == state]
            return ids[offset : offset + limit]
        key = self.state_key(state) if state else f"{self.ns}:jobs"
        return [_s(i) for i in self.r.zrevrange(key, offset, offset + limit - 1)]

    def _states(self, ids: Sequence[str]) -> list[str]:
        with self.r.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hget(self.job_key(job_id), "state")
            return [_s(s) if s else "" for s in pipe.execute()]

    def batch(self, batch_id: str) -> tuple[dict[str, str], list[str]] | None:
        record = self.r.hgetall(self.batch_key(batch_id))
        if not record:
            return None
        ids = [_s(i) for i in self.r.lrange(f"{self.batch_key(batch_id)}:jobs", 0, -1)]
        return decode_hash(record), ids

    def counts_by_state(self) -> dict[str, int]:
        with self.r.pipeline(transaction=False) as pipe:
            for state in JobState:
                pipe.zcard(self.state_key(state))
            counts = pipe.execute()
        return {state.value: int(n) for state, n in zip(JobState, counts, strict=True)}

    # slides
    def put_slide(self, sha256: str, size_bytes: int, ext: str) -> None:
        self.r.hset(
            f"{self.ns}:slide:{sha256}",
            mapping={
                "sha256": sha256,
                "size_bytes": size_bytes,
                "ext": ext,
                "created_ms": int(time.time() * 1000),
            },
        )

    def get_slide(self, sha256: str) -> dict[str, str] | None:
        record = self.r.hgetall(f"{self.ns}:slide:{sha256}")
        return decode_hash(record) if record else None

    # workers and models
    def heartbeat(self, worker_id: str, info: Mapping[str, str | int]) -> None:
        now = int(time.time() * 1000)
        key = f"{self.ns}:worker:{worker_id}"
        with self.r.pipeline(transaction=True) as pipe:
            pipe.zadd(f"{self.ns}:workers", {worker_id: now})
            # redis-py keys hash fields by a union, and dict keys are invariant: widen explicitly.
            fields: dict[FieldT, EncodableT] = dict(info.items())
            fields["heartbeat_ms"] = now
            pipe.hset(key, mapping=fields)
            pipe.expire(key, WORKER_RECORD_TTL_S)
            pipe.execute()

    def remove_worker(self, worker_id: str) -> None:
        with self.r.pipeline(transaction=True) as pipe:
            pipe.zrem(f"{self.ns}:workers", worker_id)
            pipe.delete(f"{self.ns}:worker:{worker_id}")
            pipe.execute()

    def live_workers(self, stale_s: float) -> list[dict[str, str]]:
        """Workers whose heartbeat is younger than ``stale_s`` seconds."""
        cutoff = int((time.time() - stale_s) * 1000)
        ids = [_s(i) for i in self.r.zrangebyscore(f"{self.ns}:workers", cutoff, "+inf")]
        with self.r.pipeline(transaction=False) as pipe:
            for worker_id in ids:
                pipe.hgetall(f"{self.ns}:worker:{worker_id}")
            records = pipe.execute()
        return [
            decode_hash(rec) | {"id": wid} for wid, rec in zip(ids, records, strict=True) if rec
        ]

    def publish_model(self, name: str, card: dict[str, Any]) -> None:
        self.r.hset(f"{self.ns}:models", name, json.dumps(card))

    def models(self) -> dict[str, dict[str, Any]]:
        return {_s(k): json.loads(v) for k, v in self.r.hgetall(f"{self.ns}:models").items()}

    def webhook_secret(self, configured: str | None) -> str:
        """The configured webhook secret, else one generated once and kept in Redis."""
        if configured:
            return configured
        key = f"{self.ns}:webhook_secret"
        candidate = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
        self.r.set(key, candidate, nx=True)
        return _s(self.r.get(key))
