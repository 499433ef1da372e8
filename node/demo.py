"""``ainode demo``: the whole flow on loopback in a temporary folder, in well under a minute.

A synthetic chest CT (the phantom) is sent to a node; the node stores and assembles it, runs
the demonstration model ``ct-tissue`` and sends SEG and SR to a small receiving PACS, which
the demo then reads to print what came back, beside the phantom's known volumes.
"""

from __future__ import annotations

import logging
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pydicom
from pynetdicom import AE, evt
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification

from node.config.schema import PRIORITY_NAMES, parse_config
from node.inference.manifest import load_manifest
from node.inference.models import build_reference_model
from node.dicom.deliver import Peer, send_files
from node.dicom.listener import TRANSFER_SYNTAXES
from node.synthetic.ct import make_ct_series
from node.synthetic.radiograph import make_chest_radiograph

if TYPE_CHECKING:
    from node.worker import Node

MODEL = "ct-tissue"
XR_MODEL = "chest-xray-demo"


class DemoPacs:
    """A minimal receiving PACS: a storage SCP that keeps what it receives in memory."""

    def __init__(self, ae_title: str = "DEMOPACS", port: int = 0) -> None:
        self.ae_title = ae_title
        self.received: list[tuple[float, pydicom.Dataset]] = []
        self._lock = threading.Lock()
        ae = AE(ae_title=ae_title)
        ae.add_supported_context(Verification)
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, TRANSFER_SYNTAXES)
        self._ae = ae
        self._server = ae.start_server(("127.0.0.1", port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        self.port = int(self._server.server_address[1])

    def _on_store(self, event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        with self._lock:
            self.received.append((time.time(), ds))
        return 0x0000

    def stop(self) -> None:
        self._server.shutdown()


def find_models_dir() -> Path:
    """The repository's ``models/`` (current folder first, then beside the package)."""
    for candidate in (Path.cwd() / "models", Path(__file__).resolve().parent.parent / "models"):
        if (candidate / MODEL / "model.toml").is_file():
            return candidate
    raise FileNotFoundError(f"no models/{MODEL}/model.toml found (run the demo from the repository)")


def ensure_reference_model(models_dir: Path, name: str = MODEL) -> None:
    """Build ``<name>/model.onnx`` with its script if it is not there yet."""
    manifest = load_manifest(models_dir / name)
    if not manifest.onnx_path.is_file():
        print(f"building the reference model: {manifest.onnx_path}")
        build_reference_model(manifest)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_demo(slices: int = 64, size: int = 256, keep: bool = False,
             pictures: Path = Path("ainode-demo-pictures")) -> int:
    """Run the tour; returns the process exit code (0 when results came back)."""
    from node.worker import Node

    logging.getLogger("node").setLevel(logging.WARNING)
    t_start = time.perf_counter()
    models_dir = find_models_dir()
    for name in (MODEL, XR_MODEL):
        ensure_reference_model(models_dir, name)
    tmp = tempfile.TemporaryDirectory(prefix="ainode-demo-")
    root = Path(tmp.name)
    print(f"pacs-ai-node demo in {root}")
    print("  ct-tissue is a DEMONSTRATION model (fixed HU thresholds, not trained, not for clinical use)")
    print("  chest-xray-demo is a DEMONSTRATION model (fitted on synthetic images only, not for clinical use)")

    t = time.perf_counter()
    phantom = make_ct_series(root / "scanner", slices=slices, size=size)
    t_phantom = time.perf_counter() - t
    print(f"1. synthetic CT made: {phantom.shape[0]} slices of {phantom.shape[1]}x{phantom.shape[2]} "
          f"in {t_phantom:.2f} s")

    pacs = DemoPacs()
    timeout_s = 2.0
    config = parse_config({
        "node": {"ae_title": "AINODE", "host": "127.0.0.1", "port": _free_port(), "data_dir": str(root / "node")},
        "ingest": {"series_timeout_s": timeout_s, "min_free_disk_mb": 100},
        "inference": {"models_dir": str(models_dir)},
        "delivery": {"backoff_s": 1.0},
        "destinations": [{"name": "pacs", "ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.port}],
        "routes": [{"name": "ct", "match": {"Modality": "CT"}, "models": [MODEL], "send_to": ["pacs"],
                    "priority": "routine"},
                   {"name": "chest-xr", "match": {"Modality": ["DX", "CR"]}, "models": [XR_MODEL],
                    "send_to": ["pacs"], "priority": "routine"}],
    })
    t = time.perf_counter()
    node = Node(config)
    node.start()
    t_node = time.perf_counter() - t
    print(f"2. node AINODE on 127.0.0.1:{config.node.port} and demo PACS {pacs.ae_title} on 127.0.0.1:{pacs.port} "
          f"started in {t_node:.2f} s (model loaded, {node.models[MODEL].provider})")
    try:
        t = time.perf_counter()
        report = send_files(list(phantom.files), Peer("AINODE", "127.0.0.1", config.node.port), "CTSCANNER")
        t_send = time.perf_counter() - t
        mb = sum(f.stat().st_size for f in phantom.files) / 1e6
        print(f"3. scanner sent {report.sent} instances ({mb:.1f} MB) in {t_send:.2f} s "
              f"({report.sent / t_send:.0f} instances/s)")
        if not report.ok:
            print(f"   send failed: {report.failed[:3]}")
            return 1
        sent_at = time.time()
        print(f"4. waiting for the series to be quiet ({timeout_s:.0f} s), inference and delivery ...")
        ok = _wait_for_results(node, pacs, expect=2, timeout=120)
        t_total = time.perf_counter() - t_start
        if not ok or _summary(node, pacs, phantom, sent_at, t_send, t_total):
            return 1
        if _triage(node, pacs, root, config.node.port):
            return 1
        return _pictures(node, pictures)
    finally:
        node.stop()
        pacs.stop()
        if keep:
            tmp_path = root
            tmp._finalizer.detach()  # type: ignore[attr-defined]
            print(f"kept {tmp_path}")
        else:
            tmp.cleanup()


def _triage(node: Node, pacs: DemoPacs, root: Path, port: int) -> int:
    """Step 7: two chest radiographs, one with a synthetic opacity; the findings and worklist."""
    print("7. triage: two synthetic chest radiographs, one with an opacity, go to chest-xray-demo")
    films = [make_chest_radiograph(root / "xr", seed=k, positive=k == 1, accession=f"DEMOXR000{k + 1}",
                                   patient_id=f"PHANTOM-XR-000{k + 1}") for k in range(2)]
    report = send_files([f.path for f in films], Peer("AINODE", "127.0.0.1", port), "XRAYROOM")
    if not report.ok or not _wait_for_results(node, pacs, expect=4, timeout=120):
        return 1
    for job in node.db.jobs_report(2):
        for f in job["summary"].get("findings", []):
            verdict = f"POSITIVE, priority {f['priority']}" if f["positive"] else "negative"
            print(f"   accession {job['accession']}: {f['name']} p={f['probability']:.3f} {verdict} "
                  f"(SR sent to the PACS)")
    print("   worklist, most urgent first (ainode worklist):")
    for row in node.db.worklist(5):
        models = ", ".join(sorted({j["model"] for j in row["jobs"]}))
        print(f"   {PRIORITY_NAMES.get(row['priority'], '?'):8s} accession {row['accession']:12s} {models}")
    return 0


def _pictures(node: Node, folder: Path) -> int:
    """Step 8: the picture of every job, as the dashboard shows it, written to ``folder``."""
    from node.web.api import preview_png

    folder.mkdir(parents=True, exist_ok=True)
    print(f"8. pictures of the results (the job pages of the dashboard show the same), in {folder}:")
    for job in reversed(node.db.jobs_report(10)):
        path = folder / f"job-{job['id']}-{job['model']}-{job['accession'] or 'noacc'}.png"
        path.write_bytes(preview_png(node, job["id"]))
        print(f"   {path}")
    return 0


def _wait_for_results(node: Node, pacs: DemoPacs, expect: int, timeout: float) -> bool:
    deadline = time.time() + timeout
    last = ""
    while time.time() < deadline:
        counts = node.db.counts()
        line = (f"   series {counts['series']}  jobs {counts['jobs']}  deliveries {counts['deliveries']}  "
                f"received by PACS {len(pacs.received)}")
        if line != last:
            print(line)
            last = line
        if len(pacs.received) >= expect:
            return True
        if counts["jobs"].get("failed") or counts["deliveries"].get("failed"):
            print("   a job or delivery failed; see `ainode jobs`", file=sys.stderr)
            return False
        time.sleep(0.2)
    print("   timed out waiting for results", file=sys.stderr)
    return False


def _summary(node, pacs, phantom, sent_at, t_send, t_total) -> int:  # type: ignore[no-untyped-def]
    job = node.db.jobs_report(1)[0]
    print("5. results received by the PACS:")
    for when, ds in pacs.received:
        print(f"   {ds.Modality:3s} {ds.SeriesDescription!s:40s} series {ds.SeriesNumber}  "
              f"study matches: {ds.StudyInstanceUID == phantom.study_uid}")
    print("   segment volumes (SR) vs the phantom's known volumes:")
    for name, value in job["summary"].get("volumes_ml", {}).items():
        truth = phantom.volumes_ml.get(name)
        err = f"{100 * (value - truth) / truth:+.2f}%" if truth else ""
        print(f"   {name:8s} {value:10.1f} mL   truth {truth or 0:10.1f} mL  {err}")
    timings = job["summary"]["timings"]
    delivered = max(when for when, _ in pacs.received)
    print("6. time per stage:")
    rows = [(f"ingest (C-STORE of {phantom.shape[0]} instances)", t_send),
            ("series quiet time (configured)", node.config.ingest.series_timeout_s),
            *timings.items(),
            ("delivery (job done -> PACS has SEG + SR)", delivered - job["finished_at"]),
            ("from last instance sent to results back", delivered - sent_at),
            ("whole demo", t_total)]
    for stage, seconds in rows:
        print(f"   {stage:42s}{seconds:6.2f} s")
    return 0
