"""The audit log over the API (``admin`` scope): who did what, newest first, by page."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query

from service.api._deps import ERRORS, Admin
from service.errors import InvalidRequestError
from service.schemas import AuditEntry, AuditPage

__all__ = ["router"]

router = APIRouter()


#: RFC 3339 date-time (what the document's ``format: date-time`` promises, and nothing else).
_RFC3339 = r"^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})$"


def _ms(value: str | None, name: str) -> int | None:
    """Unix ms of an RFC 3339 time given as a query parameter."""
    if value is None:
        return None
    text = value.upper().replace("Z", "+00:00")
    head, dot, rest = text.partition(".")
    if dot:  # Python parses at most 6 fraction digits
        digits = rest[: len(rest) - 6]
        text = f"{head}.{digits[:6].ljust(6, '0')}{rest[len(digits) :]}"
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError as exc:
        raise InvalidRequestError(f"{name} is not a valid RFC 3339 time: {exc}.") from exc
    return int(parsed.timestamp() * 1000)


_Time = Annotated[
    str | None,
    Query(
        pattern=_RFC3339, description="RFC 3339 time.", json_schema_extra={"format": "date-time"}
    ),
]


@router.get(
    "/v1/audit",
    tags=["audit"],
    operation_id="listAudit",
    summary="Audit log entries, newest first (admin)",
    response_model=AuditPage,
    responses={**ERRORS},
)
def list_audit(
    caller: Admin,
    client: Annotated[str | None, Query(max_length=63, description="Who acted.")] = None,
    action: Annotated[
        str | None, Query(max_length=40, description="e.g. result.read, auth.refused.")
    ] = None,
    outcome: Annotated[
        str | None, Query(max_length=20, description="ok, refused, not_found, conflict.")
    ] = None,
    job_id: Annotated[str | None, Query(max_length=80)] = None,
    batch_id: Annotated[str | None, Query(max_length=80)] = None,
    slide_sha256: Annotated[str | None, Query(pattern=r"^[0-9a-f]{64}$")] = None,
    since: _Time = None,
    until: _Time = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    page_token: Annotated[
        str | None,
        Query(
            pattern=r"^[0-9]{1,20}-[0-9]{1,20}$", description="next_page_token of the last page."
        ),
    ] = None,
) -> AuditPage:
    entries, token = caller.state.audit.query(
        filters={
            "client": client,
            "action": action,
            "outcome": outcome,
            "job_id": job_id,
            "batch_id": batch_id,
            "slide_sha256": slide_sha256,
        },
        since_ms=_ms(since, "since"),
        until_ms=_ms(until, "until"),
        cursor=page_token,
        limit=limit,
    )
    caller.audit("audit.read", status=200, detail=f"{len(entries)} entries")
    return AuditPage(items=[AuditEntry(**e) for e in entries], next_page_token=token)
