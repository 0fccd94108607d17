"""Jobs: submission (one slide), listing, state, results, artifacts and cancellation.

Every job belongs to the client whose key submitted it; another client's job answers 404 (as if
it did not exist), an ``admin`` key sees every client's. Reads of results and artifacts,
submissions, cancels and refusals are written to the audit log (``service.audit``).
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, JSONResponse

from service.api._deps import (
    BODY_ERRORS,
    ERRORS,
    Caller,
    IdempotencyKey,
    Reader,
    ServiceState,
    Submitter,
    base_url,
    problem,
    replayed_id,
)
from service.callbacks import check_callback_url
from service.errors import (
    JobNotCancelableError,
    NotFoundError,
    ResultNotReadyError,
    UnknownTaskError,
)
from service.problems import api_words, problem_response
from service.queue import send_webhook
from service.schemas import (
    CancelView,
    JobErrorView,
    JobList,
    JobRequest,
    JobResult,
    JobView,
    Progress,
    ms_to_datetime,
)
from service.slides import resolve_reference, stored_slide_path
from service.store import FINAL_STATES, JobRecord, JobSpec, JobState, new_id, request_hash
from service.webhooks import build_event
from xmag.errors import SlideNotFoundError
from xmag.store import ARTIFACTS

__all__ = [
    "JOB_ID",
    "PAGE_TOKEN",
    "RETRY_AFTER",
    "job_spec",
    "job_view",
    "redact_paths",
    "retry_after_s",
    "router",
]

router = APIRouter()

#: Seconds a client should wait before polling a queued / running job again.
RETRY_AFTER_QUEUED_S = 5
RETRY_AFTER_RUNNING_S = 2
#: OpenAPI header entry of Retry-After.
RETRY_AFTER: dict[str, Any] = {
    "Retry-After": {
        "description": "Seconds to wait before polling the job again (queued or running).",
        "schema": {"type": "integer", "minimum": 1},
    }
}
_LOCATION = {"Location": {"description": "The job's URL.", "schema": {"type": "string"}}}
#: OpenAPI links from a job in a response body to the operations on it.
JOB_LINKS = {
    name: {"operationId": op, "parameters": {"job_id": "$response.body#/id"}}
    for name, op in {
        "GetJob": "getJob",
        "GetJobResult": "getJobResult",
        "CancelJob": "cancelJob",
    }.items()
}
JOB_ID = Annotated[str, PathParam(min_length=1, max_length=80, description="The job id.")]
PAGE_TOKEN = Annotated[
    str | None,
    Query(
        max_length=200,
        pattern=r"^[0-9]+(:[A-Za-z0-9_]+)?$",
        description="next_page_token of the previous page (omit for the first page).",
    ),
]
_ARTIFACT = Annotated[
    str,
    PathParam(
        description="An artifact of the result.",
        json_schema_extra={"enum": sorted(ARTIFACTS)},
    ),
]


#: OpenAPI header entry of the body's checksum.
CONTENT_DIGEST: dict[str, Any] = {
    "Content-Digest": {
        "description": "RFC 9530 `sha-256=:<base64>:` of the body, to check what was received.",
        "schema": {"type": "string"},
    }
}


def content_digest(data: bytes | Path) -> str:
    """The RFC 9530 Content-Digest (sha-256) of bytes or of a file (read in chunks)."""
    sha = hashlib.sha256()
    if isinstance(data, bytes):
        sha.update(data)
    else:
        with data.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                sha.update(chunk)
    return f"sha-256=:{base64.b64encode(sha.digest()).decode()}:"


def retry_after_s(state: JobState) -> int | None:
    """The Retry-After of a job in ``state`` (None once it is final)."""
    if state == JobState.QUEUED:
        return RETRY_AFTER_QUEUED_S
    if state == JobState.RUNNING:
        return RETRY_AFTER_RUNNING_S
    return None


def _set_retry_after(response: Response, record: JobRecord) -> None:
    seconds = retry_after_s(record.state)
    if seconds is not None:
        response.headers["Retry-After"] = str(seconds)


def redact_paths(state: ServiceState) -> list[str]:
    """The server folders a message must never show (data dir, slide roots)."""
    settings = state.settings
    return [str(settings.data_dir), *(str(r) for r in settings.slide_roots)]


def job_view(record: JobRecord, base: str, redact: list[str] | None = None) -> JobView:
    """The API view of a job record, with links under ``base``; messages without server paths."""
    links = {"self": f"{base}/v1/jobs/{record.id}"}
    if record.state == JobState.SUCCEEDED:
        links["result"] = f"{base}/v1/jobs/{record.id}/result"
        for name in ARTIFACTS:
            links[name] = f"{base}/v1/jobs/{record.id}/artifacts/{name}"
    error = record.error
    return JobView(
        id=record.id,
        state=record.state,
        priority=record.priority,
        client=record.client,
        reference=record.reference or None,
        metadata=dict(record.metadata) or None,
        batch_id=record.batch_id or None,
        slide_id=record.slide_id or None,
        slide_sha256=record.slide_sha256 or None,
        slide_name=record.display_name or None,
        tasks=list(record.tasks) or None,
        options=dict(record.options),
        progress=Progress(tiles_done=record.tiles_done, tiles_total=record.tiles_total),
        attempts=record.attempts,
        cache_hit=record.cache_hit,
        created_at=ms_to_datetime(record.created_ms),
        updated_at=ms_to_datetime(record.updated_ms),
        started_at=ms_to_datetime(record.started_ms),
        finished_at=ms_to_datetime(record.finished_ms),
        error=JobErrorView(code=error.code, message=_message(record, redact)) if error else None,
        links=links,
    )


def _message(record: JobRecord, redact: list[str] | None) -> str:
    """A job's error message in the API's words, naming the slide as the client knows it."""
    message = record.error.message if record.error else ""
    names = {record.slide_path: record.display_name or "the slide"}
    return api_words(message, redact=redact or [], names=names)


def job_spec(
    state: ServiceState,
    caller: Caller,
    req: JobRequest,
    base: str,
    job_id: str,
    *,
    batch_id: str = "",
) -> JobSpec:
    """Validate one job request and turn it into a new record's fields (raises typed errors)."""
    if req.slide_id is not None:
        slide = state.store.slide_for(req.slide_id, caller.client)
        if slide is None:
            caller.audit(
                "job.submit",
                "not_found",
                status=422,
                slide_sha256=req.slide_id,
                detail="slide not uploaded by this client",
            )
            raise SlideNotFoundError(
                "This client uploaded no slide with this slide_id; upload it with PUT /v1/slides "
                "first.",
                slide_id=req.slide_id,
            )
        path = stored_slide_path(state.settings.slide_store, req.slide_id, slide.get("ext", ""))
        kind, sha256, size_bytes = "upload", str(slide["sha256"]), int(slide["size_bytes"])
        display, slide_ref = str(slide.get("filename") or ""), ""
    else:
        path = resolve_reference(req.path or "", state.settings.slide_roots)
        kind, sha256, size_bytes = "path", "", 0  # the worker's digest cache finds them
        display = slide_ref = req.path or ""
    if req.callback_url is not None:
        check_callback_url(str(req.callback_url), state.settings.callback_allowed_hosts)
    if req.tasks:
        known = _known_tasks(state)
        unknown = sorted(set(req.tasks) - known) if known is not None else []
        if unknown:
            raise UnknownTaskError(
                f"Unknown task(s) {unknown}; the loaded models offer {sorted(known or [])}."
            )
    return JobSpec(
        slide_kind=kind,
        slide_path=str(path),
        slide_id=req.slide_id or "",
        slide_sha256=sha256,
        slide_size_bytes=size_bytes,
        priority=req.priority,
        tasks=tuple(req.tasks or ()),
        options=req.options.model_dump(mode="json", exclude_none=True),
        callback_url=str(req.callback_url) if req.callback_url else "",
        result_url=f"{base}/v1/jobs/{job_id}/result",
        job_url=f"{base}/v1/jobs/{job_id}",
        batch_id=batch_id,
        client=caller.client,
        reference=req.reference or "",
        metadata=req.metadata or {},
        display_name=display,
        slide_ref=slide_ref,
    )


def _known_tasks(state: ServiceState) -> set[str] | None:
    models = state.store.models()
    if not models:
        return None  # no worker has published its card yet: cannot check
    names: set[str] = set()
    for card in models.values():
        for head in card.get("heads") or []:
            if isinstance(head, dict) and head.get("name"):
                names.add(str(head["name"]))
        cascade = card.get("cascade")  # a cell-level model's task (xmag.cascade)
        if isinstance(cascade, dict) and cascade.get("task"):
            names.add(str(cascade["task"]))
    return names


@router.post(
    "/v1/jobs",
    tags=["jobs"],
    operation_id="submitJob",
    summary="Submit one slide",
    status_code=202,
    response_model=JobView,
    responses={
        202: {
            "description": "Accepted (or replayed for the same Idempotency-Key).",
            "headers": {**RETRY_AFTER, **_LOCATION},
            "links": JOB_LINKS,
        },
        **BODY_ERRORS,
    },
)
def submit_job(
    request: Request,
    response: Response,
    body: JobRequest,
    caller: Submitter,
    idempotency_key: IdempotencyKey = None,
) -> JobView:
    state = caller.state
    base = base_url(request)
    job_id = new_id("job")
    spec = job_spec(state, caller, body, base, job_id)
    body_hash = request_hash(body.model_dump(mode="json"))
    idem = state.store.idem_key(caller.client, idempotency_key) if idempotency_key else ""
    created = state.store.create_job(spec, job_id=job_id, idem_key=idem, idem_hash=body_hash)
    if created.created:
        state.actors.slides[body.priority].send(job_id)
    else:
        job_id = replayed_id(response, created.prior, body_hash, "job")
    record = caller.job(job_id, "job.submit")
    caller.audit(
        "job.submit",
        status=202,
        job_id=job_id,
        slide_sha256=record.slide_sha256 or None,
        detail=None if created.created else "idempotent replay",
    )
    response.headers["Location"] = f"{base}/v1/jobs/{job_id}"
    _set_retry_after(response, record)
    return job_view(record, base, redact_paths(state))


@router.get(
    "/v1/jobs",
    tags=["jobs"],
    operation_id="listJobs",
    summary="List this client's jobs (an admin: every client's), newest first, by page",
    response_model=JobList,
    responses={**ERRORS},
)
def list_jobs(
    request: Request,
    caller: Reader,
    state_: Annotated[
        JobState | None, Query(alias="state", description="e.g. dead: the dead letters")
    ] = None,
    batch: Annotated[str | None, Query(max_length=80, description="A batch id.")] = None,
    reference: Annotated[
        str | None, Query(min_length=1, max_length=128, description="The client's reference.")
    ] = None,
    slide_sha256: Annotated[
        str | None, Query(pattern=r"^[0-9a-f]{64}$", description="The slide's sha256.")
    ] = None,
    path: Annotated[
        str | None,
        Query(min_length=1, max_length=4096, description="The path as given at submission."),
    ] = None,
    client: Annotated[
        str | None, Query(max_length=63, description="Admin only: one client's jobs.")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    page_token: PAGE_TOKEN = None,
) -> JobList:
    state = caller.state
    scope = caller.scope_client
    if scope is None and client is not None:
        scope = client  # an admin narrowing to one client
    records, token = state.store.page_jobs(
        client=scope,
        state=state_.value if state_ else None,
        reference=reference,
        slide_sha256=slide_sha256,
        path=path,
        batch_id=batch,
        limit=limit,
        cursor=page_token,
    )
    base = base_url(request)
    redact = redact_paths(state)
    return JobList(items=[job_view(r, base, redact) for r in records], next_page_token=token)


@router.get(
    "/v1/jobs/{job_id}",
    tags=["jobs"],
    operation_id="getJob",
    summary="A job's state, progress, timestamps, error and the client's reference",
    response_model=JobView,
    responses={
        200: {"description": "The job.", "headers": RETRY_AFTER},
        **ERRORS,
        404: problem("no such job, or another client's (JOB_NOT_FOUND)"),
    },
)
def get_job(request: Request, response: Response, job_id: JOB_ID, caller: Reader) -> JobView:
    record = caller.job(job_id, "job.read")
    _set_retry_after(response, record)
    return job_view(record, base_url(request), redact_paths(caller.state))


def _succeeded_key(caller: Caller, record: JobRecord, action: str) -> str | JSONResponse:
    """The result key of a succeeded job; else the problem to answer (409)."""
    if record.state == JobState.SUCCEEDED:
        return record.result_key
    if record.state in FINAL_STATES:
        # The job's own problem, with 409: the request is right, the job has no result.
        error = record.error
        code = error.code if error else "JOB_ERROR"
        caller.audit(action, "conflict", status=409, job_id=record.id, detail=code)
        return problem_response(
            code,
            _message(record, redact_paths(caller.state)) or f"The job is {record.state}.",
            status=409,
            instance=f"/v1/jobs/{record.id}",
            job_id=record.id,
            job_state=record.state.value,
        )
    raise ResultNotReadyError(
        f"Job {record.id} is {record.state}; poll GET /v1/jobs/{record.id} until it succeeds "
        "(see Retry-After).",
        state=record.state.value,
    )


def _not_ready_headers(record: JobRecord) -> dict[str, str]:
    seconds = retry_after_s(record.state)
    return {"Retry-After": str(seconds)} if seconds else {}


def _display_result(result: dict[str, Any], record: JobRecord) -> dict[str, Any]:
    """result.json as this job's client sees it: its slide name, no server path, its context.

    The stored result is shared by every job on the same bytes (whoever uploaded them first);
    the slide's name is the one this job's client gave.
    """
    slide = result.get("slide")
    if isinstance(slide, dict):
        name = record.display_name or Path(str(slide.get("path", ""))).name
        slide["name"] = name
        slide["path"] = name
    result["job"] = {
        "job_id": record.id,
        "client": record.client,
        "reference": record.reference or None,
        "metadata": dict(record.metadata) or None,
    }
    if record.tasks:
        # One encoder pass feeds every head, so the stored result (shared by every job on the
        # same content) holds them all; the job reports the predictions it asked for.
        result["predictions"] = [
            p for p in result.get("predictions", []) if p.get("name") in record.tasks
        ]
    return result


@router.get(
    "/v1/jobs/{job_id}/result",
    tags=["jobs"],
    operation_id="getJobResult",
    summary="result.json of a succeeded job, with the job's reference",
    response_model=JobResult,
    responses={
        200: {"description": "The result.", "headers": CONTENT_DIGEST},
        **ERRORS,
        404: problem("no such job, or another client's (JOB_NOT_FOUND)"),
        409: {
            **problem(
                "not ready (RESULT_NOT_READY, with Retry-After), or the job failed, was "
                "canceled or dead-lettered: the problem is the job's own (its code)"
            ),
            "headers": RETRY_AFTER,
        },
    },
)
def get_result(request: Request, job_id: JOB_ID, caller: Reader) -> Response:
    record = caller.job(job_id, "result.read")
    try:
        key = _succeeded_key(caller, record, "result.read")
    except ResultNotReadyError as exc:
        response = problem_response(
            exc.code,
            exc.message,
            instance=request.url.path,
            headers=_not_ready_headers(record),
            fields=exc.fields,
        )
        return response
    if isinstance(key, JSONResponse):
        return key
    path = caller.state.results.artifact(key, "result.json")
    if path is None:
        raise NotFoundError("The job's result is missing from the results store.")
    result = _display_result(json.loads(path.read_text(encoding="utf-8")), record)
    caller.audit(
        "result.read", status=200, job_id=record.id, slide_sha256=record.slide_sha256 or None
    )
    body = json.dumps(result, separators=(",", ":")).encode()
    return Response(
        body, media_type="application/json", headers={"Content-Digest": content_digest(body)}
    )


@router.get(
    "/v1/jobs/{job_id}/artifacts/{name}",
    tags=["jobs"],
    operation_id="getJobArtifact",
    summary="An artifact of a succeeded job (features.h5, heatmap.png, tiles.geojson)",
    response_class=FileResponse,
    responses={
        200: {
            "description": "The artifact's bytes.",
            "headers": CONTENT_DIGEST,
            "content": {
                media: {"schema": {"type": "string", "format": "binary"}}
                for media in sorted(set(ARTIFACTS.values()))
            },
        },
        **ERRORS,
        404: problem("no such job or artifact, or another client's (JOB_NOT_FOUND, NOT_FOUND)"),
        409: {**problem("not ready, or the job did not succeed"), "headers": RETRY_AFTER},
    },
)
def get_artifact(request: Request, job_id: JOB_ID, name: _ARTIFACT, caller: Reader) -> Response:
    record = caller.job(job_id, "artifact.download")
    if name not in ARTIFACTS:
        raise NotFoundError(f"Unknown artifact {name!r}; artifacts are {sorted(ARTIFACTS)}.")
    try:
        key = _succeeded_key(caller, record, "artifact.download")
    except ResultNotReadyError as exc:
        return problem_response(
            exc.code,
            exc.message,
            instance=request.url.path,
            headers=_not_ready_headers(record),
            fields=exc.fields,
        )
    if isinstance(key, JSONResponse):
        return key
    path = caller.state.results.artifact(key, name)
    if path is None:
        raise NotFoundError(f"The job's result has no {name}.")
    caller.audit(
        "artifact.download",
        status=200,
        job_id=record.id,
        slide_sha256=record.slide_sha256 or None,
        detail=name,
    )
    return FileResponse(
        path,
        media_type=ARTIFACTS[name],
        filename=f"{job_id}-{name}",
        headers={"Content-Digest": content_digest(path)},
    )


@router.post(
    "/v1/jobs/{job_id}/cancel",
    tags=["jobs"],
    operation_id="cancelJob",
    summary="Cancel a queued job (200: done), or ask a running one to stop (202)",
    response_model=CancelView,
    responses={
        200: {"description": "Canceled now, or already canceled (see `cancel`)."},
        202: {
            "description": "Requested: the running job stops between tile batches.",
            "model": CancelView,
            "headers": RETRY_AFTER,
        },
        **ERRORS,
        404: problem("no such job, or another client's (JOB_NOT_FOUND)"),
        409: problem("the job already finished (JOB_NOT_CANCELABLE)"),
    },
)
def cancel_job(
    request: Request, response: Response, job_id: JOB_ID, caller: Submitter
) -> CancelView:
    state = caller.state
    record = caller.job(job_id, "job.cancel")
    outcome = state.store.cancel(job_id)
    if outcome in FINAL_STATES and outcome != JobState.CANCELED:
        caller.audit("job.cancel", "conflict", status=409, job_id=job_id, detail=outcome)
        raise JobNotCancelableError(f"Job {job_id} already finished ({outcome}).")
    record = state.store.get(job_id) or record
    if outcome == "canceled" and record.callback_url:
        send_webhook(state.actors, record.callback_url, new_id("msg"), build_event(record))
    cancel = {"canceled": "canceled", "requested": "requested"}.get(outcome, "already_canceled")
    status = 202 if cancel == "requested" else 200
    response.status_code = status
    _set_retry_after(response, record)
    caller.audit("job.cancel", status=status, job_id=job_id, detail=cancel)
    view = job_view(record, base_url(request), redact_paths(state))
    return CancelView(**view.model_dump(), cancel=cancel, took_effect=cancel != "already_canceled")
