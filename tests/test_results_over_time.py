"""Results a PACS can trust over time: late slices give new result UIDs (never an overwrite
the PACS may refuse), the earlier result is recorded as superseded; reasons are the real ones;
an unresolved @origin is a visible failed delivery; the source's body part is carried."""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path

import pydicom
import pytest

from conftest import free_port
from node.synthetic.ct import make_ct_series
from nodeproc import wait_for, REPO, NodeProcess, write_config

VALIDATOR = REPO / "tests" / "tools" / "validate_dicom.sh"

SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
KOS_CLASS = "1.2.840.10008.5.1.4.1.1.88.59"


def rejected_by(note: pydicom.Dataset) -> set[str]:
    return {item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for item in note.ContentSequence
            if item.ValueType in ("COMPOSITE", "IMAGE")}



def node_for(tmp_path: Path, models: Path, destinations: list[dict], send_to: list[str]) -> NodeProcess:
    port = free_port()
    config = write_config(tmp_path / "node.toml", {
        "node": {"host": "127.0.0.1", "port": port, "data_dir": str(tmp_path / "data")},
        "ingest": {"series_timeout_s": 1.0, "min_free_disk_mb": 0},
        "inference": {"models_dir": str(models), "providers": ["CPUExecutionProvider"]},
        "delivery": {"backoff_s": 0.5, "max_attempts": 3, "timeout_s": 10},
        **({"destinations": destinations} if destinations else {}),
        "routes": [{"name": "ct", "match": {"Modality": "CT"}, "models": ["ct-tissue"], "send_to": send_to}],
    })
    return NodeProcess(config=config, port=port, data_dir=tmp_path / "data", log=tmp_path / "node.log").start()


def storescu(dcmtk, node: NodeProcess, files, aet: str = "CTSCANNER") -> None:
    dcmtk.run("storescu", "-aet", aet, "-aec", "AINODE", "127.0.0.1", str(node.port), *[str(f) for f in files])


def results_in(orthanc, study_uid: str, sop_class: str) -> list[pydicom.Dataset]:
    out = []
    for instance in orthanc.instances():
        tags = orthanc.get(f"/instances/{instance}/simplified-tags")
        if tags.get("SOPClassUID") == sop_class and tags.get("StudyInstanceUID") == study_uid:
            out.append(pydicom.dcmread(io.BytesIO(orthanc.download(instance))))
    return out


def jobs(node: NodeProcess) -> list[dict]:
    return json.loads(node.cli("jobs", "--json").stdout or "[]")


def test_late_slices_give_new_results_that_a_default_orthanc_keeps(dcmtk, orthanc, models_dir, tmp_path):
    """Orthanc in its default configuration (OverwriteInstances false) keeps the first of two
    objects with one SOP Instance UID: a re-run must carry new UIDs to be seen at all."""
    node = node_for(tmp_path, models_dir, [{"name": "pacs", "ae_title": orthanc.aet, "host": "127.0.0.1",
                                            "port": orthanc.dicom_port, "supersede": "iocm"}], ["pacs"])
    try:
        phantom = make_ct_series(tmp_path / "ct", slices=40, size=64)
        files = sorted(phantom.files, key=lambda f: float(pydicom.dcmread(f, stop_before_pixels=True)
                                                           .ImagePositionPatient[2]))
        storescu(dcmtk, node, files[:36])
        first = wait_for(lambda: results_in(orthanc, phantom.study_uid, SEG_CLASS), "the first SEG in Orthanc")
        assert len(first) == 1 and len(first[0].ReferencedSeriesSequence[0].ReferencedInstanceSequence) == 36
        storescu(dcmtk, node, files[36:])                 # four late slices of the same series
        segs = wait_for(lambda: (lambda s: s if len(s) == 2 else None)(
            results_in(orthanc, phantom.study_uid, SEG_CLASS)), "the second SEG in Orthanc")
        newest = max(segs, key=lambda ds: len(ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence))
        assert len(newest.ReferencedSeriesSequence[0].ReferencedInstanceSequence) == 40
        assert newest.SOPInstanceUID != first[0].SOPInstanceUID
        assert newest.SeriesInstanceUID != first[0].SeriesInstanceUID
        srs = results_in(orthanc, phantom.study_uid, SR_CLASS)
        assert len(srs) == 2 and len({ds.SOPInstanceUID for ds in srs}) == 2
        job = jobs(node)[0]
        superseded = {r["sop_instance_uid"] for r in job["summary"]["supersedes"]}
        assert first[0].SOPInstanceUID in superseded and len(superseded) == 2       # the SEG and its SR
        assert "supersedes 2 earlier result objects (its input changed)" in node.cli("jobs").stdout
        audit = json.loads(node.cli("audit", "--action", "superseded", "--json").stdout)
        assert audit and first[0].SOPInstanceUID in audit[0]["detail"]["result_uids"]
        # supersede = "iocm": Orthanc also got an IHE IOCM rejection note for the first SEG and SR
        notes = wait_for(lambda: results_in(orthanc, phantom.study_uid, KOS_CLASS), "the rejection note in Orthanc")
        assert len(notes) == 1 and notes[0].ConceptNameCodeSequence[0].CodeValue == "113001"
        assert rejected_by(notes[0]) == superseded
        # The same input again (a re-send of all 40) changes nothing: the same UIDs, no third SEG.
        storescu(dcmtk, node, files)
        wait_for(lambda: jobs(node)[0]["status"] == "done" and jobs(node)[0]["attempts"] >= 1
                 and len([d for d in jobs(node)[0]["deliveries"] if d["status"] == "done"]) >= 3,
                 "the re-send processed")
        assert len(results_in(orthanc, phantom.study_uid, SEG_CLASS)) == 2
        assert len(results_in(orthanc, phantom.study_uid, KOS_CLASS)) == 1      # and no second note
        for ds in segs + srs + notes:
            path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
            ds.save_as(path)
            subprocess.run(["bash", str(VALIDATOR), str(path)],
                           check=True, capture_output=True)
    finally:
        node.stop()


def test_a_failed_re_run_withdraws_the_earlier_result(dcmtk, orthanc, models_dir, tmp_path):
    """A late instance that breaks the series (a second slice at the same position) makes the
    re-run fail: the earlier SEG and SR are withdrawn (the audit says so) and a rejection note
    tells the PACS."""
    node = node_for(tmp_path, models_dir, [{"name": "pacs", "ae_title": orthanc.aet, "host": "127.0.0.1",
                                            "port": orthanc.dicom_port, "supersede": "iocm"}], ["pacs"])
    try:
        phantom = make_ct_series(tmp_path / "ct", slices=12, size=48)
        storescu(dcmtk, node, phantom.files)
        wait_for(lambda: len(results_in(orthanc, phantom.study_uid, SR_CLASS)) == 1, "the first results in Orthanc")
        first = {ds.SOPInstanceUID for cls in (SEG_CLASS, SR_CLASS) for ds in results_in(orthanc, phantom.study_uid, cls)}
        twin = pydicom.dcmread(phantom.files[0])
        twin.SOPInstanceUID = twin.file_meta.MediaStorageSOPInstanceUID = twin.SOPInstanceUID + ".1"
        twin.save_as(tmp_path / "twin.dcm")
        storescu(dcmtk, node, [tmp_path / "twin.dcm"])             # same position as another slice
        wait_for(lambda: jobs(node)[0]["status"] == "failed", "the re-run failed")
        assert "duplicate" in jobs(node)[0]["error"].lower(), jobs(node)[0]["error"]
        notes = wait_for(lambda: results_in(orthanc, phantom.study_uid, KOS_CLASS), "the rejection note")
        assert len(first) == 2 and rejected_by(notes[0]) == first
        audit = json.loads(node.cli("audit", "--action", "withdrawn", "--json").stdout)
        assert audit and set(audit[0]["detail"]["result_uids"]) == first
        assert "re-run failed" in audit[0]["detail"]["why"]
    finally:
        node.stop()


def test_wrong_modality_is_the_reason_given_before_any_pixel_is_decoded(dcmtk, models_dir, tmp_path):
    node = node_for(tmp_path, models_dir, [], [])
    node.config.write_text(node.config.read_text().replace('match = { Modality = "CT" }', ""))
    node.stop()
    node.start()
    try:
        phantom = make_ct_series(tmp_path / "mr", slices=3, size=32)
        for path in phantom.files:                      # an MR series whose pixel data cannot decode
            ds = pydicom.dcmread(path)
            ds.Modality = "MR"
            ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
            ds.PixelData = b"\x00" * 10
            ds.save_as(path)
        storescu(dcmtk, node, phantom.files, aet="MRSCANNER")
        job = wait_for(lambda: [j for j in jobs(node) if j["status"] == "failed"], "the job failed")[0]
        assert "model ct-tissue takes CT, series is MR" in job["error"], job["error"]
    finally:
        node.stop()


def test_unresolved_origin_is_a_visible_failed_delivery(dcmtk, models_dir, tmp_path):
    node = node_for(tmp_path, models_dir, [], ["@origin"])
    try:
        phantom = make_ct_series(tmp_path / "ct", slices=4, size=32)
        storescu(dcmtk, node, phantom.files, aet="UNKNOWNCT")
        job = wait_for(lambda: [j for j in jobs(node) if j["deliveries"] and
                                j["deliveries"][0]["status"] == "failed"], "a failed delivery")[0]
        error = job["deliveries"][0]["error"]
        assert "@origin: the sender 'UNKNOWNCT' is not a configured destination" in error, error
        shown = node.cli("jobs").stdout
        assert "-> @origin:UNKNOWNCT: failed" in shown, shown
        status = node.cli("status").stdout
        assert "deliveries    failed 1" in status, status
    finally:
        node.stop()


@pytest.mark.parametrize("body_part", ["CHEST"])
def test_the_results_carry_the_source_body_part_and_procedure(dcmtk, models_dir, tmp_path, body_part):
    from node.demo import DemoPacs

    pacs = DemoPacs("PACS")
    node = node_for(tmp_path, models_dir, [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1",
                                            "port": pacs.port}], ["pacs"])
    try:
        phantom = make_ct_series(tmp_path / "ct", slices=4, size=32)
        for path in phantom.files:
            ds = pydicom.dcmread(path)
            ds.BodyPartExamined = body_part
            code = pydicom.Dataset()
            code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "CTCHESTWO", "99HOSP", "CT chest w/o contrast"
            ds.ProcedureCodeSequence = [code]
            ds.save_as(path)
        storescu(dcmtk, node, phantom.files)
        wait_for(lambda: len(pacs.received) == 2, "SEG and SR at the PACS")
        seg = next(ds for _, ds in pacs.received if ds.Modality == "SEG")
        assert seg.BodyPartExamined == body_part
        sr = next(ds for _, ds in pacs.received if ds.Modality == "SR")
        performed = [(c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning) for c in sr.PerformedProcedureCodeSequence]
        assert performed == [("CTCHESTWO", "99HOSP", "CT chest w/o contrast")]    # as the hospital coded it
        files = []
        for k, (_, ds) in enumerate(pacs.received):
            files.append(tmp_path / f"result-{k}.dcm")
            ds.save_as(files[-1], enforce_file_format=True)
        check = subprocess.run(["bash", str(VALIDATOR), *map(str, files)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
    finally:
        node.stop()
        pacs.stop()


def test_a_radiograph_series_of_several_images_classifies_each_image(dcmtk, tmp_path):
    """A PA, a lateral and a repeat in one series: each image is classified and referenced by
    its own measurement groups in one SR; the series is positive when one image is."""
    from node.demo import DemoPacs
    from node.synthetic.radiograph import make_chest_radiograph
    from nodeproc import build_models

    models = build_models(tmp_path / "models", ("chest-xray-demo",))
    pacs = DemoPacs("PACS")
    port = free_port()
    config = write_config(tmp_path / "node.toml", {
        "node": {"host": "127.0.0.1", "port": port, "data_dir": str(tmp_path / "data")},
        "ingest": {"series_timeout_s": 1.0, "min_free_disk_mb": 0},
        "inference": {"models_dir": str(models), "providers": ["CPUExecutionProvider"]},
        "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}],
        "routes": [{"name": "xr", "match": {"Modality": ["DX", "CR"]}, "models": ["chest-xray-demo"],
                    "send_to": ["pacs"]}],
    })
    node = NodeProcess(config=config, port=port, data_dir=tmp_path / "data", log=tmp_path / "node.log").start()
    try:
        films = [make_chest_radiograph(tmp_path / f"xr{k}", seed=k, positive=k == 1, rows=rows, cols=cols,
                                       study_uid="1.2.826.0.1.3680043.10.68.1")
                 for k, (rows, cols) in enumerate([(512, 420), (480, 400), (512, 420)])]
        series_uid = "1.2.826.0.1.3680043.10.68.2"
        for k, film in enumerate(films):                 # one series of three images of two sizes
            ds = pydicom.dcmread(film.path)
            ds.SeriesInstanceUID, ds.InstanceNumber = series_uid, k + 1
            ds.save_as(film.path)
        storescu(dcmtk, node, [f.path for f in films], aet="XRAYROOM")
        job = wait_for(lambda: [j for j in jobs(node) if j["status"] in ("done", "failed")], "the job")[0]
        assert job["status"] == "done", job["error"]
        by_image = {i["sop_instance_uid"]: i["findings"][0] for i in job["summary"]["images"]}
        assert [by_image[f.sop_instance_uid]["positive"] for f in films] == [False, True, False]
        assert job["summary"]["findings"][0]["positive"] is True            # the series is positive
        wait_for(lambda: len(pacs.received) == 1, "the SR at the PACS")
        sr = pacs.received[0][1]
        path = tmp_path / "sr.dcm"
        sr.save_as(path, enforce_file_format=True)
        subprocess.run(["bash", str(VALIDATOR), str(path)], check=True,
                       capture_output=True)
        import highdicom as hd
        report = hd.sr.srread(path)
        groups = report.content.get_planar_roi_measurement_groups() + \
            list(report.content.get_image_measurement_groups())
        referenced = {g.source_images[0].referenced_sop_instance_uid for g in groups}
        assert referenced == {f.sop_instance_uid for f in films}
    finally:
        node.stop()
        pacs.stop()
