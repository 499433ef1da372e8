"""The database: every query of the node (the tables are in :mod:`node.storage.schema`), nothing of the stages.

States (each change is one committed statement, so a crash anywhere loses nothing)::

    series:     receiving --(quiet for series_timeout_s)--> assembled --(new instance)--> receiving
                assembled --(results delivered + retention time)--> purged
    job:        queued --claim--> running --> done
                                     |------> queued   (retryable error, or stalled/restarted)
                                     '------> failed   (permanent error, or attempts used up)
                failed/done --retry--> queued
    delivery:   pending --claim--> sending --> done
                                      |-----> pending  (error; next_attempt_at = now + backoff)
                                      '-----> failed   (attempts used up)
                failed --retry--> pending
    study route: (none) --> not-yet (quiet time) --> fired | fired-incomplete | waiting | no-match
                 (a new series of the study, or the study_max_wait_s deadline, decides it again)
    notification: pending --claim--> sending --> sent
                                        |-----> pending (error; backoff)
                                        '-----> failed  (attempts used up)
                  logged (no webhook configured: the log line is the notification)

Jobs are claimed most urgent first, then oldest; deliveries most urgent first, then by due time.
Work is claimed by an ``UPDATE ... WHERE id = (SELECT ...) RETURNING`` so two workers never
take the same row. ``requeue_stalled`` gives back what a dead worker held.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

from sqlalchemy import and_, bindparam, create_engine, event, func, or_, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session

from node.storage.catalogue import CatalogueQueries
from node.storage.cluster import ClusterQueries
from node.storage.evidence import EvidenceQueries
from node.storage.groupcommit import GroupCommit
from node.storage.queue import QueueQueries
from node.storage.reports import ReportQueries
from node.storage.schema import (ROUTINE, AuditEvent, Base, Delivery, DeliveryRow, DeliveryStatus, Instance,
                                 InstanceRecord, Job, JobRow, JobSpec, JobStatus, NotificationRow,
                                 NotificationSpec, NotificationStatus, Series, SeriesRow, SeriesStatus, Study,
                                 StudyRoute)

__all__ = ["Database", "DeliveryRow", "DeliveryStatus", "InstanceRecord", "JobRow", "JobSpec", "JobStatus",
           "NotificationRow", "NotificationSpec", "NotificationStatus", "SeriesRow", "SeriesStatus"]


#: Study and series ids remembered by ingest (one look-up per instance saved).
_ID_CACHE_MAX = 10_000


class _IngestStatements:
    """The statements of :meth:`Database.record_instance`, built once: building a statement
    and its cache key costs more than running it, once per received instance."""

    def __init__(self, insert: Any) -> None:
        self.path_of = select(Instance.path).where(Instance.sop_instance_uid == bindparam("b_sop"))
        self.touch_series = update(Series).where(Series.id == bindparam("b_series")).values(
            last_received_at=bindparam("b_now"), status=SeriesStatus.RECEIVING.value)
        upsert = insert(Instance).values(
            sop_instance_uid=bindparam("b_sop"), series_id=bindparam("b_series"),
            sop_class_uid=bindparam("b_class"), transfer_syntax=bindparam("b_ts"), path=bindparam("b_path"),
            size=bindparam("b_size"), received_at=bindparam("b_now"))
        columns = ("series_id", "sop_class_uid", "transfer_syntax", "path", "size", "received_at")
        self.upsert_instance = upsert.on_conflict_do_update(
            index_elements=["sop_instance_uid"], set_={c: upsert.excluded[c] for c in columns})


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")      # a commit is on disk (the WAL fsynced) when it returns
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def _private_sqlite_file(name: str | None) -> None:
    """Create the SQLite file 0600 before SQLite opens it: its -wal and -shm files get the
    same mode, and the database holds patient data."""
    if not name or name == ":memory:" or name.startswith("file:"):
        return
    fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    os.close(fd)
    os.chmod(name, 0o600)


class Database(QueueQueries, EvidenceQueries, ReportQueries, CatalogueQueries, ClusterQueries):
    """The node's queue and catalogue over any SQLAlchemy URL (SQLite in WAL mode by default).

    This module holds the engine, ingest, assembly, study routes, retention and the audit;
    the queue's claims and state changes are in :mod:`node.storage.queue`, the read-only
    reports in :mod:`node.storage.reports`: together they are every query of the node.
    """

    def __init__(self, url: str, root: Path | None = None, node: str = "") -> None:
        self.url = url
        self.node = node                  # node.name: recorded with each audit event of this node
        self.root = root.resolve() if root is not None else None
        # pre-ping: a server database that restarted leaves dead connections in the pool
        self.engine: Engine = create_engine(url, future=True, pool_pre_ping=not url.startswith("sqlite"))
        if self.engine.dialect.name == "sqlite":
            _private_sqlite_file(self.engine.url.database)
            event.listen(self.engine, "connect", _sqlite_pragmas)
        # Both dialects offer INSERT ... ON CONFLICT with the same API.
        self._insert = postgresql.insert if self.engine.dialect.name == "postgresql" else sqlite.insert
        self._series_ids: dict[str, int] = {}
        self._ingest = _IngestStatements(self._insert)
        self._instances: GroupCommit[tuple[InstanceRecord, float], str | None] = GroupCommit(self._record_instances)
        self._study_ids: dict[str, int] = {}

    def create(self) -> None:
        """Create missing tables (idempotent)."""
        Base.metadata.create_all(self.engine)

    @property
    def shared(self) -> bool:
        """True for a server database that several nodes may share (not SQLite)."""
        return self.engine.dialect.name != "sqlite"

    def drop_all(self) -> None:
        """Remove every table (tests only)."""
        Base.metadata.drop_all(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    # ---------------------------------------------------------------- ingest
    def record_instance(self, rec: InstanceRecord, now: float | None = None) -> str | None:
        """Commit an instance row (a duplicate SOP Instance UID replaces the old row). Rows
        recorded at once by several threads (associations) share one commit
        (:class:`~node.storage.groupcommit.GroupCommit`); each returns once its row is committed.

        Returns the path the SOP Instance UID had before when it was another file (the same
        UID re-sent in another series): the caller removes that file, so file and row stay one
        to one.
        """
        return self._instances.submit((rec, time.time() if now is None else now))

    def _record_instances(self, items: Sequence[tuple[InstanceRecord, float]]) -> list[str | None]:
        """One transaction for the rows of :meth:`record_instance`."""
        stmt = self._ingest
        replaced: list[str | None] = []
        ids: list[tuple[InstanceRecord, int, int]] = []
        with self.engine.begin() as conn:
            for rec, now in items:
                path = self.to_db(rec.path)
                before = conn.execute(stmt.path_of, {"b_sop": rec.sop_instance_uid}).scalar()
                study_id = self._study_ids.get(rec.study_uid)
                if study_id is None:
                    conn.execute(self._insert(Study).values(
                        study_uid=rec.study_uid, patient_id=rec.patient_id, accession=rec.accession,
                        patient_name=rec.patient_name, study_date=rec.study_date,
                        description=rec.study_description, received_at=now).on_conflict_do_nothing())
                    study_id = conn.execute(select(Study.id).where(Study.study_uid == rec.study_uid)).scalar_one()
                series_id = self._series_ids.get(rec.series_uid)
                if series_id is None:
                    conn.execute(self._insert(Series).values(
                        series_uid=rec.series_uid, study_id=study_id, modality=rec.modality,
                        description=rec.series_description, calling_aet=rec.calling_aet,
                        called_aet=rec.called_aet, caller_address=rec.caller_address,
                        status=SeriesStatus.RECEIVING.value,
                        first_received_at=now, last_received_at=now).on_conflict_do_nothing())
                    series_id = conn.execute(select(Series.id).where(
                        Series.series_uid == rec.series_uid)).scalar_one()
                conn.execute(stmt.touch_series, {"b_series": series_id, "b_now": now})
                conn.execute(stmt.upsert_instance, {
                    "b_sop": rec.sop_instance_uid, "b_series": series_id, "b_class": rec.sop_class_uid,
                    "b_ts": rec.transfer_syntax, "b_path": path, "b_size": rec.size, "b_now": now})
                replaced.append(self.from_db(before) if before is not None and before != path else None)
                ids.append((rec, study_id, series_id))
        # Cache ids only after the commit, so a rolled-back insert is never remembered; the
        # caches only spare look-ups, so they are simply emptied when they grow large.
        if len(self._series_ids) > _ID_CACHE_MAX:
            self._series_ids.clear()
            self._study_ids.clear()
        for rec, study_id, series_id in ids:
            self._study_ids[rec.study_uid] = study_id
            self._series_ids[rec.series_uid] = series_id
        return replaced

    # -------------------------------------------------------------- assemble
    def quiet_series(self, quiet_since: float, now: float | None = None) -> list[SeriesRow]:
        """Series still receiving that are complete: their last instance arrived before
        ``quiet_since``, or evidence (an MPPS, a release) says so since their last instance.
        ``evidence`` of the rows says which ("" for the quiet timer)."""
        now = time.time() if now is None else now
        by_evidence = and_(Series.evidence_at.is_not(None), Series.evidence_at <= now,
                           Series.evidence_at >= Series.last_received_at)
        stmt = (select(Series, Study, by_evidence.label("early")).join(Study, Series.study_id == Study.id)
                .where(Series.status == SeriesStatus.RECEIVING.value,
                       or_(Series.last_received_at < quiet_since, by_evidence))
                .order_by(Series.last_received_at))
        with Session(self.engine) as session:
            return [replace(_series_row(s, st), evidence=s.evidence if early else "")
                    for s, st, early in session.execute(stmt).all()]

    def oldest_receiving(self) -> float | None:
        """When the series still receiving that has been quiet longest received its last
        instance (None when no series is receiving): the quiet timer's next deadline follows."""
        with self.engine.connect() as conn:
            return conn.execute(select(func.min(Series.last_received_at)).where(
                Series.status == SeriesStatus.RECEIVING.value)).scalar()

    def series_paths(self, series_id: int) -> list[str]:
        with self.engine.connect() as conn:
            return [self.from_db(p) for p in conn.execute(select(Instance.path).where(
                Instance.series_id == series_id).order_by(Instance.id)).scalars()]

    def get_series(self, series_id: int) -> SeriesRow:
        with Session(self.engine) as session:
            s, st = session.execute(select(Series, Study).join(Study, Series.study_id == Study.id)
                                    .where(Series.id == series_id)).one()
            return _series_row(s, st)

    def assemble(self, series_id: int, last_seen: float, jobs: Sequence[JobSpec],
                 forwards: Sequence[str], explanation: dict[str, Any], forward_priority: int = ROUTINE,
                 study_check: bool = False) -> bool:
        """Mark a quiet series assembled and queue its jobs and forwards, in one transaction.

        Returns False (and changes nothing) if an instance arrived since ``last_seen``.
        An existing job for the same (series, model) is queued again: its input changed.
        With ``study_check``, the series' study is due for its study-level routes.
        """
        now = time.time()
        with self.engine.begin() as conn:
            changed = conn.execute(update(Series).where(
                Series.id == series_id, Series.status == SeriesStatus.RECEIVING.value,
                Series.last_received_at == last_seen).values(
                status=SeriesStatus.ASSEMBLED.value, routes=json.dumps(explanation))).rowcount
            if not changed:
                return False
            if study_check:
                study_id = select(Series.study_id).where(Series.id == series_id).scalar_subquery()
                conn.execute(update(Study).where(Study.id == study_id).values(study_check_at=now))
            for spec in jobs:
                values = dict(routes=json.dumps(spec.routes), destinations=json.dumps(spec.destinations),
                              priority=spec.priority, status=JobStatus.QUEUED.value, created_at=now,
                              error="", attempts=0, finished_at=None)
                conn.execute(self._insert(Job).values(series_id=series_id, model=spec.model, **values)
                             .on_conflict_do_update(index_elements=["series_id", "model"], set_=values,
                                                    where=Job.status != JobStatus.RUNNING.value))
            for dest in forwards:
                conn.execute(self._insert(Delivery).values(
                    kind="forward", series_id=series_id, destination=dest, status=DeliveryStatus.PENDING.value,
                    priority=forward_priority, next_attempt_at=now, created_at=now))
        return True


    # --------------------------------------------------------------- studies
    def studies_due(self, now: float) -> list[tuple[int, float]]:
        """(study id, check time) of studies whose study-level routes are due a look."""
        with self.engine.connect() as conn:
            return [tuple(r) for r in conn.execute(  # type: ignore[misc]
                select(Study.id, Study.study_check_at).where(Study.study_check_at <= now)
                .order_by(Study.study_check_at))]

    def study_series(self, study_id: int) -> list[tuple[SeriesRow, str]]:
        """Every series of a study with the path of one of its instances (for its header)."""
        first = (select(func.min(Instance.path)).where(Instance.series_id == Series.id)
                 .correlate(Series).scalar_subquery())
        stmt = (select(Series, Study, first).join(Study, Series.study_id == Study.id)
                .where(Series.study_id == study_id).order_by(Series.first_received_at))
        with Session(self.engine) as session:
            return [(_series_row(s, st), self.from_db(path or "")) for s, st, path in session.execute(stmt).all()]

    def study_route_states(self, study_id: int) -> dict[str, tuple[str, float]]:
        """route -> (state, watermark) of the study-level routes already decided for a study."""
        with self.engine.connect() as conn:
            return {r.route: (r.state, r.watermark) for r in conn.execute(
                select(StudyRoute.route, StudyRoute.state, StudyRoute.watermark)
                .where(StudyRoute.study_id == study_id))}

    def decide_study_route(self, study_id: int, route: str, state: str, reason: str, watermark: float,
                           jobs: Sequence[tuple[int, JobSpec]] = (),
                           forwards: Sequence[tuple[int, str, int]] = ()) -> None:
        """Record a study-level route's decision and queue what it fires, in one transaction.

        A job that exists for the same (series, model) gains the route's destinations and
        priority; it runs again only if its series changed after it was made. A forward is not
        queued twice for an unchanged series.
        """
        now = time.time()
        with self.engine.begin() as conn:
            values = dict(state=state, reason=reason[:4000], watermark=watermark, decided_at=now)
            conn.execute(self._insert(StudyRoute).values(study_id=study_id, route=route, **values)
                         .on_conflict_do_update(index_elements=["study_id", "route"], set_=values))
            for series_id, spec in jobs:
                self._merge_job(conn, series_id, spec, now)
            for series_id, dest, priority in forwards:
                self._forward_once(conn, series_id, dest, priority, now)

    def _merge_job(self, conn: Connection, series_id: int, spec: JobSpec, now: float) -> None:
        job = conn.execute(select(Job.id, Job.routes, Job.destinations, Job.priority, Job.status, Job.created_at)
                           .where(Job.series_id == series_id, Job.model == spec.model)).first()
        if job is None:
            conn.execute(self._insert(Job).values(
                series_id=series_id, model=spec.model, routes=json.dumps(list(spec.routes)),
                destinations=json.dumps(list(spec.destinations)), priority=spec.priority,
                status=JobStatus.QUEUED.value, created_at=now))
            return
        old_dests = json.loads(job.destinations)
        dests = sorted(set(old_dests) | set(spec.destinations))
        values: dict[str, Any] = dict(routes=json.dumps(sorted(set(json.loads(job.routes)) | set(spec.routes))),
                                      destinations=json.dumps(dests), priority=min(job.priority, spec.priority))
        last = conn.execute(select(Series.last_received_at).where(Series.id == series_id)).scalar_one()
        if job.created_at < last and job.status != JobStatus.RUNNING.value:
            values.update(status=JobStatus.QUEUED.value, created_at=now, error="", attempts=0, finished_at=None)
        elif job.status == JobStatus.DONE.value:
            for dest in sorted(set(dests) - set(old_dests)):
                conn.execute(self._insert(Delivery).values(
                    kind="result", job_id=job.id, series_id=series_id, destination=dest,
                    priority=values["priority"], status=DeliveryStatus.PENDING.value,
                    next_attempt_at=now, created_at=now))
        conn.execute(update(Job).where(Job.id == job.id).values(**values))

    def set_study_check(self, study_id: int, seen: float | None, check_at: float | None) -> bool:
        """Set when to look at a study again, unless a new series made it due meanwhile."""
        with self.engine.begin() as conn:
            return bool(conn.execute(update(Study).where(Study.id == study_id, Study.study_check_at == seen)
                                     .values(study_check_at=check_at)).rowcount)


    # ------------------------------------------------------------- retention
    def purgeable_series(self, finished_before: float) -> list[int]:
        """Assembled series whose jobs and deliveries are all done, the last before the time."""
        open_jobs = select(Job.id).where(Job.series_id == Series.id, Job.status != JobStatus.DONE.value).exists()
        open_deliveries = select(Delivery.id).where(
            Delivery.series_id == Series.id, Delivery.status != DeliveryStatus.DONE.value).exists()
        last_job = select(func.max(Job.finished_at)).where(Job.series_id == Series.id).scalar_subquery()
        last_delivery = (select(func.max(Delivery.finished_at)).where(Delivery.series_id == Series.id)
                         .scalar_subquery())
        finished = func.coalesce(last_delivery, last_job, Series.last_received_at)
        # A study whose study-level routes are still to decide, or wait for a series, keeps its files.
        study_open = select(Study.id).where(Study.id == Series.study_id, Study.study_check_at.is_not(None)).exists()
        study_waiting = select(StudyRoute.id).where(StudyRoute.study_id == Series.study_id,
                                                    StudyRoute.state == "waiting").exists()
        stmt = (select(Series.id).where(Series.status == SeriesStatus.ASSEMBLED.value, ~open_jobs,
                                        ~open_deliveries, ~study_open, ~study_waiting, finished < finished_before)
                .order_by(Series.id).limit(100))
        with self.engine.connect() as conn:
            return list(conn.execute(stmt).scalars())

    def series_results(self, series_id: int) -> list[str]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(Job.result_files).where(Job.series_id == series_id)).scalars()
            return [self.from_db(path) for row in rows for path in json.loads(row or "[]")]

    def mark_purged(self, series_id: int) -> bool:
        """Assembled -> purged, unless an instance arrived meanwhile (then it is receiving)."""
        with self.engine.begin() as conn:
            return bool(conn.execute(update(Series).where(
                Series.id == series_id, Series.status == SeriesStatus.ASSEMBLED.value)
                .values(status=SeriesStatus.PURGED.value)).rowcount)

    # ----------------------------------------------------------------- audit
    def audit(self, actor: str, action: str, subject: str, **detail: Any) -> None:
        if self.node:
            detail.setdefault("node", self.node)
        with self.engine.begin() as conn:
            conn.execute(self._insert(AuditEvent).values(
                at=time.time(), actor=actor[:128], action=action[:32], subject=subject[:128],
                detail=json.dumps(detail, default=str)))

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))


def _series_row(s: Series, study: Study) -> SeriesRow:
    return SeriesRow(id=s.id, series_uid=s.series_uid, study_uid=study.study_uid, modality=s.modality,
                     calling_aet=s.calling_aet, called_aet=s.called_aet, status=s.status,
                     last_received_at=s.last_received_at, caller_address=s.caller_address,
                     study_id=study.id, accession=study.accession, description=s.description)
