"""Batches: many slides submitted at once, created atomically with their jobs.

A batch view carries the counts by state and one page of its jobs (``limit``, default 100) with a
``next_page_token``: a 10,000-slide batch is read page by page, never inlined whole.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi import Path as PathParam

from service.api._deps import (
    BODY_ERRORS,
    ERRORS,
    Caller,
    IdempotencyKey,
    Reader,
    Submitter,
    base_url,
    problem,
    replayed_id,
)
from service.api.jobs import PAGE_TOKEN, RETRY_AFTER, job_spec, job_view, redact_paths
from service.errors import NotFoundError
from service.schemas import BatchRequest, BatchView, ms_to_datetime
from service.store import FINAL_STATES, JobSpec, new_id, request_hash
from xmag.errors import XmagError

__all__ = ["router"]

router = APIRouter()

BATCH_ID = Annotated[str, PathParam(min_length=1, max_length=80, description="The batch id.")]
#: Jobs in the first page of a batch view.
DEFAULT_BATCH_PAGE = 100


@router.post(
    "/v1/batches",
    tags=["batches"],
    operation_id="submitBatch",
    summary="Submit many slides at once",
    status_code=202,
    response_model=BatchView,
    responses={
        202: {
            "description": "Accepted (or replayed for the same Idempotency-Key).",
            "headers": {
                **RETRY_AFTER,
                "Location": {"description": "The batch's URL.", "schema": {"type": "string"}},
            },
            "links": {
                "GetBatch": {
                    "operationId": "getBatch",
                    "parameters": {"batch_id": "$response.body#/id"},
                }
            },
        },
        **BODY_ERRORS,
    },
)
def submit_batch(
    request: Request,
    response: Response,
    body: BatchRequest,
    caller: Submitter,
    idempotency_key: IdempotencyKey = None,
) -> BatchView:
    # (A comment, not a docstring: FastAPI would publish a docstring in the OpenAPI document.)
    # Validate every job, then create the batch, its jobs and the key in one Redis script; only
    # then send the messages: a crash in between leaves queued jobs without a message, which the
    # reconciler (service.reconcile) sends again.
    state = caller.state
    base = base_url(request)
    batch_id = new_id("batch")
    body_hash = request_hash(body.model_dump(mode="json"))
    prepared: list[tuple[str, JobSpec]] = []
    for index, job in enumerate(body.jobs):
        if job.callback_url is None and body.callback_url is not None:
            job = job.model_copy(update={"callback_url": body.callback_url})
        job_id = new_id("job")
        try:
            prepared.append((job_id, job_spec(state, caller, job, base, job_id, batch_id=batch_id)))
        except XmagError as exc:
            exc.fields["job_index"] = index
            raise
    idem = state.store.idem_key(caller.client, idempotency_key) if idempotency_key else ""
    created = state.store.create_batch(
        batch_id, prepared, idem_key=idem, idem_hash=body_hash, client=caller.client
    )
    if created.created:
        for job_id, spec in prepared:
            state.actors.slides[spec.priority].send(job_id)
    else:
        batch_id = replayed_id(response, created.prior, body_hash, "batch")
    caller.audit(
        "batch.submit",
        status=202,
        batch_id=batch_id,
        detail=f"{len(prepared)} jobs" if created.created else "idempotent replay",
    )
    response.headers["Location"] = f"{base}/v1/batches/{batch_id}"
    view = _batch_view(caller, batch_id, base, DEFAULT_BATCH_PAGE, None)
    if view.state != "completed":
        response.headers["Retry-After"] = "5"
    return view


@router.get(
    "/v1/batches/{batch_id}",
    tags=["batches"],
    operation_id="getBatch",
    summary="A batch: counts by state and one page of its jobs",
    response_model=BatchView,
    responses={**ERRORS, 404: problem("no such batch, or another client's (NOT_FOUND)")},
)
def get_batch(
    request: Request,
    batch_id: BATCH_ID,
    caller: Reader,
    limit: Annotated[int, Query(ge=1, le=1000, description="Jobs in this page.")] = (
        DEFAULT_BATCH_PAGE
    ),
    page_token: PAGE_TOKEN = None,
) -> BatchView:
    return _batch_view(caller, batch_id, base_url(request), limit, page_token)


def _batch_view(
    caller: Caller, batch_id: str, base: str, limit: int, page_token: str | None
) -> BatchView:
    state = caller.state
    batch = state.store.batch(batch_id)
    if batch is None or not caller.principal.sees(batch.client):
        caller.audit(
            "batch.read",
            "not_found",
            status=404,
            batch_id=batch_id[:80],
            detail="other client" if batch is not None else "no such batch",
        )
        raise NotFoundError(f"No batch {batch_id!r}.", batch_id=batch_id)
    records, token = state.store.page_jobs(
        client=None, batch_id=batch_id, limit=limit, cursor=page_token
    )
    counts = state.store.batch_counts(batch_id)
    total = sum(counts.values())
    final = sum(counts[s] for s in FINAL_STATES)
    overall = (
        "completed" if final == total else ("queued" if counts["queued"] == total else "running")
    )
    redact = redact_paths(state)
    return BatchView(
        id=batch_id,
        client=batch.client,
        created_at=ms_to_datetime(batch.created_ms),
        size=batch.size,
        state=overall,
        counts=counts,
        jobs=[job_view(r, base, redact) for r in records],
        next_page_token=token,
    )
