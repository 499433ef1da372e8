"""Model packages end to end: DCMTK storescu in, ``ainode serve`` with several models, Orthanc out."""

from __future__ import annotations

import io
import json
import subprocess
import time

import highdicom as hd
import pydicom
import pytest
from pydicom.uid import JPEGLSLossless

import onnxmodels as om
from conftest import free_port
from node.synthetic.ct import make_ct_series
from node.synthetic.radiograph import make_chest_radiograph
from nodeproc import REPO, NodeProcess, build_models, write_config

VALIDATOR = REPO / "tests" / "tools" / "validate_dicom.sh"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
CPU_FIRST = ["CUDAExecutionProvider", "CPUExecutionProvider"]


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    folder = build_models(tmp_path_factory.mktemp("models"), ("ct-tissue", "chest-xray-demo"))
    om.package(folder, "vol3d", om.pointwise3d([1.0], [0.0]), """
        task = "segmentation"
        [input]
        modalities = ["CT"]
        kind = "volume"
        spacing = [2.0, 4.0, 4.0]
        window = [-1024, 3071]
        normalisation = "scale"
        scale = 0.001
        patch_size = [8, 8, 8]
        [output]
        kind = "probabilities"
        decision = "threshold"
        threshold = 0.2
        """, segments=[(0, "Dense")])
    return folder


@pytest.fixture
def start_node(tmp_path, models_dir):
    nodes: list[NodeProcess] = []

    def start(routes, destinations=()) -> NodeProcess:
        port = free_port()
        data_dir = tmp_path / "node-data"
        config = write_config(tmp_path / "node.toml", {
            "node": {"ae_title": "AINODE", "host": "127.0.0.1", "port": port, "data_dir": str(data_dir)},
            "ingest": {"series_timeout_s": 1.0, "min_free_disk_mb": 10},
            "inference": {"models_dir": str(models_dir), "providers": CPU_FIRST},
            "delivery": {"backoff_s": 0.5, "max_attempts": 4, "timeout_s": 10},
            "destinations": list(destinations),
            "routes": routes,
        })
        node = NodeProcess(config=config, port=port, data_dir=data_dir, log=tmp_path / "node.log")
        nodes.append(node)
        return node.start()

    yield start
    for node in nodes:
        node.stop()


def storescu(dcmtk, node: NodeProcess, *files, aet: str = "XRAYROOM", propose=()) -> None:
    dcmtk.run("storescu", *propose, "-aet", aet, "-aec", node.ae_title, "127.0.0.1", str(node.port),
              *[str(f) for f in files], timeout=120)


def wait_jobs(node: NodeProcess, count: int, timeout: float = 60.0) -> list[dict]:
    """The node's jobs once ``count`` of them are finished (done or failed)."""
    deadline = time.monotonic() + timeout
    while True:
        jobs = json.loads(node.cli("jobs", "--json").stdout)
        finished = [j for j in jobs if j["status"] in ("done", "failed")]
        if len(finished) >= count:
            return jobs
        if time.monotonic() > deadline:
            raise AssertionError(f"{count} finished jobs not seen in {timeout} s: {jobs}\n{node.log_text()}")
        time.sleep(0.2)


def test_chest_radiograph_gets_a_classification_sr(dcmtk, orthanc, start_node, tmp_path):
    xr = make_chest_radiograph(tmp_path / "xr", seed=4242, positive=True, rows=640, cols=560,
                               monochrome1=True, transfer_syntax=JPEGLSLossless)
    node = start_node(
        routes=[{"name": "chest-xr", "match": {"Modality": ["DX", "CR"]}, "models": ["chest-xray-demo"],
                 "send_to": ["pacs"], "priority": "routine"}],
        destinations=[{"name": "pacs", "ae_title": orthanc.aet, "host": "127.0.0.1",
                       "port": orthanc.dicom_port}])
    storescu(dcmtk, node, xr.path, propose=["--propose-jls-lossless"])   # sent as stored

    def sr_in_orthanc():
        for instance in orthanc.instances():
            tags = orthanc.tags(instance)
            if tags.get("SOPClassUID") == SR_CLASS:
                return instance, tags
        return None

    instance, tags = orthanc.wait_for(sr_in_orthanc, timeout=60, message="classification SR in Orthanc")
    assert tags["StudyInstanceUID"] == xr.study_uid
    assert tags["SeriesDescription"] == "AI SR chest-xray-demo 1.0.0 DEMO"
    blob = orthanc.download(instance)
    (tmp_path / "sr.dcm").write_bytes(blob)
    check = subprocess.run(["bash", str(VALIDATOR), str(tmp_path / "sr.dcm")], capture_output=True,
                           text=True, timeout=300)
    assert check.returncode == 0, check.stdout + check.stderr

    sr = hd.sr.srread(io.BytesIO(blob))
    assert sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0] \
        .ReferencedSOPSequence[0].ReferencedSOPInstanceUID == xr.sop_instance_uid
    (group,) = sr.content.get_image_measurement_groups()
    assert group.finding_type.value == "233604007"
    (probability,) = group.get_measurements(name=pydicom.sr.codedict.codes.DCM.Probability)
    assert probability.value > 0.5
    evaluations = {item.ConceptNameCodeSequence[0].CodeMeaning: item.ConceptCodeSequence[0].CodeMeaning
                   for item in group[0].ContentSequence
                   if item.ValueType == "CODE" and item.RelationshipType == "CONTAINS"}
    assert evaluations["Pneumonia"] == "Present" and evaluations["Priority"] == "Urgent"

    jobs = node.cli("jobs")
    assert "Pneumonia: p=" in jobs.stdout and "POSITIVE" in jobs.stdout, jobs.stdout
    status = node.cli("status")
    assert "running, pid" in status.stdout, status.stdout
    assert ("model:      chest-xray-demo 1.0.0 (classification, image) on CPUExecutionProvider"
            in status.stdout), status.stdout
    summary = json.loads(node.cli("jobs", "--json").stdout)[0]["summary"]
    assert set(summary["timings"]) == {"decode", "preprocess", "run", "postprocess", "encode"}


def test_jobs_that_cannot_run_fail_clearly_and_others_succeed(dcmtk, start_node, tmp_path):
    node = start_node(routes=[
        {"name": "everything", "models": ["chest-xray-demo"]},          # catch-all: wrong for CT
        {"name": "ct-3d", "match": {"Modality": "CT"}, "models": ["vol3d"]},
    ])
    one = make_ct_series(tmp_path / "one", slices=1, size=32, patient_id="ONE", accession="ONE")
    ct = make_ct_series(tmp_path / "ct", slices=12, size=48, patient_id="CT", accession="CT")
    xr = make_chest_radiograph(tmp_path / "xr", seed=77, rows=320, cols=288, accession="XR")
    storescu(dcmtk, node, *one.files, *ct.files, xr.path, aet="MODALITY")

    jobs = wait_jobs(node, 5)
    by = {(j["accession"], j["model"]): j for j in jobs}
    assert len(jobs) == 5
    assert by[("ONE", "chest-xray-demo")]["status"] == "failed"
    assert by[("ONE", "chest-xray-demo")]["error"] == "InputError: model chest-xray-demo takes DX, CR, series is CT"
    assert by[("ONE", "vol3d")]["status"] == "failed"
    assert by[("ONE", "vol3d")]["error"] == ("InputError: model vol3d takes a 3D volume, series has 1 image "
                                              "(at least 2 slices needed)")
    assert by[("CT", "chest-xray-demo")]["status"] == "failed"
    assert by[("CT", "vol3d")]["status"] == "done"
    dense = by[("CT", "vol3d")]["summary"]["volumes_ml"]["Dense"]    # bone, above 200 HU
    assert dense == pytest.approx(ct.volumes_ml["Bone"], rel=0.5)
    assert by[("XR", "chest-xray-demo")]["status"] == "done"
    assert by[("XR", "chest-xray-demo")]["summary"]["findings"][0]["positive"] is False
    # failed jobs are final at the first attempt: the input can never work
    assert all(j["attempts"] == 1 for j in jobs if j["status"] == "failed")
    text = node.cli("jobs").stdout
    assert "error: InputError: model chest-xray-demo takes DX, CR, series is CT" in text
    assert node.echo()
