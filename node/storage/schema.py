"""The database schema: every table, state and row type of the node, and no queries.

:mod:`node.storage.db` owns every query over these tables. New tables and columns appear on a fresh
database through ``create_all`` (idempotent); there are no deployed databases to migrate yet.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

ROUTINE = 2   # priority rank: 0 stat, 1 urgent, 2 routine


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


class NotificationStatus(str, enum.Enum):
    PENDING = "pending"
    SENDING = "sending"
    SENT = "sent"
    FAILED = "failed"
    LOGGED = "logged"       # no webhook configured: the log line is the notification


class Base(DeclarativeBase):
    pass


class Study(Base):
    __tablename__ = "studies"
    id: Mapped[int] = mapped_column(primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(64), unique=True)
    patient_id: Mapped[str] = mapped_column(String(64), default="")
    accession: Mapped[str] = mapped_column(String(16), default="")
    # for QIDO-RS searches (the first instance's values)
    patient_name: Mapped[str] = mapped_column(String(64), default="")
    study_date: Mapped[str] = mapped_column(String(8), default="", index=True)
    description: Mapped[str] = mapped_column(String(64), default="")
    received_at: Mapped[float] = mapped_column(Float)
    # when study-level routes should look at the study again (None: nothing to do)
    study_check_at: Mapped[float | None] = mapped_column(Float, nullable=True, index=True)


class Series(Base):
    __tablename__ = "series"
    id: Mapped[int] = mapped_column(primary_key=True)
    series_uid: Mapped[str] = mapped_column(String(64), unique=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    modality: Mapped[str] = mapped_column(String(16), default="")
    description: Mapped[str] = mapped_column(String(64), default="")
    calling_aet: Mapped[str] = mapped_column(String(16), default="")
    called_aet: Mapped[str] = mapped_column(String(16), default="")
    first_received_at: Mapped[float] = mapped_column(Float)
    last_received_at: Mapped[float] = mapped_column(Float)
    caller_address: Mapped[str] = mapped_column(String(64), default="")   # the sender's IP address
    status: Mapped[str] = mapped_column(String(16), default=SeriesStatus.RECEIVING.value, index=True)
    routes: Mapped[str] = mapped_column(Text, default="")   # why routes matched or not, as JSON
    # Completion by evidence: complete at evidence_at (before the quiet timer) by "mpps" or
    # "release", unless an instance arrived after it.
    evidence: Mapped[str] = mapped_column(String(16), default="")
    evidence_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class Mpps(Base):
    """A Modality Performed Procedure Step (N-CREATE, N-SET) and the instances it references."""

    __tablename__ = "mpps"
    id: Mapped[int] = mapped_column(primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    status: Mapped[str] = mapped_column(String(16))            # IN PROGRESS | COMPLETED | DISCONTINUED
    calling_aet: Mapped[str] = mapped_column(String(16), default="")
    study_uid: Mapped[str] = mapped_column(String(64), default="")
    references: Mapped[str] = mapped_column(Text, default="{}")   # {series_uid: [sop_instance_uid, ...]}
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)
    decided: Mapped[int] = mapped_column(Integer, default=0)       # 1: its series were given their evidence
    waiting: Mapped[str] = mapped_column(Text, default="")         # what it still waits for, said once


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
    worker: Mapped[str] = mapped_column(String(64), default="")   # node.name of the node that ran it last
    heartbeat_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    error: Mapped[str] = mapped_column(Text, default="")
    result_files: Mapped[str] = mapped_column(Text, default="[]")
    summary: Mapped[str] = mapped_column(Text, default="{}")   # volumes, findings, timings


class Delivery(Base):
    __tablename__ = "deliveries"
    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))          # "result", "forward" or "rejection"
    priority: Mapped[int] = mapped_column(Integer, default=ROUTINE)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"), nullable=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"))
    destination: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[float] = mapped_column(Float)
    created_at: Mapped[float] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    error: Mapped[str] = mapped_column(Text, default="")
    files: Mapped[str] = mapped_column(Text, default="")   # JSON list, for a rejection note; else the job's or series' files


class NodeEntry(Base):
    """One node of those sharing this database: its role and what it is doing, refreshed
    every ``node.heartbeat_s``."""

    __tablename__ = "nodes"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    host: Mapped[str] = mapped_column(String(255), default="")       # the machine's host name
    pid: Mapped[int] = mapped_column(Integer, default=0)
    listener: Mapped[str] = mapped_column(String(128), default="")   # "AINODE@0.0.0.0:11112", or ""
    models: Mapped[str] = mapped_column(Text, default="[]")          # the models it runs (a worker)
    doing: Mapped[str] = mapped_column(String(255), default="")
    started_at: Mapped[float] = mapped_column(Float)
    heartbeat_at: Mapped[float] = mapped_column(Float)
    stopped_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class AuditEvent(Base):
    """Who did what, when: associations, results produced, deliveries, operator actions."""

    __tablename__ = "audit"
    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[float] = mapped_column(Float, index=True)
    actor: Mapped[str] = mapped_column(String(128))       # "CT1@10.0.0.5", "node", "operator:alice"
    action: Mapped[str] = mapped_column(String(32))       # received, result, delivered, retry, purged, ...
    subject: Mapped[str] = mapped_column(String(128))     # a study/series UID, job or delivery id
    detail: Mapped[str] = mapped_column(Text, default="{}")


class StudyRoute(Base):
    """The state of one study-level route for one study, and why."""

    __tablename__ = "study_routes"
    __table_args__ = (UniqueConstraint("study_id", "route"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    route: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(20))         # fired, fired-incomplete, waiting, no-match
    reason: Mapped[str] = mapped_column(Text, default="")
    watermark: Mapped[float] = mapped_column(Float)        # the study's last instance time when decided
    decided_at: Mapped[float] = mapped_column(Float)


class Notification(Base):
    """A positive finding told to people: by webhook (with retries) or by the log alone."""

    __tablename__ = "notifications"
    __table_args__ = (UniqueConstraint("job_id", "subject"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    study_uid: Mapped[str] = mapped_column(String(64))
    subject: Mapped[str] = mapped_column(String(128))      # the finding or measurement
    priority: Mapped[int] = mapped_column(Integer)
    payload: Mapped[str] = mapped_column(Text)             # the JSON body sent
    status: Mapped[str] = mapped_column(String(16), index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[float] = mapped_column(Float)
    created_at: Mapped[float] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    error: Mapped[str] = mapped_column(Text, default="")


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
    caller_address: str = ""
    patient_name: str = ""
    study_date: str = ""
    study_description: str = ""


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
    caller_address: str = ""
    study_id: int = 0
    accession: str = ""
    description: str = ""
    evidence: str = ""                 # what completed it early ("mpps", "release"), or ""


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
    routes: tuple[str, ...] = ()


@dataclass(frozen=True)
class DeliveryRow:
    id: int
    kind: str
    job_id: int | None
    series_id: int
    destination: str
    attempts: int
    priority: int = ROUTINE
    files: str = ""                    # JSON list of files (relative to data_dir) when the delivery names its own


@dataclass(frozen=True)
class NotificationSpec:
    """A notification to record when a job finishes: ``subject`` is unique within the job."""

    subject: str
    priority: int
    payload: dict[str, Any]


@dataclass(frozen=True)
class NotificationRow:
    id: int
    job_id: int
    subject: str
    payload: str
    attempts: int

