"""Job records in Redis: the state machine, leases, attempts, batches and idempotency keys.

Redis key layout (``{ns}`` is ``ServiceSettings.namespace``, ``xmag`` by default)::

    {ns}:job:{job_id}            HASH  one job (read as a ``JobRecord``): id, state, priority,
                                       created_ms/started_ms/finished_ms/updated_ms,
                                       attempts (deliveries, crash requeues included),
                                       completions (times it reached `succeeded`: 1 at most),
                                       reconciled (times the reconciler sent its message again),
                                       lease_owner + lease_until_ms (the worker running it), worker,
                                       slide_kind (upload|path), slide_path, slide_id,
                                       slide_sha256 + slide_size_bytes (known for uploads; ""
                                       for paths: the worker's DigestCache finds them),
                                       options (json), tasks (json list, "" = every head),
                                       callback_url, result_url, job_url, batch_id,
                                       tiles_done, tiles_total, error (json {code, message}),
                                       result_key (xmag.store key), cache_hit (0|1: found in
                                       the result store, not computed), cancel_requested (0|1),
                                       client (the owning tenant), reference (the client's
                                       accession/case number), metadata (json), display_name
                                       (the upload's file name, or the path as the client gave it)
    {ns}:jobs                    ZSET  every job id, scored by created_ms
    {ns}:jobs:{state}            ZSET  job ids in that state, scored by created_ms (for listing)
    {ns}:ix:{c}:jobs             ZSET  job ids of client c, scored by created_ms; c = "*"
    {ns}:ix:{c}:ref:{sha1(ref)}  ZSET  ... with that reference   (indexes for listing: written
    {ns}:ix:{c}:sha:{sha256}     ZSET  ... on that slide digest   by the creation script, for the
    {ns}:ix:{c}:path:{sha1(p)}   ZSET  ... named by that path     client and for "*", all clients)
    {ns}:ix:{c}:batches          ZSET  batch ids of client c, scored by created_ms
    {ns}:result:{key}:jobs       SET   the jobs that succeeded with result `key` (for retention)
    {ns}:batch:{batch_id}        HASH  id, created_ms, size, client
    {ns}:batch:{batch_id}:jobs   LIST  job ids in submission order
    {ns}:batches                 ZSET  every batch id, scored by created_ms
    {ns}:idem:{principal}:{key}  STRING json {hash, kind, id}: an Idempotency-Key, kept 24 h
    {ns}:slide:{sha256}          HASH  an uploaded slide: sha256, size_bytes, ext, created_ms
    {ns}:slide:{sha256}:owners   SET   the clients that uploaded it (the bytes are stored once)
    {ns}:client:{c}:slides       HASH  sha256 -> json {filename, size_bytes, created_ms}: what
                                       client c may reach (its own uploads)
    {ns}:apikeys, {ns}:clients   see service.auth
    {ns}:audit                   STREAM the audit log (service.audit)
    {ns}:workers                 ZSET  worker id -> last heartbeat (ms)
    {ns}:worker:{worker_id}      HASH  pid, host, model, model_loaded, started_ms, job (expires)
    {ns}:models                  HASH  "name@version" -> model card json (published by workers)
    {ns}:webhook_secret          STRING the generated Standard Webhooks secret (when none is set)
    {ns}:reconcile:lock          STRING the reconciler's per-interval lock (service.reconcile)
    {ns}:metrics:*               see service.metrics
    {ns}-dq:*                    Dramatiq's broker keys (queues, acks, heartbeats, dead letters)

Every write to a job record is one Lua script (atomic, clock from Redis ``TIME`` so workers on
several machines agree): creating a job (with its idempotency key), creating a batch (its hash, its
job list, every job and its idempotency key at once), claiming, renewing, finishing, canceling, and
the reconciler's mark. A worker must *claim* a job before running it and may only *finish* it while
it holds the lease: a message redelivered after a crash, or a duplicate, finds the job final (no-op)
or leased by a live worker (put back until the lease runs out). That compare-and-set makes
completion happen exactly once even though Dramatiq delivers at least once.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import redis
from pydantic import BaseModel, ConfigDict
from redis.typing import EncodableT, FieldT

__all__ = [
    "FINAL_STATES",
    "BatchRecord",
    "Claim",
    "Created",
    "JobErrorRecord",
    "JobRecord",
    "JobSpec",
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
#: Job records one listing page reads at most (filters applied to records stop there).
MAX_LIST_SCAN = 2_000
_LIST_CHUNK = 200


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

# Shared by job and batch creation: an Idempotency-Key (SET only if new; returns the prior record)
# and one queued job record from a flat {field, value, ...} list.
_LUA_CREATE_FNS = """
local function remember(idemkey, rhash, ttl, kind, id)
  if idemkey == '' then return nil end
  local prior = redis.call('GET', idemkey)
  if prior then return prior end
  redis.call('SET', idemkey, cjson.encode({hash=rhash, kind=kind, id=id}), 'EX', ttl)
  return nil
end
local function create_job(jobkey, ns, id, now, fields)
  for i = 1, #fields, 2 do redis.call('HSET', jobkey, fields[i], fields[i + 1]) end
  redis.call('HSET', jobkey, 'id', id, 'created_ms', now, 'updated_ms', now, 'attempts', 0,
    'completions', 0, 'tiles_done', 0, 'tiles_total', 0, 'cancel_requested', 0)
  redis.call('ZADD', ns .. ':jobs', now, id)
  local f = redis.call('HMGET', jobkey, 'client', 'reference', 'slide_sha256', 'slide_ref')
  for _, c in ipairs({f[1] or '', '*'}) do
    local ix = ns .. ':ix:' .. c
    redis.call('ZADD', ix .. ':jobs', now, id)
    if f[2] and f[2] ~= '' then
      redis.call('ZADD', ix .. ':ref:' .. redis.sha1hex(f[2]), now, id)
    end
    if f[3] and f[3] ~= '' then redis.call('ZADD', ix .. ':sha:' .. f[3], now, id) end
    if f[4] and f[4] ~= '' then
      redis.call('ZADD', ix .. ':path:' .. redis.sha1hex(f[4]), now, id)
    end
  end
  move(jobkey, ns, id, nil, 'queued', now)
end
"""

# KEYS: job hash, idem key (or "")  ARGV: ns, id, request hash, ttl, kind, then field/value pairs.
_CREATE = (
    _LUA_NOW
    + _LUA_MOVE
    + _LUA_CREATE_FNS
    + """
local ns, id, rhash, ttl, kind = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5]
local prior = remember(KEYS[2], rhash, ttl, kind, id)
if prior then return {'existing', prior} end
create_job(KEYS[1], ns, id, now, {unpack(ARGV, 6)})
return {'created', id}
"""
)

# KEYS: batch hash, batch job list, batch index, idem key (or ""), then one job hash per job.
# ARGV: ns, batch id, request hash, ttl, client, then per job: its id and its fields (json list).
_CREATE_BATCH = (
    _LUA_NOW
    + _LUA_MOVE
    + _LUA_CREATE_FNS
    + """
local ns, batch, rhash, ttl, client = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5]
local prior = remember(KEYS[4], rhash, ttl, 'batch', batch)
if prior then return {'existing', prior} end
local n = #KEYS - 4
for j = 1, n do
  local id = ARGV[4 + 2 * j]
  create_job(KEYS[4 + j], ns, id, now, cjson.decode(ARGV[5 + 2 * j]))
  redis.call('RPUSH', KEYS[2], id)
end
redis.call('HSET', KEYS[1], 'id', batch, 'created_ms', now, 'size', n, 'client', client)
redis.call('ZADD', KEYS[3], now, batch)
redis.call('ZADD', ns .. ':ix:' .. client .. ':batches', now, batch)
return {'created', batch}
"""
)

# KEYS: job  ARGV: ns, id, worker, lease_ms, max_attempts
# Returns {outcome, value, record}: the record (HGETALL) after a claim, a cancel or a dead letter.
_CLAIM = (
    _LUA_NOW
    + _LUA_MOVE
    + """
local ns, id, worker = ARGV[1], ARGV[2], ARGV[3]
local lease_ms, max_attempts = tonumber(ARGV[4]), tonumber(ARGV[5])
local s = redis.call('HMGET', KEYS[1], 'state', 'lease_owner', 'lease_until_ms', 'created_ms',
  'cancel_requested')
local state, owner, until_ms, created = s[1], s[2], tonumber(s[3] or '0'), s[4]
if not state then return {'missing', 0, {}} end
if state == 'succeeded' or state == 'failed' or state == 'canceled' or state == 'dead' then
  return {'final', state, {}}
end
if s[5] == '1' then
  move(KEYS[1], ns, id, state, 'canceled', created)
  redis.call('HSET', KEYS[1], 'finished_ms', now, 'updated_ms', now, 'lease_owner', '',
    'error', cjson.encode({code='JOB_CANCELED', message='The job was canceled.'}))
  return {'canceled', 0, redis.call('HGETALL', KEYS[1])}
end
if state == 'running' and owner ~= worker and until_ms > now then
  return {'leased', until_ms - now, {}}
end
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
if attempts > max_attempts then
  move(KEYS[1], ns, id, state, 'dead', created)
  redis.call('HSET', KEYS[1], 'finished_ms', now, 'updated_ms', now, 'lease_owner', '',
    'error', cjson.encode({code='ATTEMPTS_EXHAUSTED', message='The job was delivered ' ..
      (attempts - 1) .. ' times without finishing (its worker crashed or failed transiently ' ..
      'each time); it is dead-lettered. Inspect the slide, then resubmit it.'}))
  return {'dead', attempts - 1, redis.call('HGETALL', KEYS[1])}
end
move(KEYS[1], ns, id, state, 'running', created)
redis.call('HSET', KEYS[1], 'lease_owner', worker, 'lease_until_ms', now + lease_ms,
  'updated_ms', now, 'worker', worker)
if not redis.call('HGET', KEYS[1], 'started_ms') then
  redis.call('HSET', KEYS[1], 'started_ms', now)
end
return {'claimed', attempts, redis.call('HGETALL', KEYS[1])}
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

# KEYS: job  ARGV: ns, id, worker, new state, error json or '', result key or '', cache hit 0|1
# Returns the record after the change (HGETALL), or an empty list when this worker holds no lease.
_FINISH = (
    _LUA_NOW
    + _LUA_MOVE
    + """
local ns, id, worker, new = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local s = redis.call('HMGET', KEYS[1], 'state', 'lease_owner', 'created_ms')
if s[1] ~= 'running' or s[2] ~= worker then return {} end
move(KEYS[1], ns, id, s[1], new, s[3])
redis.call('HSET', KEYS[1], 'lease_owner', '', 'lease_until_ms', 0, 'updated_ms', now)
if ARGV[5] ~= '' then redis.call('HSET', KEYS[1], 'error', ARGV[5]) end
if new ~= 'queued' then redis.call('HSET', KEYS[1], 'finished_ms', now) end
if new == 'succeeded' then
  redis.call('HSET', KEYS[1], 'result_key', ARGV[6], 'cache_hit', ARGV[7])
  redis.call('SADD', ns .. ':result:' .. ARGV[6] .. ':jobs', id)
  redis.call('HDEL', KEYS[1], 'error')
  redis.call('HINCRBY', KEYS[1], 'completions', 1)
end
return redis.call('HGETALL', KEYS[1])
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
if s[1] == 'canceled' then return 'already_canceled' end
return s[1]
"""
)

# The reconciler's write. KEYS: job  ARGV: cutoff_ms. Only a job still queued and not updated
# since the cutoff is marked (updated_ms = now, reconciled + 1); returns its priority, else false.
_MARK_RESENT = (
    _LUA_NOW
    + """
local s = redis.call('HMGET', KEYS[1], 'state', 'updated_ms', 'priority')
if s[1] ~= 'queued' or tonumber(s[2] or '0') > tonumber(ARGV[1]) then return false end
redis.call('HSET', KEYS[1], 'updated_ms', now)
redis.call('HINCRBY', KEYS[1], 'reconciled', 1)
return s[3] or 'normal'
"""
)


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def decode_hash(record: Mapping[Any, Any]) -> dict[str, str]:
    """A Redis hash as ``str -> str`` (redis-py types replies as ``bytes | str`` unions)."""
    return {_s(k): _s(v) for k, v in record.items()}


def _matches(
    record: JobRecord,
    client: str | None,
    state: str | None,
    reference: str | None,
    slide_sha256: str | None,
    path: str | None,
    batch_id: str | None,
) -> bool:
    """True when a job record passes every given listing filter."""
    return (
        (client is None or record.client == client)
        and (state is None or record.state == state)
        and (not reference or record.reference == reference)
        and (not slide_sha256 or record.slide_sha256 == slide_sha256)
        and (not path or record.slide_ref == path)
        and (batch_id is None or record.batch_id == batch_id)
    )


def _pairs(flat: Sequence[Any]) -> dict[str, str]:
    """A Lua ``HGETALL`` reply (``[field, value, ...]``) as a dict."""
    return {_s(flat[i]): _s(flat[i + 1]) for i in range(0, len(flat), 2)}


class JobErrorRecord(BaseModel):
    """Why a job did not succeed: a stable error code and its message."""

    model_config = ConfigDict(frozen=True)

    code: str
    message: str = ""


#: Job hash fields stored as JSON strings ("" or absent: not set).
_JSON_FIELDS = ("options", "tasks", "error", "metadata")


class JobRecord(BaseModel):
    """One job hash (``{ns}:job:{id}``), parsed once where it is read.

    Times are Unix milliseconds from Redis ``TIME`` (0: not yet). ``tasks`` empty means every
    head of the model; ``error`` is set for failed, canceled and dead jobs (and for a job queued
    again after a transient fault).
    """

    model_config = ConfigDict(frozen=True, extra="ignore")

    id: str
    state: JobState
    priority: str = "normal"
    created_ms: int = 0
    updated_ms: int = 0
    started_ms: int = 0
    finished_ms: int = 0
    attempts: int = 0
    completions: int = 0
    reconciled: int = 0
    lease_owner: str = ""
    lease_until_ms: int = 0
    worker: str = ""
    slide_kind: str = ""
    slide_path: str = ""
    slide_id: str = ""
    slide_sha256: str = ""
    slide_size_bytes: int = 0
    options: dict[str, Any] = {}
    tasks: list[str] = []
    callback_url: str = ""
    result_url: str = ""
    job_url: str = ""
    batch_id: str = ""
    tiles_done: int = 0
    tiles_total: int = 0
    error: JobErrorRecord | None = None
    result_key: str = ""
    cache_hit: bool = False
    cancel_requested: bool = False
    client: str = ""
    reference: str = ""
    metadata: dict[str, Any] = {}
    display_name: str = ""
    slide_ref: str = ""

    @classmethod
    def from_hash(cls, record: Mapping[Any, Any]) -> JobRecord:
        """Parse a job hash as Redis returns it (``bytes`` or ``str`` fields and values)."""
        data: dict[str, Any] = {k: v for k, v in decode_hash(record).items() if v != ""}
        for name in _JSON_FIELDS:
            if name in data:
                data[name] = json.loads(data[name])
        return cls.model_validate(data)


@dataclass(frozen=True)
class JobSpec:
    """What a submission stores in a new job record (the rest is set by ``JobStore``).

    Attributes:
        slide_kind: ``upload`` (under the slide store) or ``path`` (a reference).
        slide_path: the file or DICOM folder the worker opens.
        slide_id: the upload's id (``upload`` only).
        slide_sha256: the slide's sha256 when known (an upload's); the worker names the result by
            it without opening or hashing the slide.
        slide_size_bytes: the slide's size with ``slide_sha256``.
        tasks: task heads to report (empty: every head).
        options: ``SlideOptions`` fields.
        client: the owning client (tenant).
        reference: the client's accession or case number ("" when none).
        metadata: the client's free metadata (size-limited by the API).
        display_name: the upload's file name, or the path as the client gave it.
        slide_ref: the path as the client gave it (by-path jobs; indexed for listing).
    """

    slide_kind: str
    slide_path: str
    priority: str = "normal"
    slide_id: str = ""
    slide_sha256: str = ""
    slide_size_bytes: int = 0
    tasks: tuple[str, ...] = ()
    options: Mapping[str, Any] = field(default_factory=dict)
    callback_url: str = ""
    result_url: str = ""
    job_url: str = ""
    batch_id: str = ""
    client: str = ""
    reference: str = ""
    metadata: Mapping[str, Any] = field(default_factory=dict)
    display_name: str = ""
    slide_ref: str = ""

    def fields(self) -> list[str]:
        """The job hash fields as a flat ``[field, value, ...]`` list (the Lua scripts' input)."""
        values = {
            "slide_kind": self.slide_kind,
            "slide_path": self.slide_path,
            "slide_id": self.slide_id,
            "slide_sha256": self.slide_sha256,
            "slide_size_bytes": str(self.slide_size_bytes) if self.slide_sha256 else "",
            "priority": self.priority,
            "tasks": json.dumps(list(self.tasks)) if self.tasks else "",
            "options": json.dumps(dict(self.options), sort_keys=True, separators=(",", ":")),
            "callback_url": self.callback_url,
            "result_url": self.result_url,
            "job_url": self.job_url,
            "batch_id": self.batch_id,
            "client": self.client,
            "reference": self.reference,
            "metadata": json.dumps(dict(self.metadata), sort_keys=True) if self.metadata else "",
            "display_name": self.display_name,
            "slide_ref": self.slide_ref,
        }
        return [item for pair in values.items() for item in pair]


@dataclass(frozen=True)
class Claim:
    """Outcome of a worker's claim on a job.

    Attributes:
        outcome: ``claimed`` (run it), ``final`` (finished already: no-op), ``leased`` (a live
            worker holds it), ``dead`` (attempts exhausted now), ``canceled``, ``missing``.
        value: attempts (claimed/dead), final state (final) or lease ms left (leased).
        record: the job after a ``claimed``, ``canceled`` or ``dead`` outcome (else None).
    """

    outcome: str
    value: str | int
    record: JobRecord | None = None


@dataclass(frozen=True)
class Created:
    """Outcome of a creation with an Idempotency-Key.

    Attributes:
        created: True when this call created the job or batch.
        id: its id (the new one, or the one the key already stood for).
        prior: the key's stored record ``{hash, kind, id}`` when it existed already (the caller
            compares the request hash), else None.
    """

    created: bool
    id: str
    prior: dict[str, Any] | None = None


def _created(outcome: Any, value: Any, new: str) -> Created:
    """A creation script's reply ``{'created', id}`` or ``{'existing', prior key record}``."""
    if _s(outcome) == "created":
        return Created(True, new)
    prior = json.loads(_s(value))
    return Created(False, str(prior.get("id", "")), prior)


@dataclass(frozen=True)
class BatchRecord:
    """A batch hash and its job ids in submission order (``created_ms``: Unix ms)."""

    id: str
    created_ms: int
    size: int
    job_ids: list[str]
    client: str = ""


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
        self._create_batch = client.register_script(_CREATE_BATCH)
        self._claim = client.register_script(_CLAIM)
        self._renew = client.register_script(_RENEW)
        self._finish = client.register_script(_FINISH)
        self._cancel = client.register_script(_CANCEL)
        self._mark_resent = client.register_script(_MARK_RESENT)

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
        spec: JobSpec,
        *,
        job_id: str | None = None,
        idem_key: str = "",
        idem_hash: str = "",
    ) -> Created:
        """Create a queued job; with an idempotency key, only if the key is new (one script)."""
        job_id = job_id or new_id("job")
        args = [self.ns, job_id, idem_hash, str(IDEMPOTENCY_TTL_S), "job", *spec.fields()]
        outcome, value = self._create(keys=[self.job_key(job_id), idem_key], args=args)
        return _created(outcome, value, job_id)

    def create_batch(
        self,
        batch_id: str,
        jobs: Sequence[tuple[str, JobSpec]],
        *,
        idem_key: str = "",
        idem_hash: str = "",
        client: str = "",
    ) -> Created:
        """Create a batch, its job list, every job record and the idempotency key in one script.

        A crash leaves all of them or none; a concurrent retry with the same key either creates
        nothing and gets the existing batch id, or runs first and the other one gets its id.

        Args:
            jobs: ``(job_id, spec)`` in submission order.
        """
        keys = [
            self.batch_key(batch_id),
            f"{self.batch_key(batch_id)}:jobs",
            f"{self.ns}:batches",
            idem_key,
        ]
        args = [self.ns, batch_id, idem_hash, str(IDEMPOTENCY_TTL_S), client]
        for job_id, spec in jobs:
            keys.append(self.job_key(job_id))
            args += [job_id, json.dumps(spec.fields())]
        outcome, value = self._create_batch(keys=keys, args=args)
        return _created(outcome, value, batch_id)

    # worker side
    def claim(self, job_id: str, worker_id: str, *, lease_ms: int, max_attempts: int) -> Claim:
        outcome, value, record = self._claim(
            keys=[self.job_key(job_id)], args=[self.ns, job_id, worker_id, lease_ms, max_attempts]
        )
        value = _s(value)
        return Claim(
            _s(outcome),
            int(value) if value.lstrip("-").isdigit() else value,
            JobRecord.from_hash(_pairs(record)) if record else None,
        )

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
        error: Mapping[str, Any] | None = None,
        result_key: str = "",
        cache_hit: bool = False,
    ) -> JobRecord | None:
        """Compare-and-set from ``running`` (held by this worker) to ``state``.

        Args:
            result_key: the result's key in the result store (``succeeded``).
            cache_hit: the result was found in the store, not computed (``succeeded``).

        Returns:
            The job after the change, or None (a no-op) when this worker no longer holds it.
        """
        record = self._finish(
            keys=[self.job_key(job_id)],
            args=[
                self.ns,
                job_id,
                worker_id,
                state.value,
                json.dumps(dict(error)) if error else "",
                result_key,
                int(cache_hit),
            ],
        )
        return JobRecord.from_hash(_pairs(record)) if record else None

    def mark_resent(self, job_id: str, *, not_updated_since_ms: int) -> str | None:
        """The reconciler's write, before it sends a job's message again.

        Only a job still ``queued`` and not updated since ``not_updated_since_ms`` is marked
        (``updated_ms`` = now, ``reconciled`` + 1), atomically, so a job claimed, canceled or
        re-sent by another pass meanwhile is left alone.

        Returns:
            The job's priority when marked (send its message), else None.
        """
        priority = self._mark_resent(keys=[self.job_key(job_id)], args=[not_updated_since_ms])
        return _s(priority) if priority else None

    # API side
    def cancel(self, job_id: str) -> str:
        """Cancel a queued job now, or ask a running one to stop.

        Returns:
            ``canceled`` (now), ``requested`` (running: stops between batches),
            ``already_canceled``, ``missing``, or the final state it already reached.
        """
        return _s(self._cancel(keys=[self.job_key(job_id)], args=[self.ns, job_id]))

    def get(self, job_id: str) -> JobRecord | None:
        record = self.r.hgetall(self.job_key(job_id))
        return JobRecord.from_hash(record) if record else None

    def get_many(self, job_ids: Iterable[str]) -> list[JobRecord]:
        ids = list(job_ids)
        with self.r.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hgetall(self.job_key(job_id))
            records = pipe.execute()
        return [JobRecord.from_hash(rec) for rec in records if rec]

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

    def batch(self, batch_id: str) -> BatchRecord | None:
        with self.r.pipeline(transaction=True) as pipe:
            pipe.hgetall(self.batch_key(batch_id))
            pipe.lrange(f"{self.batch_key(batch_id)}:jobs", 0, -1)
            record, ids = pipe.execute()
        if not record:
            return None
        fields = decode_hash(record)
        return BatchRecord(
            id=fields["id"],
            created_ms=int(fields["created_ms"]),
            size=int(fields["size"]),
            job_ids=[_s(i) for i in ids],
            client=fields.get("client", ""),
        )

    def counts_by_state(self) -> dict[str, int]:
        with self.r.pipeline(transaction=False) as pipe:
            for state in JobState:
                pipe.zcard(self.state_key(state))
            counts = pipe.execute()
        return {state.value: int(n) for state, n in zip(JobState, counts, strict=True)}

    # listing (cursor pages)
    def page_jobs(
        self,
        *,
        client: str | None,
        state: str | None = None,
        reference: str | None = None,
        slide_sha256: str | None = None,
        path: str | None = None,
        batch_id: str | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> tuple[list[JobRecord], str | None]:
        """One page of jobs, newest first (a batch's: in submission order), and the next cursor.

        The most selective index is read (batch, reference, slide digest, path, then the
        client's or everyone's jobs) and the other filters are applied to the records, reading
        at most ``MAX_LIST_SCAN`` of them per page: a page may hold fewer than ``limit`` jobs and
        still have a next cursor. The cursor names the last job read (``created_ms`` and id), so
        jobs created meanwhile neither shift nor repeat a page.

        Args:
            client: only this client's jobs (None: every client's; an admin).
        """
        c = client if client is not None else "*"
        if batch_id is not None:
            pages = self._batch_positions(batch_id, cursor)
        else:
            if reference:
                key = f"{self.ns}:ix:{c}:ref:{hashlib.sha1(reference.encode()).hexdigest()}"
            elif slide_sha256:
                key = f"{self.ns}:ix:{c}:sha:{slide_sha256}"
            elif path:
                key = f"{self.ns}:ix:{c}:path:{hashlib.sha1(path.encode()).hexdigest()}"
            elif client is None and state:
                key = self.state_key(state)
            elif client is None:
                key = f"{self.ns}:jobs"  # every job, those from before clients existed included
            else:
                key = f"{self.ns}:ix:{c}:jobs"
            pages = self._index_positions(key, cursor)
        out: list[JobRecord] = []
        scanned = 0
        for chunk in pages:
            records = self.get_many([job_id for job_id, _ in chunk])
            by_id = {r.id: r for r in records}
            for job_id, position in chunk:
                scanned += 1
                record = by_id.get(job_id)
                if record is not None and _matches(
                    record, client, state, reference, slide_sha256, path, batch_id
                ):
                    out.append(record)
                    if len(out) == limit:
                        return out, position
                if scanned >= MAX_LIST_SCAN:
                    return out, position
        return out, None

    def _index_positions(self, key: str, cursor: str | None) -> Iterator[list[tuple[str, str]]]:
        """Chunks of (job id, cursor after it) from a ZSET, newest first, after ``cursor``."""
        high, after_id = "+inf", None
        if cursor:
            at, _, after_id = cursor.partition(":")
            high = at if at.isdigit() else "+inf"
        offset = 0
        while True:
            rows = self.r.zrevrangebyscore(
                key, high, "-inf", start=offset, num=_LIST_CHUNK, withscores=True
            )
            if not rows:
                return
            offset += len(rows)
            chunk = []
            for row in rows:
                member, score_value = row  # type: ignore[str-unpack]
                score = int(score_value)
                job_id = _s(member)
                if after_id is not None and str(score) == high and job_id >= after_id:
                    continue  # at or before the cursor (same score: reverse id order)
                chunk.append((job_id, f"{score}:{job_id}"))
            if chunk:
                yield chunk

    def _batch_positions(
        self, batch_id: str, cursor: str | None
    ) -> Iterator[list[tuple[str, str]]]:
        """Chunks of (job id, cursor after it) from a batch's list, in submission order."""
        start = int(cursor) if cursor and cursor.isdigit() else 0
        key = f"{self.batch_key(batch_id)}:jobs"
        while True:
            ids = [_s(i) for i in self.r.lrange(key, start, start + _LIST_CHUNK - 1)]
            if not ids:
                return
            yield [(job_id, str(start + i + 1)) for i, job_id in enumerate(ids)]
            start += len(ids)

    def batch_counts(self, batch_id: str) -> dict[str, int]:
        """A batch's jobs by state (one pipelined read of their states)."""
        ids = [_s(i) for i in self.r.lrange(f"{self.batch_key(batch_id)}:jobs", 0, -1)]
        counts = {s.value: 0 for s in JobState}
        for state in self._states(ids):
            if state in counts:
                counts[state] += 1
        return counts

    # slides
    def put_slide(
        self, sha256: str, size_bytes: int, ext: str, *, client: str, filename: str
    ) -> bool:
        """Record an upload and the client's ownership of it.

        Returns:
            True when this client had uploaded these bytes before (deduplicated for it; whether
            another client holds the same bytes is never told).
        """
        now = int(time.time() * 1000)
        with self.r.pipeline(transaction=True) as pipe:
            pipe.hset(
                f"{self.ns}:slide:{sha256}",
                mapping={"sha256": sha256, "size_bytes": size_bytes, "ext": ext, "created_ms": now},
            )
            pipe.sadd(f"{self.ns}:slide:{sha256}:owners", client)
            pipe.hget(f"{self.ns}:client:{client}:slides", sha256)
            pipe.hset(
                f"{self.ns}:client:{client}:slides",
                sha256,
                json.dumps({"filename": filename, "size_bytes": size_bytes, "created_ms": now}),
            )
            _, _, prior, _ = pipe.execute()
        return prior is not None

    def get_slide(self, sha256: str) -> dict[str, str] | None:
        record = self.r.hgetall(f"{self.ns}:slide:{sha256}")
        return decode_hash(record) if record else None

    def slide_for(self, sha256: str, client: str | None) -> dict[str, Any] | None:
        """An uploaded slide as ``client`` reaches it (None when it did not upload it).

        Args:
            client: the client, or None for an admin (any slide; the file name of its first
                owner).
        """
        record = self.get_slide(sha256)
        if record is None:
            return None
        owners = sorted(_s(o) for o in self.r.smembers(f"{self.ns}:slide:{sha256}:owners"))
        # An upload from before clients existed belongs to the default client.
        owners = owners or ["default"]
        who = client if client is not None else (owners[0] if owners else None)
        if who is None or who not in owners:
            return None
        raw = self.r.hget(f"{self.ns}:client:{who}:slides", sha256)
        own = json.loads(raw) if raw else {}
        return {**record, **own, "owner": who, "owners": owners}

    def active_jobs_on(self, sha256: str, client: str) -> list[str]:
        """The client's queued or running jobs on an uploaded slide."""
        ids = [_s(i) for i in self.r.zrange(f"{self.ns}:ix:{client}:sha:{sha256}", 0, -1)]
        states = self._states(ids)
        return [i for i, s in zip(ids, states, strict=True) if s in ("queued", "running")]

    def delete_slide(self, sha256: str, client: str) -> tuple[list[str], list[str], bool]:
        """Remove a client's upload and its jobs on it (records and index entries).

        Returns:
            (deleted job ids, result keys no job references any more (delete their folders),
            True when no client owns the bytes any more (delete the file)).
        """
        ids = [_s(i) for i in self.r.zrange(f"{self.ns}:ix:{client}:sha:{sha256}", 0, -1)]
        records = self.get_many(ids)
        result_keys = {r.result_key for r in records if r.result_key}
        with self.r.pipeline(transaction=True) as pipe:
            for record in records:
                self._unindex(pipe, record)
            pipe.hdel(f"{self.ns}:client:{client}:slides", sha256)
            pipe.srem(f"{self.ns}:slide:{sha256}:owners", client)
            pipe.execute()
        orphaned = [k for k in sorted(result_keys) if not self.r.scard(self._result_jobs(k))]
        if self.r.scard(f"{self.ns}:slide:{sha256}:owners") == 0:
            self.r.delete(f"{self.ns}:slide:{sha256}", f"{self.ns}:slide:{sha256}:owners")
            return [r.id for r in records], orphaned, True
        return [r.id for r in records], orphaned, False

    def _result_jobs(self, result_key: str) -> str:
        return f"{self.ns}:result:{result_key}:jobs"

    def _unindex(self, pipe: Any, record: JobRecord) -> None:
        """Queue the deletion of a job record and every index entry of it."""
        pipe.delete(self.job_key(record.id))
        pipe.zrem(f"{self.ns}:jobs", record.id)
        pipe.zrem(self.state_key(record.state.value), record.id)
        for c in (record.client, "*"):
            ix = f"{self.ns}:ix:{c}"
            pipe.zrem(f"{ix}:jobs", record.id)
            if record.reference:
                ref = hashlib.sha1(record.reference.encode()).hexdigest()
                pipe.zrem(f"{ix}:ref:{ref}", record.id)
            if record.slide_sha256:
                pipe.zrem(f"{ix}:sha:{record.slide_sha256}", record.id)
            if record.slide_ref:
                path = hashlib.sha1(record.slide_ref.encode()).hexdigest()
                pipe.zrem(f"{ix}:path:{path}", record.id)
        if record.result_key:
            pipe.srem(self._result_jobs(record.result_key), record.id)
        if record.batch_id:
            pipe.lrem(f"{self.batch_key(record.batch_id)}:jobs", 0, record.id)
            pipe.hincrby(self.batch_key(record.batch_id), "size", -1)

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
