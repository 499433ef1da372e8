"""Assemble: decide that a series (or a study) is complete and which routes and models apply.

A series is complete when no instance arrived for ``series_timeout_s``. Its header (read from
one stored file, without pixels) and the association's facts (calling and called AE titles,
the sender's address) are then matched against every route's rule (:mod:`node.config.rules`).

* A **series-level** route that matches adds its models (one job per series and model; when
  several routes name the same model, the job gets the most urgent priority and the union of
  their destinations) and its forwards at once.
* A **study-level** route waits until every series of the study is complete and the whole
  study has been quiet for the route's ``study_timeout_s``, and until each of its
  ``require_series`` rules is met by some series of the study. Then it creates jobs and
  forwards for each series of the study that matches its rule. A study that stays incomplete
  waits until a new series arrives or, when ``study_max_wait_s`` is set, fires anyway that
  long after its last instance, with a warning.

Why each route matched or not is recorded with the series (and with the study for
study-level routes).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import pydicom

from node.config.schema import ORIGIN, Config, Route
from node.storage.db import JobSpec, SeriesRow
from node.config.rules import Facts

log = logging.getLogger("node.routing.assemble")

FIRE = "fired"
FIRE_INCOMPLETE = "fired-incomplete"
WAIT = "waiting"
NO_MATCH = "no-match"
NOT_YET = "not-yet"


@dataclass(frozen=True)
class RouteDecision:
    route: str
    matched: bool
    reason: str


@dataclass(frozen=True)
class Plan:
    """What to do with one complete series."""

    jobs: tuple[JobSpec, ...]
    forwards: tuple[str, ...]
    decisions: tuple[RouteDecision, ...]
    forward_priority: int = 2

    def explanation(self) -> dict[str, Any]:
        return {d.route: {"matched": d.matched, "reason": d.reason} for d in self.decisions}


def match_route(route: Route, facts: Facts | Mapping[str, Any]) -> RouteDecision:
    """Evaluate the route's rule; the reason says which condition decided."""
    if not isinstance(facts, Facts):
        facts = Facts(facts)
    verdict = route.rule.evaluate(facts)
    if verdict.holds:
        return RouteDecision(route.name, True, f"matched ({verdict.reason})")
    return RouteDecision(route.name, False, verdict.reason)


def association_facts(series: SeriesRow) -> dict[str, str]:
    return {"CallingAETitle": series.calling_aet, "CalledAETitle": series.called_aet,
            "CallerAddress": series.caller_address}


def series_facts(path: Path, series: SeriesRow) -> Facts:
    """The header of one instance of the series (no pixels) plus the association's facts.

    Raises:
        OSError, pydicom.errors.InvalidDicomError: the file cannot be read.
    """
    ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    return Facts(ds, association_facts(series))


def plan_series(config: Config, series: SeriesRow, facts: Facts | Mapping[str, Any]) -> Plan:
    """Match every route; build the jobs and forwards of the series-level routes that match."""
    if not isinstance(facts, Facts):
        facts = Facts(facts, association_facts(series))
    decisions = []
    jobs: dict[str, tuple[set[str], set[str], int]] = {}
    forwards: list[str] = []
    forward_priority = 2
    for route in config.routes:
        decision = match_route(route, facts)
        if decision.matched and route.level == "study":
            decision = RouteDecision(route.name, True, decision.reason + (
                f"; level = study: waits until the study is quiet for {route.study_timeout_s:g} s"
                + (" and has its required series" if route.require_series else "")))
        decisions.append(decision)
        if not decision.matched or route.level == "study":
            continue
        for spec in route_jobs(config, route, series):
            routes, dests, prio = jobs.get(spec.model, (set(), set(), spec.priority))
            jobs[spec.model] = (routes | {route.name}, dests | set(spec.destinations), min(prio, spec.priority))
        for dest in resolve(config, route.forward_to, series.calling_aet, route.name):
            forward_priority = min(forward_priority, route.priority_rank)
            if dest not in forwards:
                forwards.append(dest)
    specs = tuple(JobSpec(model=m, routes=tuple(sorted(r)), destinations=tuple(sorted(d)), priority=p)
                  for m, (r, d, p) in jobs.items())
    return Plan(jobs=specs, forwards=tuple(forwards), decisions=tuple(decisions),
                forward_priority=forward_priority)


def route_jobs(config: Config, route: Route, series: SeriesRow) -> list[JobSpec]:
    """One job per model of ``route`` for ``series``."""
    send_to = tuple(sorted(resolve(config, route.send_to, series.calling_aet, route.name)))
    return [JobSpec(model=m, routes=(route.name,), destinations=send_to, priority=route.priority_rank)
            for m in route.models]


# ------------------------------------------------------------------------- studies
@dataclass(frozen=True)
class StudyMember:
    """One complete series of a study, with what rules see of it."""

    series: SeriesRow
    facts: Facts


@dataclass(frozen=True)
class StudyDecision:
    """What a study-level route does with a study now.

    ``state`` is one of ``fired``, ``fired-incomplete``, ``waiting``, ``no-match`` or
    ``not-yet`` (not quiet long enough); ``due_at`` is when to look again (None: only when
    something new arrives).
    """

    route: str
    state: str
    reason: str
    jobs: tuple[tuple[int, JobSpec], ...] = ()         # (series id, job)
    forwards: tuple[tuple[int, str], ...] = ()         # (series id, destination)
    due_at: float | None = None

    @property
    def fires(self) -> bool:
        return self.state in (FIRE, FIRE_INCOMPLETE)


def plan_study(config: Config, route: Route, members: Sequence[StudyMember], last_received_at: float,
               now: float) -> StudyDecision:
    """Decide a study-level route for a study whose series are all complete."""
    verdicts = [(m, route.rule.evaluate(m.facts)) for m in members]
    matching = [m for m, v in verdicts if v.holds]
    if not matching:
        why = "; ".join(f"series {m.series.series_uid}: {v.reason}" for m, v in verdicts[:3])
        return StudyDecision(route.name, NO_MATCH, f"no series matches ({why})")
    quiet_at = last_received_at + route.study_timeout_s
    if now < quiet_at:
        return StudyDecision(route.name, NOT_YET, f"study not quiet for {route.study_timeout_s:g} s yet",
                             due_at=quiet_at)
    missing = [req for req in route.require_series
               if not any(req.evaluate(m.facts).holds for m in members)]
    state, reason = FIRE, f"{len(matching)} of {len(members)} series match"
    if missing:
        wanted = ", ".join(f"[{req.describe()}]" for req in missing)
        deadline = last_received_at + route.study_max_wait_s
        if not route.study_max_wait_s:
            return StudyDecision(route.name, WAIT, f"waiting for a series with {wanted} "
                                 "(study_max_wait_s = 0: waits until one arrives)")
        if now < deadline:
            return StudyDecision(route.name, WAIT, f"waiting for a series with {wanted} "
                                 f"(fires without it at study_max_wait_s = {route.study_max_wait_s:g} s)",
                                 due_at=deadline)
        state, reason = FIRE_INCOMPLETE, f"{reason}; fired without a series with {wanted} " \
                                         f"after study_max_wait_s = {route.study_max_wait_s:g} s"
    jobs = tuple((m.series.id, spec) for m in matching for spec in route_jobs(config, route, m.series))
    forwards = tuple((m.series.id, dest) for m in matching
                     for dest in resolve(config, route.forward_to, m.series.calling_aet, route.name))
    return StudyDecision(route.name, state, reason, jobs=jobs, forwards=forwards)


def unresolved_origin(calling_aet: str) -> str:
    """The destination name of an ``@origin`` whose sender is not configured (yet)."""
    return f"{ORIGIN}:{calling_aet.strip()}"


def resolve(config: Config, targets: Sequence[str], calling_aet: str, route: str) -> list[str]:
    """Destination names; ``@origin`` is the destination whose AE title sent the study."""
    out = []
    for target in targets:
        if target == ORIGIN:
            dest = config.destination_for_ae(calling_aet)
            if dest is None:
                # Kept, so that the delivery fails visibly (ainode jobs, status, the dashboard)
                # and goes out once the sender is configured and the delivery retried.
                log.warning("route %s: @origin %r is not a configured destination; its delivery will fail "
                            "until one is", route, calling_aet, extra={"route": route, "calling_aet": calling_aet})
                target = unresolved_origin(calling_aet)
            else:
                target = dest.name
        if target not in out:
            out.append(target)
    return out
