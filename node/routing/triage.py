"""Triage: what a finished job's output changes — priority, extra destinations, notifications.

Pure functions over a job's summary (its findings and segment volumes) and the routes that
made it; :mod:`node.worker` records the outcome atomically with the job's results.

* A positive finding raises the job to the finding's triage priority (from the model's
  manifest) and, with ``notify.on_positive`` (the default), is notified.
* Each ``on_result`` action of the job's routes whose condition holds (a positive finding,
  optionally with a probability range; or a segment volume in a range) adds its ``send_to``
  (results) and ``forward_to`` (the original study) destinations, raises the priority to its
  ``priority`` and, with ``notify = true``, is notified.

A raised priority orders the job's deliveries and places its study on the worklist.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

from node.routing.assemble import resolve
from node.config.schema import PRIORITIES, PRIORITY_NAMES, Config, OnResult
from node.storage.db import JobRow, NotificationSpec, SeriesRow

#: Notification kinds, as written into the payload's ``event``.
EVENT_FINDING = "positive_finding"
EVENT_MEASUREMENT = "measurement"


@dataclass(frozen=True)
class Outcome:
    """What a job's output triggers; ``priority`` is None when nothing raises it."""

    priority: int | None = None
    destinations: tuple[str, ...] = ()
    forwards: tuple[str, ...] = ()
    notifications: tuple[NotificationSpec, ...] = ()
    fired: tuple[str, ...] = ()          # "route: condition" of each on_result action that held
    positives: tuple[dict[str, Any], ...] = ()


def triage(config: Config, job: JobRow, series: SeriesRow, summary: dict[str, Any],
           now: float | None = None) -> Outcome:
    """Evaluate positive findings and the ``on_result`` actions of the job's routes."""
    findings = {f["name"]: f for f in summary.get("findings", [])}
    volumes: dict[str, float] = summary.get("volumes_ml", {})
    positives = [f for f in findings.values() if f.get("positive")]
    ranks = [PRIORITIES[f["priority"]] for f in positives if f.get("priority") in PRIORITIES]
    destinations: list[str] = []
    forwards: list[str] = []
    notes: dict[str, tuple[int, dict[str, Any]]] = {}
    fired = []
    base = _Payload(config, job, series, summary, now)

    if config.notify.on_positive:
        for f in positives:
            rank = min(job.priority, PRIORITIES.get(f.get("priority", ""), job.priority))
            notes[f["name"]] = (rank, base.finding(f, rank, "positive finding"))

    for route_name in job.routes:
        route = config.route(route_name)
        if route is None:
            continue                 # removed by a reload since the job was queued
        for action in route.on_result:
            if action.model and action.model != job.model:
                continue
            subject, holds = _evaluate(action, findings, volumes)
            if not holds:
                continue
            fired.append(f"{route.name}: {action.describe()}")
            destinations += [d for d in resolve(config, action.send_to, series.calling_aet, route.name)
                             if d not in destinations]
            forwards += [d for d in resolve(config, action.forward_to, series.calling_aet, route.name)
                         if d not in forwards]
            if action.priority:
                ranks.append(PRIORITIES[action.priority])
            if action.notify:
                rank = min(job.priority, PRIORITIES.get(action.priority, job.priority),
                           PRIORITIES.get(findings.get(subject, {}).get("priority", ""), job.priority)
                           if action.finding else job.priority)
                rule = f"{route.name}: {action.describe()}"
                payload = (base.finding(findings[subject], rank, rule) if action.finding
                           else base.measurement(subject, volumes[subject], rank, rule))
                if subject not in notes or notes[subject][0] > rank:
                    notes[subject] = (rank, payload)

    priority = min(ranks) if ranks and min(ranks) < job.priority else None
    specs = tuple(NotificationSpec(subject=s, priority=r, payload=p) for s, (r, p) in notes.items())
    return Outcome(priority=priority, destinations=tuple(destinations), forwards=tuple(forwards),
                   notifications=specs, fired=tuple(fired), positives=tuple(positives))


def _evaluate(action: OnResult, findings: dict[str, dict[str, Any]],
              volumes: dict[str, float]) -> tuple[str, bool]:
    if action.finding:
        f = findings.get(action.finding)
        holds = bool(f and f.get("positive")) and (
            action.probability is None or action.probability.contains(float(f["probability"])))
        return action.finding, holds
    assert action.volume_ml is not None
    volume = volumes.get(action.segment)
    return action.segment, volume is not None and action.volume_ml.contains(float(volume))


class _Payload:
    """Builds the JSON bodies of one job's notifications."""

    def __init__(self, config: Config, job: JobRow, series: SeriesRow, summary: dict[str, Any],
                 now: float | None) -> None:
        results: Sequence[dict[str, str]] = summary.get("results", [])
        sr_uid = next((r["sop_instance_uid"] for r in results if r.get("modality") == "SR"), "")
        links = []
        if config.notify.link_template:
            links.append(config.notify.link_template.format(
                study_uid=series.study_uid, series_uid=series.series_uid, accession=series.accession,
                sr_uid=sr_uid, job_id=job.id))
        self.common = {
            "node": config.node.ae_title,
            "study_instance_uid": series.study_uid,
            "series_instance_uid": series.series_uid,
            "accession_number": series.accession,
            "modality": series.modality,
            "model": summary.get("model", job.model),
            "model_version": summary.get("version", ""),
            "job_id": job.id,
            "results": list(results),
            "links": links,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() if now is None else now)),
        }

    def finding(self, f: dict[str, Any], rank: int, rule: str) -> dict[str, Any]:
        return {"event": EVENT_FINDING, **self.common, "finding": f["name"],
                "probability": f["probability"], "positive": bool(f.get("positive")),
                "priority": PRIORITY_NAMES[rank], "rule": rule}

    def measurement(self, segment: str, volume_ml: float, rank: int, rule: str) -> dict[str, Any]:
        return {"event": EVENT_MEASUREMENT, **self.common, "segment": segment, "volume_ml": volume_ml,
                "priority": PRIORITY_NAMES[rank], "rule": rule}
