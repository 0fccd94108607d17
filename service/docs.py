"""The interactive API docs (``/docs``), served wholly by the service: no CDN.

FastAPI's default page loads Swagger UI's script, stylesheet and favicon from public CDNs, which a
hospital network often blocks and which would run third-party code next to the API keys typed into
the page. The assets come from the ``swagger-ui-bundle`` package instead and are served under
``/docs/assets``; ReDoc (CDN-only) is not offered.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

__all__ = ["ASSETS_PATH", "DOCS_PATH", "install_docs", "swagger_assets_dir"]

DOCS_PATH = "/docs"
ASSETS_PATH = "/docs/assets"


def swagger_assets_dir() -> Path:
    """The folder of Swagger UI's files shipped by ``swagger-ui-bundle``."""
    import swagger_ui_bundle

    return Path(swagger_ui_bundle.swagger_ui_path)


def install_docs(app: FastAPI, *, openapi_url: str = "/openapi.json") -> None:
    """Add ``/docs`` and its local assets to ``app`` (create it with ``docs_url=None,
    redoc_url=None``)."""
    app.mount(ASSETS_PATH, StaticFiles(directory=swagger_assets_dir()), name="swagger-assets")
    oauth_redirect = f"{DOCS_PATH}/oauth2-redirect"

    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=openapi_url,
            title=f"{app.title} - API docs",
            oauth2_redirect_url=oauth_redirect,
            swagger_js_url=f"{ASSETS_PATH}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS_PATH}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS_PATH}/favicon-32x32.png",
        )

    async def redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    app.add_api_route(DOCS_PATH, docs, methods=["GET"], include_in_schema=False)
    app.add_api_route(oauth_redirect, redirect, methods=["GET"], include_in_schema=False)
