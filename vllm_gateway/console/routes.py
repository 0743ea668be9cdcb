"""The console's own routes: its pages and their files, and the session (sign in, who, sign out).

Every page is a static file; what it shows it fetches from the API with the session's cookie. The
pages get a Content-Security-Policy that allows this gateway's own scripts, styles and fetches only,
so a value that slipped into a page unescaped could still run nothing.
"""

from __future__ import annotations

import hmac
import logging
import re
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Body, Depends, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response

from .. import errors
from ..access import authenticate
from ..access_log import key_label
from ..state import GatewayState
from .session import COOKIE, Session, Sessions, same_origin

log = logging.getLogger("vllm_gateway")

router = APIRouter()

STATIC = Path(__file__).resolve().parent / "static"
STATIC_NAME = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*\.(html|css|js|svg|png|ico)")
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self'; "
        "frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def sessions(request: Request) -> Sessions:
    state: GatewayState = request.app.state.gateway
    if state.sessions is None:
        raise errors.not_found("The console is off (GATEWAY_CONSOLE=false).")
    return state.sessions


def current(request: Request, sessions: Sessions) -> Session | None:
    return sessions.find(request.headers.get("cookie", "").encode("latin-1"))


def page(name: str) -> FileResponse:
    return FileResponse(STATIC / name, headers=PAGE_HEADERS)


@router.get("/console", include_in_schema=False)
def console_root(_: Annotated[Sessions, Depends(sessions)]) -> RedirectResponse:
    return RedirectResponse("/console/", status_code=308)


@router.get("/console/", include_in_schema=False)
def console_page(request: Request, store: Annotated[Sessions, Depends(sessions)]) -> Response:
    if current(request, store) is None:
        return RedirectResponse("/console/sign-in", status_code=303, headers={"Cache-Control": "no-store"})
    return page("console.html")


@router.get("/console/sign-in", include_in_schema=False)
def sign_in_page(_: Annotated[Sessions, Depends(sessions)]) -> FileResponse:
    return page("sign-in.html")


@router.get("/console/static/{name}", include_in_schema=False)
def static_file(name: str, _: Annotated[Sessions, Depends(sessions)]) -> FileResponse:
    if not STATIC_NAME.fullmatch(name) or not (STATIC / name).is_file():
        raise errors.not_found("No such console file.")
    return FileResponse(STATIC / name, headers=PAGE_HEADERS)


@router.post("/console/api/session")
def sign_in(
    request: Request, store: Annotated[Sessions, Depends(sessions)], key: Annotated[str, Body(embed=True)]
) -> JSONResponse:
    """Exchange a key for a session cookie. The key is read from the body only, and never logged."""
    address = request.client.host if request.client is not None else "-"
    if not same_origin(request.headers.get("origin", "").encode("latin-1"), request.url.netloc.encode("latin-1")):
        raise errors.csrf_failed("from another origin")
    if not store.sign_in_allowed(address):
        raise errors.too_many_sign_ins(store.sign_in_limit)
    record = authenticate(store.keys, b"Bearer " + key.strip().encode("latin-1", "replace"), b"")
    value, session = store.open(record)
    log.info("console sign-in by key %s from %s", key_label(record.id, record.name), address)
    state: GatewayState = request.app.state.gateway
    secure = state.settings.console_secure_cookie
    response = JSONResponse(described(session), headers={"Cache-Control": "no-store"})
    response.set_cookie(
        COOKIE,
        value,
        max_age=int(store.lifetime),
        path="/",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https" if secure is None else secure,
    )
    return response


@router.get("/console/api/session")
def who(request: Request, store: Annotated[Sessions, Depends(sessions)]) -> JSONResponse:
    session = current(request, store)
    if session is None:
        raise errors.console_session_invalid()
    return JSONResponse(described(session), headers={"Cache-Control": "no-store"})


@router.delete("/console/api/session")
def sign_out(request: Request, store: Annotated[Sessions, Depends(sessions)]) -> Response:
    cookie = request.headers.get("cookie", "").encode("latin-1")
    session = store.find(cookie)
    if session is not None:
        if not hmac.compare_digest(request.headers.get("x-csrf-token", ""), session.csrf):
            raise errors.csrf_failed("without the console session's X-CSRF-Token")
        store.close(cookie)
    response = Response(status_code=204)
    response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
    return response


def described(session: Session) -> dict[str, object]:
    """What a page is told of its session: whose it is and its CSRF token, never the key."""
    key = session.key
    return {
        "key_id": key.id,
        "name": key.name,
        "admin": key.admin,
        "csrf": session.csrf,
        "expires_at": session.expires_at,
    }
