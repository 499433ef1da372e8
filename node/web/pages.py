"""The dashboard (``/``), a job's page (``/jobs/{id}``), the token login, and the forms behind
the retry buttons. Pages are Jinja2 templates over the same reports the API returns; they
refresh by themselves (no JavaScript)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from node import __version__
from node.config.schema import PRIORITY_NAMES
from node.web.api import principal, retry_job, retry_notification, status_payload
from node.web.auth import COOKIE

router = APIRouter(include_in_schema=False)
templates = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))
templates.env.filters["when"] = lambda t: time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"
templates.env.filters["ago"] = lambda t: _ago(time.time() - t) if t else "-"
templates.env.globals.update(priority_name=lambda rank: PRIORITY_NAMES.get(rank, "?"), version=__version__)
REFRESH_S = 10


def _ago(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s ago"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def _page_auth(request: Request, kind: str = "viewer") -> Any:
    """The caller, or a redirect to the login form (a page, unlike the API, is for a browser)."""
    try:
        return principal(request, kind)
    except HTTPException as exc:
        if exc.status_code == 401:
            return RedirectResponse(f"/login?next={request.url.path}", status_code=303)
        raise


@router.get("/", response_class=HTMLResponse)
def dashboard(request: Request) -> Response:
    who = _page_auth(request)
    if isinstance(who, Response):
        return who
    node = request.app.state.ctx.node
    db = node.db
    status = status_payload(node)
    rate = status["ingest_per_minute"]
    return templates.TemplateResponse(request, "dashboard.html", {
        "who": who, "status": status, "refresh": REFRESH_S, "config": node.config,
        "models": (status["node"] or {}).get("models", {}),
        "rate": rate, "rate_max": max([r["instances"] for r in rate] + [1]),
        "worklist": db.worklist(20), "jobs": db.jobs_report(25),
        "failed_deliveries": db.deliveries_report("failed", 20),
        "notifications": [n for n in db.notifications_report(50) if n["status"] == "failed"][:20],
        "routes": db.routing_report(10), "audit": db.audit_report(20)})


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_page(job_id: int, request: Request) -> Response:
    who = _page_auth(request)
    if isinstance(who, Response):
        return who
    job = request.app.state.ctx.node.db.job_detail(job_id)
    if job is None:
        raise HTTPException(404, f"no job {job_id}")
    return templates.TemplateResponse(request, "job.html", {"who": who, "job": job, "refresh": REFRESH_S})


@router.post("/jobs/{job_id}/retry")
def job_retry_form(job_id: int, request: Request) -> Response:
    return _operator_form(request, lambda node, who: retry_job(node, job_id, who))


@router.post("/notifications/{notification_id}/retry")
def notification_retry_form(notification_id: int, request: Request) -> Response:
    return _operator_form(request, lambda node, who: retry_notification(node, notification_id, who))


def _operator_form(request: Request, action: Any) -> Response:
    """A Retry button: the operator's action, then back to the page it was pressed on."""
    who = _page_auth(request, "operator")
    if isinstance(who, Response):
        return who
    action(request.app.state.ctx.node, who)
    return RedirectResponse(request.headers.get("referer") or "/", status_code=303)


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, next: str = "/") -> Response:
    return templates.TemplateResponse(request, "login.html", {"next": _local(next), "error": ""})


@router.post("/login")
def login(request: Request, token: str = Form(...), next: str = Form("/")) -> Response:
    if request.app.state.ctx.tokens.find(token.strip()) is None:
        return templates.TemplateResponse(request, "login.html", {"next": _local(next), "error": "unknown token"},
                                          status_code=401)
    response = RedirectResponse(_local(next), status_code=303)
    response.set_cookie(COOKIE, token.strip(), httponly=True, samesite="strict", max_age=12 * 3600)
    return response


def _local(path: str) -> str:
    """Only a path on this server (no open redirect)."""
    return path if path.startswith("/") and not path.startswith("//") else "/"
