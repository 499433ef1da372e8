"""The database: every table and every query of the node, and nothing of the stages.

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

Work is claimed by an ``UPDATE ... WHERE id = (SELECT ...) RETURNING`` so two workers never
take the same row. ``requeue_stalled`` gives back what a dead worker held.
"""

from __future__ import annotations

import enum
import json
import time
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from sqlalchemy import (Float, ForeignKey, Integer, String, Text, UniqueConstraint, create_engine,
                        event, func, select, text, update)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column


class SeriesStatus(str, enum.Enum):
    RECEIVING = "receiving"
    ASSEMBLED = "assembled"
    PURGED = "purged"          # files removed by retention; the rows stay


class JobStatus(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class DeliveryStatus(str, enum.Enum):
    PENDING = "pending"
    SENDING = "sending"
    DONE = "done"
    FAILED = "failed"


class Base(DeclarativeBase):
    pass


class Study(Base):
    __tablename__ = "studies"
    id: Mapped[int] = mapped_column(primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(64), unique=True)
    patient_id: Mapped[str] = mapped_column(String(64), default="")
    accession: Mapped[str] = mapped_column(String(16), default="")
    received_at: Mapped[float] = mapped_column(Float)


class Series(Base):
    __tablename__ = "series"
    id: Mapped[int] = mapped_column(primary_key=True)
    series_uid: Mapped[str] = mapped_column(String(64), unique=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"))
    modality: Mapped[str] = mapped_column(String(16), default="")
    description: Mapped[str] = mapped_column(String(64), default="")
    calling_aet: Mapped[str] = mapped_column(String(16), default="")
    called_aet: Mapped[str] = mapped_column(String(16), default="")
    status: Mapped[str] = mapped_column(String(16), default=SeriesStatus.RECEIVING.value, index=True)
    first_received_at: Mapped[float] = mapped_column(Float)
    last_received_at: Mapped[float] = mapped_column(Float)
    routes: Mapped[str] = mapped_column(Text, default="")   # why routes matched or not, as JSON


class Instance(Base):
    __tablename__ = "instances"
    id: Mapped[int] = mapped_column(primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(Integer)
    received_at: Mapped[float] = mapped_column(Float)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (UniqueConstraint("series_id", "model"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    model: Mapped[str] = mapped_column(String(64))
    routes: Mapped[str] = mapped_column(Text)              # JSON list of route names
    destinations: Mapped[str] = mapped_column(Text)        # JSON list of destination names
    priority: Mapped[int] = mapped_column(Integer)         # 0 stat, 1 urgent, 2 routine
    status: Mapped[str] = mapped_column(String(16), index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[float] = mapped_column(Float)
    claimed_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    heartbeat_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    error: Mapped[str] = mapped_column(Text, default="")
    result_files: Mapped[str] = mapped_column(Text, default="[]")
    summary: Mapped[str] = mapped_column(Text, default="{}")   # volumes, findings, timings


class Delivery(Base):
    __tablename__ = "deliveries"
    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))          # "result" or "forward"
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"), nullable=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"))
    destination: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[float] = mapped_column(Float)
    created_at: Mapped[float] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    error: Mapped[str] = mapped_column(Text, default="")


class AuditEvent(Base):
    """Who did what, when: associations, results produced, deliveries, operator actions."""

    __tablename__ = "audit"
    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[float] = mapped_column(Float, index=True)
    actor: Mapped[str] = mapped_column(String(128))       # "CT1@10.0.0.5", "node", "operator:alice"
    action: Mapped[str] = mapped_column(String(32))       # received, result, delivered, retry, purged, ...
    subject: Mapped[str] = mapped_column(String(128))     # a study/series UID, job or delivery id
    detail: Mapped[str] = mapped_column(Text, default="{}")


@dataclass(frozen=True)
class InstanceRecord:
    """What ingest knows of one stored instance."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax: str
    path: str
    size: int
    modality: str = ""
    patient_id: str = ""
    accession: str = ""
    series_description: str = ""
    calling_aet: str = ""
    called_aet: str = ""


@dataclass(frozen=True)
class SeriesRow:
    id: int
    series_uid: str
    study_uid: str
    modality: str
    calling_aet: str
    called_aet: str
    status: str
    last_received_at: float


@dataclass(frozen=True)
class JobSpec:
    model: str
    routes: tuple[str, ...]
    destinations: tuple[str, ...]
    priority: int


@dataclass(frozen=True)
class JobRow:
    id: int
    series_id: int
    model: str
    destinations: tuple[str, ...]
    priority: int
    status: str
    attempts: int


@dataclass(frozen=True)
class DeliveryRow:
    id: int
    kind: str
    job_id: int | None
    series_id: int
    destination: str
    attempts: int


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


class Database:
    """The node's queue and catalogue over any SQLAlchemy URL (SQLite in WAL mode by default)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine: Engine = create_engine(url, future=True)
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        # Both dialects offer INSERT ... ON CONFLICT with the same API.
        self._insert = postgresql.insert if self.engine.dialect.name == "postgresql" else sqlite.insert
        self._series_ids: dict[str, int] = {}
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
    def record_instance(self, rec: InstanceRecord, now: float | None = None) -> None:
        """Commit an instance row (a duplicate SOP Instance UID replaces the old row)."""
        now = time.time() if now is None else now
        with self.engine.begin() as conn:
            study_id = self._study_ids.get(rec.study_uid)
            if study_id is None:
                conn.execute(self._insert(Study).values(
                    study_uid=rec.study_uid, patient_id=rec.patient_id, accession=rec.accession,
                    received_at=now).on_conflict_do_nothing())
                study_id = conn.execute(select(Study.id).where(Study.study_uid == rec.study_uid)).scalar_one()
            series_id = self._series_ids.get(rec.series_uid)
            if series_id is None:
                conn.execute(self._insert(Series).values(
                    series_uid=rec.series_uid, study_id=study_id, modality=rec.modality,
                    description=rec.series_description, calling_aet=rec.calling_aet,
                    called_aet=rec.called_aet, status=SeriesStatus.RECEIVING.value,
                    first_received_at=now, last_received_at=now).on_conflict_do_nothing())
                series_id = conn.execute(select(Series.id).where(Series.series_uid == rec.series_uid)).scalar_one()
            conn.execute(update(Series).where(Series.id == series_id).values(
                last_received_at=now, status=SeriesStatus.RECEIVING.value))
            values = dict(series_id=series_id, sop_class_uid=rec.sop_class_uid,
                          transfer_syntax=rec.transfer_syntax, path=rec.path, size=rec.size, received_at=now)
            conn.execute(self._insert(Instance).values(sop_instance_uid=rec.sop_instance_uid, **values)
                         .on_conflict_do_update(index_elements=["sop_instance_uid"], set_=values))
        # Cache ids only after the commit, so a rolled-back insert is never remembered.
        self._study_ids[rec.study_uid] = study_id
        self._series_ids[rec.series_uid] = series_id

    # -------------------------------------------------------------- assemble
    def quiet_series(self, quiet_since: float) -> list[SeriesRow]:
        """Series still receiving whose last instance arrived before ``quiet_since``."""
        stmt = (select(Series, Study.study_uid).join(Study, Series.study_id == Study.id)
                .where(Series.status == SeriesStatus.RECEIVING.value, Series.last_received_at < quiet_since)
                .order_by(Series.last_received_at))
        with Session(self.engine) as session:
            return [_series_row(s, uid) for s, uid in session.execute(stmt).all()]

    def series_paths(self, series_id: int) -> list[str]:
        with self.engine.connect() as conn:
            return list(conn.execute(select(Instance.path).where(Instance.series_id == series_id)
                                     .order_by(Instance.id)).scalars())

    def get_series(self, series_id: int) -> SeriesRow:
        with Session(self.engine) as session:
            s, uid = session.execute(select(Series, Study.study_uid).join(Study, Series.study_id == Study.id)
                                  .where(Series.id == series_id)).one()
            return _series_row(s, uid)

    def assemble(self, series_id: int, last_seen: float, jobs: Sequence[JobSpec],
                 forwards: Sequence[str], explanation: dict[str, Any]) -> bool:
        """Mark a quiet series assembled and queue its jobs and forwards, in one transaction.

        Returns False (and changes nothing) if an instance arrived since ``last_seen``.
        An existing job for the same (series, model) is queued again: its input changed.
        """
        now = time.time()
        with self.engine.begin() as conn:
            changed = conn.execute(update(Series).where(
                Series.id == series_id, Series.status == SeriesStatus.RECEIVING.value,
                Series.last_received_at == last_seen).values(
                status=SeriesStatus.ASSEMBLED.value, routes=json.dumps(explanation))).rowcount
            if not changed:
                return False
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
                    next_attempt_at=now, created_at=now))
        return True

    # ------------------------------------------------------------------ jobs
    def claim_job(self, now: float | None = None) -> JobRow | None:
        """Take the most urgent, then oldest, queued job by setting it running."""
        now = time.time() if now is None else now
        pick = (select(Job.id).where(Job.status == JobStatus.QUEUED.value)
                .order_by(Job.priority, Job.created_at, Job.id).limit(1)
                .with_for_update(skip_locked=True).scalar_subquery())   # PostgreSQL; SQLite ignores it
        stmt = (update(Job).where(Job.id == pick, Job.status == JobStatus.QUEUED.value)
                .values(status=JobStatus.RUNNING.value, claimed_at=now, heartbeat_at=now,
                        attempts=Job.attempts + 1)
                .returning(Job.id, Job.series_id, Job.model, Job.destinations, Job.priority, Job.status,
                           Job.attempts))
        with self.engine.begin() as conn:
            row = conn.execute(stmt).first()
        if row is None:
            return None
        return JobRow(id=row.id, series_id=row.series_id, model=row.model,
                      destinations=tuple(json.loads(row.destinations)), priority=row.priority,
                      status=row.status, attempts=row.attempts)

    def heartbeat(self, job_id: int) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=time.time()))

    def finish_job(self, job_id: int, result_files: Sequence[str], summary: dict[str, Any],
                   destinations: Iterable[str]) -> None:
        """Record a job's results and queue one delivery per destination, atomically."""
        now = time.time()
        with self.engine.begin() as conn:
            series_id = conn.execute(update(Job).where(Job.id == job_id).values(
                status=JobStatus.DONE.value, finished_at=now, error="",
                result_files=json.dumps(list(result_files)), summary=json.dumps(summary))
                .returning(Job.series_id)).scalar_one()
            for dest in destinations:
                conn.execute(self._insert(Delivery).values(
                    kind="result", job_id=job_id, series_id=series_id, destination=dest,
                    status=DeliveryStatus.PENDING.value, next_attempt_at=now, created_at=now))

    def fail_job(self, job_id: int, error: str, retry: bool = False) -> None:
        status = JobStatus.QUEUED if retry else JobStatus.FAILED
        with self.engine.begin() as conn:
            conn.execute(update(Job).where(Job.id == job_id).values(
                status=status.value, error=error[:2000], finished_at=None if retry else time.time()))

    def requeue_stalled(self, heartbeat_before: float | None = None) -> int:
        """Give back work whose worker stopped; returns how many rows.

        ``None`` gives back everything in flight: what a node does at start, when it is the
        only node on this database. Otherwise running jobs whose heartbeat is older than
        ``heartbeat_before`` and sending deliveries whose lease has expired are given back.
        """
        jobs = update(Job).where(Job.status == JobStatus.RUNNING.value)
        deliveries = update(Delivery).where(Delivery.status == DeliveryStatus.SENDING.value)
        if heartbeat_before is not None:
            jobs = jobs.where(Job.heartbeat_at < heartbeat_before)
            deliveries = deliveries.where(Delivery.next_attempt_at < time.time())
        with self.engine.begin() as conn:
            n = conn.execute(jobs.values(status=JobStatus.QUEUED.value)).rowcount
            n += conn.execute(deliveries.values(status=DeliveryStatus.PENDING.value,
                                                next_attempt_at=time.time())).rowcount
        return n

    def job_results(self, job_id: int) -> list[str]:
        with self.engine.connect() as conn:
            return json.loads(conn.execute(select(Job.result_files).where(Job.id == job_id)).scalar_one())

    # ------------------------------------------------------------ deliveries
    def claim_delivery(self, now: float | None = None, lease_s: float = 600.0) -> DeliveryRow | None:
        """Take the oldest due delivery; ``next_attempt_at`` becomes its lease deadline."""
        now = time.time() if now is None else now
        pick = (select(Delivery.id).where(Delivery.status == DeliveryStatus.PENDING.value,
                                          Delivery.next_attempt_at <= now)
                .order_by(Delivery.next_attempt_at, Delivery.id).limit(1)
                .with_for_update(skip_locked=True).scalar_subquery())
        stmt = (update(Delivery).where(Delivery.id == pick, Delivery.status == DeliveryStatus.PENDING.value)
                .values(status=DeliveryStatus.SENDING.value, attempts=Delivery.attempts + 1,
                        next_attempt_at=now + lease_s)
                .returning(Delivery.id, Delivery.kind, Delivery.job_id, Delivery.series_id,
                           Delivery.destination, Delivery.attempts))
        with self.engine.begin() as conn:
            row = conn.execute(stmt).first()
        return None if row is None else DeliveryRow(*row)

    def finish_delivery(self, delivery_id: int) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(Delivery).where(Delivery.id == delivery_id).values(
                status=DeliveryStatus.DONE.value, finished_at=time.time(), error=""))

    def defer_delivery(self, delivery_id: int, error: str, next_attempt_at: float | None) -> None:
        """Record a failed attempt: retry at ``next_attempt_at``, or give up when it is None."""
        values: dict[str, Any] = {"error": error[:2000]}
        if next_attempt_at is None:
            values.update(status=DeliveryStatus.FAILED.value, finished_at=time.time())
        else:
            values.update(status=DeliveryStatus.PENDING.value, next_attempt_at=next_attempt_at)
        with self.engine.begin() as conn:
            conn.execute(update(Delivery).where(Delivery.id == delivery_id).values(**values))

    def hold_destination(self, destination: str, until: float) -> int:
        """Push every pending delivery to ``destination`` to ``until`` at the earliest.

        After a failed attempt the destination is presumed down until its next retry, so
        its other deliveries wait too instead of each hammering it (no retry storms).
        Attempts are not counted for them. Returns how many were held.
        """
        with self.engine.begin() as conn:
            return conn.execute(update(Delivery).where(
                Delivery.destination == destination, Delivery.status == DeliveryStatus.PENDING.value,
                Delivery.next_attempt_at < until).values(next_attempt_at=until)).rowcount

    def next_delivery_due(self) -> float | None:
        with self.engine.connect() as conn:
            return conn.execute(select(func.min(Delivery.next_attempt_at))
                                .where(Delivery.status == DeliveryStatus.PENDING.value)).scalar()

    # -------------------------------------------------------------- operator
    def retry(self, job_id: int) -> str:
        """Operator retry of a job: failed -> queued; done -> its failed deliveries pending.

        Returns a sentence saying what was done.
        """
        now = time.time()
        with self.engine.begin() as conn:
            status = conn.execute(select(Job.status).where(Job.id == job_id)).scalar()
            if status is None:
                return f"no job {job_id}"
            if status == JobStatus.FAILED.value:
                conn.execute(update(Job).where(Job.id == job_id).values(
                    status=JobStatus.QUEUED.value, error="", attempts=0, finished_at=None))
                return f"job {job_id} queued again"
            if status == JobStatus.DONE.value:
                n = conn.execute(update(Delivery).where(
                    Delivery.job_id == job_id, Delivery.status.in_(
                        [DeliveryStatus.FAILED.value, DeliveryStatus.DONE.value]))
                    .values(status=DeliveryStatus.PENDING.value, attempts=0, next_attempt_at=now,
                            error="")).rowcount
                return f"job {job_id}: {n} deliveries queued again"
            return f"job {job_id} is {status}; nothing to retry"

    def retry_delivery(self, delivery_id: int) -> bool:
        with self.engine.begin() as conn:
            return bool(conn.execute(update(Delivery).where(
                Delivery.id == delivery_id, Delivery.status == DeliveryStatus.FAILED.value)
                .values(status=DeliveryStatus.PENDING.value, attempts=0, next_attempt_at=time.time(),
                        error="")).rowcount)

    # ------------------------------------------------------------- reporting
    def counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        with self.engine.connect() as conn:
            for name, model in (("series", Series), ("jobs", Job), ("deliveries", Delivery)):
                rows = conn.execute(select(model.status, func.count()).group_by(model.status)).all()
                out[name] = {status: n for status, n in rows}
            out["instances"] = {"stored": conn.execute(select(func.count()).select_from(Instance)).scalar_one()}
        return out

    def jobs_report(self, limit: int = 50) -> list[dict[str, Any]]:
        stmt = (select(Job, Series.series_uid, Series.modality, Series.description, Study.study_uid,
                       Study.accession)
                .join(Series, Job.series_id == Series.id).join(Study, Series.study_id == Study.id)
                .order_by(Job.id.desc()).limit(limit))
        with Session(self.engine) as conn:
            rows = conn.execute(stmt).all()
            out = []
            for job, series_uid, modality, description, study_uid, accession in rows:
                deliveries = conn.execute(select(Delivery.id, Delivery.destination, Delivery.status,
                                                 Delivery.attempts, Delivery.error)
                                          .where(Delivery.job_id == job.id)).all()
                out.append(dict(
                    id=job.id, model=job.model, status=job.status, priority=job.priority,
                    attempts=job.attempts, error=job.error, series_uid=series_uid, modality=modality,
                    description=description, study_uid=study_uid, accession=accession,
                    created_at=job.created_at, finished_at=job.finished_at,
                    summary=json.loads(job.summary or "{}"),
                    deliveries=[dict(id=d.id, destination=d.destination, status=d.status,
                                     attempts=d.attempts, error=d.error) for d in deliveries]))
        return out

    def deliveries_report(self, status: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        stmt = select(Delivery).order_by(Delivery.id.desc()).limit(limit)
        if status:
            stmt = stmt.where(Delivery.status == status)
        with Session(self.engine) as conn:
            return [dict(id=d.id, kind=d.kind, job_id=d.job_id, series_id=d.series_id,
                         destination=d.destination, status=d.status, attempts=d.attempts,
                         error=d.error) for (d,) in conn.execute(stmt).all()]

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
        stmt = (select(Series.id).where(Series.status == SeriesStatus.ASSEMBLED.value, ~open_jobs,
                                        ~open_deliveries, finished < finished_before)
                .order_by(Series.id).limit(100))
        with self.engine.connect() as conn:
            return list(conn.execute(stmt).scalars())

    def series_results(self, series_id: int) -> list[str]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(Job.result_files).where(Job.series_id == series_id)).scalars()
            return [path for row in rows for path in json.loads(row or "[]")]

    def mark_purged(self, series_id: int) -> bool:
        """Assembled -> purged, unless an instance arrived meanwhile (then it is receiving)."""
        with self.engine.begin() as conn:
            return bool(conn.execute(update(Series).where(
                Series.id == series_id, Series.status == SeriesStatus.ASSEMBLED.value)
                .values(status=SeriesStatus.PURGED.value)).rowcount)

    # ----------------------------------------------------------------- audit
    def audit(self, actor: str, action: str, subject: str, **detail: Any) -> None:
        with self.engine.begin() as conn:
            conn.execute(self._insert(AuditEvent).values(
                at=time.time(), actor=actor[:128], action=action[:32], subject=subject[:128],
                detail=json.dumps(detail, default=str)))

    def audit_report(self, limit: int = 100, action: str | None = None) -> list[dict[str, Any]]:
        stmt = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit)
        if action:
            stmt = stmt.where(AuditEvent.action == action)
        with Session(self.engine) as session:
            return [dict(at=e.at, actor=e.actor, action=e.action, subject=e.subject,
                         detail=json.loads(e.detail or "{}")) for (e,) in session.execute(stmt).all()]

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))


def _series_row(s: Series, study_uid: str) -> SeriesRow:
    return SeriesRow(id=s.id, series_uid=s.series_uid, study_uid=study_uid, modality=s.modality,
                     calling_aet=s.calling_aet, called_aet=s.called_aet, status=s.status,
                     last_received_at=s.last_received_at)
