"""Slide uploads: streamed to disk under their sha256 (``service.slides``), owned per client.

The bytes are stored once whoever uploads them (content-addressed); each client holds its own
ownership record (``{ns}:client:{c}:slides``: the file name it gave, when), and reaches only the
slides it uploaded: another client's slide answers 404, and an upload of bytes another client
holds says nothing about it (``deduplicated`` is per client).

``DELETE /v1/slides/{slide_id}`` (retention) removes the client's ownership and every job of that
client on the slide (records, indexes and so their results); it is refused with 409
``SLIDE_IN_USE`` while one of those jobs is queued or running (cancel them first). The file and
the stored results go once no client owns the bytes and no remaining job uses the results.
"""

from __future__ import annotations

import re
import shutil
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from service.api._deps import ERRORS, Caller, Reader, Submitter, base_url, problem
from service.errors import SlideInUseError, UploadTooLargeError
from service.schemas import SlideUploaded
from service.slides import expected_sha256, receive_multipart, receive_raw, safe_extension

__all__ = ["clean_filename", "router"]

router = APIRouter()

SLIDE_ID = Annotated[
    str, PathParam(pattern=r"^[0-9a-fA-F]{64}$", description="The slide's sha256.")
]
_CHECKSUM_HEADERS: list[dict[str, Any]] = [
    {
        "name": "X-Content-SHA256",
        "in": "header",
        "required": False,
        "description": "sha256 of the body (hex); a mismatch is refused (UPLOAD_CHECKSUM_MISMATCH)",
        "schema": {"type": "string", "pattern": "^[0-9a-fA-F]{64}$"},
    },
    {
        "name": "Content-Digest",
        "in": "header",
        "required": False,
        "description": "RFC 9530 digest of the file; its `sha-256=:<base64>:` entry is checked "
        "like X-Content-SHA256 (other algorithms are ignored)",
        "schema": {"type": "string"},
    },
]
_BINARY_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    },
    "parameters": _CHECKSUM_HEADERS,
}
_MULTIPART_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {"file": {"type": "string", "format": "binary"}},
                }
            }
        },
    },
    "parameters": _CHECKSUM_HEADERS,
}
_SLIDE_LINKS = {
    name: {"operationId": op, "parameters": {"slide_id": "$response.body#/slide_id"}}
    for name, op in {"GetSlide": "getSlide", "DeleteSlide": "deleteSlide"}.items()
}
_UPLOAD_RESPONSES: dict[int | str, dict[str, Any]] = {
    201: {
        "description": "Stored (new for this client).",
        "headers": {"Location": {"description": "The slide's URL.", "schema": {"type": "string"}}},
        "links": _SLIDE_LINKS,
    },
    200: {
        "model": SlideUploaded,
        "description": "This client had uploaded these bytes.",
        "links": _SLIDE_LINKS,
    },
    **ERRORS,
    413: problem("larger than the upload limit (UPLOAD_TOO_LARGE)"),
}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def clean_filename(name: str | None) -> str:
    """The last path component of a client's file name, without control characters (<=255)."""
    if not name:
        return ""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    return _CONTROL.sub("", base)[:255]


def _precheck(request: Request) -> None:
    length = request.headers.get("content-length")
    cap = request.app.state.xmag.settings.max_upload_bytes
    if length is not None and length.isdigit() and int(length) > cap:
        raise UploadTooLargeError(
            f"The upload is {length} bytes; the limit is {cap}. Send a smaller slide or "
            "submit it by reference (`path`)."
        )


async def _finish(request: Request, caller: Caller, stored: Any, filename: str) -> JSONResponse:
    before = await run_in_threadpool(
        caller.state.store.put_slide,
        stored.sha256,
        stored.size_bytes,
        stored.ext,
        client=caller.client,
        filename=filename,
    )
    body = SlideUploaded(
        slide_id=stored.sha256,
        sha256=stored.sha256,
        size_bytes=stored.size_bytes,
        filename=filename or None,
        deduplicated=before,
    )
    await run_in_threadpool(
        caller.audit, "slide.upload", status=200 if before else 201, slide_sha256=stored.sha256
    )
    return JSONResponse(
        body.model_dump(),
        status_code=200 if before else 201,
        headers={"Location": f"{base_url(request)}/v1/slides/{stored.sha256}"},
    )


@router.put(
    "/v1/slides",
    tags=["slides"],
    operation_id="uploadSlide",
    summary="Upload a slide as the raw request body (streamed to disk)",
    status_code=201,
    response_model=SlideUploaded,
    responses=_UPLOAD_RESPONSES,
    openapi_extra=_BINARY_BODY,
)
async def put_slide(
    request: Request,
    caller: Submitter,
    filename: Annotated[
        str | None,
        Query(max_length=255, description="The file's name; kept and shown to this client."),
    ] = None,
) -> JSONResponse:
    state = caller.state
    _precheck(request)
    stored = await receive_raw(
        request.stream(),
        state.settings.slide_store,
        max_bytes=state.settings.max_upload_bytes,
        expected=expected_sha256(dict(request.headers)),
        ext=safe_extension(filename),
    )
    return await _finish(request, caller, stored, clean_filename(filename))


@router.post(
    "/v1/slides",
    tags=["slides"],
    operation_id="uploadSlideMultipart",
    summary="Upload a slide as the `file` part of a multipart form (streamed to disk)",
    status_code=201,
    response_model=SlideUploaded,
    responses=_UPLOAD_RESPONSES,
    openapi_extra=_MULTIPART_BODY,
)
async def post_slide(request: Request, caller: Submitter) -> JSONResponse:
    state = caller.state
    _precheck(request)
    stored = await receive_multipart(
        request.stream(),
        request.headers.get("content-type", ""),
        state.settings.slide_store,
        max_bytes=state.settings.max_upload_bytes,
        expected=expected_sha256(dict(request.headers)),
    )
    return await _finish(request, caller, stored, clean_filename(stored.filename))


def _view(record: dict[str, Any]) -> SlideUploaded:
    return SlideUploaded(
        slide_id=str(record["sha256"]),
        sha256=str(record["sha256"]),
        size_bytes=int(record["size_bytes"]),
        filename=str(record.get("filename") or "") or None,
        deduplicated=False,
    )


@router.get(
    "/v1/slides/{slide_id}",
    tags=["slides"],
    operation_id="getSlide",
    summary="A slide this client uploaded",
    response_model=SlideUploaded,
    responses={**ERRORS, 404: problem("not uploaded by this client (NOT_FOUND)")},
)
def get_slide(slide_id: SLIDE_ID, caller: Reader) -> SlideUploaded:
    return _view(caller.slide(slide_id.lower(), "slide.read"))


@router.delete(
    "/v1/slides/{slide_id}",
    tags=["slides"],
    operation_id="deleteSlide",
    summary="Delete this client's upload and its jobs and results on it (retention)",
    status_code=204,
    response_class=Response,
    responses={
        204: {"description": "Deleted."},
        **ERRORS,
        404: problem("not uploaded by this client (NOT_FOUND)"),
        409: problem("a job of this client on the slide is queued or running (SLIDE_IN_USE)"),
    },
)
def delete_slide(slide_id: SLIDE_ID, caller: Submitter) -> Response:
    state = caller.state
    sha = slide_id.lower()
    owner = caller.slide(sha, "slide.delete")["owner"]
    active = state.store.active_jobs_on(sha, owner)
    if active:
        caller.audit(
            "slide.delete",
            "conflict",
            status=409,
            slide_sha256=sha,
            detail=f"{len(active)} active jobs",
        )
        raise SlideInUseError(
            f"{len(active)} job(s) on this slide are queued or running (e.g. {active[0]}); "
            "cancel them (POST /v1/jobs/{job_id}/cancel) or wait for them, then delete again.",
            job_ids=active[:10],
        )
    jobs, orphaned, unowned = state.store.delete_slide(sha, owner)
    for key in orphaned:
        shutil.rmtree(state.results.path(key), ignore_errors=True)
    if unowned:
        folder = state.settings.slide_store / sha[:2]
        for path in folder.glob(f"{sha}*"):
            path.unlink(missing_ok=True)
    caller.audit(
        "slide.delete",
        status=204,
        slide_sha256=sha,
        detail=f"{len(jobs)} jobs, {len(orphaned)} results" + (", file removed" if unowned else ""),
    )
    return Response(status_code=204)
