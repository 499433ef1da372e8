"""The housekeeping stage: the node's own heartbeat, the sweep that gives back work whose
heartbeat stopped (another node's too: a dead worker's job goes to a live one), and retention
(the files of series delivered long enough ago are removed, the records stay; on ingest nodes).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from sqlalchemy.exc import SQLAlchemyError

from node.config.schema import Config
from node.errors import first_line
from node.stage import Stage
from node.storage.db import Database
from node.storage.files import FileStore

log = logging.getLogger(__name__)

class Housekeeping(Stage):
    """Every ``node.heartbeat_s``: the node's heartbeat (``beat``) and the stalled-work sweep
    (jobs whose heartbeat is older than ``node.stall_timeout_s``); retention every
    ``retention.check_interval_s``."""

    name = "housekeeping"

    def __init__(self, stop: threading.Event, db: Database, store: FileStore,
                 config: Callable[[], Config], beat: Callable[[], None] | None = None) -> None:
        super().__init__(stop)
        self.db = db
        self.store = store
        self.config = config
        self.beat = beat

    def run_loop(self) -> None:
        next_beat = time.monotonic()
        next_purge = time.monotonic() + self.config().retention.check_interval_s
        while not self.stop_event.wait(max(0.1, min(next_beat, next_purge) - time.monotonic())):
            node = self.config().node
            try:
                if time.monotonic() >= next_beat:
                    next_beat = time.monotonic() + node.heartbeat_s
                    if self.beat is not None:
                        self.beat()
                    self.sweep(node.stall_timeout_s)
                if time.monotonic() >= next_purge:
                    next_purge = time.monotonic() + self.config().retention.check_interval_s
                    if node.ingests:
                        self.purge_once()
            except SQLAlchemyError as exc:   # the database is away: try again at the next beat
                log.warning("housekeeping: the database did not answer (%s); trying again", first_line(exc))

    def sweep(self, stall_timeout_s: float) -> int:
        """Give back jobs whose heartbeat stopped (their worker died) and expired leases."""
        n = self.db.requeue_stalled(heartbeat_before=time.time() - stall_timeout_s)
        if n:
            log.warning("gave back %d stalled jobs/deliveries (heartbeat older than %.0f s)", n, stall_timeout_s)
        return n

    def purge_once(self) -> int:
        """Remove the files of series delivered longer ago than the retention times."""
        hours = self.config().retention.delete_after_h
        if not hours:
            return 0
        purged = 0
        for series_id in self.db.purgeable_series(time.time() - hours * 3600):
            series = self.db.get_series(series_id)
            files = self.db.series_paths(series_id) + self.db.series_results(series_id)
            if not self.db.mark_purged(series_id):
                continue          # an instance arrived meanwhile: the series is receiving again
            removed = self.store.remove(files)
            purged += 1
            self.db.audit("node", "purged", series.series_uid, files=removed)
            log.info("retention: removed %d files of series %s (the records stay)", removed, series.series_uid)
        return purged
