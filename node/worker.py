"""The worker: the infer stage, and the :class:`Node` that runs every stage of a node.

Threads of a running node, each a :class:`node.stage.Stage`:

* ``ingest``       — pynetdicom's listener (:mod:`node.dicom.listener`);
* ``assemble``     — quiet series and due studies, routes, jobs and forwards
  (:class:`node.routing.assembler.Assembler`);
* ``infer``        — claims the most urgent job, loads the series, runs the model, encodes
  SEG/SR and triages the output (:class:`Inference`, here: the one stage that ties inference,
  results and routing together);
* ``deliver-1/2``  — claims due deliveries and C-STOREs them, with backoff
  (:class:`node.dicom.dispatch.Dispatcher`);
* ``notify``       — posts due notifications to the webhook (:class:`node.routing.notifier.Notifier`);
* ``housekeeping`` — retention and the sweep that gives back stalled work
  (:class:`node.storage.housekeeping.Housekeeping`).

Every hand-over is a committed database row, so ``Node.start`` after a crash simply gives
back what was in flight and carries on. The configuration and the loaded models are one
immutable :class:`NodeState` held in one attribute: :meth:`Node.reload` swaps it whole, and
each stage reads it once per item.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import multiprocessing
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import pydicom
from sqlalchemy.exc import SQLAlchemyError

from node import __version__
from node.config.reload import effective_config
from node.config.schema import PRIORITY_NAMES, Config
from node.dicom.dispatch import Dispatcher
from node.dicom.listener import Ingest, serve_ingest_only
from node.dicom.tls import client_context
from node.errors import ConfigError, InputError, NodeError, PermanentError, first_line
from node.inference.models import NodeState, load_models
from node.inference.runtime import ModelRuntime
from node.inference.volume import load_series
from node.metrics import Metrics
from node.results.encode import (encode_classification, encode_image_classifications, encode_rejection,
                                 encode_segmentation)
from node.results.encode import warm_up as warm_up_encoder
from node.results.part10 import part10_bytes
from node.routing.assembler import Assembler
from node.routing.notifier import Notifier
from node.routing.notify import webhook_url
from node.routing.triage import Outcome, triage
from node.stage import Stage, freeze_startup_objects
from node.storage.db import Database, JobRow
from node.storage.files import FileStore, node_dir, safe_name
from node.storage.cluster import NodeBeat
from node.storage.housekeeping import Housekeeping

log = logging.getLogger(__name__)

MAX_JOB_ATTEMPTS = 3
#: In ``data_dir``: what the running node is and which provider runs each model.
STATUS_FILE = "status.json"


class Inference(Stage):
    """The infer stage: one job at a time, most urgent first, to done, queued or failed."""

    name = "infer"

    def __init__(self, stop: threading.Event, db: Database, store: FileStore, state: Callable[[], NodeState],
                 wake_deliveries: Callable[[], None], wake_notifications: Callable[[], None],
                 metrics: Metrics | None = None) -> None:
        super().__init__(stop)
        self.metrics = metrics or Metrics()
        self.db = db
        self.store = store
        self.state = state
        self.wake_deliveries = wake_deliveries
        self.wake_notifications = wake_notifications
        self.current: JobRow | None = None       # the job running now (the node's heartbeat says it)

    def run_loop(self) -> None:
        self._warm_up_encoder()
        while not self.stopping:
            job = self.claim()
            if job is None:
                self.sleep(1.0)
                continue
            self.current = job
            try:
                with self._heartbeat(job.id):
                    self.process_job(job)
            finally:
                self.current = None

    def _warm_up_encoder(self) -> None:
        """One made-up SEG before the first job, so that the first study's result does not
        wait for highdicom's start; a failure here is logged and changes nothing else."""
        manifests = [rt.manifest for rt in self.state().models.values() if rt.manifest.task == "segmentation"]
        if not manifests:
            return
        try:
            seconds = warm_up_encoder(manifests[0])
        except Exception as exc:  # noqa: BLE001 - a warm-up only: the jobs report their own errors
            log.warning("SEG encoder warm-up failed (%s); the first result pays highdicom's start", first_line(exc))
        else:
            log.info("SEG encoder warmed up in %.2f s", seconds)
        freeze_startup_objects()           # highdicom's tables, loaded by the warm-up, included

    def claim(self) -> JobRow | None:
        """The next job to run. A job is counted at each claim, so one that was running when
        the node died each time (a model that crashes the process, say) is failed after
        :data:`MAX_JOB_ATTEMPTS` instead of crash-looping the node."""
        state = self.state()
        while (job := self.db.claim_job(models=tuple(state.models), worker=state.config.node.name)) is not None:
            if job.attempts <= MAX_JOB_ATTEMPTS:
                return job
            series = self.db.get_series(job.series_id)
            reason = (f"interrupted {job.attempts - 1} times (the node stopped while it ran, each time); "
                      f"not run again until `ainode retry {job.id}`")
            log.error("job %d (%s on series %s) failed: %s", job.id, job.model, series.series_uid, reason,
                      extra={"job_id": job.id})
            self.db.fail_job(job.id, reason)
            self.metrics.jobs_finished.labels("failed", job.model).inc()
        return None

    @contextlib.contextmanager
    def _heartbeat(self, job_id: int) -> Iterator[None]:
        """Keep a running job's heartbeat fresh, however long the model takes."""
        done = threading.Event()

        def beat() -> None:
            while not done.wait(self.state().config.node.heartbeat_s):
                try:
                    self.db.heartbeat(job_id)
                except SQLAlchemyError as exc:   # the database is away: beat again next time
                    log.warning("job %d: heartbeat not recorded: %s", job_id, first_line(exc))

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
        state = self.state()
        where = f"job {job.id} ({job.model} on series {series.series_uid})"
        previous = self.db.previous_results(job.id)
        try:
            summary, files = self._run_job(state, job, series.series_uid)
        except PermanentError as exc:
            log.error("%s failed: %s", where, exc, extra={"job_id": job.id})
            self.db.fail_job(job.id, f"{type(exc).__name__}: {exc}")
            self.metrics.jobs_finished.labels("failed", job.model).inc()
            self._withdraw(state, job, series, previous, f"re-run failed: {exc}")
            return
        except Exception as exc:  # noqa: BLE001 - retryable and unknown errors get a bounded retry
            again = job.attempts < MAX_JOB_ATTEMPTS
            if isinstance(exc, NodeError):
                log.error("%s: %s (attempt %d%s)", where, exc, job.attempts, ", will retry" if again else "")
            else:
                log.error("%s: unexpected %s: %s (attempt %d%s; traceback at DEBUG)", where, type(exc).__name__,
                          str(exc)[:300], job.attempts, ", will retry" if again else "")
                log.debug("%s: traceback", where, exc_info=True)
            self.db.fail_job(job.id, f"{type(exc).__name__}: {exc}", retry=again)
            self.metrics.jobs_finished.labels("retry" if again else "failed", job.model).inc()
            if not again:
                self._withdraw(state, job, series, previous, f"re-run failed: {exc}")
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
        new_uids = set(summary.get("result_uids", []))
        superseded = [r for r in previous if r["sop_instance_uid"] not in new_uids]
        if superseded:
            summary["supersedes"] = superseded
        self.metrics.job_timings(job.model, summary["timings"])
        self.metrics.jobs_finished.labels("done", job.model).inc()
        self.db.finish_job(job.id, files, summary, outcome.destinations, priority=outcome.priority,
                           forwards=outcome.forwards, notifications=outcome.notifications,
                           webhook=state.config.notify.webhook_configured)
        self.db.audit("node", "result", series.series_uid, job_id=job.id, model=summary["model"],
                      version=summary["version"], provider=summary["provider"], files=files,
                      result_uids=summary.get("result_uids", []))
        if superseded:
            self.db.audit("node", "superseded", series.series_uid, job_id=job.id,
                          result_uids=[r["sop_instance_uid"] for r in superseded],
                          by=summary.get("result_uids", []))
            log.info("%s: its input changed; the new results (new UIDs) supersede %d earlier objects",
                     where, len(superseded), extra={"job_id": job.id})
            self._withdraw(state, job, series, superseded, "superseded: the input changed")
        log.info("%s done in %.2f s: %s", where, sum(summary["timings"].values()),
                 ", ".join(f"{k} {v:.2f}s" for k, v in summary["timings"].items()),
                 extra={"job_id": job.id, "timings": summary["timings"]})
        phi = state.config.logging.phi         # the accession number only when allowed
        for f in outcome.positives:
            log.warning("POSITIVE %s (p=%.3f, priority %s) by %s in study %s, %sseries %s, job %d",
                        f["name"], f["probability"], f.get("priority", "?"), job.model, series.study_uid,
                        f"accession {series.accession or '-'}, " if phi else "", series.series_uid, job.id,
                        extra={"job_id": job.id, "finding": f["name"], "probability": f["probability"],
                               "study_uid": series.study_uid, **({"accession": series.accession} if phi else {})})
        for line in outcome.fired:
            log.info("%s: on_result %s", where, line, extra={"job_id": job.id, "on_result": line})
        self.wake_deliveries()
        if outcome.notifications:
            self.wake_notifications()

    def _withdraw(self, state: NodeState, job: JobRow, series: Any, objects: list[dict[str, Any]],
                  why: str) -> None:
        """Results the node no longer stands by (superseded, or their re-run failed): recorded
        in the audit, and, to each destination that received them and has ``supersede =
        "iocm"``, an IHE IOCM rejection note (KOS, "Rejected for Quality Reasons")."""
        if not objects:
            return
        uids = sorted(o["sop_instance_uid"] for o in objects)
        self.db.audit("node", "withdrawn", series.series_uid, job_id=job.id, result_uids=uids, why=why[:200])
        config = state.config
        targets = []
        for name in self.db.result_destinations(job.id):
            try:
                if config.resolve_destination(name).supersede == "iocm":
                    targets.append(name)
            except ConfigError:
                continue                     # no longer configured: nothing to tell it
        runtime = state.models.get(job.model)
        if not targets or runtime is None:
            return
        try:
            source = pydicom.dcmread(self.db.series_paths(job.series_id)[0], stop_before_pixels=True)
            key = f"{series.series_uid}|{job.model}|rejection|{'|'.join(uids)}"
            note = encode_rejection(source, objects, runtime.manifest, key, why)
            path = self.store.result_dir(job.id) / f"rejection-{hashlib.sha256(key.encode()).hexdigest()[:12]}.dcm"
            self.store.write_atomic(path, (part10_bytes(note),))
            self.db.queue_files(job.id, "rejection", [str(path)], targets, job.priority)
        except Exception as exc:  # noqa: BLE001 - the audit has it; the note must not break the job's end
            log.error("job %d: the rejection note for %d earlier objects could not be made: %s", job.id,
                      len(objects), first_line(exc))
            return
        log.info("job %d: %d earlier result objects withdrawn (%s); rejection note %s to %s", job.id, len(objects),
                 why[:120], note.SOPInstanceUID, ", ".join(targets), extra={"job_id": job.id})
        self.wake_deliveries()

    def _run_job(self, state: NodeState, job: JobRow, series_uid: str) -> tuple[dict[str, Any], list[str]]:
        runtime = state.models.get(job.model)
        if runtime is None:
            raise PermanentError(f"model {job.model!r} is not loaded (no route names it any more)")
        manifest = runtime.manifest
        timings: dict[str, float] = {}
        t = time.perf_counter()
        paths = [Path(p) for p in self.db.series_paths(job.series_id)]
        if not paths:
            raise PermanentError("the series has no stored instances (removed by retention?)")
        first = _first_header(paths[0])
        runtime.check_headers(str(first.get("Modality", "") or ""), str(first.get("SOPClassUID", "") or ""),
                              len(paths))
        # A result's UIDs follow its input: the same instances and model version give the
        # same UIDs (a re-send replaces), changed content (late instances) gives new ones.
        fingerprint = input_fingerprint(paths)
        job_key = f"{series_uid}|{manifest.name}|{manifest.version}|{fingerprint}"
        if manifest.input.kind == "image" and len(paths) > 1:
            return self._run_images(runtime, job, paths, job_key, fingerprint, timings, t)
        # A 2D model gets its planes decoded batch by batch; a volume model needs them all.
        volume = load_series(paths, lazy=manifest.input.kind != "volume")
        timings["decode"] = time.perf_counter() - t

        prediction = runtime.run(volume)
        _add_timings(timings, prediction.timings)
        headers, frames = volume.headers, volume.frames
        del volume                           # the encoder needs the headers only, not the pixels

        t = time.perf_counter()
        summary: dict[str, Any] = {"model": manifest.name, "version": manifest.version,
                                   "provider": prediction.provider, "slices": len(headers),
                                   "input_fingerprint": fingerprint}
        if prediction.masks is not None:
            result = encode_segmentation(headers, prediction.masks, manifest, job_key, frames=frames)
            outputs = {"seg.dcm": result.seg, "sr.dcm": result.sr}
            summary["volumes_ml"] = {v.name: round(v.volume_ml, 3) for v in result.volumes}
        else:
            assert prediction.scores is not None
            sr, findings = encode_classification(headers, prediction.scores, manifest, job_key)
            outputs = {"sr.dcm": sr}
            summary["findings"] = [dict(name=f.name, probability=round(f.probability, 4), positive=f.positive,
                                        priority=f.priority) for f in findings]
        return self._finish_outputs(job, outputs, summary, timings, t)

    def _finish_outputs(self, job: JobRow, outputs: dict[str, pydicom.Dataset], summary: dict[str, Any],
                        timings: dict[str, float], t: float) -> tuple[dict[str, Any], list[str]]:
        summary["results"] = [dict(sop_class_uid=str(ds.SOPClassUID), sop_instance_uid=str(ds.SOPInstanceUID),
                                   series_instance_uid=str(ds.SeriesInstanceUID), modality=str(ds.Modality))
                              for ds in outputs.values()]
        files = self._write_results(job.id, outputs)
        summary["result_uids"] = [str(ds.SOPInstanceUID) for ds in outputs.values()]
        timings["encode"] = time.perf_counter() - t
        summary["timings"] = {k: round(v, 4) for k, v in timings.items()}
        return summary, files

    def _run_images(self, runtime: ModelRuntime, job: JobRow, paths: list[Path], job_key: str, fingerprint: str,
                    timings: dict[str, float], t: float) -> tuple[dict[str, Any], list[str]]:
        """An ``image`` model on a series of several images (a PA and a lateral, say): each
        image is classified on its own; one SR holds each image's findings, and the series'
        findings (the most probable image per finding) drive triage."""
        manifest = runtime.manifest
        per_image: list[tuple[pydicom.Dataset, Any]] = []
        timings["decode"] = 0.0
        provider = ""
        for path in sorted(paths, key=lambda p: p.name):
            t0 = time.perf_counter()
            volume = load_series([path])
            timings["decode"] += time.perf_counter() - t0
            prediction = runtime.run(volume)
            _add_timings(timings, prediction.timings)
            provider = prediction.provider
            assert prediction.scores is not None
            per_image.append((volume.headers[0], prediction.scores))
        t = time.perf_counter()
        sr, findings, images = encode_image_classifications(per_image, manifest, job_key)
        summary: dict[str, Any] = {"model": manifest.name, "version": manifest.version, "provider": provider,
                                   "slices": len(per_image), "input_fingerprint": fingerprint,
                                   "findings": [dict(name=f.name, probability=round(f.probability, 4),
                                                     positive=f.positive, priority=f.priority) for f in findings],
                                   "images": images}
        return self._finish_outputs(job, {"sr.dcm": sr}, summary, timings, t)

    def _write_results(self, job_id: int, outputs: dict[str, pydicom.Dataset]) -> list[str]:
        folder = self.store.result_dir(job_id)
        files = []
        for name, ds in outputs.items():
            path = folder / name
            self.store.write_atomic(path, (part10_bytes(ds),))
            files.append(str(path))
        return files


class Node:
    """A running node: ingest plus the background stages, over one database and file store."""

    def __init__(self, config: Config) -> None:
        config.node.data_dir.mkdir(parents=True, exist_ok=True)
        self.store = FileStore(config.node.data_dir, fsync=config.ingest.fsync, owner=config.node.name)
        self.db = Database(config.node.effective_database_url, root=config.node.data_dir, node=config.node.name)
        self.db.create()
        models, stamps = load_models(config)
        self._state = NodeState(config, models, stamps)
        self._reload_lock = threading.Lock()
        self.metrics = Metrics()
        self.metrics.models_loaded({name: rt.describe() for name, rt in models.items()})
        self.metrics.node_info.labels(config.node.name, config.node.role).set(1)
        self.ingest = Ingest(config, self.store, self.db, self.metrics)
        self._client_tls = client_context(config.tls) if any(d.tls for d in config.destinations) else None
        self._stop = threading.Event()
        self._started = False
        self._ingest_processes: list[multiprocessing.process.BaseProcess] = []
        current = lambda: self._state.config  # noqa: E731 - read at every item: a reload swaps it
        self.dispatch = Dispatcher(self._stop, self.db, current, lambda: self._client_tls, self.metrics)
        self.notifier = Notifier(self._stop, self.db, current, self.metrics)
        self.infer = Inference(self._stop, self.db, self.store, lambda: self._state,
                               self.dispatch.wake, self.notifier.wake, self.metrics)
        self.assembler = Assembler(self._stop, self.db, current, self.infer.wake, self.dispatch.wake, self.metrics)
        self.housekeeping = Housekeeping(self._stop, self.db, self.store, current, self._beat)
        self._started_at = time.time()
        self._check_webhook(config)

    @property
    def config(self) -> Config:
        return self._state.config

    @property
    def models(self) -> Mapping[str, ModelRuntime]:
        return self._state.models

    @property
    def stages(self) -> tuple[Stage, ...]:
        """The stages this node's role runs: an ingest node completes, routes and delivers; a
        worker infers and hands its results to delivery (rows an ingest node's stage sends)."""
        node = self.config.node
        return ((self.assembler, self.dispatch, self.notifier) if node.ingests else ()) \
            + ((self.infer,) if node.infers else ()) + (self.housekeeping,)

    def doing(self) -> str:
        """What the node is doing, in a few words (its heartbeat in the database says it)."""
        job = self.infer.current
        parts = []
        if self.config.node.ingests:
            n = len(self.ingest.ae.active_associations)
            parts.append(f"{n} association{'' if n == 1 else 's'}")
        if self.config.node.infers:
            parts.append(f"job {job.id} ({job.model})" if job is not None else "idle")
        return ", ".join(parts)

    def _beat(self) -> None:
        node = self.config.node
        listener = f"{node.ae_title}@{node.host}:{node.port}" if node.ingests else ""
        self.db.node_beat(NodeBeat(node.name, node.role, socket.gethostname(), os.getpid(), listener,
                                   sorted(self.models), self.doing(), self._started_at))

    def wake(self) -> None:
        """Look for work now (after an operator's retry, say)."""
        for stage in self.stages:
            stage.wake()

    # -------------------------------------------------------------- reload
    def reload(self, new: Config) -> list[str]:
        """Swap in a new configuration (and its models) without stopping anything.

        Settings the listener was built with (:data:`node.config.reload.RESTART_KEYS`) keep their running
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
            self.ingest.config = self.ingest.intake.config = effective
            self._write_status()                 # the models and providers now in use
            self.metrics.models_loaded({name: rt.describe() for name, rt in models.items()})
        self._check_webhook(effective)
        loaded = sorted(set(models) - {n for n, s in old.stamps.items() if stamps.get(n) == s})
        log.info("configuration reloaded: %d routes, %d destinations%s", len(effective.routes),
                 len(effective.destinations), f"; models loaded: {', '.join(loaded)}" if loaded else "",
                 extra={"routes": [r.name for r in effective.routes], "models_loaded": loaded})
        for line in restart:
            log.warning("reload: %s; the running value stays", line, extra={"restart_needed": line})
        self.infer.wake()
        self.dispatch.wake()
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
        stall = self.config.node.stall_timeout_s
        given_back = self.db.requeue_stalled(time.time() - stall if self.db.shared else None)
        if removed or given_back:
            log.info("recovered after restart: %d partial files removed, %d jobs/deliveries given back",
                     removed, given_back)
        self._started = True
        if self.config.node.ingests:
            self._start_ingest()
        else:
            log.info("node %s is a worker: no listener; it runs %s", self.config.node.name,
                     ", ".join(sorted(self.models)) or "no models")
        self._write_status(started_at=time.time())
        for stage in self.stages:
            stage.start(threads=2 if stage is self.dispatch else 1)

    def _start_ingest(self) -> None:
        extra = self.config.ingest.processes - 1
        self.ingest.start(reuse_port=extra > 0)
        spawn = multiprocessing.get_context("spawn")
        for k in range(extra):
            proc = spawn.Process(target=serve_ingest_only, args=(self.config,), name=f"ingest-{k + 2}", daemon=True)
            proc.start()
            self._ingest_processes.append(proc)
        if extra:
            log.info("%d ingest processes share port %d", extra + 1, self.config.node.port)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop accepting, let the current job and deliveries finish (up to ``timeout``)."""
        for proc in self._ingest_processes:
            proc.terminate()
        self.ingest.stop()
        for proc in self._ingest_processes:
            proc.join(15)
        self._stop.set()
        deadline = time.monotonic() + timeout
        for stage in self.stages:
            stage.join(deadline)
        if self._started:
            try:
                self.db.node_stopped(self.config.node.name)
            except SQLAlchemyError as exc:
                log.warning("could not record this node's stop: %s", first_line(exc))
        self.db.close()
        if self._started:
            self._write_status(stopped_at=time.time())

    def _write_status(self, **changes: float) -> None:
        """Write ``data_dir/nodes/<name>/status.json`` (pid, role, listener, models and their providers)."""
        path = node_dir(self.config.node.data_dir, self.config.node.name) / STATUS_FILE
        status: dict[str, Any] = {}
        if "started_at" not in changes and path.is_file():
            status = json.loads(path.read_text())
        status.update(
            pid=os.getpid(), version=__version__, name=self.config.node.name, role=self.config.node.role,
            ae_title=self.config.node.ae_title,
            host=self.config.node.host, port=self.config.node.port,
            models={name: runtime.describe() for name, runtime in self.models.items()}, **changes)
        self.store.write_atomic(path, (json.dumps(status, indent=2).encode(),))


def node_status(config: Config) -> dict | None:
    """What this node's ``status.json`` says about it, with ``running`` worked out."""
    path = config.node.data_dir / "nodes" / safe_name(config.node.name) / STATUS_FILE
    if not path.is_file():
        return None
    status = json.loads(path.read_text())
    running = "stopped_at" not in status
    if running:
        try:
            os.kill(int(status["pid"]), 0)
        except ProcessLookupError:
            running = False          # killed without a graceful stop
        except PermissionError:
            pass
    status["running"] = running
    return status


def _add_timings(timings: dict[str, float], more: Mapping[str, float]) -> None:
    """Add a stage's seconds to the job's (decode is timed at load and again inside the run)."""
    for stage, seconds in more.items():
        timings[stage] = timings.get(stage, 0.0) + seconds


def input_fingerprint(paths: Sequence[Path]) -> str:
    """What a job's input was: the stored instances (SOP Instance UIDs, from the file names
    the node gave them, and sizes), as a short hash. Equal input, equal fingerprint."""
    digest = hashlib.sha256()
    for path in sorted(paths, key=lambda p: p.name):
        digest.update(f"{path.name}:{path.stat().st_size};".encode())
    return digest.hexdigest()[:16]


def _first_header(path: Path) -> pydicom.Dataset:
    """The header of one instance of a series, without its pixel data."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Modality", "SOPClassUID"])
    except Exception as exc:  # noqa: BLE001 - an unreadable file is the input's problem
        raise InputError(f"{path.name}: not a readable DICOM file ({type(exc).__name__}: {exc})") from exc
