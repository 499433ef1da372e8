"""Several machines on one machine: an ingest node and two workers (separate ``ainode serve``
processes) sharing a real PostgreSQL server and one ``data_dir``, DCMTK ``storescu`` as the
sender and DCMTK ``storescp`` as the PACS.

Every series is processed once and every result delivered once; a worker killed in the
middle of a job loses it to the other after its heartbeat stops, and the PACS still gets each
result once; the database stopped during traffic makes C-STORE answer 0xA700 (never Success
for what it cannot record), and the nodes carry on when it is back."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import httpx
import pydicom
import pytest

from conftest import free_port
from node.storage.db import Database
from node.synthetic.ct import make_ct_series
from nodeproc import NodeProcess, wait_for, write_config
from slowmodel import build_slow_model

SLICES, SIZE = 8, 64
HEARTBEAT_S, STALL_S = 1.0, 6.0


@pytest.fixture(scope="module")
def slow_models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cluster-models")
    build_slow_model(folder / "slow-body", iterations=30000)
    return folder


class Cluster:
    """Nodes of one cluster: same database, same data_dir, each with its own name and role."""

    def __init__(self, tmp: Path, database_url: str, models: Path, pacs_port: int) -> None:
        self.tmp, self.url, self.models, self.pacs_port = tmp, database_url, models, pacs_port
        self.data = tmp / "shared"
        self.nodes: dict[str, NodeProcess] = {}
        Database(database_url).drop_all()

    def start(self, name: str, role: str) -> NodeProcess:
        port = free_port()
        config = write_config(self.tmp / f"{name}.toml", {
            "node": {"name": name, "role": role, "host": "127.0.0.1", "port": port, "data_dir": str(self.data),
                     "database_url": self.url, "heartbeat_s": HEARTBEAT_S, "stall_timeout_s": STALL_S},
            "ingest": {"series_timeout_s": 1.0, "min_free_disk_mb": 0},
            "inference": {"models_dir": str(self.models), "providers": ["CPUExecutionProvider"]},
            "delivery": {"max_attempts": 3, "backoff_s": 0.2, "timeout_s": 10},
            "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": self.pacs_port}],
            "routes": [{"name": "ct", "match": {"Modality": "CT"}, "models": ["slow-body"], "send_to": ["pacs"]}],
        })
        node = NodeProcess(config=config, port=port, data_dir=self.data, log=self.tmp / f"{name}.log")
        if role == "worker":
            node.start_waiting_for(f"node {name} is a worker")
        else:
            node.start()
        self.nodes[name] = node
        return node

    def stop(self) -> None:
        for node in self.nodes.values():
            node.stop()

    def jobs(self) -> list[dict]:
        db = Database(self.url, root=self.data)
        try:
            return db.jobs_report(100)
        finally:
            db.close()


@pytest.fixture
def cluster(tmp_path, postgres_server, slow_models, storescp):
    pacs = storescp("PACS", "+uf")              # unique file names: a second copy would show
    c = Cluster(tmp_path, postgres_server.url, slow_models, pacs.port)
    c.pacs = pacs
    c.server = postgres_server
    yield c
    c.stop()


def send(dcmtk, node: NodeProcess, files: list[Path]) -> subprocess.CompletedProcess:
    return dcmtk.run("storescu", "-v", "-aet", "CT1", "-aec", "AINODE", "127.0.0.1", str(node.port),
                     *map(str, files), check=False)


def series(tmp: Path, k: int):
    return make_ct_series(tmp / f"s{k}", slices=SLICES, size=SIZE, accession=f"CLUSTER{k}", seed=k,
                          patient_id=f"CLUSTER-{k}")


def received_uids(pacs) -> list[str]:
    return [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in pacs.files()]


def test_two_workers_share_the_work_and_every_result_arrives_once(cluster, dcmtk, tmp_path):
    ingest = cluster.start("ingest-1", "ingest")
    cluster.start("gpu-a", "worker")
    cluster.start("gpu-b", "worker")
    studies = [series(tmp_path, k) for k in range(4)]
    for s in studies:
        assert send(dcmtk, ingest, s.files).returncode == 0
    jobs = wait_for(lambda: (j := cluster.jobs()) and len(j) == 4 and all(x["status"] == "done" for x in j) and j,
                    "four jobs done", timeout=240)
    assert all(j["attempts"] == 1 for j in jobs)                   # each series processed once
    assert {j["worker"] for j in jobs} == {"gpu-a", "gpu-b"}        # both workers took work
    wait_for(lambda: len(cluster.pacs.files()) >= 8, "8 results (SEG + SR per series) at the PACS")
    time.sleep(2 * HEARTBEAT_S)                                     # a duplicate would arrive by now
    uids = received_uids(cluster.pacs)
    # Each result once; delivery is at least once, so only a logged failed attempt may resend
    # (the same objects, the same UIDs).
    retries = sum(d["attempts"] - 1 for j in cluster.jobs() for d in j["deliveries"])
    assert len(set(uids)) == 8 and 8 <= len(uids) <= 8 + 2 * retries, (len(uids), retries)
    # the paths in the database are relative to the shared data_dir
    db = Database(cluster.url)
    try:
        assert all(not p.startswith("/") for p in db.series_paths(1))
    finally:
        db.close()
    status = ingest.cli("status", "--json")
    assert status.returncode == 0, status.stdout + status.stderr
    nodes = {n["name"]: n for n in json.loads(status.stdout)["nodes"]}
    assert {name: n["role"] for name, n in nodes.items()} == {"ingest-1": "ingest", "gpu-a": "worker",
                                                              "gpu-b": "worker"}
    assert all(n["alive"] for n in nodes.values()) and nodes["gpu-a"]["models"] == ["slow-body"]
    text = ingest.cli("status").stdout
    assert "gpu-b (worker)" in text and "alive, heartbeat" in text
    assert "runs on CPUExecutionProvider" not in ingest.log_text()  # an ingest node loads no model
    http_port = int(re.search(r"port = (\d+)", ingest.config.read_text().split("[http]")[1]).group(1))
    page = httpx.get(f"http://127.0.0.1:{http_port}/", timeout=30).text     # the dashboard lists the nodes
    assert all(f"<b>{name}</b></td><td>{role}</td>" in page
               for name, role in (("ingest-1", "ingest"), ("gpu-a", "worker"), ("gpu-b", "worker")))
    audit = json.loads(ingest.cli("audit", "--action", "result", "--json").stdout)
    assert {a["detail"]["node"] for a in audit} == {"gpu-a", "gpu-b"}  # the audit names the node


def test_a_dead_workers_job_is_taken_over_and_delivered_once(cluster, dcmtk, tmp_path):
    ingest = cluster.start("ingest-1", "ingest")
    workers = {name: cluster.start(name, "worker") for name in ("gpu-a", "gpu-b")}
    s = series(tmp_path, 9)
    assert send(dcmtk, ingest, s.files).returncode == 0
    running = wait_for(lambda: next((j for j in cluster.jobs() if j["status"] == "running"), None), "a running job")
    victim = running["worker"]
    workers[victim].kill()                                          # SIGKILL in the middle of the job
    killed_at = time.monotonic()
    done = wait_for(lambda: next((j for j in cluster.jobs() if j["status"] == "done"), None),
                    "the job done by the other worker", timeout=120)
    took_over_s = time.monotonic() - killed_at
    assert done["worker"] != victim and done["attempts"] == 2
    print(f"job taken over and done {took_over_s:.1f} s after its worker was killed (stall timeout {STALL_S} s)")
    wait_for(lambda: len(cluster.pacs.files()) >= 2, "SEG and SR at the PACS")
    time.sleep(2 * HEARTBEAT_S)
    uids = received_uids(cluster.pacs)
    retries = sum(d["attempts"] - 1 for j in cluster.jobs() for d in j["deliveries"])
    assert len(set(uids)) == 2 and 2 <= len(uids) <= 2 + 2 * retries, (len(uids), retries)
    nodes = {n["name"]: n for n in json.loads(ingest.cli("status", "--json").stdout)["nodes"]}
    assert not nodes[victim]["alive"] and nodes[next(n for n in workers if n != victim)]["alive"]


def test_the_database_restarting_during_traffic(cluster, dcmtk, tmp_path):
    ingest = cluster.start("ingest-1", "ingest")
    cluster.start("gpu-a", "worker")
    first, second = series(tmp_path, 20), series(tmp_path, 21)
    assert send(dcmtk, ingest, first.files).returncode == 0
    cluster.server.stop()
    refused = send(dcmtk, ingest, second.files)
    assert "Refused: OutOfResources" in refused.stdout + refused.stderr   # 0xA700, never Success
    assert "Success" not in refused.stdout + refused.stderr
    cluster.server.start()
    assert send(dcmtk, ingest, second.files).returncode == 0        # the nodes reconnect by themselves
    jobs = wait_for(lambda: (j := cluster.jobs()) and len(j) == 2 and all(x["status"] == "done" for x in j) and j,
                    "both jobs done after the restart", timeout=240)
    assert {j["accession"] for j in jobs} == {"CLUSTER20", "CLUSTER21"}
    db = Database(cluster.url, root=cluster.data)
    try:
        paths = [p for sid in (1, 2) for p in db.series_paths(sid)]
    finally:
        db.close()
    assert len(paths) == 2 * SLICES and all(Path(p).is_file() for p in paths)
    files = list((cluster.data / "images").rglob("*.dcm"))
    assert len(files) == 2 * SLICES                                 # no file without its row
    assert "Traceback" not in ingest.log_text()


def test_an_ingest_node_killed_mid_study_loses_nothing_acknowledged(cluster, dcmtk, tmp_path):
    """Half a series to one ingest node, which is then SIGKILLed; the rest to the other: the
    series is complete with every acknowledged instance and its job sees all of them."""
    first, second = cluster.start("ingest-1", "ingest"), cluster.start("ingest-2", "ingest")
    cluster.start("gpu-a", "worker")
    s = make_ct_series(tmp_path / "split", slices=2 * SLICES, size=SIZE, accession="SPLIT1", seed=30)
    half = len(s.files) // 2
    assert send(dcmtk, first, s.files[:half]).returncode == 0
    first.kill()
    assert send(dcmtk, second, s.files[half:]).returncode == 0
    job = wait_for(lambda: next((j for j in cluster.jobs() if j["status"] == "done"), None), "the job done")
    db = Database(cluster.url, root=cluster.data)
    try:
        detail = db.job_detail(job["id"])
        paths = db.series_paths(detail["series_id"])
    finally:
        db.close()
    assert detail["instances"] == 2 * SLICES and len(paths) == 2 * SLICES
    assert all(Path(p).is_file() for p in paths)
    assert job["summary"]["slices"] == 2 * SLICES           # the model saw the whole series
