"""Several machines on one: studies per minute with one worker and with two, on a CPU-bound
test model, one ingest node, a PostgreSQL server and one shared data_dir; and how long a
dead worker's job takes to go to the other.

    python benchmarks/cluster.py [--studies 8] [--slices 16] [--size 128] [--iterations 30000]

Each run: the ingest node receives all studies (DCMTK storescu, one association each), the
workers run ``slow-body`` (a matrix-product loop, single-threaded per job) and the results
go to a DCMTK storescp. Time is from the first instance sent to the last job done. Figures,
not assertions.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from conftest import PostgresServer, free_port  # noqa: E402
from nodeproc import NodeProcess, write_config  # noqa: E402
from slowmodel import build_slow_model  # noqa: E402

from node.storage.db import Database  # noqa: E402
from node.synthetic.ct import make_ct_series  # noqa: E402

ENV = {"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"}


def start(tmp: Path, name: str, role: str, url: str, models: Path, pacs: int, stall: float) -> NodeProcess:
    port = free_port()
    config = write_config(tmp / f"{name}.toml", {
        "node": {"name": name, "role": role, "host": "127.0.0.1", "port": port, "data_dir": str(tmp / "shared"),
                 "database_url": url, "heartbeat_s": 1.0, "stall_timeout_s": stall},
        "ingest": {"series_timeout_s": 1.0, "min_free_disk_mb": 0},
        "inference": {"models_dir": str(models), "providers": ["CPUExecutionProvider"], "cpu_threads": 1},
        "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs}],
        "routes": [{"name": "ct", "match": {"Modality": "CT"}, "models": ["slow-body"], "send_to": ["pacs"]}],
    })
    node = NodeProcess(config=config, port=port, data_dir=tmp / "shared", log=tmp / f"{name}.log")
    return node.start_waiting_for(f"node {name} is a worker") if role == "worker" else node.start()


def jobs(url: str) -> list[dict]:
    db = Database(url)
    try:
        return db.jobs_report(1000)
    finally:
        db.close()


def wait_jobs(url: str, n: int, timeout: float = 1800) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        j = jobs(url)
        if len(j) == n and all(x["status"] == "done" for x in j):
            return
        time.sleep(0.2)
    raise RuntimeError(f"jobs not done: {[(x['id'], x['status']) for x in jobs(url)]}")


def run(workers: int, studies: list, models: Path, kill: bool = False) -> float:
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        server = PostgresServer()
        pacs_port = free_port()
        (tmp / "pacs").mkdir()
        pacs = subprocess.Popen(["/usr/bin/storescp", "+xa", "-od", str(tmp / "pacs"), str(pacs_port)],
                                env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        nodes = []
        try:
            ingest = start(tmp, "ingest-1", "ingest", server.url, models, pacs_port, 10.0)
            nodes.append(ingest)
            nodes += [start(tmp, f"worker-{k}", "worker", server.url, models, pacs_port, 10.0)
                      for k in range(workers)]
            t0 = time.monotonic()
            for s in studies:
                subprocess.run(["/usr/bin/storescu", "-aet", "CT1", "-aec", "AINODE", "127.0.0.1", str(ingest.port),
                                *map(str, s.files)], env=ENV, check=True, capture_output=True)
            if kill:
                while not (running := [j for j in jobs(server.url) if j["status"] == "running"]):
                    time.sleep(0.05)
                victim = next(n for n in nodes if n.config.stem == running[0]["worker"])
                victim.process.send_signal(signal.SIGKILL)
                victim.process.wait()
                killed = time.monotonic()
                while not any(j["status"] == "running" and j["worker"] != running[0]["worker"]
                              for j in jobs(server.url) if j["id"] == running[0]["id"]):
                    time.sleep(0.05)
                taken = time.monotonic() - killed
                wait_jobs(server.url, len(studies))
                done = time.monotonic() - killed
                print(f"dead worker (SIGKILL mid-job, stall timeout 10 s, heartbeat 1 s): its job claimed by "
                      f"the other worker {taken:.1f} s later, done {done:.1f} s later")
                return taken
            wait_jobs(server.url, len(studies))
            return time.monotonic() - t0
        finally:
            for n in nodes:
                n.stop()
            pacs.terminate()
            pacs.wait()
            server.remove()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", type=int, default=8)
    ap.add_argument("--slices", type=int, default=16)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--iterations", type=int, default=30000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        models = tmp / "models"
        build_slow_model(models / "slow-body", iterations=args.iterations)
        studies = [make_ct_series(tmp / f"s{k}", slices=args.slices, size=args.size, seed=k,
                                  accession=f"BENCH{k}", patient_id=f"BENCH-{k}") for k in range(args.studies)]
        one = run(1, studies, models)
        two = run(2, studies, models)
        print(f"{args.studies} studies of {args.slices} x {args.size}^2 through slow-body, one ingest node:")
        print(f"  1 worker : {one:6.1f} s  {60 * args.studies / one:6.1f} studies/min")
        print(f"  2 workers: {two:6.1f} s  {60 * args.studies / two:6.1f} studies/min  ({one / two:.2f}x)")
        run(2, studies[:1], models, kill=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
