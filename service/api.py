"""The REST API (FastAPI, versioned under /v1; the OpenAPI document is at /openapi.json).

Handlers that only talk to Redis are plain ``def`` (FastAPI runs them in its thread pool, so the
blocking redis-py calls never stall the event loop); the upload handlers are ``async`` because they
stream ``request.stream()`` to disk. Every error leaves as problem+json (``service.problems``).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Annotated, Any

import dramatiq
from fastapi import Depends, FastAPI, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from service.auth import ApiKeyStore, Principal, Scope
from service.callbacks import check_callback_url
from service.errors import (
    IdempotencyConflictError,
    JobNotCancelableError,
    NotFoundError,
    ResultNotReadyError,
    UnknownTaskError,
    UploadTooLargeError,
)
from service.metrics import RedisMetricsCollector
from service.problems import PROBLEM_MEDIA_TYPE, install_problem_handlers
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
from service.results import ARTIFACTS, ResultsStore
from service.schemas import (
    BatchRequest,
    BatchView,
    JobErrorView,
    JobList,
    JobRequest,
    JobView,
    ModelsView,
    Progress,
    SlideUploaded,
    ms_to_datetime,
)
from service.settings import ServiceSettings
from service.slides import (
    expected_sha256,
    receive_multipart,
    receive_raw,
    resolve_reference,
    safe_extension,
    stored_slide_path,
)
from service.store import FINAL_STATES, JobState, JobStore, new_id, request_hash
from xmag import __version__
from xmag.errors import JobNotFoundError, SlideNotFoundError

__all__ = ["create_app"]

_bearer = HTTPBearer(auto_error=False, description="API key as a bearer token.")
_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="API key.")
_PROBLEM = {"model": dict, "content": {PROBLEM_MEDIA_TYPE: {}}, "description": "problem+json"}
_ERRORS: dict[int | str, dict[str, Any]] = {
    s: {**_PROBLEM, "description": d}
    for s, d in {401: "missing or invalid key", 403: "wrong scope", 422: "invalid request"}.items()
}


class ServiceState:
    """What the handlers share: settings, Redis stores, the broker's actors."""

    def __init__(self, settings: ServiceSettings, redis_url: str) -> None:
        self.settings = settings
        self.redis_url = redis_url
        self.client = redis_client(redis_url)
        self.store = JobStore(self.client, settings.namespace)
        self.keys = ApiKeyStore(self.client, settings.namespace)
        self.results = ResultsStore(settings.results_store)
        self.broker = make_broker(settings, redis_url)
        self.actors: Actors = declare_actors(
            self.broker,
            settings,
            webhook_secret=lambda: self.store.webhook_secret(settings.webhook_secret),
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


def _state(request: Request) -> ServiceState:
    return request.app.state.xmag


def _require(scope: Scope) -> Callable[..., Principal]:
    def dependency(
        request: Request,
        bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
        api_key: Annotated[str | None, Depends(_api_key_header)],
    ) -> Principal:
        key = bearer.credentials if bearer is not None else api_key
        principal = _state(request).keys.authenticate(key)
        principal.require(scope)
        return principal

    return dependency


Reader = Annotated[Principal, Depends(_require(Scope.READ))]
Submitter = Annotated[Principal, Depends(_require(Scope.SUBMIT))]


def _base_url(request: Request) -> str:
    configured = _state(request).settings.public_url
    return (configured or str(request.base_url)).rstrip("/")


def _job_view(record: dict[str, str], base: str) -> JobView:
    job_id = record["id"]
    error = json.loads(record["error"]) if record.get("error") else None
    links = {"self": f"{base}/v1/jobs/{job_id}"}
    if record.get("state") == JobState.SUCCEEDED:
        links["result"] = f"{base}/v1/jobs/{job_id}/result"
        for name in ARTIFACTS:
            links[name] = f"{base}/v1/jobs/{job_id}/artifacts/{name}"
    return JobView(
        id=job_id,
        state=JobState(record["state"]),
        priority=record.get("priority", "normal"),
        batch_id=record.get("batch_id") or None,
        slide_id=record.get("slide_id") or None,
        tasks=json.loads(record["tasks"]) if record.get("tasks") else None,
        options=json.loads(record.get("options") or "{}"),
        progress=Progress(
            tiles_done=int(record.get("tiles_done", 0)),
            tiles_total=int(record.get("tiles_total", 0)),
        ),
        attempts=int(record.get("attempts", 0)),
        created_at=ms_to_datetime(record.get("created_ms")),
        updated_at=ms_to_datetime(record.get("updated_ms")),
        started_at=ms_to_datetime(record.get("started_ms")),
        finished_at=ms_to_datetime(record.get("finished_ms")),
        error=JobErrorView(code=error["code"], message=error.get("message", "")) if error else None,
        links=links,
    )


def _job_fields(state: ServiceState, req: JobRequest, base: str, job_id: str) -> dict[str, str]:
    """Validate one job request and turn it into record fields (raises typed errors)."""
    if req.slide_id is not None:
        slide = state.store.get_slide(req.slide_id)
        if slide is None:
            raise SlideNotFoundError(
                "No uploaded slide has this slide_id; upload it with PUT /v1/slides first.",
                slide_id=req.slide_id,
            )
        path = stored_slide_path(state.settings.slide_store, req.slide_id, slide.get("ext", ""))
        kind = "upload"
    else:
        path = resolve_reference(req.path or "", state.settings.slide_roots)
        kind = "path"
    if req.callback_url is not None:
        check_callback_url(str(req.callback_url), state.settings.callback_allowed_hosts)
    if req.tasks:
        known = _known_tasks(state)
        unknown = sorted(set(req.tasks) - known) if known is not None else []
        if unknown:
            raise UnknownTaskError(
                f"Unknown task(s) {unknown}; the loaded models offer {sorted(known or [])}."
            )
    return {
        "slide_kind": kind,
        "slide_path": str(path),
        "slide_id": req.slide_id or "",
        "priority": req.priority,
        "tasks": json.dumps(req.tasks) if req.tasks else "",
        "options": req.options.model_dump_json(exclude_none=True),
        "callback_url": str(req.callback_url) if req.callback_url else "",
        "result_url": f"{base}/v1/jobs/{job_id}/result",
        "job_url": f"{base}/v1/jobs/{job_id}",
    }


def _known_tasks(state: ServiceState) -> set[str] | None:
    models = state.store.models()
    if not models:
        return None  # no worker has published its card yet: cannot check
    names: set[str] = set()
    for card in models.values():
        for head in card.get("heads") or []:
            if isinstance(head, dict) and head.get("name"):
                names.add(str(head["name"]))
    return names


def _get_record(state: ServiceState, job_id: str) -> dict[str, str]:
    record = state.store.get(job_id)
    if record is None:
        raise JobNotFoundError(f"No job {job_id!r}; list jobs with GET /v1/jobs.", job_id=job_id)
    return record


def _replayed_id(
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


def create_app(
    settings: ServiceSettings, redis_url: str, *, deliver_webhooks: bool = True
) -> FastAPI:
    """Build the API bound to one Redis.

    Args:
        settings: service settings.
        redis_url: the Redis (embedded or ``REDIS_URL``).
        deliver_webhooks: run the webhook delivery consumer in this process.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = ServiceState(settings, redis_url)
        app.state.xmag = state
        state.start(deliver_webhooks=deliver_webhooks)
        try:
            yield
        finally:
            state.stop()

    app = FastAPI(
        title="xmag-serve",
        version=__version__,
        description="Whole-slide-image embeddings and predictions at 5x, as asynchronous jobs.",
        lifespan=lifespan,
        openapi_url="/openapi.json",
    )
    install_problem_handlers(app)
    _add_health_routes(app)
    _add_slide_routes(app)
    _add_job_routes(app)
    _add_batch_routes(app)
    return app


def _add_health_routes(app: FastAPI) -> None:
    @app.get("/healthz", tags=["health"], summary="The process is up")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        tags=["health"],
        summary="Redis reachable and a worker with its model",
        responses={503: {"description": "not ready: Redis down or no live worker"}},
    )
    def readyz(request: Request) -> JSONResponse:
        state = _state(request)
        try:
            state.client.ping()
            workers = state.store.live_workers(state.settings.worker_stale_s)
        except Exception as exc:
            return JSONResponse(
                {"status": "unavailable", "redis": False, "error": type(exc).__name__},
                status_code=503,
            )
        loaded = [w for w in workers if w.get("model_loaded") == "1"]
        body = {"status": "ready" if loaded else "no_worker", "redis": True, "workers": len(loaded)}
        return JSONResponse(body, status_code=200 if loaded else 503)

    @app.get(
        "/metrics",
        tags=["health"],
        summary="Prometheus metrics",
        response_class=Response,
        responses={**_ERRORS, 200: {"content": {"text/plain": {}}}},
    )
    def metrics(request: Request, _: Reader) -> Response:
        return Response(generate_latest(_state(request).registry), media_type=CONTENT_TYPE_LATEST)


def _add_slide_routes(app: FastAPI) -> None:
    binary_body = {
        "requestBody": {
            "required": True,
            "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
            },
        }
    }
    multipart_body = {
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
        }
    }

    def precheck(request: Request) -> None:
        length = request.headers.get("content-length")
        cap = _state(request).settings.max_upload_bytes
        if length is not None and length.isdigit() and int(length) > cap:
            raise UploadTooLargeError(
                f"The upload is {length} bytes; the limit is {cap}. Send a smaller slide or "
                "submit it by reference (a path under XMAG_SLIDE_ROOTS)."
            )

    async def finish(request: Request, stored: Any) -> JSONResponse:
        await run_in_threadpool(
            _state(request).store.put_slide, stored.sha256, stored.size_bytes, stored.ext
        )
        body = SlideUploaded(
            slide_id=stored.sha256,
            sha256=stored.sha256,
            size_bytes=stored.size_bytes,
            deduplicated=stored.deduplicated,
        )
        return JSONResponse(
            body.model_dump(),
            status_code=200 if stored.deduplicated else 201,
            headers={"Location": f"{_base_url(request)}/v1/slides/{stored.sha256}"},
        )

    @app.put(
        "/v1/slides",
        tags=["slides"],
        summary="Upload a slide as the raw request body (streamed to disk)",
        status_code=201,
        response_model=SlideUploaded,
        responses={**_ERRORS, 200: {"model": SlideUploaded}, 413: _PROBLEM},
        openapi_extra=binary_body,
    )
    async def put_slide(
        request: Request,
        _: Submitter,
        filename: Annotated[
            str | None, Query(max_length=255, description="Only its extension is kept.")
        ] = None,
    ) -> JSONResponse:
        state = _state(request)
        precheck(request)
        stored = await receive_raw(
            request.stream(),
            state.settings.slide_store,
            max_bytes=state.settings.max_upload_bytes,
            expected=expected_sha256(dict(request.headers)),
            ext=safe_extension(filename),
        )
        return await finish(request, stored)

    @app.post(
        "/v1/slides",
        tags=["slides"],
        summary="Upload a slide as the `file` part of a multipart form (streamed to disk)",
        status_code=201,
        response_model=SlideUploaded,
        responses={**_ERRORS, 200: {"model": SlideUploaded}, 413: _PROBLEM},
        openapi_extra=multipart_body,
    )
    async def post_slide(request: Request, _: Submitter) -> JSONResponse:
        state = _state(request)
        precheck(request)
        stored = await receive_multipart(
            request.stream(),
            request.headers.get("content-type", ""),
            state.settings.slide_store,
            max_bytes=state.settings.max_upload_bytes,
            expected=expected_sha256(dict(request.headers)),
        )
        return await finish(request, stored)

    @app.get(
        "/v1/slides/{slide_id}",
        tags=["slides"],
        summary="An uploaded slide",
        response_model=SlideUploaded,
        responses={**_ERRORS, 404: _PROBLEM},
    )
    def get_slide(request: Request, slide_id: str, _: Reader) -> SlideUploaded:
        record = _state(request).store.get_slide(slide_id.lower())
        if record is None:
            raise NotFoundError("No uploaded slide has this id.", slide_id=slide_id)
        return SlideUploaded(
            slide_id=record["sha256"],
            sha256=record["sha256"],
            size_bytes=int(record["size_bytes"]),
            deduplicated=False,
        )


IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        max_length=255,
        description="Retrying with the same key and body returns the same job.",
    ),
]


def _add_job_routes(app: FastAPI) -> None:
    @app.post(
        "/v1/jobs",
        tags=["jobs"],
        summary="Submit one slide",
        status_code=202,
        response_model=JobView,
        responses={**_ERRORS},
    )
    def submit_job(
        request: Request,
        response: Response,
        body: JobRequest,
        principal: Submitter,
        idempotency_key: IdempotencyKey = None,
    ) -> JobView:
        state = _state(request)
        base = _base_url(request)
        job_id = new_id("job")
        fields = _job_fields(state, body, base, job_id)
        body_hash = request_hash(body.model_dump(mode="json"))
        idem = state.store.idem_key(principal.key_id, idempotency_key) if idempotency_key else ""
        created, value = state.store.create_job(
            fields, job_id=job_id, idem_key=idem, idem_hash=body_hash
        )
        if created:
            state.actors.slides[body.priority].send(job_id)
        else:
            job_id = _replayed_id(response, json.loads(value), body_hash, "job")
        response.headers["Location"] = f"{base}/v1/jobs/{job_id}"
        return _job_view(_get_record(state, job_id), base)

    @app.get(
        "/v1/jobs",
        tags=["jobs"],
        summary="List jobs by state (e.g. state=dead: the dead letters) or batch",
        response_model=JobList,
        responses={**_ERRORS},
    )
    def list_jobs(
        request: Request,
        _: Reader,
        state_: Annotated[JobState | None, Query(alias="state")] = None,
        batch: Annotated[str | None, Query(max_length=64)] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
    ) -> JobList:
        state = _state(request)
        ids = state.store.list_ids(
            state=state_.value if state_ else None, batch_id=batch, limit=limit + 1, offset=offset
        )
        base = _base_url(request)
        items = [_job_view(r, base) for r in state.store.get_many(ids[:limit])]
        return JobList(items=items, next_offset=offset + limit if len(ids) > limit else None)

    @app.get(
        "/v1/jobs/{job_id}",
        tags=["jobs"],
        summary="A job's state, progress, timestamps and error",
        response_model=JobView,
        responses={**_ERRORS, 404: _PROBLEM},
    )
    def get_job(request: Request, job_id: str, _: Reader) -> JobView:
        return _job_view(_get_record(_state(request), job_id), _base_url(request))

    def _succeeded_key(state: ServiceState, job_id: str) -> str:
        record = _get_record(state, job_id)
        if record["state"] == JobState.SUCCEEDED:
            return record["result_key"]
        if record.get("error"):
            error = json.loads(record["error"])
            if record["state"] in FINAL_STATES:
                # The job's own error, with the status its code maps to.
                from xmag.errors import all_error_codes

                cls = all_error_codes().get(error["code"])
                if cls is not None:
                    raise cls(error.get("message", ""))
        raise ResultNotReadyError(
            f"Job {job_id} is {record['state']}; poll GET /v1/jobs/{job_id} until it succeeds.",
            state=record["state"],
        )

    @app.get(
        "/v1/jobs/{job_id}/result",
        tags=["jobs"],
        summary="result.json of a succeeded job (predictions limited to the job's tasks)",
        responses={**_ERRORS, 404: _PROBLEM, 409: _PROBLEM},
    )
    def get_result(request: Request, job_id: str, _: Reader) -> Response:
        state = _state(request)
        record = _get_record(state, job_id)
        path = state.results.artifact(_succeeded_key(state, job_id), "result.json")
        if path is None:
            raise NotFoundError("The job's result is missing from the results store.")
        tasks = json.loads(record["tasks"]) if record.get("tasks") else None
        if not tasks:
            return FileResponse(path, media_type="application/json")
        # One encoder pass feeds every head, so the stored result (shared by every job on the
        # same content) holds them all; the job reports the predictions it asked for.
        result = json.loads(path.read_text(encoding="utf-8"))
        result["predictions"] = [p for p in result["predictions"] if p["name"] in tasks]
        return JSONResponse(result)

    @app.get(
        "/v1/jobs/{job_id}/artifacts/{name}",
        tags=["jobs"],
        summary="An artifact of a succeeded job (features.h5, heatmap.png, tiles.geojson)",
        responses={**_ERRORS, 404: _PROBLEM, 409: _PROBLEM},
    )
    def get_artifact(request: Request, job_id: str, name: str, _: Reader) -> FileResponse:
        state = _state(request)
        if name not in ARTIFACTS:
            raise NotFoundError(f"Unknown artifact {name!r}; artifacts are {sorted(ARTIFACTS)}.")
        path = state.results.artifact(_succeeded_key(state, job_id), name)
        if path is None:
            raise NotFoundError(f"The job's result has no {name}.")
        return FileResponse(path, media_type=ARTIFACTS[name], filename=f"{job_id}-{name}")

    @app.post(
        "/v1/jobs/{job_id}/cancel",
        tags=["jobs"],
        summary="Cancel a queued job, or stop a running one between batches",
        status_code=202,
        response_model=JobView,
        responses={**_ERRORS, 404: _PROBLEM, 409: _PROBLEM},
    )
    def cancel_job(request: Request, job_id: str, _: Submitter) -> JobView:
        state = _state(request)
        outcome = state.store.cancel(job_id)
        if outcome == "missing":
            raise JobNotFoundError(f"No job {job_id!r}.", job_id=job_id)
        if outcome in FINAL_STATES and outcome != JobState.CANCELED:
            raise JobNotCancelableError(f"Job {job_id} already finished ({outcome}).")
        record = _get_record(state, job_id)
        if outcome == "canceled" and record.get("callback_url"):
            from service.queue import send_webhook
            from service.webhooks import build_event

            send_webhook(state.actors, record["callback_url"], new_id("msg"), build_event(record))
        return _job_view(record, _base_url(request))

    @app.get(
        "/v1/models",
        tags=["models"],
        summary="Model packages loaded by live workers, with their cards",
        response_model=ModelsView,
        responses={**_ERRORS},
    )
    def list_models(request: Request, _: Reader) -> ModelsView:
        models = _state(request).store.models()
        return ModelsView(models=[{"id": k, "card": v} for k, v in sorted(models.items())])


def _add_batch_routes(app: FastAPI) -> None:
    @app.post(
        "/v1/batches",
        tags=["batches"],
        summary="Submit many slides at once",
        status_code=202,
        response_model=BatchView,
        responses={**_ERRORS},
    )
    def submit_batch(
        request: Request,
        response: Response,
        body: BatchRequest,
        principal: Submitter,
        idempotency_key: IdempotencyKey = None,
    ) -> BatchView:
        state = _state(request)
        base = _base_url(request)
        batch_id = new_id("batch")
        body_hash = request_hash(body.model_dump(mode="json"))
        prepared = []
        for index, job in enumerate(body.jobs):
            if job.callback_url is None and body.callback_url is not None:
                job = job.model_copy(update={"callback_url": body.callback_url})
            job_id = new_id("job")
            try:
                fields = _job_fields(state, job, base, job_id)
            except Exception as exc:
                if hasattr(exc, "fields"):
                    exc.fields["job_index"] = index
                raise
            prepared.append((job_id, job.priority, {**fields, "batch_id": batch_id}))
        if idempotency_key:
            idem = state.store.idem_key(principal.key_id, idempotency_key)
            if not state.store.remember_idempotency(idem, body_hash, "batch", batch_id):
                prior = state.store.idempotency_record(idem)
                batch_id = _replayed_id(response, prior, body_hash, "batch")
                response.headers["Location"] = f"{base}/v1/batches/{batch_id}"
                return _batch_view(state, batch_id, base)
        for job_id, _priority, fields in prepared:
            state.store.create_job(fields, job_id=job_id)
        state.store.create_batch(batch_id, [job_id for job_id, _, _ in prepared])
        for job_id, priority, _ in prepared:
            state.actors.slides[priority].send(job_id)
        response.headers["Location"] = f"{base}/v1/batches/{batch_id}"
        return _batch_view(state, batch_id, base)

    @app.get(
        "/v1/batches/{batch_id}",
        tags=["batches"],
        summary="A batch: its jobs and their states",
        response_model=BatchView,
        responses={**_ERRORS, 404: _PROBLEM},
    )
    def get_batch(request: Request, batch_id: str, _: Reader) -> BatchView:
        state = _state(request)
        return _batch_view(state, batch_id, _base_url(request))


def _batch_view(state: ServiceState, batch_id: str, base: str) -> BatchView:
    found = state.store.batch(batch_id)
    if found is None:
        raise NotFoundError(f"No batch {batch_id!r}.", batch_id=batch_id)
    record, ids = found
    jobs = [_job_view(r, base) for r in state.store.get_many(ids)]
    counts = {s.value: 0 for s in JobState}
    for job in jobs:
        counts[job.state.value] += 1
    final = sum(counts[s] for s in FINAL_STATES)
    overall = (
        "completed"
        if final == len(jobs)
        else ("queued" if counts["queued"] == len(jobs) else "running")
    )
    return BatchView(
        id=batch_id,
        created_at=ms_to_datetime(record["created_ms"]),
        size=int(record["size"]),
        state=overall,
        counts=counts,
        jobs=jobs,
    )
