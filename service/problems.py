"""Errors as ``application/problem+json`` (RFC 9457), with every error code mapped in ONE table.

``STATUS_BY_CODE`` is the only place an error code meets an HTTP status. A test walks
``xmag.errors.all_error_codes()`` (the core's tree plus the service's branch) and fails when a code
is
missing here, so a new error class cannot ship without a status.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from service.logs import get_logger
from xmag.errors import XmagError

__all__ = [
    "PROBLEM_MEDIA_TYPE",
    "STATUS_BY_CODE",
    "api_words",
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
    "READ_BUDGET_EXCEEDED": 422,
    "SLIDE_TOO_LARGE": 422,
    "UNKNOWN_MPP": 422,
    "INVALID_MPP": 422,
    "NO_TISSUE": 422,
    "MODEL_PACKAGE_INVALID": 500,
    "MODEL_CHECKSUM_MISMATCH": 500,
    "INFERENCE_FAILED": 500,
    "INVALID_SETTINGS": 500,  # raised at startup, before any request; mapped for completeness
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
    "SLIDE_IN_USE": 409,
    "JOB_TIME_LIMIT": 500,
    "ATTEMPTS_EXHAUSTED": 500,
    "SERVICE_UNAVAILABLE": 503,
    "WEBHOOK_DELIVERY_FAILED": 502,
    # HTTP-level problems raised by the framework (no XmagError behind them)
    "METHOD_NOT_ALLOWED": 405,
    "UNSUPPORTED_MEDIA_TYPE": 415,
}

_log = get_logger("service.problems")

#: CLI flags in the core's messages, and the job option (API word) each stands for.
_CLI_FLAGS = {"--mpp": "mpp_override", "--default-mpp": "default_mpp"}
#: Server settings named in messages, as a client knows them (it cannot see the settings).
_SETTING_WORDS = {
    "XMAG_SLIDE_ROOTS": "the service's slide roots",
    "XMAG_CALLBACK_ALLOWED_HOSTS": "the service's callback host allowlist",
}
_FLAG_RE = re.compile(r"(?<![\w-])--([a-z][a-z0-9-]*)")


def api_words(
    message: str, *, redact: Sequence[str] = (), names: Mapping[str, str] | None = None
) -> str:
    """A message in the API's words: CLI flags as ``options.<name>``, server settings described,
    no server paths.

    Args:
        redact: server folders (data dir, slide roots) to hide: a path under one becomes its
            part below the folder.
        names: exact server paths -> the name the client knows (an upload's file name).
    """
    for path, name in (names or {}).items():
        if path:
            message = message.replace(path, name)
    for folder in sorted((f.rstrip("/") for f in redact if f), key=len, reverse=True):
        message = message.replace(folder + "/", "").replace(folder, "<server>")

    def flag(match: re.Match[str]) -> str:
        name = _CLI_FLAGS.get(match.group(0), match.group(1).replace("-", "_"))
        return f"options.{name}"

    for setting, words in _SETTING_WORDS.items():
        message = message.replace(setting, words)
    message = _FLAG_RE.sub(flag, message)
    # "(options.mpp_override / mpp_override)" after the flag was replaced: say it once.
    return re.sub(r"(options\.(\w+)) / \2\b", r"\1", message)


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


def error_response(
    exc: XmagError, *, instance: str | None = None, redact: Sequence[str] = ()
) -> JSONResponse:
    """The problem+json response for an XmagError (its code, message and fields), in the API's
    words and without server paths (``redact``: the server folders to hide)."""
    headers = {"WWW-Authenticate": 'Bearer realm="xmag"'} if exc.code == "UNAUTHENTICATED" else None
    fields = {
        k: api_words(v, redact=redact) if isinstance(v, str) else v
        for k, v in (exc.fields or {}).items()
    }
    return problem_response(
        exc.code,
        api_words(exc.message, redact=redact),
        instance=instance,
        headers=headers,
        fields=fields or None,
    )


def _http_code(status: int) -> str:
    return {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED", 415: "UNSUPPORTED_MEDIA_TYPE"}.get(
        status, "BAD_REQUEST" if status < 500 else "SERVICE_ERROR"
    )


def _allowed_methods(app: FastAPI, request: Request) -> list[str]:
    """Every method some route of the app serves at the request's path."""
    methods: set[str] = set()
    for route in app.router.routes:
        match, _ = route.matches({**request.scope, "method": "GET"})
        if match != Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    return sorted(methods)


def install_problem_handlers(app: FastAPI, *, redact: Sequence[str] = ()) -> None:
    """Turn every error the app can raise into problem+json.

    Args:
        redact: server folders (data dir, slide roots) never shown in a message.
    """

    async def on_xmag(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, XmagError)
        return error_response(exc, instance=request.url.path, redact=redact)

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
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            # Starlette's Allow names the first route of the path only; list every route's.
            headers["Allow"] = ", ".join(_allowed_methods(app, request))
        return problem_response(
            _http_code(exc.status_code),
            str(exc.detail),
            status=exc.status_code,
            instance=request.url.path,
            headers=headers or None,
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
