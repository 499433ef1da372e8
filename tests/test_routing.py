"""Routing and triage with real peers: ``ainode serve`` as a process, DCMTK storescu as the
scanner, Orthanc and DCMTK storescp as destinations, a local HTTP receiver as the webhook."""

from __future__ import annotations

import io
import json
import os
import signal
import sqlite3
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pydicom
import pytest
from pydicom.uid import JPEGLSLossless
from pynetdicom import AE

from conftest import free_port
from node.demo import DemoPacs
from node.synthetic.ct import make_ct_series
from nodeproc import NodeProcess, build_models, write_config
from slowmodel import build_slow_model
from tinymodels import FindingSpec, build_classifier

SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
WEBHOOK_ENV = "AINODE_TEST_WEBHOOK_URL"
SLOW_ITERATIONS = 5000      # ~0.25 s per job on the 2-core development machine


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = build_models(tmp_path_factory.mktemp("routing-models"))
    build_slow_model(folder / "slow-body", iterations=SLOW_ITERATIONS, seconds_hint=0.25)
    build_classifier(folder, "chest-xc", [
        FindingSpec("Pneumonia", probability=0.9, priority="urgent"),
        FindingSpec("Fracture", probability=0.1, priority="stat", code=("72704001", "Fracture"))])
    return folder


@pytest.fixture
def node_factory(tmp_path, models):
    nodes: list[NodeProcess] = []

    def make(destinations, routes, **sections) -> NodeProcess:
        port = free_port()
        data_dir = tmp_path / "node-data"
        config = {
            "node": {"ae_title": "AINODE", "host": "127.0.0.1", "port": port, "data_dir": str(data_dir)},
            "ingest": {"series_timeout_s": 1.0, "min_free_disk_mb": 10, "fsync": False},
            "inference": {"models_dir": str(models), "providers": ["CPUExecutionProvider"]},
            "delivery": {"backoff_s": 0.3, "max_attempts": 4, "timeout_s": 10},
            **sections,
            "destinations": destinations,
            "routes": routes,
        }
        path = write_config(tmp_path / "node.toml", config)
        node = NodeProcess(config=path, port=port, data_dir=data_dir, log=tmp_path / "node.log")
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        node.stop()


def dest(name, aet, port):
    return {"name": name, "ae_title": aet, "host": "127.0.0.1", "port": port}


def storescu(dcmtk, node, files, aet="CTSCANNER", *options):
    dcmtk.run("storescu", *options, "-aet", aet, "-aec", node.ae_title, "127.0.0.1", str(node.port),
              *[str(f) for f in files], timeout=120)


def wait_until(predicate, timeout=30.0, message="condition", node=None):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{message} not met within {timeout} s"
                                 + (f"\n--- node log ---\n{node.log_text()[-8000:]}" if node else ""))
        time.sleep(0.05)


def pixel_data(blob_or_path) -> bytes:
    src = io.BytesIO(blob_or_path) if isinstance(blob_or_path, bytes) else blob_or_path
    return pydicom.dcmread(src)["PixelData"].value


def test_forwarding_reaches_orthanc_and_storescp_intact_while_results_go_to_the_pacs(
        dcmtk, orthanc, storescp, node_factory, tmp_path):
    phantom = make_ct_series(tmp_path / "ct", slices=12, size=64, transfer_syntax=JPEGLSLossless)
    viewer = storescp("VIEWER")
    pacs = storescp("PACS")
    node = node_factory(
        [dest("archive", orthanc.aet, orthanc.dicom_port), dest("viewer", viewer.aet, viewer.port),
         dest("pacs", pacs.aet, pacs.port)],
        [{"name": "scanner", "match": {"Modality": "CT", "CallingAETitle": "CTSCANNER",
                                       "ImageType": {"not": "LOCALIZER"}},
          "models": ["ct-tissue"], "send_to": ["pacs"], "forward_to": ["archive", "viewer"]}]).start()
    storescu(dcmtk, node, phantom.files, "CTSCANNER", "--propose-jls-lossless")

    originals = {pydicom.dcmread(f).SOPInstanceUID: pixel_data(f) for f in phantom.files}
    wait_until(lambda: len(viewer.files()) == 12 and len(pacs.files()) == 2, 60, "forwards and results", node)
    in_orthanc = wait_until(lambda: len(ids := orthanc.instances()) == 12 and ids, 30, "12 instances in Orthanc")

    for blob in (orthanc.download(i) for i in in_orthanc):
        ds = pydicom.dcmread(io.BytesIO(blob))
        assert ds.file_meta.TransferSyntaxUID == JPEGLSLossless        # not transcoded on the way
        assert ds["PixelData"].value == originals[ds.SOPInstanceUID]     # byte-identical
    for path in viewer.files():
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == JPEGLSLossless
        assert ds["PixelData"].value == originals[ds.SOPInstanceUID]
    results = sorted(pydicom.dcmread(p).SOPClassUID for p in pacs.files())
    assert results == sorted([SEG_CLASS, SR_CLASS])
    assert all(pydicom.dcmread(p).StudyInstanceUID == phantom.study_uid for p in pacs.files())

    db = sqlite3.connect(node.data_dir / "node.db")
    rows = db.execute("select kind, destination, status from deliveries order by kind, destination").fetchall()
    assert rows == [("forward", "archive", "done"), ("forward", "viewer", "done"), ("result", "pacs", "done")]
    explained = json.loads(db.execute("select routes from series").fetchone()[0])
    assert explained["scanner"]["matched"] is True and "CallingAETitle is 'CTSCANNER'" in explained["scanner"]["reason"]
    log = node.cli("routes", "log").stdout
    assert f"series {phantom.series_uid} (CT " in log and "from CTSCANNER at 127.0.0.1: assembled" in log
    assert "route scanner: matches (Modality is 'CT'; CallingAETitle is 'CTSCANNER'" in log


def test_a_stat_study_overtakes_queued_routine_ones(dcmtk, node_factory, tmp_path):
    pacs = DemoPacs("PACS")
    try:
        node = node_factory(
            [dest("pacs", "PACS", pacs.port)],
            [{"name": "routine", "match": {"Modality": "CT"}, "models": ["slow-body"], "send_to": ["pacs"]},
             {"name": "stroke", "any": [{"CallingAETitle": "ER*"},
                                        {"SeriesDescription": {"regex": "(?i)stroke|trauma"}}],
              "models": ["slow-body"], "send_to": ["pacs"], "priority": "stat"}]).start()
        routine = [make_ct_series(tmp_path / f"r{k}", slices=8, size=64, seed=k, patient_id=f"R{k}",
                                  accession=f"ROUT{k}") for k in range(5)]
        stat = make_ct_series(tmp_path / "stat", slices=8, size=64, seed=9, patient_id="ER1",
                              accession="STAT1", series_description="CT head STROKE protocol")
        # One burst from the scanner: five routine studies, then the stat one.
        storescu(dcmtk, node, [f for p in routine for f in p.files] + list(stat.files))
        wait_until(lambda: len({ds.StudyInstanceUID for _, ds in pacs.received}) == 6, 90,
                   "results of all six studies", node)
    finally:
        pacs.stop()

    db = sqlite3.connect(node.data_dir / "node.db")
    jobs = {acc: (prio, created, claimed) for acc, prio, created, claimed in db.execute(
        "select studies.accession, jobs.priority, jobs.created_at, jobs.claimed_at from jobs "
        "join series on jobs.series_id = series.id join studies on series.study_id = studies.id")}
    s_prio, s_created, s_claimed = jobs["STAT1"]
    assert s_prio == 0
    waiting = [acc for acc, (_, created, claimed) in jobs.items() if acc != "STAT1" and claimed > s_created]
    assert len(waiting) >= 2, f"the routine studies were not queued when the stat one came: {jobs}"
    # No routine job was started between the stat job's arrival and its start ...
    assert all(jobs[acc][2] > s_claimed for acc in waiting), jobs
    # ... so its results reach the PACS before those of every routine study still waiting.
    first = {}
    for when, ds in pacs.received:
        first.setdefault(ds.AccessionNumber, when)
    assert all(first["STAT1"] < first[acc] for acc in waiting), first


class Webhook:
    """A local HTTP receiver: records every POST; answers with ``statuses`` in turn (then 200)."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.statuses: list[int] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers["Content-Length"]))
                hook.requests.append({"path": self.path, "type": self.headers["Content-Type"],
                                      "body": json.loads(body)})
                status = hook.statuses.pop(0) if hook.statuses else 200
                self.send_response(status)
                self.end_headers()
                self.wfile.write(b"receiver says no" if status >= 400 else b"ok")

            def log_message(self, *args):
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/ainode?token=secret"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_positive_finding_notifies_raises_priority_and_routes_on_result(
        dcmtk, node_factory, tmp_path, monkeypatch):
    hook = Webhook()
    pacs, er = DemoPacs("PACS"), DemoPacs("ERVIEW")
    monkeypatch.setenv(WEBHOOK_ENV, hook.url)
    try:
        hook.statuses = [500] * 3                     # the first study's notification fails 3 times
        node = node_factory(
            [dest("pacs", "PACS", pacs.port), dest("er", "ERVIEW", er.port)],
            [{"name": "chest", "match": {"Modality": "CT", "BodyPartExamined": "CHEST"}, "models": ["chest-xc"],
              "send_to": ["pacs"], "priority": "routine",
              "on_result": [{"finding": "Pneumonia", "probability": {"ge": 0.8}, "send_to": ["er"],
                             "forward_to": ["er"], "priority": "stat", "notify": True},
                            {"finding": "Fracture", "send_to": ["er"], "notify": True}]}],
            notify={"webhook_url_env": WEBHOOK_ENV, "max_attempts": 3, "backoff_s": 0.2, "timeout_s": 5,
                    "link_template": "https://viewer.example/study/{study_uid}?sr={sr_uid}"}).start()
        first = make_ct_series(tmp_path / "a", slices=6, size=64, accession="ACC-A", patient_id="PA")
        storescu(dcmtk, node, first.files)
        wait_until(lambda: "failed after 3 attempts" in node.log_text(), 30, "notification given up", node)
        shown = node.cli("notifications").stdout
        assert "failed   after 3 attempt(s)" in shown and "Pneumonia" in shown, shown
        assert "HTTP 500" in shown and "receiver says no" in shown
        assert hook.url not in node.log_text() and "token=secret" not in shown   # the secret stays secret

        hook.statuses = [503]                         # the second one fails once, then goes through
        second = make_ct_series(tmp_path / "b", slices=6, size=64, accession="ACC-B", patient_id="PB")
        storescu(dcmtk, node, second.files)
        wait_until(lambda: len(hook.requests) == 5, 30, "second notification delivered", node)
        # results to the PACS and, because of the on_result rule, to the ER viewer with the images
        wait_until(lambda: len(er.received) == 2 * (1 + 6), 30, "ER viewer got results and images", node)
        # the operator sends the failed one again, now that the receiver works
        shown = node.cli("notifications").stdout
        failed_id = next(line.split()[0].lstrip("#") for line in shown.splitlines() if " failed " in line)
        retried = node.cli("notifications", "--retry", failed_id)
        assert retried.returncode == 0 and "queued again" in retried.stdout, retried.stdout + retried.stderr
        wait_until(lambda: len(hook.requests) == 6, 30, "failed notification posted again", node)
        assert hook.requests[-1]["body"]["accession_number"] == "ACC-A"
    finally:
        hook.stop()
        pacs.stop()
        er.stop()

    body = hook.requests[4]["body"]
    assert hook.requests[4]["type"].startswith("application/json")
    assert body["event"] == "positive_finding" and body["finding"] == "Pneumonia"
    assert body["study_instance_uid"] == second.study_uid and body["accession_number"] == "ACC-B"
    assert body["probability"] == pytest.approx(0.9, abs=0.01) and body["priority"] == "stat"
    assert body["links"] == [f"https://viewer.example/study/{second.study_uid}?sr={body['results'][0]['sop_instance_uid']}"]
    assert body["results"][0]["modality"] == "SR"
    assert not any(r["body"]["finding"] == "Fracture" for r in hook.requests)   # negative: no notification
    assert {ds.AccessionNumber for _, ds in pacs.received} == {"ACC-A", "ACC-B"}

    shown = node.cli("notifications").stdout
    assert "sent     after 2 attempt(s)" in shown and "sent     after 1 attempt(s)" in shown, shown

    worklist = node.cli("worklist").stdout
    lines = [line for line in worklist.splitlines() if not line.startswith(" ")]
    assert lines[0].startswith("STAT") and "acc=ACC-A" in lines[0], worklist   # raised, oldest first
    assert "Pneumonia p=0.90 POSITIVE" in worklist and "Fracture p=0.10" in worklist
    assert "on_result chest: finding Pneumonia positive with probability >= 0.8" in worklist
    log = node.log_text()
    assert "POSITIVE Pneumonia (p=0.900, priority urgent) by chest-xc" in log
    # No patient data in the log at the default level (logging.phi = false); the webhook and
    # the worklist above keep the accession numbers.
    for phi in ("ACC-A", "ACC-B", "PA", "PB"):
        assert not [line for line in log.splitlines() if phi in line.split(": ", 1)[-1].split()], phi


def test_reload_swaps_routes_without_dropping_associations_and_refuses_bad_ones(dcmtk, node_factory, tmp_path):
    first_pacs, second_pacs = DemoPacs("PACS1"), DemoPacs("PACS2")
    try:
        # The series is complete when the association is released (after the reload), not
        # by a quiet timer that a slow reload on a busy machine could outlast.
        node = node_factory([dest("one", "PACS1", first_pacs.port), dest("two", "PACS2", second_pacs.port)],
                            [{"name": "to-one", "match": {"Modality": "CT"}, "forward_to": ["one"]}],
                            ingest={"series_timeout_s": 3600, "min_free_disk_mb": 10, "fsync": False,
                                    "complete_on_release": ["CTSCANNER"], "release_grace_s": 0.2}).start()
        original = node.config.read_text()
        phantom = make_ct_series(tmp_path / "ct", slices=6, size=32)
        files = sorted(phantom.files)
        # An association stays open across the reload, sending before and after it.
        ae = AE(ae_title="CTSCANNER")
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")
        assoc = ae.associate("127.0.0.1", node.port, ae_title="AINODE")
        assert assoc.is_established
        statuses = [assoc.send_c_store(f).Status for f in files[:3]]
        node.config.write_text(original.replace('forward_to = ["one"]', 'forward_to = ["two"]')
                               .replace('name = "to-one"', 'name = "to-two"'))
        done = node.cli("reload")
        assert done.returncode == 0 and "configuration reloaded" in done.stdout, done.stdout + done.stderr
        statuses += [assoc.send_c_store(f).Status for f in files[3:]]
        assoc.release()
        assert statuses == [0] * 6
        wait_until(lambda: len(second_pacs.received) == 6, 30, "forwarded under the new routes", node)
        assert first_pacs.received == []

        # A file that does not parse is refused by `ainode reload` itself ...
        node.config.write_text(original.replace("[[routes]]", "[[routes]]\nmatchh = 1"))
        refused = node.cli("reload")
        assert refused.returncode == 2 and "routes[0]" in refused.stderr
        # ... one that parses but cannot run (a missing model) is refused by the node.
        node.config.write_text(original.replace('forward_to = ["one"]', 'models = ["no-such-model"]'))
        refused = node.cli("reload")
        assert refused.returncode == 1 and "reload refused" in refused.stdout and "no-such-model" in refused.stdout
        os.kill(node.process.pid, signal.SIGHUP)      # a plain SIGHUP does the same
        wait_until(lambda: node.log_text().count("reload refused") == 2, 10, "second refusal", node)
        assert node.process.poll() is None and node.echo()
        # The running configuration is still the second one.
        again = make_ct_series(tmp_path / "ct2", slices=3, size=32, seed=5)
        storescu(dcmtk, node, again.files)
        wait_until(lambda: len(second_pacs.received) == 9, 30, "still routed by the second configuration", node)
    finally:
        first_pacs.stop()
        second_pacs.stop()


def test_routes_test_explains_each_series(tmp_path, node_factory):
    ct = make_ct_series(tmp_path / "in" / "ct", slices=2, size=32)
    scout = make_ct_series(tmp_path / "in" / "scout", slices=1, size=32, study_uid=ct.study_uid,
                           series_description="Scout")
    for f in scout.files:                             # make it a localizer
        ds = pydicom.dcmread(f)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.save_as(f)
    (tmp_path / "in" / "notes.txt").write_text("not DICOM")
    node = node_factory(
        [dest("pacs", "PACS", 104)],
        [{"name": "chest", "match": {"Modality": "CT", "ImageType": {"not": "LOCALIZER"}},
          "models": ["ct-tissue"], "send_to": ["pacs"]},
         {"name": "mr-only", "match": {"Modality": "MR"}, "forward_to": ["pacs"]},
         {"name": "study", "level": "study", "match": {"Modality": "CT"}, "models": ["chest-xc"],
          "require_series": [{"SeriesDescription": "*coronal*"}]}])
    out = node.cli("routes", "test", str(tmp_path / "in"), "--calling-aet", "CT1")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert f"study {ct.study_uid}" in text
    assert "route chest: matches (Modality is 'CT'; ImageType not (is 'LOCALIZER'))" in text
    assert "route chest: does not match: ImageType='ORIGINAL\\PRIMARY\\LOCALIZER' is 'LOCALIZER' (excluded by not)" in text
    assert "route mr-only: does not match: Modality='CT' matches none of ['MR']" in text
    assert "-> job ct-tissue (routine), results to pacs" in text
    assert "study-level route study: waiting: waiting for a series with [SeriesDescription is '*coronal*']" in text
    assert "(1 file(s) skipped: not DICOM)" in text
