"""The assemble stage: finds quiet series, matches routes, queues jobs and forwards; then
decides the study-level routes of the studies that are due (:mod:`node.routing.assemble`
makes each decision, this loop applies them to the database).
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Callable

from node.config.rules import Facts
from node.config.schema import Config
from node.routing.assemble import (FIRE_INCOMPLETE, NO_MATCH, NOT_YET, WAIT, StudyMember, association_facts,
                                   plan_series, plan_study, series_facts)
from node.metrics import Metrics
from node.stage import Stage
from node.storage.db import Database, SeriesRow, SeriesStatus

log = logging.getLogger(__name__)

#: How often evidence (an MPPS, a release) is looked at: the delay it adds at most.
EVIDENCE_POLL_S = 0.25
#: How long after a series' quiet-timer deadline it is looked at (clocks and float rounding).
QUIET_MARGIN_S = 0.005
#: How long a completed MPPS waits for the instances it references (the quiet timer applies meanwhile).
MPPS_WAIT_S = 24 * 3600.0
EVIDENCE_NAMES = {"quiet_timer": "the quiet timer", "mpps": "MPPS", "release": "association release"}


class Assembler(Stage):
    """Series and study completion; wakes the infer and deliver stages when it queued work."""

    name = "assemble"

    def __init__(self, stop: threading.Event, db: Database, config: Callable[[], Config],
                 wake_jobs: Callable[[], None], wake_deliveries: Callable[[], None],
                 metrics: Metrics | None = None) -> None:
        super().__init__(stop)
        self.metrics = metrics or Metrics()
        self.db = db
        self.config = config
        self.wake_jobs = wake_jobs
        self.wake_deliveries = wake_deliveries
        self._mpps_seen: dict[int, float | None] = {}      # MPPS id -> its series' last arrival, when looked at

    def run_loop(self) -> None:
        while not self.stop_event.wait(self.next_wait()):
            self.apply_mpps()
            self.assemble_once(time.time() - self.config().ingest.series_timeout_s)
            self.assemble_studies(time.time())

    def next_wait(self, now: float | None = None) -> float:
        """Seconds until the next look: the quiet timer's next deadline (the series quiet
        longest), at most :data:`EVIDENCE_POLL_S` (evidence, new series)."""
        oldest = self.db.oldest_receiving()
        if oldest is None:
            return EVIDENCE_POLL_S
        due = oldest + self.config().ingest.series_timeout_s - (time.time() if now is None else now)
        return min(EVIDENCE_POLL_S, max(QUIET_MARGIN_S, due + QUIET_MARGIN_S))

    def apply_mpps(self, now: float | None = None) -> int:
        """Give the series of every final MPPS their evidence once all the instances it
        references have arrived; returns how many series were marked complete."""
        now = time.time() if now is None else now
        marked = 0
        for mpps in self.db.mpps_to_decide():
            if mpps["status"] == "DISCONTINUED" and self.config().ingest.mpps_discontinued == "quiet_timer":
                self.db.mpps_decided(mpps["id"], True, "discontinued: the quiet timer decides")
                log.info("MPPS %s DISCONTINUED: its series are left to the quiet timer (ingest.mpps_discontinued)",
                         mpps["uid"])
                continue
            if now - mpps["updated_at"] > MPPS_WAIT_S:
                self.db.mpps_decided(mpps["id"], True, f"gave up after {MPPS_WAIT_S / 3600:.0f} h: {mpps['waiting']}")
                self._mpps_seen.pop(mpps["id"], None)
                continue
            refs: dict[str, list[str]] = mpps["references"]
            # A waiting MPPS is looked at again only when its series received something since.
            latest = self.db.series_last_received(refs)
            if mpps["waiting"] and self._mpps_seen.get(mpps["id"]) == latest:
                continue
            self._mpps_seen[mpps["id"]] = latest
            present = self.db.instances_present(uid for uids in refs.values() for uid in uids)
            if mpps["status"] == "DISCONTINUED":      # what arrived is processed now
                ready = [series for series, uids in refs.items() if set(uids) & present]
                refs = {series: [u for u in uids if u in present] for series, uids in refs.items()}
            else:
                ready = [series for series, uids in refs.items() if set(uids) <= present]
            missing = {series: len(set(uids) - present) for series, uids in refs.items() if series not in ready}
            if ready:
                marked += self.db.set_evidence(ready, "mpps", now)
            waiting = "; ".join(f"{n} referenced instances of series {s} missing" for s, n in sorted(missing.items()))
            self.db.mpps_decided(mpps["id"], not missing, waiting)
            if not missing:
                self._mpps_seen.pop(mpps["id"], None)
            if ready:
                log.info("MPPS %s %s: %d series complete by its evidence", mpps["uid"], mpps["status"], len(ready))
            if missing and waiting != mpps["waiting"]:
                log.warning("MPPS %s %s: %s; waiting for them (the quiet timer still applies)", mpps["uid"],
                            mpps["status"], waiting)
        return marked

    def assemble_once(self, quiet_since: float, now: float | None = None) -> int:
        """Assemble every series quiet since ``quiet_since``, or complete by evidence at
        ``now``; returns how many."""
        done = 0
        for series in self.db.quiet_series(quiet_since, now):
            config = self.config()
            paths = self.db.series_paths(series.id)
            facts = self._facts(series, paths[0] if paths else "")
            plan = plan_series(config, series, facts)
            if not self.db.assemble(series.id, series.last_received_at, plan.jobs, plan.forwards,
                                    plan.explanation(), plan.forward_priority,
                                    study_check=bool(config.study_routes)):
                continue  # an instance arrived meanwhile: it stays receiving
            done += 1
            evidence = series.evidence or "quiet_timer"
            self.metrics.series_completed.labels(evidence).inc()
            matched = [d.route for d in plan.decisions if d.matched]
            log.info("series %s complete (%d instances, by %s): routes %s; jobs %s; forwards %s",
                     series.series_uid, len(paths), EVIDENCE_NAMES.get(evidence, evidence), matched or "none",
                     [j.model for j in plan.jobs] or "none", list(plan.forwards) or "none",
                     extra={"series_uid": series.series_uid, "routes": plan.explanation()})
            if plan.jobs:
                self.wake_jobs()
            if plan.forwards:
                self.wake_deliveries()
        return done

    def _facts(self, series: SeriesRow, path: str) -> Facts:
        try:
            return series_facts(Path(path), series)
        except Exception as exc:  # noqa: BLE001 - one unreadable file must not stop assembly
            log.error("series %s: cannot read its header (%s); only association facts apply",
                      series.series_uid, exc, extra={"series_uid": series.series_uid})
            return Facts(None, association_facts(series))

    def assemble_studies(self, now: float) -> int:
        """Decide the study-level routes of every study that is due; returns how many fired."""
        fired = 0
        for study_id, seen in self.db.studies_due(now):
            config = self.config()
            rows = self.db.study_series(study_id)
            complete = (SeriesStatus.ASSEMBLED.value, SeriesStatus.PURGED.value)
            if not rows or not config.study_routes or any(r.status not in complete for r, _ in rows):
                self.db.set_study_check(study_id, seen, None)   # due again when its series is complete
                continue
            members = [StudyMember(r, self._facts(r, path)) for r, path in rows]
            last = max(r.last_received_at for r, _ in rows)
            previous = self.db.study_route_states(study_id)
            due: list[float] = []
            for route in config.study_routes:
                state, watermark = previous.get(route.name, ("", -1.0))
                if watermark >= last and (state != WAIT or not route.study_max_wait_s):
                    continue                         # decided for exactly this study content
                decision = plan_study(config, route, members, last, now)
                if decision.due_at is not None:
                    due.append(decision.due_at)
                if decision.state == NOT_YET:
                    continue
                forwards = [(sid, dest, route.priority_rank) for sid, dest in decision.forwards]
                self.db.decide_study_route(study_id, route.name, decision.state, decision.reason, last,
                                           decision.jobs, forwards)
                study_uid = rows[0][0].study_uid
                extra = {"study_uid": study_uid, "route": route.name, "state": decision.state}
                if decision.fires:
                    fired += 1
                    (log.warning if decision.state == FIRE_INCOMPLETE else log.info)(
                        "study %s: route %s %s: %s; jobs %s", study_uid, route.name, decision.state,
                        decision.reason, sorted({j.model for _, j in decision.jobs}) or "none", extra=extra)
                    self.wake_jobs()
                    self.wake_deliveries()
                elif decision.state == WAIT and state != WAIT:
                    log.warning("study %s: route %s %s", study_uid, route.name, decision.reason, extra=extra)
                elif decision.state == NO_MATCH:
                    log.debug("study %s: route %s: %s", study_uid, route.name, decision.reason, extra=extra)
            self.db.set_study_check(study_id, seen, min(due) if due else None)
        return fired
