"""Result objects are written byte for byte as pydicom writes them, without pydicom's
per-element cost on their sequences; what the fast encoder does not know goes to pydicom."""

from __future__ import annotations

import copy
import warnings
from dataclasses import replace
from io import BytesIO

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, SecondaryCaptureImageStorage
from pydicom.valuerep import VR

from node.inference.manifest import load_manifest
from node.results.encode import (encode_classification, encode_image_classifications, encode_rejection,
                                 encode_segmentation)
from node.results.part10 import part10_bytes
from test_encode import JOB, ROOT, pneumonia_manifest, read_headers, tissue_masks, write_ct_series


def pydicoms(ds: Dataset) -> bytes:
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def same_as_pydicom(ds: Dataset, ours_only: bool = False) -> bytes:
    """Our bytes, after checking them against pydicom's for a copy taken before either wrote.
    With ``ours_only``, pydicom's sequence writer refuses while ours run: a sequence that
    pydicom wrote (the fast path not taken) fails the test."""
    expected = pydicoms(copy.deepcopy(ds))
    with pytest.MonkeyPatch.context() as patch:
        if ours_only:
            def refuse(*_args, **_kwargs):
                raise AssertionError("pydicom wrote a sequence")
            patch.setitem(pydicom.filewriter.writers, VR.SQ, (refuse, None))
        ours = part10_bytes(ds)
    assert ours == expected
    return ours


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    """The test CT, its patient named in UTF-8 (the SR and the note copy the name)."""
    headers = read_headers(write_ct_series(tmp_path_factory.mktemp("ct")))
    for ds in headers:
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.PatientName = "Müller^Jürgen"
    return headers


def test_every_result_object_is_the_bytes_pydicom_writes(series):
    tissue = load_manifest(ROOT / "models" / "ct-tissue")
    # A segment name that is not ASCII puts UTF-8 text in nested items of the SEG and the SR.
    accented = replace(tissue, segments=(replace(tissue.segments[0], name="Körper"), *tissue.segments[1:]))
    overlapping = tissue_masks()
    apart = overlapping.copy()
    apart[..., 0] &= ~(apart[..., 1] | apart[..., 2])        # a label map, not stacked masks
    results = [encode_segmentation(series, overlapping, tissue, JOB),
               encode_segmentation(series, apart, accented, JOB + "apart"),
               encode_segmentation(series, overlapping[..., :1], replace(tissue, segments=tissue.segments[:1]),
                                   JOB + "one")]
    classification, _ = encode_classification(series, np.array([0.8, 0.1]), pneumonia_manifest(), JOB)
    images, _, _ = encode_image_classifications([(series[0], np.array([0.7, 0.2])),
                                                 (series[1], np.array([0.1, 0.9]))], pneumonia_manifest(), JOB)
    rejected = [dict(sop_class_uid=str(ds.SOPClassUID), sop_instance_uid=str(ds.SOPInstanceUID),
                     series_instance_uid=str(ds.SeriesInstanceUID), modality=str(ds.Modality))
                for ds in (results[0].seg, results[0].sr)]
    note = encode_rejection(series[0], rejected, tissue, JOB + "rejection", "superseded: the input changed")

    for result in results:
        seg = same_as_pydicom(result.seg, ours_only=True)
        back = pydicom.dcmread(BytesIO(seg))
        assert len(back.PerFrameFunctionalGroupsSequence) == int(back.NumberOfFrames) > 0
        assert back.PixelData == result.seg.PixelData
        same_as_pydicom(result.sr, ours_only=True)
    assert "Körper" in str(pydicom.dcmread(BytesIO(part10_bytes(results[1].sr))))
    for ds in (classification, images, note):
        assert str(pydicom.dcmread(BytesIO(same_as_pydicom(ds, ours_only=True))).PatientName) == "Müller^Jürgen"


def odd_dataset() -> Dataset:
    """A small image whose nested items hold what the fast encoder leaves to pydicom's element
    writer (text that is not ASCII, person names, dates, AT, a text over 64 KiB, empty values)
    next to what it encodes itself (UI, CS, LO, DS as written and as computed, IS, US, FD, SQ)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, "1.2.3.4.5"
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.Modality = "OT"
    ds.Rows = ds.Columns = 2
    ds.BitsAllocated, ds.PixelRepresentation, ds.SamplesPerPixel = 16, 0, 1
    ds.PixelData = bytes(8)
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "1", "99X", "Größe"
    item.PersonName = "Doe^Jane"
    item.StudyDate = pydicom.valuerep.DA("20260102")
    item.SelectorATValue = 0x00100010
    item.ImagePositionPatient = ["1.50", 2, 3.25]
    item.SliceThickness = 1 / 3
    item.InstanceNumber = "7"
    item.DimensionIndexValues = [1, 2, 3]
    item.SelectorFDValue = [0.5, -1e300]
    item.ReferencedFrameNumber = 4
    item.ImageComments = "x" * 70_000               # LT over 64 KiB: pydicom writes it as UN
    item.StudyDescription = ""
    item.SeriesDescription = None
    item.ReferencedImageSequence = DicomSequence([])
    inner = Dataset()
    inner.SpecificCharacterSet = "ISO_IR 192"           # an item in a character set of its own
    inner.CodeMeaning = "Über"
    inner.CodeValue = "ab"
    item.ConceptNameCodeSequence = DicomSequence([inner])
    ds.ContentSequence = DicomSequence([item, Dataset()])
    return ds


def test_what_the_encoder_does_not_know_is_written_by_pydicom():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                # pydicom's warning about the long LT
        same_as_pydicom(odd_dataset(), ours_only=True)  # every sequence here is still ours

        nested_ambiguous = odd_dataset()               # a VR that depends on its dataset
        lut = Dataset()
        lut.LUTDescriptor = [4096, 0, 12]
        lut.LUTData = bytes(8)
        nested_ambiguous.ContentSequence[0].ModalityLUTSequence = [lut]
        assert pydicom.dcmread(BytesIO(same_as_pydicom(nested_ambiguous))).ContentSequence[0] \
            .ModalityLUTSequence[0].LUTDescriptor == [4096, 0, 12]

        undefined = odd_dataset()
        undefined["ContentSequence"].is_undefined_length = True
        undefined.ContentSequence[0]["ConceptNameCodeSequence"].is_undefined_length = True
        same_as_pydicom(undefined)

        implicit = odd_dataset()
        implicit.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        same_as_pydicom(implicit)

        read_back = pydicom.dcmread(BytesIO(part10_bytes(odd_dataset())))   # items not yet decoded
        read_back.SOPInstanceUID = "1.2.3.4.6"
        same_as_pydicom(read_back)
