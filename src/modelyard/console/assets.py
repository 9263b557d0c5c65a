"""The console's two static files, shipped in the package and served from memory."""

from __future__ import annotations

import hashlib
from importlib.resources import files

from fastapi import APIRouter, Request, Response

from modelyard.console.web import current, page, render

router = APIRouter(include_in_schema=False)
TYPES = {"console.css": "text/css; charset=utf-8",
         "console.js": "text/javascript; charset=utf-8"}
_FILES = {name: (files("modelyard.console").joinpath("static", name).read_bytes())
          for name in TYPES}
_TAGS = {name: f'"{hashlib.sha256(body).hexdigest()[:16]}"' for name, body in _FILES.items()}


@router.get("/console/static/{name}")
@page
async def asset(request: Request, name: str) -> Response:
    if name not in _FILES:
        return Response(b"not found", 404, media_type="text/plain")
    headers = {"ETag": _TAGS[name], "Cache-Control": "no-cache"}
    if request.headers.get("if-none-match") == _TAGS[name]:
        return Response(status_code=304, headers=headers)
    return Response(_FILES[name], media_type=TYPES[name], headers=headers)


@router.get("/console/{rest:path}")
@page
async def unknown(request: Request, rest: str) -> Response:
    """Any other console address: a page saying so (not the API's JSON 404)."""
    session = await current(request)
    return render(request, "message.html", {
        "session": session, "title": "Not found", "message": "There is no such page."},
        status=404)
