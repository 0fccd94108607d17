"""The web viewer: Deep Zoom tiles of a job's or an upload's slide, its tissue outline, and the UI.

Tiles are cut from the slide by the core (``xmag.deepzoom``) through whichever reader opens it,
so every format the workers read can be viewed. Paths::

    /v1/jobs/{job_id}/slide.dzi                          DZI document (XML)
    /v1/jobs/{job_id}/slide_files/{level}/{col}_{row}.jpeg
    /v1/jobs/{job_id}/tissue.geojson                     tissue outline, level-0 pixels
    /v1/slides/{slide_id}/slide.dzi, .../slide_files/..., .../tissue.geojson   (uploads)
    /ui/                                                 the single-page viewer (service/ui)

They take the same API keys as the rest of ``/v1`` (read scope) and the same object rules (a
client reaches its own jobs and uploads; another client's are 404, as ``Caller.job`` and
``Caller.slide`` answer), re-apply the slide rules at view time (a referenced slide must still
resolve under ``XMAG_SLIDE_ROOTS``; an upload must be in the slide store), answer a tile
address outside the pyramid with 404 ``NOT_FOUND`` and a malformed one with 422
``INVALID_REQUEST``. Tiles carry a strong ETag (slide version + tile geometry), answer
``If-None-Match`` with 304, and are ``Cache-Control: private``: they are patient data, never for a
shared cache. Memory and CPU are bounded by ``service.viewer.ViewerCache``. Opening a slide's
descriptor or outline is audited (``slide.view``); its tiles, hundreds per look, are not.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Request
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response

from service.api._deps import ERRORS, PROBLEM, Caller, Reader
from service.errors import NotFoundError, ServiceUnavailableError
from service.slides import resolve_reference, stored_slide_path
from service.viewer import SlideKey, ViewerCache

__all__ = ["UI_DIST", "router", "viewer_cache"]

router = APIRouter()

#: Where ``make ui`` puts the built front end (service/ui/build.mjs).
UI_DIST = Path(__file__).resolve().parents[1] / "ui" / "dist"
#: Browsers may keep tiles for an hour; they never change for a given ETag.
TILE_CACHE_CONTROL = "private, max-age=3600"
_VARY = "Authorization, X-API-Key"
#: The UI loads nothing from elsewhere; tiles arrive as blobs (OpenSeadragon's Ajax loading).
_UI_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' blob: data:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
    "frame-ancestors 'none'; form-action 'none'"
)
_TILE_PATTERN = r"^[0-9]{1,9}_[0-9]{1,9}\.jpeg$"
_SLIDE_ID_PATTERN = r"^[0-9a-fA-F]{64}$"
_cache_lock = threading.Lock()

Level = Annotated[int, PathParam(ge=0, le=64, description="Deep Zoom level (0: one pixel).")]
TileName = Annotated[
    str, PathParam(pattern=_TILE_PATTERN, description="`{col}_{row}.jpeg`", examples=["0_0.jpeg"])
]
SlideId = Annotated[str, PathParam(pattern=_SLIDE_ID_PATTERN, description="sha256 of an upload.")]
JobId = Annotated[str, PathParam(min_length=1, max_length=80, description="The job id.")]
_CACHING_HEADERS = {
    "Cache-Control": {"schema": {"type": "string"}, "description": "private, max-age=3600"},
    "Vary": {"schema": {"type": "string"}, "description": "Authorization, X-API-Key"},
}
_NOT_FOUND = {**PROBLEM, "description": "no such job, slide or tile (NOT_FOUND, JOB_NOT_FOUND)"}
_TILE_RESPONSES: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    200: {
        "content": {"image/jpeg": {"schema": {"type": "string", "format": "binary"}}},
        "description": "the tile",
        "headers": {
            "ETag": {"schema": {"type": "string"}, "description": "strong tile tag"},
            **_CACHING_HEADERS,
        },
    },
    304: {"description": "not modified (If-None-Match)"},
    404: _NOT_FOUND,
}
_DZI_RESPONSES: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    200: {
        "content": {"application/xml": {"schema": {"type": "string"}}},
        "description": "the DZI document",
        "headers": _CACHING_HEADERS,
    },
    404: _NOT_FOUND,
}
_OUTLINE_RESPONSES: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    200: {
        "content": {"application/geo+json": {"schema": {"type": "object"}}},
        "description": "a GeoJSON FeatureCollection of tissue polygons, level-0 pixels",
        "headers": _CACHING_HEADERS,
    },
    404: _NOT_FOUND,
}


def viewer_cache(request: Request) -> ViewerCache:
    """The app's ``ViewerCache`` (made on first use)."""
    app_state = request.app.state
    cache: ViewerCache | None = getattr(app_state, "xmag_viewer", None)
    if cache is None:
        with _cache_lock:
            cache = getattr(app_state, "xmag_viewer", None)
            if cache is None:
                cache = ViewerCache()
                app_state.xmag_viewer = cache
    return cache


# -- which slide ---------------------------------------------------------------------------------
def _key(path: Path) -> SlideKey:
    try:
        return SlideKey.of(path)
    except OSError as exc:
        raise NotFoundError(
            "The slide file is no longer on disk; upload it again or restore the file.",
        ) from exc


def _job_slide(
    caller: Caller, job_id: str, *, audit: bool = False
) -> tuple[SlideKey, float | None]:
    """The slide a job reads (rules re-applied now) and the level-0 mpp the job forced, if any.

    Raises:
        JobNotFoundError: no such job, or another client's.
    """
    state = caller.state
    record = caller.job(job_id, "slide.view")
    if record.slide_kind == "upload":
        path = Path(record.slide_path)
        store = state.settings.slide_store.resolve()
        if not path.resolve().is_relative_to(store):
            raise NotFoundError("The job's uploaded slide is not in the slide store.")
    else:
        path = resolve_reference(record.slide_path, state.settings.slide_roots)
    mpp = record.options.get("mpp_override")
    key = _key(path)
    if audit:
        caller.audit(
            "slide.view", status=200, job_id=record.id, slide_sha256=record.slide_sha256 or None
        )
    return key, float(mpp) if mpp else None


def _upload_slide(caller: Caller, slide_id: str, *, audit: bool = False) -> SlideKey:
    """An upload of this caller's client (another client's is 404, as ``Caller.slide`` says)."""
    sha = slide_id.lower()
    record = caller.slide(sha, "slide.view")
    key = _key(stored_slide_path(caller.state.settings.slide_store, sha, record.get("ext", "")))
    if audit:
        caller.audit("slide.view", status=200, slide_sha256=sha)
    return key


# -- answers -------------------------------------------------------------------------------------
def _dzi(request: Request, key: SlideKey) -> Response:
    with viewer_cache(request).readers.use(key) as entry:
        body = entry.deepzoom.get_dzi("jpeg")
    return Response(
        body,
        media_type="application/xml",
        headers={"Cache-Control": TILE_CACHE_CONTROL, "Vary": _VARY},
    )


def _tile(request: Request, key: SlideKey, level: int, tile: str) -> Response:
    col_text, row_text = tile.removesuffix(".jpeg").split("_")
    col, row = int(col_text), int(row_text)
    cache = viewer_cache(request)
    etag = cache.tile_etag(key, level, col, row)
    headers = {"ETag": etag, "Cache-Control": TILE_CACHE_CONTROL, "Vary": _VARY}
    if etag in _if_none_match(request):
        return Response(status_code=304, headers=headers)
    data = cache.tiles.get(etag)
    if data is None:
        with cache.readers.use(key) as entry:
            dz = entry.deepzoom
            if not dz.has_tile(level, col, row):
                shape = dz.level_tiles[level] if level < dz.level_count else None
                raise NotFoundError(
                    f"No tile {col}_{row} at Deep Zoom level {level}: levels are "
                    f"0..{dz.level_count - 1}"
                    + (f" and level {level} has {shape[0]} x {shape[1]} tiles." if shape else "."),
                    level=level,
                    col=col,
                    row=row,
                    level_count=dz.level_count,
                )
            with cache.render_slots:
                data = dz.get_tile_jpeg(level, col, row, quality=cache.jpeg_quality)
        cache.tiles.put(etag, data)
    return Response(data, media_type="image/jpeg", headers=headers)


def _if_none_match(request: Request) -> set[str]:
    raw = request.headers.get("if-none-match", "")
    return {part.strip().removeprefix("W/") for part in raw.split(",") if part.strip()}


def _outline(request: Request, key: SlideKey, mpp: float | None) -> JSONResponse:
    body = viewer_cache(request).tissue_outline(key, mpp)
    return JSONResponse(
        body,
        media_type="application/geo+json",
        headers={"Cache-Control": TILE_CACHE_CONTROL, "Vary": _VARY},
    )


# -- routes: a job's slide -------------------------------------------------------------------------
@router.get(
    "/v1/jobs/{job_id}/slide.dzi",
    tags=["viewer"],
    summary="Deep Zoom descriptor (DZI) of the job's slide",
    response_class=Response,
    responses=_DZI_RESPONSES,
)
def job_dzi(request: Request, job_id: JobId, caller: Reader) -> Response:
    key, _mpp = _job_slide(caller, job_id, audit=True)
    return _dzi(request, key)


@router.get(
    "/v1/jobs/{job_id}/slide_files/{level}/{tile}",
    tags=["viewer"],
    summary="One Deep Zoom tile (JPEG) of the job's slide",
    response_class=Response,
    responses=_TILE_RESPONSES,
)
def job_tile(
    request: Request, job_id: JobId, level: Level, tile: TileName, caller: Reader
) -> Response:
    key, _mpp = _job_slide(caller, job_id)
    return _tile(request, key, level, tile)


@router.get(
    "/v1/jobs/{job_id}/tissue.geojson",
    tags=["viewer"],
    summary="Outline of the tissue on the job's slide (GeoJSON, level-0 pixels)",
    response_class=JSONResponse,
    responses=_OUTLINE_RESPONSES,
)
def job_tissue(request: Request, job_id: JobId, caller: Reader) -> JSONResponse:
    key, mpp = _job_slide(caller, job_id, audit=True)
    return _outline(request, key, mpp)


# -- routes: an uploaded slide -------------------------------------------------------------------
@router.get(
    "/v1/slides/{slide_id}/slide.dzi",
    tags=["viewer"],
    summary="Deep Zoom descriptor (DZI) of an uploaded slide",
    response_class=Response,
    responses=_DZI_RESPONSES,
)
def slide_dzi(request: Request, slide_id: SlideId, caller: Reader) -> Response:
    return _dzi(request, _upload_slide(caller, slide_id, audit=True))


@router.get(
    "/v1/slides/{slide_id}/slide_files/{level}/{tile}",
    tags=["viewer"],
    summary="One Deep Zoom tile (JPEG) of an uploaded slide",
    response_class=Response,
    responses=_TILE_RESPONSES,
)
def slide_tile(
    request: Request, slide_id: SlideId, level: Level, tile: TileName, caller: Reader
) -> Response:
    return _tile(request, _upload_slide(caller, slide_id), level, tile)


@router.get(
    "/v1/slides/{slide_id}/tissue.geojson",
    tags=["viewer"],
    summary="Outline of the tissue on an uploaded slide (GeoJSON, level-0 pixels)",
    response_class=JSONResponse,
    responses=_OUTLINE_RESPONSES,
)
def slide_tissue(request: Request, slide_id: SlideId, caller: Reader) -> JSONResponse:
    return _outline(request, _upload_slide(caller, slide_id, audit=True), None)


# -- the single-page UI --------------------------------------------------------------------------
@router.get("/ui", include_in_schema=False)
def ui_root() -> RedirectResponse:
    return RedirectResponse("/ui/", status_code=307)


@router.get("/ui/{name:path}", include_in_schema=False)
def ui_file(name: str) -> FileResponse:
    """A file of the built UI; the page itself asks for the key (it is not in any URL)."""
    if not (UI_DIST / "index.html").is_file():
        raise ServiceUnavailableError(
            "The web viewer is not built: run `make ui` (npm ci + build) and restart the API."
        )
    root = UI_DIST.resolve()
    path = (root / (name or "index.html")).resolve()
    if not path.is_relative_to(root) or not path.is_file():
        raise NotFoundError(f"No UI file {name!r}.")
    headers = {
        "Content-Security-Policy": _UI_CSP,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-cache",
    }
    return FileResponse(path, headers=headers)
