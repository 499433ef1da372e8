"""The notify stage: claims due notifications and posts them to the webhook
(:mod:`node.routing.notify`), with backoff; after ``notify.max_attempts`` a notification is
failed and stays visible until an operator retries it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Callable

from node.config.schema import Config
from node.errors import ConfigError, NodeError
from node.routing.notify import post_json, webhook_url
from node.metrics import Metrics
from node.stage import ClaimStage, backoff
from node.storage.db import Database, NotificationRow

log = logging.getLogger(__name__)


class Notifier(ClaimStage[NotificationRow]):
    """Posts one claimed notification at a time."""

    name = "notify"

    def __init__(self, stop: threading.Event, db: Database, config: Callable[[], Config],
                 metrics: Metrics | None = None) -> None:
        super().__init__(stop)
        self.metrics = metrics or Metrics()
        self.db = db
        self.config = config

    def claim(self) -> NotificationRow | None:
        return self.db.claim_notification()

    def next_due(self) -> float | None:
        return self.db.next_notification_due()

    def process(self, note: NotificationRow) -> None:
        """Post one claimed notification; sent, a scheduled retry or failed; never raises."""
        cfg = self.config().notify
        where = f"notification {note.id} ({note.subject}, job {note.job_id})"
        try:
            url = webhook_url(cfg)
            if url is None:
                raise ConfigError("no webhook is configured any more ([notify] webhook_url_env or _file)")
            status = post_json(url, json.loads(note.payload), cfg.timeout_s)
        except (NodeError, ValueError) as exc:
            error = str(exc)
        else:
            self.db.finish_notification(note.id)
            log.info("%s: webhook answered HTTP %d", where, status, extra={"notification_id": note.id})
            return
        self.metrics.notification_failures.inc()
        if note.attempts >= cfg.max_attempts:
            self.db.defer_notification(note.id, error, None)
            log.error("%s failed after %d attempts: %s", where, note.attempts, error,
                      extra={"notification_id": note.id})
        else:
            delay = backoff(note.attempts, cfg.backoff_s, cfg.backoff_max_s)
            self.db.defer_notification(note.id, error, time.time() + delay)
            log.warning("%s attempt %d failed: %s; next try in %.1f s", where, note.attempts, error, delay,
                        extra={"notification_id": note.id})
