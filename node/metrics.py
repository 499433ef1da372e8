"""What the node counts for monitoring (Prometheus text format at ``/metrics``).

One :class:`Metrics` per node, with its own registry (no process-wide state): the listener,
the stages and the web layer are handed it and count into it. Counts that the database
already holds (jobs by state and model, queue depth by priority) are read from it at each
scrape by a collector the web layer adds, so they are right across restarts and nodes.

Label values that come from peers (calling AE titles, destination names) are bounded: after
:data:`MAX_LABEL_VALUES` distinct values, new ones are counted as ``other``, so a peer that
invents AE titles cannot make the node's memory grow.
"""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

MAX_LABEL_VALUES = 100
#: Seconds per stage: decode .. deliver of one job; from 10 ms to 10 min.
STAGE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class _Bounded:
    """The first ``MAX_LABEL_VALUES`` distinct values pass; later new ones read ``other``."""

    def __init__(self) -> None:
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: str) -> str:
        value = value.strip() or "-"
        with self._lock:
            if value in self._seen:
                return value
            if len(self._seen) >= MAX_LABEL_VALUES:
                return "other"
            self._seen.add(value)
            return value


class Metrics:
    """The node's counters, histograms and gauges."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self._aet = _Bounded()
        self._dest = _Bounded()
        self.instances = Counter("ainode_instances_received", "Instances stored (acknowledged with Success)",
                                 ["calling_aet"], registry=r)
        self.bytes = Counter("ainode_bytes_received", "Bytes of instances stored", ["calling_aet"], registry=r)
        self.refused = Counter("ainode_instances_refused", "Instances refused, by the status answered",
                               ["status"], registry=r)
        self.associations = Counter("ainode_associations", "Associations accepted, or rejected by reason",
                                    ["outcome", "reason"], registry=r)
        self.series_completed = Counter("ainode_series_completed", "Series complete, by the evidence",
                                        ["evidence"], registry=r)
        self.stage_seconds = Histogram("ainode_stage_seconds", "Seconds per stage of a job",
                                       ["stage", "model"], buckets=STAGE_BUCKETS, registry=r)
        self.jobs_finished = Counter("ainode_jobs_finished", "Jobs that ended, by outcome and model",
                                     ["outcome", "model"], registry=r)
        self.deliveries = Counter("ainode_deliveries", "Delivery attempts by destination and outcome",
                                  ["destination", "outcome"], registry=r)
        self.delivery_failures = Counter("ainode_delivery_failures", "Failed delivery attempts by destination",
                                         ["destination"], registry=r)
        self.notification_failures = Counter("ainode_notification_failures", "Failed webhook attempts",
                                             registry=r)
        self.model_info = Gauge("ainode_model_info", "Loaded models: 1 per model, version and provider",
                                ["model", "version", "provider"], registry=r)
        self.node_info = Gauge("ainode_node_info", "This node: 1, with its name and role", ["name", "role"],
                               registry=r)
        self.http_requests = Counter("ainode_http_requests", "HTTP requests by route and status",
                                     ["route", "status"], registry=r)

    # ------------------------------------------------------------------ what the parts call
    def stored(self, calling_aet: str, size: int) -> None:
        aet = self._aet(calling_aet)
        self.instances.labels(aet).inc()
        self.bytes.labels(aet).inc(size)

    def refused_with(self, status: int) -> None:
        self.refused.labels(f"0x{status:04X}").inc()

    def association(self, outcome: str, reason: str = "") -> None:
        self.associations.labels(outcome, reason).inc()

    def delivered(self, destination: str, ok: bool) -> None:
        dest = self._dest(destination)
        self.deliveries.labels(dest, "done" if ok else "failed").inc()
        if not ok:
            self.delivery_failures.labels(dest).inc()

    def job_timings(self, model: str, timings: dict[str, float]) -> None:
        for stage, seconds in timings.items():
            self.stage_seconds.labels(stage, model).observe(seconds)

    def models_loaded(self, described: dict[str, dict]) -> None:
        self.model_info.clear()
        for name, m in described.items():
            self.model_info.labels(name, str(m.get("version", "")), str(m.get("provider", ""))).set(1)
