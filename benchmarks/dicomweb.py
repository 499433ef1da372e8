"""STOW-RS ingest: ``dicomweb-client`` storing a CT into ``ainode serve`` and into Orthanc's
DICOMweb plugin, beside DCMTK ``storescu`` C-STOREing it into the node, in the same run.

    python benchmarks/dicomweb.py [--slices 300] [--size 512] [--repeat 3] [--big-mb 1024]

Prints instances/s and MB/s for each (median of ``--repeat``), the node's peak RSS while it
receives the STOW-RS request, and then, for ``--big-mb``, one STOW-RS body of that size
streamed from a generator (the client holds one part at a time) with the node's peak RSS
before and after: the body goes to disk, not to memory. Figures, not assertions.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pydicom
from dicomweb_client.api import DICOMwebClient

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ingest import REPO, free_port, run_node, wait_file, wait_port  # noqa: E402

from node.synthetic.ct import make_ct_series  # noqa: E402

PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Node:
    def __init__(self, work: Path) -> None:
        self.data = work / "node-web"
        shutil.rmtree(self.data, ignore_errors=True)
        self.http = free_port()
        port = free_port()
        config = work / "web.toml"
        config.write_text(f'[node]\nhost = "127.0.0.1"\nport = {port}\ndata_dir = "{self.data}"\nname = "bench"\n'
                          f'[ingest]\nseries_timeout_s = 3600\nmin_free_disk_mb = 100\n'
                          f'[http]\nport = {self.http}\n')
        self.proc = subprocess.Popen([sys.executable, "-m", "node.cli", "--log-level", "WARNING", "serve",
                                      "--config", str(config)], cwd=str(REPO), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        wait_port(port)
        wait_file(self.data / "nodes" / "bench" / "ainode.pid")
        self.url = f"http://127.0.0.1:{self.http}/dicomweb"

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.communicate(timeout=60)


class Orthanc:
    def __init__(self, work: Path) -> None:
        folder = work / "orthanc"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        self.http = free_port()
        config = {"Name": "bench", "HttpPort": self.http, "DicomPort": free_port(),
                  "StorageDirectory": str(folder / "db"), "IndexDirectory": str(folder / "db"),
                  "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "Plugins": [PLUGIN],
                  "SyncStorageArea": True, "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}
        (folder / "orthanc.json").write_text(json.dumps(config))
        self.proc = subprocess.Popen(["/usr/sbin/Orthanc", str(folder / "orthanc.json")], cwd=folder,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{self.http}/system", timeout=2)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise RuntimeError("Orthanc did not start") from None
                time.sleep(0.1)
        self.url = f"http://127.0.0.1:{self.http}/dicom-web"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def stow(url: str, datasets: list[pydicom.Dataset]) -> float:
    client = DICOMwebClient(url=url)
    t = time.perf_counter()
    answer = client.store_instances(datasets)
    seconds = time.perf_counter() - t
    assert len(answer.ReferencedSOPSequence) == len(datasets), "not every instance stored"
    return seconds


def big_upload(url: str, template: bytes, megabytes: int) -> tuple[float, int]:
    boundary = "benchboundary"
    head = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
    parts = max(1, megabytes * 1048576 // len(template))

    def body():
        for _ in range(parts):
            yield head + template + b"\r\n"
        yield f"--{boundary}--\r\n".encode()

    t = time.perf_counter()
    r = httpx.post(f"{url}/studies", content=body(), timeout=3600,
                   headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'})
    assert r.status_code == 200, r.text[:500]
    return time.perf_counter() - t, parts * (len(head) + len(template) + 2)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--big-mb", type=int, default=1024)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        phantom = make_ct_series(work / "ct", slices=args.slices, size=args.size)
        files = sorted(phantom.files)
        mb = sum(f.stat().st_size for f in files) / 1e6
        datasets = [pydicom.dcmread(f) for f in files]
        print(f"{len(files)} instances, {mb:.1f} MB, one association / one request each, median of {args.repeat}")
        rows: dict[str, list[float]] = {"C-STORE (storescu) -> ainode": [], "STOW-RS (dicomweb-client) -> ainode": [],
                                        "STOW-RS (dicomweb-client) -> Orthanc": []}
        rss = []
        for _ in range(args.repeat):
            rows["C-STORE (storescu) -> ainode"].append(run_node(files, work, 1, fsync=True))
            node = Node(work)
            try:
                rows["STOW-RS (dicomweb-client) -> ainode"].append(stow(node.url, datasets))
                rss.append(peak_rss_mb(node.proc.pid))
            finally:
                node.stop()
            orthanc = Orthanc(work)
            try:
                rows["STOW-RS (dicomweb-client) -> Orthanc"].append(stow(orthanc.url, datasets))
            finally:
                orthanc.stop()
        base = statistics.median(rows["STOW-RS (dicomweb-client) -> Orthanc"])
        print(f"{'sender -> receiver':40} {'inst/s':>8} {'MB/s':>8} {'x Orthanc STOW':>15}")
        for name, secs in rows.items():
            s = statistics.median(secs)
            print(f"{name:40} {len(files) / s:8.1f} {mb / s:8.1f} {base / s:15.2f}")
        print(f"node peak RSS after the STOW-RS of {mb:.0f} MB: {statistics.median(rss):.0f} MB")
        if args.big_mb:
            del datasets
            node = Node(work)
            try:
                before = peak_rss_mb(node.proc.pid)
                seconds, size = big_upload(node.url, files[0].read_bytes(), args.big_mb)
                after = peak_rss_mb(node.proc.pid)
            finally:
                node.stop()
            print(f"one STOW-RS body of {size / 1e6:.0f} MB (streamed by the client): {seconds:.1f} s, "
                  f"{size / 1e6 / seconds:.0f} MB/s; node peak RSS {before:.0f} MB before, {after:.0f} MB after")
    return 0


if __name__ == "__main__":
    sys.exit(main())
