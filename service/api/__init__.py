"""The REST API (FastAPI, versioned under /v1; the OpenAPI document is at /openapi.json).

One router per resource: ``health`` (``/healthz``, ``/readyz``, ``/metrics``), ``slides``
(uploads), ``jobs``, ``models``, ``batches`` and ``audit`` (admin); ``_deps`` holds what they
share (the process state, authentication and tenancy, links, Idempotency-Key replays).

Handlers that only talk to Redis are plain ``def`` (FastAPI runs them in its thread pool, so the
blocking redis-py calls never stall the event loop); the upload handlers are ``async`` because they
stream ``request.stream()`` to disk. Every error leaves as problem+json (``service.problems``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from service.api import audit, batches, health, jobs, models, slides, viewer
from service.api._deps import ServiceState
from service.docs import install_docs
from service.problems import install_problem_handlers
from service.schemas import Problem, WebhookEvent
from service.settings import ServiceSettings
from xmag import __version__

__all__ = ["ServiceState", "create_app"]


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
        docs_url=None,  # served from local assets below: no CDN
        redoc_url=None,
    )
    install_docs(app)
    install_problem_handlers(
        app, redact=[str(settings.data_dir), *(str(r) for r in settings.slide_roots)]
    )
    # Registration order is the order of the OpenAPI document's paths.
    for module in (health, slides, jobs, models, batches, audit, viewer):
        app.include_router(module.router)

    @app.webhooks.post("job-finished")
    def job_finished(body: WebhookEvent) -> None:
        """POSTed to a job's callback_url when it reaches a final state, with the headers
        webhook-id (the same across retries), webhook-timestamp and webhook-signature
        (`v1,<base64 HMAC-SHA256>` of `{id}.{timestamp}.{body}` with the client's secret, shown
        once by `xmag keys create`). Retried with backoff until the receiver answers 2xx."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
                webhooks=app.webhooks.routes,
            )
            schemas = document.setdefault("components", {}).setdefault("schemas", {})
            schemas["Problem"] = Problem.model_json_schema(
                ref_template="#/components/schemas/{model}"
            )
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
