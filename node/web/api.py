"""The REST API, ``/api/v1``: the same facts as the command line's ``--json``, and the
operator's actions, each audited with the token's name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import Response

from node.config.schema import PRIORITIES
from node.errors import InputError
from node.web.auth import COOKIE, GRANTS, LOCAL, Principal
from node.worker import node_status

router = APIRouter(prefix="/api/v1", tags=["api"])
MAX_LIMIT = 1000


def principal(request: Request, kind: str) -> Principal:
    """The caller, holding a role that ``kind`` grants.

    Raises:
        HTTPException: 401 without a known token, 403 with a role that may not.
    """
    tokens = request.app.state.ctx.tokens
    if not tokens.required:
        return LOCAL
    header = request.headers.get("authorization", "")
    token = header[7:].strip() if header[:7].lower() == "bearer " else request.cookies.get(COOKIE)
    found = tokens.find(token)
    if found is None:
        raise HTTPException(401, "a valid token is needed (Authorization: Bearer <token>)",
                            headers={"WWW-Authenticate": "Bearer"})
    if found.role not in GRANTS[kind]:
        raise HTTPException(403, f"the role {found.role!r} may not do this (needs {' or '.join(GRANTS[kind])})")
    return found


def viewer(request: Request) -> Principal:
    return principal(request, "viewer")


def operator(request: Request) -> Principal:
    return principal(request, "operator")


def _ctx(request: Request) -> Any:
    return request.app.state.ctx


def status_payload(node: Any) -> dict[str, Any]:
    """What ``ainode status --json`` prints, plus readiness and the ingest rate."""

    db = node.db
    return {"node": node_status(node.config), **db.counts(), "ready": readiness(node),
            "ingest_per_minute": db.ingest_rate(10), "nodes": db.nodes_report(node.config.node.stall_timeout_s)}


def readiness(node: Any) -> dict[str, bool]:
    """Listener up (an ingest node), database answering, every routed model loaded (a worker)."""
    try:
        node.db.ping()
        database = True
    except Exception:  # noqa: BLE001 - any failure means not ready
        database = False
    routed = {m for r in node.config.routes for m in r.models}
    role = node.config.node
    return {"listener": node.ingest.listening or not role.ingests, "database": database,
            "models": routed <= set(node.models) or not role.infers}


@router.get("/status")
def get_status(request: Request, who: Principal = Depends(viewer)) -> dict:
    return status_payload(_ctx(request).node)


@router.get("/jobs")
def get_jobs(request: Request, who: Principal = Depends(viewer),
             state: str | None = None, priority: str | None = None, study: str | None = None,
             model: str | None = None, limit: int = Query(50, ge=1, le=MAX_LIMIT),
             offset: int = Query(0, ge=0)) -> dict:
    if priority is not None and priority not in PRIORITIES:
        raise HTTPException(422, f"priority must be one of {', '.join(PRIORITIES)}")
    rows = _ctx(request).node.db.jobs_report(limit, offset=offset, status=state, model=model, study_uid=study,
                                              priority=PRIORITIES[priority] if priority else None)
    return {"jobs": rows, "limit": limit, "offset": offset}


@router.get("/jobs/{job_id}")
def get_job(job_id: int, request: Request, who: Principal = Depends(viewer)) -> dict:
    job = _ctx(request).node.db.job_detail(job_id)
    if job is None:
        raise HTTPException(404, f"no job {job_id}")
    return job


@router.get("/jobs/{job_id}/preview.png", response_class=Response,
            responses={200: {"content": {"image/png": {}}}})
def get_preview(job_id: int, request: Request, who: Principal = Depends(viewer)) -> Response:
    try:
        png = preview_png(_ctx(request).node, job_id)
    except LookupError as exc:
        raise HTTPException(404, str(exc)) from None
    except InputError as exc:
        raise HTTPException(409, f"no picture for job {job_id}: {exc}") from None
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=60"})


def preview_png(node: Any, job_id: int) -> bytes:
    """The job's picture, made once from the stored images and results and kept beside them.

    Raises:
        LookupError: no such job, or it has no results yet.
        InputError: the stored files cannot make a picture.
    """
    from node.results.preview import render_classification, render_segmentation

    job = node.db.job_detail(job_id)
    if job is None:
        raise LookupError(f"no job {job_id}")
    files = [Path(f) for f in job["result_files"]]
    if job["status"] != "done" or not files:
        raise LookupError(f"job {job_id} has no results yet ({job['status']})")
    cached = files[0].parent / "preview.png"
    if cached.is_file():
        return cached.read_bytes()
    summary = job["summary"]
    runtime = node.models.get(job["model"])
    demo = " DEMONSTRATION, not for clinical use" if runtime is not None and runtime.manifest.demonstration else ""
    title = (f"{summary.get('model', job['model'])} {summary.get('version', '')} on {job['modality']} "
             f"{job['description'][:40]!r}, job {job_id}{demo}")
    sources = [Path(p) for p in node.db.series_paths(job["series_id"])]
    seg = next((f for f in files if f.name == "seg.dcm"), None)
    if seg is not None:
        picture = render_segmentation(sources, seg, title, summary.get("volumes_ml"))
    else:
        picture = render_classification(sources, title, summary.get("findings", []))
    node.store.write_atomic(cached, (picture.png,))
    return picture.png


@router.get("/worklist")
def get_worklist(request: Request, who: Principal = Depends(viewer),
                 limit: int = Query(50, ge=1, le=MAX_LIMIT)) -> dict:
    return {"worklist": _ctx(request).node.db.worklist(limit)}


@router.get("/deliveries")
def get_deliveries(request: Request, who: Principal = Depends(viewer), state: str | None = None,
                   limit: int = Query(100, ge=1, le=MAX_LIMIT)) -> dict:
    return {"deliveries": _ctx(request).node.db.deliveries_report(state, limit)}


@router.get("/notifications")
def get_notifications(request: Request, who: Principal = Depends(viewer),
                      limit: int = Query(50, ge=1, le=MAX_LIMIT)) -> dict:
    return {"notifications": _ctx(request).node.db.notifications_report(limit)}


@router.get("/audit")
def get_audit(request: Request, who: Principal = Depends(viewer), action: str | None = None,
              limit: int = Query(100, ge=1, le=MAX_LIMIT)) -> dict:
    return {"audit": _ctx(request).node.db.audit_report(limit, action)}


@router.get("/routes/log")
def get_routes_log(request: Request, who: Principal = Depends(viewer),
                   limit: int = Query(20, ge=1, le=MAX_LIMIT)) -> dict:
    return {"routes_log": _ctx(request).node.db.routing_report(limit)}


# ----------------------------------------------------------------------- operator actions
def retry_job(node: Any, job_id: int, who: Principal) -> dict:
    message = node.db.retry(job_id)
    node.db.audit(f"operator:{who.name}", "retry", f"job {job_id}", outcome=message, via="http")
    node.wake()
    return {"ok": "again" in message, "message": message}


def retry_notification(node: Any, notification_id: int, who: Principal) -> dict:
    done = node.db.retry_notification(notification_id)
    message = (f"notification {notification_id} queued again" if done
               else f"notification {notification_id} is not a failed notification")
    node.db.audit(f"operator:{who.name}", "retry", f"notification {notification_id}", outcome=message, via="http")
    node.wake()
    return {"ok": done, "message": message}


@router.post("/jobs/{job_id}/retry")
def post_retry(job_id: int, request: Request, who: Principal = Depends(operator)) -> dict:
    outcome = retry_job(_ctx(request).node, job_id, who)
    if outcome["message"].startswith("no job"):
        raise HTTPException(404, outcome["message"])
    return outcome


@router.post("/notifications/{notification_id}/retry")
def post_notification_retry(notification_id: int, request: Request, who: Principal = Depends(operator)) -> dict:
    return retry_notification(_ctx(request).node, notification_id, who)


@router.post("/reload")
def post_reload(request: Request, who: Principal = Depends(operator)) -> dict:
    ctx = _ctx(request)
    outcome = ctx.reload(f"operator:{who.name}")
    ctx.node.db.audit(f"operator:{who.name}", "reload", "configuration", outcome=outcome["message"], via="http")
    if not outcome["ok"]:
        raise HTTPException(409, outcome["message"])
    return outcome
