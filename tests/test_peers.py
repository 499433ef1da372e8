"""The test harness itself: DCMTK, storescp and Orthanc fixtures talk to each other."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid


def write_ct(path: Path, size: int = 16) -> Dataset:
    """Write a small, valid CT image (explicit VR little endian) and return it."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.FrameOfReferenceUID = generate_uid()
    ds.PatientName = "Harness^Test"
    ds.PatientID = "HARNESS-1"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20240101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.Modality = "CT"
    ds.Manufacturer = "pacs-ai-node tests"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.AcquisitionNumber = 1
    ds.PatientPosition = "HFS"
    ds.Laterality = ""
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.PositionReferenceIndicator = ""
    ds.ImagePositionPatient = [0.0, 0.0, 0.0]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [1.0, 1.0]
    ds.SliceThickness = 1.0
    ds.KVP = 120
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = size
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    pixels = (np.arange(size * size, dtype=np.uint16) * 7 % 4096).reshape(size, size)
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return ds


def test_dcmtk_binaries_are_dcmtk_not_pynetdicom(dcmtk):
    for tool in ("storescu", "storescp", "echoscu", "dcmdump", "dcmsend"):
        path = getattr(dcmtk, tool)
        assert path == f"/usr/bin/{tool}"
        assert "dcmtk" in dcmtk.run(tool, "--version").stdout
    assert dcmtk.env["TCP_NODELAY"] == "1"


def test_echoscu_to_orthanc(dcmtk, orthanc):
    dcmtk.run("echoscu", "-aet", "AINODE", "-aec", orthanc.aet, orthanc.host, orthanc.dicom_port)


def test_storescu_to_orthanc(dcmtk, orthanc, tmp_path):
    sent = write_ct(tmp_path / "ct.dcm")
    assert orthanc.instances() == []

    dcmtk.run("storescu", "-aet", "AINODE", "-aec", orthanc.aet,
              orthanc.host, orthanc.dicom_port, tmp_path / "ct.dcm")

    instance = orthanc.instance_by_sop_uid(sent.SOPInstanceUID)
    assert instance is not None
    assert orthanc.instances() == [instance]
    assert len(orthanc.studies()) == 1
    assert orthanc.tags(instance)["SOPInstanceUID"] == sent.SOPInstanceUID
    stored = pydicom.dcmread(io.BytesIO(orthanc.download(instance)))
    assert stored.SOPInstanceUID == sent.SOPInstanceUID
    assert stored.PixelData == sent.PixelData


def test_orthanc_is_emptied_between_tests(orthanc):
    assert orthanc.instances() == []
    assert orthanc.studies() == []


def test_storescu_to_storescp(dcmtk, storescp, tmp_path):
    sent = write_ct(tmp_path / "ct.dcm")
    scp = storescp("RECEIVER")

    dcmtk.run("storescu", "-aet", "AINODE", "-aec", scp.aet, "127.0.0.1", scp.port,
              tmp_path / "ct.dcm")

    [received] = scp.files()
    assert received.parent == scp.folder
    ds = pydicom.dcmread(received)
    assert ds.SOPInstanceUID == sent.SOPInstanceUID
    assert ds.PixelData == sent.PixelData


def test_orthanc_sends_to_a_declared_modality(dcmtk, orthanc, storescp, tmp_path):
    sent = write_ct(tmp_path / "ct.dcm")
    dcmtk.run("storescu", "-aec", orthanc.aet, orthanc.host, orthanc.dicom_port,
              tmp_path / "ct.dcm")
    scp = storescp("AINODE")

    orthanc.add_modality("node", scp.aet, scp.port)
    orthanc.store_to("node", orthanc.instance_by_sop_uid(sent.SOPInstanceUID))

    [received] = orthanc.wait_for(scp.files, timeout=10, message="file at storescp")
    assert pydicom.dcmread(received).SOPInstanceUID == sent.SOPInstanceUID


def test_orthanc_factory_with_own_options(dcmtk, orthanc_factory):
    pacs = orthanc_factory("PACS", modalities={"node": ("AINODE", "127.0.0.1", 11112)},
                           OverwriteInstances=True)
    assert pacs.get("/system")["DicomAet"] == "PACS"
    assert pacs.get("/modalities") == ["node"]
    dcmtk.run("echoscu", "-aec", "PACS", pacs.host, pacs.dicom_port)


def test_a_response_is_taken_only_by_the_thread_that_waits_for_it(storescp):
    """pynetdicom's association thread polls the DIMSE queue too; on a loaded machine it once
    took a C-STORE response meant for the sender (the delivery then timed out and was sent
    twice). On our associations that poll never takes a response; the waiting sender does."""
    from pynetdicom import AE
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.sop_class import Verification
    from node.dicom.deliver import keep_responses_for_the_sender

    scp = storescp("STORESCP")
    ae = AE("PROBE")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title=scp.aet)
    assert assoc.is_established
    try:
        keep_responses_for_the_sender(assoc)
        response = C_STORE()
        response.MessageIDBeingRespondedTo = 7
        request = C_STORE()
        request.MessageID = 8
        assoc._reactor_checkpoint.clear()             # keep pynetdicom's own poll out of the way
        while not assoc._is_paused:
            pass
        assoc.dimse.msg_queue.put((1, response))
        assert assoc.dimse.get_msg(block=False) == (None, None)     # the poll leaves it
        assert assoc.dimse.get_msg(block=True) == (1, response)     # the waiting sender gets it
        assoc.dimse.msg_queue.put((1, request))
        assert assoc.dimse.get_msg(block=False) == (1, request)     # requests still reach the poll
        assoc._reactor_checkpoint.set()
    finally:
        assoc.release()
