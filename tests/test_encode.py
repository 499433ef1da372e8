"""Encode stage: SEG and TID 1500 SR from masks and scores, checked on real files."""

from __future__ import annotations

import subprocess
from dataclasses import replace
from pathlib import Path

import highdicom as hd
import highdicom._standard_utils as standard
import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from node.results.encode import (
    OVERLAP_CHUNK_SLICES,
    SegmentationResult,
    derive_uid,
    encode_classification,
    encode_rejection,
    encode_segmentation,
    segments_overlap,
)
from node.errors import InputError
from node.results.part10 import part10_bytes
from node.inference.manifest import (
    Algorithm,
    Code,
    Finding,
    InputSpec,
    ModelManifest,
    OutputSpec,
    load_manifest,
)

ROOT = Path(__file__).resolve().parents[1]
VALIDATE = Path(__file__).resolve().parent / "tools" / "validate_dicom.sh"   # copy of the CI gate
SLICES, SIZE = 20, 64
PIXEL_MM, SLICE_MM = (0.7, 0.8), 2.5
JOB = "1.2.3|ct-tissue|1.0.0"


def write_ct_series(out_dir: Path, slices: int = SLICES, size: int = SIZE) -> list[Path]:
    """A small axial CT series (single-frame, explicit VR little endian) on disk."""
    out_dir.mkdir(parents=True, exist_ok=True)
    study, series, frame = (derive_uid("test", out_dir.name, p) for p in ("st", "se", "for"))
    paths = []
    for i in range(slices):
        sop = derive_uid("test", out_dir.name, "sop", str(i))
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop
        ds.StudyDate, ds.StudyTime, ds.ContentDate, ds.ContentTime = (
            "20240102", "101500", "20240102", "101501")
        ds.AccessionNumber, ds.Modality, ds.Manufacturer = "ACC1", "CT", "Test"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription, ds.SeriesDescription = "Chest", "Axial 2.5"
        ds.PatientName, ds.PatientID = "Müller^Jörg", "PID1"      # not ASCII on purpose
        ds.PatientBirthDate, ds.PatientSex = "19700101", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", 2, i + 1
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame, ""
        ds.PatientPosition = "HFS"
        ds.ImagePositionPatient = [-22.4, -22.4, -100.0 + i * SLICE_MM]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SliceLocation = -100.0 + i * SLICE_MM
        ds.SliceThickness = 3.0                      # differs from the spacing on purpose
        ds.PixelSpacing = list(PIXEL_MM)
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows = ds.Columns = size
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.KVP, ds.AcquisitionNumber = 120, 1
        ds.PixelData = np.full((size, size), 1024, dtype=np.uint16).tobytes()
        path = out_dir / f"ct{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def read_headers(paths: list[Path]) -> list[pydicom.Dataset]:
    """Headers sorted along the slice normal (+z here)."""
    heads = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    return sorted(heads, key=lambda ds: float(ds.ImagePositionPatient[2]))


def tissue_masks(slices: int = SLICES, size: int = SIZE) -> np.ndarray:
    """Body (disc) containing lungs (two boxes) and bone (a box): overlapping segments."""
    masks = np.zeros((slices, size, size, 3), dtype=bool)
    yy, xx = np.mgrid[:size, :size]
    masks[2:-2, :, :, 0] = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < (size * 0.45) ** 2
    masks[4:-4, size // 4:size // 2, size // 5:size // 2 - 2, 1] = True
    masks[4:-4, size // 4:size // 2, size // 2 + 2:4 * size // 5, 1] = True
    masks[:, 3 * size // 4:3 * size // 4 + 4, size // 2 - 3:size // 2 + 3, 2] = True
    masks[..., 2] &= masks[..., 0]
    return masks


@pytest.fixture(autouse=True)
def strict_pydicom():
    with pydicom.config.strict_reading():
        old = pydicom.config.settings.writing_validation_mode
        pydicom.config.settings.writing_validation_mode = pydicom.config.RAISE
        yield
        pydicom.config.settings.writing_validation_mode = old


@pytest.fixture(scope="module")
def series(tmp_path_factory) -> list[pydicom.Dataset]:
    return read_headers(write_ct_series(tmp_path_factory.mktemp("ct")))


@pytest.fixture(scope="module")
def tissue() -> ModelManifest:
    return load_manifest(ROOT / "models" / "ct-tissue")


@pytest.fixture(scope="module")
def encoded(series, tissue) -> SegmentationResult:
    return encode_segmentation(series, tissue_masks(), tissue, JOB)


def pneumonia_manifest() -> ModelManifest:
    return ModelManifest(
        name="cxr-pneumonia", version="0.2.0", task="classification",
        algorithm=Algorithm(name="pneumonia net", version="0.2.0"),
        input=InputSpec(modalities=("CT",)), output=OutputSpec(kind="scores"),
        demonstration=True,
        findings=(Finding(index=0, name="Pneumonia", code=Code("233604007", "Pneumonia"),
                          threshold=0.6, priority="urgent"),
                  Finding(index=1, name="Pneumothorax", code=Code("36118008", "Pneumothorax"),
                          threshold=0.5, priority="stat")))


def write_read(ds: pydicom.Dataset, path: Path) -> pydicom.Dataset:
    path.write_bytes(part10_bytes(ds))          # as the worker writes its results
    return pydicom.dcmread(path)


def validate(*paths: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(VALIDATE), *map(str, paths)],
                          capture_output=True, text=True, timeout=300)




def test_derive_uid_is_deterministic_and_valid():
    uid = derive_uid("a", "b")
    assert uid == derive_uid("a", "b")
    assert uid != derive_uid("b", "a") != derive_uid("ab") != derive_uid("a", "b", "")
    assert uid.startswith("2.25.") and len(uid) <= 64
    assert pydicom.uid.UID(uid).is_valid


def test_seg_and_sr_round_trip(encoded, series, tmp_path):
    seg = write_read(encoded.seg, tmp_path / "seg.dcm")
    sr = write_read(encoded.sr, tmp_path / "sr.dcm")
    src = series[0]
    for ds in (seg, sr):
        assert ds.StudyInstanceUID == src.StudyInstanceUID
        assert ds.PatientID == src.PatientID
        assert ds.Manufacturer == "pacs-ai-node"
        assert "AI" in ds.SeriesDescription and "DEMO" in ds.SeriesDescription
    assert seg.FrameOfReferenceUID == src.FrameOfReferenceUID
    assert (seg.SeriesNumber, sr.SeriesNumber) == (9901, 9902)
    assert seg.SegmentationType == "BINARY"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == src.SeriesInstanceUID
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Body", "Lungs", "Bone"]
    lungs = seg.SegmentSequence[1]
    assert lungs.SegmentedPropertyTypeCodeSequence[0].CodeValue == "39607008"
    assert lungs.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator == "SCT"
    assert lungs.SegmentAlgorithmType == "AUTOMATIC"
    algo = lungs.SegmentationAlgorithmIdentificationSequence[0]
    assert algo.AlgorithmName == "ct-tissue DEMO (not for clinical use)"
    assert algo.AlgorithmVersion == "1.0.0"
    assert algo.AlgorithmFamilyCodeSequence[0].CodeValue == "123110"
    rgb = hd.color.CIELabColor.from_dicom_value(tuple(lungs.RecommendedDisplayCIELabValue))
    assert np.allclose(rgb.to_rgb(), (90, 160, 255), atol=1)
    assert sr.SOPClassUID == pydicom.uid.Comprehensive3DSRStorage


def test_segment_volumes_match_masks(encoded):
    masks = tissue_masks()
    voxel_ml = PIXEL_MM[0] * PIXEL_MM[1] * SLICE_MM / 1000
    for i, vol in enumerate(encoded.volumes):
        assert vol.voxels == int(masks[..., i].sum())
        assert vol.volume_ml == pytest.approx(vol.voxels * voxel_ml, rel=1e-6)
    assert [v.name for v in encoded.volumes] == ["Body", "Lungs", "Bone"]
    assert [v.label for v in encoded.volumes] == [0, 1, 2]

    report = hd.sr.Comprehensive3DSR.from_dataset(encoded.sr)
    groups = report.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == 3
    for group, vol in zip(groups, encoded.volumes):
        (measurement,) = group.get_measurements(name=pydicom.sr.codedict.codes.SCT.Volume)
        assert measurement.value == pytest.approx(vol.volume_ml)
        assert measurement.unit.value == "ml"


def test_sr_references_seg_and_source_series(encoded, series):
    sr, seg = encoded.sr, encoded.seg
    report = hd.sr.Comprehensive3DSR.from_dataset(sr)
    groups = report.content.get_volumetric_roi_measurement_groups()
    for number, group in enumerate(groups, start=1):
        segment_item, series_item = group.referenced_segment
        assert segment_item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == \
            seg.SOPInstanceUID
        assert segment_item.ReferencedSOPSequence[0].ReferencedSegmentNumber == number
        assert series_item.ConceptNameCodeSequence[0].CodeValue == "121232"
        assert series_item.UID == series[0].SeriesInstanceUID
        assert group.tracking_uid == seg.SegmentSequence[number - 1].TrackingUID
    evidence = {(s.SeriesInstanceUID, i.ReferencedSOPInstanceUID)
                for st in sr.CurrentRequestedProcedureEvidenceSequence
                for s in st.ReferencedSeriesSequence for i in s.ReferencedSOPSequence}
    assert (seg.SeriesInstanceUID, seg.SOPInstanceUID) in evidence
    assert {(ds.SeriesInstanceUID, ds.SOPInstanceUID) for ds in series} <= evidence


def test_uids_are_deterministic(encoded, series, tissue):
    again = encode_segmentation(series, tissue_masks(), tissue, JOB)
    other = encode_segmentation(series, tissue_masks(), tissue, JOB + "x")

    def uids(r):
        return (r.seg.SeriesInstanceUID, r.seg.SOPInstanceUID, r.sr.SeriesInstanceUID,
                r.sr.SOPInstanceUID,
                r.seg.DimensionOrganizationSequence[0].DimensionOrganizationUID)

    assert uids(again) == uids(encoded)
    assert not set(uids(other)) & set(uids(encoded))
    assert len(set(uids(encoded))) == 5
    assert uids(encoded)[:4] == tuple(derive_uid(JOB, p) for p in (
        "seg-series", "seg-instance", "segmentation-sr-series", "segmentation-sr-instance"))


def read_masks(seg: pydicom.Dataset, series: list[pydicom.Dataset]) -> np.ndarray:
    """Masks (slices, rows, cols, segments) read back from a SEG, in source order."""
    seg = hd.seg.Segmentation.from_dataset(seg)
    return seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[ds.SOPInstanceUID for ds in series],
        segment_numbers=list(range(1, len(seg.SegmentSequence) + 1)),
        assert_missing_frames_are_empty=True).astype(bool)


def test_overlapping_segments_round_trip(encoded, series, tmp_path):
    seg = hd.seg.segread(_saved(encoded.seg, tmp_path / "seg.dcm"))
    assert seg.SegmentsOverlap == "YES"
    assert np.array_equal(read_masks(seg, series), tissue_masks())
    # empty frames are left out: the body is absent from the two first and last slices
    assert seg.NumberOfFrames < SLICES * 3


def test_non_overlapping_segments_round_trip(series, tissue, tmp_path):
    masks = tissue_masks()
    masks[..., 0] &= ~(masks[..., 1] | masks[..., 2])      # body minus lungs and bone
    result = encode_segmentation(series, masks, tissue, JOB)
    seg = hd.seg.segread(_saved(result.seg, tmp_path / "seg.dcm"))
    assert seg.SegmentsOverlap == "NO"
    assert np.array_equal(read_masks(seg, series), masks)


@pytest.mark.parametrize("where", [None, 0, OVERLAP_CHUNK_SLICES - 1, OVERLAP_CHUNK_SLICES, 2 * OVERLAP_CHUNK_SLICES + 3])
def test_overlap_check_agrees_with_highdicoms_own(where):
    """The chunked overlap check gives highdicom's answer wherever the one shared voxel lies,
    chunk edges included, with and without the per-slice counts."""
    rng = np.random.default_rng(5)
    slices = 2 * OVERLAP_CHUNK_SLICES + 5
    labels = rng.integers(0, 4, size=(slices, 8, 8))
    masks = np.stack([labels == k for k in (1, 2, 3)], axis=-1)      # disjoint
    if where is not None:
        masks[where, 3, 4, :2] = True                                 # one voxel in two segments
    planes = np.ascontiguousarray(np.moveaxis(masks, -1, 0))
    counts = np.array([[np.count_nonzero(p) for p in channel] for channel in planes]).T
    _, theirs = hd.seg.Segmentation._check_and_cast_pixel_array(
        masks, np.array([1, 2, 3]), hd.seg.SegmentationTypeValues.BINARY, np.uint8)
    assert theirs == (hd.seg.SegmentsOverlapValues.YES if where is not None else hd.seg.SegmentsOverlapValues.NO)
    assert segments_overlap(planes) is (where is not None)
    assert segments_overlap(planes, counts) is (where is not None)


def test_the_segs_overlap_check_is_ours_not_highdicoms_volume_copy(series, tissue, monkeypatch):
    """Overlapping stacked masks never reach highdicom's own overlap check (which sums the
    whole volume into an int64 copy); the SEG still says the segments overlap."""
    original = hd.seg.Segmentation._check_and_cast_pixel_array.__func__

    def refuse(cls, pixel_array, *args, **kwargs):
        assert not (pixel_array.ndim == 4 and pixel_array.dtype == np.bool_), "highdicom's check ran"
        return original(cls, pixel_array, *args, **kwargs)

    monkeypatch.setattr(hd.seg.Segmentation, "_check_and_cast_pixel_array", classmethod(refuse))
    result = encode_segmentation(series, tissue_masks(), tissue, JOB)
    assert result.seg.SegmentsOverlap == "YES"


def test_highdicoms_iod_look_ups_are_remembered_with_the_same_answers(series, tissue):
    """Building a SEG asks highdicom once per source image whether its IOD is multi-frame;
    the answers are kept, and are the answers of highdicom's own function."""
    lookup = standard.is_attribute_in_iod
    original = lookup.__wrapped__
    for attribute, sop_class, exclude in (("NumberOfFrames", CTImageStorage, None),
                                          ("NumberOfFrames", "1.2.840.10008.5.1.4.1.1.2.1", None),
                                          ("PixelData", "1.2.840.10008.5.1.4.1.1.66.4", ["IconImageSequence"]),
                                          ("PixelData", "1.2.840.10008.5.1.4.1.1.88.34", ["IconImageSequence"])):
        assert lookup(attribute, sop_class, exclude) == original(attribute, sop_class, exclude)
    with pytest.raises(KeyError):
        lookup("NumberOfFrames", "1.2.3.4")          # no such SOP class: highdicom's error, every time
    before = lookup.cache_info()
    encode_segmentation(series, tissue_masks(), tissue, JOB)
    after = lookup.cache_info()
    assert after.hits - before.hits >= len(series) - 1   # one walk of the tables, not one per image
    assert after.misses - before.misses <= 4


def test_empty_segment(series, tissue, tmp_path):
    masks = tissue_masks()
    masks[..., 1] = False
    result = encode_segmentation(series, masks, tissue, JOB)
    seg = hd.seg.segread(_saved(result.seg, tmp_path / "seg.dcm"))
    assert len(seg.SegmentSequence) == 3
    assert np.array_equal(read_masks(seg, series), masks)
    assert result.volumes[1].voxels == 0 and result.volumes[1].volume_ml == 0
    write_read(result.sr, tmp_path / "sr.dcm")


def test_all_segments_empty(series, tissue, tmp_path):
    masks = np.zeros_like(tissue_masks())
    result = encode_segmentation(series, masks, tissue, JOB)
    seg = hd.seg.segread(_saved(result.seg, tmp_path / "seg.dcm"))
    assert not read_masks(seg, series).any()
    assert all(v.volume_ml == 0 for v in result.volumes)


def test_mismatched_masks_are_refused(series, tissue):
    with pytest.raises(InputError, match="shape"):
        encode_segmentation(series, tissue_masks()[:-1], tissue, JOB)
    with pytest.raises(InputError, match="bool"):
        encode_segmentation(series, tissue_masks().astype(np.uint8), tissue, JOB)


def test_uneven_slice_spacing_uses_positions(series, tissue):
    """Volume follows ImagePositionPatient along the normal, not SliceThickness."""
    skipped = series[::2]                       # 5 mm apart, SliceThickness still 3
    masks = tissue_masks()[::2]
    result = encode_segmentation(skipped, masks, tissue, JOB)
    voxel_ml = PIXEL_MM[0] * PIXEL_MM[1] * 2 * SLICE_MM / 1000
    assert result.volumes[0].volume_ml == pytest.approx(masks[..., 0].sum() * voxel_ml)


def test_not_demo_has_no_demo_in_description(series, tissue):
    result = encode_segmentation(series, tissue_masks(), replace(tissue, demonstration=False),
                                 JOB)
    assert result.seg.SeriesDescription == "AI SEG ct-tissue 1.0.0"
    assert result.sr.SeriesDescription == "AI SR ct-tissue 1.0.0"


def test_classification(series, tmp_path):
    sr, findings = encode_classification(series, np.array([0.8, 0.1]), pneumonia_manifest(),
                                         JOB)
    assert [(f.name, f.positive, f.priority) for f in findings] == [
        ("Pneumonia", True, "urgent"), ("Pneumothorax", False, "stat")]
    assert findings[0].probability == pytest.approx(0.8)
    back = write_read(sr, tmp_path / "cls.dcm")
    assert back.SOPInstanceUID == derive_uid(JOB, "classification-sr-instance")
    assert back.SeriesNumber == 9903
    assert back.SeriesDescription == "AI SR cxr-pneumonia 0.2.0 DEMO"
    assert back.StudyInstanceUID == series[0].StudyInstanceUID
    report = hd.sr.Comprehensive3DSR.from_dataset(back)
    groups = report.content.get_image_measurement_groups()
    assert len(groups) == 2
    pneumonia, pneumothorax = groups
    assert pneumonia.finding_type.value == "233604007"
    (probability,) = pneumonia.get_measurements(name=pydicom.sr.codedict.codes.DCM.Probability)
    assert probability.value == pytest.approx(0.8)
    assert evaluations(pneumonia) == {"233604007": "52101004",      # present
                                      "260870009": "103391001"}     # priority urgent
    assert evaluations(pneumothorax) == {"36118008": "272519000"}   # absent, no priority


def evaluations(group) -> dict[str, str]:
    """CONTAINS CODE items of a measurement group (highdicom also lists concept modifiers)."""
    return {item.ConceptNameCodeSequence[0].CodeValue: item.ConceptCodeSequence[0].CodeValue
            for item in group[0].ContentSequence
            if item.ValueType == "CODE" and item.RelationshipType == "CONTAINS"
            and item.ConceptNameCodeSequence[0].CodeValue != "121071"}      # not the Finding


def test_classification_needs_a_score_per_finding(series):
    with pytest.raises(InputError, match="scores"):
        encode_classification(series, np.array([0.8]), pneumonia_manifest(), JOB)


def test_sr_header_and_context(encoded):
    sr = encoded.sr
    assert sr.ConceptNameCodeSequence[0].CodeValue == "126000"       # Imaging Measurement Report
    items = {item.ConceptNameCodeSequence[0].CodeValue: item for item in sr.ContentSequence}
    assert items["121058"].ConceptCodeSequence[0].CodeValue == "25045-6"   # CT, CID 100
    assert items["121005"].ConceptCodeSequence[0].CodeValue == "121007"    # device observer
    assert sr.VerificationFlag == "UNVERIFIED" and sr.CompletionFlag == "COMPLETE"


def test_planar_masks_need_no_copy_and_give_the_same_seg(encoded, series, tissue):
    planar = np.ascontiguousarray(np.moveaxis(tissue_masks(), 3, 1))   # (slices, segs, r, c)
    result = encode_segmentation(series, np.moveaxis(planar, 1, 3), tissue, JOB)
    assert result.seg.PixelData == encoded.seg.PixelData
    assert result.volumes == encoded.volumes


def test_single_segment(series, tissue, tmp_path):
    lungs = replace(tissue, segments=tissue.segments[1:2])
    masks = tissue_masks()[..., 1:2]
    result = encode_segmentation(series, masks, lungs, JOB)
    seg = hd.seg.segread(_saved(result.seg, tmp_path / "seg.dcm"))
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Lungs"]
    assert np.array_equal(read_masks(seg, series), masks)


def test_broken_geometry_is_an_input_error(series, tissue):
    stacked = [series[0], series[0]]
    with pytest.raises(InputError, match="same position"):
        encode_segmentation(stacked, tissue_masks()[:2], tissue, JOB)


def test_outputs_pass_validators(encoded, series, tmp_path):
    """dciodvfy and dsrdump report nothing; DicomSRValidator reports no error.

    Its warnings are known gaps between PixelMed's template tables and the current standard
    and highdicom: "Content Item not in template" for Finding category (TID 1411), Algorithm
    Manufacturer (TID 4019) and the qualitative evaluations of TID 1501, and a different
    capitalisation of the code meaning "Source Series for Segmentation" (121232).
    """
    cls, _ = encode_classification(series, np.array([0.8, 0.1]), pneumonia_manifest(), JOB)
    masks = tissue_masks()
    masks[..., 1] = False
    empty = encode_segmentation(series, masks, load_manifest(ROOT / "models" / "ct-tissue"),
                                JOB + "empty")
    paths = [_saved(ds, tmp_path / f"{name}.dcm") for name, ds in (
        ("seg", encoded.seg), ("sr", encoded.sr), ("cls", cls),
        ("seg-empty", empty.seg), ("sr-empty", empty.sr))]
    done = validate(*paths)
    assert done.returncode == 0, done.stdout + done.stderr


def test_rejection_note_references_what_it_withdraws_and_validates(encoded, series, tmp_path):
    """An IHE IOCM rejection note for an earlier SEG and SR: a KOS titled "Rejected for
    Quality Reasons" in the same study, referencing both, that passes the validators."""
    rejected = [dict(sop_class_uid=str(ds.SOPClassUID), sop_instance_uid=str(ds.SOPInstanceUID),
                     series_instance_uid=str(ds.SeriesInstanceUID), modality=str(ds.Modality))
                for ds in (encoded.seg, encoded.sr)]
    manifest = load_manifest(ROOT / "models" / "ct-tissue")
    note = encode_rejection(series[0], rejected, manifest, JOB + "rejection", "superseded: the input changed")
    assert note.Modality == "KO" and note.StudyInstanceUID == series[0].StudyInstanceUID
    assert note.ConceptNameCodeSequence[0].CodeValue == "113001"
    referenced = {item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
                  for item in note.ContentSequence if item.ValueType in ("COMPOSITE", "IMAGE")}
    assert referenced == {encoded.seg.SOPInstanceUID, encoded.sr.SOPInstanceUID}
    evidence = {i.ReferencedSOPInstanceUID for st in note.CurrentRequestedProcedureEvidenceSequence
                for se in st.ReferencedSeriesSequence for i in se.ReferencedSOPSequence}
    assert evidence == referenced
    assert encode_rejection(series[0], rejected, manifest, JOB + "rejection", "x").SOPInstanceUID == \
        note.SOPInstanceUID                                       # the same note for the same key
    done = validate(_saved(note, tmp_path / "kos.dcm"))
    assert done.returncode == 0, done.stdout + done.stderr
    with pytest.raises(InputError):
        encode_rejection(series[0], [], manifest, JOB, "nothing")


def _saved(ds: pydicom.Dataset, path: Path) -> Path:
    path.write_bytes(part10_bytes(ds))          # as the worker writes its results
    return path
