"""The worker: the one place that knows every stage and moves work between them.

Threads of a running node:

* ``ingest``   — pynetdicom's listener (see :mod:`node.ingest`);
* ``assemble`` — finds quiet series, matches routes, queues jobs and forwards; then decides
  the study-level routes of studies that are due;
* ``infer``    — claims the most urgent job, loads the series, runs the model, encodes SEG/SR,
  and triages the output (:mod:`node.triage`);
* ``deliver``  — claims due deliveries (most urgent first) and C-STOREs them, with backoff;
* ``notify``   — claims due notifications and posts them to the webhook, with backoff.

Every hand-over is a committed database row, so ``Node.start`` after a crash simply gives
back what was in flight and carries on. The configuration and the loaded models are one
immutable :class:`NodeState` held in one attribute: :meth:`Node.reload` swaps it whole, and
each stage reads it once per item.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import threading
import time
from io import BytesIO
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import pydicom

from . import __version__
from .assemble import (FIRE_INCOMPLETE, NO_MATCH, NOT_YET, WAIT, StudyMember, association_facts,
                       plan_series, plan_study, series_facts)
from .config import PRIORITY_NAMES, Config
from .db import Database, DeliveryRow, JobRow, NotificationRow, SeriesRow, SeriesStatus
from .deliver import Peer, backoff, send_files
from .encode import encode_classification, encode_segmentation
from .errors import ConfigError, NodeError, PermanentError
from .infer import ModelRuntime
from .ingest import Ingest, serve_ingest_only
from .notify import post_json, webhook_url
from .rules import Facts
from .state import NodeState, effective_config, load_models
from .store import FileStore
from .tls import client_context
from .triage import Outcome, triage
from .volume import load_series

log = logging.getLogger("node.worker")

MAX_JOB_ATTEMPTS = 3
STALL_TIMEOUT_S = 300.0
SWEEP_INTERVAL_S = 30.0
HEARTBEAT_S = 30.0
IDLE_WAIT_S = 1.0
MIN_RETRY_WAIT_S = 0.05
#: In ``data_dir``: what the running node is and which provider runs each model.
STATUS_FILE = "status.json"


class Node:
    """A running node: ingest plus the background stages, over one database and file store."""

    def __init__(self, config: Config) -> None:
        config.node.data_dir.mkdir(parents=True, exist_ok=True)
        self.store = FileStore(config.node.data_dir, fsync=config.ingest.fsync)
        self.db = Database(config.node.effective_database_url)
        self.db.create()
        models, stamps = load_models(config)
        self._state = NodeState(config, models, stamps)
        self._reload_lock = threading.Lock()
        self.ingest = Ingest(config, self.store, self.db)
        self._client_tls = client_context(config.tls) if any(d.tls for d in config.destinations) else None
        self._stop = threading.Event()
        self._jobs_ready = threading.Event()
        self._deliveries_ready = threading.Event()
        self._notifications_ready = threading.Event()
        self._threads: list[threading.Thread] = []
        self._ingest_processes: list[multiprocessing.process.BaseProcess] = []
        self._check_webhook(config)

    @property
    def config(self) -> Config:
        return self._state.config

    @property
    def models(self) -> Mapping[str, ModelRuntime]:
        return self._state.models

    # -------------------------------------------------------------- reload
    def reload(self, new: Config) -> list[str]:
        """Swap in a new configuration (and its models) without stopping anything.

        Settings the listener was built with (:data:`node.state.RESTART_KEYS`) keep their running
        values; the returned lines name those that changed and need a restart.

        Raises:
            ConfigError: the new configuration cannot run (a model is missing or invalid);
                the old one stays in force.
        """
        with self._reload_lock:
            old = self._state
            effective, restart = effective_config(old.config, new)
            models, stamps = load_models(effective, old)
            if self._client_tls is None and any(d.tls for d in effective.destinations):
                self._client_tls = client_context(effective.tls)
            self._state = NodeState(effective, models, stamps)
            self.ingest.config = effective
            self._write_status()                 # the models and providers now in use
        self._check_webhook(effective)
        loaded = sorted(set(models) - {n for n, s in old.stamps.items() if stamps.get(n) == s})
        log.info("configuration reloaded: %d routes, %d destinations%s", len(effective.routes),
                 len(effective.destinations), f"; models loaded: {', '.join(loaded)}" if loaded else "",
                 extra={"routes": [r.name for r in effective.routes], "models_loaded": loaded})
        for line in restart:
            log.warning("reload: %s; the running value stays", line, extra={"restart_needed": line})
        self._jobs_ready.set()
        self._deliveries_ready.set()
        return restart

    def _check_webhook(self, config: Config) -> None:
        try:
            webhook_url(config.notify)
        except ConfigError as exc:
            log.error("%s: notifications will fail until it is fixed", exc)

    # ----------------------------------------------------------- lifecycle
    def start(self) -> None:
        removed = self.store.clean_tmp()
        # Alone on SQLite, whatever is in flight was ours; on a shared database only work
        # whose heartbeat stopped is given back (another node may be running the rest).
        given_back = self.db.requeue_stalled(time.time() - STALL_TIMEOUT_S if self.db.shared else None)
        if removed or given_back:
            log.info("recovered after restart: %d partial files removed, %d jobs/deliveries given back",
                     removed, given_back)
        extra = self.config.ingest.processes - 1
        self.ingest.start(reuse_port=extra > 0)
        spawn = multiprocessing.get_context("spawn")
        for k in range(extra):
            proc = spawn.Process(target=serve_ingest_only, args=(self.config,), name=f"ingest-{k + 2}", daemon=True)
            proc.start()
            self._ingest_processes.append(proc)
        if extra:
            log.info("%d ingest processes share port %d", extra + 1, self.config.node.port)
        self._write_status(started_at=time.time())
        for name, target in (("assemble", self._assemble_loop), ("infer", self._infer_loop),
                             ("deliver-1", self._deliver_loop), ("deliver-2", self._deliver_loop),
                             ("notify", self._notify_loop)):
            thread = threading.Thread(target=self._guard(target), name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop accepting, let the current job and deliveries finish (up to ``timeout``)."""
        for proc in self._ingest_processes:
            proc.terminate()
        self.ingest.stop()
        for proc in self._ingest_processes:
            proc.join(15)
        self._stop.set()
        self._jobs_ready.set()
        self._deliveries_ready.set()
        self._notifications_ready.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.1, deadline - time.monotonic()))
        self.db.close()
        self._write_status(stopped_at=time.time())

    def _write_status(self, **changes: float) -> None:
        """Write ``data_dir/status.json`` (pid, listener, models and their providers)."""
        path = self.config.node.data_dir / STATUS_FILE
        status: dict[str, Any] = {}
        if "started_at" not in changes and path.is_file():
            status = json.loads(path.read_text())
        status.update(
            pid=os.getpid(), version=__version__, ae_title=self.config.node.ae_title,
            host=self.config.node.host, port=self.config.node.port,
            models={name: runtime.describe() for name, runtime in self.models.items()}, **changes)
        self.store.write_atomic(path, (json.dumps(status, indent=2).encode(),))

    def _guard(self, loop: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            while not self._stop.is_set():
                try:
                    loop()
                    return
                except Exception:  # noqa: BLE001 - a stage thread must outlive any one bug
                    log.exception("%s loop failed; restarting it in 1 s", threading.current_thread().name)
                    self._stop.wait(1.0)
        return run

    # ------------------------------------------------------------ assemble
    def _assemble_loop(self) -> None:
        next_sweep = time.monotonic() + SWEEP_INTERVAL_S
        next_purge = time.monotonic() + self.config.retention.check_interval_s
        while not self._stop.wait(min(IDLE_WAIT_S, max(0.1, self.config.ingest.series_timeout_s / 5))):
            self.assemble_once(time.time() - self.config.ingest.series_timeout_s)
            self.assemble_studies(time.time())
            if time.monotonic() >= next_purge:
                next_purge = time.monotonic() + self.config.retention.check_interval_s
                self.purge_once()
            if time.monotonic() >= next_sweep:
                next_sweep = time.monotonic() + SWEEP_INTERVAL_S
                if n := self.db.requeue_stalled(heartbeat_before=time.time() - STALL_TIMEOUT_S):
                    log.warning("gave back %d stalled jobs/deliveries", n)

    def assemble_once(self, quiet_since: float) -> int:
        """Assemble every series quiet since ``quiet_since``; returns how many."""
        done = 0
        for series in self.db.quiet_series(quiet_since):
            config = self.config
            paths = self.db.series_paths(series.id)
            facts = self._facts(series, paths[0] if paths else "")
            plan = plan_series(config, series, facts)
            if not self.db.assemble(series.id, series.last_received_at, plan.jobs, plan.forwards,
                                    plan.explanation(), plan.forward_priority,
                                    study_check=bool(config.study_routes)):
                continue  # an instance arrived meanwhile: it stays receiving
            done += 1
            matched = [d.route for d in plan.decisions if d.matched]
            log.info("series %s complete (%d instances): routes %s; jobs %s; forwards %s",
                     series.series_uid, len(paths), matched or "none",
                     [j.model for j in plan.jobs] or "none", list(plan.forwards) or "none",
                     extra={"series_uid": series.series_uid, "routes": plan.explanation()})
            if plan.jobs:
                self._jobs_ready.set()
            if plan.forwards:
                self._deliveries_ready.set()
        return done

    def _facts(self, series: SeriesRow, path: str) -> Facts:
        try:
            return series_facts(Path(path), series)
        except Exception as exc:  # noqa: BLE001 - one unreadable file must not stop assembly
            log.error("series %s: cannot read its header (%s); only association facts apply",
                      series.series_uid, exc, extra={"series_uid": series.series_uid})
            return Facts(None, association_facts(series))

    def assemble_studies(self, now: float) -> int:
        """Decide the study-level routes of every study that is due; returns how many fired."""
        fired = 0
        for study_id, seen in self.db.studies_due(now):
            config = self.config
            rows = self.db.study_series(study_id)
            complete = (SeriesStatus.ASSEMBLED.value, SeriesStatus.PURGED.value)
            if not rows or not config.study_routes or any(r.status not in complete for r, _ in rows):
                self.db.set_study_check(study_id, seen, None)   # due again when its series is complete
                continue
            members = [StudyMember(r, self._facts(r, path)) for r, path in rows]
            last = max(r.last_received_at for r, _ in rows)
            previous = self.db.study_route_states(study_id)
            due: list[float] = []
            for route in config.study_routes:
                state, watermark = previous.get(route.name, ("", -1.0))
                if watermark >= last and (state != WAIT or not route.study_max_wait_s):
                    continue                         # decided for exactly this study content
                decision = plan_study(config, route, members, last, now)
                if decision.due_at is not None:
                    due.append(decision.due_at)
                if decision.state == NOT_YET:
                    continue
                forwards = [(sid, dest, route.priority_rank) for sid, dest in decision.forwards]
                self.db.decide_study_route(study_id, route.name, decision.state, decision.reason, last,
                                           decision.jobs, forwards)
                study_uid = rows[0][0].study_uid
                extra = {"study_uid": study_uid, "route": route.name, "state": decision.state}
                if decision.fires:
                    fired += 1
                    (log.warning if decision.state == FIRE_INCOMPLETE else log.info)(
                        "study %s: route %s %s: %s; jobs %s", study_uid, route.name, decision.state,
                        decision.reason, sorted({j.model for _, j in decision.jobs}) or "none", extra=extra)
                    self._jobs_ready.set()
                    self._deliveries_ready.set()
                elif decision.state == WAIT and state != WAIT:
                    log.warning("study %s: route %s %s", study_uid, route.name, decision.reason, extra=extra)
                elif decision.state == NO_MATCH:
                    log.debug("study %s: route %s: %s", study_uid, route.name, decision.reason, extra=extra)
            self.db.set_study_check(study_id, seen, min(due) if due else None)
        return fired

    # ----------------------------------------------------------- retention
    def purge_once(self) -> int:
        """Remove the files of series delivered longer ago than the retention times."""
        hours = self.config.retention.delete_after_h
        if not hours:
            return 0
        purged = 0
        for series_id in self.db.purgeable_series(time.time() - hours * 3600):
            series = self.db.get_series(series_id)
            files = self.db.series_paths(series_id) + self.db.series_results(series_id)
            if not self.db.mark_purged(series_id):
                continue          # an instance arrived meanwhile: the series is receiving again
            removed = self.store.remove(files)
            purged += 1
            self.db.audit("node", "purged", series.series_uid, files=removed)
            log.info("retention: removed %d files of series %s (the records stay)", removed, series.series_uid)
        return purged

    # --------------------------------------------------------------- infer
    def _infer_loop(self) -> None:
        while not self._stop.is_set():
            job = self.db.claim_job()
            if job is None:
                self._jobs_ready.wait(1.0)
                self._jobs_ready.clear()
                continue
            with self._heartbeat(job.id):
                self.process_job(job)

    @contextlib.contextmanager
    def _heartbeat(self, job_id: int) -> Iterator[None]:
        """Keep a running job's heartbeat fresh, however long the model takes."""
        done = threading.Event()

        def beat() -> None:
            while not done.wait(HEARTBEAT_S):
                self.db.heartbeat(job_id)

        thread = threading.Thread(target=beat, name=f"heartbeat-{job_id}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()

    def process_job(self, job: JobRow) -> None:
        """Run one claimed job to done, queued (retry) or failed; never raises."""
        series = self.db.get_series(job.series_id)
        state = self._state
        where = f"job {job.id} ({job.model} on series {series.series_uid})"
        try:
            summary, files = self._run_job(state, job, series.series_uid)
        except PermanentError as exc:
            log.error("%s failed: %s", where, exc, extra={"job_id": job.id})
            self.db.fail_job(job.id, f"{type(exc).__name__}: {exc}")
            return
        except Exception as exc:  # noqa: BLE001 - retryable and unknown errors get a bounded retry
            again = job.attempts < MAX_JOB_ATTEMPTS
            if isinstance(exc, NodeError):
                log.error("%s: %s (attempt %d%s)", where, exc, job.attempts, ", will retry" if again else "")
            else:
                log.exception("%s: unexpected error (attempt %d%s)", where, job.attempts,
                              ", will retry" if again else "")
            self.db.fail_job(job.id, f"{type(exc).__name__}: {exc}", retry=again)
            return
        try:
            outcome = triage(state.config, job, series, summary)
        except Exception:  # noqa: BLE001 - the results are made; a triage bug must not lose them
            log.exception("%s: triage of the output failed; results are delivered without it", where)
            outcome = Outcome()
        if outcome.priority is not None:
            summary["raised_priority"] = PRIORITY_NAMES[outcome.priority]
        if outcome.fired:
            summary["on_result"] = list(outcome.fired)
        self.db.finish_job(job.id, files, summary, outcome.destinations, priority=outcome.priority,
                           forwards=outcome.forwards, notifications=outcome.notifications,
                           webhook=state.config.notify.webhook_configured)
        self.db.audit("node", "result", series.series_uid, job_id=job.id, model=summary["model"],
                      version=summary["version"], provider=summary["provider"], files=files,
                      result_uids=summary.get("result_uids", []))
        log.info("%s done in %.2f s: %s", where, sum(summary["timings"].values()),
                 ", ".join(f"{k} {v:.2f}s" for k, v in summary["timings"].items()),
                 extra={"job_id": job.id, "timings": summary["timings"]})
        for f in outcome.positives:
            log.warning("POSITIVE %s (p=%.3f, priority %s) by %s in study %s, accession %s, series %s",
                        f["name"], f["probability"], f.get("priority", "?"), job.model, series.study_uid,
                        series.accession or "-", series.series_uid,
                        extra={"job_id": job.id, "finding": f["name"], "probability": f["probability"],
                               "study_uid": series.study_uid, "accession": series.accession})
        for line in outcome.fired:
            log.info("%s: on_result %s", where, line, extra={"job_id": job.id, "on_result": line})
        self._deliveries_ready.set()
        if outcome.notifications:
            self._notifications_ready.set()

    def _run_job(self, state: NodeState, job: JobRow, series_uid: str) -> tuple[dict[str, Any], list[str]]:
        runtime = state.models.get(job.model)
        if runtime is None:
            raise PermanentError(f"model {job.model!r} is not loaded (no route names it any more)")
        manifest = runtime.manifest
        timings: dict[str, float] = {}
        t = time.perf_counter()
        volume = load_series([Path(p) for p in self.db.series_paths(job.series_id)])
        timings["decode"] = time.perf_counter() - t

        prediction = runtime.run(volume)
        timings.update(prediction.timings)

        t = time.perf_counter()
        job_key = f"{series_uid}|{manifest.name}|{manifest.version}"
        summary: dict[str, Any] = {"model": manifest.name, "version": manifest.version,
                                   "provider": prediction.provider, "slices": int(volume.pixels.shape[0])}
        if prediction.masks is not None:
            result = encode_segmentation(volume.headers, prediction.masks, manifest, job_key,
                                         frames=volume.frames)
            outputs = {"seg.dcm": result.seg, "sr.dcm": result.sr}
            summary["volumes_ml"] = {v.name: round(v.volume_ml, 3) for v in result.volumes}
        else:
            assert prediction.scores is not None
            sr, findings = encode_classification(volume.headers, prediction.scores, manifest, job_key)
            outputs = {"sr.dcm": sr}
            summary["findings"] = [dict(name=f.name, probability=round(f.probability, 4), positive=f.positive,
                                        priority=f.priority) for f in findings]
        summary["results"] = [dict(sop_class_uid=str(ds.SOPClassUID), sop_instance_uid=str(ds.SOPInstanceUID),
                                   series_instance_uid=str(ds.SeriesInstanceUID), modality=str(ds.Modality))
                              for ds in outputs.values()]
        files = self._write_results(job.id, outputs)
        summary["result_uids"] = [str(ds.SOPInstanceUID) for ds in outputs.values()]
        timings["encode"] = time.perf_counter() - t
        summary["timings"] = {k: round(v, 4) for k, v in timings.items()}
        return summary, files

    def _write_results(self, job_id: int, outputs: dict[str, pydicom.Dataset]) -> list[str]:
        folder = self.store.result_dir(job_id)
        files = []
        for name, ds in outputs.items():
            buf = BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            path = folder / name
            self.store.write_atomic(path, (buf.getbuffer(),))
            files.append(str(path))
        return files

    # ------------------------------------------------------------- deliver
    def _deliver_loop(self) -> None:
        self._claim_loop(self.db.claim_delivery, self.db.next_delivery_due, self._deliveries_ready,
                         self.process_delivery)

    def _claim_loop(self, claim: Callable[[], Any], next_due: Callable[[], float | None],
                    ready: threading.Event, process: Callable[[Any], None]) -> None:
        """Claim and process due items until stopped; between them, sleep until the next is
        due (at most IDLE_WAIT_S) or ``ready`` is set."""
        while not self._stop.is_set():
            item = claim()
            if item is None:
                due = next_due()
                wait = IDLE_WAIT_S if due is None else min(IDLE_WAIT_S, max(MIN_RETRY_WAIT_S, due - time.time()))
                ready.wait(wait)
                ready.clear()
                continue
            process(item)

    def process_delivery(self, delivery: DeliveryRow) -> None:
        """Send one claimed delivery; success, a scheduled retry or failure; never raises."""
        cfg = self.config.delivery
        where = f"delivery {delivery.id} ({delivery.kind} to {delivery.destination})"
        try:
            dest = self.config.destination(delivery.destination)
        except ConfigError:
            self.db.defer_delivery(delivery.id, f"destination {delivery.destination!r} is no longer configured", None)
            log.error("%s failed: destination no longer configured", where)
            return
        files = (self.db.job_results(delivery.job_id) if delivery.job_id is not None
                 else self.db.series_paths(delivery.series_id))
        peer = Peer(dest.ae_title, dest.host, dest.port, self._client_tls if dest.tls else None)
        t = time.perf_counter()
        try:
            report = send_files([Path(f) for f in files], peer, self.config.node.ae_title, cfg.timeout_s)
            error = "; ".join(f"{Path(f).name}: {why}" for f, why in report.failed[:5])
        except NodeError as exc:
            error = str(exc)
        except Exception as exc:  # noqa: BLE001 - any network failure is a retry, not a crash
            log.exception("%s: unexpected error", where)
            error = f"{type(exc).__name__}: {exc}"
        if not error:
            self.db.finish_delivery(delivery.id)
            self.db.audit("node", "delivered", f"delivery {delivery.id}", kind=delivery.kind,
                          job_id=delivery.job_id, destination=str(peer), files=len(files))
            log.info("%s: %d files sent in %.2f s", where, len(files), time.perf_counter() - t,
                     extra={"delivery_id": delivery.id})
            return
        if delivery.attempts >= cfg.max_attempts:
            self.db.defer_delivery(delivery.id, error, None)
            log.error("%s failed after %d attempts: %s (ainode retry to send again)", where,
                      delivery.attempts, error)
        else:
            delay = backoff(delivery.attempts, cfg.backoff_s, cfg.backoff_max_s)
            self.db.defer_delivery(delivery.id, error, time.time() + delay)
            self.db.hold_destination(delivery.destination, time.time() + delay)
            log.warning("%s attempt %d failed: %s; next try in %.0f s", where, delivery.attempts, error, delay)

    # -------------------------------------------------------------- notify
    def _notify_loop(self) -> None:
        self._claim_loop(self.db.claim_notification, self.db.next_notification_due, self._notifications_ready,
                         self.process_notification)

    def process_notification(self, note: NotificationRow) -> None:
        """Post one claimed notification; sent, a scheduled retry or failed; never raises."""
        cfg = self.config.notify
        where = f"notification {note.id} ({note.subject}, job {note.job_id})"
        try:
            url = webhook_url(cfg)
            if url is None:
                raise ConfigError("no webhook is configured any more ([notify] webhook_url_env or _file)")
            status = post_json(url, json.loads(note.payload), cfg.timeout_s)
        except (NodeError, ValueError) as exc:
            error = str(exc)
        else:
            self.db.finish_notification(note.id)
            log.info("%s: webhook answered HTTP %d", where, status, extra={"notification_id": note.id})
            return
        if note.attempts >= cfg.max_attempts:
            self.db.defer_notification(note.id, error, None)
            log.error("%s failed after %d attempts: %s", where, note.attempts, error,
                      extra={"notification_id": note.id})
        else:
            delay = backoff(note.attempts, cfg.backoff_s, cfg.backoff_max_s)
            self.db.defer_notification(note.id, error, time.time() + delay)
            log.warning("%s attempt %d failed: %s; next try in %.1f s", where, note.attempts, error, delay,
                        extra={"notification_id": note.id})
