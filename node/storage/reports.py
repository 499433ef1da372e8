"""The database's read-only reports for the command line, the HTTP face and the metrics (part
of :class:`node.storage.db.Database`).

Kept apart from the queue's state changes in :mod:`node.storage.db` only for size; every query of the
node is in these two modules.
"""

from __future__ import annotations

import json
import time
from typing import Any

from sqlalchemy import Integer, cast, func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from node.storage.schema import (AuditEvent, Delivery, DeliveryStatus, Instance, Job, JobStatus, Mpps, Notification,
                                 Series, Study, StudyRoute)
from node.storage.paths import DataPaths


class ReportQueries(DataPaths):
    """Counts and listings: ``ainode status``, ``jobs``, ``worklist``, ``routes log``, ``audit``."""

    engine: Engine

    def counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        with self.engine.connect() as conn:
            for name, model in (("series", Series), ("jobs", Job), ("deliveries", Delivery),
                                ("notifications", Notification), ("mpps", Mpps)):
                rows = conn.execute(select(model.status, func.count()).group_by(model.status)).all()
                out[name] = {status: n for status, n in rows}
            out["instances"] = {"stored": conn.execute(select(func.count()).select_from(Instance)).scalar_one()}
        return out

    def jobs_report(self, limit: int = 50, *, offset: int = 0, status: str | None = None,
                    priority: int | None = None, model: str | None = None,
                    study_uid: str | None = None) -> list[dict[str, Any]]:
        """Jobs, newest first, optionally only those of a state, priority, model or study."""
        stmt = (select(Job, Series.series_uid, Series.modality, Series.description, Study.study_uid,
                       Study.accession)
                .join(Series, Job.series_id == Series.id).join(Study, Series.study_id == Study.id))
        for column, value in ((Job.status, status), (Job.priority, priority), (Job.model, model),
                              (Study.study_uid, study_uid)):
            if value is not None:
                stmt = stmt.where(column == value)
        stmt = stmt.order_by(Job.id.desc()).limit(limit).offset(offset)
        with Session(self.engine) as conn:
            return [self._job_dict(conn, *row) for row in conn.execute(stmt).all()]

    def job_detail(self, job_id: int) -> dict[str, Any] | None:
        """One job with its series, results, deliveries and notifications (None: no such job)."""
        stmt = (select(Job, Series.series_uid, Series.modality, Series.description, Study.study_uid,
                       Study.accession)
                .join(Series, Job.series_id == Series.id).join(Study, Series.study_id == Study.id)
                .where(Job.id == job_id))
        with Session(self.engine) as conn:
            row = conn.execute(stmt).first()
            if row is None:
                return None
            out = self._job_dict(conn, *row)
            series = conn.get(Series, row[0].series_id)
            out.update(series_id=series.id, calling_aet=series.calling_aet, caller_address=series.caller_address,
                       instances=conn.execute(select(func.count()).select_from(Instance).where(
                           Instance.series_id == series.id)).scalar_one(),
                       result_files=[self.from_db(f) for f in json.loads(row[0].result_files or "[]")],
                       notifications=[dict(id=n.id, subject=n.subject, status=n.status, attempts=n.attempts,
                                           error=n.error) for (n,) in conn.execute(
                                               select(Notification).where(Notification.job_id == job_id)
                                               .order_by(Notification.id)).all()])
        return out

    @staticmethod
    def _job_dict(conn: Session, job: Job, series_uid: str, modality: str, description: str, study_uid: str,
                  accession: str) -> dict[str, Any]:
        deliveries = conn.execute(select(Delivery.id, Delivery.destination, Delivery.kind, Delivery.status,
                                         Delivery.attempts, Delivery.error)
                                  .where(Delivery.job_id == job.id).order_by(Delivery.id)).all()
        return dict(
            id=job.id, model=job.model, status=job.status, priority=job.priority,
            attempts=job.attempts, worker=job.worker, error=job.error, series_uid=series_uid, modality=modality,
            description=description, study_uid=study_uid, accession=accession,
            created_at=job.created_at, finished_at=job.finished_at,
            summary=json.loads(job.summary or "{}"),
            deliveries=[dict(id=d.id, destination=d.destination, kind=d.kind, status=d.status,
                             attempts=d.attempts, error=d.error) for d in deliveries])

    def previous_results(self, job_id: int) -> list[dict[str, Any]]:
        """The result objects a job's last successful run made (empty before its first)."""
        with self.engine.connect() as conn:
            summary = conn.execute(select(Job.summary).where(Job.id == job_id)).scalar()
        return list(json.loads(summary or "{}").get("results", []))

    def job_counts(self) -> dict[tuple[str, str], int]:
        """Jobs by (state, model), for monitoring."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(Job.status, Job.model, func.count()).group_by(Job.status, Job.model)).all()
        return {(status, model): n for status, model, n in rows}

    def queue_depth(self) -> dict[tuple[str, int], int]:
        """Work waiting by (kind, priority rank): queued jobs and pending deliveries."""
        with self.engine.connect() as conn:
            jobs = conn.execute(select(Job.priority, func.count()).where(Job.status == JobStatus.QUEUED.value)
                                .group_by(Job.priority)).all()
            deliveries = conn.execute(select(Delivery.priority, func.count()).where(
                Delivery.status == DeliveryStatus.PENDING.value).group_by(Delivery.priority)).all()
        out = {("job", rank): 0 for rank in range(3)} | {("delivery", rank): 0 for rank in range(3)}
        out.update({("job", rank): n for rank, n in jobs})
        out.update({("delivery", rank): n for rank, n in deliveries})
        return out

    def ingest_rate(self, minutes: int = 10, now: float | None = None) -> list[dict[str, float]]:
        """Instances received in each of the last ``minutes`` minutes, oldest first."""
        now = time.time() if now is None else now
        start = (now // 60 - minutes + 1) * 60
        minute = Instance.received_at / 60           # SQLite may lack floor(); its CAST truncates
        bucket = func.floor(minute) if self.engine.dialect.name == "postgresql" else cast(minute, Integer)
        with self.engine.connect() as conn:
            rows = conn.execute(select(bucket, func.count()).where(Instance.received_at >= start)
                                .group_by(bucket)).all()
        counts = {int(b): n for b, n in rows}
        return [dict(minute=start + 60 * k, instances=counts.get(int(start // 60) + k, 0)) for k in range(minutes)]

    def deliveries_report(self, status: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        stmt = select(Delivery).order_by(Delivery.id.desc()).limit(limit)
        if status:
            stmt = stmt.where(Delivery.status == status)
        with Session(self.engine) as conn:
            return [dict(id=d.id, kind=d.kind, job_id=d.job_id, series_id=d.series_id,
                         destination=d.destination, status=d.status, attempts=d.attempts,
                         error=d.error) for (d,) in conn.execute(stmt).all()]

    def routing_report(self, limit: int = 20) -> list[dict[str, Any]]:
        """The most recently received series with why each route matched or not, and the
        study-level decisions of their studies."""
        stmt = (select(Series, Study).join(Study, Series.study_id == Study.id)
                .order_by(Series.last_received_at.desc()).limit(limit))
        with Session(self.engine) as conn:
            out = []
            for s, st in conn.execute(stmt).all():
                study_routes = conn.execute(select(StudyRoute.route, StudyRoute.state, StudyRoute.reason)
                                            .where(StudyRoute.study_id == st.id).order_by(StudyRoute.route)).all()
                out.append(dict(series_uid=s.series_uid, study_uid=st.study_uid, modality=s.modality,
                                description=s.description, calling_aet=s.calling_aet,
                                caller_address=s.caller_address, status=s.status,
                                last_received_at=s.last_received_at, routes=json.loads(s.routes or "{}"),
                                study_routes=[dict(route=r, state=state, reason=reason)
                                              for r, state, reason in study_routes]))
        return out

    def notifications_report(self, limit: int = 50) -> list[dict[str, Any]]:
        stmt = select(Notification).order_by(Notification.id.desc()).limit(limit)
        with Session(self.engine) as conn:
            return [dict(id=n.id, job_id=n.job_id, study_uid=n.study_uid, subject=n.subject,
                         priority=n.priority, status=n.status, attempts=n.attempts, error=n.error,
                         created_at=n.created_at, finished_at=n.finished_at, payload=json.loads(n.payload))
                    for (n,) in conn.execute(stmt).all()]

    def worklist(self, limit: int = 50) -> list[dict[str, Any]]:
        """Studies with results, most urgent first, then longest waiting; their findings per job."""
        rank = func.min(Job.priority).label("rank")
        studies = (select(Study.id, Study.study_uid, Study.accession, Study.patient_id, Study.received_at, rank)
                   .join(Series, Series.study_id == Study.id).join(Job, Job.series_id == Series.id)
                   .where(Job.status == JobStatus.DONE.value).group_by(Study.id)
                   .order_by(rank, Study.received_at, Study.id).limit(limit))
        out = []
        with Session(self.engine) as conn:
            for study in conn.execute(studies).all():
                jobs = conn.execute(
                    select(Job, Series.series_uid, Series.modality, Series.description)
                    .join(Series, Job.series_id == Series.id)
                    .where(Series.study_id == study.id, Job.status == JobStatus.DONE.value)
                    .order_by(Job.priority, Job.id)).all()
                notes = conn.execute(select(Notification.status, func.count()).where(
                    Notification.study_uid == study.study_uid).group_by(Notification.status)).all()
                out.append(dict(
                    study_uid=study.study_uid, accession=study.accession, patient_id=study.patient_id,
                    received_at=study.received_at, priority=study.rank,
                    notifications={status: n for status, n in notes},
                    jobs=[dict(id=j.id, model=j.model, priority=j.priority, series_uid=uid, modality=modality,
                               description=description, finished_at=j.finished_at,
                               summary=json.loads(j.summary or "{}"))
                          for j, uid, modality, description in jobs]))
        return out

    def audit_report(self, limit: int = 100, action: str | None = None) -> list[dict[str, Any]]:
        stmt = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit)
        if action:
            stmt = stmt.where(AuditEvent.action == action)
        with Session(self.engine) as session:
            return [dict(at=e.at, actor=e.actor, action=e.action, subject=e.subject,
                         detail=json.loads(e.detail or "{}")) for (e,) in session.execute(stmt).all()]

