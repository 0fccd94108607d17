"""What the API's routers share: the process state, authentication and small helpers."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any

import dramatiq
from fastapi import Depends, Header, Request, Response
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CollectorRegistry

from service.audit import AuditLog, audit_path
from service.auth import ApiKeyStore, Principal, Scope
from service.errors import (
    AuthenticationError,
    IdempotencyConflictError,
    NotFoundError,
    PermissionDeniedError,
)
from service.metrics import RedisMetricsCollector
from service.problems import PROBLEM_MEDIA_TYPE
from service.queue import (
    PRIORITY_QUEUES,
    WEBHOOK_QUEUE,
    Actors,
    broker_namespace,
    declare_actors,
    make_broker,
    redis_client,
)
from service.reconcile import Reconciler
from service.settings import ServiceSettings
from service.store import JobRecord, JobStore
from xmag.errors import JobNotFoundError
from xmag.store import ResultStore

__all__ = [
    "BODY_ERRORS",
    "ERRORS",
    "PROBLEM",
    "Admin",
    "Caller",
    "IdempotencyKey",
    "Reader",
    "ServiceState",
    "Submitter",
    "base_url",
    "replayed_id",
    "service_state",
]

_bearer = HTTPBearer(auto_error=False, description="API key as a bearer token.")
_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="API key.")
#: The problem+json schema (service.schemas.Problem), referenced by every error response.
_PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}
#: OpenAPI response entry of a problem+json answer.
PROBLEM: dict[str, Any] = {
    "content": {PROBLEM_MEDIA_TYPE: {"schema": _PROBLEM_REF}},
    "description": "problem+json",
}


def problem(description: str) -> dict[str, Any]:
    """An OpenAPI problem+json response entry with its own description."""
    return {**PROBLEM, "description": description}


#: The problem answers every authenticated route can give.
ERRORS: dict[int | str, dict[str, Any]] = {
    401: problem("missing, unknown, revoked or expired key (UNAUTHENTICATED)"),
    403: problem("the key lacks the scope (FORBIDDEN)"),
    422: problem("the request does not match the schema (INVALID_REQUEST)"),
}
#: ... and those of a route with a JSON body (400: the body is not JSON at all).
BODY_ERRORS: dict[int | str, dict[str, Any]] = {
    400: problem("the body is not JSON (BAD_REQUEST)"),
    **ERRORS,
}


class ServiceState:
    """What the handlers share: settings, Redis stores, the broker's actors."""

    def __init__(self, settings: ServiceSettings, redis_url: str) -> None:
        self.settings = settings
        self.redis_url = redis_url
        self.client = redis_client(redis_url)
        self.store = JobStore(self.client, settings.namespace)
        self.keys = ApiKeyStore(self.client, settings.namespace)
        self.audit = AuditLog(self.client, settings.namespace, audit_path(settings.data_dir))
        self.results = ResultStore(settings.results_store)
        self.broker = make_broker(settings, redis_url)
        self.actors: Actors = declare_actors(
            self.broker,
            settings,
            webhook_secret=self._webhook_secret,
        )
        self.webhook_worker: dramatiq.Worker | None = None
        self.reconciler: Reconciler | None = None
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(
            RedisMetricsCollector(
                self.client,
                settings.namespace,
                [q for q, _ in PRIORITY_QUEUES.values()] + [WEBHOOK_QUEUE],
                broker_namespace(settings),
                settings.worker_stale_s,
            )
        )

    def _webhook_secret(self, client: str) -> str:
        """The client's own webhook secret, else the service-wide one."""
        own = self.keys.webhook_secret(client)
        return own or self.store.webhook_secret(self.settings.webhook_secret)

    def start(self, *, deliver_webhooks: bool) -> None:
        self.keys.sync_configured(self.settings.api_keys)
        if deliver_webhooks:
            self.webhook_worker = dramatiq.Worker(
                self.broker,
                queues={WEBHOOK_QUEUE},
                worker_threads=2,
                worker_timeout=self.settings.worker_idle_timeout_ms,
            )
            self.webhook_worker.start()
        if self.settings.reconcile_interval_s > 0:
            self.reconciler = Reconciler(
                self.store,
                self.broker.client,
                self.actors,
                broker_namespace(self.settings),
                interval_s=self.settings.reconcile_interval_s,
                after_s=self.settings.reconcile_after_s,
            )
            self.reconciler.start()

    def stop(self) -> None:
        if self.reconciler is not None:
            self.reconciler.stop()
        if self.webhook_worker is not None:
            self.webhook_worker.stop(timeout=5_000)
        self.broker.close()
        self.client.close()


def service_state(request: Request) -> ServiceState:
    """The ``ServiceState`` of the app serving ``request`` (set by its lifespan)."""
    state: ServiceState = request.app.state.xmag
    return state


def source_address(request: Request) -> str:
    """The peer address of a request (a proxy's own address behind one: forwarded headers are
    set by whoever connects, so they are not trusted for the audit log)."""
    return request.client.host if request.client else ""


@dataclass(frozen=True)
class Caller:
    """An authenticated request: the principal, where it came from, and the state to act on.

    Object-level authorisation lives here: ``job``, ``batch`` and ``slide`` answer another
    client's resource exactly as a missing one (404), and write the refusal to the audit log.
    """

    state: ServiceState
    principal: Principal
    source: str

    @property
    def client(self) -> str:
        return self.principal.client

    @property
    def scope_client(self) -> str | None:
        """The client whose resources this caller lists (None: an admin lists every client's)."""
        return None if self.principal.is_admin else self.principal.client

    def audit(self, action: str, outcome: str = "ok", **fields: Any) -> None:
        self.state.audit.record(
            action,
            outcome=outcome,
            client=self.principal.client,
            key_id=self.principal.key_id,
            source=self.source,
            **fields,
        )

    def job(self, job_id: str, action: str) -> JobRecord:
        """The job, if this caller may see it.

        Raises:
            JobNotFoundError: no such job, or another client's (404 either way).
        """
        record = self.state.store.get(job_id)
        if record is None or not self.principal.sees(record.client):
            self.audit(
                action,
                "not_found",
                status=404,
                job_id=job_id[:80],
                detail="other client" if record is not None else "no such job",
            )
            raise JobNotFoundError(
                f"No job {job_id!r}; list your jobs with GET /v1/jobs.", job_id=job_id
            )
        return record

    def slide(self, sha256: str, action: str) -> dict[str, Any]:
        """An uploaded slide this caller reaches (its own upload; any, for an admin).

        Raises:
            NotFoundError: not uploaded by this client (404).
        """
        record = self.state.store.slide_for(sha256, self.scope_client)
        if record is None:
            exists = self.state.store.get_slide(sha256) is not None
            self.audit(
                action,
                "not_found",
                status=404,
                slide_sha256=sha256 if len(sha256) == 64 else None,
                detail="other client" if exists else "no such slide",
            )
            raise NotFoundError(
                "No slide with this id was uploaded by this client; upload it with PUT /v1/slides.",
                slide_id=sha256,
            )
        return record


def _require(scope: Scope) -> Callable[..., Caller]:
    def dependency(
        request: Request,
        bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
        api_key: Annotated[str | None, Depends(_api_key_header)],
    ) -> Caller:
        state = service_state(request)
        key = bearer.credentials if bearer is not None else api_key
        source = source_address(request)
        try:
            principal = state.keys.authenticate(key)
        except AuthenticationError as exc:
            state.audit.record_refusal(
                source,
                status=401,
                detail=f"{request.method} {request.url.path[:200]}: "
                + ("no key" if not key else exc.message.split(";")[0]),
            )
            raise
        try:
            principal.require(scope)
        except PermissionDeniedError:
            state.audit.record(
                "auth.forbidden",
                outcome="refused",
                status=403,
                client=principal.client,
                key_id=principal.key_id,
                source=source,
                detail=f"{request.method} {request.url.path[:200]} needs {scope.value}",
            )
            raise
        return Caller(state, principal, source)

    return dependency


Reader = Annotated[Caller, Depends(_require(Scope.READ))]
Submitter = Annotated[Caller, Depends(_require(Scope.SUBMIT))]
Admin = Annotated[Caller, Depends(_require(Scope.ADMIN))]

IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        max_length=255,
        description="Retrying with the same key and body returns the same job.",
    ),
]


def base_url(request: Request) -> str:
    """The public base URL of links: ``XMAG_PUBLIC_URL``, else the address the server is bound
    to. Never the request's ``Host`` header: a client could put any host there, and the links
    land in Location headers, job records and webhook bodies."""
    configured = service_state(request).settings.public_url
    if configured:
        return configured.rstrip("/")
    server = request.scope.get("server")
    if not server:
        return str(request.base_url).rstrip("/")
    host, port = str(server[0]), server[1]
    if ":" in host:
        host = f"[{host}]"
    scheme = request.url.scheme
    default = {"http": 80, "https": 443}.get(scheme)
    netloc = host if port in (None, default) else f"{host}:{port}"
    return f"{scheme}://{netloc}{request.scope.get('root_path', '')}".rstrip("/")


def replayed_id(
    response: Response, prior: Mapping[str, Any] | None, body_hash: str, kind: str
) -> str:
    """The id an already used Idempotency-Key stands for; marks the response as a replay.

    Args:
        prior: the key's record ``{hash, kind, id}`` (None when it expired meanwhile).

    Raises:
        IdempotencyConflictError: when the key was used with another body or another kind.
    """
    prior = prior or {}
    if prior.get("hash") != body_hash or prior.get("kind") != kind:
        raise IdempotencyConflictError(
            "This Idempotency-Key was used with a different request; use a new key for a new "
            "request, or resend the original body."
        )
    response.headers["Idempotent-Replayed"] = "true"
    return str(prior["id"])
