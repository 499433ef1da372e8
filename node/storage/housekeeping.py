"""The housekeeping stage: retention (the files of series delivered long enough ago are
removed, the records stay) and the sweep that gives back work whose heartbeat stopped.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from node.config.schema import Config
from node.stage import Stage
from node.storage.db import Database
from node.storage.files import FileStore

log = logging.getLogger(__name__)

#: Work whose heartbeat is older than this is given back to the queue.
STALL_TIMEOUT_S = 300.0
SWEEP_INTERVAL_S = 30.0


class Housekeeping(Stage):
    """Retention every ``retention.check_interval_s``; the stalled-work sweep every 30 s."""

    name = "housekeeping"

    def __init__(self, stop: threading.Event, db: Database, store: FileStore,
                 config: Callable[[], Config]) -> None:
        super().__init__(stop)
        self.db = db
        self.store = store
        self.config = config

    def run_loop(self) -> None:
        next_sweep = time.monotonic() + SWEEP_INTERVAL_S
        next_purge = time.monotonic() + self.config().retention.check_interval_s
        while not self.stop_event.wait(max(0.1, min(next_sweep, next_purge) - time.monotonic())):
            if time.monotonic() >= next_purge:
                next_purge = time.monotonic() + self.config().retention.check_interval_s
                self.purge_once()
            if time.monotonic() >= next_sweep:
                next_sweep = time.monotonic() + SWEEP_INTERVAL_S
                if n := self.db.requeue_stalled(heartbeat_before=time.time() - STALL_TIMEOUT_S):
                    log.warning("gave back %d stalled jobs/deliveries", n)

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
