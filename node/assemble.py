"""Assemble: decide that a series is complete and which routes and models apply to it.

A series is complete when no instance arrived for ``series_timeout_s``. Its header (read from
one stored file, without pixels) and the association's AE titles are then matched against
every route; each matching route adds its models (one job per series and model, the most
urgent priority and the union of destinations when several routes name the same model) and
its forwards. Why each route matched or not is recorded with the series.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping, Sequence

import pydicom

from .config import ORIGIN, Config, Route
from .db import JobSpec, SeriesRow

log = logging.getLogger("node.assemble")


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

    def explanation(self) -> dict[str, Any]:
        return {d.route: {"matched": d.matched, "reason": d.reason} for d in self.decisions}


@lru_cache(maxsize=1024)
def _pattern(pattern: str) -> re.Pattern[str]:
    return re.compile(fnmatch.translate(pattern), re.IGNORECASE | re.DOTALL)


def _values(value: Any) -> list[str]:
    """The string values of a header attribute (multi-valued attributes give several)."""
    if value is None:
        return []
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return [str(v) for v in value]
    return [str(value)]


def match_route(route: Route, attributes: Mapping[str, Any]) -> RouteDecision:
    """Every key of ``route.match`` must have a value matching one of its patterns."""
    for key, patterns in route.match:
        values = [v.strip() for v in _values(attributes.get(key))]
        if not any(values):
            return RouteDecision(route.name, False, f"{key} is absent")
        if not any(_pattern(p).match(v) for p in patterns for v in values):
            shown = "\\".join(values)[:64]
            return RouteDecision(route.name, False, f"{key}={shown!r} matches none of {list(patterns)}")
    what = ", ".join(f"{k} in {list(p)}" for k, p in route.match) or "no conditions"
    return RouteDecision(route.name, True, f"matched ({what})")


def series_attributes(path: Path, series: SeriesRow) -> dict[str, Any]:
    """Header attributes of one instance of the series plus the association's AE titles."""
    ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    attrs: dict[str, Any] = {}
    for elem in ds.iterall():
        if elem.keyword and elem.VR != "SQ":
            try:
                attrs[elem.keyword] = elem.value
            except Exception:  # noqa: BLE001 - a malformed value must not stop assembly
                continue
    attrs["CallingAETitle"] = series.calling_aet
    attrs["CalledAETitle"] = series.called_aet
    return attrs


def plan_series(config: Config, series: SeriesRow, attributes: Mapping[str, Any]) -> Plan:
    """Match every route; build the jobs and forwards of those that match."""
    decisions = []
    jobs: dict[str, tuple[set[str], set[str], int]] = {}
    forwards: list[str] = []
    for route in config.routes:
        decision = match_route(route, attributes)
        decisions.append(decision)
        if not decision.matched:
            continue
        send_to = _resolve(config, route.send_to, series.calling_aet, route.name)
        for model in route.models:
            routes, dests, prio = jobs.get(model, (set(), set(), route.priority_rank))
            routes.add(route.name)
            dests.update(send_to)
            jobs[model] = (routes, dests, min(prio, route.priority_rank))
        for dest in _resolve(config, route.forward_to, series.calling_aet, route.name):
            if dest not in forwards:
                forwards.append(dest)
    specs = tuple(JobSpec(model=m, routes=tuple(sorted(r)), destinations=tuple(sorted(d)), priority=p)
                  for m, (r, d, p) in jobs.items())
    return Plan(jobs=specs, forwards=tuple(forwards), decisions=tuple(decisions))


def _resolve(config: Config, targets: Sequence[str], calling_aet: str, route: str) -> list[str]:
    """Destination names; ``@origin`` is the destination whose AE title sent the study."""
    out = []
    for target in targets:
        if target == ORIGIN:
            dest = config.destination_for_ae(calling_aet)
            if dest is None:
                log.warning("route %s: @origin %r is not a configured destination; not sent there",
                            route, calling_aet)
                continue
            target = dest.name
        if target not in out:
            out.append(target)
    return out
