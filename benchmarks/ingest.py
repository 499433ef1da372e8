"""Ingest throughput: DCMTK storescp and ``ainode serve`` on the same data, in the same run.

    python benchmarks/ingest.py [--slices 300] [--size 512] [--parallel 1 2 4] [--repeat 3]

DCMTK's storescu sends a synthetic CT series over loopback, once to DCMTK's storescp
(the reference: writes files, no database) and once to ``ainode serve`` (atomic files plus a
committed SQLite row before each acknowledgement). All DCMTK tools run with TCP_NODELAY=1.
Prints instances/s and MB/s for each, and the ratio. Figures, not assertions.
"""

from __future__ import annotations

import argparse
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
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from node.phantom import make_ct_series  # noqa: E402

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


def send(files: list[Path], aec: str, port: int, parallel: int) -> float:
    """Seconds for ``parallel`` storescu processes (one association each) to send all files."""
    chunks = [files[i::parallel] for i in range(parallel)]
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
    assert len(list(out.iterdir())) == len(files), "storescp did not store every file"
    return seconds


def run_node(files: list[Path], work: Path, parallel: int, fsync: bool) -> float:
    data = work / "node"
    shutil.rmtree(data, ignore_errors=True)
    port = free_port()
    config = work / "bench.toml"
    config.write_text(f'[node]\nhost = "127.0.0.1"\nport = {port}\ndata_dir = "{data}"\n'
                      f'[ingest]\nseries_timeout_s = 3600\nmin_free_disk_mb = 100\nfsync = {str(fsync).lower()}\n')
    proc = subprocess.Popen([sys.executable, "-m", "node.cli", "--log-level", "WARNING", "serve", "--config",
                             str(config)], cwd=str(REPO), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_port(port)
        seconds = send(files, "AINODE", port, parallel)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    with sqlite3.connect(data / "node.db") as db:
        stored = db.execute("select count(*) from instances").fetchone()[0]
    assert stored == len(files), f"node stored {stored} of {len(files)}: {err.decode()[-2000:]}"
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--parallel", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--repeat", type=int, default=3, help="runs per figure; the median is shown")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="ainode-bench-") as tmp:
        work = Path(tmp)
        t = time.perf_counter()
        phantom = make_ct_series(work / "series", slices=args.slices, size=args.size)
        files = list(phantom.files)
        mb = sum(f.stat().st_size for f in files) / 1e6
        print(f"series: {len(files)} CT instances of {args.size}x{args.size}, {mb:.1f} MB "
              f"(made in {time.perf_counter() - t:.1f} s); {os.cpu_count()} CPUs; median of {args.repeat} runs")
        print(f"{'receiver':28s} {'assoc':>5s} {'seconds':>8s} {'inst/s':>8s} {'MB/s':>8s} {'x storescp':>10s}")
        for parallel in args.parallel:
            ref = statistics.median(run_storescp(files, work, parallel) for _ in range(args.repeat))
            rows = [("DCMTK storescp", ref)]
            for fsync in (True, False):
                seconds = statistics.median(run_node(files, work, parallel, fsync) for _ in range(args.repeat))
                rows.append((f"ainode serve (fsync={'on' if fsync else 'off'})", seconds))
            for name, seconds in rows:
                print(f"{name:28s} {parallel:5d} {seconds:8.2f} {len(files) / seconds:8.0f} {mb / seconds:8.1f} "
                      f"{ref / seconds:10.2f}")


if __name__ == "__main__":
    main()
