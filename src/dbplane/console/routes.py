"""Serves the console's static files at /console/. Only the files shipped in static/ are
served (a fixed table built at import: no path from the request touches the filesystem),
with a Content-Security-Policy that lets the page run its own scripts and talk to its own
origin only."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse

from ..errors import NotFound

STATIC_DIR = Path(__file__).parent / "static"
MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
               ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml",
               ".txt": "text/plain; charset=utf-8"}
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "img-src 'self' data:; connect-src 'self'; form-action 'none'; "
                               "base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",          # revalidate (ETag): an upgrade shows at once
}

router = APIRouter()


def shipped_files(root: Path = STATIC_DIR) -> dict[str, Path]:
    """Relative URL path -> file, for every file of a known type under root."""
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*"))
            if p.is_file() and p.suffix in MEDIA_TYPES}


FILES = shipped_files()


@router.get("/console", include_in_schema=False)
async def console_root():
    return RedirectResponse("/console/", status_code=308)


@router.get("/console/{path:path}", include_in_schema=False)
async def console_file(path: str):
    file = FILES.get(path or "index.html")
    if file is None:
        raise NotFound(f"no console file {path!r}", "open /console/", code="not_found")
    return FileResponse(file, media_type=MEDIA_TYPES[file.suffix], headers=HEADERS)
