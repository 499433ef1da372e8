"""The HTTP server inside ``ainode serve``: the FastAPI application, health, metrics, and the
uvicorn server on its own thread.

``http.host`` is loopback by default; another address needs ``http.tokens_file`` (checked
when the configuration is loaded, and again here).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from node import __version__
from node.config.schema import PRIORITY_NAMES, HttpSection, is_loopback
from node.errors import ConfigError, NodeError
from node.web import api, dicomweb, pages, stow
from node.web.api import readiness
from node.web.auth import Tokens

log = logging.getLogger(__name__)
#: Connections the HTTP face serves at once; more are answered 503 at once.
MAX_CONNECTIONS = 64

@dataclass
class WebContext:
    """What the handlers reach: the running node, the tokens, and the reload the command line
    does on SIGHUP (``reload(actor)`` returns ``{"ok": bool, "message": str}``)."""

    node: Any                                    # node.worker.Node
    tokens: Tokens
    reload: Callable[[str], dict]


def create_app(ctx: WebContext) -> FastAPI:
    app = FastAPI(title="pacs-ai-node", version=__version__, docs_url="/docs", redoc_url=None,
                  description="The node's queue, results and operator actions. Reference models are "
                              "demonstrations, not for clinical use.")
    app.state.ctx = ctx
    app.include_router(api.router)
    app.include_router(pages.router)
    app.include_router(stow.router)
    app.include_router(dicomweb.router)
    ctx.node.metrics.registry.register(QueueCollector(ctx.node.db))

    @app.middleware("http")
    async def count(request: Request, call_next: Callable) -> Response:
        response = await call_next(request)
        route = request.scope.get("route")
        ctx.node.metrics.http_requests.labels(getattr(route, "path", "unmatched"), str(response.status_code)).inc()
        return response

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict:
        return {"status": "alive"}

    @app.get("/readyz", include_in_schema=False)
    def readyz() -> JSONResponse:
        checks = readiness(ctx.node)
        return JSONResponse({"ready": all(checks.values()), "checks": checks},
                            status_code=200 if all(checks.values()) else 503)

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        return PlainTextResponse(generate_latest(ctx.node.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


class QueueCollector(Collector):
    """Jobs by state and model, and queue depth by priority, read from the database at each
    scrape (right after a restart, and the same on every node of a shared database)."""

    def __init__(self, db: Any) -> None:
        self.db = db

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            jobs = self.db.job_counts()
            depth = self.db.queue_depth()
        except Exception:  # noqa: BLE001 - a scrape must not fail because the database is away
            log.warning("metrics: the database did not answer; queue figures left out")
            return
        family = GaugeMetricFamily("ainode_jobs", "Jobs by state and model", labels=["state", "model"])
        for (state, model), n in sorted(jobs.items()):
            family.add_metric([state, model], n)
        yield family
        family = GaugeMetricFamily("ainode_queue_depth", "Work waiting, by kind and priority",
                                   labels=["kind", "priority"])
        for (kind, rank), n in sorted(depth.items()):
            family.add_metric([kind, PRIORITY_NAMES.get(rank, str(rank))], n)
        yield family


class WebServer:
    """uvicorn serving the application on a thread of ``ainode serve``."""

    def __init__(self, section: HttpSection, ctx: WebContext) -> None:
        if not is_loopback(section.host) and not ctx.tokens.required:
            raise ConfigError(f"http.host {section.host!r} is not a loopback address: set http.tokens_file "
                              "(without tokens the HTTP face serves loopback only)")
        self.section = section
        config = uvicorn.Config(create_app(ctx), host=section.host, port=section.port, log_level="warning",
                                access_log=False, lifespan="off", server_header=False, log_config=None,
                                limit_concurrency=MAX_CONNECTIONS)
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 30.0) -> None:
        """Raises:
            NodeError: the port cannot be bound (its one line names the address)."""
        family = socket.AF_INET6 if ":" in self.section.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.section.host, self.section.port))
        except OSError as exc:
            sock.close()
            raise NodeError(f"cannot listen on {self.section.host}:{self.section.port} (HTTP): "
                            f"{exc.strerror or exc}") from None
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, name="http",
                                        daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive():
                raise NodeError(f"the HTTP server on {self.section.host}:{self.section.port} stopped at start")
            if time.monotonic() > deadline:
                raise NodeError(f"the HTTP server on {self.section.host}:{self.section.port} did not start")
            time.sleep(0.02)
        log.info("HTTP on http://%s:%d/ (dashboard, /api/v1, /metrics, /docs)%s", self.section.host,
                 self.section.port, "" if self.section.tokens_file else "; no tokens file: loopback only")

    @property
    def port(self) -> int:
        return self.section.port

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
