"""Completion by evidence: MPPS records and the evidence they, or a released association,
give a series (part of :class:`node.storage.db.Database`)."""

from __future__ import annotations

import json
import time
from typing import Any, Iterable, Mapping, Sequence

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from node.storage.schema import Instance, Mpps, Series, SeriesStatus

#: Terminal MPPS states (PS3.3 C.4.14): nothing may change them any more.
FINAL = ("COMPLETED", "DISCONTINUED")


class EvidenceQueries:
    """MPPS rows, and a series' evidence of completion."""

    engine: Any
    _insert: Any

    def create_mpps(self, uid: str, status: str, calling_aet: str, study_uid: str,
                    references: Mapping[str, Sequence[str]]) -> bool:
        """Record an N-CREATE; False when an MPPS of that UID exists already."""
        now = time.time()
        with self.engine.begin() as conn:
            done = conn.execute(self._insert(Mpps).values(
                sop_instance_uid=uid, status=status, calling_aet=calling_aet, study_uid=study_uid,
                references=json.dumps({k: list(v) for k, v in references.items()}), created_at=now,
                updated_at=now).on_conflict_do_nothing()).rowcount
        return bool(done)

    def set_mpps(self, uid: str, status: str | None, references: Mapping[str, Sequence[str]] | None) -> str | None:
        """Apply an N-SET; returns the status before (None: no such MPPS). A final MPPS is
        left as it is (the caller refuses the N-SET)."""
        with self.engine.begin() as conn:
            row = conn.execute(select(Mpps.status).where(Mpps.sop_instance_uid == uid)).first()
            if row is None or row.status in FINAL:
                return None if row is None else row.status
            values: dict[str, Any] = {"updated_at": time.time()}
            if status:
                values["status"] = status
            if references is not None:
                values["references"] = json.dumps({k: list(v) for k, v in references.items()})
            conn.execute(update(Mpps).where(Mpps.sop_instance_uid == uid).values(**values))
        return row.status

    def mpps_to_decide(self) -> list[dict[str, Any]]:
        """Final MPPS whose series have not all been given their evidence yet."""
        with Session(self.engine) as session:
            rows = session.execute(select(Mpps).where(Mpps.status.in_(FINAL), Mpps.decided == 0)
                                   .order_by(Mpps.id)).scalars().all()
            return [dict(id=m.id, uid=m.sop_instance_uid, status=m.status, calling_aet=m.calling_aet,
                         references=json.loads(m.references or "{}"), waiting=m.waiting,
                         updated_at=m.updated_at) for m in rows]

    def mpps_decided(self, mpps_id: int, decided: bool, waiting: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(Mpps).where(Mpps.id == mpps_id).values(decided=int(decided), waiting=waiting))

    def instances_present(self, sop_uids: Iterable[str]) -> set[str]:
        """Which of these SOP Instance UIDs the node holds."""
        uids = list(sop_uids)
        found: set[str] = set()
        with self.engine.connect() as conn:
            for k in range(0, len(uids), 500):
                found.update(conn.execute(select(Instance.sop_instance_uid).where(
                    Instance.sop_instance_uid.in_(uids[k:k + 500]))).scalars())
        return found

    def series_last_received(self, series_uids: Iterable[str]) -> float | None:
        """When the newest instance of these series arrived (None: none has)."""
        uids = list(series_uids)
        with self.engine.connect() as conn:
            return conn.execute(select(func.max(Series.last_received_at)).where(
                Series.series_uid.in_(uids))).scalar()

    def set_evidence(self, series_uids: Iterable[str], evidence: str, at: float) -> int:
        """Series still receiving are complete at ``at`` by ``evidence`` (unless an instance
        arrives later); returns how many series were marked."""
        uids = list(series_uids)
        if not uids:
            return 0
        with self.engine.begin() as conn:
            return conn.execute(update(Series).where(Series.series_uid.in_(uids),
                                                     Series.status == SeriesStatus.RECEIVING.value)
                                .values(evidence=evidence, evidence_at=at)).rowcount

    def mpps_report(self, limit: int = 50) -> list[dict[str, Any]]:
        with Session(self.engine) as session:
            rows = session.execute(select(Mpps).order_by(Mpps.id.desc()).limit(limit)).scalars().all()
            return [dict(uid=m.sop_instance_uid, status=m.status, calling_aet=m.calling_aet, study_uid=m.study_uid,
                         series={k: len(v) for k, v in json.loads(m.references or "{}").items()},
                         created_at=m.created_at, updated_at=m.updated_at, decided=bool(m.decided),
                         waiting=m.waiting) for m in rows]
