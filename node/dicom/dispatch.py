"""The delivery stage: claims due deliveries (results and forwards, most urgent first) and
sends them (C-STORE, or STOW-RS to a DICOMweb destination), with backoff; a failed attempt holds the destination's other deliveries until
its retry, so a dead PACS is not hammered once per result.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from pathlib import Path
from typing import Callable

from node.config.schema import Config
from node.dicom.deliver import Peer, send_files
from node.dicom.stow_client import stow_files
from node.errors import ConfigError, NodeError
from node.metrics import Metrics
from node.stage import ClaimStage, backoff
from node.storage.db import Database, DeliveryRow

log = logging.getLogger(__name__)


class Dispatcher(ClaimStage[DeliveryRow]):
    """Sends one claimed delivery at a time (run it on several threads for several at once)."""

    name = "deliver"

    def __init__(self, stop: threading.Event, db: Database, config: Callable[[], Config],
                 client_tls: Callable[[], ssl.SSLContext | None], metrics: Metrics | None = None) -> None:
        super().__init__(stop)
        self.metrics = metrics or Metrics()
        self.db = db
        self.config = config
        self.client_tls = client_tls

    def claim(self) -> DeliveryRow | None:
        return self.db.claim_delivery()

    def next_due(self) -> float | None:
        return self.db.next_delivery_due()

    def process(self, delivery: DeliveryRow) -> None:
        """Send one claimed delivery; success, a scheduled retry or failure; never raises."""
        config = self.config()
        cfg = config.delivery
        where = f"delivery {delivery.id} ({delivery.kind} to {delivery.destination})"
        try:
            dest = config.resolve_destination(delivery.destination)
        except ConfigError as exc:
            self.db.defer_delivery(delivery.id, str(exc), None)
            self.metrics.delivered(delivery.destination, False)
            log.error("%s failed: %s", where, exc)
            return
        files = self.db.delivery_files(delivery)
        t = time.perf_counter()
        try:
            if dest.type == "dicomweb":
                report = stow_files([Path(f) for f in files], dest, cfg.timeout_s)
            else:
                peer = Peer(dest.ae_title, dest.host, dest.port, self.client_tls() if dest.tls else None)
                report = send_files([Path(f) for f in files], peer, config.node.ae_title, cfg.timeout_s)
            error = "; ".join(f"{Path(f).name}: {why}" for f, why in report.failed[:5])
        except NodeError as exc:
            error = str(exc)
        except Exception as exc:  # noqa: BLE001 - any network failure is a retry, not a crash
            log.error("%s: unexpected %s: %s (traceback at DEBUG)", where, type(exc).__name__, str(exc)[:300])
            log.debug("%s: traceback", where, exc_info=True)
            error = f"{type(exc).__name__}: {exc}"
        self.metrics.delivered(delivery.destination, not error)
        if not error:
            self.db.finish_delivery(delivery.id)
            self.db.audit("node", "delivered", f"delivery {delivery.id}", kind=delivery.kind,
                          job_id=delivery.job_id, destination=dest.describe(), files=len(files))
            log.info("%s: %d files sent in %.2f s", where, len(files), time.perf_counter() - t,
                     extra={"delivery_id": delivery.id})
            return
        if delivery.attempts >= cfg.max_attempts:
            self.db.defer_delivery(delivery.id, error, None)
            log.error("%s failed after %d attempts: %s (ainode retry to send again)", where,
                      delivery.attempts, error)
        else:
            delay = backoff(delivery.attempts, cfg.backoff_s, cfg.backoff_max_s)
            self.db.defer_delivery(delivery.id, error, time.time() + delay)
            self.db.hold_destination(delivery.destination, time.time() + delay)
            log.warning("%s attempt %d failed: %s; next try in %.0f s", where, delivery.attempts, error, delay)
