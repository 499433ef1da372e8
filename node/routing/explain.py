"""``ainode routes test``: which routes match the series in some files, and why not.

Reads headers only (no pixels), groups the files by study and series, and runs the very
functions the node runs when a series or a study is complete (:mod:`node.routing.assemble`), with the
association facts given on the command line.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from pathlib import Path
from typing import Mapping, Sequence

import pydicom
from pydicom.errors import InvalidDicomError

from node.routing.assemble import StudyMember, plan_series, plan_study
from node.config.schema import PRIORITY_NAMES, Config
from node.storage.db import SeriesRow, SeriesStatus
from node.config.rules import Facts

log = logging.getLogger("node.routing.explain")


def explain_paths(config: Config, paths: Sequence[Path], association: Mapping[str, str]) -> list[str]:
    """Lines saying, for each series and route, "matches" or "does not match: <reason>"."""
    files: list[Path] = []
    for p in paths:
        files.extend(sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p])
    studies: OrderedDict[str, OrderedDict[str, tuple[pydicom.Dataset, int]]] = OrderedDict()
    skipped = 0
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            study_uid, series_uid = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)
        except (InvalidDicomError, OSError, AttributeError, ValueError, EOFError):
            skipped += 1
            continue
        series = studies.setdefault(study_uid, OrderedDict())
        first, n = series.get(series_uid, (ds, 0))
        series[series_uid] = (first, n + 1)
    if not studies:
        return [f"no DICOM files among {len(files)} file(s)"]
    lines = []
    calling = association.get("CallingAETitle", "")
    for study_uid, series in studies.items():
        lines.append(f"study {study_uid}")
        members = []
        for k, (series_uid, (ds, n)) in enumerate(series.items(), 1):
            row = SeriesRow(id=k, series_uid=series_uid, study_uid=study_uid, modality=str(ds.get("Modality", "")),
                            calling_aet=calling, called_aet=association.get("CalledAETitle", ""),
                            status=SeriesStatus.ASSEMBLED.value, last_received_at=0.0,
                            caller_address=association.get("CallerAddress", ""),
                            accession=str(ds.get("AccessionNumber", "")),
                            description=str(ds.get("SeriesDescription", "")))
            facts = Facts(ds, association)
            members.append(StudyMember(row, facts))
            plan = plan_series(config, row, facts)
            lines.append(f"  series {series_uid} ({row.modality or '?'} {row.description!r}, {n} file(s))")
            for d in plan.decisions:
                lines.append(f"    route {d.route}: " + (d.reason.replace("matched", "matches", 1) if d.matched
                                                         else f"does not match: {d.reason}"))
            for job in plan.jobs:
                lines.append(f"    -> job {job.model} ({PRIORITY_NAMES[job.priority]}), results to "
                             f"{', '.join(job.destinations) or 'nowhere'}")
            if plan.forwards:
                lines.append(f"    -> forward to {', '.join(plan.forwards)}")
        for route in config.study_routes:
            decision = plan_study(config, route, members, last_received_at=0.0, now=math.inf)
            lines.append(f"  study-level route {route.name}: {decision.state}: {decision.reason}")
            by_series = {m.series.id: m.series.series_uid for m in members}
            for series_id, job in decision.jobs:
                lines.append(f"    -> job {job.model} on series {by_series[series_id]}")
    if skipped:
        lines.append(f"({skipped} file(s) skipped: not DICOM)")
    return lines
