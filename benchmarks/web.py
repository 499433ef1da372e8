"""The HTTP face with a full database: figures, not assertions.

    python benchmarks/web.py [--jobs 10000] [--repeat 5]

Fills a node's SQLite database with ``--jobs`` finished jobs (each its series, instance rows,
a delivery), starts ``ainode serve`` on it and prints the median time of the dashboard, the
job list of the API, one job, the status and a Prometheus scrape.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from node.storage.db import Database  # noqa: E402
from node.storage.schema import Delivery, Instance, Job, Series, Study  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fill(db: Database, jobs: int) -> None:
    now = time.time()
    summary = json.dumps({"model": "ct-tissue", "version": "1.0.0", "volumes_ml": {"Body": 9142.0, "Lungs": 1985.9},
                          "timings": {"decode": 0.2, "run": 0.5, "encode": 1.0}})
    with db.engine.begin() as conn:
        for k in range(jobs):
            study = conn.execute(Study.__table__.insert().values(
                study_uid=f"1.2.826.0.1.3680043.10.77.{k}", patient_id=f"P{k}", accession=f"ACC{k}",
                received_at=now - k)).inserted_primary_key[0]
            series = conn.execute(Series.__table__.insert().values(
                series_uid=f"1.2.826.0.1.3680043.10.78.{k}", study_id=study, modality="CT", description="bench",
                calling_aet="CT", called_aet="AINODE", caller_address="127.0.0.1", status="assembled",
                first_received_at=now - k, last_received_at=now - k, routes="{}")).inserted_primary_key[0]
            conn.execute(Instance.__table__.insert().values(
                sop_instance_uid=f"1.2.826.0.1.3680043.10.79.{k}", series_id=series, sop_class_uid="1.2",
                transfer_syntax="1.2.840.10008.1.2.1", path=f"/nonexistent/{k}.dcm", size=1, received_at=now - k))
            job = conn.execute(Job.__table__.insert().values(
                series_id=series, model="ct-tissue", routes='["ct"]', destinations='["pacs"]', priority=k % 3,
                status="done", attempts=1, created_at=now - k, finished_at=now - k, error="",
                result_files="[]", summary=summary)).inserted_primary_key[0]
            conn.execute(Delivery.__table__.insert().values(
                kind="result", job_id=job, series_id=series, destination="pacs", priority=k % 3,
                status="failed" if k % 50 == 0 else "done", attempts=1, next_attempt_at=now, created_at=now,
                error="" if k % 50 else "peer not reachable"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=10000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="ainode-web-") as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        db = Database(f"sqlite:///{data / 'node.db'}")
        db.create()
        t = time.perf_counter()
        fill(db, args.jobs)
        db.close()
        print(f"database: {args.jobs} jobs (each with its study, series, instance and delivery) "
              f"filled in {time.perf_counter() - t:.1f} s")
        port, http = free_port(), free_port()
        config = Path(tmp) / "node.toml"
        config.write_text(f'[node]\nhost = "127.0.0.1"\nport = {port}\ndata_dir = "{data}"\n'
                          f'[ingest]\nmin_free_disk_mb = 0\n[http]\nport = {http}\n')
        proc = subprocess.Popen([sys.executable, "-m", "node.cli", "--log-level", "WARNING", "serve", "--config",
                                 str(config)], cwd=str(REPO))
        try:
            url = f"http://127.0.0.1:{http}"
            deadline = time.monotonic() + 120
            while True:
                try:
                    if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("the node did not start")
                time.sleep(0.1)
            print(f"{'request':34s} {'median ms':>10s} {'max ms':>8s} {'bytes':>9s}")
            for path in ("/", "/api/v1/jobs?limit=50", f"/api/v1/jobs/{args.jobs // 2}", "/api/v1/status",
                         "/api/v1/worklist?limit=50", "/metrics"):
                times, size = [], 0
                for _ in range(args.repeat):
                    t = time.perf_counter()
                    response = httpx.get(url + path, timeout=120)
                    times.append(1000 * (time.perf_counter() - t))
                    assert response.status_code == 200, (path, response.status_code)
                    size = len(response.content)
                print(f"{path:34s} {statistics.median(times):10.1f} {max(times):8.1f} {size:9d}")
        finally:
            proc.terminate()
            proc.wait(60)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
