"""The whole node with real peers: DCMTK storescu in, ``ainode serve`` in the middle, Orthanc out."""

from __future__ import annotations

import io
import random
import sqlite3
import subprocess
import time
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE

from conftest import free_port
from node.synthetic.ct import make_ct_series
from nodeproc import REPO, NodeProcess, write_config

VALIDATOR = REPO / "tests" / "tools" / "validate_dicom.sh"   # copy of the CI gate
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"


@pytest.fixture
def make_node(tmp_path, models_dir, request):
    nodes: list[NodeProcess] = []

    def make(orthanc=None, **ingest) -> NodeProcess:
        port = free_port()
        data_dir = tmp_path / "node-data"
        sections = {
            "node": {"ae_title": "AINODE", "host": "127.0.0.1", "port": port, "data_dir": str(data_dir)},
            "ingest": {"series_timeout_s": 1.5, "min_free_disk_mb": 10, "fsync": True, **ingest},
            "inference": {"models_dir": str(models_dir), "providers": ["CUDAExecutionProvider", "CPUExecutionProvider"]},
            "delivery": {"backoff_s": 0.5, "max_attempts": 4, "timeout_s": 10},
        }
        if orthanc is not None:
            sections["destinations"] = [{"name": "pacs", "ae_title": orthanc.aet, "host": "127.0.0.1",
                                         "port": orthanc.dicom_port}]
            sections["routes"] = [{"name": "ct", "match": {"Modality": "CT"}, "models": ["ct-tissue"],
                                   "send_to": ["pacs"]}]
        config = write_config(tmp_path / "node.toml", sections)
        node = NodeProcess(config=config, port=port, data_dir=data_dir, log=tmp_path / "node.log")
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        node.stop()
    if request.node.rep_call.failed if hasattr(request.node, "rep_call") else False:
        for node in nodes:
            print(node.log_text()[-20000:])


def storescu(dcmtk, node: NodeProcess, files, aet="CTSCANNER", check=True):
    return dcmtk.run("storescu", "-aet", aet, "-aec", node.ae_title, "127.0.0.1", str(node.port),
                     *[str(f) for f in files], check=check, timeout=120)


def result_instances(orthanc, study_uid: str) -> dict[str, bytes]:
    """SOP Class UID -> file bytes of the node's results in Orthanc, for one study."""
    found = {}
    for instance in orthanc.instances():
        tags = orthanc.get(f"/instances/{instance}/simplified-tags")
        if tags.get("SOPClassUID") in (SEG_CLASS, SR_CLASS) and tags.get("StudyInstanceUID") == study_uid:
            found[tags["SOPClassUID"]] = orthanc.download(instance)
    return found


def sr_volumes(sr_bytes: bytes) -> dict[str, float]:
    sr = hd.sr.srread(io.BytesIO(sr_bytes))
    groups = sr.content.get_volumetric_roi_measurement_groups()
    out = {}
    for group in groups:
        for measurement in group.get_measurements():
            if measurement.name.meaning == "Volume":
                out[group.tracking_identifier] = float(measurement.value)
    return out


def test_study_in_results_out(dcmtk, orthanc, make_node, tmp_path):
    phantom = make_ct_series(tmp_path / "ct", slices=32, size=128)
    node = make_node(orthanc).start()
    files = list(phantom.files)
    random.Random(7).shuffle(files)                  # sent out of order
    storescu(dcmtk, node, files)
    # The scanner also archives the images in the PACS, as it would in a hospital.
    dcmtk.run("storescu", "-aet", "CTSCANNER", "-aec", orthanc.aet, "127.0.0.1", str(orthanc.dicom_port),
              *[str(f) for f in files], timeout=120)

    results = orthanc.wait_for(lambda: (r := result_instances(orthanc, phantom.study_uid)) and len(r) == 2 and r,
                               timeout=60, message="SEG and SR in Orthanc")
    # The results sit in the same study as the images, beside the 32 source instances.
    study = orthanc.lookup(phantom.study_uid)
    assert len(study) == 1 and study[0]["Type"] == "Study"
    assert len(orthanc.get(f"/studies/{study[0]['ID']}/instances")) == 32 + 2

    seg = pydicom.dcmread(io.BytesIO(results[SEG_CLASS]))
    assert seg.FrameOfReferenceUID == phantom.frame_of_reference_uid
    assert "AI" in seg.SeriesDescription and "DEMO" in seg.SeriesDescription
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == phantom.series_uid

    volumes = sr_volumes(results[SR_CLASS])
    for name, truth in phantom.volumes_ml.items():
        assert volumes[name] == pytest.approx(truth, rel=0.05), name

    paths = []
    for name, blob in (("seg.dcm", results[SEG_CLASS]), ("sr.dcm", results[SR_CLASS])):
        (tmp_path / name).write_bytes(blob)
        paths.append(str(tmp_path / name))
    check = subprocess.run(["bash", str(VALIDATOR), *paths], capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stdout + check.stderr

    jobs = node.cli("jobs")
    assert jobs.returncode == 0 and "done" in jobs.stdout and "Lungs" in jobs.stdout
    audit = node.cli("audit").stdout              # who sent what; which model made which result
    assert f"CTSCANNER@127.0.0.1      received   {phantom.series_uid}" in audit
    assert "instances=32" in audit and "model=ct-tissue version=1.0.0" in audit
    assert str(seg.SOPInstanceUID) in audit and "delivered" in audit
    assert "no usable GPU" in node.log_text()       # said once, in one line, then the CPU runs it
    assert node.log_text().count("no usable GPU") == 1
    assert "SEG encoder warmed up" in node.log_text()   # before the first job, so that it does not pay


def _dataset(**overrides) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"     # Secondary Capture
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.10.1.1"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.10.1.2"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.10.1.3"
    ds.Modality = "OT"
    ds.PatientID = "BAD-INPUT"
    for key, value in overrides.items():
        setattr(ds, key, value)
    return ds


def _store(port: int, item: Dataset | Path) -> int | None:
    """C-STORE a data set, or a file as its bytes stand (pynetdicom does not decode a file
    given by path); returns the status."""
    meta = pydicom.dcmread(item, stop_before_pixels=True).file_meta if isinstance(item, Path) else None
    ae = AE(ae_title="FUZZER")
    ae.add_requested_context(meta.MediaStorageSOPClassUID if meta else item.SOPClassUID,
                             meta.TransferSyntaxUID if meta else ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="AINODE")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(item)
        return int(status.Status) if status else None
    finally:
        assoc.release()


def test_bad_input_is_answered_and_the_node_keeps_serving(dcmtk, make_node, tmp_path):
    node = make_node().start()
    # UIDs crafted to escape the storage folder: refused with "cannot understand".
    escape = _dataset(StudyInstanceUID="../../../../tmp/evil", SOPInstanceUID="1.2.3.4")
    assert _store(node.port, escape) == 0xC000
    # A malformed data set: the file meta is fine, the data set is cut in the middle of an element.
    whole = tmp_path / "whole.dcm"
    _dataset(SOPInstanceUID="1.2.826.0.1.3680043.10.1.10", PatientName="X" * 200).save_as(
        whole, enforce_file_format=True)
    blob = whole.read_bytes()
    cut = tmp_path / "truncated.dcm"
    cut.write_bytes(blob[:blob.index(b"X" * 200) + 50])
    assert _store(node.port, cut) == 0xC000
    # A non-image SOP class (Basic Text SR) is stored like any other object.
    text_sr = _dataset(SOPClassUID="1.2.840.10008.5.1.4.1.1.88.11", SOPInstanceUID="1.2.826.0.1.3680043.10.1.9",
                       Modality="SR")
    assert _store(node.port, text_sr) == 0x0000
    # An unknown SOP class is refused at association: no presentation context is accepted.
    ae = AE(ae_title="FUZZER")
    ae.add_requested_context("1.2.826.0.1.3680043.10.99.1", ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="AINODE")
    assert not assoc.is_established or not assoc.accepted_contexts
    if assoc.is_established:
        assoc.release()
    # An association aborted in the middle.
    ae = AE(ae_title="FUZZER")
    ae.add_requested_context(text_sr.SOPClassUID, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="AINODE")
    assert assoc.is_established
    assoc.abort()
    time.sleep(0.3)

    assert node.echo(), "node must keep answering after bad input and an abort"
    phantom = make_ct_series(tmp_path / "ct", slices=4, size=32)
    storescu(dcmtk, node, phantom.files)
    db = sqlite3.connect(node.data_dir / "node.db")
    uids = {r[0] for r in db.execute("select sop_instance_uid from instances")}
    assert "1.2.826.0.1.3680043.10.1.9" in uids
    assert "1.2.3.4" not in uids and "1.2.826.0.1.3680043.10.1.10" not in uids
    assert len(uids) == 1 + 4
    assert not Path("/tmp/evil").exists()
    log = node.log_text()
    assert "StudyInstanceUID '../../../../tmp/evil' is missing or not a valid UID" in log
    # pydicom reads a truncated data set leniently: the missing Study Instance UID is what refuses it
    assert "1.2.826.0.1.3680043.10.1.10 from FUZZER: StudyInstanceUID '' is missing" in log
    assert "aborted" in log


def test_disk_floor_refuses_with_out_of_resources(make_node):
    node = make_node(min_free_disk_mb=10**9).start()
    assert _store(node.port, _dataset()) == 0xA700
    assert "free disk below min_free_disk_mb" in node.log_text()
    assert not list((node.data_dir / "images").rglob("*.dcm"))


def test_duplicate_sop_instance_replaces(dcmtk, make_node, tmp_path):
    node = make_node().start()
    phantom = make_ct_series(tmp_path / "ct", slices=3, size=32)
    storescu(dcmtk, node, phantom.files)
    storescu(dcmtk, node, phantom.files)
    db = sqlite3.connect(node.data_dir / "node.db")
    assert db.execute("select count(*) from instances").fetchone()[0] == 3
    assert len(list((node.data_dir / "images").rglob("*.dcm"))) == 3


def test_restart_mid_study_loses_nothing(dcmtk, orthanc, make_node, tmp_path):
    phantom = make_ct_series(tmp_path / "ct", slices=24, size=96)
    files = sorted(phantom.files)
    node = make_node(orthanc, series_timeout_s=3.0).start()
    storescu(dcmtk, node, files[:12])
    node.kill()                                      # SIGKILL in the middle of the study
    db = sqlite3.connect(node.data_dir / "node.db")
    assert db.execute("select count(*) from instances").fetchone()[0] == 12
    db.close()
    node.start()
    storescu(dcmtk, node, files[12:])
    results = orthanc.wait_for(lambda: (r := result_instances(orthanc, phantom.study_uid)) and len(r) == 2 and r,
                               timeout=60, message="SEG and SR after restart")
    volumes = sr_volumes(results[SR_CLASS])
    assert volumes["Lungs"] == pytest.approx(phantom.volumes_ml["Lungs"], rel=0.05)
    db = sqlite3.connect(node.data_dir / "node.db")
    assert db.execute("select count(*) from instances").fetchone()[0] == 24
    assert db.execute("select status from jobs").fetchall() == [("done",)]


def test_failed_delivery_is_visible_and_retry_sends_it(dcmtk, make_node, tmp_path):
    from node.demo import DemoPacs

    class Down:                                      # a PACS that is not there yet
        aet = "LATEPACS"
        dicom_port = free_port()

    node = make_node(Down)
    config = node.config.read_text().replace("max_attempts = 4", "max_attempts = 2")
    node.config.write_text(config)
    node.start()
    phantom = make_ct_series(tmp_path / "ct", slices=8, size=64)
    storescu(dcmtk, node, phantom.files)
    deadline = time.time() + 60
    while "failed after 2 attempts" not in node.log_text() and time.time() < deadline:
        time.sleep(0.2)
    jobs = node.cli("jobs").stdout
    assert "-> pacs: failed after 2 attempt(s)" in jobs, jobs
    assert "association failed" in jobs
    pacs = DemoPacs("LATEPACS", port=Down.dicom_port)
    try:
        job_id = jobs.split()[0].lstrip("#")
        retried = node.cli("retry", job_id)
        assert retried.returncode == 0 and "1 deliveries queued again" in retried.stdout
        assert f"retry      job {job_id}" in node.cli("audit", "--action", "retry").stdout
        deadline = time.time() + 30
        while len(pacs.received) < 2 and time.time() < deadline:
            time.sleep(0.1)
        assert sorted(ds.Modality for _, ds in pacs.received) == ["SEG", "SR"]
    finally:
        pacs.stop()


def _associate(port: int, aet: str = "FUZZER", bind: str = "127.0.0.1"):
    from pynetdicom.sop_class import Verification
    ae = AE(ae_title=aet)
    ae.add_requested_context(Verification)
    return ae.associate("127.0.0.1", port, ae_title="AINODE", bind_address=(bind, 0))


def test_only_allowed_callers_get_in(dcmtk, make_node):
    node = make_node(allowed_calling_aets=["CTSCANNER", "PROBE"], allowed_addresses=["127.0.0.1/32"])
    node.start()
    echo = dcmtk.run("echoscu", "-aet", "INTRUDER", "-aec", "AINODE", "127.0.0.1", str(node.port), check=False)
    assert echo.returncode != 0 and "Calling AE Title Not Recognized" in echo.stdout + echo.stderr
    assert dcmtk.run("echoscu", "-aet", "CTSCANNER", "-aec", "AINODE", "127.0.0.1", str(node.port)).returncode == 0
    assoc = _associate(node.port, "CTSCANNER", bind="127.0.0.2")   # allowed title, other address
    assert assoc.is_rejected
    log = node.log_text()
    assert "INTRUDER at 127.0.0.1 rejected: calling AE title not in ingest.allowed_calling_aets" in log
    assert "CTSCANNER at 127.0.0.2 rejected: address not in ingest.allowed_addresses" in log


def test_association_limit_is_a_clear_refusal(make_node):
    node = make_node()
    node.config.write_text(node.config.read_text().replace('data_dir =', 'max_associations = 1\ndata_dir ='))
    node.start()
    first = _associate(node.port)
    assert first.is_established
    try:
        second = _associate(node.port)
        assert second.is_rejected
        assert "node.max_associations (1) reached" in node.log_text()
    finally:
        first.release()


def test_two_ingest_processes_share_the_port(dcmtk, make_node, tmp_path):
    import concurrent.futures
    node = make_node(processes=2).start()
    series = [make_ct_series(tmp_path / f"ct{k}", slices=10, size=32, seed=k) for k in range(4)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        done = list(pool.map(lambda s: storescu(dcmtk, node, s.files), series))
    assert all(d.returncode == 0 for d in done)
    db = sqlite3.connect(node.data_dir / "node.db")
    assert db.execute("select count(*) from instances").fetchone()[0] == 40
    assert db.execute("select count(*) from series").fetchone()[0] == 4
    assert "2 ingest processes share port" in node.log_text()
    assert node.stop() == 0


def test_retention_removes_files_after_delivery_and_keeps_records(dcmtk, orthanc, make_node, tmp_path):
    node = make_node(orthanc)
    node.config.write_text(node.config.read_text() + "[retention]\ndelete_after_h = 0.0005\ncheck_interval_s = 0.5\n")
    node.start()
    phantom = make_ct_series(tmp_path / "ct", slices=6, size=64)
    storescu(dcmtk, node, phantom.files)
    orthanc.wait_for(lambda: len(result_instances(orthanc, phantom.study_uid)) == 2, timeout=60,
                     message="results delivered")
    db = sqlite3.connect(node.data_dir / "node.db")
    deadline = time.time() + 30
    while db.execute("select status from series").fetchone()[0] != "purged" and time.time() < deadline:
        time.sleep(0.2)
    assert db.execute("select status from series").fetchone()[0] == "purged"
    assert not list((node.data_dir / "images").rglob("*.dcm"))
    assert not list((node.data_dir / "results").rglob("*.dcm"))
    assert db.execute("select count(*) from instances").fetchone()[0] == 6      # the record stays
    assert "Lungs" in node.cli("jobs").stdout
    assert "purged" in node.cli("audit", "--action", "purged").stdout
