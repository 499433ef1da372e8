"""Ingest throughput: DCMTK storescp and ``ainode serve`` on the same data, in the same run.

    python benchmarks/ingest.py [--slices 300] [--size 512] [--parallel 1 2 4] [--repeat 3]
    python benchmarks/ingest.py --load 8 --slices 200 [--processes 1 2]

The first form splits one series over 1, 2, 4 associations. ``--load N`` is the load test:
N senders at once, each with its own series, each on its own association; afterwards every
instance must be stored once and every series assembled once.

DCMTK's storescu sends a synthetic CT series over loopback to DCMTK's storescp (the
reference: writes files, no database), to Orthanc (Debian package: 128 KiB PDU,
SyncStorageArea, TCP_NODELAY), to pynetdicom receiving and discarding (its floor), and to
``ainode serve`` (atomic files plus a
committed SQLite row before each acknowledgement). All DCMTK tools run with TCP_NODELAY=1.
Prints instances/s and MB/s for each, and the ratio. Figures, not assertions.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from node.synthetic.ct import make_ct_series  # noqa: E402

DCMTK = Path("/usr/bin")
ENV = {**os.environ, "TCP_NODELAY": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"port {port} never opened")


def wait_file(path: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} never appeared")
        time.sleep(0.05)


#: Peak RSS (MB) of the last run of each receiver, its child processes included.
PEAK_MB: dict[str, float] = {}


def peak_rss_mb(pid: int) -> float:
    """VmHWM of a process and its children (ingest.processes > 1), in MB."""
    total = 0.0
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    for p in [str(pid), *children]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) / 1024
        except OSError:
            pass
    return total


def send(files: list[Path] | list[list[Path]], aec: str, port: int, parallel: int) -> float:
    """Seconds for ``parallel`` storescu processes (one association each) to send all files.

    ``files`` is one list to split, or one list per sender."""
    chunks = files if isinstance(files[0], list) else [files[i::parallel] for i in range(parallel)]
    t = time.perf_counter()
    procs = [subprocess.Popen([str(DCMTK / "storescu"), "-aet", "BENCH", "-aec", aec, "127.0.0.1", str(port),
                               *map(str, chunk)], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for chunk in chunks]
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"storescu failed: {err.decode()[-500:]}")
    return time.perf_counter() - t


def run_storescp(files: list[Path], work: Path, parallel: int) -> float:
    out = work / "storescp"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    port = free_port()
    proc = subprocess.Popen([str(DCMTK / "storescp"), "-od", str(out), "+xa", str(port)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        seconds = send(files, "STORESCP", port, parallel)
    finally:
        proc.terminate()
        proc.wait()
    assert len(list(out.iterdir())) == _count(files), "storescp did not store every file"
    return seconds


def run_orthanc(files: list[Path], work: Path, parallel: int) -> float:
    """Orthanc from the Debian package, tuned as the references are quoted: 128 KiB PDU,
    SyncStorageArea (its durability), TCP_NODELAY."""
    folder = work / "orthanc"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    port, http = free_port(), free_port()
    config = {"Name": "bench", "DicomAet": "ORTHANC", "DicomPort": port, "HttpPort": http,
              "StorageDirectory": str(folder / "db"), "IndexDirectory": str(folder / "db"),
              "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "Plugins": [],
              "MaximumPduLength": 131072, "SyncStorageArea": True, "DicomAlwaysAllowStore": True,
              "DicomCheckCalledAet": False, "SaveJobs": False}
    (folder / "orthanc.json").write_text(json.dumps(config))
    proc = subprocess.Popen(["/usr/sbin/Orthanc", str(folder / "orthanc.json")], cwd=folder, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        seconds = send(files, "ORTHANC", port, parallel)
        PEAK_MB["orthanc"] = peak_rss_mb(proc.pid)
        with urllib.request.urlopen(f"http://127.0.0.1:{http}/statistics", timeout=30) as r:
            stored = json.loads(r.read())["CountInstances"]
    finally:
        proc.terminate()
        proc.wait()
    assert stored == _count(files), f"Orthanc stored {stored} of {_count(files)}"
    return seconds


#: pynetdicom receiving and discarding: the floor of what pynetdicom itself can receive.
_FLOOR = """
import sys
from pynetdicom import AE, evt, AllStoragePresentationContexts, ALL_TRANSFER_SYNTAXES
ae = AE("FLOOR")
ae.maximum_pdu_size = 1048576
for cx in AllStoragePresentationContexts:
    ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
ae.start_server(("127.0.0.1", int(sys.argv[1])), evt_handlers=[(evt.EVT_C_STORE, lambda e: 0x0000)])
"""


def run_floor(files: list[Path], work: Path, parallel: int) -> float:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", _FLOOR, str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        return send(files, "FLOOR", port, parallel)
    finally:
        proc.terminate()
        proc.wait()


def _count(files) -> int:
    return sum(len(f) for f in files) if isinstance(files[0], list) else len(files)


def run_node(files, work: Path, parallel: int, fsync: bool, processes: int = 1,
             timeout_s: float = 3600, http: bool = True) -> float:
    data = work / "node"
    shutil.rmtree(data, ignore_errors=True)
    port = free_port()
    config = work / "bench.toml"
    config.write_text(f'[node]\nhost = "127.0.0.1"\nport = {port}\ndata_dir = "{data}"\nname = "bench"\n'
                      f'[ingest]\nseries_timeout_s = {timeout_s}\nmin_free_disk_mb = 100\nfsync = {str(fsync).lower()}\n'
                      f'processes = {processes}\nmax_associations_per_address = 64\n'
                      f'[http]\nenabled = {str(http).lower()}\nport = {free_port()}\n')
    proc = subprocess.Popen([sys.executable, "-m", "node.cli", "--log-level", "WARNING", "serve", "--config",
                             str(config)], cwd=str(REPO), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_port(port)
        wait_file(data / "nodes" / "bench" / "ainode.pid")      # fully started (the HTTP face comes up after the listener)
        seconds = send(files, "AINODE", port, parallel)
        PEAK_MB["node"] = peak_rss_mb(proc.pid)
        if timeout_s < 60:                                    # load test: wait for assembly
            time.sleep(timeout_s + 2)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    with sqlite3.connect(data / "node.db") as db:
        stored = db.execute("select count(*) from instances").fetchone()[0]
        assembled = db.execute("select count(*) from series where status = 'assembled'").fetchone()[0]
    assert stored == _count(files), f"node stored {stored} of {_count(files)}: {err.decode()[-2000:]}"
    if timeout_s < 60:
        assert assembled == len(files), f"{assembled} series assembled of {len(files)}"
    errors = [line for line in err.decode().splitlines() if " ERROR " in line or "locked" in line]
    assert not errors, "\n".join(errors[:10])
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--parallel", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--repeat", type=int, default=3, help="runs per figure; the median is shown")
    ap.add_argument("--load", type=int, default=0, metavar="N", help="N senders, each with its own series")
    ap.add_argument("--processes", type=int, nargs="+", default=[1], help="ingest.processes values to try")
    args = ap.parse_args()
    if args.load:
        return load_test(args)

    with tempfile.TemporaryDirectory(prefix="ainode-bench-") as tmp:
        work = Path(tmp)
        t = time.perf_counter()
        phantom = make_ct_series(work / "series", slices=args.slices, size=args.size)
        files = list(phantom.files)
        mb = sum(f.stat().st_size for f in files) / 1e6
        print(f"series: {len(files)} CT instances of {args.size}x{args.size}, {mb:.1f} MB "
              f"(made in {time.perf_counter() - t:.1f} s); {os.cpu_count()} CPUs; median of {args.repeat} runs")
        print(f"{'receiver':34s} {'assoc':>5s} {'seconds':>8s} {'inst/s':>8s} {'MB/s':>8s} {'x storescp':>10s} "
              f"{'x Orthanc':>9s}")
        for parallel in args.parallel:
            ref = statistics.median(run_storescp(files, work, parallel) for _ in range(args.repeat))
            orthanc = statistics.median(run_orthanc(files, work, parallel) for _ in range(args.repeat))
            floor = statistics.median(run_floor(files, work, parallel) for _ in range(args.repeat))
            rows = [("DCMTK storescp", ref), ("Orthanc (tuned)", orthanc), ("pynetdicom, receive and discard", floor)]
            for fsync, http in ((True, True), (True, False), (False, True)):
                seconds = statistics.median(run_node(files, work, parallel, fsync, http=http)
                                            for _ in range(args.repeat))
                rows.append((f"ainode serve (fsync={'on' if fsync else 'off'}{'' if http else ', no HTTP'})",
                             seconds))
            for name, seconds in rows:
                print(f"{name:34s} {parallel:5d} {seconds:8.2f} {len(files) / seconds:8.0f} {mb / seconds:8.1f} "
                      f"{ref / seconds:10.2f} {orthanc / seconds:9.2f}")


def load_test(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="ainode-load-") as tmp:
        work = Path(tmp)
        t = time.perf_counter()
        series = [list(make_ct_series(work / f"series-{k}", slices=args.slices, size=args.size, seed=k,
                                      accession=f"LOAD{k}").files) for k in range(args.load)]
        n = sum(len(s) for s in series)
        mb = sum(f.stat().st_size for s in series for f in s) / 1e6
        print(f"load: {args.load} senders at once, each a {args.slices}-slice {args.size}x{args.size} CT series "
              f"on its own association; {n} instances, {mb:.0f} MB (made in {time.perf_counter() - t:.1f} s); "
              f"{os.cpu_count()} CPUs; median of {args.repeat} runs")
        print(f"{'receiver':36s} {'seconds':>8s} {'inst/s':>8s} {'MB/s':>8s} {'x storescp':>10s} {'x Orthanc':>9s} "
              f"{'peak RSS MB':>11s}")
        ref = statistics.median(run_storescp(series, work, args.load) for _ in range(args.repeat))
        orthanc = statistics.median(run_orthanc(series, work, args.load) for _ in range(args.repeat))
        floor = statistics.median(run_floor(series, work, args.load) for _ in range(args.repeat))
        peaks = {"Orthanc (tuned)": PEAK_MB["orthanc"]}
        rows = [("DCMTK storescp", ref), ("Orthanc (tuned)", orthanc), ("pynetdicom, receive and discard", floor)]
        for processes in args.processes:
            seconds = statistics.median(run_node(series, work, args.load, True, processes, timeout_s=2.0)
                                        for _ in range(args.repeat))
            rows.append((f"ainode serve (processes={processes})", seconds))
            peaks[rows[-1][0]] = PEAK_MB["node"]
        for name, seconds in rows:
            peak = f"{peaks[name]:11.0f}" if name in peaks else f"{'':11s}"
            print(f"{name:36s} {seconds:8.2f} {n / seconds:8.0f} {mb / seconds:8.1f} {ref / seconds:10.2f} "
                  f"{orthanc / seconds:9.2f} {peak}")
        print("every instance stored once, every series assembled once, no errors in the node's log")


if __name__ == "__main__":
    main()
