"""The nodes that share one database (part of :class:`node.storage.db.Database`): each says
every ``node.heartbeat_s`` what it is and does, so ``ainode status`` shows one line per node
and a stopped heartbeat is seen."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Sequence

from sqlalchemy import select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from node.storage.schema import NodeEntry


@dataclass(frozen=True)
class NodeBeat:
    name: str
    role: str
    host: str
    pid: int
    listener: str
    models: Sequence[str]
    doing: str
    started_at: float


class ClusterQueries:
    engine: Engine

    def node_beat(self, beat: NodeBeat, now: float | None = None) -> None:
        now = time.time() if now is None else now
        insert = postgresql.insert if self.engine.dialect.name == "postgresql" else sqlite.insert
        values = dict(role=beat.role, host=beat.host[:255], pid=beat.pid, listener=beat.listener[:128],
                      models=json.dumps(list(beat.models)), doing=beat.doing[:255], started_at=beat.started_at,
                      heartbeat_at=now, stopped_at=None)
        with self.engine.begin() as conn:
            conn.execute(insert(NodeEntry).values(name=beat.name, **values)
                         .on_conflict_do_update(index_elements=["name"], set_=values))

    def node_stopped(self, name: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(NodeEntry).where(NodeEntry.name == name).values(
                stopped_at=time.time(), doing="stopped"))

    def nodes_report(self, stall_timeout_s: float, now: float | None = None) -> list[dict[str, Any]]:
        """Every node that has run on this database; ``alive`` when its heartbeat is fresh."""
        now = time.time() if now is None else now
        with Session(self.engine) as session:
            rows = session.execute(select(NodeEntry).order_by(NodeEntry.role, NodeEntry.name)).scalars().all()
        return [dict(name=r.name, role=r.role, host=r.host, pid=r.pid, listener=r.listener,
                     models=json.loads(r.models or "[]"), doing=r.doing, started_at=r.started_at,
                     heartbeat_at=r.heartbeat_at, heartbeat_age_s=round(now - r.heartbeat_at, 1),
                     alive=r.stopped_at is None and now - r.heartbeat_at < stall_timeout_s)
                for r in rows]
