"""The queue's claims and state changes: jobs, deliveries and notifications (part of
:class:`node.storage.db.Database`; the states are drawn in :mod:`node.storage.db`).

A claim changes one row's status in one ``UPDATE ... WHERE id = (SELECT ...) RETURNING``
statement (``FOR UPDATE SKIP LOCKED`` on PostgreSQL), so two workers never take the same row;
each claim stamps a heartbeat that :meth:`QueueQueries.requeue_stalled` reads.
"""

from __future__ import annotations

import json
import time
from typing import Any, Iterable, Sequence

from sqlalchemy import and_, func, select, update
from sqlalchemy.engine import Connection

from node.storage.schema import (Delivery, DeliveryRow, DeliveryStatus, Job, JobRow, JobStatus, Notification,
                                 NotificationRow, NotificationSpec, NotificationStatus, Series, SeriesStatus,
                                 Study)
from node.storage.paths import DataPaths


class QueueQueries(DataPaths):
    """Claims, heartbeats, finishing, deferring and retrying queued work."""

    engine: Any

    def claim_job(self, now: float | None = None, models: Sequence[str] | None = None,
                  worker: str = "") -> JobRow | None:
        """Take the most urgent, then oldest, queued job by setting it running; only of
        ``models`` when given (a worker claims only what it has loaded)."""
        now = time.time() if now is None else now
        queued = Job.status == JobStatus.QUEUED.value
        pick = (select(Job.id).where(queued if models is None else and_(queued, Job.model.in_(list(models))))
                .order_by(Job.priority, Job.created_at, Job.id).limit(1)
                .with_for_update(skip_locked=True).scalar_subquery())   # PostgreSQL; SQLite ignores it
        stmt = (update(Job).where(Job.id == pick, Job.status == JobStatus.QUEUED.value)
                .values(status=JobStatus.RUNNING.value, claimed_at=now, heartbeat_at=now, worker=worker[:64],
                        attempts=Job.attempts + 1)
                .returning(Job.id, Job.series_id, Job.model, Job.destinations, Job.priority, Job.status,
                           Job.attempts, Job.routes))
        with self.engine.begin() as conn:
            row = conn.execute(stmt).first()
        if row is None:
            return None
        return JobRow(id=row.id, series_id=row.series_id, model=row.model,
                      destinations=tuple(json.loads(row.destinations)), priority=row.priority,
                      status=row.status, attempts=row.attempts, routes=tuple(json.loads(row.routes)))

    def heartbeat(self, job_id: int) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=time.time()))

    def finish_job(self, job_id: int, result_files: Sequence[str], summary: dict[str, Any],
                   destinations: Iterable[str], *, priority: int | None = None,
                   forwards: Iterable[str] = (), notifications: Iterable[NotificationSpec] = (),
                   webhook: bool = False) -> None:
        """Record a job's results and queue its deliveries and notifications, atomically.

        Results go to ``destinations`` and to the job's own (which a study-level route may have
        added while it ran); ``priority`` raises the job's (never lowers it) and orders its
        deliveries; ``forwards`` send the original study (each of its series) to more
        destinations. Notifications
        are pending for the webhook, or only ``logged`` when there is none; a job re-run after
        a late instance does not notify the same subject twice.
        """
        now = time.time()
        with self.engine.begin() as conn:
            row = conn.execute(select(Job.series_id, Job.priority, Job.destinations).where(Job.id == job_id)).one()
            rank = row.priority if priority is None else min(row.priority, priority)
            conn.execute(update(Job).where(Job.id == job_id).values(
                status=JobStatus.DONE.value, finished_at=now, error="", priority=rank,
                result_files=json.dumps([self.to_db(f) for f in result_files]), summary=json.dumps(summary)))
            targets = list(dict.fromkeys([*json.loads(row.destinations), *destinations]))
            for dest in targets:
                conn.execute(self._insert(Delivery).values(
                    kind="result", job_id=job_id, series_id=row.series_id, destination=dest, priority=rank,
                    status=DeliveryStatus.PENDING.value, next_attempt_at=now, created_at=now))
            if forwards:
                study_series = conn.execute(select(Series.id).where(
                    Series.study_id == select(Series.study_id).where(Series.id == row.series_id).scalar_subquery(),
                    Series.status != SeriesStatus.PURGED.value).order_by(Series.id)).scalars().all()
                for dest in dict.fromkeys(forwards):
                    for series_id in study_series:
                        self._forward_once(conn, series_id, dest, rank, now)
            status = NotificationStatus.PENDING if webhook else NotificationStatus.LOGGED
            study_uid = conn.execute(select(Study.study_uid).join(Series, Series.study_id == Study.id)
                                     .where(Series.id == row.series_id)).scalar_one()
            for note in notifications:
                conn.execute(self._insert(Notification).values(
                    job_id=job_id, study_uid=study_uid, subject=note.subject[:128], priority=note.priority,
                    payload=json.dumps(note.payload), status=status.value, next_attempt_at=now,
                    created_at=now, finished_at=None if webhook else now).on_conflict_do_nothing())

    def _forward_once(self, conn: Connection, series_id: int, dest: str, priority: int, now: float) -> None:
        """Queue a forward of the series unless one is already queued or done since it last changed."""
        last = conn.execute(select(Series.last_received_at).where(Series.id == series_id)).scalar_one()
        exists = conn.execute(select(Delivery.id).where(
            Delivery.kind == "forward", Delivery.series_id == series_id, Delivery.destination == dest,
            Delivery.created_at >= last, Delivery.status != DeliveryStatus.FAILED.value).limit(1)).first()
        if exists is None:
            conn.execute(self._insert(Delivery).values(
                kind="forward", series_id=series_id, destination=dest, status=DeliveryStatus.PENDING.value,
                priority=priority, next_attempt_at=now, created_at=now))

    def delivery_files(self, delivery: DeliveryRow) -> list[str]:
        """What a delivery sends: its own files, or its job's results, or its series."""
        if delivery.files:
            return [self.from_db(f) for f in json.loads(delivery.files)]
        if delivery.job_id is not None:
            return self.job_results(delivery.job_id)
        return self.series_paths(delivery.series_id)    # type: ignore[attr-defined]

    def result_destinations(self, job_id: int) -> list[str]:
        """The destinations a job's results were delivered to (by any run of it)."""
        with self.engine.connect() as conn:
            return list(conn.execute(select(Delivery.destination).where(
                Delivery.job_id == job_id, Delivery.kind == "result",
                Delivery.status == DeliveryStatus.DONE.value).distinct().order_by(Delivery.destination)).scalars())

    def queue_files(self, job_id: int, kind: str, files: Sequence[str], destinations: Iterable[str],
                    priority: int) -> None:
        """Queue a delivery of ``files`` (a rejection note, say) to each destination."""
        now = time.time()
        with self.engine.begin() as conn:
            series_id = conn.execute(select(Job.series_id).where(Job.id == job_id)).scalar_one()
            for dest in dict.fromkeys(destinations):
                conn.execute(self._insert(Delivery).values(
                    kind=kind, job_id=job_id, series_id=series_id, destination=dest, priority=priority,
                    status=DeliveryStatus.PENDING.value, next_attempt_at=now, created_at=now,
                    files=json.dumps([self.to_db(f) for f in files])))

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
        notes = update(Notification).where(Notification.status == NotificationStatus.SENDING.value)
        if heartbeat_before is not None:
            jobs = jobs.where(Job.heartbeat_at < heartbeat_before)
            deliveries = deliveries.where(Delivery.next_attempt_at < time.time())
            notes = notes.where(Notification.next_attempt_at < time.time())
        with self.engine.begin() as conn:
            n = conn.execute(jobs.values(status=JobStatus.QUEUED.value)).rowcount
            n += conn.execute(deliveries.values(status=DeliveryStatus.PENDING.value,
                                                next_attempt_at=time.time())).rowcount
            n += conn.execute(notes.values(status=NotificationStatus.PENDING.value,
                                           next_attempt_at=time.time())).rowcount
        return n

    def job_results(self, job_id: int) -> list[str]:
        with self.engine.connect() as conn:
            files = json.loads(conn.execute(select(Job.result_files).where(Job.id == job_id)).scalar_one())
        return [self.from_db(f) for f in files]

    # ------------------------------------------------------------ deliveries
    def claim_delivery(self, now: float | None = None, lease_s: float = 600.0) -> DeliveryRow | None:
        """Take the most urgent, then longest due, delivery; ``next_attempt_at`` becomes its lease deadline."""
        now = time.time() if now is None else now
        row = self._claim_due(Delivery, now, lease_s, (
            Delivery.id, Delivery.kind, Delivery.job_id, Delivery.series_id, Delivery.destination,
            Delivery.attempts, Delivery.priority, Delivery.files))
        return None if row is None else DeliveryRow(*row)

    def finish_delivery(self, delivery_id: int) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(Delivery).where(Delivery.id == delivery_id).values(
                status=DeliveryStatus.DONE.value, finished_at=time.time(), error=""))

    def defer_delivery(self, delivery_id: int, error: str, next_attempt_at: float | None) -> None:
        """Record a failed attempt: retry at ``next_attempt_at``, or give up when it is None."""
        self._defer_attempt(Delivery, delivery_id, error, next_attempt_at)

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
        return self._next_due(Delivery)

    # Deliveries and notifications share one lifecycle (pending -> sending -> done/sent, with
    # failed attempts back to pending at a later time, or failed): these three serve both.
    def _claim_due(self, table: type[Delivery] | type[Notification], now: float, lease_s: float,
                   returning: Sequence[Any]) -> Any:
        """Take the most urgent due row; its ``next_attempt_at`` becomes the lease deadline."""
        pick = (select(table.id).where(table.status == DeliveryStatus.PENDING.value, table.next_attempt_at <= now)
                .order_by(table.priority, table.next_attempt_at, table.id).limit(1)
                .with_for_update(skip_locked=True).scalar_subquery())   # PostgreSQL; SQLite ignores it
        stmt = (update(table).where(table.id == pick, table.status == DeliveryStatus.PENDING.value)
                .values(status=DeliveryStatus.SENDING.value, attempts=table.attempts + 1,
                        next_attempt_at=now + lease_s)
                .returning(*returning))
        with self.engine.begin() as conn:
            return conn.execute(stmt).first()

    def _defer_attempt(self, table: type[Delivery] | type[Notification], row_id: int, error: str,
                       next_attempt_at: float | None) -> None:
        values: dict[str, Any] = {"error": error[:2000]}
        if next_attempt_at is None:
            values.update(status=DeliveryStatus.FAILED.value, finished_at=time.time())
        else:
            values.update(status=DeliveryStatus.PENDING.value, next_attempt_at=next_attempt_at)
        with self.engine.begin() as conn:
            conn.execute(update(table).where(table.id == row_id).values(**values))

    def _next_due(self, table: type[Delivery] | type[Notification]) -> float | None:
        with self.engine.connect() as conn:
            return conn.execute(select(func.min(table.next_attempt_at))
                                .where(table.status == DeliveryStatus.PENDING.value)).scalar()

    # --------------------------------------------------------- notifications
    def claim_notification(self, now: float | None = None, lease_s: float = 300.0) -> NotificationRow | None:
        """Take the most urgent due notification; ``next_attempt_at`` becomes its lease deadline."""
        now = time.time() if now is None else now
        row = self._claim_due(Notification, now, lease_s, (
            Notification.id, Notification.job_id, Notification.subject, Notification.payload,
            Notification.attempts))
        return None if row is None else NotificationRow(*row)

    def finish_notification(self, notification_id: int) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(Notification).where(Notification.id == notification_id).values(
                status=NotificationStatus.SENT.value, finished_at=time.time(), error=""))

    def defer_notification(self, notification_id: int, error: str, next_attempt_at: float | None) -> None:
        """Record a failed attempt: retry at ``next_attempt_at``, or give up when it is None."""
        self._defer_attempt(Notification, notification_id, error, next_attempt_at)

    def next_notification_due(self) -> float | None:
        return self._next_due(Notification)

    def retry_notification(self, notification_id: int) -> bool:
        """Operator retry of a failed notification."""
        with self.engine.begin() as conn:
            return bool(conn.execute(update(Notification).where(
                Notification.id == notification_id, Notification.status == NotificationStatus.FAILED.value)
                .values(status=NotificationStatus.PENDING.value, attempts=0, next_attempt_at=time.time(),
                        error="", finished_at=None)).rowcount)

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

    # ------------------------------------------------------------- retention
