"""Errors as ``application/problem+json`` (RFC 9457), with every error code mapped in ONE table.

``STATUS_BY_CODE`` is the only place an error code meets an HTTP status. A test walks
``xmag.errors.all_error_codes()`` (the core's tree plus the service's branch) and fails when a code
is
missing here, so a new error class cannot ship without a status.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.logs import get_logger
from xmag.errors import XmagError

__all__ = [
    "PROBLEM_MEDIA_TYPE",
    "STATUS_BY_CODE",
    "install_problem_handlers",
    "problem_response",
    "status_for_code",
]

PROBLEM_MEDIA_TYPE = "application/problem+json"

STATUS_BY_CODE: dict[str, int] = {
    # core tree (xmag.errors)
    "XMAG_ERROR": 500,
    "SLIDE_ERROR": 422,
    "SLIDE_NOT_FOUND": 422,  # the request names a slide that is not there: fix the request
    "UNSUPPORTED_FORMAT": 422,
    "CORRUPT_SLIDE": 422,
    "REGION_READ_FAILED": 422,
    "UNKNOWN_MPP": 422,
    "INVALID_MPP": 422,
    "NO_TISSUE": 422,
    "MODEL_PACKAGE_INVALID": 500,
    "MODEL_CHECKSUM_MISMATCH": 500,
    "INFERENCE_FAILED": 500,
    "JOB_ERROR": 500,
    "JOB_CANCELED": 409,
    "JOB_NOT_FOUND": 404,
    # service branch (service.errors)
    "SERVICE_ERROR": 500,
    "BAD_REQUEST": 400,
    "INVALID_REQUEST": 422,
    "EMPTY_UPLOAD": 422,
    "UPLOAD_TOO_LARGE": 413,
    "UPLOAD_CHECKSUM_MISMATCH": 422,
    "SLIDE_REFERENCE_REFUSED": 422,
    "UNKNOWN_TASK": 422,
    "CALLBACK_REFUSED": 422,
    "IDEMPOTENCY_KEY_REUSED": 422,
    "UNAUTHENTICATED": 401,
    "FORBIDDEN": 403,
    "NOT_FOUND": 404,
    "RESULT_NOT_READY": 409,
    "JOB_NOT_CANCELABLE": 409,
    "JOB_TIME_LIMIT": 500,
    "ATTEMPTS_EXHAUSTED": 500,
    "SERVICE_UNAVAILABLE": 503,
    "WEBHOOK_DELIVERY_FAILED": 502,
    # HTTP-level problems raised by the framework (no XmagError behind them)
    "METHOD_NOT_ALLOWED": 405,
    "UNSUPPORTED_MEDIA_TYPE": 415,
}

_log = get_logger("service.problems")


def status_for_code(code: str) -> int:
    """HTTP status for an error code; unknown codes are server errors (and logged)."""
    status = STATUS_BY_CODE.get(code)
    if status is None:
        _log.error("unmapped error code", extra={"code": code})
        return 500
    return status


def problem_body(
    code: str, detail: str, *, status: int | None = None, instance: str | None = None, **extra: Any
) -> dict[str, Any]:
    """The problem+json document for one error code."""
    status = status or status_for_code(code)
    body: dict[str, Any] = {
        "type": f"urn:xmag:problem:{code.lower().replace('_', '-')}",
        "title": HTTPStatus(status).phrase,
        "status": status,
        "code": code,
        "detail": detail,
    }
    if instance:
        body["instance"] = instance
    body.update({k: v for k, v in extra.items() if v is not None})
    return body


def problem_response(
    code: str,
    detail: str,
    *,
    status: int | None = None,
    instance: str | None = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    """A problem+json response."""
    body = problem_body(code, detail, status=status, instance=instance, **extra)
    return JSONResponse(
        body, status_code=body["status"], media_type=PROBLEM_MEDIA_TYPE, headers=headers
    )


def error_response(exc: XmagError, *, instance: str | None = None) -> JSONResponse:
    """The problem+json response for an XmagError (its code, message and fields)."""
    headers = {"WWW-Authenticate": 'Bearer realm="xmag"'} if exc.code == "UNAUTHENTICATED" else None
    return problem_response(
        exc.code, exc.message, instance=instance, headers=headers, fields=exc.fields or None
    )


def _http_code(status: int) -> str:
    return {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED", 415: "UNSUPPORTED_MEDIA_TYPE"}.get(
        status, "BAD_REQUEST" if status < 500 else "SERVICE_ERROR"
    )


def install_problem_handlers(app: FastAPI) -> None:
    """Turn every error the app can raise into problem+json."""

    async def on_xmag(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, XmagError)
        return error_response(exc, instance=request.url.path)

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        errors = [
            {"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", ""))}
            for e in exc.errors()
        ]
        return problem_response(
            "INVALID_REQUEST",
            "The request does not match the schema; see `errors` and /openapi.json.",
            instance=request.url.path,
            errors=errors,
        )

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        return problem_response(
            _http_code(exc.status_code),
            str(exc.detail),
            status=exc.status_code,
            instance=request.url.path,
            headers=dict(exc.headers or {}) or None,
        )

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        _log.exception("unhandled error", extra={"path": request.url.path})
        return problem_response(
            "SERVICE_ERROR",
            "An unexpected error occurred; it has been logged.",
            instance=request.url.path,
        )

    app.add_exception_handler(XmagError, on_xmag)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_unexpected)
