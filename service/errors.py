"""Errors raised by the service itself, as a branch of the core's one tree.

    XmagError (xmag.errors)
    └── ServiceError                       SERVICE_ERROR
        ├── RequestError                   the HTTP request is wrong; the client must change it
        │   ├── InvalidRequestError        INVALID_REQUEST (malformed JSON, failed validation)
        │   ├── EmptyUploadError           EMPTY_UPLOAD
        │   ├── UploadTooLargeError        UPLOAD_TOO_LARGE
        │   ├── ChecksumMismatchUploadError UPLOAD_CHECKSUM_MISMATCH
        │   ├── SlideReferenceError        SLIDE_REFERENCE_REFUSED (traversal, outside roots)
        │   ├── UnknownTaskError           UNKNOWN_TASK
        │   ├── CallbackRefusedError       CALLBACK_REFUSED (host not allowed for webhooks)
        │   └── IdempotencyConflictError   IDEMPOTENCY_KEY_REUSED
        ├── AuthenticationError            UNAUTHENTICATED (missing or unknown API key)
        ├── PermissionDeniedError          FORBIDDEN (the key lacks the scope)
        ├── NotFoundError                  NOT_FOUND (slide, batch, artifact)
        ├── ResultNotReadyError            RESULT_NOT_READY (the job has not succeeded yet)
        ├── JobNotCancelableError          JOB_NOT_CANCELABLE (the job already finished)
        ├── SlideInUseError                SLIDE_IN_USE (delete refused: its jobs still run)
        ├── JobTimeLimitError              JOB_TIME_LIMIT (a job ran past its time limit)
        ├── AttemptsExhaustedError         ATTEMPTS_EXHAUSTED (dead-lettered: crashed or failed
        │                                  transiently on every attempt)
        ├── ServiceUnavailableError        SERVICE_UNAVAILABLE (Redis down, no worker)
        └── WebhookDeliveryError           WEBHOOK_DELIVERY_FAILED (service.webhooks; retried)

Every code maps to an HTTP status in ``service.problems.STATUS_BY_CODE``.
"""

from __future__ import annotations

from xmag.errors import XmagError

__all__ = [
    "AttemptsExhaustedError",
    "AuthenticationError",
    "CallbackRefusedError",
    "ChecksumMismatchUploadError",
    "EmptyUploadError",
    "IdempotencyConflictError",
    "InvalidRequestError",
    "JobNotCancelableError",
    "JobTimeLimitError",
    "NotFoundError",
    "PermissionDeniedError",
    "RequestError",
    "ResultNotReadyError",
    "ServiceError",
    "ServiceUnavailableError",
    "SlideInUseError",
    "SlideReferenceError",
    "UnknownTaskError",
    "UploadTooLargeError",
]


class ServiceError(XmagError):
    code = "SERVICE_ERROR"


class RequestError(ServiceError):
    code = "BAD_REQUEST"


class InvalidRequestError(RequestError):
    code = "INVALID_REQUEST"


class EmptyUploadError(RequestError):
    code = "EMPTY_UPLOAD"


class UploadTooLargeError(RequestError):
    code = "UPLOAD_TOO_LARGE"


class ChecksumMismatchUploadError(RequestError):
    code = "UPLOAD_CHECKSUM_MISMATCH"


class SlideReferenceError(RequestError):
    code = "SLIDE_REFERENCE_REFUSED"


class UnknownTaskError(RequestError):
    code = "UNKNOWN_TASK"


class CallbackRefusedError(RequestError):
    code = "CALLBACK_REFUSED"


class IdempotencyConflictError(RequestError):
    code = "IDEMPOTENCY_KEY_REUSED"


class AuthenticationError(ServiceError):
    code = "UNAUTHENTICATED"


class PermissionDeniedError(ServiceError):
    code = "FORBIDDEN"


class NotFoundError(ServiceError):
    code = "NOT_FOUND"


class ResultNotReadyError(ServiceError):
    code = "RESULT_NOT_READY"


class JobNotCancelableError(ServiceError):
    code = "JOB_NOT_CANCELABLE"


class SlideInUseError(ServiceError):
    code = "SLIDE_IN_USE"


class JobTimeLimitError(ServiceError):
    code = "JOB_TIME_LIMIT"


class AttemptsExhaustedError(ServiceError):
    code = "ATTEMPTS_EXHAUSTED"


class ServiceUnavailableError(ServiceError):
    code = "SERVICE_UNAVAILABLE"
    transient = True
