"""The figure that matters for triage: last instance acknowledged -> SEG + SR at the PACS.

    python benchmarks/completion.py [--slices 64] [--size 256] [--repeat 3] [--timer 10]
                                    [--modes timer mpps release]

A CT series goes by DCMTK storescu into ``ainode serve`` (ct-tissue, CPU) and the results to
DCMTK storescp on loopback (``--pacs storescp``, the default: it runs ``date`` after each
object it has written, which notes when each arrives) or to pynetdicom's storage SCP in this
process (``--pacs pynetdicom``). Three ways the series is known to be
complete: the quiet timer alone (``series_timeout_s``, ``--timer``), an MPPS COMPLETED sent right after
the last instance (pynetdicom's SCU), and the release of the association by a sender named in
``ingest.complete_on_release`` (grace 0.5 s). Printed beside Orthanc's and mercure's default
stability times (60 s each: nothing is analysed before), and the model's own compute from the
node's log, and the job's stages as the node logged them (medians). Figures, not assertions.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import pydicom  # noqa: E402
from pydicom.dataset import Dataset  # noqa: E402
from pynetdicom import AE  # noqa: E402
from pynetdicom.sop_class import ModalityPerformedProcedureStep  # noqa: E402

from node.demo import DemoPacs  # noqa: E402
from node.inference.manifest import load_manifest  # noqa: E402
from node.inference.models import build_reference_model  # noqa: E402
from node.synthetic.ct import make_ct_series  # noqa: E402

ENV = {**os.environ, "TCP_NODELAY": "1"}
REFERENCE_STABILITY_S = {"Orthanc (StableAge default)": 60.0, "mercure (series timeout default)": 60.0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class StorescpPacs:
    """DCMTK storescp as the PACS: ``received`` gets (arrival time, "") for each object written
    (its ``--exec-on-reception`` runs ``date`` once the file is on disk)."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.received: list[tuple[float, str]] = []
        self.proc = subprocess.Popen(["/usr/bin/storescp", "-aet", "PACS", "-od", str(folder), "+xa", "-pdu", "131072",
                                      "-xcr", "date +%s.%N", str(self.port)], env=ENV,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + 30
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("storescp did not start")
            time.sleep(0.05)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.received.append((float(line.strip()), ""))
            except ValueError:
                pass

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def mpps(port: int, phantom, files) -> None:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(ModalityPerformedProcedureStep)
    assoc = ae.associate("127.0.0.1", port, ae_title="AINODE")
    uid = pydicom.uid.generate_uid(prefix="1.2.826.0.1.3680043.10.67.")
    create = Dataset()
    create.PerformedProcedureStepStatus = "IN PROGRESS"
    assoc.send_n_create(create, ModalityPerformedProcedureStep, uid)
    done = Dataset()
    done.PerformedProcedureStepStatus = "COMPLETED"
    item = Dataset()
    item.SeriesInstanceUID = phantom.series_uid
    item.ReferencedImageSequence = []
    for f in files:
        ref = Dataset()
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
        item.ReferencedImageSequence.append(ref)
    done.PerformedSeriesSequence = [item]
    assoc.send_n_set(done, ModalityPerformedProcedureStep, uid)
    assoc.release()


def run(mode: str, phantom, work: Path, models: Path, timer: float,
        pacs_kind: str = "storescp") -> tuple[float, dict[str, float]]:
    """Seconds from the last instance acknowledged to both results at the PACS, and the
    job's stage timings the node logged."""
    data = work / f"node-{mode}"
    pacs = StorescpPacs(work / f"pacs-{mode}") if pacs_kind == "storescp" else DemoPacs("PACS")
    shutil.rmtree(data, ignore_errors=True)
    port = free_port()
    config = work / f"{mode}.toml"
    config.write_text(f'[node]\nhost = "127.0.0.1"\nport = {port}\ndata_dir = "{data}"\n'
                      f'[ingest]\nseries_timeout_s = {timer}\nmin_free_disk_mb = 100\n'
                      f'complete_on_release = ["ARCHIVE"]\nrelease_grace_s = 0.5\n'
                      f'[inference]\nmodels_dir = "{models}"\nproviders = ["CPUExecutionProvider"]\n'
                      f'[http]\nenabled = false\n'
                      f'[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\nport = {pacs.port}\n'
                      f'[[routes]]\nname = "ct"\nmatch = {{ Modality = "CT" }}\nmodels = ["ct-tissue"]\n'
                      f'send_to = ["pacs"]\n')
    log = work / f"{mode}.log"
    proc = subprocess.Popen([sys.executable, "-m", "node.cli", "serve", "--config", str(config)], cwd=str(REPO),
                            stdout=log.open("wb"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while "serving" not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(log.read_text()[-2000:])
            time.sleep(0.1)
        files = [str(f) for f in phantom.files]
        subprocess.run(["/usr/bin/storescu", "-aet", "ARCHIVE" if mode == "release" else "CTSCANNER",
                        "-aec", "AINODE", "127.0.0.1", str(port), *files], env=ENV, check=True,
                       capture_output=True)
        last = time.time()                      # storescu returns after the last response
        if mode == "mpps":
            mpps(port, phantom, phantom.files)
        deadline = time.monotonic() + 300
        while len(pacs.received) < 2:
            if time.monotonic() > deadline:
                raise RuntimeError("no results: " + log.read_text()[-2000:])
            time.sleep(0.02)
        arrived = max(t for t, _ in pacs.received)
    finally:
        proc.terminate()
        proc.wait(60)
        pacs.stop()
    stages = re.findall(r"done in [\d.]+ s: (.*)", log.read_text())[-1]
    return arrived - last, {k: float(v) for k, v in re.findall(r"(\w+) (\d+\.\d+)s", stages)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", type=int, default=64)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--timer", type=float, default=10.0, help="series_timeout_s of the quiet-timer runs")
    ap.add_argument("--pacs", choices=["storescp", "pynetdicom"], default="storescp")
    ap.add_argument("--modes", nargs="+", choices=["timer", "mpps", "release"], default=["timer", "mpps", "release"])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="ainode-completion-") as tmp:
        work = Path(tmp)
        models = work / "models"
        shutil.copytree(REPO / "models" / "ct-tissue", models / "ct-tissue",
                        ignore=shutil.ignore_patterns("model.onnx", "__pycache__"))
        build_reference_model(load_manifest(models / "ct-tissue"))
        phantom = make_ct_series(work / "ct", slices=args.slices, size=args.size)
        print(f"{args.slices} x {args.size}^2 CT, ct-tissue on the CPU; last instance acknowledged -> "
              f"SEG + SR at the PACS ({args.pacs}); median of {args.repeat}")
        names = {"timer": f"quiet timer (series_timeout_s = {args.timer:g})", "mpps": "MPPS COMPLETED",
                 "release": "association release (grace 0.5 s)"}
        stages = ("decode", "preprocess", "run", "postprocess", "encode")
        print(f"{'how the series is known complete':40s} {'seconds':>8s} " + " ".join(f"{s:>11s}" for s in stages))
        for mode in args.modes:
            figures = [run(mode, phantom, work, models, args.timer, args.pacs) for _ in range(args.repeat)]
            print(f"{names[mode]:40s} {statistics.median(f[0] for f in figures):8.2f} "
                  + " ".join(f"{statistics.median(f[1].get(s, 0.0) for f in figures):11.2f}" for s in stages))
        for name, seconds in REFERENCE_STABILITY_S.items():
            print(f"{name:40s} {'>= ' + format(seconds, '.0f'):>8s}  (before any analysis starts)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
