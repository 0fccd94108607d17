"""The audit log: who did what, append-only, in a JSON-lines file and a Redis stream.

Every entry records the time, the action, its outcome, the client and key id that acted, the
source address, and the job, batch and slide digest it touched (never a key, a file name, a path
or a client reference: those can carry patient identifiers; the job id leads to them)::

    {"id": "1732977000000-0", "time": "2026-11-30T14:30:00.000Z", "ms": 1732977000000,
     "action": "result.read", "outcome": "ok", "status": 200, "client": "lab-a",
     "key_id": "3f2a...", "source": "10.0.0.7", "job_id": "job_...", "batch_id": null,
     "slide_sha256": "ab12...", "detail": null}

Recorded when done: ``job.submit``, ``batch.submit``, ``result.read``, ``artifact.download``,
``job.cancel``, ``slide.upload``, ``slide.delete``, ``slide.view`` (the viewer), ``audit.read``,
``key.create``, ``key.revoke``, ``key.rotate``. Recorded when refused: those and ``job.read``,
``batch.read``, ``slide.read`` (outcome ``not_found`` or ``conflict``), ``auth.refused`` (401:
missing, unknown, revoked or expired key; at most ``REFUSALS_LOGGED_PER_MINUTE`` per source address
and minute) and ``auth.forbidden`` (403: the key lacks the scope).
Outcomes: ``ok``, ``refused`` (401/403), ``not_found`` (the resource does not exist *or belongs to
another client*: the entry keeps which, for the admin who reads it), ``conflict``, ``error``.

Storage: ``<data_dir>/audit/audit.jsonl`` (one line per entry, appended with ``O_APPEND`` so
several API processes interleave whole lines; never rewritten) and the Redis stream
``{ns}:audit``, which ``GET /v1/audit`` pages newest first with a cursor (the stream id of the last
entry seen). The file is the complete record; the stream keeps about the newest
``STREAM_MAX_ENTRIES`` (trimmed approximately on append, so Redis memory stays bounded however long
the service runs: roughly 300 bytes per entry, ~300 MB at the bound). Older entries are read from
the file.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import redis

from service.errors import InvalidRequestError

__all__ = ["STREAM_MAX_ENTRIES", "AuditLog", "audit_path"]

#: Entries the Redis stream keeps (approximately: Redis trims whole nodes); the file keeps all.
STREAM_MAX_ENTRIES = 1_000_000
#: Entries one query reads from the stream at most (a query never scans the whole log).
MAX_SCAN = 5_000
#: Unauthenticated refusals logged per source address and minute; the rest are counted (a flood
#: of bad keys must not fill the disk or Redis), and the first one over says so.
REFUSALS_LOGGED_PER_MINUTE = 100
_FILTERS = ("client", "action", "outcome", "job_id", "batch_id", "slide_sha256")


def _valid_stream_id(value: str) -> bool:
    ms, _, seq = value.partition("-")
    return ms.isdigit() and seq.isdigit() and int(ms) < 2**64 and int(seq) < 2**64


def audit_path(data_dir: Path) -> Path:
    """The JSON-lines file of the audit log under a data folder."""
    return data_dir / "audit" / "audit.jsonl"


class AuditLog:
    """Appends entries to the file and the stream; pages them back.

    Args:
        client: redis-py client (``decode_responses=True``).
        namespace: key prefix.
        path: the JSON-lines file (its folder is created).
        stream_max_entries: entries the stream keeps, approximately (the file keeps every one).
    """

    def __init__(
        self,
        client: redis.Redis,
        namespace: str,
        path: Path,
        *,
        stream_max_entries: int = STREAM_MAX_ENTRIES,
    ) -> None:
        self.r = client
        self.stream = f"{namespace}:audit"
        self.path = path
        self.stream_max_entries = stream_max_entries
        self._lock = threading.Lock()

    def record(self, action: str, *, outcome: str = "ok", **fields: Any) -> dict[str, Any]:
        """Append one entry. ``fields``: status, client, key_id, source, job_id, batch_id,
        slide_sha256, detail (a short string without identifiers)."""
        now_ms = int(time.time() * 1000)
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now_ms / 1000))
            + f".{now_ms % 1000:03d}Z",
            "ms": now_ms,
            "action": action,
            "outcome": outcome,
        }
        entry.update({k: v for k, v in fields.items() if v not in (None, "")})
        line = json.dumps(entry, separators=(",", ":"), sort_keys=True)
        entry_id = str(
            self.r.xadd(self.stream, {"e": line}, maxlen=self.stream_max_entries, approximate=True)
        )
        entry["id"] = entry_id
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                os.write(
                    fd, (json.dumps(entry, separators=(",", ":"), sort_keys=True) + "\n").encode()
                )
            finally:
                os.close(fd)
        return entry

    def record_refusal(self, source: str, **fields: Any) -> None:
        """Record an unauthenticated refusal (``auth.refused``), at most
        ``REFUSALS_LOGGED_PER_MINUTE`` per source and minute."""
        bucket = f"{self.stream}:refused:{source}:{int(time.time() // 60)}"
        with self.r.pipeline(transaction=True) as pipe:
            pipe.incr(bucket)
            pipe.expire(bucket, 120)
            count = int(pipe.execute()[0])
        if count <= REFUSALS_LOGGED_PER_MINUTE:
            self.record("auth.refused", outcome="refused", source=source, **fields)
        elif count == REFUSALS_LOGGED_PER_MINUTE + 1:
            self.record(
                "auth.refused",
                outcome="refused",
                source=source,
                status=401,
                detail=f"more than {REFUSALS_LOGGED_PER_MINUTE} refusals from this source this "
                "minute: the rest of the minute is not logged",
            )

    def query(
        self,
        *,
        filters: Mapping[str, str | None],
        since_ms: int | None = None,
        until_ms: int | None = None,
        cursor: str | None = None,
        limit: int = 100,
    ) -> tuple[list[dict[str, Any]], str | None]:
        """Entries newest first matching every given filter.

        Args:
            filters: field -> value (``client``, ``action``, ``outcome``, ``job_id``,
                ``batch_id``, ``slide_sha256``); None values are ignored.
            cursor: the ``next_cursor`` of the previous page (a stream id).

        Returns:
            (entries, next cursor or None at the end). A page may hold fewer than ``limit``
            entries when ``MAX_SCAN`` entries were read without filling it.
        """
        wanted = {k: v for k, v in filters.items() if v is not None and k in _FILTERS}
        if cursor is not None and not _valid_stream_id(cursor):
            raise InvalidRequestError(f"page_token {cursor!r} is not one this API gave.")
        if until_ms is not None and until_ms < 0:
            return [], None
        since_ms = max(since_ms, 0) if since_ms is not None else None
        high = cursor or (f"{until_ms}-18446744073709551615" if until_ms is not None else "+")
        skip_first = cursor is not None
        low = f"{since_ms}-0" if since_ms is not None else "-"
        out: list[dict[str, Any]] = []
        scanned = 0
        last_id: str = ""
        chunk = min(max(limit * 4, 100), 1000)
        while scanned < MAX_SCAN:
            rows = self.r.xrevrange(self.stream, max=high, min=low, count=chunk + 1)
            if skip_first and rows and str(rows[0][0]) == high:
                rows = rows[1:]
            skip_first = True
            if not rows:
                return out, None
            for entry_id, values in rows:
                scanned += 1
                last_id = str(entry_id)
                entry = json.loads(values["e"])  # type: ignore[index]
                entry["id"] = last_id
                if all(entry.get(k) == v for k, v in wanted.items()):
                    out.append(entry)
                    if len(out) == limit:
                        return out, last_id
                if scanned >= MAX_SCAN:
                    break
            high = last_id
        return out, last_id or None
