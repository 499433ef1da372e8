"""An enhanced multi-frame CT gives the model the same input and the same results as the
single-frame series it was made from, and its SEG and SR pass the validators."""

from __future__ import annotations

import random
import subprocess
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from nodeproc import REPO, build_models
from node.results.encode import encode_segmentation
from node.results.part10 import part10_bytes
from node.inference.runtime import ModelRuntime
from node.inference.manifest import load_manifest
from node.synthetic.ct import make_ct_series
from node.inference.volume import load_series

VALIDATOR = REPO / "tests" / "tools" / "validate_dicom.sh"
_COPIED = ("StudyInstanceUID", "SeriesInstanceUID", "Modality", "FrameOfReferenceUID",
           "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
           "ReferringPhysicianName", "StudyID", "AccessionNumber", "SeriesNumber", "Manufacturer",
           "Rows", "Columns", "SamplesPerPixel", "PhotometricInterpretation", "BitsAllocated",
           "BitsStored", "HighBit", "PixelRepresentation")


def enhanced_ct(files: list[Path], path: Path, seed: int = 3) -> Path:
    """One Enhanced CT Image file holding the slices of ``files`` as frames, shuffled."""
    first = pydicom.dcmread(files[0])
    order = list(range(len(files)))
    random.Random(seed).shuffle(order)
    ds = Dataset()
    ds.file_meta = first.file_meta
    ds.file_meta.MediaStorageSOPClassUID = pydicom.uid.EnhancedCTImageStorage
    for keyword in _COPIED:
        setattr(ds, keyword, first.get(keyword))
    ds.SOPClassUID = pydicom.uid.EnhancedCTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = first.SOPInstanceUID + ".1"
    ds.InstanceNumber = 1
    ds.NumberOfFrames = len(files)
    shared = Dataset()
    shared.PixelMeasuresSequence = [Dataset()]
    shared.PixelMeasuresSequence[0].PixelSpacing = first.PixelSpacing
    shared.PixelMeasuresSequence[0].SliceThickness = first.SliceThickness
    shared.PlaneOrientationSequence = [Dataset()]
    shared.PlaneOrientationSequence[0].ImageOrientationPatient = first.ImageOrientationPatient
    shared.PixelValueTransformationSequence = [Dataset()]
    shared.PixelValueTransformationSequence[0].RescaleIntercept = first.RescaleIntercept
    shared.PixelValueTransformationSequence[0].RescaleSlope = "1"
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    per_frame, pixels = [], []
    for k in order:
        source = pydicom.dcmread(files[k])
        item, plane = Dataset(), Dataset()
        plane.ImagePositionPatient = source.ImagePositionPatient
        item.PlanePositionSequence = [plane]
        per_frame.append(item)
        pixels.append(source.pixel_array)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
    ds.PixelData = np.stack(pixels).astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_enhanced_multiframe_ct_end_to_end_of_the_model(tmp_path):
    folder = build_models(tmp_path / "models")
    runtime = ModelRuntime(load_manifest(folder / "ct-tissue"), ["CPUExecutionProvider"])
    phantom = make_ct_series(tmp_path / "ct", slices=10, size=64)
    single = load_series(phantom.files)
    multi = load_series([enhanced_ct(list(phantom.files), tmp_path / "enhanced.dcm")])
    assert sorted(multi.frames) == list(range(1, 11)) and multi.frames != tuple(range(1, 11))
    assert np.array_equal(runtime.preprocess(multi), runtime.preprocess(single))
    masks = runtime.run(multi).masks
    assert np.array_equal(masks, runtime.run(single).masks)

    result = encode_segmentation(multi.headers, masks, runtime.manifest, "job-mf", frames=multi.frames)
    for volume in result.volumes:
        assert volume.volume_ml == phantom.volumes_ml[volume.name]
    seg, sr = tmp_path / "seg.dcm", tmp_path / "sr.dcm"
    seg.write_bytes(part10_bytes(result.seg))
    sr.write_bytes(part10_bytes(result.sr))
    back = pydicom.dcmread(seg)
    enhanced_uid = multi.headers[0].SOPInstanceUID
    for item in back.PerFrameFunctionalGroupsSequence:        # each SEG frame names its source frame
        source = item.DerivationImageSequence[0].SourceImageSequence[0]
        assert source.ReferencedSOPInstanceUID == enhanced_uid
        position = float(item.PlanePositionSequence[0].ImagePositionPatient[2])
        frame = int(source.ReferencedFrameNumber)
        assert position == float(multi.positions[multi.frames.index(frame)][2])
    check = subprocess.run(["bash", str(VALIDATOR), str(seg), str(sr)], capture_output=True,
                           text=True, timeout=300)
    assert check.returncode == 0, check.stdout + check.stderr
