"""What the node holds, as DICOMweb searches it (QIDO-RS) and retrieves it (WADO-RS): received
studies, series and instances, and the results the node made (part of
:class:`node.storage.db.Database`).

A result is the current output of a finished job (a job re-run after late instances replaces
its files and its UIDs): its series and instances sit in the study of the series it was made
from, as they do in the PACS that received them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import and_, func, select, true
from sqlalchemy.engine import Engine

from node.storage.schema import Instance, Job, JobStatus, Series, Study
from node.storage.paths import DataPaths


@dataclass
class StudyEntry:
    study_uid: str
    patient_id: str
    patient_name: str
    study_date: str
    accession: str
    description: str
    modalities: set[str] = field(default_factory=set)
    series: int = 0
    instances: int = 0


@dataclass(frozen=True)
class SeriesEntry:
    study_uid: str
    series_uid: str
    modality: str
    description: str
    instances: int


@dataclass(frozen=True)
class InstanceEntry:
    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    transfer_syntax: str
    path: str
    modality: str = ""


@dataclass(frozen=True)
class StudyQuery:
    """QIDO-RS study matching: exact values, ``*``/``?`` wildcards in names and IDs, a date or
    ``from-to`` date range (either end may be open)."""

    study_uids: tuple[str, ...] = ()
    patient_id: str = ""
    patient_name: str = ""
    accession: str = ""
    date_from: str = ""
    date_to: str = ""
    modality: str = ""


def _match(column: Any, pattern: str) -> Any:
    if "*" not in pattern and "?" not in pattern:
        return column == pattern
    escaped = pattern.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return column.like(escaped.replace("*", "%").replace("?", "_"), escape="\\")


class CatalogueQueries(DataPaths):
    engine: Engine

    def find_studies(self, q: StudyQuery, limit: int, offset: int) -> list[StudyEntry]:
        stmt = select(Study.id, Study.study_uid, Study.patient_id, Study.patient_name, Study.study_date,
                      Study.accession, Study.description)
        if q.study_uids:
            stmt = stmt.where(Study.study_uid.in_(q.study_uids))
        for column, pattern in ((Study.patient_id, q.patient_id), (Study.patient_name, q.patient_name),
                                (Study.accession, q.accession)):
            if pattern:
                stmt = stmt.where(_match(column, pattern))
        if q.date_from:
            stmt = stmt.where(Study.study_date >= q.date_from)
        if q.date_to:
            stmt = stmt.where(Study.study_date <= q.date_to)
        if q.modality:
            stmt = stmt.where(select(Series.id).where(Series.study_id == Study.id,
                                                      Series.modality == q.modality).exists())
        stmt = stmt.order_by(Study.received_at.desc(), Study.id.desc()).limit(limit).offset(offset)
        with self.engine.connect() as conn:
            rows = conn.execute(stmt).all()
            entries = {r.id: StudyEntry(r.study_uid, r.patient_id, r.patient_name, r.study_date, r.accession,
                                        r.description) for r in rows}
            if not entries:
                return []
            counts = conn.execute(
                select(Series.study_id, Series.modality, func.count(func.distinct(Series.id)), func.count(Instance.id))
                .join(Instance, Instance.series_id == Series.id).where(Series.study_id.in_(entries))
                .group_by(Series.study_id, Series.modality)).all()
            for study_id, modality, n_series, n_instances in counts:
                entry = entries[study_id]
                entry.series += n_series
                entry.instances += n_instances
                if modality:
                    entry.modalities.add(modality)
            result_series: dict[int, set[str]] = {}
            for study_id, result in self._results(conn, Series.study_id.in_(entries)):
                entry = entries[study_id]
                entry.instances += 1
                entry.modalities.add(result.modality)
                result_series.setdefault(study_id, set()).add(result.series_uid)
            for study_id, uids in result_series.items():
                entries[study_id].series += len(uids)
        return list(entries.values())

    def find_series(self, study_uid: str | None, series_uids: tuple[str, ...] = (), modality: str = "",
                    limit: int = 100, offset: int = 0) -> list[SeriesEntry]:
        stmt = (select(Study.study_uid, Series.series_uid, Series.modality, Series.description,
                       func.count(Instance.id))
                .join(Study, Series.study_id == Study.id).join(Instance, Instance.series_id == Series.id)
                .group_by(Study.study_uid, Series.series_uid, Series.modality, Series.description, Series.id)
                .order_by(Series.id))
        where = []
        if study_uid:
            where.append(Study.study_uid == study_uid)
        if series_uids:
            where.append(Series.series_uid.in_(series_uids))
        if modality:
            where.append(Series.modality == modality)
        with self.engine.connect() as conn:
            # at most offset + limit of each kind are read: a search of every study stays bounded
            out = [SeriesEntry(*row) for row in conn.execute(stmt.where(*where).limit(offset + limit)).all()]
            results: dict[str, list[InstanceEntry]] = {}
            study_filter = Study.study_uid == study_uid if study_uid else true()
            for _, r in self._results(conn, study_filter, jobs=None if study_uid else offset + limit):
                if (not series_uids or r.series_uid in series_uids) and (not modality or r.modality == modality):
                    results.setdefault(r.series_uid, []).append(r)
        out += [SeriesEntry(rs[0].study_uid, uid, rs[0].modality, "", len(rs)) for uid, rs in results.items()]
        return out[offset:offset + limit]

    def find_instances(self, study_uid: str, series_uid: str | None = None, sop_uid: str | None = None,
                       limit: int | None = None, offset: int = 0) -> list[InstanceEntry]:
        """The instances of a study (of one series, or the one instance), results included."""
        where = [Study.study_uid == study_uid]
        if series_uid:
            where.append(Series.series_uid == series_uid)
        if sop_uid:
            where.append(Instance.sop_instance_uid == sop_uid)
        stmt = (select(Study.study_uid, Series.series_uid, Instance.sop_instance_uid, Instance.sop_class_uid,
                       Instance.transfer_syntax, Instance.path, Series.modality)
                .join(Series, Instance.series_id == Series.id).join(Study, Series.study_id == Study.id)
                .where(*where).order_by(Series.id, Instance.id))
        with self.engine.connect() as conn:
            out = [InstanceEntry(*row[:5], self.from_db(row[5]), row[6]) for row in conn.execute(stmt).all()]
            out += [r for _, r in self._results(conn, Study.study_uid == study_uid)
                    if (not series_uid or r.series_uid == series_uid) and (not sop_uid or r.sop_uid == sop_uid)]
        end = None if limit is None else offset + limit
        return out[offset:end]

    def _results(self, conn: Any, where: Any, jobs: int | None = None) -> list[tuple[int, InstanceEntry]]:
        """(study id, result instance) of the finished jobs matching ``where`` (the first
        ``jobs`` of them, when given)."""
        stmt = (select(Series.study_id, Study.study_uid, Job.summary, Job.result_files)
                .join(Series, Job.series_id == Series.id).join(Study, Series.study_id == Study.id)
                .where(and_(Job.status == JobStatus.DONE.value, where)).order_by(Job.id))
        out = []
        for study_id, study_uid, summary, files in conn.execute(stmt if jobs is None else stmt.limit(jobs)).all():
            for result, path in zip(json.loads(summary or "{}").get("results", []), json.loads(files or "[]")):
                out.append((study_id, InstanceEntry(
                    study_uid, result["series_instance_uid"], result["sop_instance_uid"], result["sop_class_uid"],
                    result.get("transfer_syntax", "1.2.840.10008.1.2.1"), self.from_db(path),
                    result.get("modality", ""))))
        return out
