"""Completion by evidence: an MPPS COMPLETED whose instances have all arrived, a DISCONTINUED
one, and the release of an association from a sender that sends whole series, each complete a
series at once, long before the quiet timer (an hour here, so it cannot be what did it)."""

from __future__ import annotations

import json

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import ModalityPerformedProcedureStep

from conftest import free_port
from node.demo import DemoPacs
from node.synthetic.ct import make_ct_series
from nodeproc import wait_for, NodeProcess, write_config

TIMER_S = 3600.0



@pytest.fixture
def site(tmp_path, models_dir):
    pacs = DemoPacs("PACS")
    port = free_port()
    config = write_config(tmp_path / "node.toml", {
        "node": {"host": "127.0.0.1", "port": port, "data_dir": str(tmp_path / "data")},
        "ingest": {"series_timeout_s": TIMER_S, "min_free_disk_mb": 0, "complete_on_release": ["ARCHIVE*"],
                   "release_grace_s": 0.5},
        "inference": {"models_dir": str(models_dir), "providers": ["CPUExecutionProvider"]},
        "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}],
        "routes": [{"name": "ct", "match": {"Modality": "CT"}, "models": ["ct-tissue"], "send_to": ["pacs"]}],
    })
    node = NodeProcess(config=config, port=port, data_dir=tmp_path / "data", log=tmp_path / "node.log").start()
    node.pacs = pacs
    yield node
    node.stop()
    pacs.stop()


def series_status(node: NodeProcess) -> dict[str, str]:
    rows = json.loads(node.cli("routes", "log", "--json").stdout or "[]")
    return {r["series_uid"]: r["status"] for r in rows}


def mpps_scu(port: int):
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(ModalityPerformedProcedureStep)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    assoc = ae.associate("127.0.0.1", port, ae_title="AINODE")
    assert assoc.is_established
    return assoc


def performed_series(phantom, files) -> Dataset:
    item = Dataset()
    item.SeriesInstanceUID = phantom.series_uid
    item.ReferencedImageSequence = []
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        ref = Dataset()
        ref.ReferencedSOPClassUID = ds.SOPClassUID
        ref.ReferencedSOPInstanceUID = ds.SOPInstanceUID
        item.ReferencedImageSequence.append(ref)
    return item


def run_mpps(port: int, phantom, referenced, final: str) -> tuple[int, int, str]:
    uid = generate_uid(prefix="1.2.826.0.1.3680043.10.66.")
    create = Dataset()
    create.PerformedProcedureStepStatus = "IN PROGRESS"
    step = Dataset()
    step.StudyInstanceUID = phantom.study_uid
    create.ScheduledStepAttributesSequence = [step]
    create.PerformedSeriesSequence = []
    assoc = mpps_scu(port)
    try:
        status, _ = assoc.send_n_create(create, ModalityPerformedProcedureStep, uid)
        done = Dataset()
        done.PerformedProcedureStepStatus = final
        done.PerformedSeriesSequence = [performed_series(phantom, referenced)]
        set_status, _ = assoc.send_n_set(done, ModalityPerformedProcedureStep, uid)
    finally:
        assoc.release()
    return int(status.Status), int(set_status.Status), uid


def test_mpps_completed_completes_the_series_at_once(dcmtk, site, tmp_path):
    phantom = make_ct_series(tmp_path / "ct", slices=8, size=32)
    dcmtk.run("storescu", "-aet", "CTSCANNER", "-aec", "AINODE", "127.0.0.1", str(site.port),
              *[str(f) for f in phantom.files])
    assert run_mpps(site.port, phantom, phantom.files, "COMPLETED")[:2] == (0, 0)
    wait_for(lambda: len(site.pacs.received) == 2, "SEG and SR at the PACS")
    assert f"series {phantom.series_uid} complete (8 instances, by MPPS)" in site.log_text()
    shown = site.cli("mpps").stdout
    assert "COMPLETED" in shown and f"{phantom.series_uid} (8 instances)" in shown, shown
    assert "mpps          COMPLETED 1" in site.cli("status").stdout


def test_mpps_waits_for_a_referenced_instance_that_has_not_arrived(dcmtk, site, tmp_path):
    phantom = make_ct_series(tmp_path / "ct", slices=9, size=32)
    files = sorted(phantom.files)
    late = files[-1]
    dcmtk.run("storescu", "-aec", "AINODE", "127.0.0.1", str(site.port), *[str(f) for f in files[:-1]])
    _, _, uid = run_mpps(site.port, phantom, files, "COMPLETED")
    wait_for(lambda: f"1 referenced instances of series {phantom.series_uid} missing; waiting for them" in
             site.log_text(), "the MPPS to say what it waits for")
    assert series_status(site)[phantom.series_uid] == "receiving"
    assert "1 referenced instances of series" in site.cli("mpps").stdout
    dcmtk.run("storescu", "-aec", "AINODE", "127.0.0.1", str(site.port), str(late))
    wait_for(lambda: len(site.pacs.received) == 2, "SEG and SR at the PACS")
    assert f"series {phantom.series_uid} complete (9 instances, by MPPS)" in site.log_text()


def test_mpps_discontinued_processes_what_arrived(dcmtk, site, tmp_path):
    phantom = make_ct_series(tmp_path / "ct", slices=9, size=32)
    # the scan stopped two slices short: the last two positions never came
    files = sorted(phantom.files, key=lambda f: float(pydicom.dcmread(f, stop_before_pixels=True)
                                                       .ImagePositionPatient[2]))
    dcmtk.run("storescu", "-aec", "AINODE", "127.0.0.1", str(site.port), *[str(f) for f in files[:-2]])
    assert run_mpps(site.port, phantom, files, "DISCONTINUED")[:2] == (0, 0)
    wait_for(lambda: len(site.pacs.received) == 2, "SEG and SR at the PACS")
    assert f"series {phantom.series_uid} complete (7 instances, by MPPS)" in site.log_text()


def test_mpps_refusals_are_statuses(site):
    assoc = mpps_scu(site.port)
    try:
        unknown = Dataset()
        unknown.PerformedProcedureStepStatus = "COMPLETED"
        status, _ = assoc.send_n_set(unknown, ModalityPerformedProcedureStep, "1.2.826.0.1.3680043.10.66.9")
        assert int(status.Status) == 0x0112                   # no such SOP instance
        bad = Dataset()
        bad.PerformedProcedureStepStatus = "COMPLETED"        # must start IN PROGRESS
        status, _ = assoc.send_n_create(bad, ModalityPerformedProcedureStep, "1.2.826.0.1.3680043.10.66.10")
        assert int(status.Status) == 0x0106
    finally:
        assoc.release()
    assert "MPPS N-SET 1.2.826.0.1.3680043.10.66.9 from MODALITY refused: no such MPPS" in site.log_text()


def test_release_from_a_whole_series_sender_completes_its_series(dcmtk, site, tmp_path):
    archive = make_ct_series(tmp_path / "archive", slices=6, size=32, accession="FROMARCHIVE")
    scanner = make_ct_series(tmp_path / "scanner", slices=6, size=32, accession="FROMSCANNER",
                             patient_id="PHANTOM-0002", seed=3)
    dcmtk.run("storescu", "-aet", "CTSCANNER", "-aec", "AINODE", "127.0.0.1", str(site.port),
              *[str(f) for f in scanner.files])
    dcmtk.run("storescu", "-aet", "ARCHIVE1", "-aec", "AINODE", "127.0.0.1", str(site.port),
              *[str(f) for f in archive.files])
    wait_for(lambda: len(site.pacs.received) == 2, "SEG and SR at the PACS")
    assert f"series {archive.series_uid} complete (6 instances, by association release)" in site.log_text()
    assert {ds.AccessionNumber for _, ds in site.pacs.received} == {"FROMARCHIVE"}
    assert series_status(site)[scanner.series_uid] == "receiving"      # a scanner's release proves nothing
