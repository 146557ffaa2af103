"""The web page at ``/`` and the API docs at ``/docs``, both without any CDN (no internet)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, Response

from pneumonia.serve.errors import ApiError

# The page's own files; nothing else under /static is served.
_PAGE_ASSETS = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
# Swagger UI's files, shipped by the fastapi-offline package.
_DOCS_ASSETS = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
}
_PAGE_CSP = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)

web = APIRouter(include_in_schema=False)


def _static(name: str) -> Path:
    return Path(str(resources.files("pneumonia.serve").joinpath("static", name)))


def _not_found(request: Request) -> ApiError:
    return ApiError(404, "not_found", f"no route {request.url.path}; see /docs for the API")


@web.get("/")
async def index() -> Response:
    return FileResponse(
        _static("index.html"),
        media_type="text/html; charset=utf-8",
        headers={"Content-Security-Policy": _PAGE_CSP},
    )


@web.get("/static/{name}")
async def page_asset(name: str, request: Request) -> Response:
    if name not in _PAGE_ASSETS:
        raise _not_found(request)
    return FileResponse(
        _static(name), media_type=_PAGE_ASSETS[name], headers={"Content-Security-Policy": _PAGE_CSP}
    )


@web.get("/docs/assets/{name}")
async def docs_asset(name: str, request: Request) -> Response:
    if name not in _DOCS_ASSETS:
        raise _not_found(request)
    path = Path(str(resources.files("fastapi_offline").joinpath("static", name)))
    return FileResponse(path, media_type=_DOCS_ASSETS[name])


@web.get("/docs")
async def docs(request: Request) -> HTMLResponse:
    root = request.scope.get("root_path", "")
    return get_swagger_ui_html(
        openapi_url=f"{root}/openapi.json",
        title="Pneumonia detection API",
        swagger_js_url=f"{root}/docs/assets/swagger-ui-bundle.js",
        swagger_css_url=f"{root}/docs/assets/swagger-ui.css",
        swagger_favicon_url="data:,",
    )
