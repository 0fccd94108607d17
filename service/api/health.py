"""Health, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from service.api._deps import ERRORS, Reader, service_state

__all__ = ["router"]

router = APIRouter()


@router.get("/healthz", tags=["health"], summary="The process is up")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    tags=["health"],
    summary="Redis reachable and a worker with its model",
    responses={503: {"description": "not ready: Redis down or no live worker"}},
)
def readyz(request: Request) -> JSONResponse:
    state = service_state(request)
    try:
        state.client.ping()
        workers = state.store.live_workers(state.settings.worker_stale_s)
    except Exception as exc:
        return JSONResponse(
            {"status": "unavailable", "redis": False, "error": type(exc).__name__},
            status_code=503,
        )
    loaded = [w for w in workers if w.get("model_loaded") == "1"]
    body: dict[str, object] = {
        "status": "ready" if loaded else "no_worker",
        "redis": True,
        "workers": len(loaded),
    }
    # Workers still loading ("building engine": a TensorRT build) or whose engine failed, and why.
    loading = [w.get("status", "loading") for w in workers if w.get("model_loaded") != "1"]
    if loading:
        body["loading"] = loading
    return JSONResponse(body, status_code=200 if loaded else 503)


@router.get(
    "/metrics",
    tags=["health"],
    summary="Prometheus metrics",
    response_class=Response,
    responses={**ERRORS, 200: {"content": {"text/plain": {}}}},
)
def metrics(request: Request, _: Reader) -> Response:
    return Response(
        generate_latest(service_state(request).registry), media_type=CONTENT_TYPE_LATEST
    )
